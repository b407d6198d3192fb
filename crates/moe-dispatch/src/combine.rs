//! The placement-invariant combine. Workers answer with one row per (row, expert) pair
//! (`weight · expert(row)`); these are kept apart until every pair of the layer is in, then each
//! row's are added in ascending expert order, starting from zero. That is exactly the order and
//! the arithmetic of the model's own grouped expert kernel, so a token's MoE output is the same
//! bits whichever worker, replica, hedge or failover round produced each of its experts, and
//! however the experts are spread over workers.

/// One layer's per-(row, expert) results, by the row's position among its top-k choices.
#[derive(Default)]
pub(crate) struct Contributions {
    k: usize,
    cols: usize,
    values: Vec<f32>,
    filled: Vec<bool>,
    order: Vec<(u32, usize)>,
}

impl Contributions {
    /// Empties the table for `rows` rows of `k` choices of `cols` values (keeps capacity).
    pub(crate) fn reset(&mut self, rows: usize, k: usize, cols: usize) {
        self.k = k.max(1);
        self.cols = cols;
        self.values.clear();
        self.values.resize(rows * self.k * cols, 0.0);
        self.filled.clear();
        self.filled.resize(rows * self.k, false);
    }

    /// Stores the result of (`row`, `expert`); `choices` are the layer's `(expert, weight)` per
    /// row, `k` each. A pair the row did not choose is ignored.
    pub(crate) fn put(&mut self, choices: &[(u32, f32)], row: u32, expert: u32, value: &[f32]) {
        let base = row as usize * self.k;
        let Some(j) = choices.get(base..base + self.k).and_then(|c| c.iter().position(|&(e, _)| e == expert)) else {
            return;
        };
        let slot = base + j;
        if let Some(dst) = self.values.get_mut(slot * self.cols..(slot + 1) * self.cols) {
            dst.copy_from_slice(&value[..self.cols]);
            self.filled[slot] = true;
        }
    }

    /// `out[r] += Σ` of row r's stored results in ascending expert order (`out` is zeroed by the
    /// caller, as the model's own kernel starts from zero).
    pub(crate) fn sum_into(&mut self, choices: &[(u32, f32)], out: &mut [f32]) {
        let (k, cols) = (self.k, self.cols);
        for (r, acc) in out.chunks_exact_mut(cols).enumerate() {
            self.order.clear();
            for j in 0..k {
                let slot = r * k + j;
                if self.filled.get(slot).copied().unwrap_or(false) {
                    self.order.push((choices[slot].0, slot));
                }
            }
            self.order.sort_unstable();
            for &(_, slot) in &self.order {
                for (a, v) in acc.iter_mut().zip(&self.values[slot * cols..(slot + 1) * cols]) {
                    *a += v;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_add_their_experts_in_ascending_order_whatever_the_arrival() {
        // One row, experts 5, 1, 3 (top-3 order); values chosen so that order matters in f32.
        let choices = [(5u32, 0.2f32), (1, 0.5), (3, 0.3)];
        let vals = [[1.0f32], [1.0e8], [-1.0e8]]; // experts 5, 1, 3
        assert_ne!(((0.0f32 + 1.0) + 1.0e8) + -1.0e8, 1.0, "the test's values must depend on order");
        let want = ((0.0f32 + vals[1][0]) + vals[2][0]) + vals[0][0]; // experts 1, 3, 5
        for arrival in [[0usize, 1, 2], [2, 1, 0], [1, 2, 0]] {
            let mut c = Contributions::default();
            c.reset(1, 3, 1);
            for i in arrival {
                c.put(&choices, 0, choices[i].0, &vals[i]);
            }
            let mut out = [0.0f32];
            c.sum_into(&choices, &mut out);
            assert_eq!(out[0].to_bits(), want.to_bits(), "arrival {arrival:?}");
        }
    }

    #[test]
    fn missing_and_unknown_pairs_are_left_out() {
        let choices = [(0u32, 0.5f32), (1, 0.5), (2, 0.5), (3, 0.5)];
        let mut c = Contributions::default();
        c.reset(2, 2, 2);
        c.put(&choices, 0, 1, &[1.0, 2.0]);
        c.put(&choices, 1, 9, &[5.0, 5.0]); // not a choice of row 1
        let mut out = [0.0f32; 4];
        c.sum_into(&choices, &mut out);
        assert_eq!(out, [1.0, 2.0, 0.0, 0.0]);
    }
}
