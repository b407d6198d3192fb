// Expert selection from gate logits (which already include any tenant LoRA term, added by
// lora_expand_f32 into the same buffer): softmax over all experts in f32, the top k by
// probability (ties to the lower index, as torch.topk on CPU; NaN never wins), then optional
// renormalization over the chosen k (always for Mixtral, norm_topk_prob for the others).
// One warp per row; up to 1024 experts. An expert is never chosen twice: when only NaN logits
// are left, the lowest unchosen expert is taken with weight 0. Slots past the number of experts
// (k > experts) get expert -1 and weight 0.

extern "C" __global__ void topk_gating_f32(const float* __restrict__ logits, int rows, int experts, int k,
                                           int renormalize, int* __restrict__ out_experts,
                                           float* __restrict__ out_weights) {
    const int lane = threadIdx.x & 31;
    const long row = (long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return;
    const float* l = logits + row * experts;
    float m = -INFINITY;
    for (int e = lane; e < experts; e += 32) m = fmaxf(m, l[e]);
    m = warp_max(m);
    float sum = 0.0f;
    for (int e = lane; e < experts; e += 32) {
        const float v = l[e];
        if (v == v) sum += __expf(v - m);  // a NaN logit is never chosen nor counted
    }
    sum = warp_sum(sum);
    unsigned int chosen = 0;  // bit i: expert lane + 32 * i already taken
    float total = 0.0f;
    for (int slot = 0; slot < k; ++slot) {
        if (slot >= experts) {
            if (lane == 0) {
                out_experts[row * k + slot] = -1;
                out_weights[row * k + slot] = 0.0f;
            }
            continue;
        }
        float best = -INFINITY;
        int best_e = 0x7fffffff, free_e = 0x7fffffff;
        for (int i = 0, e = lane; e < experts; ++i, e += 32) {
            float v = l[e];
            if ((chosen >> i) & 1u) continue;
            if (e < free_e) free_e = e;
            if (v != v) continue;
            if (v > best || (v == best && e < best_e)) {
                best = v;
                best_e = e;
            }
        }
        for (int o = 16; o > 0; o >>= 1) {
            float ov = __shfl_xor_sync(0xffffffffu, best, o);
            int oe = __shfl_xor_sync(0xffffffffu, best_e, o);
            free_e = min(free_e, __shfl_xor_sync(0xffffffffu, free_e, o));
            if (ov > best || (ov == best && oe < best_e)) {
                best = ov;
                best_e = oe;
            }
        }
        if (best_e == 0x7fffffff) best_e = free_e;  // only NaN left: the lowest unchosen expert
        if ((best_e & 31) == lane) chosen |= 1u << (best_e >> 5);
        const float lv = l[best_e];
        float p = (lv == lv && sum > 0.0f) ? __expf(lv - m) / sum : 0.0f;
        total += p;
        if (lane == 0) {
            out_experts[row * k + slot] = best_e;
            out_weights[row * k + slot] = p;
        }
    }
    if (renormalize && lane == 0 && total > 0.0f) {
        for (int slot = 0; slot < k; ++slot) out_weights[row * k + slot] /= total;
    }
}
