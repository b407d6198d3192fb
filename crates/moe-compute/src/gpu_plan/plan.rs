//! The plan kernel's algorithm (kernels/expert_plan.cu, `expert_plan_f32`), step for step, and
//! the tables it writes. One block of [`PLAN_BLOCK`] threads: a histogram of the chosen experts,
//! an exclusive scan into `offsets`, then a stable scatter of the (row, choice) pairs in chunks
//! of one pair per thread: a pair's slot is its expert's cursor, plus the pairs of that expert in
//! earlier warps of the chunk, plus those in lower lanes of its own warp (`__match_any_sync`).
//! Rows keep ascending order within each expert, so the tables equal the host's
//! [`crate::ExpertPlan`]; the GEMM's tile table follows ([`super::tiles`]).

use super::tiles::GemmTiling;

/// Threads of the plan kernel's one block (pairs per chunk).
pub const PLAN_BLOCK: usize = 1024;
const WARP: usize = 32;

/// The device plan's tables.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DevicePlan {
    /// Expert e's slots are `offsets[e]..offsets[e + 1]`.
    pub offsets: Vec<u32>,
    /// The token row of each slot, and its combine weight.
    pub row_of_slot: Vec<u32>,
    pub weight_of_slot: Vec<f32>,
    /// The slot of pair `row * k + j` (the combine gathers through it).
    pub slot_of_pair: Vec<u32>,
    /// Expert e's GEMM tiles are `tile_offsets[e]..tile_offsets[e + 1]` (see [`GemmTiling::tile_at`]).
    pub tile_offsets: Vec<u32>,
}

/// Builds the plan from the gating kernel's output (`ids[row * k + j]`, every id below
/// `experts`) as the plan kernel does, with the tile table for `n_tiles` column tiles.
pub fn build(experts: usize, k: usize, ids: &[u32], weights: &[f32], tiling: &GemmTiling, n_tiles: u32) -> DevicePlan {
    let k = k.max(1);
    let pairs = ids.len();
    // 1. Histogram (shared-memory atomics on the device: the order does not matter).
    let mut counts = vec![0u32; experts];
    for &e in ids {
        counts[e as usize] += 1;
    }
    // 2. Exclusive scan.
    let mut offsets = vec![0u32; experts + 1];
    for e in 0..experts {
        offsets[e + 1] = offsets[e] + counts[e];
    }
    // 3. Stable scatter, one chunk of PLAN_BLOCK pairs at a time.
    let mut cursor = offsets[..experts].to_vec();
    let mut slot_of_pair = vec![0u32; pairs];
    let mut warp_counts = vec![0u32; PLAN_BLOCK / WARP * experts];
    for chunk in (0..pairs).step_by(PLAN_BLOCK) {
        let end = (chunk + PLAN_BLOCK).min(pairs);
        warp_counts.fill(0);
        // Per warp: each lane's rank among lower lanes of the same expert, and the warp's count.
        let mut rank = vec![0u32; end - chunk];
        for w in 0..(end - chunk).div_ceil(WARP) {
            let lanes = chunk + w * WARP..(chunk + (w + 1) * WARP).min(end);
            for p in lanes.clone() {
                let e = ids[p];
                rank[p - chunk] = ids[lanes.start..p].iter().filter(|&&x| x == e).count() as u32;
                warp_counts[w * experts + e as usize] += 1;
            }
        }
        for p in chunk..end {
            let e = ids[p] as usize;
            let w = (p - chunk) / WARP;
            let earlier: u32 = (0..w).map(|w2| warp_counts[w2 * experts + e]).sum();
            slot_of_pair[p] = cursor[e] + earlier + rank[p - chunk];
        }
        for (e, c) in cursor.iter_mut().enumerate() {
            *c += (0..PLAN_BLOCK / WARP).map(|w| warp_counts[w * experts + e]).sum::<u32>();
        }
    }
    // 4. The slot tables.
    let mut row_of_slot = vec![0u32; pairs];
    let mut weight_of_slot = vec![0f32; pairs];
    for p in 0..pairs {
        row_of_slot[slot_of_pair[p] as usize] = (p / k) as u32;
        weight_of_slot[slot_of_pair[p] as usize] = weights[p];
    }
    let tile_offsets = tiling.tile_offsets(&offsets, n_tiles);
    DevicePlan { offsets, row_of_slot, weight_of_slot, slot_of_pair, tile_offsets }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;
    use crate::ExpertPlan;

    #[test]
    fn equals_the_host_plan_on_skewed_and_uniform_loads() {
        let tiling = GemmTiling::EXPERT_DEFAULT;
        let mut rng = SplitMix64::new(3);
        for (rows, experts, k) in [(1, 8, 2), (37, 8, 2), (600, 64, 8), (2100, 128, 8), (5, 256, 8), (300, 3, 3)] {
            // Half the choices go to one of three hot experts (many duplicates in every warp).
            let mut ids = Vec::new();
            for _ in 0..rows {
                let mut row: Vec<u32> = Vec::new();
                while row.len() < k {
                    let e = if rng.below(2) == 0 { rng.below(3.min(experts)) } else { rng.below(experts) } as u32;
                    if !row.contains(&e) {
                        row.push(e);
                    }
                }
                ids.extend(row);
            }
            let weights: Vec<f32> = (0..ids.len()).map(|_| rng.unit()).collect();
            let plan = build(experts, k, &ids, &weights, &tiling, 3);
            let mut host = ExpertPlan::default();
            let choices: Vec<(u32, f32)> = ids.iter().copied().zip(weights.iter().copied()).collect();
            host.rebuild(experts, k, &choices);
            let offsets: Vec<usize> = plan.offsets.iter().map(|&o| o as usize).collect();
            assert_eq!(offsets, host.offsets, "{rows}x{experts} top-{k}");
            assert_eq!(plan.row_of_slot, host.rows);
            assert_eq!(
                plan.weight_of_slot.iter().map(|w| w.to_bits()).collect::<Vec<_>>(),
                host.weights.iter().map(|w| w.to_bits()).collect::<Vec<_>>()
            );
            for (p, &s) in plan.slot_of_pair.iter().enumerate() {
                assert_eq!(plan.row_of_slot[s as usize] as usize, p / k);
                assert_eq!(ids[p] as usize, offsets.partition_point(|&o| o <= s as usize) - 1);
            }
            let tiles = *plan.tile_offsets.last().unwrap_or(&0);
            assert!(tiles <= tiling.max_tiles(ids.len(), experts, 3));
        }
    }
}
