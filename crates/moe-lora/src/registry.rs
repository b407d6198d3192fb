//! The resident adapters of one process. An adapter is named by an id; its files are the
//! directory `<adapter dir>/<id>` (or a path under the adapter dir given to [`AdapterRegistry::load`]).
//! Adapters load on first use, on the caller's thread (servers call from a blocking task, so the
//! engine's batch never waits for a load), one load per id at a time. A caller holds an
//! `Arc` while it uses the adapter: that is the pin, and pinned adapters are never evicted or
//! unloaded. Room for a new adapter is made by evicting the least recently used idle ones within
//! the count and byte limits; when every resident adapter is pinned, the new one is refused.

use crate::error::{LoraError, Result};
use moe_compute::Backend;
use moe_model::{AdapterIdentity, AdapterWeights};
use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

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
}

impl Default for RegistryLimits {
    fn default() -> Self {
        Self { max_adapters: 64, max_bytes: 4 << 30, max_rank: DEFAULT_MAX_RANK }
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

/// Checks an adapter id: 1–128 characters of `A-Z a-z 0-9 . _ -`, not starting with `.`.
pub fn validate_id(id: &str) -> Result<()> {
    let bad = |why: &str| Err(LoraError::InvalidId { id: id.chars().take(140).collect(), why: why.into() });
    if id.is_empty() || id.len() > 128 {
        return bad("must be 1 to 128 characters");
    }
    if id.starts_with('.') {
        return bad("must not start with '.'");
    }
    if !id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')) {
        return bad("only letters, digits, '.', '_' and '-' are allowed");
    }
    Ok(())
}

/// Checks a path under the adapter dir: relative, each part a valid id (so no `..`, no `/`
/// at the start, nothing hidden).
pub fn validate_rel_path(path: &str) -> Result<()> {
    let bad = |why: &str| Err(LoraError::InvalidId { id: path.chars().take(140).collect(), why: why.into() });
    if path.is_empty() || path.len() > 512 {
        return bad("the path must be 1 to 512 characters");
    }
    for c in Path::new(path).components() {
        match c {
            Component::Normal(p) => validate_id(p.to_str().unwrap_or("\u{0}")).map_err(|_| LoraError::InvalidId {
                id: path.into(),
                why: format!("path part {p:?} is not allowed"),
            })?,
            _ => return bad("must be a relative path inside the adapter dir (no '..', no leading '/')"),
        }
    }
    Ok(())
}

struct Entry<T> {
    value: Arc<T>,
    last_used: u64,
}

struct State<T> {
    resident: HashMap<String, Entry<T>>,
    /// Ids given a path by `load`; others live at `<root>/<id>`.
    paths: HashMap<String, String>,
    tick: u64,
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
            state: Mutex::new(State { resident: HashMap::new(), paths: HashMap::new(), tick: 0 }),
            loading: Mutex::new(HashMap::new()),
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

    fn path_of(&self, id: &str) -> String {
        self.state().paths.get(id).cloned().unwrap_or_else(|| id.to_string())
    }

    /// The adapter `id`, loading it if needed. Blocks while loading: call it from a blocking
    /// context. The returned `Arc` pins it.
    pub fn acquire(&self, id: &str) -> Result<Arc<T>> {
        validate_id(id)?;
        if let Some(v) = self.get_resident(id) {
            return Ok(v);
        }
        let path = self.path_of(id);
        self.load_as(id, &path, None)
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
        self.load_as(&identity.id, &identity.path, Some(&identity.digest))
    }

    /// Registers `id` at `rel_path` under the adapter dir and loads it now.
    pub fn load(&self, id: &str, rel_path: &str) -> Result<Arc<T>> {
        validate_id(id)?;
        let rel = if rel_path.is_empty() { id } else { rel_path };
        validate_rel_path(rel)?;
        if let Some(v) = self.get_resident(id) {
            if v.identity().path == rel {
                return Ok(v);
            }
            self.unload(id)?;
        }
        let v = self.load_as(id, rel, None)?;
        self.state().paths.insert(id.to_string(), rel.to_string());
        Ok(v)
    }

    fn load_as(&self, id: &str, rel: &str, digest: Option<&str>) -> Result<Arc<T>> {
        validate_rel_path(rel)?;
        let root = self.root.as_ref().ok_or(LoraError::NoStore)?;
        let gate = {
            let mut l = self.loading.lock().unwrap_or_else(|p| p.into_inner());
            l.entry(id.to_string()).or_default().clone()
        };
        let result = {
            let _one_load = gate.lock().unwrap_or_else(|p| p.into_inner());
            self.load_gated(root, id, rel, digest)
        };
        // The gate goes when no other load of this id waits on it, so ids that were asked for
        // (existing or not) do not pile up.
        let mut l = self.loading.lock().unwrap_or_else(|p| p.into_inner());
        if l.get(id).is_some_and(|g| Arc::ptr_eq(g, &gate) && Arc::strong_count(g) == 2) {
            l.remove(id);
        }
        result
    }

    /// Loads `id` while holding its gate (one load per id at a time).
    fn load_gated(&self, root: &Path, id: &str, rel: &str, digest: Option<&str>) -> Result<Arc<T>> {
        if let Some(v) = self.get_resident(id) {
            if v.identity().path == rel && digest.is_none_or(|d| d == v.identity().digest) {
                return Ok(v);
            }
        }
        let dir = root.join(rel);
        if !dir.join(crate::peft::CONFIG_FILE).is_file() {
            self.counters.load_failures.fetch_add(1, Ordering::Relaxed);
            return Err(LoraError::NotFound {
                id: id.into(),
                why: format!("no {} in the adapter dir at {rel:?}", crate::peft::CONFIG_FILE),
            });
        }
        let identity = AdapterIdentity { id: id.into(), path: rel.into(), digest: String::new() };
        let value = (self.loader)(&dir, identity).inspect_err(|_| {
            self.counters.load_failures.fetch_add(1, Ordering::Relaxed);
        })?;
        if let Some(d) = digest {
            if value.identity().digest != d {
                self.counters.load_failures.fetch_add(1, Ordering::Relaxed);
                return Err(LoraError::DigestMismatch {
                    id: id.into(),
                    expected: d.into(),
                    got: value.identity().digest.clone(),
                });
            }
        }
        let value = Arc::new(value);
        let mut st = self.state();
        st.resident.remove(id);
        self.make_room(&mut st, id, value.bytes())?;
        st.tick += 1;
        let tick = st.tick;
        st.resident.insert(id.to_string(), Entry { value: value.clone(), last_used: tick });
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
            let used: usize = st.resident.values().map(|e| e.value.bytes()).sum();
            if st.resident.len() < self.limits.max_adapters && used + bytes <= self.limits.max_bytes {
                return Ok(());
            }
            let victim = st
                .resident
                .iter()
                .filter(|(_, e)| Arc::strong_count(&e.value) == 1)
                .min_by_key(|(_, e)| e.last_used)
                .map(|(k, _)| k.clone());
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
        Ok(())
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
        (st.resident.len(), pinned, st.resident.values().map(|e| e.value.bytes()).sum())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fake(AdapterIdentity, usize);
    impl Resident for Fake {
        fn identity(&self) -> &AdapterIdentity {
            &self.0
        }
        fn bytes(&self) -> usize {
            self.1
        }
    }

    #[test]
    fn ids_that_were_asked_for_leave_no_load_gate_behind() {
        let (_dir, reg) = registry(4, 1 << 20);
        for i in 0..100 {
            assert!(reg.acquire(&format!("missing-{i}")).is_err());
        }
        let _ = reg.acquire("a");
        assert!(reg.loading.lock().map(|l| l.is_empty()).unwrap_or(false), "load gates pile up");
    }

    fn registry(max_adapters: usize, max_bytes: usize) -> (tempfile::TempDir, AdapterRegistry<Fake>) {
        let dir = tempfile::tempdir().unwrap();
        for id in ["a", "b", "c", "big"] {
            std::fs::create_dir(dir.path().join(id)).unwrap();
            std::fs::write(dir.path().join(id).join("adapter_config.json"), "{}").unwrap();
        }
        let reg = AdapterRegistry::new(
            Some(dir.path().into()),
            RegistryLimits { max_adapters, max_bytes, ..Default::default() },
            |_, mut i| {
                let bytes = if i.id == "big" { 1000 } else { 10 };
                i.digest = "d".into();
                Ok(Fake(i, bytes))
            },
        );
        (dir, reg)
    }

    #[test]
    fn evicts_least_recently_used_idle_adapter_and_never_a_pinned_one() {
        let (_d, reg) = registry(2, 100);
        let a = reg.acquire("a").unwrap();
        drop(reg.acquire("b").unwrap());
        // "a" is pinned, "b" idle: loading "c" evicts "b".
        let _c = reg.acquire("c").unwrap();
        let ids: Vec<String> = reg.list().into_iter().filter(|i| i.resident).map(|i| i.id).collect();
        assert_eq!(ids, ["a", "c"]);
        assert_eq!(reg.counters.evictions.load(Ordering::Relaxed), 1);
        // Both pinned: a third is refused.
        assert!(matches!(reg.acquire("b"), Err(LoraError::Capacity(_))));
        drop(a);
        assert!(reg.acquire("b").is_ok());
        assert!(matches!(reg.acquire("big"), Err(LoraError::Capacity(_))));
    }

    #[test]
    fn unload_refused_while_pinned() {
        let (_d, reg) = registry(4, 100);
        let a = reg.acquire("a").unwrap();
        assert!(matches!(reg.unload("a"), Err(LoraError::InUse { requests: 1, .. })));
        drop(a);
        reg.unload("a").unwrap();
        assert!(matches!(reg.unload("a"), Err(LoraError::NotFound { .. })));
    }

    #[test]
    fn ids_and_paths_are_validated_before_the_file_system() {
        for bad in ["", "../x", "/etc", ".hidden", "a/b", "a b", &"x".repeat(200)] {
            assert!(matches!(validate_id(bad), Err(LoraError::InvalidId { .. })), "{bad}");
        }
        for bad in ["../x", "/etc/passwd", "a/../../b", "a/.git", ""] {
            assert!(validate_rel_path(bad).is_err(), "{bad}");
        }
        validate_rel_path("tenants/acme-v2").unwrap();
        let (_d, reg) = registry(4, 100);
        assert!(matches!(reg.acquire("missing"), Err(LoraError::NotFound { .. })));
        assert!(matches!(reg.load("x", "../a"), Err(LoraError::InvalidId { .. })));
    }
}
