//! The CPU's operations for multi-head latent attention: a per-head matrix multiply (absorbing
//! the up-projections into the query and out of the values) and a strided column copy (laying
//! out the absorbed query heads and the latent key). Both go through the batch-invariant GEMM,
//! so a row's result never depends on the other rows of the call.

use super::linear::{matmul_tw, Weights};
use super::{HostMatrix, HostTensor, MatrixData};

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
}
