// SwiGLU activation over the fused [gate | up] rows: out[r, j] = silu(gu[r, j]) * gu[r, I + j].

extern "C" __global__ void swiglu_f32(const float* __restrict__ gate_up, float* __restrict__ out, long rows,
                                      int inter) {
    long n = rows * (long)inter;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        long r = i / inter, j = i % inter;
        const float* g = gate_up + r * 2 * inter;
        out[i] = silu(g[j]) * g[inter + j];
    }
}

extern "C" __global__ void swiglu_bf16(const bf16_t* __restrict__ gate_up, bf16_t* __restrict__ out, long rows,
                                       int inter) {
    long n = rows * (long)inter;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        long r = i / inter, j = i % inter;
        const bf16_t* g = gate_up + r * 2 * inter;
        out[i] = f32_to_bf16(silu(bf16_to_f32(g[j])) * bf16_to_f32(g[inter + j]));
    }
}
