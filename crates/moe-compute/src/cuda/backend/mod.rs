//! The CUDA backend: weights, activations and the paged KV cache live on the GPU; dense
//! projections and the per-expert products run on cuBLAS (bf16 inputs, f32 accumulation and
//! output); everything else runs on the project's kernels (`kernels/*.cu`, compiled by NVRTC to a
//! cubin for the device). The host sees only the wire rows (`upload`/`download`), the gate logits
//! it routes on and the logits it samples from, plus small index tables ([`tables`]).
//!
//! One backend per device, shared by every engine and expert host of the process: all work goes
//! to one stream, so buffers never need cross-stream synchronisation. The trait's operations
//! cannot return errors; a failing launch or copy means the device is lost (a CUDA context is
//! unusable after a fault), so it panics with the driver's message and the engine's supervision
//! fails the open requests and exits for a restart.

mod attend;
mod buffers;
mod ops;
mod shared_launch;
pub mod tables;

pub use buffers::{CudaAct, CudaKvStore, CudaMatrix, CudaVector, MatrixBuf};

use super::nvrtc::{compile_cubin, guarded, probe_device};
use crate::kernels::KERNELS;
use crate::{ComputeError, Result};
use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DriverError, LaunchConfig};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// How routed experts are multiplied (`--expert-gemm`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ExpertGemm {
    /// One cuBLAS GEMM per expert with rows.
    Cublas,
    /// The project's grouped GEMM kernel: every expert in one launch (bf16 weights only; other
    /// experts fall back to cuBLAS).
    Grouped,
    /// The tensor-core grouped GEMM (kernels/grouped_gemm_tc.cu: cp.async pipeline, swizzled
    /// shared memory, ldmatrix, a tile table per call); bf16 weights whose hidden and
    /// intermediate sizes are multiples of 8, else as `Grouped`.
    Tc,
    /// `Tc` for layers of at least [`AUTO_TC_MIN_EXPERTS`] experts, `Cublas` for fewer (the
    /// default; see [`ExpertGemm::resolve`]).
    #[default]
    Auto,
}

/// Experts per layer from which `auto` takes the tensor-core grouped GEMM. Measured on an H200
/// (kernels/runs/2026-12-04-d217621 and 2026-12-04-4e40b1b, decode at context 128): with 128
/// experts (Qwen3-30B-A3B) it beat cuBLAS per expert at every batch (batch 16: 31% against 7% of
/// the HBM roofline), where one cuBLAS call per expert leaves the GPU idle between launches;
/// with 8 (Mixtral-8x7B) it won at batch 16-64 (73/63% against 68/60%) but lost at batch 1 and
/// 256 (37/33% against 47/38%).
pub const AUTO_TC_MIN_EXPERTS: usize = 16;

impl ExpertGemm {
    /// The path a layer of `experts` experts takes under this mode.
    pub fn resolve(self, experts: usize) -> ExpertGemm {
        match self {
            ExpertGemm::Auto if experts >= AUTO_TC_MIN_EXPERTS => ExpertGemm::Tc,
            ExpertGemm::Auto => ExpertGemm::Cublas,
            other => other,
        }
    }
}

impl std::str::FromStr for ExpertGemm {
    type Err = ComputeError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cublas" => Ok(Self::Cublas),
            "grouped" => Ok(Self::Grouped),
            "tc" => Ok(Self::Tc),
            "auto" => Ok(Self::Auto),
            other => Err(ComputeError::Cuda(format!("expert GEMM {other:?}: use auto, cublas, grouped or tc"))),
        }
    }
}

static EXPERT_GEMM: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(3);

/// Chooses the expert GEMM path for every CUDA backend of this process (read at each call).
pub fn set_expert_gemm(mode: ExpertGemm) {
    EXPERT_GEMM.store(mode as u8, std::sync::atomic::Ordering::Relaxed);
}

pub fn expert_gemm() -> ExpertGemm {
    match EXPERT_GEMM.load(std::sync::atomic::Ordering::Relaxed) {
        0 => ExpertGemm::Cublas,
        1 => ExpertGemm::Grouped,
        2 => ExpertGemm::Tc,
        _ => ExpertGemm::Auto,
    }
}

static DETERMINISTIC: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Batch-invariant GPU inference (`--deterministic`): every bf16 product (dense layers, the LM
/// head, experts) runs on the tensor-core GEMM, whose tiling and k order do not depend on the
/// number of rows, instead of cuBLAS (which picks kernels by shape), so a request's bits do not
/// depend on its batch. Attention kernels and the LoRA kernels already treat rows independently.
pub fn set_deterministic(on: bool) {
    DETERMINISTIC.store(on, std::sync::atomic::Ordering::Relaxed);
}

pub fn deterministic() -> bool {
    DETERMINISTIC.load(std::sync::atomic::Ordering::Relaxed)
}

static DEVICE_ROUTING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Route MoE layers on the device (the default; `MOE_CUDA_ROUTING=host` routes on the host,
/// read when a backend opens): gate_route_f32, and only the chosen experts and weights come back.
/// On an H200 (kernels/runs/2026-12-04-d217621) it gave the host's plans bit for bit, rows of
/// ties, NaN and ±inf included, and the host's fixture logits; Qwen3-30B-A3B decode at batch 64
/// 1.8x faster with the tensor-core expert GEMM (2026-12-04-4e40b1b), Mixtral unchanged.
pub fn set_device_routing(on: bool) {
    DEVICE_ROUTING.store(on, std::sync::atomic::Ordering::Relaxed);
}

pub fn device_routing() -> bool {
    DEVICE_ROUTING.load(std::sync::atomic::Ordering::Relaxed)
}

static HOST_SYNCS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How many times the host has waited for a device in this process (every download of rows or
/// routing results): `moe bench-device` reports them per decode step, the number issue 32 wants
/// at zero inside an embedded step.
pub fn host_syncs() -> u64 {
    HOST_SYNCS.load(std::sync::atomic::Ordering::Relaxed)
}

/// Which kernel computes attention over the paged cache (`--cuda-attention`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AttentionKernel {
    /// attention_prefill_*: a block per (row, head), online softmax per warp; every layout.
    #[default]
    Classic,
    /// flash_prefill_bf16 on tensor cores where it applies (bf16 cache, head size 64 or 128, no
    /// attention sinks), else Classic; flash_decode_bf16 for decode-only calls. Passed its checks
    /// on an H200 (kernels/runs/2026-12-04-d217621): Mixtral prefill 2.7-4.2x faster, decode at
    /// batch 64 3-5% slower (flash-decoding at 12% of copy bandwidth), so not the default.
    Flash,
}

impl std::str::FromStr for AttentionKernel {
    type Err = ComputeError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "classic" => Ok(Self::Classic),
            "flash" => Ok(Self::Flash),
            other => Err(ComputeError::Cuda(format!("attention kernel {other:?}: use classic or flash"))),
        }
    }
}

static ATTENTION: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Chooses the attention kernel for every CUDA backend of this process (read at each call).
pub fn set_attention_kernel(kind: AttentionKernel) {
    ATTENTION.store(kind == AttentionKernel::Flash, std::sync::atomic::Ordering::Relaxed);
}

pub fn attention_kernel() -> AttentionKernel {
    if ATTENTION.load(std::sync::atomic::Ordering::Relaxed) {
        AttentionKernel::Flash
    } else {
        AttentionKernel::Classic
    }
}

/// Raises the device's default memory pool's release threshold to "never", so buffers freed
/// inside a step (the per-call tables) are reused from the pool instead of going back to the
/// driver at every synchronisation and being mapped again. A driver without pools only logs.
fn keep_pool_memory(ctx: &CudaContext) {
    use cudarc::driver::sys;
    let raised = super::nvrtc::guarded("CUDA driver", || {
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        let mut threshold: u64 = u64::MAX;
        // SAFETY: out-parameters of the right types; the pool is this device's default one.
        unsafe {
            sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) == sys::CUresult::CUDA_SUCCESS
                && sys::cuMemPoolSetAttribute(
                    pool,
                    sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                    &mut threshold as *mut u64 as *mut std::ffi::c_void,
                ) == sys::CUresult::CUDA_SUCCESS
        }
    });
    if !matches!(raised, Ok(true)) {
        tracing::warn!("could not raise the memory pool's release threshold: per-step buffers go back to the driver");
    }
}

/// The tensor-core GEMM's entry points and their tilings (gpu_plan::tiles::GemmTiling::ALL).
pub(crate) fn tc_tiling(entry: &str) -> Option<crate::gpu_plan::tiles::GemmTiling> {
    use crate::gpu_plan::tiles::GemmTiling;
    match entry {
        "grouped_gemm_tc_bf16" | "grouped_gemm_tc_swiglu_bf16" => Some(GemmTiling::EXPERT_DEFAULT),
        "grouped_gemm_tc_small_bf16" | "grouped_gemm_tc_swiglu_small_bf16" => Some(GemmTiling::EXPERT_SMALL_M),
        _ => None,
    }
}

/// Kernels that need more than the default 48 KB of dynamic shared memory: their opt-in size.
fn dynamic_shared_bytes(entry: &str) -> Option<u32> {
    match entry {
        "flash_decode_bf16" => Some(crate::gpu_plan::splits::flash_decode_shared_bytes(16, 256) as u32),
        "flash_prefill_bf16" => Some(crate::gpu_plan::splits::flash_prefill_shared_bytes(128) as u32),
        _ => tc_tiling(entry).map(|t| t.shared_bytes()),
    }
}

/// The CUDA backend of one device (cheap to clone: a shared handle).
#[derive(Clone)]
pub struct CudaBackend {
    inner: Arc<Inner>,
}

struct Inner {
    ordinal: usize,
    name: String,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    funcs: HashMap<&'static str, CudaFunction>,
    /// cuBLAS and the bf16 copies of GEMM inputs: one user at a time enqueues a cast and its GEMM.
    blas: Mutex<Blas>,
    /// Keep f32 checkpoints in f32 (`MOE_CUDA_WEIGHTS=f32`): twice the memory, and GEMMs in f32,
    /// so results match the CPU backend to rounding; what the acceptance uses to check the
    /// backend's logic separately from bf16's precision.
    f32_weights: bool,
}

pub(crate) struct Blas {
    handle: CudaBlas,
    x16: Option<CudaSlice<u16>>,
    /// flash-decoding's per-split partial results (grown on demand; the stream orders reuse).
    splits: Option<CudaSlice<f32>>,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.inner.name)
    }
}

fn drv(what: &str) -> impl Fn(DriverError) -> ComputeError + '_ {
    move |e| ComputeError::Cuda(format!("{what}: {e}"))
}

impl CudaBackend {
    /// The backend of device `ordinal`, opened once per process: probes the device, refuses
    /// compute capability below 8.0 (no bf16 tensor cores), compiles every kernel to a cubin for
    /// its `sm_XY` and opens cuBLAS.
    pub fn open(ordinal: usize) -> Result<Self> {
        static OPEN: OnceLock<Mutex<HashMap<usize, CudaBackend>>> = OnceLock::new();
        let open = OPEN.get_or_init(|| Mutex::new(HashMap::new()));
        let mut open = open.lock().map_err(|_| ComputeError::Cuda("backend registry poisoned".into()))?;
        if let Some(b) = open.get(&ordinal) {
            return Ok(b.clone());
        }
        let b = Self::open_new(ordinal)?;
        open.insert(ordinal, b.clone());
        Ok(b)
    }

    fn open_new(ordinal: usize) -> Result<Self> {
        let info = probe_device(ordinal)?;
        let (major, minor) = info.compute_capability;
        if major < 8 {
            return Err(ComputeError::Cuda(format!(
                "cuda:{ordinal} ({}) has compute capability {major}.{minor}; the CUDA backend needs 8.0 or newer \
                 (bf16 tensor cores)",
                info.name
            )));
        }
        let ctx = guarded("CUDA driver", || CudaContext::new(ordinal))?.map_err(drv("opening the device"))?;
        // SAFETY: every buffer of this backend is used on its one stream, so the context need not
        // record events to order streams.
        unsafe { ctx.disable_event_tracking() };
        keep_pool_memory(&ctx);
        let stream = ctx.new_stream().map_err(drv("creating a stream"))?;
        let sm = format!("sm_{major}{minor}");
        let mut funcs = HashMap::new();
        for k in KERNELS {
            let cubin = compile_cubin(k, &sm)?;
            let module = ctx
                .load_module(cudarc::nvrtc::Ptx::from_binary(cubin.to_vec()))
                .map_err(|e| ComputeError::Cuda(format!("loading {} ({sm}): {e}", k.file)))?;
            for e in k.entry_points {
                let f = module.load_function(e).map_err(|err| ComputeError::Cuda(format!("{e}: {err}")))?;
                if let Some(bytes) = dynamic_shared_bytes(e) {
                    use cudarc::driver::sys::CUfunction_attribute_enum as A;
                    f.set_attribute(A::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, bytes as i32)
                        .map_err(|err| ComputeError::Cuda(format!("{e}: {bytes} bytes of shared memory: {err}")))?;
                }
                funcs.insert(*e, f);
            }
        }
        let handle = guarded("cuBLAS", || CudaBlas::new(stream.clone()))?
            .map_err(|e| ComputeError::Cuda(format!("opening cuBLAS: {e}")))?;
        let name = format!("cuda:{ordinal} ({}, {sm})", info.name);
        tracing::info!(device = %name, versions = %super::nvrtc::versions(), "CUDA backend ready");
        let blas = Mutex::new(Blas { handle, x16: None, splits: None });
        let f32_weights = match std::env::var("MOE_CUDA_WEIGHTS").as_deref() {
            Ok("f32") => true,
            Ok("bf16") | Err(_) => false,
            Ok(other) => return Err(ComputeError::Cuda(format!("MOE_CUDA_WEIGHTS={other:?}: use bf16 or f32"))),
        };
        let name = if f32_weights { format!("{name}, f32 weights") } else { name };
        match std::env::var("MOE_CUDA_ROUTING").as_deref() {
            Ok("device") | Err(_) => set_device_routing(true),
            Ok("host") => set_device_routing(false),
            Ok(other) => return Err(ComputeError::Cuda(format!("MOE_CUDA_ROUTING={other:?}: use host or device"))),
        }
        Ok(Self { inner: Arc::new(Inner { ordinal, name, ctx, stream, funcs, blas, f32_weights }) })
    }

    pub(crate) fn stream(&self) -> &Arc<CudaStream> {
        &self.inner.stream
    }

    pub(crate) fn func(&self, name: &str) -> &CudaFunction {
        match self.inner.funcs.get(name) {
            Some(f) => f,
            None => self.fatal("loading kernels", format!("no kernel {name}")),
        }
    }

    /// A device fault: the context cannot be trusted any more (see the module doc).
    pub(crate) fn fatal(&self, what: &str, e: impl std::fmt::Display) -> ! {
        panic!("CUDA failure on {} in {what}: {e}", self.inner.name)
    }

    pub(crate) fn checked<T, E: std::fmt::Display>(&self, r: std::result::Result<T, E>, what: &str) -> T {
        r.unwrap_or_else(|e| self.fatal(what, e))
    }

    /// The raw device address of a buffer, for kernel arguments and cuBLAS.
    pub(crate) fn ptr<T>(&self, s: &CudaSlice<T>) -> u64 {
        s.device_ptr(&self.inner.stream).0
    }

    /// Small host tables for one launch (page tables, index maps).
    pub(crate) fn table<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        v: &[T],
    ) -> CudaSlice<T> {
        if v.is_empty() {
            return self.checked(self.inner.stream.alloc_zeros::<T>(1), "allocating a table");
        }
        self.checked(self.inner.stream.clone_htod(v), "copying a table to the device")
    }

    /// Device memory (free, total), in bytes.
    pub fn memory(&self) -> Result<(usize, usize)> {
        self.inner.ctx.bind_to_thread().map_err(drv("binding the context"))?;
        self.inner.ctx.mem_get_info().map_err(drv("querying memory"))
    }

    pub(crate) fn ensure_fits(&self, what: &str, bytes: usize) -> Result<()> {
        let (free, total) = self.memory()?;
        tables::ensure_fits(what, bytes, free, total, &format!("cuda:{}", self.inner.ordinal))
    }

    /// Waits for this backend's stream (a device loss is fatal, as every launch) and counts it.
    pub(crate) fn wait_for_device(&self) {
        HOST_SYNCS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.checked(self.stream().synchronize(), "waiting for the device");
    }

    pub(crate) fn f32_weights(&self) -> bool {
        self.inner.f32_weights
    }

    pub(crate) fn blas(&self) -> std::sync::MutexGuard<'_, Blas> {
        self.inner.blas.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A one-dimensional launch of `blocks` blocks (at least one) of `threads` threads.
pub(crate) fn grid(blocks: usize, y: usize, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks.clamp(1, i32::MAX as usize) as u32, y.clamp(1, 65535) as u32, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Blocks for a grid-strided elementwise loop over `n` elements.
pub(crate) fn elementwise(n: usize) -> LaunchConfig {
    grid(n.div_ceil(256).min(8192), 1, 256)
}

/// Launches kernel `$name` with the given arguments (device addresses as `u64`, then scalars of
/// the kernel's parameter types, in order).
macro_rules! launch {
    ($be:expr, $name:expr, $cfg:expr, [$($arg:expr),* $(,)?]) => {{
        use cudarc::driver::PushKernelArg;
        let be = &$be;
        let mut builder = be.stream().launch_builder(be.func($name));
        $( let a = $arg; builder.arg(&a); )*
        // SAFETY: the arguments match the kernel's parameter list in kernels/*.cu (types and
        // order; device addresses are passed as u64), and every buffer they address was sized by
        // the caller for the rows and columns this grid covers.
        let r = unsafe { builder.launch($cfg) };
        be.checked(r.map(|_| ()), $name);
    }};
}
pub(crate) use launch;

#[cfg(test)]
mod tests {
    use super::*;

    /// `auto` (the default) takes the tensor-core GEMM for many-expert layers only; the named
    /// modes are taken as they are.
    #[test]
    fn auto_expert_gemm_takes_tensor_cores_from_sixteen_experts() {
        assert_eq!(ExpertGemm::default(), ExpertGemm::Auto);
        assert_eq!("auto".parse::<ExpertGemm>().ok(), Some(ExpertGemm::Auto));
        assert_eq!(ExpertGemm::Auto.resolve(8), ExpertGemm::Cublas);
        assert_eq!(ExpertGemm::Auto.resolve(AUTO_TC_MIN_EXPERTS), ExpertGemm::Tc);
        assert_eq!(ExpertGemm::Auto.resolve(128), ExpertGemm::Tc);
        for m in [ExpertGemm::Cublas, ExpertGemm::Grouped, ExpertGemm::Tc] {
            assert_eq!(m.resolve(8), m);
            assert_eq!(m.resolve(128), m);
        }
        let e = "fast".parse::<ExpertGemm>().unwrap_err().to_string();
        assert!(e.contains("auto, cublas, grouped or tc"), "{e}");
    }
}
