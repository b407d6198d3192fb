//! NVRTC compilation of the embedded kernels, and the device probe.

use crate::kernels::{parse_ptxas_log, KernelResources, KernelSource};
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

/// Cubins by (architecture, kernel file).
type CubinCache = Mutex<HashMap<(String, &'static str), Arc<Vec<u8>>>>;

fn cubin_cache() -> &'static CubinCache {
    static CACHE: OnceLock<CubinCache> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Compiles one kernel file to a cubin for `sm` (e.g. `sm_90`), cached per architecture. A cubin
/// is machine code for that device: unlike PTX it loads even when NVRTC is newer than the
/// driver (PTX from a newer NVRTC fails with CUDA_ERROR_UNSUPPORTED_PTX_VERSION).
pub fn compile_cubin(k: &KernelSource, sm: &str) -> Result<Arc<Vec<u8>>, ComputeError> {
    let key = (sm.to_string(), k.file);
    if let Some(bin) = cubin_cache().lock().ok().and_then(|c| c.get(&key).cloned()) {
        return Ok(bin);
    }
    let on_disk = disk_cache_path(k, sm);
    let bin = match on_disk.as_ref().and_then(|p| std::fs::read(p).ok()).filter(|b| !b.is_empty()) {
        Some(bin) => bin,
        None => {
            let (bin, _) = nvrtc_cubin(k, sm, false)?;
            store_on_disk(on_disk.as_deref(), &bin);
            bin
        }
    };
    let bin = Arc::new(bin);
    if let Ok(mut c) = cubin_cache().lock() {
        c.insert(key, bin.clone());
    }
    Ok(bin)
}

/// Where a cubin is kept between processes: `$MOE_CUBIN_CACHE/<file>-<sm>-<hash>.cubin`, the hash
/// over the full source, the architecture and NVRTC's version (so an edited kernel or another
/// NVRTC never reads a stale cubin). None when the variable is unset or NVRTC cannot be loaded.
fn disk_cache_path(k: &KernelSource, sm: &str) -> Option<std::path::PathBuf> {
    let dir = std::env::var_os("MOE_CUBIN_CACHE").filter(|d| !d.is_empty())?;
    let version = nvrtc_version()?;
    Some(std::path::Path::new(&dir).join(cubin_file_name(k, sm, version)))
}

/// The cache's file name for a kernel file, an architecture and an NVRTC version.
pub fn cubin_file_name(k: &KernelSource, sm: &str, nvrtc: (i32, i32)) -> String {
    // FNV-1a, 64 bits: stable across Rust versions, unlike the standard library's hasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let text = format!("{}\0{sm}\0{}.{}", k.full_source(), nvrtc.0, nvrtc.1);
    for b in text.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    format!("{}-{sm}-{h:016x}.cubin", k.file.trim_end_matches(".cu"))
}

/// Writes a cubin into the cache (through a temporary file and a rename, so a concurrent reader
/// never sees half a file); a failure only costs a recompile next time.
fn store_on_disk(path: Option<&std::path::Path>, bin: &[u8]) {
    let Some(path) = path else { return };
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    if std::fs::write(&tmp, bin).is_ok() && std::fs::rename(&tmp, path).is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
}

fn nvrtc_version() -> Option<(i32, i32)> {
    guarded("NVRTC", || {
        let (mut major, mut minor) = (0, 0);
        // SAFETY: plain out-parameters.
        let r = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
        (r == cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS).then_some((major, minor))
    })
    .ok()
    .flatten()
}

/// Compiles one kernel file to a cubin for `sm` with ptxas's resource report (`-v`): the cubin
/// and, per function, registers, stack, spills and shared memory. Not cached (a check, not a
/// load).
pub fn compile_cubin_resources(
    k: &KernelSource,
    sm: &str,
) -> Result<(Arc<Vec<u8>>, Vec<KernelResources>), ComputeError> {
    let (bin, log) = nvrtc_cubin(k, sm, true)?;
    // Warm the cache too: `moe kernels compile --arch sm_90` with MOE_CUBIN_CACHE set prepares
    // every cubin once for the processes that follow.
    store_on_disk(disk_cache_path(k, sm).as_deref(), &bin);
    Ok((Arc::new(bin), parse_ptxas_log(&log)))
}

/// NVRTC to a cubin; returns the program log too (ptxas's report when `verbose`).
fn nvrtc_cubin(k: &KernelSource, sm: &str, verbose: bool) -> Result<(Vec<u8>, String), ComputeError> {
    let source = std::ffi::CString::new(k.full_source())
        .map_err(|_| ComputeError::Cuda(format!("{} contains a NUL byte", k.file)))?;
    let name = std::ffi::CString::new(k.file).map_err(|_| ComputeError::Cuda("kernel file name".into()))?;
    let mut options = vec![format!("--gpu-architecture={sm}"), "--std=c++17".to_string()];
    if verbose {
        options.push("--ptxas-options=-v".to_string());
    }
    let compiled = guarded("NVRTC", || -> Result<(Vec<u8>, String), String> {
        use cudarc::nvrtc::{result, sys};
        let prog = result::create_program(&source, Some(&name)).map_err(|e| e.to_string())?;
        // SAFETY: `prog` was just created and is destroyed once below; the buffers passed to
        // nvrtcGetCUBIN are sized by nvrtcGetCUBINSize for the same program.
        let out = unsafe {
            let compiled = result::compile_program(prog, &options);
            let log = result::get_program_log(prog)
                .map(|l| String::from_utf8_lossy(&l.iter().map(|&c| c as u8).collect::<Vec<u8>>()).into_owned())
                .unwrap_or_default();
            let log = log.trim_end_matches('\0').to_string();
            let out = match compiled {
                Err(e) => Err(format!("{e}: {log}")),
                Ok(()) => {
                    let mut size = 0usize;
                    let r = sys::nvrtcGetCUBINSize(prog, &mut size);
                    if r != sys::nvrtcResult::NVRTC_SUCCESS || size == 0 {
                        Err(format!("no cubin for {} ({r:?})", options[0]))
                    } else {
                        let mut bin = vec![0u8; size];
                        let r = sys::nvrtcGetCUBIN(prog, bin.as_mut_ptr() as *mut std::ffi::c_char);
                        if r == sys::nvrtcResult::NVRTC_SUCCESS {
                            Ok((bin, log))
                        } else {
                            Err(format!("nvrtcGetCUBIN: {r:?}"))
                        }
                    }
                }
            };
            let _ = result::destroy_program(prog);
            out
        };
        out
    })?;
    compiled.map_err(|e| ComputeError::Cuda(format!("compiling {} for {sm}: {e}", k.file)))
}

/// NVRTC's and the driver's versions, e.g. `NVRTC 13.2, driver 13.0`, for every check's header.
pub fn versions() -> String {
    let nvrtc = guarded("NVRTC", || {
        let (mut major, mut minor) = (0, 0);
        // SAFETY: plain out-parameters.
        let r = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
        (r == cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS).then(|| format!("{major}.{minor}"))
    });
    let driver = guarded("CUDA driver", || {
        let mut v = 0;
        // SAFETY: a plain out-parameter.
        let r = unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut v) };
        (r == cudarc::driver::sys::CUresult::CUDA_SUCCESS).then(|| format!("{}.{}", v / 1000, (v % 1000) / 10))
    });
    let show = |v: Result<Option<String>, ComputeError>| match v {
        Ok(Some(v)) => v,
        Ok(None) => "unknown".into(),
        Err(_) => "not found".into(),
    };
    format!("NVRTC {}, driver {}", show(nvrtc), show(driver))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cached_cubin_is_named_by_its_source_architecture_and_nvrtc() {
        let k = crate::kernels::KERNELS[0];
        let name = cubin_file_name(&k, "sm_90", (13, 0));
        assert!(name.starts_with(&format!("{}-sm_90-", k.file.trim_end_matches(".cu"))) && name.ends_with(".cubin"));
        assert_eq!(name, cubin_file_name(&k, "sm_90", (13, 0)), "stable");
        assert_ne!(name, cubin_file_name(&k, "sm_80", (13, 0)));
        assert_ne!(name, cubin_file_name(&k, "sm_90", (13, 1)));
        let edited = KernelSource { source: "// edited\n", ..k };
        assert_ne!(name, cubin_file_name(&edited, "sm_90", (13, 0)));
    }
}
