//! The CUDA side of the compute crate (cargo feature `cuda`): compiling the kernels with NVRTC
//! for a device's compute capability, caching the PTX per architecture, and probing for the
//! driver. cudarc loads libcuda and libnvrtc dynamically and panics at first use when one is
//! missing, so every entry here catches that and returns an error instead: `--device cpu` and
//! the tests never depend on CUDA being present.
//!
//! [`backend`] is the CUDA `Backend` (device buffers, kernel launches, cuBLAS for the dense and
//! per-expert products); [`check`] runs every kernel on the GPU against the CPU backend and times
//! it (`moe kernels check`). kernels/NOTES.md says what has run on a GPU.

pub mod backend;
pub mod check;
pub mod nvrtc;

pub use backend::CudaBackend;
pub use nvrtc::{
    compile_cubin, compile_cubin_resources, compile_kernel, probe_device, versions, DeviceInfo, KernelPtx,
};
