// The small kernels the CUDA backend needs between the big ones: casts, embedding lookup, bias and
// residual adds, clamping, grouped RMSNorm over column ranges (q/k norm), the rotary table and its
// application, the weighted scatter of expert outputs and the sigmoid-gated shared expert add.
// Every loop is grid-strided, so any launch size covers any element count (zero rows included).

extern "C" __global__ void to_bf16_f32(const float* __restrict__ x, bf16_t* __restrict__ out, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        out[i] = f32_to_bf16(x[i]);
}

// out[i] = table[ids[i]] widened to f32; ids were validated on the host.
extern "C" __global__ void embed_bf16(const bf16_t* __restrict__ table, const int* __restrict__ ids,
                                      float* __restrict__ out, long rows, int cols) {
    for (long r = blockIdx.x; r < rows; r += gridDim.x) {
        const bf16_t* src = table + (long)ids[r] * cols;
        for (int c = threadIdx.x; c < cols; c += blockDim.x) out[r * cols + c] = bf16_to_f32(src[c]);
    }
}

extern "C" __global__ void embed_f32(const float* __restrict__ table, const int* __restrict__ ids,
                                     float* __restrict__ out, long rows, int cols) {
    for (long r = blockIdx.x; r < rows; r += gridDim.x) {
        const float* src = table + (long)ids[r] * cols;
        for (int c = threadIdx.x; c < cols; c += blockDim.x) out[r * cols + c] = src[c];
    }
}

// x[r, c] += bias[c]
extern "C" __global__ void add_bias_f32(float* __restrict__ x, const float* __restrict__ bias, long n, int cols) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        x[i] += bias[i % cols];
}

// x += y
extern "C" __global__ void add_f32(float* __restrict__ x, const float* __restrict__ y, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        x[i] += y[i];
}

extern "C" __global__ void clamp_f32(float* __restrict__ x, long n, float limit) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        x[i] = fminf(fmaxf(x[i], -limit), limit);
}

// In place RMSNorm of groups of `group` columns starting at `col` (block (row, group index)).
extern "C" __global__ void rmsnorm_groups_f32(float* __restrict__ x, int stride, int col, int group,
                                              const float* __restrict__ w, float eps) {
    __shared__ float scratch[32];
    float* v = x + (long)blockIdx.x * stride + col + (long)blockIdx.y * group;
    float ss = 0.0f;
    for (int c = threadIdx.x; c < group; c += blockDim.x) ss += v[c] * v[c];
    ss = block_sum(ss, scratch);
    const float inv = rsqrtf(ss / (float)group + eps);
    for (int c = threadIdx.x; c < group; c += blockDim.x) v[c] = v[c] * inv * w[c];
}

// Row i: cos(p_i * f_j) for j < half, then sin; the angle in f32 as transformers computes it.
extern "C" __global__ void rope_table_f32(const int* __restrict__ positions, const float* __restrict__ inv_freq,
                                          float* __restrict__ out, int half, float scale) {
    const long r = blockIdx.x;
    const float p = (float)positions[r];
    for (int j = threadIdx.x; j < half; j += blockDim.x) {
        float angle = p * inv_freq[j];
        out[r * 2 * half + j] = cosf(angle) * scale;
        out[r * 2 * half + half + j] = sinf(angle) * scale;
    }
}

// Rotate-half RoPE in place with a precomputed table (row r: cos then sin, `half` each): heads start
// `head_dim` columns apart and their first 2 * half columns rotate (partial rotary passes the rest).
extern "C" __global__ void rope_apply_f32(float* __restrict__ x, int stride, int col, int n_heads, int head_dim,
                                          int half, const float* __restrict__ table) {
    const long r = blockIdx.x;
    const float* cs = table + r * 2 * half;
    for (int i = threadIdx.x; i < n_heads * half; i += blockDim.x) {
        int h = i / half, j = i % half;
        float* head = x + r * stride + col + h * head_dim;
        float a = head[j], b = head[j + half];
        head[j] = a * cs[j] - b * cs[half + j];
        head[j + half] = b * cs[j] + a * cs[half + j];
    }
}

// out[r] += sigmoid(gate[r * gate_stride]) * y[r]  (Qwen2-MoE's shared expert).
extern "C" __global__ void sigmoid_gated_add_f32(float* __restrict__ out, const float* __restrict__ y,
                                                 const float* __restrict__ gate, int gate_stride, long rows,
                                                 int cols) {
    for (long r = blockIdx.x; r < rows; r += gridDim.x) {
        const float g = 1.0f / (1.0f + expf(-gate[r * gate_stride]));
        for (int c = threadIdx.x; c < cols; c += blockDim.x) out[r * cols + c] += g * y[r * cols + c];
    }
}

// Random benchmark weights made on the device (moe bench-device's full-depth models): element i
// is uniform in +-scale from the i-th SplitMix64 draw of `seed`, truncated to bf16, the bits of
// gpu_plan::draws::random_bf16 on the host.
extern "C" __global__ void random_bf16(bf16_t* __restrict__ out, long n, unsigned long long seed, float scale) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        const float unit = splitmix64_nth_unit(seed, (unsigned long long)i);
        const float v = __fmul_rn(__fsub_rn(__fmul_rn(unit, 2.0f), 1.0f), scale);
        out[i] = (bf16_t)(__float_as_uint(v) >> 16);
    }
}
