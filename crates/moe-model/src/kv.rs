//! Bookkeeping of the paged KV cache: which pages are free and which pages, in order, hold each
//! sequence's keys and values. The page memory itself belongs to the backend
//! ([`moe_compute::Backend::KvStore`]).

use crate::error::{ModelError, Result};

/// Free list over `num_pages` pages of `page_size` token slots.
#[derive(Debug)]
pub struct PageAllocator {
    page_size: usize,
    free: Vec<u32>,
    num_pages: usize,
}

impl PageAllocator {
    pub fn new(num_pages: usize, page_size: usize) -> Self {
        Self { page_size: page_size.max(1), free: (0..num_pages as u32).rev().collect(), num_pages }
    }

    pub fn page_size(&self) -> usize {
        self.page_size
    }

    pub fn num_pages(&self) -> usize {
        self.num_pages
    }

    pub fn free_pages(&self) -> usize {
        self.free.len()
    }

    /// Grows `seq` so it can hold `new_len` tokens; all-or-nothing.
    pub fn reserve(&mut self, seq: &mut SequenceCache, new_len: usize) -> Result<()> {
        let need = new_len.div_ceil(self.page_size).saturating_sub(seq.pages.len());
        if need > self.free.len() {
            return Err(ModelError::KvCacheFull { needed: need, free: self.free.len() });
        }
        for _ in 0..need {
            if let Some(p) = self.free.pop() {
                seq.pages.push(p);
            }
        }
        Ok(())
    }

    /// Returns all of `seq`'s pages to the free list and empties it.
    pub fn release(&mut self, seq: &mut SequenceCache) {
        self.free.extend(seq.pages.drain(..).rev());
        seq.len = 0;
    }
}

/// One sequence's view of the cache: its pages and how many tokens they hold.
#[derive(Clone, Debug, Default)]
pub struct SequenceCache {
    pub pages: Vec<u32>,
    pub len: usize,
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
    }
}
