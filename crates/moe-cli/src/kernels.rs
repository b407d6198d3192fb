//! `moe kernels`: the CUDA kernels. `compile` runs NVRTC over every kernel (or the files given)
//! for an architecture and prints a table; it needs only libnvrtc, no GPU, and is what CI runs.
//! `list` prints the kernels and their entry points.

use clap::{Args, Subcommand};
use moe_compute::kernels::{KernelSource, KERNELS};

#[derive(Args, Debug)]
pub struct KernelsArgs {
    #[command(subcommand)]
    pub command: KernelsCommand,
}

#[derive(Subcommand, Debug)]
pub enum KernelsCommand {
    /// Compile every kernel to PTX with NVRTC (libnvrtc must be loadable; no GPU needed).
    Compile {
        /// Virtual architecture, e.g. compute_80, compute_90 (H100/H200).
        #[arg(long, default_value = "compute_90")]
        arch: String,
        /// Compile these .cu files (with the shared helpers) instead of the built-in kernels.
        #[arg(long)]
        file: Vec<std::path::PathBuf>,
    },
    /// List the kernels and their entry points.
    List,
}

pub fn run(a: KernelsArgs) -> anyhow::Result<()> {
    match a.command {
        KernelsCommand::List => {
            for k in KERNELS {
                println!("{:<20} {}", k.file, k.entry_points.join(", "));
            }
            Ok(())
        }
        KernelsCommand::Compile { arch, file } => compile(arch, file),
    }
}

#[cfg(feature = "cuda")]
fn compile(arch: String, files: Vec<std::path::PathBuf>) -> anyhow::Result<()> {
    let arch: &'static str = Box::leak(arch.into_boxed_str());
    let mut sources: Vec<KernelSource> = KERNELS.to_vec();
    if !files.is_empty() {
        sources.clear();
        for f in files {
            let text = std::fs::read_to_string(&f).map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))?;
            let name = f.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
            sources.push(KernelSource {
                file: Box::leak(name.into_boxed_str()),
                source: Box::leak(text.into_boxed_str()),
                entry_points: &[],
            });
        }
    }
    println!("{:<20} {:>10} {:>9}  entry points ({arch})", "kernel", "PTX bytes", "ms");
    for k in &sources {
        let t = std::time::Instant::now();
        let ptx = moe_compute::cuda::compile_kernel(k, arch)?;
        for e in k.entry_points {
            anyhow::ensure!(ptx.ptx.contains(&format!(".entry {e}(")), "{}: PTX lacks entry point {e}", k.file);
        }
        println!(
            "{:<20} {:>10} {:>9.0}  {}",
            k.file,
            ptx.ptx.len(),
            t.elapsed().as_secs_f64() * 1e3,
            k.entry_points.join(", ")
        );
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn compile(_arch: String, _files: Vec<std::path::PathBuf>) -> anyhow::Result<()> {
    let _ = KernelSource::full_source;
    anyhow::bail!("this binary was built without CUDA support (build moe-cli with its default `cuda` feature)")
}
