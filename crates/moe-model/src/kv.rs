//! Bookkeeping of the paged KV cache: which pages are free, which pages, in order, hold each
//! sequence's keys and values, and which full pages are kept for reuse by later requests with
//! the same prefix (automatic prefix caching). The page memory itself belongs to the backend
//! ([`moe_compute::Backend::KvStore`]).
//!
//! A full page can be *published* under a [`PageKey`] (see [`crate::prefix`]: a hash chain of the
//! tokens up to and including the page, the adapter and the isolation scope). Pages are
//! reference-counted: a page some sequence uses is never evicted nor handed out; a published
//! page nobody uses waits in an LRU list and is evicted (unpublished and reused) only when a
//! reservation finds no free page. Only full pages are ever shared, so a sequence writes only to
//! pages it alone holds.
//!
//! A hybrid model's linear-attention layers keep a recurrent state per sequence instead: the
//! allocator also hands out pairs of state slots (one read, one written by a step, swapped when
//! the step completes), taken at the first reservation and given back on release. Their states
//! summarise whole prefixes, so pages of such a model are neither published nor reused.

use crate::error::{ModelError, Result};
use std::collections::{BTreeMap, HashMap};

/// The identity of a full page's contents (see [`crate::prefix::page_keys`]).
pub type PageKey = u128;

/// Pages of `page_size` token slots: free, used by sequences, or cached for reuse.
#[derive(Debug)]
pub struct PageAllocator {
    page_size: usize,
    num_pages: usize,
    free: Vec<u32>,
    /// Sequences holding each page.
    refs: Vec<u32>,
    /// The key a page is published under.
    key_of: Vec<Option<PageKey>>,
    index: HashMap<PageKey, u32>,
    /// Published pages nobody holds, by when they were last released (oldest first).
    lru: BTreeMap<u64, u32>,
    tick_of: Vec<u64>,
    tick: u64,
    evicted: u64,
    /// Free pairs of recurrent state slots; `None` when the model has no linear-attention layers.
    state_pairs: Option<Vec<[u32; 2]>>,
}

impl PageAllocator {
    pub fn new(num_pages: usize, page_size: usize) -> Self {
        Self {
            page_size: page_size.max(1),
            num_pages,
            free: (0..num_pages as u32).rev().collect(),
            refs: vec![0; num_pages],
            key_of: vec![None; num_pages],
            index: HashMap::new(),
            lru: BTreeMap::new(),
            tick_of: vec![0; num_pages],
            tick: 0,
            evicted: 0,
            state_pairs: None,
        }
    }

    /// An allocator that also hands each sequence one pair of recurrent state slots, out of
    /// `pairs` (slots `2i` and `2i + 1`).
    pub fn with_state_pairs(num_pages: usize, page_size: usize, pairs: usize) -> Self {
        let mut a = Self::new(num_pages, page_size);
        a.state_pairs = Some((0..pairs as u32).rev().map(|i| [2 * i, 2 * i + 1]).collect());
        a
    }

    /// Whether sequences keep recurrent states (and pages are therefore never shared).
    pub fn keeps_states(&self) -> bool {
        self.state_pairs.is_some()
    }

    pub fn page_size(&self) -> usize {
        self.page_size
    }

    pub fn num_pages(&self) -> usize {
        self.num_pages
    }

    /// Pages a reservation can take: free ones and cached ones nobody holds (evictable).
    pub fn free_pages(&self) -> usize {
        self.free.len() + self.lru.len()
    }

    /// Pages some sequence holds.
    pub fn referenced_pages(&self) -> usize {
        self.refs.iter().filter(|&&r| r > 0).count()
    }

    /// Published pages (held or not).
    pub fn cached_pages(&self) -> usize {
        self.index.len()
    }

    /// Published pages nobody holds (evicted first when pages run out).
    pub fn evictable_pages(&self) -> usize {
        self.lru.len()
    }

    /// Cached pages evicted to make room so far.
    pub fn evicted_pages(&self) -> u64 {
        self.evicted
    }

    /// Grows `seq` so it can hold `new_len` tokens; all-or-nothing. Takes free pages first,
    /// then evicts the least recently released cached pages.
    pub fn reserve(&mut self, seq: &mut SequenceCache, new_len: usize) -> Result<()> {
        let need = new_len.div_ceil(self.page_size).saturating_sub(seq.pages.len());
        if need > self.free_pages() {
            return Err(ModelError::KvCacheFull { needed: need, free: self.free_pages() });
        }
        if let (Some(pairs), None) = (&mut self.state_pairs, seq.state) {
            seq.state = Some(pairs.pop().ok_or(ModelError::NoStateSlot)?);
        }
        for _ in 0..need {
            let page = match self.free.pop() {
                Some(p) => Some(p),
                None => self.evict_oldest(),
            };
            if let Some(p) = page {
                self.refs[p as usize] = 1;
                seq.pages.push(p);
            }
        }
        Ok(())
    }

    fn evict_oldest(&mut self) -> Option<u32> {
        let (_, page) = self.lru.pop_first()?;
        if let Some(key) = self.key_of[page as usize].take() {
            self.index.remove(&key);
        }
        self.evicted += 1;
        Some(page)
    }

    /// Lets go of all of `seq`'s pages and empties it: pages nobody else holds become free, or
    /// evictable when they are published.
    pub fn release(&mut self, seq: &mut SequenceCache) {
        for p in seq.pages.drain(..).rev() {
            let i = p as usize;
            self.refs[i] = self.refs[i].saturating_sub(1);
            if self.refs[i] == 0 {
                if self.key_of[i].is_some() {
                    self.tick += 1;
                    self.tick_of[i] = self.tick;
                    self.lru.insert(self.tick, p);
                } else {
                    self.free.push(p);
                }
            }
        }
        seq.len = 0;
        if let (Some(pairs), Some(pair)) = (&mut self.state_pairs, seq.state.take()) {
            pairs.push(pair);
        }
    }

    /// Starts an empty `seq` with the longest run of published pages matching `keys` (the keys
    /// of its first full pages, in order); returns how many tokens they hold.
    pub fn reuse(&mut self, seq: &mut SequenceCache, keys: &[PageKey]) -> usize {
        debug_assert!(seq.pages.is_empty());
        if self.keeps_states() {
            return 0;
        }
        for key in keys {
            let Some(&p) = self.index.get(key) else { break };
            let i = p as usize;
            if self.refs[i] == 0 {
                self.lru.remove(&self.tick_of[i]);
            }
            self.refs[i] += 1;
            seq.pages.push(p);
        }
        seq.len = seq.pages.len() * self.page_size;
        seq.len
    }

    /// Publishes `seq`'s full pages that hold written tokens under `keys` (one per page, in
    /// order), so later sequences can reuse them. A key already published elsewhere keeps its
    /// page (this one then stays private and is freed when released).
    pub fn publish(&mut self, seq: &SequenceCache, keys: &[PageKey]) {
        if self.keeps_states() {
            return;
        }
        let full = seq.len / self.page_size;
        for (&p, &key) in seq.pages.iter().zip(keys).take(full) {
            let i = p as usize;
            if self.key_of[i].is_none() && !self.index.contains_key(&key) {
                self.key_of[i] = Some(key);
                self.index.insert(key, p);
            }
        }
    }
}

/// One sequence's view of the cache: its pages and how many tokens they hold, and for a hybrid
/// model its pair of recurrent state slots (`[read, write]`).
#[derive(Clone, Debug, Default)]
pub struct SequenceCache {
    pub pages: Vec<u32>,
    pub len: usize,
    pub state: Option<[u32; 2]>,
}

impl SequenceCache {
    /// Records `tokens` more tokens as cached once a step has computed them: the written state
    /// slot becomes the one the next step reads.
    pub fn advance(&mut self, tokens: usize) {
        self.len += tokens;
        if let Some(pair) = &mut self.state {
            pair.swap(0, 1);
        }
    }

    /// Where a step reads and writes this sequence's recurrent state.
    pub fn state_slots(&self) -> Option<moe_compute::StateSlots> {
        self.state.map(|[read, write]| moe_compute::StateSlots { read, write, fresh: self.len == 0 })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserve_and_release() {
        let mut a = PageAllocator::new(4, 16);
        let mut s = SequenceCache::default();
        a.reserve(&mut s, 17).unwrap();
        assert_eq!(s.pages.len(), 2);
        a.reserve(&mut s, 32).unwrap();
        assert_eq!(s.pages.len(), 2);
        assert!(matches!(a.reserve(&mut s, 100), Err(ModelError::KvCacheFull { needed: 5, free: 2 })));
        assert_eq!(s.pages.len(), 2, "a failed reserve takes nothing");
        a.release(&mut s);
        assert_eq!(a.free_pages(), 4);
        assert_eq!(a.referenced_pages(), 0);
    }

    #[test]
    fn published_pages_are_shared_counted_and_evicted_only_when_unused() {
        let mut a = PageAllocator::new(4, 4);
        let mut first = SequenceCache::default();
        a.reserve(&mut first, 10).unwrap(); // 3 pages
        first.len = 10; // two full pages written
        a.publish(&first, &[1, 2, 3]);
        assert_eq!(a.cached_pages(), 2, "the partial last page is never published");
        // A second sequence with the same first two pages shares them while the first runs.
        let mut second = SequenceCache::default();
        assert_eq!(a.reuse(&mut second, &[1, 2, 9]), 8);
        assert_eq!(second.pages, first.pages[..2]);
        assert_eq!(a.referenced_pages(), 3);
        a.release(&mut first);
        assert_eq!(a.referenced_pages(), 2, "shared pages stay held by the second sequence");
        assert_eq!(a.evictable_pages(), 0);
        a.release(&mut second);
        assert_eq!((a.referenced_pages(), a.evictable_pages(), a.free_pages()), (0, 2, 4));
        // Pressure: a reservation of every page evicts the cached ones (oldest first).
        let mut big = SequenceCache::default();
        a.reserve(&mut big, 16).unwrap();
        assert_eq!((a.cached_pages(), a.evicted_pages()), (0, 2));
        let mut third = SequenceCache::default();
        assert_eq!(a.reuse(&mut third, &[1, 2]), 0, "evicted pages are no longer found");
        a.release(&mut big);
        assert_eq!(a.free_pages(), 4);
    }

    #[test]
    fn state_pairs_follow_sequences_and_pages_are_not_shared() {
        let mut a = PageAllocator::with_state_pairs(8, 4, 2);
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
        // The state summarises the whole prefix: nothing is published or reused.
        a.publish(&s, &[1, 2]);
        assert_eq!(a.cached_pages(), 0);
        a.release(&mut s);
        assert_eq!(s.state, None);
        a.reserve(&mut u, 1).unwrap();
        assert!(u.state.is_some());
        let mut v = SequenceCache::default();
        assert_eq!(a.reuse(&mut v, &[1]), 0);
    }

    #[test]
    fn a_page_in_use_is_never_evicted() {
        let mut a = PageAllocator::new(3, 2);
        let mut s = SequenceCache::default();
        a.reserve(&mut s, 4).unwrap();
        s.len = 4;
        a.publish(&s, &[7, 8]);
        let mut t = SequenceCache::default();
        assert_eq!(a.reuse(&mut t, &[7, 8]), 4);
        a.release(&mut s);
        // Only one page is free; both cached pages are held by `t`.
        let mut u = SequenceCache::default();
        assert!(a.reserve(&mut u, 4).is_err());
        a.reserve(&mut u, 2).unwrap();
        assert_eq!(a.cached_pages(), 2);
        assert!(!u.pages.iter().any(|p| t.pages.contains(p)));
    }
}
