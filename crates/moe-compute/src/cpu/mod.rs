//! The CPU backend: f32 weights and activations in host memory, a streaming SIMD kernel for
//! few-row products and the `gemm` crate's cache-blocked kernel for many rows, rayon's persistent
//! thread pool for parallelism, and buffers that are resized in place (no allocation per token
//! once they have grown).

mod attention;
mod awake;
mod delta;
mod experts;
pub mod invariant;
mod kernel_set;
mod latent;
mod linear;
mod lora;
mod operand;
pub(crate) mod pages;
mod peak;
mod selection;
mod simd;

pub use attention::CpuKvStore;
pub use awake::with_pool_awake;
pub use kernel_set::{cpu_kernels, CpuKernels, NUMERICS};
pub use linear::{matmul_t, matmul_tw, Weights};
pub use peak::fma_peak_gflops;
pub use selection::select_cpu_kernels;

use crate::{
    AttentionSeq, AttentionShape, Backend, ComputeError, ExpertPlan, FfnScratch, Glu, HeadCols, KvLayout, Result,
    RowExpertLora, RowLora, SwigluWeights,
};
use std::ops::Range;

/// Row-major `[rows, cols]` f32 data.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HostTensor {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

impl HostTensor {
    /// Sets the shape, keeping capacity; contents are unspecified afterwards.
    pub fn reshape(&mut self, rows: usize, cols: usize) {
        self.rows = rows;
        self.cols = cols;
        self.data.resize(rows * cols, 0.0);
    }

    pub fn row(&self, r: usize) -> &[f32] {
        &self.data[r * self.cols..(r + 1) * self.cols]
    }

    pub fn row_mut(&mut self, r: usize) -> &mut [f32] {
        &mut self.data[r * self.cols..(r + 1) * self.cols]
    }
}

/// A weight matrix, `[rows, cols]` row-major, kept in the checkpoint's precision: f32, or bf16
/// (half the memory and half the bytes per decoded token; widened to f32 in the kernels).
#[derive(Clone, Debug, PartialEq)]
pub struct HostMatrix {
    pub rows: usize,
    pub cols: usize,
    pub data: MatrixData,
}

#[derive(Clone, Debug, PartialEq)]
pub enum MatrixData {
    F32(Vec<f32>),
    /// Raw bf16 bits.
    Bf16(Vec<u16>),
}

impl HostMatrix {
    pub fn f32(rows: usize, cols: usize, data: Vec<f32>) -> Self {
        Self { rows, cols, data: MatrixData::F32(data) }
    }

    pub fn weights(&self) -> Weights<'_> {
        match &self.data {
            MatrixData::F32(w) => Weights::F32(w),
            MatrixData::Bf16(w) => Weights::Bf16(w),
        }
    }

    /// Row `r` widened to f32 into `out`.
    pub fn row_into(&self, r: usize, out: &mut [f32]) {
        let span = r * self.cols..(r + 1) * self.cols;
        match &self.data {
            MatrixData::F32(w) => out.copy_from_slice(&w[span]),
            MatrixData::Bf16(w) => {
                for (o, &b) in out.iter_mut().zip(&w[span]) {
                    *o = simd::bf16_to_f32(b);
                }
            }
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        match &self.data {
            MatrixData::F32(w) => 4 * w.len(),
            MatrixData::Bf16(w) => 2 * w.len(),
        }
    }
}

/// The CPU backend. Uses rayon's global pool (its size is the process's thread count).
#[derive(Clone, Debug, Default)]
pub struct CpuBackend;

impl CpuBackend {
    pub fn new() -> Self {
        Self
    }
}

fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

fn rms_norm_slice(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let ss: f32 = x.iter().map(|v| v * v).sum::<f32>() / x.len().max(1) as f32;
    let inv = 1.0 / (ss + eps).sqrt();
    for ((o, v), g) in out.iter_mut().zip(x).zip(w) {
        *o = v * inv * g;
    }
}

impl Backend for CpuBackend {
    type Matrix = HostMatrix;
    type Vector = Vec<f32>;
    type Act = HostTensor;
    type KvStore = CpuKvStore;

    fn name(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }

    fn device(&self) -> crate::Device {
        crate::Device::Cpu
    }

    fn numerics(&self) -> String {
        // Every CPU kernel set computes the same canonical dot products (kernel_set.rs).
        NUMERICS.to_string()
    }

    fn matrix(&self, rows: usize, cols: usize, data: Vec<f32>) -> Result<HostMatrix> {
        if data.len() != rows * cols {
            return Err(ComputeError::MatrixSize { rows, cols, expected: rows * cols, got: data.len() });
        }
        Ok(HostMatrix::f32(rows, cols, pages::in_huge_pages(data)))
    }

    fn matrix_bf16(&self, rows: usize, cols: usize, data: Vec<u16>) -> Result<HostMatrix> {
        if data.len() != rows * cols {
            return Err(ComputeError::MatrixSize { rows, cols, expected: rows * cols, got: data.len() });
        }
        Ok(HostMatrix { rows, cols, data: MatrixData::Bf16(pages::in_huge_pages(data)) })
    }

    fn matrix_shape(&self, m: &HostMatrix) -> (usize, usize) {
        (m.rows, m.cols)
    }

    fn matrix_bytes(&self, m: &HostMatrix) -> usize {
        match &m.data {
            MatrixData::F32(_) => m.rows * m.cols * 4,
            MatrixData::Bf16(_) => m.rows * m.cols * 2,
        }
    }

    fn vector(&self, data: Vec<f32>) -> Result<Vec<f32>> {
        Ok(data)
    }

    fn kv_store(&self, layout: KvLayout) -> Result<CpuKvStore> {
        CpuKvStore::new(layout)
    }

    fn act(&self) -> HostTensor {
        HostTensor::default()
    }

    fn act_shape(&self, a: &HostTensor) -> (usize, usize) {
        (a.rows, a.cols)
    }

    fn upload(&self, rows: usize, cols: usize, data: &[f32], out: &mut HostTensor) {
        out.reshape(rows, cols);
        out.data.copy_from_slice(&data[..rows * cols]);
    }

    fn download(&self, a: &HostTensor, out: &mut Vec<f32>) {
        out.clear();
        out.extend_from_slice(&a.data);
    }

    fn embed(&self, table: &HostMatrix, ids: &[u32], out: &mut HostTensor) -> Result<()> {
        out.reshape(ids.len(), table.cols);
        for (i, &id) in ids.iter().enumerate() {
            if id as usize >= table.rows {
                return Err(ComputeError::IdOutOfRange { id, rows: table.rows });
            }
            table.row_into(id as usize, out.row_mut(i));
        }
        Ok(())
    }

    fn linear(&self, x: &HostTensor, w: &HostMatrix, bias: Option<&Vec<f32>>, out: &mut HostTensor) {
        debug_assert_eq!(x.cols, w.cols);
        out.reshape(x.rows, w.rows);
        matmul_tw(&x.data, x.rows, x.cols, w.weights(), w.rows, &mut out.data);
        if let Some(b) = bias {
            for r in 0..out.rows {
                for (o, bv) in out.row_mut(r).iter_mut().zip(b) {
                    *o += bv;
                }
            }
        }
    }

    fn rms_norm(&self, x: &HostTensor, w: &Vec<f32>, eps: f32, out: &mut HostTensor) {
        out.reshape(x.rows, x.cols);
        for r in 0..x.rows {
            rms_norm_slice(x.row(r), w, eps, out.row_mut(r));
        }
    }

    fn rms_norm_cols(&self, x: &mut HostTensor, cols: Range<usize>, group: usize, w: &Vec<f32>, eps: f32) {
        let group = group.max(1);
        for r in 0..x.rows {
            let row = &mut x.row_mut(r)[cols.clone()];
            for chunk in row.chunks_mut(group) {
                let ss: f32 = chunk.iter().map(|v| v * v).sum::<f32>() / chunk.len() as f32;
                let inv = 1.0 / (ss + eps).sqrt();
                for (v, g) in chunk.iter_mut().zip(w) {
                    *v = *v * inv * g;
                }
            }
        }
    }

    fn clamp(&self, x: &mut HostTensor, limit: f32) {
        for v in x.data.iter_mut() {
            *v = v.clamp(-limit, limit);
        }
    }

    fn rope_table(&self, positions: &[u32], inv_freq: &[f32], scale: f32, out: &mut HostTensor) {
        let half = inv_freq.len();
        out.reshape(positions.len(), 2 * half);
        for (i, &p) in positions.iter().enumerate() {
            let row = out.row_mut(i);
            for (j, f) in inv_freq.iter().enumerate() {
                // Same order of operations as transformers: the angle is computed in f32, then
                // cos and sin are multiplied by the attention factor (YaRN; exact when it is 1).
                let angle = p as f32 * f;
                row[j] = angle.cos() * scale;
                row[half + j] = angle.sin() * scale;
            }
        }
    }

    fn rope(&self, x: &mut HostTensor, col: usize, n_heads: usize, head_dim: usize, table: &HostTensor) {
        // The table's width says how many columns of each head rotate (partial rotary: the first
        // `2 * half`; the rest pass through).
        let half = (table.cols / 2).min(head_dim / 2);
        for r in 0..x.rows {
            let (cos, sin) = table.row(r).split_at(table.cols / 2);
            let row = x.row_mut(r);
            for h in 0..n_heads {
                let head = &mut row[col + h * head_dim..col + h * head_dim + 2 * half];
                for j in 0..half {
                    let (a, b) = (head[j], head[j + half]);
                    head[j] = a * cos[j] - b * sin[j];
                    head[j + half] = b * cos[j] + a * sin[j];
                }
            }
        }
    }

    fn attention(
        &self,
        qkv: &HostTensor,
        shape: &AttentionShape<'_>,
        seqs: &[AttentionSeq],
        page_table: &[u32],
        store: &mut CpuKvStore,
        layer: usize,
        out: &mut HostTensor,
    ) -> Result<()> {
        out.reshape(qkv.rows, shape.n_heads * shape.head_dim);
        attention::paged_attention(&qkv.data, qkv.cols, shape, seqs, page_table, store, layer, &mut out.data)
    }

    fn add(&self, x: &mut HostTensor, y: &HostTensor) {
        for (a, b) in x.data.iter_mut().zip(&y.data) {
            *a += b;
        }
    }

    fn gather_rows(&self, x: &HostTensor, rows: &[u32], out: &mut HostTensor) {
        out.reshape(rows.len(), x.cols);
        for (i, &r) in rows.iter().enumerate() {
            out.row_mut(i).copy_from_slice(x.row(r as usize));
        }
    }

    fn swiglu(&self, x: &HostTensor, w: &SwigluWeights<Self>, s: &mut FfnScratch<Self>, out: &mut HostTensor) {
        self.linear(x, &w.gate_up, w.gate_up_bias.as_ref(), &mut s.gate_up);
        glu(&s.gate_up, w.glu, &mut s.hidden);
        self.linear(&s.hidden, &w.down, w.down_bias.as_ref(), out);
    }

    fn expert_ffn(
        &self,
        x: &HostTensor,
        experts: &[SwigluWeights<Self>],
        plan: &ExpertPlan,
        s: &mut FfnScratch<Self>,
        out: &mut HostTensor,
    ) {
        self.expert_ffn_lora(x, experts, plan, &|_, _| None, s, out);
    }

    fn lora_add(
        &self,
        x: &HostTensor,
        lora: &RowLora<'_, Self>,
        col: usize,
        s: &mut FfnScratch<Self>,
        out: &mut HostTensor,
    ) {
        lora::lora_segments(x, lora, col, &mut s.lora_shrink, &mut s.lora_expand, out);
    }

    fn expert_ffn_lora(
        &self,
        x: &HostTensor,
        experts: &[SwigluWeights<Self>],
        plan: &ExpertPlan,
        lora: &RowExpertLora<'_, Self>,
        s: &mut FfnScratch<Self>,
        out: &mut HostTensor,
    ) {
        experts::expert_ffn(self, x, experts, plan, lora, s, out);
    }

    fn head_linear(
        &self,
        x: &HostTensor,
        x_col: usize,
        x_stride: usize,
        n_heads: usize,
        w: &HostMatrix,
        out: &mut HostTensor,
        out_col: usize,
        out_stride: usize,
    ) -> Result<()> {
        latent::head_linear(x, x_col, x_stride, n_heads, w, out, out_col, out_stride);
        Ok(())
    }

    fn copy_cols(
        &self,
        src: &HostTensor,
        src_col: usize,
        src_stride: usize,
        width: usize,
        blocks: usize,
        dst: &mut HostTensor,
        dst_col: usize,
        dst_stride: usize,
    ) -> Result<()> {
        latent::copy_cols(src, src_col, src_stride, width, blocks, dst, dst_col, dst_stride);
        Ok(())
    }

    fn lora_add_heads(
        &self,
        x: &HostTensor,
        lora: &RowLora<'_, Self>,
        cols: HeadCols,
        s: &mut FfnScratch<Self>,
        out: &mut HostTensor,
    ) -> Result<()> {
        latent::lora_heads(x, lora, cols, s, out);
        Ok(())
    }

    fn supports_latent_attention(&self) -> bool {
        true
    }

    fn computes_on_host_threads(&self) -> bool {
        true
    }
    fn supports_gpt_oss(&self) -> bool {
        true
    }

    fn gated_delta_net(
        &self,
        proj: &HostTensor,
        w: &crate::DeltaNetWeights<Self>,
        shape: &crate::DeltaNetShape,
        seqs: &[AttentionSeq],
        states: &[crate::StateSlots],
        store: &mut CpuKvStore,
        layer: usize,
        out: &mut HostTensor,
    ) -> Result<()> {
        delta::gated_delta_net(proj, w, shape, seqs, states, store, layer, out)
    }

    fn copy_state(&self, store: &mut CpuKvStore, from: u32, to: u32) -> Result<()> {
        delta::copy_state(store, from, to)
    }

    fn mul_sigmoid_cols(&self, x: &mut HostTensor, gate: &HostTensor, gate_col: usize) -> Result<()> {
        delta::mul_sigmoid_cols(x, gate, gate_col)
    }

    fn supports_linear_attention(&self) -> bool {
        true
    }

    fn add_sigmoid_gated(&self, out: &mut HostTensor, y: &HostTensor, gate: &HostTensor) {
        for r in 0..out.rows {
            let g = 1.0 / (1.0 + (-gate.data[r * gate.cols]).exp());
            simd::axpy(g, y.row(r), out.row_mut(r));
        }
    }

    fn zeros(&self, rows: usize, cols: usize, out: &mut HostTensor) {
        out.reshape(rows, cols);
        out.data.fill(0.0);
    }
}

/// `out[r, j] = act(gu[r, j], gu[r, I + j])` where `gu` is `[rows, 2I]` (gate then up):
/// `silu(g) * u`, or gpt-oss's clamped form.
fn glu(gu: &HostTensor, kind: Glu, out: &mut HostTensor) {
    out.reshape(gu.rows, gu.cols / 2);
    glu_rows(&gu.data, gu.rows, gu.cols, kind, &mut out.data);
}

/// The gated activation of `rows` rows of `width` values (gate half, then up half) into rows
/// of `width / 2`.
fn glu_rows(gu: &[f32], rows: usize, width: usize, kind: Glu, out: &mut [f32]) {
    let inter = width / 2;
    for r in 0..rows {
        let (g, u) = gu[r * width..(r + 1) * width].split_at(inter);
        let o = &mut out[r * inter..(r + 1) * inter];
        match kind {
            Glu::Silu => {
                for ((o, gv), uv) in o.iter_mut().zip(g).zip(u) {
                    *o = silu(*gv) * uv;
                }
            }
            Glu::ClampedSigmoid { alpha, limit } => {
                for ((o, &gv), &uv) in o.iter_mut().zip(g).zip(u) {
                    let gate = gv.min(limit);
                    let up = uv.clamp(-limit, limit);
                    *o = (up + 1.0) * (gate / (1.0 + (-(gate * alpha)).exp()));
                }
            }
        }
    }
}
