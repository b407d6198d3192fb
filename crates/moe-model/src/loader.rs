//! Reading a checkpoint's tensors into backend matrices and vectors by name: bf16 kept as bf16,
//! norms shifted where the model's norms are zero-centred, rows gathered or stacked from several
//! tensors. `weights` builds each layer's weights with it.

use crate::checkpoint::Checkpoint;
use crate::config::ModelConfig;
use crate::error::Result;
use moe_compute::Backend;

pub(crate) struct Loader<'a, B: Backend> {
    pub ckpt: &'a Checkpoint,
    pub backend: &'a B,
    pub cfg: &'a ModelConfig,
}

impl<B: Backend> Loader<'_, B> {
    pub(crate) fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<B::Matrix> {
        if let Some(bits) = self.ckpt.read_bf16(name, &[rows, cols])? {
            return Ok(self.backend.matrix_bf16(rows, cols, bits)?);
        }
        let data = self.ckpt.read(name, &[rows, cols])?;
        Ok(self.backend.matrix(rows, cols, data)?)
    }

    pub(crate) fn vector(&self, name: &str, len: usize) -> Result<B::Vector> {
        Ok(self.backend.vector(self.ckpt.read(name, &[len])?)?)
    }

    /// An RMSNorm weight; stored as an offset from one where the model's norms are zero-centred.
    pub(crate) fn norm(&self, name: &str, len: usize) -> Result<B::Vector> {
        let mut w = self.ckpt.read(name, &[len])?;
        if self.cfg.zero_centred_norm {
            w.iter_mut().for_each(|x| *x += 1.0);
        }
        Ok(self.backend.vector(w)?)
    }

    /// One matrix of chosen rows: for each part `(name, rows in the file, picks)`, the file's rows
    /// `picks` in that order, parts stacked. bf16 stays bf16 when every part is bf16.
    pub(crate) fn gathered(&self, parts: &[(String, usize, Vec<usize>)], cols: usize) -> Result<B::Matrix> {
        let rows: usize = parts.iter().map(|p| p.2.len()).sum();
        if parts.iter().all(|(name, ..)| self.ckpt.dtype_of(name).as_deref() == Some("BF16")) {
            let mut bits = Vec::with_capacity(rows * cols);
            for (name, r, picks) in parts {
                let all = self.ckpt.read_bf16(name, &[*r, cols])?.unwrap_or_default();
                picks.iter().for_each(|&i| bits.extend_from_slice(&all[i * cols..(i + 1) * cols]));
            }
            return Ok(self.backend.matrix_bf16(rows, cols, bits)?);
        }
        let mut data = Vec::with_capacity(rows * cols);
        for (name, r, picks) in parts {
            let all = self.ckpt.read(name, &[*r, cols])?;
            picks.iter().for_each(|&i| data.extend_from_slice(&all[i * cols..(i + 1) * cols]));
        }
        Ok(self.backend.matrix(rows, cols, data)?)
    }

    /// Stacks the rows of several `[r_i, cols]` tensors into one matrix.
    pub(crate) fn stacked(&self, parts: &[(String, usize)], cols: usize) -> Result<B::Matrix> {
        let rows: usize = parts.iter().map(|p| p.1).sum();
        if parts.iter().all(|(name, _)| self.ckpt.dtype_of(name).as_deref() == Some("BF16")) {
            let mut bits = Vec::with_capacity(rows * cols);
            for (name, r) in parts {
                bits.extend(self.ckpt.read_bf16(name, &[*r, cols])?.unwrap_or_default());
            }
            return Ok(self.backend.matrix_bf16(rows, cols, bits)?);
        }
        let mut data = Vec::with_capacity(rows * cols);
        for (name, r) in parts {
            data.extend(self.ckpt.read(name, &[*r, cols])?);
        }
        Ok(self.backend.matrix(rows, cols, data)?)
    }
}
