// Token permutation for the grouped expert GEMM: rows are gathered into expert order
// (slot s holds row row_of_slot[s]; each expert's slots are contiguous, see expert_offsets in
// grouped_gemm), and the expert outputs are combined back per row in a fixed order (no atomics,
// so results are deterministic): out[r] = sum_j weight[r*k + j] * y[slot_of_pair[r*k + j]].

extern "C" __global__ void moe_permute_f32(const float* __restrict__ x, const int* __restrict__ row_of_slot,
                                           float* __restrict__ out, int slots, int cols) {
    for (long s = blockIdx.x; s < slots; s += gridDim.x) {
        const float* src = x + (long)row_of_slot[s] * cols;
        for (int c = threadIdx.x; c < cols; c += blockDim.x) out[s * cols + c] = src[c];
    }
}

extern "C" __global__ void moe_permute_bf16(const float* __restrict__ x, const int* __restrict__ row_of_slot,
                                            bf16_t* __restrict__ out, int slots, int cols) {
    for (long s = blockIdx.x; s < slots; s += gridDim.x) {
        const float* src = x + (long)row_of_slot[s] * cols;
        for (int c = threadIdx.x; c < cols; c += blockDim.x) out[s * cols + c] = f32_to_bf16(src[c]);
    }
}

extern "C" __global__ void moe_unpermute_f32(const float* __restrict__ y, const int* __restrict__ slot_of_pair,
                                             const float* __restrict__ weight_of_pair, float* __restrict__ out,
                                             int rows, int k, int cols) {
    for (long r = blockIdx.x; r < rows; r += gridDim.x) {
        for (int c = threadIdx.x; c < cols; c += blockDim.x) {
            float acc = out[r * cols + c];
            for (int j = 0; j < k; ++j) {
                int s = slot_of_pair[r * k + j];
                if (s >= 0) acc += weight_of_pair[r * k + j] * y[(long)s * cols + c];
            }
            out[r * cols + c] = acc;
        }
    }
}
