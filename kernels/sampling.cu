// Sampling on the device, one block per row. Greedy: the highest logit, ties to the lower id
// (NaN never wins). Top-p: softmax at `temperature`, keep the tokens whose probability is at
// least the largest threshold whose kept mass reaches top_p (found by bisection, so tokens tied
// at the threshold are all kept), then draw with the host's uniform number in [0, 1) by a scan
// in token order. NaN logits are never drawn; a row whose logits are all -inf or NaN (nothing
// to draw from) gets its greedy token, which is written first so the output is always set.

extern "C" __global__ void sample_greedy_f32(const float* __restrict__ logits, int vocab, int* __restrict__ out) {
    __shared__ float sv[1024];
    __shared__ int si[1024];
    const float* l = logits + (long)blockIdx.x * vocab;
    float best = -INFINITY;
    int best_i = 0x7fffffff;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        float v = l[i];
        if (v == v && (v > best || (v == best && i < best_i))) {
            best = v;
            best_i = i;
        }
    }
    sv[threadIdx.x] = best;
    si[threadIdx.x] = best_i;
    __syncthreads();
    for (int o = blockDim.x / 2; o > 0; o >>= 1) {
        if (threadIdx.x < o) {
            float v = sv[threadIdx.x + o];
            int i = si[threadIdx.x + o];
            if (v > sv[threadIdx.x] || (v == sv[threadIdx.x] && i < si[threadIdx.x])) {
                sv[threadIdx.x] = v;
                si[threadIdx.x] = i;
            }
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) out[blockIdx.x] = si[0] == 0x7fffffff ? 0 : si[0];
}

// Unnormalized probability at temperature; 0 for NaN logits (never drawn).
__device__ __forceinline__ float prob_num(float v, float m, float inv_t) { return v == v ? __expf((v - m) * inv_t) : 0.0f; }

// blockDim.x must be a power of two, at most 1024.
extern "C" __global__ void sample_top_p_f32(const float* __restrict__ logits, int vocab, float temperature,
                                            float top_p, const float* __restrict__ uniforms, int* __restrict__ out) {
    __shared__ float scratch[32];
    __shared__ float prefix[1024];
    __shared__ int si[1024];
    const float* l = logits + (long)blockIdx.x * vocab;
    const float inv_t = 1.0f / fmaxf(temperature, 1e-6f);
    // The greedy token first (ties to the lower id, NaN never wins), so `out` is always written.
    float best = -INFINITY;
    int best_i = 0x7fffffff;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        float v = l[i];
        if (v == v && (v > best || (v == best && i < best_i))) {
            best = v;
            best_i = i;
        }
    }
    prefix[threadIdx.x] = best;
    si[threadIdx.x] = best_i;
    __syncthreads();
    for (int o = blockDim.x / 2; o > 0; o >>= 1) {
        if (threadIdx.x < o) {
            float v = prefix[threadIdx.x + o];
            int i = si[threadIdx.x + o];
            if (v > prefix[threadIdx.x] || (v == prefix[threadIdx.x] && i < si[threadIdx.x])) {
                prefix[threadIdx.x] = v;
                si[threadIdx.x] = i;
            }
        }
        __syncthreads();
    }
    const float m = prefix[0];
    if (threadIdx.x == 0) out[blockIdx.x] = si[0] == 0x7fffffff ? 0 : si[0];
    __syncthreads();
    if (m == -INFINITY) return;  // nothing finite to draw from (uniform across the block)
    float z = 0.0f;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) z += prob_num(l[i], m, inv_t);
    z = block_sum(z, scratch);
    // Largest threshold tau with mass(p >= tau) >= top_p; p_max = 1 / z.
    float lo = 0.0f, hi = 1.0f / z;
    for (int it = 0; it < 30; ++it) {
        float tau = 0.5f * (lo + hi), mass = 0.0f;
        for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
            float p = prob_num(l[i], m, inv_t) / z;
            if (p >= tau) mass += p;
        }
        mass = block_sum(mass, scratch);
        if (mass >= top_p) lo = tau; else hi = tau;
    }
    const float tau = lo;
    // Each thread owns a contiguous chunk of token ids; a prefix over threads finds the chunk.
    const int chunk = (vocab + blockDim.x - 1) / blockDim.x;
    const int begin = threadIdx.x * chunk, end = min(vocab, begin + chunk);
    float mine = 0.0f;
    for (int i = begin; i < end; ++i) {
        float p = prob_num(l[i], m, inv_t) / z;
        if (p >= tau) mine += p;
    }
    prefix[threadIdx.x] = mine;
    __syncthreads();
    if (threadIdx.x == 0) {
        float run = 0.0f;
        for (int t = 0; t < blockDim.x; ++t) {
            float v = prefix[t];
            prefix[t] = run;
            run += v;
        }
        scratch[0] = run;
    }
    __syncthreads();
    const float target = uniforms[blockIdx.x] * scratch[0];
    float run = prefix[threadIdx.x];
    if (target >= run && target < run + mine) {
        int pick = -1;
        for (int i = begin; i < end; ++i) {
            float p = prob_num(l[i], m, inv_t) / z;
            if (p <= 0.0f || p < tau) continue;
            pick = i;
            run += p;
            if (target < run) break;
        }
        if (pick >= 0) out[blockIdx.x] = pick;
    }
}
