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
//! A hybrid model's linear-attention layers keep a recurrent state per sequence instead, which
//! summarises the whole prefix; see [`crate::kv_states`] for its slots and how its prefixes are
//! cached (a snapshot of the state at a page boundary travels with that page).

use crate::error::{ModelError, Result};
use std::collections::{BTreeMap, HashMap};

/// The identity of a full page's contents (see [`crate::prefix::page_keys`]).
pub type PageKey = u128;

/// Pages of `page_size` token slots: free, used by sequences, or cached for reuse.
#[derive(Debug)]
pub struct PageAllocator {
    page_size: usize,
    num_pages: usize,
    pub(crate) free: Vec<u32>,
    /// Sequences holding each page.
    refs: Vec<u32>,
    /// The key a page is published under.
    pub(crate) key_of: Vec<Option<PageKey>>,
    index: HashMap<PageKey, u32>,
    /// Published pages nobody holds, by when they were last released (oldest first).
    pub(crate) lru: BTreeMap<u64, u32>,
    tick_of: Vec<u64>,
    tick: u64,
    evicted: u64,
    /// Recurrent state slots; `None` when the model has no linear-attention layers.
    pub(crate) states: Option<crate::state_pool::StatePool>,
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
            states: None,
        }
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
        if let (Some(pool), None) = (&mut self.states, seq.state) {
            seq.state = Some(pool.pairs.pop().ok_or(ModelError::NoStateSlot)?);
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
        self.unpublish(page);
        Some(page)
    }

    /// Takes a published page out of the index (and frees its state snapshot).
    pub(crate) fn unpublish(&mut self, page: u32) {
        if let Some(key) = self.key_of[page as usize].take() {
            self.index.remove(&key);
        }
        if let Some(pool) = &mut self.states {
            pool.drop_snapshot(page);
        }
        self.evicted += 1;
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
        if let Some(pool) = &mut self.states {
            pool.release(seq.state.take(), seq.checkpoint.take());
            seq.resume_from = None;
        }
    }

    /// Starts an empty `seq` with the longest run of published pages matching `keys` (the keys
    /// of its first full pages, in order); returns how many tokens they hold.
    pub fn reuse(&mut self, seq: &mut SequenceCache, keys: &[PageKey]) -> usize {
        debug_assert!(seq.pages.is_empty());
        // A hybrid model resumes only from a page whose state snapshot it has.
        let keys = match &self.states {
            Some(pool) => &keys[..pool.resumable(keys.iter().map(|k| self.index.get(k).copied()))],
            None => keys,
        };
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
        if let (Some(pool), Some(&last)) = (&self.states, seq.pages.last()) {
            seq.resume_from = pool.snapshot_of(last);
        }
        seq.len
    }

    /// Publishes `seq`'s full pages that hold written tokens under `keys` (one per page, in
    /// order), so later sequences can reuse them. A key already published elsewhere keeps its
    /// page (this one then stays private and is freed when released). A hybrid model publishes
    /// the pages up to its state snapshot, which goes with the last of them.
    pub fn publish(&mut self, seq: &mut SequenceCache, keys: &[PageKey]) {
        let full = match &self.states {
            Some(_) => match seq.checkpoint {
                Some((_, len)) => len / self.page_size,
                None => return,
            },
            None => seq.len / self.page_size,
        };
        for (&p, &key) in seq.pages.iter().zip(keys).take(full) {
            let i = p as usize;
            if self.key_of[i].is_none() && !self.index.contains_key(&key) {
                self.key_of[i] = Some(key);
                self.index.insert(key, p);
            }
        }
        if self.states.is_some() {
            let last = full.checked_sub(1).and_then(|i| Some((*seq.pages.get(i)?, *keys.get(i)?)));
            self.attach_checkpoint(seq, last);
        }
    }
}

/// One sequence's view of the cache: its pages and how many tokens they hold, and for a hybrid
/// model its recurrent state slots (see [`crate::kv_states`]).
#[derive(Clone, Debug, Default)]
pub struct SequenceCache {
    pub pages: Vec<u32>,
    pub len: usize,
    /// `[read, write]` state slots.
    pub state: Option<[u32; 2]>,
    /// A cached prefix's state snapshot that the first step reads instead of `state[0]`.
    pub resume_from: Option<u32>,
    /// A snapshot of this sequence's state after `len` tokens (a page boundary), not yet handed
    /// to the prefix cache: `(slot, len)`.
    pub checkpoint: Option<(u32, usize)>,
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
        a.publish(&mut first, &[1, 2, 3]);
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
    fn a_page_in_use_is_never_evicted() {
        let mut a = PageAllocator::new(3, 2);
        let mut s = SequenceCache::default();
        a.reserve(&mut s, 4).unwrap();
        s.len = 4;
        a.publish(&mut s, &[7, 8]);
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
