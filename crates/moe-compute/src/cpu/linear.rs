//! `x · Wᵀ` on the CPU, for f32 or bf16 W. Few rows (decode) are bound by reading W once: each
//! thread streams a block of W's rows and dots them with every input row while they sit in L1
//! (bf16 rows widened in registers: half the bytes). Many rows (prefill, busy experts) go to the
//! cache-blocked SIMD kernel of the `gemm` crate; bf16 W is widened a block of rows at a time
//! into a per-thread buffer that stays in cache while the block's product runs.

use super::simd::{bf16_to_f32, dot, dot_bf16};
use gemm::Parallelism;
use rayon::prelude::*;
use std::cell::RefCell;

/// Up to this many input rows use the streaming kernel; above, the blocked GEMM wins.
const STREAM_MAX_ROWS: usize = 6;
/// Below this many multiply-adds a call runs on the calling thread (threads cost ~µs to wake).
const PARALLEL_MIN_WORK: usize = 1 << 15;

/// A raw pointer that may cross threads; every user writes a disjoint region.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub *mut f32);
// SAFETY: used only to let threads write disjoint elements of one output buffer.
unsafe impl Send for SendPtr {}
// SAFETY: as above; no two threads touch the same element.
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// The pointer; a method so closures capture the whole (Send) wrapper, not the raw field.
    pub fn get(self) -> *mut f32 {
        self.0
    }
}

/// Row-major `[n, k]` weights as stored.
#[derive(Clone, Copy, Debug)]
pub enum Weights<'a> {
    F32(&'a [f32]),
    /// Raw bf16 bits.
    Bf16(&'a [u16]),
}

impl Weights<'_> {
    fn len(&self) -> usize {
        match self {
            Weights::F32(w) => w.len(),
            Weights::Bf16(w) => w.len(),
        }
    }
}

/// Rows of W widened per block in the bf16 blocked path.
const BF16_BLOCK_ROWS: usize = 64;

thread_local! {
    static WIDENED: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// `out[m×n] = x[m×k] · w[n×k]ᵀ`.
pub fn matmul_t(x: &[f32], m: usize, k: usize, w: &[f32], n: usize, out: &mut [f32]) {
    matmul_tw(x, m, k, Weights::F32(w), n, out)
}

/// [`matmul_t`] for f32 or bf16 weights.
pub fn matmul_tw(x: &[f32], m: usize, k: usize, w: Weights<'_>, n: usize, out: &mut [f32]) {
    debug_assert!(x.len() >= m * k && w.len() >= n * k && out.len() >= m * n);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        out[..m * n].fill(0.0);
        return;
    }
    match w {
        _ if m <= STREAM_MAX_ROWS => stream(x, m, k, w, n, out),
        Weights::F32(w) => blocked(x, m, k, w, n, out),
        Weights::Bf16(w) => blocked_bf16(x, m, k, w, n, out),
    }
}

fn stream(x: &[f32], m: usize, k: usize, w: Weights<'_>, n: usize, out: &mut [f32]) {
    let block = |cols: std::ops::Range<usize>, dst: SendPtr| {
        for j in cols {
            for r in 0..m {
                let xr = &x[r * k..(r + 1) * k];
                let v = match w {
                    Weights::F32(w) => dot(xr, &w[j * k..(j + 1) * k]),
                    Weights::Bf16(w) => dot_bf16(xr, &w[j * k..(j + 1) * k]),
                };
                // SAFETY: j < n and r < m, so r*n + j is inside out; column blocks are disjoint
                // between threads.
                unsafe { *dst.get().add(r * n + j) = v };
            }
        }
    };
    let dst = SendPtr(out.as_mut_ptr());
    let threads = rayon::current_num_threads();
    if threads <= 1 || m * n * k < PARALLEL_MIN_WORK {
        block(0..n, dst);
        return;
    }
    let chunk = n.div_ceil(threads * 4).max(16);
    (0..n.div_ceil(chunk)).into_par_iter().for_each(|c| {
        let cols = c * chunk..((c + 1) * chunk).min(n);
        block(cols, dst);
    });
}

/// bf16 W: each block of rows is widened into this thread's buffer, then multiplied into its
/// columns of `out` (blocks write disjoint columns, so they run in parallel).
fn blocked_bf16(x: &[f32], m: usize, k: usize, w: &[u16], n: usize, out: &mut [f32]) {
    let dst = SendPtr(out.as_mut_ptr());
    let block = |b: usize| {
        let j0 = b * BF16_BLOCK_ROWS;
        let nb = BF16_BLOCK_ROWS.min(n - j0);
        WIDENED.with(|buf| {
            let mut buf = buf.borrow_mut();
            buf.clear();
            buf.extend(w[j0 * k..(j0 + nb) * k].iter().map(|&v| bf16_to_f32(v)));
            // SAFETY: the destination is columns j0..j0+nb of the m×n row-major out (col stride
            // 1, row stride n), inside out and disjoint between blocks; lhs x is m×k row-major;
            // rhs is the widened block's transpose, k×nb, read from its nb×k row-major storage.
            unsafe {
                gemm::gemm(
                    m,
                    nb,
                    k,
                    dst.get().add(j0),
                    1,
                    n as isize,
                    false,
                    x.as_ptr(),
                    1,
                    k as isize,
                    buf.as_ptr(),
                    k as isize,
                    1,
                    0.0f32,
                    1.0f32,
                    false,
                    false,
                    false,
                    Parallelism::None,
                );
            }
        });
    };
    let blocks = n.div_ceil(BF16_BLOCK_ROWS);
    if m * n * k < PARALLEL_MIN_WORK * 4 || rayon::current_num_threads() <= 1 {
        (0..blocks).for_each(block);
    } else {
        (0..blocks).into_par_iter().for_each(block);
    }
}

fn blocked(x: &[f32], m: usize, k: usize, w: &[f32], n: usize, out: &mut [f32]) {
    let par = if m * n * k < PARALLEL_MIN_WORK * 4 {
        Parallelism::None
    } else {
        Parallelism::Rayon(rayon::current_num_threads())
    };
    // SAFETY: dst is m×n row-major (col stride 1, row stride n); lhs x is m×k row-major; rhs is
    // Wᵀ, k×n, read through W's n×k row-major storage (row stride 1, col stride k). All three
    // slices were checked to hold at least those many elements. read_dst is false, so out's
    // previous contents are ignored.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            false,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            k as isize,
            1,
            0.0f32,
            1.0f32,
            false,
            false,
            false,
            par,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
        let mut out = vec![0.0; m * n];
        for r in 0..m {
            for j in 0..n {
                out[r * n + j] = (0..k).map(|i| x[r * k + i] * w[j * k + i]).sum();
            }
        }
        out
    }

    #[test]
    fn both_paths_match_naive() {
        for &(m, k, n) in &[(1, 64, 300), (3, 17, 5), (6, 128, 257), (7, 33, 9), (40, 96, 130), (64, 512, 700)] {
            let x: Vec<f32> = (0..m * k).map(|i| ((i * 7 % 13) as f32 - 6.0) / 7.0).collect();
            let w: Vec<f32> = (0..n * k).map(|i| ((i * 5 % 11) as f32 - 5.0) / 9.0).collect();
            let mut out = vec![f32::NAN; m * n];
            matmul_t(&x, m, k, &w, n, &mut out);
            for (a, b) in out.iter().zip(naive(&x, m, k, &w, n)) {
                assert!((a - b).abs() < 1e-4 * (1.0 + b.abs()), "{m}x{k}x{n}: {a} vs {b}");
            }
            // bf16 weights give the products of their widened values, on both paths.
            let bits: Vec<u16> = w.iter().map(|v| (v.to_bits() >> 16) as u16).collect();
            let widened: Vec<f32> = bits.iter().map(|&b| bf16_to_f32(b)).collect();
            let mut out16 = vec![f32::NAN; m * n];
            matmul_tw(&x, m, k, Weights::Bf16(&bits), n, &mut out16);
            for (a, b) in out16.iter().zip(naive(&x, m, k, &widened, n)) {
                assert!((a - b).abs() < 1e-4 * (1.0 + b.abs()), "bf16 {m}x{k}x{n}: {a} vs {b}");
            }
        }
    }
}
