//! One decode step's plumbing on the device: batch buckets for CUDA graphs, the key a captured
//! graph is stored under, and the one pinned upload per step that carries every table all
//! layers share (tokens, positions, context lengths, KV write slots, page tables, adapters and
//! the sampler's per-row parameters), laid out at fixed offsets for a bucket so the graph's
//! kernels read the same addresses every step.

use super::splits::split_bucket;

/// Batch sizes decode graphs are captured for; a step runs in the smallest bucket that holds it
/// (padding rows are inert), larger steps run eagerly.
pub const GRAPH_BUCKETS: [u32; 9] = [1, 2, 4, 8, 16, 32, 64, 128, 256];

/// The bucket for a step of `rows` rows (None: above the largest, run eagerly).
pub fn bucket_for(rows: usize) -> Option<u32> {
    GRAPH_BUCKETS.iter().copied().find(|&b| b as usize >= rows.max(1))
}

/// What makes two decode steps replay the same graph: the batch bucket, the attention split
/// bucket (the flash-decoding grid) and whether any row has an adapter (the LoRA launches).
/// Everything else (tokens, positions, pages, routing, sampling parameters) is data.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GraphKey {
    pub bucket: u32,
    pub splits: u32,
    pub adapters: bool,
}

impl GraphKey {
    /// The key of a step, or None when it must run eagerly.
    pub fn for_step(rows: usize, max_split_count: usize, adapters: bool) -> Option<Self> {
        Some(Self { bucket: bucket_for(rows)?, splits: split_bucket(max_split_count), adapters })
    }
}

/// One row of a decode step as the host knows it.
#[derive(Clone, Debug, PartialEq)]
pub struct StepRow {
    pub token: u32,
    pub position: u32,
    pub context_len: u32,
    /// Where this step's key and value are written (page * page_size + offset).
    pub kv_slot: u32,
    pub pages: Vec<u32>,
    pub adapter: Option<u32>,
    pub seed: u64,
    /// How many draws this request's sampler has made (the device draws the next one).
    pub draw: u64,
    pub temperature: f32,
    pub top_k: u32,
    pub top_p: f32,
}

/// Why a step does not fit its layout.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StepError {
    #[error("{rows} rows do not fit a bucket of {bucket}")]
    TooManyRows { rows: usize, bucket: u32 },
    #[error("row {row} has {pages} pages; the layout holds {max}")]
    TooManyPages { row: usize, pages: usize, max: u32 },
}

/// The tables of a step, in order; every table starts at a multiple of [`ALIGN`] bytes.
pub const TABLES: [(&str, u32); 11] = [
    ("tokens", 4),
    ("positions", 4),
    ("context_lens", 4),
    ("kv_slots", 4),
    ("adapters", 4),
    ("seeds", 8),
    ("draws", 8),
    ("temperature", 4),
    ("top_k", 4),
    ("top_p", 4),
    ("page_table", 4),
];
pub const ALIGN: usize = 256;
/// A padding row's KV slot: kernels skip the write.
pub const NO_SLOT: u32 = u32::MAX;

/// Byte offsets of each table for a bucket and a page-table width.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StepLayout {
    pub bucket: u32,
    pub max_pages: u32,
    pub offsets: [usize; TABLES.len()],
    pub bytes: usize,
}

impl StepLayout {
    pub fn new(bucket: u32, max_pages: u32) -> Self {
        let mut offsets = [0; TABLES.len()];
        let mut at = 0;
        for (i, &(name, width)) in TABLES.iter().enumerate() {
            offsets[i] = at;
            let count = if name == "page_table" { bucket as usize * max_pages as usize } else { bucket as usize };
            at = (at + count * width as usize).div_ceil(ALIGN) * ALIGN;
        }
        Self { bucket, max_pages, offsets, bytes: at }
    }

    pub fn offset(&self, table: &str) -> Option<usize> {
        TABLES.iter().position(|&(n, _)| n == table).map(|i| self.offsets[i])
    }

    /// Writes the step into `out` (resized to the layout): rows past `rows.len()` are padding
    /// (context 0, no KV slot, no adapter, greedy) and page-table entries past a row's pages
    /// are 0.
    pub fn pack(&self, rows: &[StepRow], out: &mut Vec<u8>) -> Result<(), StepError> {
        if rows.len() > self.bucket as usize {
            return Err(StepError::TooManyRows { rows: rows.len(), bucket: self.bucket });
        }
        if let Some((row, r)) = rows.iter().enumerate().find(|(_, r)| r.pages.len() > self.max_pages as usize) {
            return Err(StepError::TooManyPages { row, pages: r.pages.len(), max: self.max_pages });
        }
        out.clear();
        out.resize(self.bytes, 0);
        let mut put = |table: usize, index: usize, bytes: &[u8]| {
            let at = self.offsets[table] + index * bytes.len();
            out[at..at + bytes.len()].copy_from_slice(bytes);
        };
        for i in 0..self.bucket as usize {
            let r = rows.get(i);
            put(0, i, &r.map_or(0, |r| r.token).to_le_bytes());
            put(1, i, &r.map_or(0, |r| r.position).to_le_bytes());
            put(2, i, &r.map_or(0, |r| r.context_len).to_le_bytes());
            put(3, i, &r.map_or(NO_SLOT, |r| r.kv_slot).to_le_bytes());
            put(4, i, &r.and_then(|r| r.adapter).map_or(-1i32, |a| a as i32).to_le_bytes());
            put(5, i, &r.map_or(0, |r| r.seed).to_le_bytes());
            put(6, i, &r.map_or(0, |r| r.draw).to_le_bytes());
            put(7, i, &r.map_or(0.0, |r| r.temperature).to_le_bytes());
            put(8, i, &r.map_or(0, |r| r.top_k).to_le_bytes());
            put(9, i, &r.map_or(1.0, |r| r.top_p).to_le_bytes());
            for (j, &p) in r.map_or(&[][..], |r| &r.pages[..]).iter().enumerate() {
                put(10, i * self.max_pages as usize + j, &p.to_le_bytes());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(i: u32, pages: usize) -> StepRow {
        StepRow {
            token: 100 + i,
            position: 7 * i,
            context_len: 7 * i + 1,
            kv_slot: 16 * i + 3,
            pages: (0..pages as u32).map(|p| 1000 * (i + 1) + p).collect(),
            adapter: (i % 2 == 1).then_some(i),
            seed: u64::MAX - i as u64,
            draw: i as u64,
            temperature: 0.5,
            top_k: 40,
            top_p: 0.9,
        }
    }

    fn read_u32(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
    }

    #[test]
    fn buckets_and_keys() {
        assert_eq!(bucket_for(0), Some(1));
        assert_eq!(bucket_for(1), Some(1));
        assert_eq!(bucket_for(3), Some(4));
        assert_eq!(bucket_for(64), Some(64));
        assert_eq!(bucket_for(65), Some(128));
        assert_eq!(bucket_for(257), None);
        let a = GraphKey::for_step(20, 3, false).expect("fits");
        assert_eq!(a, GraphKey { bucket: 32, splits: 4, adapters: false });
        assert_eq!(GraphKey::for_step(17, 4, false), Some(a), "same bucket, same split bucket: same graph");
        assert_ne!(GraphKey::for_step(20, 3, true), Some(a));
        assert_eq!(GraphKey::for_step(300, 1, false), None);
    }

    #[test]
    fn tables_are_aligned_disjoint_and_padding_rows_are_inert() {
        let layout = StepLayout::new(4, 3);
        for w in layout.offsets.windows(2) {
            assert!(w[0] % ALIGN == 0 && w[1] > w[0]);
        }
        assert_eq!(layout.bytes % ALIGN, 0);
        let rows = vec![row(0, 3), row(1, 1)];
        let mut bytes = Vec::new();
        layout.pack(&rows, &mut bytes).expect("fits");
        assert_eq!(bytes.len(), layout.bytes);
        let at = |t: &str, i: usize, w: usize| layout.offset(t).expect("table") + i * w;
        assert_eq!(read_u32(&bytes, at("tokens", 1, 4)), 101);
        assert_eq!(read_u32(&bytes, at("kv_slots", 1, 4)), 19);
        assert_eq!(read_u32(&bytes, at("kv_slots", 2, 4)), NO_SLOT, "padding writes no key");
        assert_eq!(read_u32(&bytes, at("context_lens", 3, 4)), 0);
        assert_eq!(read_u32(&bytes, at("adapters", 0, 4)) as i32, -1);
        assert_eq!(read_u32(&bytes, at("adapters", 1, 4)), 1);
        assert_eq!(u64::from_le_bytes(bytes[at("seeds", 1, 8)..][..8].try_into().expect("8")), u64::MAX - 1);
        assert_eq!(read_u32(&bytes, at("page_table", 3, 4)), 2000, "row 1's first page (3 pages per row)");
        assert_eq!(read_u32(&bytes, at("page_table", 2, 4)), 1002);
        assert_eq!(f32::from_le_bytes(bytes[at("top_p", 3, 4)..][..4].try_into().expect("4")), 1.0);
        assert_eq!(layout.pack(&[row(0, 4)], &mut bytes), Err(StepError::TooManyPages { row: 0, pages: 4, max: 3 }));
        assert!(layout.pack(&vec![row(0, 1); 5], &mut bytes).is_err());
    }
}
