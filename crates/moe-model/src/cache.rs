//! A model's KV cache: the backend store laid out for its attention kind (full heads, or one
//! latent row per token read as keys and values), only for the layers that keep pages, with the
//! recurrent state slots of a hybrid model's linear-attention layers beside them.

use crate::error::Result;
use crate::kv::PageAllocator;
use crate::model::{KvCache, Model};
use moe_compute::{Backend, KvLayout, StateLayout};

impl<B: Backend> Model<B> {
    /// A KV cache of `num_pages` pages of `page_size` tokens.
    pub fn kv_cache(&self, num_pages: usize, page_size: usize) -> Result<KvCache<B>> {
        self.kv_cache_for(num_pages, page_size, num_pages)
    }

    /// [`Self::kv_cache`] for at most `max_sequences` sequences at once: a hybrid model keeps
    /// two recurrent state slots per sequence beside the pages (each sequence holds a page, so
    /// never more than `num_pages`), and as many state snapshots for the prefix cache.
    pub fn kv_cache_for(&self, num_pages: usize, page_size: usize, max_sequences: usize) -> Result<KvCache<B>> {
        let c = &self.config;
        let pairs = max_sequences.clamp(1, num_pages.max(1));
        let states = c.linear.as_ref().map_or(StateLayout::default(), |l| StateLayout {
            layers: l.count(),
            slots: 3 * pairs,
            floats: l.shape.state_floats(),
        });
        let layout = match &c.latent {
            // One latent row per token, read as both key and value.
            Some(a) => KvLayout {
                layers: c.kv_layers(),
                num_pages,
                page_size,
                n_kv_heads: 1,
                head_dim: a.latent_dim(),
                values_are_keys: true,
                states,
            },
            None => KvLayout {
                layers: c.kv_layers(),
                num_pages,
                page_size,
                n_kv_heads: c.num_kv_heads,
                head_dim: c.head_dim,
                values_are_keys: false,
                states,
            },
        };
        let pages = match c.linear {
            Some(_) => PageAllocator::with_state_pairs(num_pages, page_size, pairs, pairs),
            None => PageAllocator::new(num_pages, page_size),
        };
        Ok(KvCache { store: self.backend.kv_store(layout)?, pages })
    }
}
