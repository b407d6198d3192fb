// Flash prefill attention over the paged bf16 KV cache (issue 33), FlashAttention-2 style on
// tensor cores: a block per (tile of up to 64 query rows of one sequence, query head), four
// warps of 16 rows. Q is converted to bf16 once into swizzled shared memory; K and V tiles of 64
// keys are gathered through the page table with a two-stage cp.async ring; S = Q·K^T and
// O += P·V run as mma.sync.m16n8k16 (P straight from the S accumulators, V through
// ldmatrix.trans), with an online softmax per row in f32. Keys past the tile's last position are
// never loaded (causal tiles skipped); causal, sliding-window and padding masks per element.
// Chunked prefill is the general case: each query row has its own position and attends to every
// cached key up to it. GQA: kv head = head / (n_heads / kv_heads). Head sizes 64 and 128 (others
// take attention_prefill_bf16).
//
// tiles[3 t ..]: (first query row, rows, sequence); row_pos[r]: the position of query row r; a
// sequence's pages are page_table[seq_page_start[seq] ...]. q row r, head h: q[r * q_stride +
// q_col + h * D] (f32); out row r, head h: out[r * out_stride + h * D]. Dynamic shared memory:
// 5 * 64 * D * 2 bytes.

#define FP_ROWS 64
#define FP_KEYS 64
#define FP_THREADS 128

__device__ __forceinline__ int fp_swz(int row, int chunk) { return (chunk ^ (row & 7)) << 3; }

__device__ __forceinline__ unsigned int fp_pack(float lo, float hi) {
    return (unsigned int)f32_to_bf16(lo) | ((unsigned int)f32_to_bf16(hi) << 16);
}

template <int D>
__device__ __forceinline__ void flash_prefill(const float* __restrict__ q, int q_stride, int q_col,
                                              const bf16_t* __restrict__ k_cache, const bf16_t* __restrict__ v_cache,
                                              const int* __restrict__ tiles, const int* __restrict__ row_pos,
                                              const int* __restrict__ page_table, const int* __restrict__ seq_page_start,
                                              int n_heads, int kv_heads, int page_size, int window, float scale,
                                              float* __restrict__ out, int out_stride) {
    constexpr int CH = D / 8;  // 16-byte chunks per row
    extern __shared__ __align__(128) unsigned char fp_smem[];
    bf16_t* q_s = reinterpret_cast<bf16_t*>(fp_smem);  // [64][D]
    bf16_t* kv_s = q_s + FP_ROWS * D;                   // [2 stages][K, V][64][D]
    __shared__ int pos_s[FP_ROWS];
    __shared__ int range_s[2];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t4 = lane & 3;
    const int first = tiles[3 * blockIdx.x], rows = tiles[3 * blockIdx.x + 1], seq = tiles[3 * blockIdx.x + 2];
    const int h = blockIdx.y, kvh = h / (n_heads / kv_heads);
    for (int r = tid; r < FP_ROWS; r += FP_THREADS) pos_s[r] = r < rows ? row_pos[first + r] : -1;
    for (int i = tid; i < FP_ROWS * D / 2; i += FP_THREADS) {
        const int r = i / (D / 2), c = (i % (D / 2)) * 2;
        float a = 0.0f, b = 0.0f;
        if (r < rows) {
            const float* src = q + (long)(first + r) * q_stride + q_col + h * D + c;
            a = src[0];
            b = src[1];
        }
        *reinterpret_cast<unsigned int*>(q_s + r * D + fp_swz(r, c / 8) + (c % 8)) = fp_pack(a, b);
    }
    __syncthreads();
    if (tid == 0) {
        int lo = 0x7fffffff, hi = -1;
        for (int r = 0; r < rows; ++r) {
            lo = min(lo, pos_s[r]);
            hi = max(hi, pos_s[r]);
        }
        range_s[0] = (window > 0 && lo - window + 1 > 0) ? lo - window + 1 : 0;
        range_s[1] = hi;
    }
    __syncthreads();
    const int key_lo = range_s[0], key_hi = range_s[1];
    if (key_hi < 0) return;
    const int key_tiles = (key_hi - key_lo + FP_KEYS) / FP_KEYS;
    const long head_stride = (long)kv_heads * D;
    const int* pages = page_table + seq_page_start[seq];
    auto load_tile = [&](int kt, int stage) {
        bf16_t* ks = kv_s + stage * 2 * FP_KEYS * D;
        bf16_t* vs = ks + FP_KEYS * D;
        for (int c = tid; c < FP_KEYS * CH; c += FP_THREADS) {
            const int j = c / CH, ch = c % CH;
            const int key = key_lo + kt * FP_KEYS + j;
            const bool ok = key <= key_hi;
            long off = 0;
            if (ok) off = ((long)pages[key / page_size] * page_size + key % page_size) * head_stride + (long)kvh * D + ch * 8;
            cp_async16(smem_addr(ks + j * D + fp_swz(j, ch)), k_cache + off, ok ? 16 : 0);
            cp_async16(smem_addr(vs + j * D + fp_swz(j, ch)), v_cache + off, ok ? 16 : 0);
        }
        cp_async_commit();
    };
    load_tile(0, 0);
    // This warp's Q fragments for every k-step of the head.
    unsigned int qa[D / 16][4];
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
        const int r = warp * 16 + (lane & 15);
        ldmatrix_x4(smem_addr(q_s + r * D + fp_swz(r, kk * 2 + (lane >> 4))), qa[kk]);
    }
    float o[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
    const int my_pos[2] = {pos_s[warp * 16 + g], pos_s[warp * 16 + g + 8]};
    for (int kt = 0; kt < key_tiles; ++kt) {
        if (kt + 1 < key_tiles) {
            load_tile(kt + 1, (kt + 1) & 1);
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        const bf16_t* ks = kv_s + (kt & 1) * 2 * FP_KEYS * D;
        const bf16_t* vs = ks + FP_KEYS * D;
        float s[FP_KEYS / 8][4];
#pragma unroll
        for (int nt = 0; nt < FP_KEYS / 8; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk)
#pragma unroll
            for (int nt = 0; nt < FP_KEYS / 8; nt += 2) {
                unsigned int b[4];
                const int r = nt * 8 + ((lane >> 4) << 3) + (lane & 7);
                ldmatrix_x4(smem_addr(ks + r * D + fp_swz(r, kk * 2 + ((lane >> 3) & 1))), b);
                mma_bf16_16816(s[nt], qa[kk], b[0], b[1]);
                mma_bf16_16816(s[nt + 1], qa[kk], b[2], b[3]);
            }
        // Masks, scale and the online softmax (rows g and g + 8 of this warp).
        float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int nt = 0; nt < FP_KEYS / 8; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int i = e >> 1, key = key_lo + kt * FP_KEYS + nt * 8 + 2 * t4 + (e & 1);
                const int p = my_pos[i];
                const bool ok = p >= 0 && key <= p && (window <= 0 || key > p - window);
                s[nt][e] = ok ? s[nt][e] * scale : -INFINITY;
                mx[i] = fmaxf(mx[i], s[nt][e]);
            }
        float corr[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 1));
            mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 2));
            const float m_new = fmaxf(m[i], mx[i]);
            corr[i] = (m[i] == -INFINITY) ? (m_new == -INFINITY ? 1.0f : 0.0f) : expf(m[i] - m_new);
            m[i] = m_new;
            l[i] *= corr[i];
        }
#pragma unroll
        for (int nt = 0; nt < FP_KEYS / 8; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int i = e >> 1;
                const float p = (m[i] == -INFINITY || s[nt][e] == -INFINITY) ? 0.0f : expf(s[nt][e] - m[i]);
                s[nt][e] = p;
                l[i] += p;
            }
#pragma unroll
        for (int dt = 0; dt < D / 8; ++dt) {
            o[dt][0] *= corr[0];
            o[dt][1] *= corr[0];
            o[dt][2] *= corr[1];
            o[dt][3] *= corr[1];
        }
        // O += P · V, P from the score accumulators (bf16), V through ldmatrix.trans.
#pragma unroll
        for (int kk = 0; kk < FP_KEYS / 16; ++kk) {
            unsigned int a[4] = {fp_pack(s[2 * kk][0], s[2 * kk][1]), fp_pack(s[2 * kk][2], s[2 * kk][3]),
                                 fp_pack(s[2 * kk + 1][0], s[2 * kk + 1][1]), fp_pack(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
            for (int dt = 0; dt < D / 8; dt += 2) {
                unsigned int b[4];
                const int r = kk * 16 + (lane & 7) + (((lane >> 3) & 1) << 3);
                ldmatrix_x4_trans(smem_addr(vs + r * D + fp_swz(r, dt + (lane >> 4))), b);
                mma_bf16_16816(o[dt], a, b[0], b[1]);
                mma_bf16_16816(o[dt + 1], a, b[2], b[3]);
            }
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        l[i] += __shfl_xor_sync(0xffffffffu, l[i], 1);
        l[i] += __shfl_xor_sync(0xffffffffu, l[i], 2);
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const int r = warp * 16 + g + 8 * i;
        if (r >= rows) continue;
        float* dst = out + (long)(first + r) * out_stride + h * D;
        const float inv = l[i] > 0.0f ? 1.0f / l[i] : 0.0f;
#pragma unroll
        for (int dt = 0; dt < D / 8; ++dt) {
            dst[dt * 8 + 2 * t4] = o[dt][2 * i] * inv;
            dst[dt * 8 + 2 * t4 + 1] = o[dt][2 * i + 1] * inv;
        }
    }
}

extern "C" __global__ void __launch_bounds__(FP_THREADS)
    flash_prefill_bf16(const float* __restrict__ q, int q_stride, int q_col, const bf16_t* __restrict__ k_cache,
                       const bf16_t* __restrict__ v_cache, const int* __restrict__ tiles, const int* __restrict__ row_pos,
                       const int* __restrict__ page_table, const int* __restrict__ seq_page_start, int n_heads,
                       int kv_heads, int head_dim, int page_size, int window, float scale, float* __restrict__ out,
                       int out_stride) {
    if (head_dim == 128)
        flash_prefill<128>(q, q_stride, q_col, k_cache, v_cache, tiles, row_pos, page_table, seq_page_start, n_heads,
                           kv_heads, page_size, window, scale, out, out_stride);
    else if (head_dim == 64)
        flash_prefill<64>(q, q_stride, q_col, k_cache, v_cache, tiles, row_pos, page_table, seq_page_start, n_heads,
                          kv_heads, page_size, window, scale, out, out_stride);
}
