//! The expert plan: which rows go to which expert and with what combine weight, grouped by expert
//! (compressed rows), so the expert FFN runs as one matrix multiply per expert.

/// Rows grouped by expert. Expert `e`'s rows are `rows[offsets[e]..offsets[e+1]]` with the same
/// range of `weights`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ExpertPlan {
    pub offsets: Vec<usize>,
    pub rows: Vec<u32>,
    pub weights: Vec<f32>,
    cursor: Vec<usize>,
}

impl ExpertPlan {
    /// Builds the plan from per-row choices (`choices[r*k + j] = (expert, weight)`), reusing this
    /// plan's buffers. Rows keep ascending order within each expert.
    pub fn rebuild(&mut self, num_experts: usize, k: usize, choices: &[(u32, f32)]) {
        let k = k.max(1);
        self.rebuild_from(num_experts, choices.iter().enumerate().map(|(i, &(e, w))| ((i / k) as u32, e, w)));
    }

    /// Builds the plan from `(row, expert, weight)` entries in row order; every expert must be
    /// below `num_experts` (callers validate).
    pub fn rebuild_from(&mut self, num_experts: usize, entries: impl Iterator<Item = (u32, u32, f32)> + Clone) {
        self.offsets.clear();
        self.offsets.resize(num_experts + 1, 0);
        for (_, e, _) in entries.clone() {
            self.offsets[e as usize + 1] += 1;
        }
        for e in 0..num_experts {
            self.offsets[e + 1] += self.offsets[e];
        }
        let total = self.offsets[num_experts];
        self.rows.clear();
        self.rows.resize(total, 0);
        self.weights.clear();
        self.weights.resize(total, 0.0);
        self.cursor.clear();
        self.cursor.extend_from_slice(&self.offsets[..num_experts]);
        for (row, e, w) in entries {
            let slot = &mut self.cursor[e as usize];
            self.rows[*slot] = row;
            self.weights[*slot] = w;
            *slot += 1;
        }
    }

    pub fn num_experts(&self) -> usize {
        self.offsets.len().saturating_sub(1)
    }

    /// The rows and weights routed to expert `e`.
    pub fn expert(&self, e: usize) -> (&[u32], &[f32]) {
        let r = self.offsets[e]..self.offsets[e + 1];
        (&self.rows[r.clone()], &self.weights[r])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_rows_by_expert() {
        let mut plan = ExpertPlan::default();
        // row 0 -> experts 2, 0; row 1 -> experts 0, 1
        plan.rebuild(3, 2, &[(2, 0.7), (0, 0.3), (0, 0.6), (1, 0.4)]);
        assert_eq!(plan.expert(0), (&[0u32, 1][..], &[0.3f32, 0.6][..]));
        assert_eq!(plan.expert(1), (&[1u32][..], &[0.4f32][..]));
        assert_eq!(plan.expert(2), (&[0u32][..], &[0.7f32][..]));
    }
}
