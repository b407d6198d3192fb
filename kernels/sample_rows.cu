// The device sampler (issue 32): one block per row; only token ids come back. The algorithm is
// the host sampler's, step for step (crates/moe-compute/src/gpu_plan/sampling.rs is the
// reference; moe-generate tests that it draws the host's tokens):
// - a structured-output bitmask (one bit per token, set = allowed; null: all allowed) makes
//   disallowed tokens -inf;
// - greedy rows (temperature 0 or top-k 1): the first largest logit (NaN never wins; a NaN first
//   logit keeps token 0, as the host's loop does);
// - sampled rows with top-k in 2..=SR_MAX_TOP_K: top-k block-wide arg-maxes in the host's order
//   (value / temperature descending, lower index first), then thread 0 runs the host's
//   sequential softmax (canonical exp), top-p cut and draw, with the row's uniform computed from
//   (seed, draw index) as the host's SplitMix64 makes it;
// - other rows (top-k 0 or above the limit) get -1: the host samples them.
// params: temperature[rows], top_k[rows], top_p[rows], seeds[rows], draws[rows].

#define SR_THREADS 256
#define SR_MAX_TOP_K 64
#define SR_NONE 0x7fffffff

__device__ __forceinline__ float sr_value(const float* l, const unsigned int* mask, int t) {
    if (mask && !((mask[t >> 5] >> (t & 31)) & 1u)) return -INFINITY;
    return l[t];
}

// A warp's best (value, index): larger value, then lower index; SR_NONE loses to everything.
__device__ __forceinline__ void sr_warp_best(float& v, int& i) {
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, v, o);
        const int oi = __shfl_xor_sync(0xffffffffu, i, o);
        if (oi != SR_NONE && (i == SR_NONE || ov > v || (ov == v && oi < i))) {
            v = ov;
            i = oi;
        }
    }
}

// (value, index) of the block's best: larger value, then lower index; SR_NONE when no thread has one.
__device__ __forceinline__ void sr_block_best(float& v, int& i, float* sv, int* si) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    sr_warp_best(v, i);
    __syncthreads();
    if (lane == 0) {
        sv[warp] = v;
        si[warp] = i;
    }
    __syncthreads();
    if (warp == 0) {
        v = lane < SR_THREADS / 32 ? sv[lane] : 0.0f;
        i = lane < SR_THREADS / 32 ? si[lane] : SR_NONE;
        sr_warp_best(v, i);
        if (lane == 0) {
            sv[0] = v;
            si[0] = i;
        }
    }
    __syncthreads();
    v = sv[0];
    i = si[0];
}

extern "C" __global__ void __launch_bounds__(SR_THREADS)
    sample_rows_f32(const float* __restrict__ logits, int vocab, const unsigned int* __restrict__ masks,
                    const float* __restrict__ temperature, const unsigned int* __restrict__ top_k,
                    const float* __restrict__ top_p, const unsigned long long* __restrict__ seeds,
                    const unsigned long long* __restrict__ draws, int* __restrict__ tokens) {
    __shared__ float sv[SR_THREADS / 32];
    __shared__ int si[SR_THREADS / 32];
    __shared__ float cand_v[SR_MAX_TOP_K];
    __shared__ int cand_i[SR_MAX_TOP_K];
    const int row = blockIdx.x, tid = threadIdx.x;
    const float* l = logits + (long)row * vocab;
    const unsigned int* mask = masks ? masks + (long)row * ((vocab + 31) / 32) : nullptr;
    const float temp = temperature[row];
    const unsigned int k = top_k[row];
    // Greedy: the host's arg-max.
    float bv = -INFINITY;
    int bi = SR_NONE;
    for (int t = tid; t < vocab; t += SR_THREADS) {
        const float v = sr_value(l, mask, t);
        if (v == v && (bi == SR_NONE || v > bv)) {
            bv = v;
            bi = t;
        }
    }
    sr_block_best(bv, bi, sv, si);
    const float first = vocab > 0 ? sr_value(l, mask, 0) : 0.0f;
    const int argmax = (vocab == 0 || first != first || bi == SR_NONE) ? 0 : bi;
    if (temp == 0.0f || k == 1u) {
        if (tid == 0) tokens[row] = argmax;
        return;
    }
    if (k < 2u || k > SR_MAX_TOP_K) {
        if (tid == 0) tokens[row] = -1;  // the host samples this row
        return;
    }
    // Candidates: successive arg-maxes strictly after the previous in (value desc, index asc).
    float pv = 0.0f;
    int pi = SR_NONE, n = 0;
    for (; n < (int)k; ++n) {
        float cv = -INFINITY;
        int ci = SR_NONE;
        for (int t = tid; t < vocab; t += SR_THREADS) {
            const float lt = sr_value(l, mask, t);
            if (!isfinite(lt)) continue;
            const float v = __fdiv_rn(lt, temp);
            const bool after = pi == SR_NONE || v < pv || (v == pv && t > pi);
            if (after && (ci == SR_NONE || v > cv || (v == cv && t < ci))) {
                cv = v;
                ci = t;
            }
        }
        sr_block_best(cv, ci, sv, si);
        if (ci == SR_NONE) break;
        if (tid == 0) {
            cand_v[n] = cv;
            cand_i[n] = ci;
        }
        pv = cv;
        pi = ci;
    }
    __syncthreads();
    if (tid != 0) return;
    if (n == 0) {
        tokens[row] = argmax;
        return;
    }
    // The host's sequential tail.
    const float unit = splitmix64_nth_unit(seeds[row], draws[row]);
    const float max = cand_v[0];
    float sum = 0.0f;
    for (int j = 0; j < n; ++j) {
        cand_v[j] = exp_canonical(__fsub_rn(cand_v[j], max));
        sum = __fadd_rn(sum, cand_v[j]);
    }
    const float p = top_p[row];
    if (p < 1.0f) {
        float acc = 0.0f;
        int keep = n;
        for (int j = 0; j < n; ++j) {
            acc = __fadd_rn(acc, __fdiv_rn(cand_v[j], sum));
            if (acc >= p) {
                keep = j + 1;
                break;
            }
        }
        n = keep;
        sum = 0.0f;
        for (int j = 0; j < n; ++j) sum = __fadd_rn(sum, cand_v[j]);
    }
    float r = __fmul_rn(unit, sum);
    for (int j = 0; j < n; ++j) {
        if (r < cand_v[j]) {
            tokens[row] = cand_i[j];
            return;
        }
        r = __fsub_rn(r, cand_v[j]);
    }
    tokens[row] = cand_i[n - 1];
}
