//! Child processes of the benchmarks: `moe worker` processes on loopback ports (their bound
//! addresses read from their logs), and any process of a run, killed when dropped.

use anyhow::Context;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// Processes of a run (workers, a router, etcd), killed when dropped.
pub(crate) struct ChildProcesses(Vec<Child>);

impl ChildProcesses {
    pub(crate) fn one(child: Child) -> Self {
        Self(vec![child])
    }

    pub(crate) fn pid(&self, i: usize) -> u32 {
        self.0[i].id()
    }
}

impl Drop for ChildProcesses {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One `moe worker` process per `--experts` spec, on loopback ports; their addresses.
pub(crate) fn spawn_worker_processes(
    dir: &Path,
    specs: &[impl AsRef<str>],
) -> anyhow::Result<(ChildProcesses, Vec<String>)> {
    let args: Vec<Vec<String>> =
        specs.iter().map(|s| vec![format!("--experts={}", s.as_ref()), "--listen=127.0.0.1:0".to_string()]).collect();
    spawn_worker_processes_with(dir, &args)
}

/// One `moe worker --model DIR` process per list of further flags; their bound addresses.
pub(crate) fn spawn_worker_processes_with(
    dir: &Path,
    args: &[Vec<String>],
) -> anyhow::Result<(ChildProcesses, Vec<String>)> {
    let exe = std::env::current_exe()?;
    let mut children = ChildProcesses(Vec::new());
    let mut addrs = Vec::new();
    for (i, flags) in args.iter().enumerate() {
        let mut child = Command::new(&exe)
            .args(["worker", "--model"])
            .arg(dir)
            .args(flags)
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()?;
        let stderr = child.stderr.take().context("worker stderr")?;
        children.0.push(child);
        let mut lines = BufReader::new(stderr).lines();
        let addr = loop {
            match lines.next() {
                Some(Ok(l)) => {
                    if let Some(a) = l.split("listening on ").nth(1) {
                        break a.trim().to_string();
                    }
                }
                _ => anyhow::bail!("worker {i} exited before listening"),
            }
        };
        // Keep draining its stderr so it never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        addrs.push(addr);
    }
    Ok((children, addrs))
}
