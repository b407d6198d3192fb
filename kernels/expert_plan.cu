// Routing and the expert plan on the device, so a decode step needs no host round trip per MoE
// layer. The algorithms are the host's, step for step (crates/moe-compute/src/gpu_plan/routing.rs
// and plan.rs are their references, equal to the host's routing and ExpertPlan bit for bit).
//
// gate_route_f32: one warp per row. Scores (softmax over the logits, or sigmoid plus the
// correction bias for the choice), grouped top-k as DeepSeek-V3/GLM-4.5 route, k warp-wide
// arg-maxes (ties to the lower index; NaN counts as -inf), renormalisation and routed scaling.
// The tenant gate LoRA is added to the logits before (lora_expand_f32). Sums run on lane 0 in
// expert order with the canonical exp, so the weights are the host's bits.
// flags: bit 0 sigmoid, bit 1 renormalize. Dynamic shared memory: warps * (2 * E + k) floats
// + warps * E ints.
//
// expert_plan_f32: one block of 1024 threads (gpu_plan::plan::PLAN_BLOCK). Histogram, exclusive
// scan into offsets (and the GEMM's tile table: ceil(count / block_m) * n_tiles tiles per expert),
// then a stable scatter of the (row, choice) pairs in chunks of 1024: slot = the expert's cursor +
// the pairs of that expert in earlier warps of the chunk + those in lower lanes (__match_any_sync).
// Adds each expert's count to `load` (device counters, read back every few steps) when given.
// Dynamic shared memory: (2 + 32) * E ints.

#define ROUTE_WARPS 4
#define NO_EXPERT 0x7fffffff

extern "C" __global__ void __launch_bounds__(ROUTE_WARPS * 32)
    gate_route_f32(const float* __restrict__ logits, const float* __restrict__ bias, int rows, int E, int k, int flags,
                   int n_group, int topk_group, float scaling, int* __restrict__ ids, float* __restrict__ weights) {
    extern __shared__ float route_smem[];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int row = blockIdx.x * ROUTE_WARPS + warp;
    if (row >= rows) return;
    const bool sigmoid = flags & 1, renormalize = flags & 2;
    float* choice = route_smem + warp * (2 * E + k);
    float* score = choice + E;
    float* w = score + E;
    int* taken = reinterpret_cast<int*>(route_smem + ROUTE_WARPS * (2 * E + k)) + warp * E;
    const float* l = logits + (long)row * E;
    for (int e = lane; e < E; e += 32) {
        const float x = gate_logit(l[e]);
        taken[e] = 0;
        if (sigmoid) {
            const float s = sigmoid_canonical(x);
            score[e] = s;
            choice[e] = __fadd_rn(s, bias ? gate_logit(bias[e]) : 0.0f);
        } else {
            choice[e] = x;
        }
    }
    __syncwarp();
    float max = -INFINITY, sum = 0.0f;
    if (!sigmoid) {
        for (int e = lane; e < E; e += 32) max = fmaxf(max, choice[e]);
        max = warp_max(max);
        if (lane == 0)
            for (int e = 0; e < E; ++e) sum = __fadd_rn(sum, exp_canonical(__fsub_rn(choice[e], max)));
    } else if (lane == 0 && n_group > 1 && E % n_group == 0 && topk_group < n_group) {
        // Groups: each scored by the sum of its two best biased scores; the best topk_group stay.
        const int per = E / n_group;
        unsigned long long kept = 0;  // n_group <= 64
        for (int round = 0; round < topk_group; ++round) {
            int best = -1;
            float best_score = 0.0f;
            for (int g = 0; g < n_group; ++g) {
                if (kept >> g & 1ull) continue;
                float a = -INFINITY, b = -INFINITY;
                for (int i = g * per; i < (g + 1) * per; ++i) {
                    const float v = choice[i];
                    if (v > a) {
                        b = a;
                        a = v;
                    } else if (v > b) {
                        b = v;
                    }
                }
                const float s = per >= 2 ? __fadd_rn(a, b) : a;
                if (best < 0 || s > best_score) {
                    best = g;
                    best_score = s;
                }
            }
            if (best >= 0) kept |= 1ull << best;
        }
        for (int g = 0; g < n_group; ++g)
            if (!(kept >> g & 1ull))
                for (int i = g * per; i < (g + 1) * per; ++i) choice[i] = -INFINITY;
    }
    __syncwarp();
    for (int slot = 0; slot < k; ++slot) {
        float bv = -INFINITY;
        int bi = NO_EXPERT;
        for (int e = lane; e < E; e += 32)
            if (!taken[e] && (bi == NO_EXPERT || choice[e] > bv)) {
                bv = choice[e];
                bi = e;
            }
        for (int o = 16; o > 0; o >>= 1) {
            const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
            const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
            if (oi != NO_EXPERT && (bi == NO_EXPERT || ov > bv || (ov == bv && oi < bi))) {
                bv = ov;
                bi = oi;
            }
        }
        const int i = bi == NO_EXPERT ? slot : bi;
        if (lane == 0) {
            if (i < E) taken[i] = 1;
            ids[(long)row * k + slot] = i;
            if (sigmoid)
                w[slot] = i < E ? score[i] : 0.0f;
            else
                w[slot] = (max == -INFINITY || i >= E) ? 0.0f : __fdiv_rn(exp_canonical(__fsub_rn(choice[i], max)), sum);
        }
        __syncwarp();
    }
    if (lane == 0) {
        if (renormalize) {
            float total = 0.0f;
            for (int j = 0; j < k; ++j) total = __fadd_rn(total, w[j]);
            if (sigmoid) {
                total = __fadd_rn(total, 1e-20f);
                for (int j = 0; j < k; ++j) w[j] = __fdiv_rn(w[j], total);
            } else if (total > 0.0f) {
                for (int j = 0; j < k; ++j) w[j] = __fdiv_rn(w[j], total);
            }
        }
        for (int j = 0; j < k; ++j)
            weights[(long)row * k + j] = (sigmoid || scaling != 1.0f) ? __fmul_rn(w[j], scaling) : w[j];
    }
}

extern "C" __global__ void __launch_bounds__(1024)
    expert_plan_f32(const int* __restrict__ ids, const float* __restrict__ weights, int pairs, int k, int E, int block_m,
                    int n_tiles, int* __restrict__ offsets, int* __restrict__ row_of_slot,
                    float* __restrict__ weight_of_slot, int* __restrict__ slot_of_pair, int* __restrict__ tile_offsets,
                    unsigned long long* __restrict__ load) {
    extern __shared__ int plan_smem[];
    int* counts = plan_smem;
    int* cursor = counts + E;
    int* warp_counts = cursor + E;  // [32 warps][E]
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    for (int e = tid; e < E; e += blockDim.x) counts[e] = 0;
    __syncthreads();
    for (int p = tid; p < pairs; p += blockDim.x) {
        const int e = ids[p];
        if (e >= 0 && e < E) atomicAdd(&counts[e], 1);
    }
    __syncthreads();
    if (tid == 0) {
        int at = 0, tiles = 0;
        for (int e = 0; e < E; ++e) {
            offsets[e] = at;
            cursor[e] = at;
            tile_offsets[e] = tiles;
            at += counts[e];
            tiles += (counts[e] + block_m - 1) / block_m * n_tiles;
        }
        offsets[E] = at;
        tile_offsets[E] = tiles;
    }
    if (load)
        for (int e = tid; e < E; e += blockDim.x) atomicAdd(&load[e], (unsigned long long)counts[e]);
    __syncthreads();
    const unsigned int lower = (1u << lane) - 1u;
    for (int chunk = 0; chunk < pairs; chunk += blockDim.x) {
        for (int i = tid; i < 32 * E; i += blockDim.x) warp_counts[i] = 0;
        __syncthreads();
        const int p = chunk + tid;
        const int e = (p < pairs) ? ids[p] : -1;
        const bool valid = e >= 0 && e < E;
        const unsigned int same = __match_any_sync(0xffffffffu, e);
        const int rank = __popc(same & lower);
        if (valid && rank == 0) warp_counts[warp * E + e] = __popc(same);
        __syncthreads();
        if (valid) {
            int slot = cursor[e] + rank;
            for (int w2 = 0; w2 < warp; ++w2) slot += warp_counts[w2 * E + e];
            slot_of_pair[p] = slot;
            row_of_slot[slot] = p / k;
            weight_of_slot[slot] = weights[p];
        }
        __syncthreads();
        for (int e2 = tid; e2 < E; e2 += blockDim.x) {
            int add = 0;
            for (int w2 = 0; w2 < 32; ++w2) add += warp_counts[w2 * E + e2];
            cursor[e2] += add;
        }
        __syncthreads();
    }
}
