//! Device buffers of the CUDA backend: activations that grow in place (no allocation per token
//! once grown), weight matrices (bf16; f32 for adapter factors), vectors and the paged KV store.

use super::{tables, CudaBackend};
use crate::{ComputeError, KvLayout, Result};
use cudarc::driver::{CudaSlice, DeviceRepr, ValidAsZeroBits};

/// Row-major `[rows, cols]` f32 on the device; `buf` holds at least `rows * cols` values.
#[derive(Default)]
pub struct CudaAct {
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    pub(crate) buf: Option<CudaSlice<f32>>,
}

/// A weight matrix `[rows, cols]` on the device.
pub struct CudaMatrix {
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    pub(crate) data: MatrixBuf,
}

pub enum MatrixBuf {
    /// Raw bf16 bits: checkpoint weights (f32 checkpoints are rounded once at upload).
    Bf16(CudaSlice<u16>),
    /// Adapter factors stay f32 (small, and the BGMV kernels read f32).
    F32(CudaSlice<f32>),
}

pub struct CudaVector {
    pub(crate) buf: CudaSlice<f32>,
}

/// The paged KV cache: per layer, keys and values of `num_pages * page_size` slots, each
/// `n_kv_heads * head_dim` values, bf16 (or f32 with `MOE_CUDA_WEIGHTS=f32`), as raw bytes.
pub struct CudaKvStore {
    pub(crate) layout: KvLayout,
    pub(crate) bf16: bool,
    pub(crate) k: Vec<CudaSlice<u8>>,
    pub(crate) v: Vec<CudaSlice<u8>>,
}

impl CudaBackend {
    /// A zeroed device buffer of `n` values (at least one, so that every buffer has an address).
    pub(crate) fn alloc<T: DeviceRepr + ValidAsZeroBits>(&self, n: usize) -> Result<CudaSlice<T>> {
        self.stream()
            .alloc_zeros::<T>(n.max(1))
            .map_err(|e| ComputeError::Cuda(format!("allocating {} bytes: {e}", n * std::mem::size_of::<T>())))
    }

    /// Sets `a`'s shape, growing its buffer when needed; contents are unspecified afterwards.
    pub(crate) fn reshape(&self, a: &mut CudaAct, rows: usize, cols: usize) {
        let n = rows * cols;
        if a.buf.as_ref().is_none_or(|b| b.len() < n) {
            // Grow by at least half again, so a batch that creeps up does not reallocate per step.
            let cap = a.buf.as_ref().map_or(0, |b| b.len());
            let want = n.max(cap + cap / 2);
            a.buf = None;
            a.buf = Some(self.checked(self.alloc::<f32>(want), "growing an activation"));
        }
        a.rows = rows;
        a.cols = cols;
    }

    /// The device address of an activation (reshaped first, so it has a buffer).
    pub(crate) fn act_ptr(&self, a: &CudaAct) -> u64 {
        match &a.buf {
            Some(b) => self.ptr(b),
            None => self.fatal("using an activation", "no buffer (an op read an activation it never wrote)"),
        }
    }

    /// Grows a bf16 scratch buffer to `n` values.
    pub(crate) fn ensure_u16(&self, buf: &mut Option<CudaSlice<u16>>, n: usize) -> u64 {
        if buf.as_ref().is_none_or(|b| b.len() < n) {
            *buf = None;
            *buf = Some(self.checked(self.alloc::<u16>(n), "growing a bf16 buffer"));
        }
        match buf {
            Some(b) => self.ptr(b),
            None => unreachable!("allocated above"),
        }
    }

    pub(crate) fn matrix_ptr(&self, m: &CudaMatrix) -> u64 {
        match &m.data {
            MatrixBuf::Bf16(b) => self.ptr(b),
            MatrixBuf::F32(b) => self.ptr(b),
        }
    }

    pub(crate) fn upload_bf16_matrix(&self, rows: usize, cols: usize, bits: &[u16]) -> Result<CudaMatrix> {
        self.ensure_fits("a weight matrix", 2 * bits.len())?;
        let mut buf = self.alloc::<u16>(bits.len())?;
        if !bits.is_empty() {
            self.stream()
                .memcpy_htod(bits, &mut buf)
                .map_err(|e| ComputeError::Cuda(format!("copying a {rows}x{cols} matrix: {e}")))?;
        }
        Ok(CudaMatrix { rows, cols, data: MatrixBuf::Bf16(buf) })
    }

    /// A bf16 matrix of random benchmark weights made on the device (kernels/backend.cu
    /// `random_bf16`): nothing crosses the bus, so an 87 GB model is ready in well under a second.
    pub(crate) fn random_bf16_matrix(&self, rows: usize, cols: usize, seed: u64, scale: f32) -> Result<CudaMatrix> {
        let n = rows * cols;
        self.ensure_fits("a weight matrix", 2 * n)?;
        let buf = self.alloc::<u16>(n)?;
        if n > 0 {
            let cfg = cudarc::driver::LaunchConfig {
                grid_dim: (n.div_ceil(256).min(65_535) as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            super::launch!(self, "random_bf16", cfg, [self.ptr(&buf), n as i64, seed, scale]);
        }
        Ok(CudaMatrix { rows, cols, data: MatrixBuf::Bf16(buf) })
    }

    pub(crate) fn upload_f32_matrix(&self, rows: usize, cols: usize, data: &[f32]) -> Result<CudaMatrix> {
        let mut buf = self.alloc::<f32>(data.len())?;
        if !data.is_empty() {
            self.stream()
                .memcpy_htod(data, &mut buf)
                .map_err(|e| ComputeError::Cuda(format!("copying a {rows}x{cols} matrix: {e}")))?;
        }
        Ok(CudaMatrix { rows, cols, data: MatrixBuf::F32(buf) })
    }

    pub(crate) fn upload_vector(&self, data: &[f32]) -> Result<CudaVector> {
        let mut buf = self.alloc::<f32>(data.len())?;
        if !data.is_empty() {
            self.stream()
                .memcpy_htod(data, &mut buf)
                .map_err(|e| ComputeError::Cuda(format!("copying a vector: {e}")))?;
        }
        Ok(CudaVector { buf })
    }

    pub(crate) fn new_kv_store(&self, layout: KvLayout) -> Result<CudaKvStore> {
        if layout.values_are_keys {
            return Err(ComputeError::Unsupported {
                op: "a KV store whose values are its keys (latent attention)",
                backend: "cuda".into(),
            });
        }
        if layout.states.layers > 0 {
            return Err(ComputeError::Unsupported {
                op: "recurrent state slots (linear attention)",
                backend: "cuda".into(),
            });
        }
        let bpv = self.kv_value_bytes();
        let bytes = layout.bytes() / 4 * bpv;
        self.ensure_fits("the KV cache", bytes)?;
        let per_layer = layout.num_pages * layout.page_size * layout.n_kv_heads * layout.head_dim * bpv;
        let mut k = Vec::with_capacity(layout.layers);
        let mut v = Vec::with_capacity(layout.layers);
        for _ in 0..layout.layers {
            k.push(self.alloc::<u8>(per_layer).map_err(|_| ComputeError::KvAlloc { bytes })?);
            v.push(self.alloc::<u8>(per_layer).map_err(|_| ComputeError::KvAlloc { bytes })?);
        }
        Ok(CudaKvStore { layout, bf16: bpv == 2, k, v })
    }

    /// 2 (a bf16 KV cache, the default), or 4 when weights are kept in f32 or
    /// `MOE_CUDA_KV=f32` asks for an f32 cache (twice the memory per token; see kernels/NOTES.md
    /// for what each costs in speed today).
    pub(crate) fn kv_value_bytes(&self) -> usize {
        if self.f32_weights() || std::env::var("MOE_CUDA_KV").as_deref() == Ok("f32") {
            4
        } else {
            2
        }
    }
}

/// f32 checkpoint values as bf16 bits (what the device keeps).
pub(crate) fn rounded(data: &[f32]) -> Vec<u16> {
    data.iter().map(|&v| tables::to_bf16(v)).collect()
}
