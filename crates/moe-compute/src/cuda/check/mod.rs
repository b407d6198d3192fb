//! The GPU check (`moe kernels check`): every kernel in `kernels/` is run on the device on fresh
//! random inputs, with its outputs poisoned (NaN) first so an unwritten element fails, at several
//! sizes (odd ones, ragged expert loads, zero-token experts), and compared with the CPU backend
//! (or a plain loop where the backend has no op of that exact shape). Then each kernel is timed
//! on a production-sized shape with CUDA events and reported as TFLOP/s or GB/s, as a fraction
//! of cuBLAS's dense bf16 GEMM or of the device-to-device copy bandwidth measured in the same run.

mod attention;
mod elementwise;
mod flash_decode;
mod flash_prefill;
mod gemm;
mod grouped_tc;
mod plan;
mod sample_rows;
mod sampling;

use super::nvrtc::{compile_cubin, guarded, probe_device};
use crate::kernels::KERNELS;
use crate::ComputeError;
use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, DeviceRepr, DriverError, LaunchConfig};
use std::collections::HashMap;
use std::sync::Arc;

type Result<T> = std::result::Result<T, ComputeError>;

/// What to run.
#[derive(Clone, Debug)]
pub struct CheckOptions {
    pub ordinal: usize,
    /// Small timing shapes (a smoke run); the full run uses production shapes.
    pub quick: bool,
    /// Timed launches per kernel (after one warm-up).
    pub iters: usize,
    /// Only this group of [`GROUPS`] (each group can then run in its own process).
    pub only: Option<String>,
}

/// The check's groups, in the order they run.
pub const GROUPS: &[&str] = &[
    "rmsnorm",
    "rope",
    "swiglu",
    "topk_gating",
    "permute",
    "sampling",
    "grouped",
    "lora",
    "attention",
    "plan",
    "grouped_tc",
    "flash_decode",
    "sample_rows",
    "flash_prefill",
];

impl Default for CheckOptions {
    fn default() -> Self {
        Self { ordinal: 0, quick: false, iters: 20, only: None }
    }
}

/// One line of the report: a correctness case or a timing.
#[derive(Clone, Debug, Default)]
pub struct CheckRow {
    pub kernel: String,
    pub shape: String,
    /// max |gpu - cpu| / max |cpu| over the outputs (NaN or a size mismatch: infinity).
    pub rel_err: f64,
    pub bound: f64,
    pub passed: bool,
    /// Timing rows: milliseconds per launch, the rate, and the fraction of the baseline.
    pub ms: Option<f64>,
    pub rate: Option<(f64, &'static str)>,
    pub fraction: Option<(f64, &'static str)>,
    pub note: String,
}

/// Everything a check run found.
#[derive(Clone, Debug, Default)]
pub struct CheckReport {
    pub device: String,
    pub arch: String,
    /// Device-to-device copy, bytes read plus written per second, in GB/s.
    pub copy_gbps: f64,
    /// cuBLAS dense bf16 GEMM on the grouped GEMM's FLOPs, when cuBLAS could be loaded.
    pub cublas_tflops: Option<f64>,
    pub rows: Vec<CheckRow>,
}

impl CheckReport {
    pub fn passed(&self) -> bool {
        self.rows.iter().all(|r| r.passed)
    }

    /// The report as a markdown table (what kernels/NOTES.md keeps).
    pub fn markdown(&self) -> String {
        let mut s = format!(
            "Device: {} ({}); copy bandwidth {:.0} GB/s; cuBLAS bf16 GEMM {}\n\n",
            self.device,
            self.arch,
            self.copy_gbps,
            self.cublas_tflops.map(|t| format!("{t:.1} TFLOP/s")).unwrap_or_else(|| "unavailable".into())
        );
        s.push_str("| kernel | shape | rel. error (bound) | ok | time | rate | of baseline | note |\n");
        s.push_str("|---|---|---|---|---|---|---|---|\n");
        for r in &self.rows {
            let err = if r.ms.is_some() && r.bound == 0.0 {
                "-".to_string()
            } else {
                format!("{:.1e} ({:.0e})", r.rel_err, r.bound)
            };
            s.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
                r.kernel,
                r.shape,
                err,
                if r.passed { "yes" } else { "**NO**" },
                r.ms.map(|m| format!("{:.3} ms", m)).unwrap_or_default(),
                r.rate.map(|(v, u)| format!("{v:.1} {u}")).unwrap_or_default(),
                r.fraction.map(|(f, of)| format!("{:.0}% of {of}", f * 100.0)).unwrap_or_default(),
                r.note
            ));
        }
        s
    }
}

fn drv(what: &'static str) -> impl Fn(DriverError) -> ComputeError {
    move |e| ComputeError::Cuda(format!("{what}: {e}"))
}

/// The device, its stream and every kernel function, compiled for its architecture.
pub(crate) struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    funcs: HashMap<&'static str, CudaFunction>,
    iters: usize,
}

impl Gpu {
    fn open(opts: &CheckOptions) -> Result<(Self, String, String)> {
        let info = probe_device(opts.ordinal)?;
        let (major, minor) = info.compute_capability;
        let arch = format!("sm_{major}{minor}");
        let ctx = guarded("CUDA driver", || CudaContext::new(opts.ordinal))?.map_err(drv("opening the device"))?;
        let stream = ctx.default_stream();
        let mut funcs = HashMap::new();
        for k in KERNELS {
            // A cubin, as the backend loads them (PTX from an NVRTC newer than the driver does not load).
            let cubin = compile_cubin(k, &arch)?;
            let module = ctx
                .load_module(cudarc::nvrtc::Ptx::from_binary(cubin.to_vec()))
                .map_err(|e| ComputeError::Cuda(format!("loading {}: {e}", k.file)))?;
            for e in k.entry_points {
                let f = module.load_function(e).map_err(|err| ComputeError::Cuda(format!("{e}: {err}")))?;
                funcs.insert(*e, f);
            }
        }
        Ok((Self { ctx, stream, funcs, iters: opts.iters.max(1) }, info.name, arch))
    }

    pub fn func(&self, name: &str) -> Result<&CudaFunction> {
        self.funcs.get(name).ok_or_else(|| ComputeError::Cuda(format!("no kernel {name}")))
    }

    pub fn up<T: DeviceRepr>(&self, v: &[T]) -> Result<CudaSlice<T>> {
        self.stream.clone_htod(v).map_err(drv("copy to the device"))
    }

    pub fn down<T: DeviceRepr + Default + Clone>(&self, s: &CudaSlice<T>) -> Result<Vec<T>> {
        self.stream.clone_dtoh(s).map_err(drv("copy from the device"))
    }

    /// A buffer of NaN: any element a kernel fails to write stays NaN and fails the comparison.
    pub fn poisoned(&self, n: usize) -> Result<CudaSlice<f32>> {
        self.up(&vec![f32::NAN; n])
    }

    /// Like [`Self::poisoned`] for bf16 outputs (0x7fc1 is a NaN).
    pub fn poisoned_bf16(&self, n: usize) -> Result<CudaSlice<u16>> {
        self.up(&vec![0x7fc1u16; n])
    }

    pub fn sync(&self) -> Result<()> {
        self.stream.synchronize().map_err(drv("kernel execution"))
    }

    /// Milliseconds per call of `f` (one warm-up, then `iters` calls between two events).
    pub fn time(&self, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
        use cudarc::driver::sys::CUevent_flags;
        f()?;
        self.sync()?;
        let start = self.ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(drv("event"))?;
        let end = self.ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(drv("event"))?;
        start.record(&self.stream).map_err(drv("event"))?;
        for _ in 0..self.iters {
            f()?;
        }
        end.record(&self.stream).map_err(drv("event"))?;
        let ms = start.elapsed_ms(&end).map_err(drv("kernel execution"))? as f64;
        Ok(ms / self.iters as f64)
    }
}

/// Launch with the driver's error mapped.
pub(crate) fn launched(
    r: std::result::Result<Option<(cudarc::driver::CudaEvent, cudarc::driver::CudaEvent)>, DriverError>,
    name: &str,
) -> Result<()> {
    r.map(|_| ()).map_err(|e| ComputeError::Cuda(format!("launching {name}: {e}")))
}

pub(crate) fn grid(x: u32, y: u32, z: u32, threads: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: (x.max(1), y.max(1), z.max(1)), block_dim: (threads, 1, 1), shared_mem_bytes: 0 }
}

/// The check's inputs come from the project's one generator, seeded, so a failing case can be
/// rerun.
pub(crate) struct Rng(crate::rng::SplitMix64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(crate::rng::SplitMix64::new(seed))
    }
    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f32 {
        self.0.signed()
    }
    pub fn below(&mut self, n: usize) -> usize {
        self.0.below(n)
    }
    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform() * scale).collect()
    }
}

/// Round-to-nearest-even bf16 bits of `v`, as the kernels' f32_to_bf16.
pub(crate) use crate::cuda::backend::tables::to_bf16;

pub(crate) fn from_bf16(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// max |got - want| / max |want|; infinity when a value is not finite or sizes differ.
pub(crate) fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    if got.len() != want.len() {
        return f64::INFINITY;
    }
    let mut diff = 0.0f64;
    let mut scale = 0.0f64;
    for (&g, &w) in got.iter().zip(want) {
        if !g.is_finite() && w.is_finite() {
            return f64::INFINITY;
        }
        diff = diff.max((g as f64 - w as f64).abs());
        scale = scale.max((w as f64).abs());
    }
    diff / scale.max(1e-30)
}

pub(crate) const F32_BOUND: f64 = 1e-5;
pub(crate) const BF16_BOUND: f64 = 1e-2;

/// A correctness row.
pub(crate) fn compared(kernel: &str, shape: String, got: &[f32], want: &[f32], bound: f64) -> CheckRow {
    let e = rel_err(got, want);
    CheckRow { kernel: kernel.into(), shape, rel_err: e, bound, passed: e <= bound, ..Default::default() }
}

/// A timing row for a memory-bound kernel moving `bytes` per launch.
pub(crate) fn timed_bytes(kernel: &str, shape: String, ms: f64, bytes: f64, copy_gbps: f64) -> CheckRow {
    let gbps = bytes / (ms * 1e-3) / 1e9;
    CheckRow {
        kernel: kernel.into(),
        shape,
        passed: true,
        ms: Some(ms),
        rate: Some((gbps, "GB/s")),
        fraction: (copy_gbps > 0.0).then(|| (gbps / copy_gbps, "copy")),
        ..Default::default()
    }
}

/// Runs the whole check on device `opts.ordinal`.
pub fn run_check(opts: &CheckOptions) -> Result<CheckReport> {
    let (gpu, device, arch) = Gpu::open(opts)?;
    let mut report = CheckReport { device, arch, ..Default::default() };
    let mut rng = Rng::new(0x5eed);
    (report.copy_gbps, report.cublas_tflops) = measured_baselines(&gpu, opts.quick)?;
    let copy = report.copy_gbps;
    let cublas = report.cublas_tflops;
    let runs = |g: &str| opts.only.as_deref().is_none_or(|o| o == g);
    let rows = &mut report.rows;
    let q = opts.quick;
    if runs("rmsnorm") {
        rows.extend(elementwise::rmsnorm(&gpu, &mut rng, q, copy)?);
    }
    if runs("rope") {
        rows.extend(elementwise::rope(&gpu, &mut rng, q, copy)?);
    }
    if runs("swiglu") {
        rows.extend(elementwise::swiglu(&gpu, &mut rng, q, copy)?);
    }
    if runs("topk_gating") {
        rows.extend(elementwise::topk_gating(&gpu, &mut rng, q, copy)?);
    }
    if runs("permute") {
        rows.extend(elementwise::permute(&gpu, &mut rng, q, copy)?);
    }
    if runs("sampling") {
        rows.extend(sampling::sampling(&gpu, &mut rng, q, copy)?);
    }
    if runs("grouped") {
        rows.extend(gemm::grouped(&gpu, &mut rng, q, cublas)?);
    }
    if runs("lora") {
        rows.extend(gemm::lora(&gpu, &mut rng, q, copy)?);
    }
    if runs("attention") {
        rows.extend(attention::paged(&gpu, &mut rng, q, copy)?);
    }
    if runs("plan") {
        rows.extend(plan::plan(&gpu, &mut rng, q)?);
    }
    if runs("grouped_tc") {
        rows.extend(grouped_tc::grouped_tc(&gpu, &mut rng, q, cublas)?);
    }
    if runs("sample_rows") {
        rows.extend(sample_rows::sample_rows(&gpu, &mut rng, q)?);
    }
    if runs("flash_prefill") {
        rows.extend(flash_prefill::flash_prefill(&gpu, &mut rng, q, cublas)?);
    }
    if runs("flash_decode") {
        rows.extend(flash_decode::flash_decode(&gpu, &mut rng, q, copy)?);
    }
    Ok(report)
}

/// The device's copy bandwidth (GB/s, read plus written) and cuBLAS dense bf16 GEMM (TFLOP/s,
/// `None` when cuBLAS cannot be loaded): the rooflines `moe bench-device` reports against.
pub fn baselines(ordinal: usize) -> Result<(f64, Option<f64>)> {
    let (gpu, _, _) = Gpu::open(&CheckOptions { ordinal, ..Default::default() })?;
    measured_baselines(&gpu, false)
}

/// The rooflines, measured once per run: read from the file `MOE_BASELINES` names when it holds
/// them (full-size measurements only), else measured and written there for the next process.
fn measured_baselines(gpu: &Gpu, quick: bool) -> Result<(f64, Option<f64>)> {
    let file = std::env::var_os("MOE_BASELINES").filter(|f| !f.is_empty() && !quick).map(std::path::PathBuf::from);
    if let Some(b) = file.as_ref().and_then(|f| std::fs::read_to_string(f).ok()).and_then(|t| parse_baselines(&t)) {
        return Ok(b);
    }
    let measured = (gemm::copy_bandwidth(gpu, quick)?, gemm::cublas_tflops(gpu, quick));
    if let Some(f) = file {
        let _ = std::fs::write(f, format_baselines(measured));
    }
    Ok(measured)
}

fn format_baselines((copy, cublas): (f64, Option<f64>)) -> String {
    format!("copy_gbps={copy}\ncublas_tflops={}\n", cublas.map_or("unavailable".to_string(), |c| c.to_string()))
}

fn parse_baselines(text: &str) -> Option<(f64, Option<f64>)> {
    let value = |key: &str| text.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix('='));
    let copy: f64 = value("copy_gbps")?.trim().parse().ok().filter(|c: &f64| *c > 0.0)?;
    let cublas = match value("cublas_tflops")?.trim() {
        "unavailable" => None,
        t => Some(t.parse().ok()?),
    };
    Some((copy, cublas))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn baselines_round_trip_through_their_file() {
        for b in [(4241.5, Some(783.25)), (100.0, None)] {
            assert_eq!(parse_baselines(&format_baselines(b)), Some(b));
        }
        assert_eq!(parse_baselines("copy_gbps=0\ncublas_tflops=1\n"), None, "a zero bandwidth is remeasured");
        assert_eq!(parse_baselines("garbage"), None);
    }
}
