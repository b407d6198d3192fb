//! NVRTC compilation of the embedded kernels, and the device probe.

use crate::kernels::KernelSource;
use crate::ComputeError;
use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, OnceLock};

/// A compiled kernel file.
#[derive(Clone, Debug)]
pub struct KernelPtx {
    pub file: &'static str,
    pub arch: String,
    pub ptx: Arc<String>,
}

/// Runs a cudarc call, turning its panic on a missing library into an error.
pub(crate) fn guarded<T>(what: &str, f: impl FnOnce() -> T) -> Result<T, ComputeError> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let r = std::panic::catch_unwind(AssertUnwindSafe(f));
    std::panic::set_hook(hook);
    r.map_err(|p| {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "unknown failure".into());
        ComputeError::Cuda(format!(
            "{what}: {msg} (is the CUDA driver / NVRTC library installed and on LD_LIBRARY_PATH?)"
        ))
    })
}

/// PTX by (architecture, kernel file).
type PtxCache = Mutex<HashMap<(String, &'static str), Arc<String>>>;

fn cache() -> &'static PtxCache {
    static CACHE: OnceLock<PtxCache> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Compiles one kernel file for `arch` (e.g. `compute_90`), cached per architecture. A compile
/// error carries NVRTC's log, which names the file and line.
pub fn compile_kernel(k: &KernelSource, arch: &'static str) -> Result<KernelPtx, ComputeError> {
    let key = (arch.to_string(), k.file);
    if let Some(ptx) = cache().lock().ok().and_then(|c| c.get(&key).cloned()) {
        return Ok(KernelPtx { file: k.file, arch: arch.into(), ptx });
    }
    let source = k.full_source();
    let opts = cudarc::nvrtc::CompileOptions {
        arch: Some(arch),
        name: Some(k.file.to_string()),
        options: vec!["--std=c++17".into()],
        ..Default::default()
    };
    let result = guarded("NVRTC", || cudarc::nvrtc::compile_ptx_with_opts(source, opts))?;
    let ptx = result.map_err(|e| ComputeError::Cuda(format!("compiling {}: {e}", k.file)))?;
    let ptx = Arc::new(ptx.to_src());
    if let Ok(mut c) = cache().lock() {
        c.insert(key, ptx.clone());
    }
    Ok(KernelPtx { file: k.file, arch: arch.into(), ptx })
}

/// What the probe found.
#[derive(Clone, Debug)]
pub struct DeviceInfo {
    pub ordinal: usize,
    pub name: String,
    pub compute_capability: (i32, i32),
}

/// Opens device `ordinal` through the driver, or says why not.
pub fn probe_device(ordinal: usize) -> Result<DeviceInfo, ComputeError> {
    use cudarc::driver::sys::CUdevice_attribute as A;
    let ctx = guarded("CUDA driver", || cudarc::driver::CudaContext::new(ordinal))?
        .map_err(|e| ComputeError::Cuda(format!("cuda:{ordinal}: {e}")))?;
    let name = ctx.name().map_err(|e| ComputeError::Cuda(format!("cuda:{ordinal}: {e}")))?;
    let major = ctx.attribute(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR).unwrap_or(0);
    let minor = ctx.attribute(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR).unwrap_or(0);
    Ok(DeviceInfo { ordinal, name, compute_capability: (major, minor) })
}
