// Rotate-half rotary embedding in place on `n_heads` heads of `head_dim` columns starting at
// column `col` of each row (row stride `stride`), at each row's position. The angle is computed
// in f32 as position * inv_freq[j], as transformers does. Grid: rows; block: threads over
// (head, j) pairs.

extern "C" __global__ void rope_f32(float* __restrict__ x, int stride, int col, int n_heads, int head_dim,
                                    const int* __restrict__ positions, const float* __restrict__ inv_freq) {
    const long row = blockIdx.x;
    const int half = head_dim / 2;
    const float pos = (float)positions[row];
    for (int i = threadIdx.x; i < n_heads * half; i += blockDim.x) {
        int h = i / half, j = i % half;
        float angle = pos * inv_freq[j];
        float c = cosf(angle), s = sinf(angle);
        float* head = x + row * stride + col + h * head_dim;
        float a = head[j], b = head[j + half];
        head[j] = a * c - b * s;
        head[j + half] = b * c + a * s;
    }
}

extern "C" __global__ void rope_bf16(bf16_t* __restrict__ x, int stride, int col, int n_heads, int head_dim,
                                     const int* __restrict__ positions, const float* __restrict__ inv_freq) {
    const long row = blockIdx.x;
    const int half = head_dim / 2;
    const float pos = (float)positions[row];
    for (int i = threadIdx.x; i < n_heads * half; i += blockDim.x) {
        int h = i / half, j = i % half;
        float angle = pos * inv_freq[j];
        float c = cosf(angle), s = sinf(angle);
        bf16_t* head = x + row * stride + col + h * head_dim;
        float a = bf16_to_f32(head[j]), b = bf16_to_f32(head[j + half]);
        head[j] = f32_to_bf16(a * c - b * s);
        head[j + half] = f32_to_bf16(b * c + a * s);
    }
}
