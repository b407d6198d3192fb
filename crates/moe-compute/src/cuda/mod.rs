//! The CUDA side of the compute crate (cargo feature `cuda`): compiling the kernels with NVRTC
//! for a device's compute capability, caching the PTX per architecture, and probing for the
//! driver. cudarc loads libcuda and libnvrtc dynamically and panics at first use when one is
//! missing, so every entry here catches that and returns an error instead: `--device cpu` and
//! the tests never depend on CUDA being present.
//!
//! [`check`] runs every kernel on the GPU against the CPU backend and times it (`moe kernels
//! check`). The CUDA `Backend` implementation (device buffers, launches, cuBLAS for dense
//! projections) is not written yet; see kernels/NOTES.md for what exists and what still needs a
//! GPU run.

pub mod check;
pub mod nvrtc;

pub use nvrtc::{compile_kernel, probe_device, DeviceInfo, KernelPtx};
