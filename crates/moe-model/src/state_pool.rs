//! The free recurrent-state slots of a hybrid model (see `kv_states`): pairs for running
//! sequences, single snapshot slots for the prefix cache, and which cached page holds which
//! snapshot.

/// Free state slots: pairs for running sequences and single snapshot slots, and which page holds
/// which snapshot.
#[derive(Debug)]
pub(crate) struct StatePool {
    pub(crate) pairs: Vec<[u32; 2]>,
    pub(crate) snapshots: Vec<u32>,
    snapshot_of: Vec<Option<u32>>,
}

impl StatePool {
    /// Slots `0..2·pairs` form the pairs, the next `snapshots` slots are snapshots.
    pub(crate) fn new(num_pages: usize, pairs: usize, snapshots: usize) -> Self {
        let base = 2 * pairs as u32;
        Self {
            pairs: (0..pairs as u32).rev().map(|i| [2 * i, 2 * i + 1]).collect(),
            snapshots: (0..snapshots as u32).rev().map(|i| base + i).collect(),
            snapshot_of: vec![None; num_pages],
        }
    }

    /// Takes back a finished sequence's slot pair and unattached checkpoint.
    pub(crate) fn release(&mut self, pair: Option<[u32; 2]>, checkpoint: Option<(u32, usize)>) {
        self.pairs.extend(pair);
        if let Some((slot, _)) = checkpoint {
            self.snapshots.push(slot);
        }
    }

    pub(crate) fn drop_snapshot(&mut self, page: u32) {
        if let Some(slot) = self.snapshot_of.get_mut(page as usize).and_then(Option::take) {
            self.snapshots.push(slot);
        }
    }

    pub(crate) fn snapshot_of(&self, page: u32) -> Option<u32> {
        self.snapshot_of.get(page as usize).copied().flatten()
    }

    /// How many of a sequence's pages it can reuse (`pages`: the published page of each of its
    /// keys in turn, `None` from the first unpublished one): the longest run that ends at a page
    /// with a snapshot.
    pub(crate) fn resumable(&self, pages: impl Iterator<Item = Option<u32>>) -> usize {
        let mut best = 0;
        for (i, page) in pages.enumerate() {
            let Some(page) = page else { break };
            if self.snapshot_of(page).is_some() {
                best = i + 1;
            }
        }
        best
    }

    /// Hands a sequence's `checkpoint` to `page` (just published under the sequence's key),
    /// unless the page has a snapshot already.
    pub(crate) fn attach(&mut self, checkpoint: &mut Option<(u32, usize)>, page: u32) {
        let (Some((slot, _)), Some(entry)) = (*checkpoint, self.snapshot_of.get_mut(page as usize)) else { return };
        if entry.is_none() {
            *entry = Some(slot);
            *checkpoint = None;
        }
    }
}
