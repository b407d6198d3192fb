//! `moe kernels`: the CUDA kernels. `compile` runs NVRTC over every kernel (or the files given)
//! for an architecture and prints a table; it needs only libnvrtc, no GPU, and is what CI runs.
//! `list` prints the kernels and their entry points. `check` runs every kernel on a GPU against
//! the CPU backend and times it (see kernels/check.sh).

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
        /// Virtual architecture for PTX, e.g. compute_80, compute_90 (H100/H200), or a real one
        /// for a cubin as the backend loads it, e.g. sm_90.
        #[arg(long, env = "MOE_ARCH", default_value = "compute_90")]
        arch: String,
        /// Compile these .cu files (with the shared helpers) instead of the built-in kernels.
        #[arg(long, env = "MOE_FILE")]
        file: Vec<std::path::PathBuf>,
    },
    /// List the kernels and their entry points.
    List,
    /// Print the NVRTC and CUDA driver versions this process finds.
    Versions,
    /// Recompute the committed transformers/PEFT fixtures' logits on the device given with the
    /// global --device, with and without each PEFT adapter, and compare (step 3 of the GPU
    /// acceptance; on the CPU the same numbers the tests check).
    Fixtures {
        /// Directory of fixtures (each subdirectory: config.json, expected.json, optional peft/).
        #[arg(long, env = "MOE_FIXTURES", default_value = "tests/fixtures")]
        dir: std::path::PathBuf,
        /// Largest allowed max|got - want| / max|want| (bf16 weights on a GPU: about 1e-2).
        #[arg(long, env = "MOE_BOUND", default_value_t = 3e-2)]
        bound: f64,
    },
    /// Run every kernel on the GPU against the CPU backend (random inputs, poisoned outputs,
    /// ragged and zero-token expert loads), then time each one against cuBLAS and the copy
    /// bandwidth. Exits non-zero when any kernel is wrong.
    Check {
        /// The GPU's ordinal (as in cuda:N).
        #[arg(long, env = "MOE_GPU", default_value_t = 0)]
        gpu: usize,
        /// Small timing shapes (a smoke run of a few seconds).
        #[arg(long, env = "MOE_QUICK")]
        quick: bool,
        /// Timed launches per kernel.
        #[arg(long, env = "MOE_ITERS", default_value_t = 20)]
        iters: usize,
        /// Also write the report as a markdown table to this file.
        #[arg(long, env = "MOE_MARKDOWN")]
        markdown: Option<std::path::PathBuf>,
        /// Run only this group (rmsnorm, rope, swiglu, topk_gating, permute, sampling, grouped,
        /// lora, attention, plan, grouped_tc, flash_decode, sample_rows, flash_prefill), so each
        /// can run in its own process.
        #[arg(long, env = "MOE_ONLY")]
        only: Option<String>,
    },
}

pub fn run(a: KernelsArgs, device: moe_compute::Device) -> anyhow::Result<()> {
    match a.command {
        KernelsCommand::Fixtures { dir, bound } => crate::fixture_check::run(&dir, device, bound),
        KernelsCommand::Versions => versions(),
        KernelsCommand::List => {
            for k in KERNELS {
                println!("{:<20} {}", k.file, k.entry_points.join(", "));
            }
            Ok(())
        }
        KernelsCommand::Compile { arch, file } => compile(arch, file),
        KernelsCommand::Check { gpu, quick, iters, markdown, only } => check(gpu, quick, iters, markdown, only),
    }
}

#[cfg(feature = "cuda")]
fn check(
    ordinal: usize,
    quick: bool,
    iters: usize,
    markdown: Option<std::path::PathBuf>,
    only: Option<String>,
) -> anyhow::Result<()> {
    anyhow::ensure!(iters >= 1, "--iters must be at least 1");
    if let Some(o) = &only {
        let groups = moe_compute::cuda::check::GROUPS;
        anyhow::ensure!(groups.contains(&o.as_str()), "--only {o:?}: one of {}", groups.join(", "));
    }
    println!("{}", moe_compute::cuda::versions());
    let opts = moe_compute::cuda::check::CheckOptions { ordinal, quick, iters, only };
    let report = moe_compute::cuda::check::run_check(&opts)?;
    let text = report.markdown();
    println!("{text}");
    if let Some(path) = markdown {
        std::fs::write(&path, &text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    }
    let failed: Vec<&str> = report.rows.iter().filter(|r| !r.passed).map(|r| r.kernel.as_str()).collect();
    anyhow::ensure!(failed.is_empty(), "{} checks failed: {}", failed.len(), failed.join(", "));
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn check(
    _gpu: usize,
    _quick: bool,
    _iters: usize,
    _markdown: Option<std::path::PathBuf>,
    _only: Option<String>,
) -> anyhow::Result<()> {
    anyhow::bail!("this binary was built without CUDA support (build moe-cli with its default `cuda` feature)")
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
    if let Some(sm) = arch.strip_prefix("sm_") {
        // A cubin (machine code for that device), as the CUDA backend loads it, with ptxas's
        // resource report per entry point: a kernel that spills registers fails the compile.
        println!(
            "{:<20} {:>10} {:>9}  entry point (sm_{sm}, cubin): registers, stack, spills, static smem",
            "kernel", "bytes", "ms"
        );
        let mut spilling = Vec::new();
        for k in &sources {
            let t = std::time::Instant::now();
            let (bin, resources) = moe_compute::cuda::compile_cubin_resources(k, arch)?;
            for e in k.entry_points {
                anyhow::ensure!(
                    bin.windows(e.len() + 1).any(|w| &w[..e.len()] == e.as_bytes() && w[e.len()] == 0),
                    "{}: cubin lacks entry point {e}",
                    k.file
                );
            }
            println!("{:<20} {:>10} {:>9.0}", k.file, bin.len(), t.elapsed().as_secs_f64() * 1e3);
            for r in &resources {
                let entry = k.entry_points.contains(&r.function.as_str());
                if !entry && !k.entry_points.is_empty() {
                    continue;
                }
                println!(
                    "{:<20} {:>10} {:>9}  {}: {} registers, {} B stack, {} B spill stores, {} B spill loads, {} B smem",
                    "",
                    "",
                    "",
                    r.function,
                    r.registers,
                    r.stack_bytes,
                    r.spill_store_bytes,
                    r.spill_load_bytes,
                    r.shared_bytes
                );
                if r.spills() {
                    spilling.push(format!("{}: {}", k.file, r.function));
                }
            }
        }
        anyhow::ensure!(spilling.is_empty(), "registers spill to local memory in {}", spilling.join(", "));
        return Ok(());
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

#[cfg(feature = "cuda")]
fn versions() -> anyhow::Result<()> {
    println!("{}", moe_compute::cuda::versions());
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn versions() -> anyhow::Result<()> {
    anyhow::bail!("this binary was built without CUDA support (build moe-cli with its default `cuda` feature)")
}
