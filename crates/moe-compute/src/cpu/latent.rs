//! The CPU's operations for multi-head latent attention: a per-head matrix multiply (absorbing
//! the up-projections into the query and out of the values), a strided column copy (laying out
//! the absorbed query heads and the latent key), and per-head LoRA (an adapter's `kv_b_proj`
//! pair, absorbed the same way). All go through the batch-invariant GEMM, so a row's result
//! never depends on the other rows of the call.

use super::linear::{matmul_tw, Weights};
use super::{simd, CpuBackend, HostMatrix, HostTensor, MatrixData};
use crate::{FfnScratch, HeadCols, LoraWeights};

/// See [`crate::Backend::head_linear`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn head_linear(
    x: &HostTensor,
    x_col: usize,
    x_stride: usize,
    n_heads: usize,
    w: &HostMatrix,
    out: &mut HostTensor,
    out_col: usize,
    out_stride: usize,
) {
    let (k, n) = (w.cols, w.rows / n_heads.max(1));
    let rows = x.rows;
    HEAD_BUFS.with(|bufs| match bufs.try_borrow_mut() {
        // Grown once per thread; decode steps then allocate nothing here.
        Ok(mut b) => {
            let [xin, y] = &mut *b;
            xin.resize(rows * k, 0.0);
            y.resize(rows * n, 0.0);
            per_head(x, x_col, x_stride, n_heads, w, out, out_col, out_stride, xin, y);
        }
        // Re-entered on this thread (never expected): buffers of its own.
        Err(_) => {
            let (mut xin, mut y) = (vec![0.0; rows * k], vec![0.0; rows * n]);
            per_head(x, x_col, x_stride, n_heads, w, out, out_col, out_stride, &mut xin, &mut y);
        }
    });
}

thread_local! {
    /// One head's gathered input rows and its product.
    static HEAD_BUFS: std::cell::RefCell<[Vec<f32>; 2]> = const { std::cell::RefCell::new([Vec::new(), Vec::new()]) };
}

#[allow(clippy::too_many_arguments)]
fn per_head(
    x: &HostTensor,
    x_col: usize,
    x_stride: usize,
    n_heads: usize,
    w: &HostMatrix,
    out: &mut HostTensor,
    out_col: usize,
    out_stride: usize,
    xin: &mut [f32],
    y: &mut [f32],
) {
    let (k, n) = (w.cols, w.rows / n_heads.max(1));
    let rows = x.rows;
    for h in 0..n_heads {
        for r in 0..rows {
            let src = &x.row(r)[x_col + h * x_stride..][..k];
            xin[r * k..(r + 1) * k].copy_from_slice(src);
        }
        let span = h * n * k..(h + 1) * n * k;
        let wh = match &w.data {
            MatrixData::F32(d) => Weights::F32(&d[span]),
            MatrixData::Bf16(d) => Weights::Bf16(&d[span]),
        };
        matmul_tw(xin, rows, k, wh, n, y);
        for r in 0..rows {
            out.row_mut(r)[out_col + h * out_stride..][..n].copy_from_slice(&y[r * n..(r + 1) * n]);
        }
    }
}

/// Head `h`'s block of rows of `m` (all of it when the heads share it).
fn head_block(m: &HostMatrix, per_head: bool, rows: usize, h: usize) -> Weights<'_> {
    let span = if per_head { h * rows * m.cols..(h + 1) * rows * m.cols } else { 0..rows * m.cols };
    match &m.data {
        MatrixData::F32(d) => Weights::F32(&d[span]),
        MatrixData::Bf16(d) => Weights::Bf16(&d[span]),
    }
}

/// See [`crate::Backend::lora_add_heads`]: consecutive rows with the same pair form a segment,
/// and each head of a segment costs one shrink and one expand product.
pub(crate) fn lora_heads<'l>(
    x: &HostTensor,
    lora: impl Fn(usize) -> Option<&'l LoraWeights<CpuBackend>>,
    c: HeadCols,
    s: &mut FfnScratch<CpuBackend>,
    out: &mut HostTensor,
) {
    for (r, end, pair) in super::lora::pair_segments(x.rows, lora) {
        let (m, k, rank, n) = (end - r, pair.a.cols, pair.b.cols, c.out_width);
        let (a_per_head, b_per_head) = (pair.a.rows != rank, pair.b.rows != n);
        debug_assert!(!a_per_head || pair.a.rows == c.heads * rank);
        debug_assert!(!b_per_head || pair.b.rows == c.heads * n);
        s.rows.reshape(m, k);
        s.lora_shrink.reshape(m, rank);
        s.lora_expand.reshape(m, n);
        for h in 0..c.heads {
            for i in 0..m {
                s.rows.row_mut(i).copy_from_slice(&x.row(r + i)[c.x_col + h * c.x_stride..][..k]);
            }
            matmul_tw(&s.rows.data, m, k, head_block(&pair.a, a_per_head, rank, h), rank, &mut s.lora_shrink.data);
            matmul_tw(&s.lora_shrink.data, m, rank, head_block(&pair.b, b_per_head, n, h), n, &mut s.lora_expand.data);
            for i in 0..m {
                let dst = &mut out.row_mut(r + i)[c.out_col + h * c.out_stride..][..n];
                simd::axpy(pair.scale, s.lora_expand.row(i), dst);
            }
        }
    }
}

/// See [`crate::Backend::copy_cols`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn copy_cols(
    src: &HostTensor,
    src_col: usize,
    src_stride: usize,
    width: usize,
    blocks: usize,
    dst: &mut HostTensor,
    dst_col: usize,
    dst_stride: usize,
) {
    for r in 0..src.rows {
        for i in 0..blocks {
            let s = &src.row(r)[src_col + i * src_stride..][..width];
            dst.row_mut(r)[dst_col + i * dst_stride..][..width].copy_from_slice(s);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_linear_multiplies_each_head_by_its_block() {
        // 2 rows, 2 heads of 3 inputs (stride 4), 2 outputs per head (stride 5, from column 1).
        let x = HostTensor { rows: 2, cols: 8, data: (0..16).map(|v| v as f32).collect() };
        let w = HostMatrix::f32(4, 3, vec![1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 2.0, 0.0, 0.0, 0.0, 0.0, -1.0]);
        let mut out = HostTensor { rows: 2, cols: 11, data: vec![9.0; 22] };
        head_linear(&x, 0, 4, 2, &w, &mut out, 1, 5);
        // Row 0: head 0 sees [0,1,2] -> [0, 3]; head 1 sees [4,5,6] -> [8, -6].
        assert_eq!(&out.data[..11], &[9.0, 0.0, 3.0, 9.0, 9.0, 9.0, 8.0, -6.0, 9.0, 9.0, 9.0]);
        // Row 1: head 0 sees [8,9,10] -> [8, 19]; head 1 sees [12,13,14] -> [24, -14].
        assert_eq!(&out.data[11..], &[9.0, 8.0, 19.0, 9.0, 9.0, 9.0, 24.0, -14.0, 9.0, 9.0, 9.0]);
    }

    #[test]
    fn lora_heads_adds_each_heads_low_rank_product_on_rows_with_a_pair() {
        // 2 heads of 2 inputs (stride 3, from column 1), rank 1, 2 outputs per head (stride 2).
        // A per head: head 0 [1, 0], head 1 [0, 1]; B shared [1, 2]; scale 0.5.
        let pair = LoraWeights::<CpuBackend> {
            a: HostMatrix::f32(2, 2, vec![1.0, 0.0, 0.0, 1.0]),
            b: HostMatrix::f32(2, 1, vec![1.0, 2.0]),
            scale: 0.5,
        };
        let x = HostTensor { rows: 3, cols: 7, data: (0..21).map(|v| v as f32).collect() };
        let mut out = HostTensor { rows: 3, cols: 4, data: vec![1.0; 12] };
        let cols = HeadCols { heads: 2, x_col: 1, x_stride: 3, out_col: 0, out_stride: 2, out_width: 2 };
        let mut s = FfnScratch::new(&CpuBackend::new());
        let which = [Some(&pair), None, Some(&pair)];
        lora_heads(&x, |r| which[r], cols, &mut s, &mut out);
        // Row 0: head 0 sees [1, 2] -> A·x = 1 -> [0.5, 1]; head 1 sees [4, 5] -> 5 -> [2.5, 5].
        assert_eq!(&out.data[..4], &[1.5, 2.0, 3.5, 6.0]);
        assert_eq!(&out.data[4..8], &[1.0; 4]);
        // Row 2: head 0 sees [15, 16] -> 15; head 1 sees [18, 19] -> 19.
        assert_eq!(&out.data[8..], &[8.5, 16.0, 10.5, 20.0]);
    }
}
