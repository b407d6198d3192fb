//! The resident adapters of one process. An adapter is named by an id; its files are the
//! directory `<adapter dir>/<id>` (or a path under the adapter dir given to [`AdapterRegistry::load`]).
//! Adapters load on first use, on the caller's thread (servers call from a blocking task, so the
//! engine's batch never waits for a load), one load per id at a time. A caller holds an
//! `Arc` while it uses the adapter: that is the pin, and pinned adapters are never evicted or
//! unloaded. Room for a new adapter is made by evicting the least recently used idle ones within
//! the count and byte limits; when every resident adapter is pinned, the new one is refused.
//!
//! Adapters change in place on a shared volume. A router (which names versions) notices changed
//! files at the next use and reloads deliberately: new requests get the new version, running ones
//! keep the one they pinned, and files that do not load leave the loaded version serving. A worker
//! (told a version by its digest) keeps the version it replaced as `superseded`, so requests that
//! started before the change still find theirs, and remembers a digest its files do not have
//! until they change, so a stale router's messages are refused without rereading the files.

use crate::error::{LoraError, Result};
use crate::freshness::{FileStamp, Mismatch};
use moe_compute::Backend;
use moe_model::{AdapterIdentity, AdapterWeights};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Something held in the registry.
pub trait Resident: Send + Sync + 'static {
    fn identity(&self) -> &AdapterIdentity;
    fn bytes(&self) -> usize;
}

impl<B: Backend> Resident for AdapterWeights<B> {
    fn identity(&self) -> &AdapterIdentity {
        &self.identity
    }
    fn bytes(&self) -> usize {
        self.bytes
    }
}

/// The default `--max-lora-rank`.
pub const DEFAULT_MAX_RANK: usize = 64;

/// Bounds on what stays resident.
#[derive(Clone, Copy, Debug)]
pub struct RegistryLimits {
    pub max_adapters: usize,
    pub max_bytes: usize,
    /// Adapters with a module of higher rank are refused at load.
    pub max_rank: usize,
    /// How long a resident adapter's files are trusted before the request path looks at them
    /// again (a router notices an in-place update within this).
    pub recheck_files: Duration,
}

impl Default for RegistryLimits {
    fn default() -> Self {
        Self { max_adapters: 64, max_bytes: 4 << 30, max_rank: DEFAULT_MAX_RANK, recheck_files: RECHECK_AFTER }
    }
}

/// What `ListAdapters` reports for one adapter.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AdapterInfo {
    pub id: String,
    pub path: String,
    pub resident: bool,
    /// Requests holding it now.
    pub pinned: usize,
    pub bytes: usize,
    pub digest: String,
}

struct Entry<T> {
    value: Arc<T>,
    last_used: u64,
    /// The files' stamp just before they were read.
    stamp: FileStamp,
    /// When the stamp was last compared with the files.
    checked: Instant,
}

/// The default [`RegistryLimits::recheck_files`]: the request path uses a version checked this
/// recently without any file system call.
pub const RECHECK_AFTER: Duration = Duration::from_secs(1);

struct State<T> {
    resident: HashMap<String, Entry<T>>,
    /// The version each id had before its files changed (workers), evicted before any other.
    superseded: HashMap<String, Entry<T>>,
    /// Ids given a path by `load`; others live at `<root>/<id>`.
    paths: HashMap<String, String>,
    /// Per id, the last digest asked for that its files did not have.
    mismatches: HashMap<String, Mismatch>,
    tick: u64,
}

/// Which version a load wants.
#[derive(Clone, Copy)]
enum Want<'a> {
    /// Whatever the files hold now (a router).
    Current,
    /// Exactly this digest (a worker, told by a router).
    Digest(&'a str),
}

type Loader<T> = dyn Fn(&Path, AdapterIdentity) -> Result<T> + Send + Sync;

/// Counters for tests and metrics.
#[derive(Debug, Default)]
pub struct RegistryCounters {
    pub loads: AtomicU64,
    pub load_failures: AtomicU64,
    pub evictions: AtomicU64,
}

/// Resident adapters with limits, pins and LRU eviction.
pub struct AdapterRegistry<T: Resident> {
    root: Option<PathBuf>,
    limits: RegistryLimits,
    loader: Box<Loader<T>>,
    state: Mutex<State<T>>,
    loading: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    /// Bumped by `forget_loaded`: a load that began before a bump is not kept.
    generation: AtomicU64,
    pub counters: RegistryCounters,
}

impl<T: Resident> AdapterRegistry<T> {
    /// A registry over the adapter dir `root` (`None`: adapters cannot be loaded by id).
    /// `loader(dir, identity)` reads one adapter.
    pub fn new(
        root: Option<PathBuf>,
        limits: RegistryLimits,
        loader: impl Fn(&Path, AdapterIdentity) -> Result<T> + Send + Sync + 'static,
    ) -> Self {
        Self {
            root,
            limits,
            loader: Box::new(loader),
            state: Mutex::new(State {
                resident: HashMap::new(),
                superseded: HashMap::new(),
                paths: HashMap::new(),
                mismatches: HashMap::new(),
                tick: 0,
            }),
            loading: Mutex::new(HashMap::new()),
            generation: AtomicU64::new(0),
            counters: RegistryCounters::default(),
        }
    }

    pub fn root(&self) -> Option<&Path> {
        self.root.as_deref()
    }

    pub fn limits(&self) -> RegistryLimits {
        self.limits
    }

    fn state(&self) -> MutexGuard<'_, State<T>> {
        // A panic while holding the lock cannot leave the map half-updated (single inserts and
        // removes), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The resident adapter `id`, pinned, if it is resident.
    pub fn get_resident(&self, id: &str) -> Option<Arc<T>> {
        let mut st = self.state();
        st.tick += 1;
        let tick = st.tick;
        let e = st.resident.get_mut(id)?;
        e.last_used = tick;
        Some(e.value.clone())
    }

    /// The resident adapter `id`, pinned, if its files were compared with it within
    /// `recheck_files` (no file system call: for the async request path).
    pub fn get_checked(&self, id: &str) -> Option<Arc<T>> {
        let mut st = self.state();
        st.tick += 1;
        let tick = st.tick;
        let fresh_for = self.limits.recheck_files;
        let e = st.resident.get_mut(id).filter(|e| e.checked.elapsed() < fresh_for)?;
        e.last_used = tick;
        Some(e.value.clone())
    }

    fn path_of(&self, id: &str) -> String {
        self.state().paths.get(id).cloned().unwrap_or_else(|| id.to_string())
    }

    /// The adapter `id`, loading it if needed, or reloading it if its files changed since (a
    /// reload that fails leaves the loaded version serving, until the files change again).
    /// Blocks while loading: call it from a blocking context. The returned `Arc` pins it.
    pub fn acquire(&self, id: &str) -> Result<Arc<T>> {
        validate_id(id)?;
        let path = self.path_of(id);
        let Some(loaded) = self.get_resident(id) else { return self.load_as(id, &path, Want::Current) };
        let Some(now) = self.changed_stamp(id, &path) else { return Ok(loaded) };
        match self.load_as(id, &path, Want::Current) {
            Ok(new) => {
                let (old, new_digest) = (&loaded.identity().digest, &new.identity().digest);
                tracing::info!(adapter = %id, old = %old, new = %new_digest, "adapter files changed; reloaded");
                Ok(new)
            }
            Err(e) => {
                tracing::warn!(adapter = %id, error = %e, "adapter files changed but do not load; the loaded version serves on");
                if let Some(entry) = self.state().resident.get_mut(id) {
                    entry.stamp = now;
                }
                Ok(loaded)
            }
        }
    }

    /// The stamp of `id`'s files now, when it differs from the resident version's (unless that
    /// was checked within `recheck_files`).
    fn changed_stamp(&self, id: &str, rel: &str) -> Option<FileStamp> {
        let recent = |e: &Entry<T>| e.checked.elapsed() < self.limits.recheck_files;
        if self.state().resident.get(id).is_none_or(recent) {
            return None;
        }
        let now = FileStamp::of(&self.root.as_ref()?.join(rel));
        let mut st = self.state();
        let e = st.resident.get_mut(id)?;
        e.checked = Instant::now();
        (e.stamp != now).then_some(now)
    }

    /// The adapter with this identity (a worker, told by a router which version to use); a
    /// resident copy with another digest is replaced.
    pub fn acquire_identity(&self, identity: &AdapterIdentity) -> Result<Arc<T>> {
        validate_id(&identity.id)?;
        validate_rel_path(&identity.path)?;
        if let Some(v) = self.get_resident(&identity.id) {
            if v.identity() == identity {
                return Ok(v);
            }
        }
        self.load_as(&identity.id, &identity.path, Want::Digest(&identity.digest))
    }

    /// Registers `id` at `rel_path` under the adapter dir and loads it now.
    pub fn load(&self, id: &str, rel_path: &str) -> Result<Arc<T>> {
        validate_id(id)?;
        let rel = if rel_path.is_empty() { id } else { rel_path };
        validate_rel_path(rel)?;
        if self.get_resident(id).is_some_and(|v| v.identity().path != rel) {
            self.unload(id)?;
        }
        let v = self.load_as(id, rel, Want::Current)?;
        self.state().paths.insert(id.to_string(), rel.to_string());
        Ok(v)
    }

    fn load_as(&self, id: &str, rel: &str, want: Want<'_>) -> Result<Arc<T>> {
        validate_rel_path(rel)?;
        let root = self.root.as_ref().ok_or(LoraError::NoStore)?;
        let gate = {
            let mut l = self.loading.lock().unwrap_or_else(|p| p.into_inner());
            l.entry(id.to_string()).or_default().clone()
        };
        let result = {
            let _one_load = gate.lock().unwrap_or_else(|p| p.into_inner());
            self.load_gated(root, id, rel, want)
        };
        // The gate goes when no other load of this id waits on it, so ids that were asked for
        // (existing or not) do not pile up.
        let mut l = self.loading.lock().unwrap_or_else(|p| p.into_inner());
        if l.get(id).is_some_and(|g| Arc::ptr_eq(g, &gate) && Arc::strong_count(g) == 2) {
            l.remove(id);
        }
        result
    }

    /// A loaded version of `id` at `rel` that is what `want` asks for (given the files' `stamp`
    /// now), or a remembered refusal of that digest.
    fn already(&self, id: &str, rel: &str, want: Want<'_>, stamp: FileStamp) -> Option<Result<Arc<T>>> {
        let mut st = self.state();
        st.tick += 1;
        let tick = st.tick;
        let State { resident, superseded, mismatches, .. } = &mut *st;
        let fits = |e: &Entry<T>| {
            e.value.identity().path == rel
                && match want {
                    Want::Current => e.stamp == stamp,
                    Want::Digest(d) => e.value.identity().digest == d,
                }
        };
        let candidates = [resident.get_mut(id), superseded.get_mut(id)];
        if let Some(e) = candidates.into_iter().flatten().find(|e| fits(e)) {
            e.last_used = tick;
            return Some(Ok(e.value.clone()));
        }
        let Want::Digest(d) = want else { return None };
        let m = mismatches.get(id).filter(|m| m.wanted == d && m.stamp == stamp)?;
        Some(Err(LoraError::DigestMismatch { id: id.into(), expected: d.into(), got: m.got.clone() }))
    }

    /// Loads `id` while holding its gate (one load per id at a time).
    fn load_gated(&self, root: &Path, id: &str, rel: &str, want: Want<'_>) -> Result<Arc<T>> {
        let dir = root.join(rel);
        let stamp = FileStamp::of(&dir);
        if let Some(done) = self.already(id, rel, want, stamp) {
            return done;
        }
        if !dir.join(crate::peft::CONFIG_FILE).is_file() {
            self.counters.load_failures.fetch_add(1, Ordering::Relaxed);
            return Err(LoraError::NotFound {
                id: id.into(),
                why: format!("no {} in the adapter dir at {rel:?}", crate::peft::CONFIG_FILE),
            });
        }
        // Loaded while a worker's hosted experts grew (forget_loaded): load again, at most 3 times.
        let fail = |_: &LoraError| {
            self.counters.load_failures.fetch_add(1, Ordering::Relaxed);
        };
        let mut tries = 0;
        let value = loop {
            let generation = self.generation.load(Ordering::SeqCst);
            let identity = AdapterIdentity { id: id.into(), path: rel.into(), digest: String::new() };
            let value = (self.loader)(&dir, identity).inspect_err(fail)?;
            match (self.generation.load(Ordering::SeqCst) == generation, tries) {
                (true, _) => break value,
                (false, 3) => return Err(LoraError::Capacity(format!("adapter {id:?} changed while loading; retry"))),
                _ => tries += 1,
            }
        };
        if let Want::Digest(d) = want {
            if value.identity().digest != d {
                self.counters.load_failures.fetch_add(1, Ordering::Relaxed);
                let got = value.identity().digest.clone();
                let m = Mismatch { wanted: d.into(), got: got.clone(), stamp };
                self.state().mismatches.insert(id.to_string(), m);
                return Err(LoraError::DigestMismatch { id: id.into(), expected: d.into(), got });
            }
        }
        let value = Arc::new(value);
        let mut st = self.state();
        st.mismatches.remove(id);
        if let Some(old) = st.resident.remove(id) {
            if old.value.identity().digest != value.identity().digest {
                st.superseded.insert(id.to_string(), old);
            }
        }
        self.make_room(&mut st, id, value.bytes())?;
        st.tick += 1;
        let tick = st.tick;
        let entry = Entry { value: value.clone(), last_used: tick, stamp, checked: Instant::now() };
        st.resident.insert(id.to_string(), entry);
        self.counters.loads.fetch_add(1, Ordering::Relaxed);
        Ok(value)
    }

    /// Evicts idle adapters, least recently used first, until one of `bytes` fits.
    fn make_room(&self, st: &mut State<T>, id: &str, bytes: usize) -> Result<()> {
        if bytes > self.limits.max_bytes || self.limits.max_adapters == 0 {
            return Err(LoraError::Capacity(format!(
                "adapter {id:?} needs {bytes} bytes; the limit is {} adapters and {} bytes",
                self.limits.max_adapters, self.limits.max_bytes
            )));
        }
        loop {
            let used: usize = st.resident.values().chain(st.superseded.values()).map(|e| e.value.bytes()).sum();
            if st.resident.len() < self.limits.max_adapters && used + bytes <= self.limits.max_bytes {
                return Ok(());
            }
            let idle =
                |(k, e): (&String, &Entry<T>)| (Arc::strong_count(&e.value) == 1).then(|| (e.last_used, k.clone()));
            // A superseded version that nobody holds goes first, then the least recently used.
            if let Some((_, old)) = st.superseded.iter().filter_map(idle).min() {
                st.superseded.remove(&old);
                continue;
            }
            let victim = st.resident.iter().filter_map(idle).min().map(|(_, k)| k);
            match victim {
                Some(v) => {
                    st.resident.remove(&v);
                    self.counters.evictions.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(adapter = %v, "evicted idle adapter");
                }
                None => {
                    return Err(LoraError::Capacity(format!(
                        "all {} resident adapters ({used} bytes) are in use by running requests; retry later",
                        st.resident.len()
                    )))
                }
            }
        }
    }

    /// Drops a resident adapter; refused while requests hold it.
    pub fn unload(&self, id: &str) -> Result<()> {
        validate_id(id)?;
        let mut st = self.state();
        let Some(e) = st.resident.get(id) else {
            return Err(LoraError::NotFound { id: id.into(), why: "it is not loaded".into() });
        };
        let holders = Arc::strong_count(&e.value) - 1;
        if holders > 0 {
            return Err(LoraError::InUse { id: id.into(), requests: holders });
        }
        st.resident.remove(id);
        st.paths.remove(id);
        st.mismatches.remove(id);
        if st.superseded.get(id).is_some_and(|e| Arc::strong_count(&e.value) == 1) {
            st.superseded.remove(id);
        }
        Ok(())
    }

    /// Moves on every [`Self::forget_loaded`] (resolve again after a move).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// Forgets every loaded version, so the next use of each id reads its files again (a
    /// worker whose hosted experts changed needs pairs for the new ones). Requests holding a
    /// version keep it until they finish.
    pub fn forget_loaded(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        let mut st = self.state();
        st.resident.clear();
        st.superseded.clear();
        st.mismatches.clear();
    }

    /// Resident adapters, then adapters found in the adapter dir that are not loaded.
    pub fn list(&self) -> Vec<AdapterInfo> {
        let mut out: Vec<AdapterInfo> = {
            let st = self.state();
            st.resident
                .iter()
                .map(|(id, e)| AdapterInfo {
                    id: id.clone(),
                    path: e.value.identity().path.clone(),
                    resident: true,
                    pinned: Arc::strong_count(&e.value) - 1,
                    bytes: e.value.bytes(),
                    digest: e.value.identity().digest.clone(),
                })
                .collect()
        };
        if let Some(Ok(dir)) = self.root.as_ref().map(std::fs::read_dir) {
            for entry in dir.flatten() {
                let name = entry.file_name().to_string_lossy().to_string();
                let is_adapter = entry.path().join(crate::peft::CONFIG_FILE).is_file();
                if is_adapter && validate_id(&name).is_ok() && !out.iter().any(|a| a.id == name) {
                    out.push(AdapterInfo { id: name.clone(), path: name, ..AdapterInfo::default() });
                }
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    /// (resident adapters, of them pinned, resident bytes).
    pub fn usage(&self) -> (usize, usize, usize) {
        let st = self.state();
        let pinned = st.resident.values().filter(|e| Arc::strong_count(&e.value) > 1).count();
        let bytes = st.resident.values().chain(st.superseded.values()).map(|e| e.value.bytes()).sum();
        (st.resident.len(), pinned, bytes)
    }
}

mod ids;
pub use ids::{validate_id, validate_rel_path};

#[cfg(test)]
mod tests;
