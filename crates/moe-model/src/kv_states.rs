//! Recurrent states of a hybrid model's linear-attention layers (Qwen3-Next's gated DeltaNet),
//! kept beside the paged KV cache and handed out by the [`PageAllocator`]:
//!
//! - each running sequence holds a pair of state slots, taken at its first reservation and given
//!   back on release; a step reads one and writes the other, and the two swap only when the step
//!   completes ([`SequenceCache::advance`]), so a failed step leaves the state it started from;
//! - the prefix cache: a state summarises the whole prefix, so a page is only worth reusing
//!   together with the state after its last token. A sequence may *checkpoint* its state at a
//!   page boundary into a snapshot slot ([`PageAllocator::snapshot_slot`]); publishing its pages
//!   up to that boundary attaches the snapshot to the last of them, and a later sequence reuses
//!   the longest published run that ends at a page with a snapshot, reading its first step's
//!   state from that snapshot. Snapshots are freed with their page (eviction) or, unattached,
//!   with their sequence.

use crate::kv::{PageAllocator, PageKey, SequenceCache};
use crate::state_pool::StatePool;

impl PageAllocator {
    /// An allocator that also hands each sequence one pair of recurrent state slots, out of
    /// `pairs`, and keeps up to `snapshots` state snapshots for the prefix cache.
    pub fn with_state_pairs(num_pages: usize, page_size: usize, pairs: usize, snapshots: usize) -> Self {
        let mut a = Self::new(num_pages, page_size);
        a.states = Some(StatePool::new(num_pages, pairs, snapshots));
        a
    }

    /// Whether sequences keep recurrent states (a hybrid model).
    pub fn keeps_states(&self) -> bool {
        self.states.is_some()
    }

    /// A slot for a snapshot of `seq`'s state: its own unattached checkpoint's, a free one, or
    /// one freed by evicting the least recently released cached page that holds a snapshot.
    /// `None` when there is none (the prefix is then not cached).
    pub fn snapshot_slot(&mut self, seq: &mut SequenceCache) -> Option<u32> {
        let pool = self.states.as_mut()?;
        if let Some((slot, _)) = seq.checkpoint.take() {
            return Some(slot);
        }
        if let Some(slot) = pool.snapshots.pop() {
            return Some(slot);
        }
        let (&tick, &page) = self.lru.iter().find(|(_, &p)| pool.snapshot_of(p).is_some())?;
        self.lru.remove(&tick);
        self.unpublish(page);
        self.free.push(page);
        self.states.as_mut()?.snapshots.pop()
    }

    /// Gives back a snapshot slot that was not used.
    pub fn return_snapshot_slot(&mut self, slot: u32) {
        if let Some(pool) = &mut self.states {
            pool.snapshots.push(slot);
        }
    }

    /// After [`PageAllocator::publish`] of a hybrid model's pages up to its checkpoint: the
    /// snapshot goes with the last of them when that page is now published under `key`.
    pub(crate) fn attach_checkpoint(&mut self, seq: &mut SequenceCache, last: Option<(u32, PageKey)>) {
        let Some((page, key)) = last else { return };
        if self.key_of[page as usize] == Some(key) {
            if let Some(pool) = &mut self.states {
                pool.attach(&mut seq.checkpoint, page);
            }
        }
    }
}

impl SequenceCache {
    /// Records `tokens` more tokens as cached once a step has computed them: the written state
    /// slot becomes the one the next step reads.
    pub fn advance(&mut self, tokens: usize) {
        self.len += tokens;
        self.resume_from = None;
        if let Some(pair) = &mut self.state {
            pair.swap(0, 1);
        }
    }

    /// Where a step reads and writes this sequence's recurrent state.
    pub fn state_slots(&self) -> Option<moe_compute::StateSlots> {
        self.state.map(|[read, write]| moe_compute::StateSlots {
            read: self.resume_from.unwrap_or(read),
            write,
            fresh: self.len == 0 && self.resume_from.is_none(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ModelError;

    #[test]
    fn state_pairs_follow_sequences() {
        let mut a = PageAllocator::with_state_pairs(8, 4, 2, 1);
        let (mut s, mut t, mut u) = (SequenceCache::default(), SequenceCache::default(), SequenceCache::default());
        a.reserve(&mut s, 5).unwrap();
        a.reserve(&mut t, 1).unwrap();
        assert_eq!((s.state, t.state), (Some([0, 1]), Some([2, 3])));
        assert!(matches!(a.reserve(&mut u, 1), Err(ModelError::NoStateSlot)));
        assert!(u.pages.is_empty() && u.state.is_none(), "a refused reservation takes nothing");
        let slots = s.state_slots().unwrap();
        assert_eq!((slots.read, slots.write, slots.fresh), (0, 1, true));
        s.advance(5);
        let slots = s.state_slots().unwrap();
        assert_eq!((slots.read, slots.write, slots.fresh), (1, 0, false));
        // Without a checkpoint nothing is published.
        a.publish(&mut s, &[1, 2]);
        assert_eq!(a.cached_pages(), 0);
        a.release(&mut s);
        assert_eq!(s.state, None);
        a.reserve(&mut u, 1).unwrap();
        assert!(u.state.is_some());
    }

    #[test]
    fn prefixes_are_reused_only_up_to_a_page_with_a_snapshot() {
        let mut a = PageAllocator::with_state_pairs(8, 4, 2, 1);
        let mut s = SequenceCache::default();
        a.reserve(&mut s, 12).unwrap();
        s.advance(8);
        // A checkpoint after 8 tokens (two pages); the sequence then runs on.
        let slot = a.snapshot_slot(&mut s).unwrap();
        assert_eq!(slot, 4, "snapshots follow the pairs");
        s.checkpoint = Some((slot, 8));
        s.advance(4);
        a.publish(&mut s, &[10, 20, 30]);
        assert_eq!(a.cached_pages(), 2, "only the pages up to the checkpoint");
        assert_eq!(s.checkpoint, None, "the snapshot went with page 2");
        // A later sequence with the same three pages reuses two and reads the snapshot.
        let mut t = SequenceCache::default();
        assert_eq!(a.reuse(&mut t, &[10, 20, 30]), 8);
        a.reserve(&mut t, 9).unwrap();
        let slots = t.state_slots().unwrap();
        assert_eq!((slots.read, slots.fresh), (4, false));
        t.advance(1);
        assert_ne!(t.state_slots().unwrap().read, 4, "after its first step it reads its own slot");
        a.release(&mut t);
        a.release(&mut s);
        // No free snapshot: taking one evicts the cached page that holds it.
        let mut u = SequenceCache::default();
        a.reserve(&mut u, 4).unwrap();
        assert_eq!(a.snapshot_slot(&mut u), Some(4));
        let mut v = SequenceCache::default();
        assert_eq!(a.reuse(&mut v, &[10, 20]), 0, "the page lost its snapshot with its eviction");
        a.return_snapshot_slot(4);
        a.release(&mut u);
    }
}
