// Flash-decoding over the paged bf16 KV cache (issue 32). One block per (sequence, KV head,
// split of the context) serves the whole GQA group of that KV head: it reads each key and value
// once for all the group's query heads. Keys and values come in tiles of 64 through a two-stage
// cp.async ring (16-byte copies gathered through the page table; rows padded by 16 bytes so the
// 16-byte shared-memory reads of eight neighbouring rows hit different banks). Each tile: scores
// (two threads per key, half the head each), an online softmax per head (a warp per head), and
// P·V (a thread per output column, every head). The split's partial result (running max, sum of
// exponentials, unnormalised output) goes to a scratch buffer; flash_decode_merge_f32 combines
// the splits in ascending order and adds an attention sink (gpt-oss) to the denominator.
//
// The split depends on the sequence's own context length (and window) only, exactly as
// gpu_plan::splits::DecodeSplits (FD_SPLIT_TOKENS, FD_MAX_SPLITS): never on the batch, so a
// request's bits do not depend on what it is batched with. The grid's z dimension is the batch's
// split bucket; blocks past a sequence's own split count exit.
//
// Cache layout (kv_write_bf16): [pages * page_size][kv_heads][head_dim]; a sequence's pages are
// pages[seq_page_start[seq] ...]. Sequence s's query is row seq_rows[s] of q (f32; head h at
// q_col + h * D, rows q_stride apart) and its output row seq_rows[s] of out. head_dim a multiple
// of 16. Scratch: part_out [seqs][n_heads][FD_MAX_SPLITS][D], part_max/part_sum [seqs][n_heads]
// [FD_MAX_SPLITS]. Dynamic shared memory: see gpu_plan::splits::flash_decode_shared_bytes.

#define FD_SPLIT_TOKENS 512
#define FD_MAX_SPLITS 16
#define FD_TILE 64
#define FD_THREADS 128
#define FD_MAX_GROUP 16
#define FD_MAX_D 256
#define FD_PAD 8

struct FdSplit {
    int start, len, count;
};

__device__ __forceinline__ FdSplit fd_split(int context_len, int window, int page_size) {
    FdSplit s;
    s.start = (window > 0 && context_len > window) ? context_len - window : 0;
    const int attended = context_len - s.start;
    const int page = page_size > 0 ? page_size : 1;
    int len = (attended + FD_MAX_SPLITS - 1) / FD_MAX_SPLITS;
    if (len < FD_SPLIT_TOKENS) len = FD_SPLIT_TOKENS;
    s.len = (len + page - 1) / page * page;
    s.count = (attended + s.len - 1) / s.len;
    if (s.count < 1) s.count = 1;
    return s;
}

extern "C" __global__ void __launch_bounds__(FD_THREADS)
    flash_decode_bf16(const float* __restrict__ q, int q_stride, int q_col, const int* __restrict__ seq_rows,
                      const bf16_t* __restrict__ k_cache, const bf16_t* __restrict__ v_cache,
                      const int* __restrict__ pages, const int* __restrict__ seq_page_start,
                      const int* __restrict__ context_lens, int window, int page_size, int n_heads, int kv_heads, int D,
                      float scale, float* __restrict__ part_out, float* __restrict__ part_max,
                      float* __restrict__ part_sum) {
    const int seq = blockIdx.x, kvh = blockIdx.y, split = blockIdx.z;
    const int ctx = context_lens[seq];
    const FdSplit sp = fd_split(ctx, window, page_size);
    if (ctx <= 0 || split >= sp.count) return;
    const int G = n_heads / kv_heads;
    const int a = sp.start + split * sp.len;
    const int b = min(a + sp.len, ctx);
    const int row = D + FD_PAD;  // padded shared row, in bf16
    extern __shared__ __align__(16) unsigned char fd_smem[];
    float* q_s = reinterpret_cast<float*>(fd_smem);                 // [G][D]
    float* p_s = q_s + G * D;                                        // [G][FD_TILE]
    float* part_s = p_s + G * FD_TILE;                               // [2][G][FD_TILE]
    float* m_s = part_s + 2 * G * FD_TILE;                           // [G]
    float* l_s = m_s + FD_MAX_GROUP;                                 // [G]
    float* c_s = l_s + FD_MAX_GROUP;                                 // [G] this tile's correction
    bf16_t* kv_s = reinterpret_cast<bf16_t*>(c_s + FD_MAX_GROUP);   // [2 stages][K, V][FD_TILE][row]
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const float* q_row = q + (long)seq_rows[seq] * q_stride + q_col + (long)kvh * G * D;
    for (int i = tid; i < G * D; i += FD_THREADS) q_s[i] = q_row[i];
    const int* my_pages = pages + seq_page_start[seq];
    if (tid < G) {
        m_s[tid] = -INFINITY;
        l_s[tid] = 0.0f;
    }
    const int chunks = D / 8;  // 16-byte chunks per key row
    const long head_stride = (long)kv_heads * D;
    auto load_tile = [&](int t, int stage) {
        bf16_t* ks = kv_s + (long)stage * 2 * FD_TILE * row;
        bf16_t* vs = ks + FD_TILE * row;
        for (int c = tid; c < FD_TILE * chunks; c += FD_THREADS) {
            const int j = c / chunks, ch = c % chunks;
            const int key = a + t * FD_TILE + j;
            const bool ok = key < b;
            long off = 0;
            if (ok) {
                const long slot = (long)my_pages[key / page_size] * page_size + key % page_size;
                off = slot * head_stride + (long)kvh * D + ch * 8;
            }
            cp_async16(smem_addr(ks + j * row + ch * 8), k_cache + off, ok ? 16 : 0);
            cp_async16(smem_addr(vs + j * row + ch * 8), v_cache + off, ok ? 16 : 0);
        }
        cp_async_commit();
    };
    float acc[FD_MAX_D / FD_THREADS][FD_MAX_GROUP];
#pragma unroll
    for (int i = 0; i < FD_MAX_D / FD_THREADS; ++i)
#pragma unroll
        for (int g = 0; g < FD_MAX_GROUP; ++g) acc[i][g] = 0.0f;
    const int tiles = (b - a + FD_TILE - 1) / FD_TILE;
    load_tile(0, 0);
    for (int t = 0; t < tiles; ++t) {
        if (t + 1 < tiles) {
            load_tile(t + 1, (t + 1) & 1);
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        const bf16_t* ks = kv_s + (long)(t & 1) * 2 * FD_TILE * row;
        const bf16_t* vs = ks + FD_TILE * row;
        // Scores: thread (half, key) sums half the head for every query head of the group.
        {
            const int j = tid % FD_TILE, half = tid / FD_TILE;
            const int d0 = half * (D / 2), d1 = d0 + D / 2;
            float s[FD_MAX_GROUP];
#pragma unroll
            for (int g = 0; g < FD_MAX_GROUP; ++g) s[g] = 0.0f;
            for (int d = d0; d < d1; d += 8) {
                const uint4 raw = *reinterpret_cast<const uint4*>(ks + j * row + d);
                const unsigned int w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const float k0 = bf16_to_f32((bf16_t)(w[i] & 0xffffu)), k1 = bf16_to_f32((bf16_t)(w[i] >> 16));
#pragma unroll
                    for (int g = 0; g < FD_MAX_GROUP; ++g)
                        if (g < G) s[g] += q_s[g * D + d + 2 * i] * k0 + q_s[g * D + d + 2 * i + 1] * k1;
                }
            }
#pragma unroll
            for (int g = 0; g < FD_MAX_GROUP; ++g)
                if (g < G) part_s[(half * G + g) * FD_TILE + j] = s[g];
        }
        __syncthreads();
        // Online softmax: a warp per head, two keys per lane.
        for (int g = warp; g < G; g += FD_THREADS / 32) {
            float v[2];
            float tile_max = -INFINITY;
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                const int j = lane + 32 * i;
                const bool ok = a + t * FD_TILE + j < b;
                v[i] = ok ? (part_s[g * FD_TILE + j] + part_s[(G + g) * FD_TILE + j]) * scale : -INFINITY;
                tile_max = fmaxf(tile_max, v[i]);
            }
            tile_max = warp_max(tile_max);
            const float m_old = m_s[g], m_new = fmaxf(m_old, tile_max);
            float sum = 0.0f;
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                const float p = v[i] == -INFINITY ? 0.0f : expf(v[i] - m_new);
                p_s[g * FD_TILE + lane + 32 * i] = p;
                sum += p;
            }
            sum = warp_sum(sum);
            if (lane == 0) {
                const float corr = m_old == -INFINITY ? 0.0f : expf(m_old - m_new);
                c_s[g] = corr;
                l_s[g] = l_s[g] * corr + sum;
                m_s[g] = m_new;
            }
        }
        __syncthreads();
        // P·V: a thread per output column, every head of the group.
#pragma unroll
        for (int i = 0; i < FD_MAX_D / FD_THREADS; ++i) {
            const int d = tid + i * FD_THREADS;
            if (d >= D) continue;
#pragma unroll
            for (int g = 0; g < FD_MAX_GROUP; ++g)
                if (g < G) acc[i][g] *= c_s[g];
            for (int j = 0; j < FD_TILE; ++j) {
                const float v = bf16_to_f32(vs[j * row + d]);
#pragma unroll
                for (int g = 0; g < FD_MAX_GROUP; ++g)
                    if (g < G) acc[i][g] += p_s[g * FD_TILE + j] * v;
            }
        }
        __syncthreads();
    }
    const long base = ((long)seq * n_heads + kvh * G) * FD_MAX_SPLITS + split;
#pragma unroll
    for (int i = 0; i < FD_MAX_D / FD_THREADS; ++i) {
        const int d = tid + i * FD_THREADS;
        if (d >= D) continue;
#pragma unroll
        for (int g = 0; g < FD_MAX_GROUP; ++g)
            if (g < G) part_out[(base + (long)g * FD_MAX_SPLITS) * D + d] = acc[i][g];
    }
    if (tid < G) {
        part_max[base + (long)tid * FD_MAX_SPLITS] = m_s[tid];
        part_sum[base + (long)tid * FD_MAX_SPLITS] = l_s[tid];
    }
}

// Combines a sequence's splits for every head, in ascending order; `sinks` (one logit per head,
// or null) joins the softmax's denominator only. out: row seq_rows[s] (out_stride apart), head h
// at h * D.
extern "C" __global__ void flash_decode_merge_f32(const float* __restrict__ part_out, const float* __restrict__ part_max,
                                                  const float* __restrict__ part_sum, const int* __restrict__ context_lens,
                                                  const int* __restrict__ seq_rows, const float* __restrict__ sinks,
                                                  int window, int page_size, int n_heads, int D, float* __restrict__ out,
                                                  int out_stride) {
    const int seq = blockIdx.x, h = blockIdx.y;
    const int ctx = context_lens[seq];
    float* o = out + (long)seq_rows[seq] * out_stride + (long)h * D;
    if (ctx <= 0) {
        for (int d = threadIdx.x; d < D; d += blockDim.x) o[d] = 0.0f;
        return;
    }
    const int count = fd_split(ctx, window, page_size).count;
    const long base = ((long)seq * n_heads + h) * FD_MAX_SPLITS;
    float m = sinks ? sinks[h] : -INFINITY;
    for (int s = 0; s < count; ++s)
        if (part_sum[base + s] > 0.0f) m = fmaxf(m, part_max[base + s]);
    float sum = sinks ? expf(sinks[h] - m) : 0.0f;
    for (int s = 0; s < count; ++s)
        if (part_sum[base + s] > 0.0f) sum += part_sum[base + s] * expf(part_max[base + s] - m);
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float v = 0.0f;
        for (int s = 0; s < count; ++s)
            if (part_sum[base + s] > 0.0f) v += part_out[(base + s) * D + d] * expf(part_max[base + s] - m);
        o[d] = sum > 0.0f ? v / sum : 0.0f;
    }
}
