// Batched multi-adapter LoRA (the BGMV shape of Punica and S-LoRA): every row of a batch names
// its adapter (row_adapter[r], -1 for none), and one launch serves all rows whatever the mix.
// Adapter i's A ([rank_i, in]) and B ([out, rank_i]) are f32 at device addresses a_ptrs[i] and
// b_ptrs[i]. shrink: tmp[r, 0..rank) = x_r . A^T; expand: out[r, col + c] += scale_i * tmp_r . B_c.

extern "C" __global__ void lora_shrink_f32(const float* __restrict__ x, int in_dim,
                                           const unsigned long long* __restrict__ a_ptrs,
                                           const int* __restrict__ ranks, const int* __restrict__ row_adapter,
                                           float* __restrict__ tmp, int max_rank) {
    const long r = blockIdx.x;
    const int a = row_adapter[r];
    if (a < 0) return;
    const float* A = reinterpret_cast<const float*>(a_ptrs[a]);
    const int rank = ranks[a];
    const int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    const float* xr = x + r * in_dim;
    for (int t = threadIdx.x >> 5; t < rank; t += warps) {
        float s = 0.0f;
        for (int i = lane; i < in_dim; i += 32) s += xr[i] * A[(long)t * in_dim + i];
        s = warp_sum(s);
        if (lane == 0) tmp[r * max_rank + t] = s;
    }
}

extern "C" __global__ void lora_expand_f32(const float* __restrict__ tmp, int max_rank,
                                           const unsigned long long* __restrict__ b_ptrs,
                                           const int* __restrict__ ranks, const float* __restrict__ scales,
                                           const int* __restrict__ row_adapter, float* __restrict__ out,
                                           int out_stride, int col, int out_dim) {
    const long r = blockIdx.x;
    const int a = row_adapter[r];
    if (a < 0) return;
    const float* B = reinterpret_cast<const float*>(b_ptrs[a]);
    const int rank = ranks[a];
    const float scale = scales[a];
    const float* t = tmp + r * max_rank;
    for (int c = blockIdx.y * blockDim.x + threadIdx.x; c < out_dim; c += gridDim.y * blockDim.x) {
        float s = 0.0f;
        for (int j = 0; j < rank; ++j) s += t[j] * B[(long)c * rank + j];
        out[r * out_stride + col + c] += scale * s;
    }
}
