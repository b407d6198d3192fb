//! The one place a [`Device`] becomes a backend. Everything above this crate is generic over
//! [`Backend`] (or holds a non-generic handle); the process is assembled by handing this
//! function an [`OnBackend`] that builds what it needs (an engine, an expert host) on the
//! backend it is given. A new backend touches this file and its own module, nothing else.

use crate::cpu::CpuBackend;
use crate::{Backend, Device, Result};

/// Something built on whichever backend a device selects.
pub trait OnBackend {
    type Output;
    fn run<B: Backend>(self, backend: B) -> Self::Output;
}

/// Builds `f` on the backend of `device`, or says clearly why this process cannot compute there.
pub fn on_device<F: OnBackend>(device: Device, f: F) -> Result<F::Output> {
    match device {
        Device::Cpu => Ok(f.run(CpuBackend::new())),
        #[cfg(feature = "cuda")]
        Device::Cuda(n) => Ok(f.run(cuda_backend(n)?)),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(n) => Err(cuda_unavailable(n)),
    }
}

/// The CUDA backend of device `n`, or why it cannot be opened (no driver, no device, a device
/// older than compute capability 8.0, kernels that do not compile or load).
#[cfg(feature = "cuda")]
fn cuda_backend(n: usize) -> Result<crate::cuda::CudaBackend> {
    crate::cuda::CudaBackend::open(n)
}

#[cfg(not(feature = "cuda"))]
fn cuda_unavailable(_n: usize) -> crate::ComputeError {
    crate::ComputeError::Cuda(
        "this binary was built without CUDA support (build moe-cli with its default `cuda` feature)".into(),
    )
}

impl Device {
    /// Checks that this process can compute on the device (the same check as [`on_device`]).
    pub fn ensure_supported(self) -> Result<()> {
        struct Nothing;
        impl OnBackend for Nothing {
            type Output = ();
            fn run<B: Backend>(self, _backend: B) {}
        }
        on_device(self, Nothing)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Name;
    impl OnBackend for Name {
        type Output = (String, Device);
        fn run<B: Backend>(self, backend: B) -> (String, Device) {
            (backend.name(), backend.device())
        }
    }

    #[test]
    fn cpu_selects_the_cpu_backend_and_cuda_fails_with_a_reason() {
        let (name, device) = on_device(Device::Cpu, Name).unwrap();
        assert!(name.starts_with("cpu"), "{name}");
        assert_eq!(device, Device::Cpu);
        // No GPU here (and none in CI): the error says why instead of computing on the CPU.
        let err = on_device(Device::Cuda(0), Name).unwrap_err().to_string();
        assert!(err.to_lowercase().contains("cuda"), "{err}");
    }
}
