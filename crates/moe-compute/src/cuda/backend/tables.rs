//! The host-side half of the CUDA backend: the small index tables every launch needs, built from
//! what the model hands the backend (expert plans, attention sequences and page tables, the
//! per-row LoRA closures), plus the bf16 conversion of f32 checkpoints and the device-memory
//! arithmetic. None of this touches the device, so it is tested here without a GPU.

use crate::{AttentionSeq, ComputeError, ExpertPlan, Result};

/// Round-to-nearest-even bf16 bits of `v` (NaN stays NaN), as torch and the kernels round.
pub fn to_bf16(v: f32) -> u16 {
    let u = v.to_bits();
    if (u & 0x7fff_ffff) > 0x7f80_0000 {
        return ((u >> 16) | 0x40) as u16;
    }
    ((u + 0x7fff + ((u >> 16) & 1)) >> 16) as u16
}

/// Where each new row's k/v goes and which sequence and position each row attends as.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AttentionTables {
    /// KV slot (page * page_size + offset) of each row.
    pub slot_of_row: Vec<i32>,
    pub row_seq: Vec<i32>,
    /// Position of each row in its sequence (it attends keys 0..=pos).
    pub row_pos: Vec<i32>,
    /// Where each sequence's pages start in the flat page table.
    pub seq_page_start: Vec<i32>,
}

impl AttentionTables {
    /// Checks every page id and that each sequence's pages cover its tokens (the same errors as
    /// the CPU backend), then lays out the tables.
    pub fn build(
        rows: usize,
        seqs: &[AttentionSeq],
        page_table: &[u32],
        page_size: usize,
        num_pages: usize,
    ) -> Result<Self> {
        let mut t = Self {
            slot_of_row: vec![-1; rows],
            row_seq: vec![0; rows],
            row_pos: vec![0; rows],
            seq_page_start: Vec::with_capacity(seqs.len()),
        };
        for (i, s) in seqs.iter().enumerate() {
            let pages = page_table
                .get(s.pages.clone())
                .ok_or(ComputeError::PagesTooFew { needed: s.start_pos + s.rows.len(), have: 0 })?;
            if let Some(&page) = pages.iter().find(|&&p| p as usize >= num_pages) {
                return Err(ComputeError::BadPage { page, num_pages });
            }
            let needed = s.start_pos + s.rows.len();
            if needed > pages.len() * page_size {
                return Err(ComputeError::PagesTooFew { needed, have: pages.len() * page_size });
            }
            if s.rows.end > rows {
                return Err(ComputeError::Cuda(format!("sequence rows {:?} outside the batch of {rows}", s.rows)));
            }
            t.seq_page_start.push(s.pages.start as i32);
            for (j, r) in s.rows.clone().enumerate() {
                let pos = s.start_pos + j;
                t.slot_of_row[r] = (pages[pos / page_size] as usize * page_size + pos % page_size) as i32;
                t.row_seq[r] = i as i32;
                t.row_pos[r] = pos as i32;
            }
        }
        Ok(t)
    }
}

/// The expert call as tables: which input row each slot (a (row, expert) pair in expert order)
/// reads, and for each output row its slots in ascending expert order with their weights, so
/// the combine adds experts in the same order as the CPU backend.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ExpertTables {
    pub row_of_slot: Vec<i32>,
    pub expert_of_slot: Vec<u32>,
    /// `[rows, k]`, -1 where a row has fewer than `k` pairs.
    pub slot_of_pair: Vec<i32>,
    pub weight_of_pair: Vec<f32>,
    pub k: usize,
}

impl ExpertTables {
    pub fn build(plan: &ExpertPlan, rows: usize) -> Self {
        let slots = plan.rows.len();
        let mut per_row = vec![0usize; rows];
        for &r in &plan.rows {
            if let Some(n) = per_row.get_mut(r as usize) {
                *n += 1;
            }
        }
        let k = per_row.iter().copied().max().unwrap_or(0);
        let mut t = Self {
            row_of_slot: plan.rows.iter().map(|&r| r as i32).collect(),
            expert_of_slot: Vec::with_capacity(slots),
            slot_of_pair: vec![-1; rows * k],
            weight_of_pair: vec![0.0; rows * k],
            k,
        };
        let mut filled = vec![0usize; rows];
        for e in 0..plan.num_experts() {
            for s in plan.offsets[e]..plan.offsets[e + 1] {
                t.expert_of_slot.push(e as u32);
                let r = plan.rows[s] as usize;
                if r < rows {
                    let j = r * k + filled[r];
                    t.slot_of_pair[j] = s as i32;
                    t.weight_of_pair[j] = plan.weights[s];
                    filled[r] += 1;
                }
            }
        }
        t
    }
}

/// Rows of a batched LoRA call as a BGMV index table: each distinct pair (by identity) once, in
/// order of first use, and for each row the index of its pair or -1.
pub struct LoraTable<'l, T> {
    pub row_adapter: Vec<i32>,
    pub pairs: Vec<&'l T>,
}

impl<'l, T> LoraTable<'l, T> {
    pub fn build(rows: usize, pair_of: impl Fn(usize) -> Option<&'l T>) -> Self {
        let mut pairs: Vec<&'l T> = Vec::new();
        let row_adapter = (0..rows)
            .map(|r| match pair_of(r) {
                None => -1,
                Some(p) => match pairs.iter().position(|q| std::ptr::eq(*q, p)) {
                    Some(i) => i as i32,
                    None => {
                        pairs.push(p);
                        pairs.len() as i32 - 1
                    }
                },
            })
            .collect();
        Self { row_adapter, pairs }
    }
}

/// Refuses an allocation of `need` bytes for `what` when the device has less free memory,
/// naming the numbers (MiB), instead of failing half-way through loading.
pub fn ensure_fits(what: &str, need: usize, free: usize, total: usize, device: &str) -> Result<()> {
    if need <= free {
        return Ok(());
    }
    Err(ComputeError::Cuda(format!(
        "{what} needs {} MiB but {device} has {} MiB free of {} MiB; use a smaller KV budget, fewer experts \
         per worker, or a larger GPU",
        need.div_ceil(1 << 20),
        free >> 20,
        total >> 20
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounds_to_nearest_even_and_keeps_nan() {
        assert_eq!(to_bf16(1.0), 0x3f80);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to even (1.0).
        assert_eq!(to_bf16(1.0 + 1.0 / 256.0), 0x3f80);
        assert_eq!(to_bf16(1.0 + 3.0 / 256.0), 0x3f82);
        assert_eq!(to_bf16(-2.5), 0xc020);
        assert!(f32::from_bits((to_bf16(f32::NAN) as u32) << 16).is_nan());
        assert_eq!(to_bf16(f32::INFINITY), 0x7f80);
    }

    #[test]
    fn attention_tables_place_rows_in_their_pages() {
        // Two sequences: 3 cached + 2 new in pages [5, 2]; 1 new in page [0]. Page size 4.
        let seqs = vec![
            AttentionSeq { rows: 0..2, start_pos: 3, pages: 0..2 },
            AttentionSeq { rows: 2..3, start_pos: 0, pages: 2..3 },
        ];
        let t = AttentionTables::build(3, &seqs, &[5, 2, 0], 4, 8).unwrap();
        assert_eq!(t.slot_of_row, vec![5 * 4 + 3, 2 * 4, 0]);
        assert_eq!(t.row_seq, vec![0, 0, 1]);
        assert_eq!(t.row_pos, vec![3, 4, 0]);
        assert_eq!(t.seq_page_start, vec![0, 2]);
        // A page outside the store and too few pages are refused, as on the CPU.
        assert!(matches!(
            AttentionTables::build(3, &seqs, &[5, 9, 0], 4, 8),
            Err(ComputeError::BadPage { page: 9, .. })
        ));
        let short = vec![AttentionSeq { rows: 0..2, start_pos: 3, pages: 0..1 }];
        assert!(matches!(
            AttentionTables::build(2, &short, &[5], 4, 8),
            Err(ComputeError::PagesTooFew { needed: 5, have: 4 })
        ));
    }

    #[test]
    fn expert_tables_combine_in_ascending_expert_order() {
        let mut plan = ExpertPlan::default();
        // row 0 -> experts 2, 0; row 1 -> expert 0; row 2 -> experts 1, 2.
        plan.rebuild_from(3, [(0u32, 2u32, 0.7f32), (0, 0, 0.3), (1, 0, 1.0), (2, 1, 0.4), (2, 2, 0.6)].into_iter());
        let t = ExpertTables::build(&plan, 3);
        assert_eq!(t.row_of_slot, vec![0, 1, 2, 0, 2]);
        assert_eq!(t.expert_of_slot, vec![0, 0, 1, 2, 2]);
        assert_eq!(t.k, 2);
        assert_eq!(t.slot_of_pair, vec![0, 3, 1, -1, 2, 4]);
        assert_eq!(t.weight_of_pair, vec![0.3, 0.7, 1.0, 0.0, 0.4, 0.6]);
        // No rows routed: nothing to combine.
        let mut empty = ExpertPlan::default();
        empty.rebuild(3, 2, &[]);
        let t = ExpertTables::build(&empty, 0);
        assert_eq!((t.k, t.slot_of_pair.len()), (0, 0));
    }

    #[test]
    fn lora_table_names_each_pair_once_in_order_of_first_use() {
        let (a, b) = (1u8, 2u8);
        let by_row = [Some(&b), None, Some(&a), Some(&b), None];
        let t = LoraTable::build(5, |r| by_row[r]);
        assert_eq!(t.row_adapter, vec![0, -1, 1, 0, -1]);
        assert_eq!(t.pairs.len(), 2);
        assert!(std::ptr::eq(t.pairs[0], &b) && std::ptr::eq(t.pairs[1], &a));
        // Equal values at different addresses are different adapters.
        let (c, d) = (3u8, 3u8);
        let t = LoraTable::build(2, |r| Some(if r == 0 { &c } else { &d }));
        assert_eq!(t.row_adapter, vec![0, 1]);
    }

    #[test]
    fn memory_check_names_the_numbers() {
        assert!(ensure_fits("weights", 10 << 20, 20 << 20, 80 << 20, "cuda:0").is_ok());
        let e = ensure_fits("KV cache", 30 << 20, 20 << 20, 80 << 20, "cuda:0").unwrap_err().to_string();
        assert!(e.contains("KV cache needs 30 MiB") && e.contains("20 MiB free of 80 MiB"), "{e}");
    }
}
