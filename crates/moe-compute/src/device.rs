//! Which device a process computes on: `cpu`, or `cuda:N` (NVIDIA GPU N).

use crate::ComputeError;
use std::fmt;
use std::str::FromStr;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Device {
    #[default]
    Cpu,
    Cuda(usize),
}

impl FromStr for Device {
    type Err = ComputeError;

    fn from_str(s: &str) -> Result<Self, ComputeError> {
        match s.trim() {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Device::Cuda)
                .ok_or_else(|| ComputeError::BadDevice(other.to_string())),
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl Device {
    /// Checks that this process can compute on the device. Only the CPU backend exists so far:
    /// `cuda:N` probes the GPU (with the `cuda` feature) and then says what is missing, rather
    /// than silently computing on the CPU.
    pub fn ensure_supported(self) -> Result<(), ComputeError> {
        match self {
            Device::Cpu => Ok(()),
            #[cfg(feature = "cuda")]
            Device::Cuda(n) => {
                let info = crate::cuda::probe_device(n)?;
                Err(ComputeError::Cuda(format!(
                    "found {} (compute capability {}.{}), but the CUDA backend's device ops are not built yet; \
                     the kernels compile (`moe kernels compile`), use --device cpu for now",
                    info.name, info.compute_capability.0, info.compute_capability.1
                )))
            }
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => Err(ComputeError::Cuda(
                "this binary was built without CUDA support (build moe-cli with its default `cuda` feature)".into(),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cpu_and_cuda_ordinals() {
        assert_eq!("cpu".parse::<Device>().unwrap(), Device::Cpu);
        assert_eq!("cuda".parse::<Device>().unwrap(), Device::Cuda(0));
        assert_eq!("cuda:3".parse::<Device>().unwrap(), Device::Cuda(3));
        for bad in ["gpu", "cuda:", "cuda:x", "cuda:-1"] {
            assert!(bad.parse::<Device>().is_err(), "{bad}");
        }
        assert!(Device::Cpu.ensure_supported().is_ok());
    }
}
