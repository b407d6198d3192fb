//! Keys of shared KV pages (automatic prefix caching): page `i` of a sequence is identified by a
//! hash chain over the tokens of pages `0..=i` and a namespace that names everything else that
//! changes the keys and values (the adapter's id and content digest, the tenant when tenants are
//! isolated, and an optional per-request salt). Two sequences share a page only when all of it
//! matches. 128 bits, so an accidental collision is out of reach.

use crate::kv::PageKey;
use std::hash::{Hash, Hasher};

fn hash128(parts: impl Fn(&mut std::collections::hash_map::DefaultHasher)) -> u128 {
    let mut lo = std::collections::hash_map::DefaultHasher::new();
    let mut hi = std::collections::hash_map::DefaultHasher::new();
    0x5eed_u64.hash(&mut hi);
    parts(&mut lo);
    parts(&mut hi);
    ((hi.finish() as u128) << 64) | lo.finish() as u128
}

/// What besides the tokens decides a page's contents.
pub fn namespace(adapter: Option<(&str, &str)>, tenant: Option<&str>, salt: Option<&str>) -> u128 {
    hash128(|h| {
        "moe-prefix-v1".hash(h);
        adapter.hash(h);
        tenant.hash(h);
        salt.hash(h);
    })
}

/// The keys of the first `pages` full pages of `tokens` (`pages * page_size <= tokens.len()`).
pub fn page_keys(namespace: u128, tokens: &[u32], page_size: usize, pages: usize) -> Vec<PageKey> {
    let mut keys = Vec::with_capacity(pages);
    let mut prev = namespace;
    for chunk in tokens.chunks_exact(page_size.max(1)).take(pages) {
        prev = hash128(|h| {
            prev.hash(h);
            chunk.hash(h);
        });
        keys.push(prev);
    }
    keys
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_chain_tokens_and_namespace() {
        let ns = namespace(None, None, None);
        let a = page_keys(ns, &[1, 2, 3, 4, 5, 6, 7], 2, 3);
        assert_eq!(a.len(), 3);
        // Same prefix, different later tokens: the shared pages' keys agree.
        let b = page_keys(ns, &[1, 2, 3, 4, 9, 9], 2, 3);
        assert_eq!(a[..2], b[..2]);
        assert_ne!(a[2], b[2]);
        // A change in an earlier page changes every later key (a chain).
        let c = page_keys(ns, &[0, 2, 3, 4, 5, 6], 2, 3);
        assert!(a.iter().zip(&c).all(|(x, y)| x != y));
        // Adapter (id or digest), tenant and salt each separate the namespaces.
        let others = [
            namespace(Some(("a", "d1")), None, None),
            namespace(Some(("a", "d2")), None, None),
            namespace(None, Some("t"), None),
            namespace(None, None, Some("s")),
        ];
        for o in others {
            assert_ne!(page_keys(o, &[1, 2], 2, 1), a[..1]);
        }
    }
}
