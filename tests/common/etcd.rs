//! etcd servers for the membership tests: one member, or a three-member cluster whose members
//! can be killed and restarted, on free loopback ports with temporary data dirs.

use super::free_port;
use serde_json::Value;
use std::process::Command;

/// An etcd server on free loopback ports with a temporary data dir, stopped when dropped.
pub struct Etcd {
    child: Option<std::process::Child>,
    data: tempfile::TempDir,
    pub client_port: u16,
    peer_port: u16,
}

impl Etcd {
    /// Starts etcd, or returns `None` (with a note on stderr) when the `etcd` binary is not
    /// installed and `MOE_REQUIRE_ETCD` is unset. `.ci/run` installs etcd and sets
    /// `MOE_REQUIRE_ETCD=1`, so in CI a missing etcd fails these tests instead of skipping them.
    pub fn start() -> Option<Etcd> {
        let installed = Command::new("etcd").arg("--version").output().is_ok_and(|o| o.status.success());
        if !installed {
            assert!(
                std::env::var_os("MOE_REQUIRE_ETCD").is_none(),
                "MOE_REQUIRE_ETCD is set but the etcd server is not installed (Debian package etcd-server)"
            );
            eprintln!("skipping: the etcd server is not installed (Debian package etcd-server; .ci/run installs it)");
            return None;
        }
        let data = tempfile::tempdir().expect("tmp");
        let mut e = Etcd { child: None, data, client_port: free_port(), peer_port: free_port() };
        // A port picked free can be taken by a parallel test before etcd binds it: etcd then
        // exits, and a fresh pair of ports is tried.
        for _ in 0..5 {
            if e.try_launch() {
                return Some(e);
            }
            (e.client_port, e.peer_port) = (free_port(), free_port());
            // Whatever the failed attempt wrote names its ports: start from an empty data dir.
            let _ = std::fs::remove_dir_all(e.data.path().join("data"));
        }
        panic!("etcd did not start on five pairs of free ports");
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// Starts (or restarts) the server on the same ports and data.
    pub fn launch(&mut self) {
        assert!(self.try_launch(), "etcd did not start");
    }

    /// [`Etcd::launch`], false when etcd exits or does not listen within 20 s.
    fn try_launch(&mut self) -> bool {
        let client = self.url();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let child = Command::new("etcd")
            .args(["--name", "t", "--data-dir"])
            .arg(self.data.path().join("data"))
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("t={peer}")])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("the etcd server is needed for these tests (Debian package etcd-server; .ci/run installs it)");
        self.child = Some(child);
        let start = std::time::Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.client_port)).is_err() {
            let exited = self.child.as_mut().is_some_and(|c| c.try_wait().ok().flatten().is_some());
            if exited || start.elapsed() > std::time::Duration::from_secs(20) {
                self.stop();
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        true
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A three-member etcd cluster on loopback (each member its own ports and data), for leader
/// failure tests. `None` when etcd is not installed, as for [`Etcd::start`].
pub struct EtcdCluster {
    members: Vec<(String, u16, u16, Option<std::process::Child>)>,
    data: tempfile::TempDir,
}

impl EtcdCluster {
    pub fn start() -> Option<EtcdCluster> {
        let probe = Etcd::start()?;
        drop(probe);
        let members = (0..3).map(|i| (format!("m{i}"), free_port(), free_port(), None)).collect();
        let mut c = EtcdCluster { members, data: tempfile::tempdir().expect("tmp") };
        for i in 0..3 {
            c.launch(i);
        }
        Some(c)
    }

    /// Every member's client URL, comma separated (for `--etcd`).
    pub fn urls(&self) -> String {
        self.members.iter().map(|m| format!("http://127.0.0.1:{}", m.1)).collect::<Vec<_>>().join(",")
    }

    pub fn url(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.members[i].1)
    }

    /// Starts (or restarts) member `i` on its ports and data.
    pub fn launch(&mut self, i: usize) {
        let initial: Vec<String> = self.members.iter().map(|m| format!("{}=http://127.0.0.1:{}", m.0, m.2)).collect();
        let (name, client, peer) =
            (self.members[i].0.clone(), self.url(i), format!("http://127.0.0.1:{}", self.members[i].2));
        let child = Command::new("etcd")
            .args(["--name", &name, "--data-dir"])
            .arg(self.data.path().join(&name))
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &initial.join(","), "--initial-cluster-token", "moe-test"])
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("etcd");
        self.members[i].3 = Some(child);
    }

    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].3.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The index of the current leader, asked of member `via` through etcd's JSON gateway.
    pub fn leader(&self, rt: &tokio::runtime::Runtime, via: usize) -> Option<usize> {
        let url = format!("{}/v3/maintenance/status", self.url(via));
        let status: Value = rt.block_on(async {
            let r = reqwest::Client::new().post(url).body("{}").send().await.ok()?;
            r.json().await.ok()
        })?;
        let leader = status["leader"].as_str()?.to_string();
        let members_url = format!("{}/v3/cluster/member/list", self.url(via));
        let list: Value = rt.block_on(async {
            let r = reqwest::Client::new().post(members_url).body("{}").send().await.ok()?;
            r.json().await.ok()
        })?;
        let name = list["members"].as_array()?.iter().find(|m| m["ID"].as_str() == Some(&leader))?["name"]
            .as_str()?
            .to_string();
        self.members.iter().position(|m| m.0 == name)
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}
