//! Whether an adapter's files changed since they were read: the length and modification time of
//! its config and weights, compared with what they were just before the load. Two `stat` calls,
//! cheap enough for every admission. A file rewritten within one timestamp tick at the same length
//! would go unseen; copying a new adapter over an old one changes both in practice.

use crate::peft::{CONFIG_FILE, WEIGHTS_FILE};
use std::path::Path;
use std::time::SystemTime;

/// The length and modification time of each of an adapter's two files (`None`: missing).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FileStamp([Option<(u64, SystemTime)>; 2]);

impl FileStamp {
    /// The stamp of the adapter directory `dir` now.
    pub fn of(dir: &Path) -> Self {
        let one = |name: &str| {
            let m = std::fs::metadata(dir.join(name)).ok()?;
            Some((m.len(), m.modified().ok()?))
        };
        Self([one(CONFIG_FILE), one(WEIGHTS_FILE)])
    }
}

/// A digest a router asked for that the files did not have, remembered with the files' stamp so
/// that every later message asking for it is refused without reading the files again, until they
/// change.
#[derive(Clone, Debug)]
pub(crate) struct Mismatch {
    pub wanted: String,
    pub got: String,
    pub stamp: FileStamp,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rewrite_changes_the_stamp() {
        let dir = tempfile::tempdir().expect("tmp");
        std::fs::write(dir.path().join(CONFIG_FILE), "{}").expect("write");
        let before = FileStamp::of(dir.path());
        assert_eq!(before, FileStamp::of(dir.path()));
        std::fs::write(dir.path().join(WEIGHTS_FILE), "xx").expect("write");
        assert_ne!(before, FileStamp::of(dir.path()));
    }
}
