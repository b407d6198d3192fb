//! `x · Wᵀ` on the CPU. Few rows (decode) are bound by reading W once: each thread streams a
//! block of W's rows and dots them with every input row while they sit in L1. Many rows
//! (prefill, busy experts) go to the cache-blocked SIMD kernel of the `gemm` crate.

use super::simd::dot;
use gemm::Parallelism;
use rayon::prelude::*;

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

/// `out[m×n] = x[m×k] · w[n×k]ᵀ`.
pub fn matmul_t(x: &[f32], m: usize, k: usize, w: &[f32], n: usize, out: &mut [f32]) {
    debug_assert!(x.len() >= m * k && w.len() >= n * k && out.len() >= m * n);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        out[..m * n].fill(0.0);
        return;
    }
    if m <= STREAM_MAX_ROWS {
        stream(x, m, k, w, n, out);
    } else {
        blocked(x, m, k, w, n, out);
    }
}

fn stream(x: &[f32], m: usize, k: usize, w: &[f32], n: usize, out: &mut [f32]) {
    let block = |cols: std::ops::Range<usize>, dst: SendPtr| {
        for j in cols {
            let wj = &w[j * k..(j + 1) * k];
            for r in 0..m {
                let v = dot(&x[r * k..(r + 1) * k], wj);
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
        for &(m, k, n) in &[(1, 64, 300), (3, 17, 5), (6, 128, 257), (7, 33, 9), (40, 96, 130)] {
            let x: Vec<f32> = (0..m * k).map(|i| ((i * 7 % 13) as f32 - 6.0) / 7.0).collect();
            let w: Vec<f32> = (0..n * k).map(|i| ((i * 5 % 11) as f32 - 5.0) / 9.0).collect();
            let mut out = vec![f32::NAN; m * n];
            matmul_t(&x, m, k, &w, n, &mut out);
            for (a, b) in out.iter().zip(naive(&x, m, k, &w, n)) {
                assert!((a - b).abs() < 1e-4 * (1.0 + b.abs()), "{m}x{k}x{n}: {a} vs {b}");
            }
        }
    }
}
