// The grouped expert GEMM at tensor-core speed (issue 33): out[slot] = x[slot] · W_e^T for the
// slots of every expert e, driven by the device plan's tile table (expert_plan_f32), bf16 inputs,
// f32 accumulation through mma.sync.m16n8k16.
//
// - Tiles: blockIdx.x is a tile of the table; expert e owns tiles tile_offsets[e] ..
//   tile_offsets[e + 1], row tiles fastest, so blocks running together share one weight slab in
//   L2. The grid is a bound that depends only on the number of pairs (a CUDA graph covers every
//   routing); blocks past the last tile exit. (gpu_plan::tiles is the tested reference.)
// - Pipeline: STAGES-deep cp.async ring of (A: BM x 64, B: BN x 64) bf16 tiles in shared memory;
//   rows past an expert's count, weight rows past N and columns past K are zero-filled by
//   cp.async's source size, so ragged and zero-token experts need no special case.
// - Shared memory rows are 128 bytes (64 bf16, eight 16-byte chunks), chunk c of row r stored at
//   c ^ (r % 8): ldmatrix phases and cp.async writes are free of bank conflicts.
// - Warps: WM x WN, each a (BM/WM) x (BN/WN) warp tile of m16n8 accumulators; both operands come
//   through ldmatrix (the [N, K] weight is already the column-major B).
// - SwiGLU epilogue (the _swiglu_ entry points): the fused [gate; up] weight is uploaded with its
//   rows interleaved in groups of 16 (8 gate rows, then the 8 matching up rows), so accumulator
//   pairs (2j, 2j+1) hold gate and up of the same columns and the kernel writes silu(gate) * up
//   as bf16 straight from registers: the expert FFN is two launches.
// Requires K % 8 == 0 (16-byte rows); the scalar grouped_gemm.cu covers the rest.

#define TC_BK 64

template <int BM, int BN, int STAGES, int WM, int WN>
struct TcTile {
    static constexpr int THREADS = WM * WN * 32;
    static constexpr int WTM = BM / WM, WTN = BN / WN;
    static constexpr int MI = WTM / 16, NI = WTN / 8;
    static constexpr int A_ELEMS = BM * TC_BK, B_ELEMS = BN * TC_BK;
    static constexpr int SHARED_BYTES = STAGES * (A_ELEMS + B_ELEMS) * 2;
};

__device__ __forceinline__ int swizzled(int row, int chunk) { return row * TC_BK + ((chunk ^ (row & 7)) << 3); }

// The tile of blockIdx.x: expert, first slot, valid rows, first column. False past the last tile.
template <int BM, int BN>
__device__ __forceinline__ bool find_tile(const int* offsets, const int* tile_offsets, int E, int N, int& e, int& row0,
                                          int& rows, int& col0) {
    const int t = blockIdx.x;
    if (t >= tile_offsets[E]) return false;
    int lo = 0, hi = E;
    while (hi - lo > 1) {
        const int mid = (lo + hi) >> 1;
        if (tile_offsets[mid] <= t) lo = mid; else hi = mid;
    }
    e = lo;
    const int count = offsets[e + 1] - offsets[e];
    const int m_tiles = (count + BM - 1) / BM;
    const int local = t - tile_offsets[e];
    const int n_tile = local / m_tiles, m_tile = local % m_tiles;
    row0 = offsets[e] + m_tile * BM;
    rows = min(BM, count - m_tile * BM);
    col0 = n_tile * BN;
    return true;
}

// Loads k-tile `kt` of A (x rows row0..) and B (weight rows col0..) into stage buffers.
template <int BM, int BN, int STAGES, int WM, int WN>
__device__ __forceinline__ void load_stage(bf16_t* sa, bf16_t* sb, const bf16_t* x, const bf16_t* w, int row0, int rows,
                                           int col0, int N, int K, int kt) {
    using T = TcTile<BM, BN, STAGES, WM, WN>;
    const int k0 = kt * TC_BK;
#pragma unroll
    for (int i = 0; i < BM * 8 / T::THREADS; ++i) {
        const int c = threadIdx.x + i * T::THREADS, r = c >> 3, ch = c & 7;
        const bool ok = r < rows && k0 + ch * 8 < K;
        const bf16_t* src = ok ? x + (long)(row0 + r) * K + k0 + ch * 8 : x;
        cp_async16(smem_addr(sa + swizzled(r, ch)), src, ok ? 16 : 0);
    }
#pragma unroll
    for (int i = 0; i < BN * 8 / T::THREADS; ++i) {
        const int c = threadIdx.x + i * T::THREADS, r = c >> 3, ch = c & 7;
        const bool ok = col0 + r < N && k0 + ch * 8 < K;
        const bf16_t* src = ok ? w + (long)(col0 + r) * K + k0 + ch * 8 : w;
        cp_async16(smem_addr(sb + swizzled(r, ch)), src, ok ? 16 : 0);
    }
}

// The main loop: acc[MI][NI][4] of this warp over the whole K.
template <int BM, int BN, int STAGES, int WM, int WN>
__device__ __forceinline__ void tc_mainloop(const bf16_t* x, const bf16_t* w, int row0, int rows, int col0, int N,
                                            int K, float (*acc)[TcTile<BM, BN, STAGES, WM, WN>::NI][4]) {
    using T = TcTile<BM, BN, STAGES, WM, WN>;
    extern __shared__ __align__(128) unsigned char tc_smem[];
    bf16_t* smem = reinterpret_cast<bf16_t*>(tc_smem);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int wm = warp / WN, wn = warp % WN;
    const int k_tiles = (K + TC_BK - 1) / TC_BK;
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < k_tiles)
            load_stage<BM, BN, STAGES, WM, WN>(smem + s * T::A_ELEMS, smem + STAGES * T::A_ELEMS + s * T::B_ELEMS, x, w,
                                               row0, rows, col0, N, K, s);
        cp_async_commit();
    }
    for (int kt = 0; kt < k_tiles; ++kt) {
        cp_async_wait<STAGES - 2>();
        __syncthreads();
        const int next = kt + STAGES - 1;
        if (next < k_tiles) {
            const int s = next % STAGES;
            load_stage<BM, BN, STAGES, WM, WN>(smem + s * T::A_ELEMS, smem + STAGES * T::A_ELEMS + s * T::B_ELEMS, x, w,
                                               row0, rows, col0, N, K, next);
        }
        cp_async_commit();
        const bf16_t* sa = smem + (kt % STAGES) * T::A_ELEMS;
        const bf16_t* sb = smem + STAGES * T::A_ELEMS + (kt % STAGES) * T::B_ELEMS;
#pragma unroll
        for (int kk = 0; kk < TC_BK / 16; ++kk) {
            unsigned int a[T::MI][4], b[T::NI][2];
#pragma unroll
            for (int mi = 0; mi < T::MI; ++mi) {
                const int r = wm * T::WTM + mi * 16 + (lane & 15);
                ldmatrix_x4(smem_addr(sa + swizzled(r, kk * 2 + (lane >> 4))), a[mi]);
            }
#pragma unroll
            for (int ni = 0; ni < T::NI; ni += 2) {
                const int r = wn * T::WTN + ni * 8 + ((lane >> 4) << 3) + (lane & 7);
                unsigned int r4[4];
                ldmatrix_x4(smem_addr(sb + swizzled(r, kk * 2 + ((lane >> 3) & 1))), r4);
                b[ni][0] = r4[0];
                b[ni][1] = r4[1];
                b[ni + 1][0] = r4[2];
                b[ni + 1][1] = r4[3];
            }
#pragma unroll
            for (int mi = 0; mi < T::MI; ++mi)
#pragma unroll
                for (int ni = 0; ni < T::NI; ++ni) mma_bf16_16816(acc[mi][ni], a[mi], b[ni][0], b[ni][1]);
        }
    }
    cp_async_wait<0>();
}

// This block's tile of the product: finds it in the tile table (false past the last tile), then
// accumulates x[rows of the tile] · W_e^T[columns of the tile] into zeroed `acc`.
template <int BM, int BN, int STAGES, int WM, int WN>
__device__ __forceinline__ bool tc_tile_product(const bf16_t* x, const unsigned long long* w_ptrs, const int* offsets,
                                                const int* tile_offsets, int E, int N, int K, int& row0, int& rows,
                                                int& col0, float (*acc)[TcTile<BM, BN, STAGES, WM, WN>::NI][4]) {
    using T = TcTile<BM, BN, STAGES, WM, WN>;
    int e;
    if (!find_tile<BM, BN>(offsets, tile_offsets, E, N, e, row0, rows, col0)) return false;
#pragma unroll
    for (int mi = 0; mi < T::MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < T::NI; ++ni) acc[mi][ni][0] = acc[mi][ni][1] = acc[mi][ni][2] = acc[mi][ni][3] = 0.0f;
    tc_mainloop<BM, BN, STAGES, WM, WN>(x, reinterpret_cast<const bf16_t*>(w_ptrs[e]), row0, rows, col0, N, K, acc);
    return true;
}

template <int BM, int BN, int STAGES, int WM, int WN>
__device__ __forceinline__ void tc_gemm(const bf16_t* x, const unsigned long long* w_ptrs, float* out,
                                        const int* offsets, const int* tile_offsets, int E, int N, int K) {
    using T = TcTile<BM, BN, STAGES, WM, WN>;
    int row0, rows, col0;
    float acc[T::MI][T::NI][4];
    if (!tc_tile_product<BM, BN, STAGES, WM, WN>(x, w_ptrs, offsets, tile_offsets, E, N, K, row0, rows, col0, acc)) return;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int wm = warp / WN, wn = warp % WN;
#pragma unroll
    for (int mi = 0; mi < T::MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < T::NI; ++ni)
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const int r = wm * T::WTM + mi * 16 + g + 8 * half;
                const int c = col0 + wn * T::WTN + ni * 8 + 2 * t;
                if (r >= rows) continue;
                float* o = out + (long)(row0 + r) * N;
                if (c < N) o[c] = acc[mi][ni][2 * half];
                if (c + 1 < N) o[c + 1] = acc[mi][ni][2 * half + 1];
            }
}

// w_ptrs[e]: expert e's fused [gate; up] weight, rows interleaved (gpu_plan::tiles); N = 2 * inter.
template <int BM, int BN, int STAGES, int WM, int WN>
__device__ __forceinline__ void tc_gemm_swiglu(const bf16_t* x, const unsigned long long* w_ptrs, bf16_t* hidden,
                                               const int* offsets, const int* tile_offsets, int E, int inter, int K) {
    using T = TcTile<BM, BN, STAGES, WM, WN>;
    const int N = 2 * inter;
    int row0, rows, col0;
    float acc[T::MI][T::NI][4];
    if (!tc_tile_product<BM, BN, STAGES, WM, WN>(x, w_ptrs, offsets, tile_offsets, E, N, K, row0, rows, col0, acc)) return;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int wm = warp / WN, wn = warp % WN;
#pragma unroll
    for (int mi = 0; mi < T::MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < T::NI; ni += 2)
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const int r = wm * T::WTM + mi * 16 + g + 8 * half;
                const int i = col0 + wn * T::WTN + ni * 8 + 2 * t;  // interleaved gate row
                if (r >= rows || i >= N) continue;
                const int col = (i >> 4) * 8 + (i & 7);
                bf16_t* o = hidden + (long)(row0 + r) * inter;
#pragma unroll
                for (int j = 0; j < 2; ++j) {
                    const float gate = acc[mi][ni][2 * half + j], up = acc[mi][ni + 1][2 * half + j];
                    if (col + j < inter) o[col + j] = f32_to_bf16(silu(gate) * up);
                }
            }
}

// The tilings of gpu_plan::tiles::GemmTiling::ALL: 128x128x64 (8 warps, 3 stages) and
// 64x128x64 (4 warps, 4 stages) for decode loads of a few rows per expert.
#define TC_DEFAULT 128, 128, 3, 2, 4
#define TC_SMALL 64, 128, 4, 1, 4

extern "C" __global__ void __launch_bounds__(256)
    grouped_gemm_tc_bf16(const bf16_t* __restrict__ x, const unsigned long long* __restrict__ w_ptrs,
                         float* __restrict__ out, const int* __restrict__ offsets,
                         const int* __restrict__ tile_offsets, int E, int N, int K) {
    tc_gemm<TC_DEFAULT>(x, w_ptrs, out, offsets, tile_offsets, E, N, K);
}

extern "C" __global__ void __launch_bounds__(128)
    grouped_gemm_tc_small_bf16(const bf16_t* __restrict__ x, const unsigned long long* __restrict__ w_ptrs,
                               float* __restrict__ out, const int* __restrict__ offsets,
                               const int* __restrict__ tile_offsets, int E, int N, int K) {
    tc_gemm<TC_SMALL>(x, w_ptrs, out, offsets, tile_offsets, E, N, K);
}

extern "C" __global__ void __launch_bounds__(256)
    grouped_gemm_tc_swiglu_bf16(const bf16_t* __restrict__ x, const unsigned long long* __restrict__ w_ptrs,
                                bf16_t* __restrict__ hidden, const int* __restrict__ offsets,
                                const int* __restrict__ tile_offsets, int E, int inter, int K) {
    tc_gemm_swiglu<TC_DEFAULT>(x, w_ptrs, hidden, offsets, tile_offsets, E, inter, K);
}

extern "C" __global__ void __launch_bounds__(128)
    grouped_gemm_tc_swiglu_small_bf16(const bf16_t* __restrict__ x, const unsigned long long* __restrict__ w_ptrs,
                                      bf16_t* __restrict__ hidden, const int* __restrict__ offsets,
                                      const int* __restrict__ tile_offsets, int E, int inter, int K) {
    tc_gemm_swiglu<TC_SMALL>(x, w_ptrs, hidden, offsets, tile_offsets, E, inter, K);
}
