// RMSNorm fused with the residual add: h = x (+ residual); residual_out = h (when given);
// out = h / sqrt(mean(h^2) + eps) * w. One block per row; f32 math for every dtype.
// residual_out may alias x or residual (the residual stream updated in place): the second pass
// reads h back from residual_out (each thread its own elements), never x + residual again.

extern "C" __global__ void rmsnorm_f32(const float* x, const float* residual, float* residual_out,
                                       const float* __restrict__ w,
                                       float* __restrict__ out, int cols, float eps) {
    __shared__ float scratch[32];
    const long row = blockIdx.x;
    const float* xr = x + row * cols;
    const float* rr = residual ? residual + row * cols : nullptr;
    float ss = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        float h = xr[c] + (rr ? rr[c] : 0.0f);
        if (residual_out) residual_out[row * cols + c] = h;
        ss += h * h;
    }
    float inv = rsqrtf(block_sum(ss, scratch) / (float)cols + eps);
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        float h = residual_out ? residual_out[row * cols + c] : xr[c] + (rr ? rr[c] : 0.0f);
        out[row * cols + c] = h * inv * w[c];
    }
}

extern "C" __global__ void rmsnorm_bf16(const bf16_t* x, const bf16_t* residual, bf16_t* residual_out,
                                        const float* __restrict__ w,
                                        bf16_t* __restrict__ out, int cols, float eps) {
    __shared__ float scratch[32];
    const long row = blockIdx.x;
    float ss = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        float h = bf16_to_f32(x[row * cols + c]) + (residual ? bf16_to_f32(residual[row * cols + c]) : 0.0f);
        if (residual_out) residual_out[row * cols + c] = f32_to_bf16(h);
        ss += h * h;
    }
    float inv = rsqrtf(block_sum(ss, scratch) / (float)cols + eps);
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        float h = residual_out ? bf16_to_f32(residual_out[row * cols + c])
                               : bf16_to_f32(x[row * cols + c]) + (residual ? bf16_to_f32(residual[row * cols + c]) : 0.0f);
        out[row * cols + c] = f32_to_bf16(h * inv * w[c]);
    }
}
