// Attention over the paged KV cache. The cache of one layer is [pages][page_size][kv_heads]
// [head_dim] for keys and the same for values; a sequence's pages are page_table[seq_page_start
// [s] ...]. kv_write_f32 stores the new rows' k and v at their slots first. Then each query row
// attends, causally, to positions 0..=row_pos[r] of its sequence (and no further back than
// `window` when window > 0), grouped-query style (kv head = head / (n_heads / kv_heads)).
//
// One block per (row, head): each warp walks a strided subset of positions with an online
// softmax (running max, sum and a head_dim accumulator spread over the lanes), and the warps'
// partial results are merged at the end. head_dim up to 256.
//
// The cache is f32 (`_f32` entry points) or bf16 (`kv_write_bf16`, `attention_prefill_bf16`:
// half the memory per token; keys and values are rounded once when written, the math stays f32).

#define MAX_HEAD_DIM 256
#define ATT_WARPS 4

extern "C" __global__ void kv_write_f32(const float* __restrict__ qkv, int stride, int k_col, int v_col,
                                        float* __restrict__ k_cache, float* __restrict__ v_cache,
                                        const int* __restrict__ slot_of_row, int kv_heads, int head_dim) {
    const long r = blockIdx.x;
    const long slot = slot_of_row[r];
    const int width = kv_heads * head_dim;
    for (int i = threadIdx.x; i < width; i += blockDim.x) {
        k_cache[slot * width + i] = qkv[r * stride + k_col + i];
        v_cache[slot * width + i] = qkv[r * stride + v_col + i];
    }
}

extern "C" __global__ void kv_write_bf16(const float* __restrict__ qkv, int stride, int k_col, int v_col,
                                         bf16_t* __restrict__ k_cache, bf16_t* __restrict__ v_cache,
                                         const int* __restrict__ slot_of_row, int kv_heads, int head_dim) {
    const long r = blockIdx.x;
    const long slot = slot_of_row[r];
    const int width = kv_heads * head_dim;
    for (int i = threadIdx.x; i < width; i += blockDim.x) {
        k_cache[slot * width + i] = f32_to_bf16(qkv[r * stride + k_col + i]);
        v_cache[slot * width + i] = f32_to_bf16(qkv[r * stride + v_col + i]);
    }
}

__device__ __forceinline__ float kv_load(const float* p) { return *p; }
__device__ __forceinline__ float kv_load(const bf16_t* p) { return bf16_to_f32(*p); }

template <typename KV>
__device__ void attend_row(const float* q, int q_stride, int q_col, const KV* k_cache, const KV* v_cache,
                           const int* pages, int pos, int n_heads, int kv_heads, int head_dim, int page_size,
                           float scale, int window, float* out, long row) {
    __shared__ float sq[MAX_HEAD_DIM];
    __shared__ float s_m[ATT_WARPS], s_l[ATT_WARPS];
    __shared__ float s_acc[ATT_WARPS][MAX_HEAD_DIM];
    const int h = blockIdx.y, kvh = h / (n_heads / kv_heads);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) sq[d] = q[row * q_stride + q_col + h * head_dim + d];
    __syncthreads();
    const int per_lane = (head_dim + 31) / 32;
    float acc[MAX_HEAD_DIM / 32];
    for (int i = 0; i < per_lane; ++i) acc[i] = 0.0f;
    float m = -INFINITY, l = 0.0f;
    const int first = (window > 0 && pos - window + 1 > 0) ? pos - window + 1 : 0;
    const int width = kv_heads * head_dim;
    for (int p = first + warp; p <= pos; p += ATT_WARPS) {
        const long slot = (long)pages[p / page_size] * page_size + p % page_size;
        const KV* kp = k_cache + slot * width + kvh * head_dim;
        float s = 0.0f;
        for (int d = lane; d < head_dim; d += 32) s += sq[d] * kv_load(kp + d);
        s = warp_sum(s) * scale;
        float m_new = fmaxf(m, s);
        float corr = __expf(m - m_new), w = __expf(s - m_new);
        l = l * corr + w;
        const KV* vp = v_cache + slot * width + kvh * head_dim;
        for (int i = 0, d = lane; i < per_lane; ++i, d += 32)
            acc[i] = acc[i] * corr + (d < head_dim ? w * kv_load(vp + d) : 0.0f);
        m = m_new;
    }
    if (lane == 0) {
        s_m[warp] = m;
        s_l[warp] = l;
    }
    for (int i = 0, d = lane; i < per_lane; ++i, d += 32)
        if (d < head_dim) s_acc[warp][d] = acc[i];
    __syncthreads();
    if (warp == 0) {
        float gm = -INFINITY;
        for (int w = 0; w < ATT_WARPS; ++w) gm = fmaxf(gm, s_m[w]);
        float gl = 0.0f;
        for (int w = 0; w < ATT_WARPS; ++w) gl += s_l[w] * (s_m[w] == -INFINITY ? 0.0f : __expf(s_m[w] - gm));
        for (int d = lane; d < head_dim; d += 32) {
            float v = 0.0f;
            for (int w = 0; w < ATT_WARPS; ++w) v += s_acc[w][d] * (s_m[w] == -INFINITY ? 0.0f : __expf(s_m[w] - gm));
            out[row * n_heads * head_dim + h * head_dim + d] = gl > 0.0f ? v / gl : 0.0f;
        }
    }
}


// Decode: one query row per sequence, at position seq_len[s] - 1. Grid: (sequences, n_heads),
// block: 32 * ATT_WARPS threads.
extern "C" __global__ void paged_attention_decode_f32(const float* __restrict__ q, int q_stride, int q_col,
                                                      const float* __restrict__ k_cache,
                                                      const float* __restrict__ v_cache,
                                                      const int* __restrict__ page_table,
                                                      const int* __restrict__ seq_page_start,
                                                      const int* __restrict__ seq_len, float* __restrict__ out,
                                                      int n_heads, int kv_heads, int head_dim, int page_size,
                                                      float scale, int window) {
    const long s = blockIdx.x;
    attend_row(q, q_stride, q_col, k_cache, v_cache, page_table + seq_page_start[s], seq_len[s] - 1, n_heads,
               kv_heads, head_dim, page_size, scale, window, out, s);
}

// Prefill (and mixed batches): every row has its sequence and position. Grid: (rows, n_heads).
extern "C" __global__ void attention_prefill_f32(const float* __restrict__ q, int q_stride, int q_col,
                                                 const float* __restrict__ k_cache, const float* __restrict__ v_cache,
                                                 const int* __restrict__ page_table,
                                                 const int* __restrict__ seq_page_start,
                                                 const int* __restrict__ row_seq, const int* __restrict__ row_pos,
                                                 float* __restrict__ out, int n_heads, int kv_heads, int head_dim,
                                                 int page_size, float scale, int window) {
    const long r = blockIdx.x;
    attend_row(q, q_stride, q_col, k_cache, v_cache, page_table + seq_page_start[row_seq[r]], row_pos[r], n_heads,
               kv_heads, head_dim, page_size, scale, window, out, r);
}

// attention_prefill_f32 over a bf16 cache (written by kv_write_bf16).
extern "C" __global__ void attention_prefill_bf16(const float* __restrict__ q, int q_stride, int q_col,
                                                  const bf16_t* __restrict__ k_cache,
                                                  const bf16_t* __restrict__ v_cache,
                                                  const int* __restrict__ page_table,
                                                  const int* __restrict__ seq_page_start,
                                                  const int* __restrict__ row_seq, const int* __restrict__ row_pos,
                                                  float* __restrict__ out, int n_heads, int kv_heads, int head_dim,
                                                  int page_size, float scale, int window) {
    const long r = blockIdx.x;
    attend_row(q, q_stride, q_col, k_cache, v_cache, page_table + seq_page_start[row_seq[r]], row_pos[r], n_heads,
               kv_heads, head_dim, page_size, scale, window, out, r);
}
