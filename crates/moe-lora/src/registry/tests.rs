//! Tests of the adapter registry: eviction, pins, id checks, in-place reloads on routers and workers.

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

/// A registry over one adapter "a" whose digest is its config file's text ("bad" fails to
/// load), counting the loader's calls.
fn versioned() -> (tempfile::TempDir, AdapterRegistry<Fake>, Arc<AtomicU64>) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("a")).unwrap();
    std::fs::write(dir.path().join("a/adapter_config.json"), "v1").unwrap();
    let calls = Arc::new(AtomicU64::new(0));
    let counted = calls.clone();
    let limits = RegistryLimits { recheck_files: Duration::ZERO, ..Default::default() };
    let reg = AdapterRegistry::new(Some(dir.path().into()), limits, move |d, mut i| {
        counted.fetch_add(1, Ordering::Relaxed);
        let text = std::fs::read_to_string(d.join("adapter_config.json")).unwrap();
        if text == "bad" {
            return Err(LoraError::Unsupported { adapter: i.id, message: "bad".into() });
        }
        i.digest = text;
        Ok(Fake(i, 10))
    });
    (dir, reg, calls)
}

fn rewrite(dir: &tempfile::TempDir, text: &str) {
    std::fs::write(dir.path().join("a/adapter_config.json"), text).unwrap();
}

#[test]
fn a_router_reloads_changed_files_and_keeps_serving_when_they_do_not_load() {
    let (dir, reg, calls) = versioned();
    let v1 = reg.acquire("a").unwrap();
    assert_eq!(reg.acquire("a").unwrap().identity().digest, "v1");
    assert_eq!(calls.load(Ordering::Relaxed), 1, "an unchanged adapter is not read again");
    rewrite(&dir, "v2-longer");
    assert_eq!(reg.acquire("a").unwrap().identity().digest, "v2-longer");
    assert_eq!(v1.identity().digest, "v1", "a running request keeps the version it pinned");
    rewrite(&dir, "bad");
    assert_eq!(reg.acquire("a").unwrap().identity().digest, "v2-longer");
    let after_bad = calls.load(Ordering::Relaxed);
    assert_eq!(reg.acquire("a").unwrap().identity().digest, "v2-longer");
    assert_eq!(calls.load(Ordering::Relaxed), after_bad, "files that failed are not read on every use");
    rewrite(&dir, "v3-fixed");
    assert_eq!(reg.acquire("a").unwrap().identity().digest, "v3-fixed");
}

#[test]
fn a_worker_keeps_the_superseded_version_and_remembers_a_mismatch() {
    let (dir, reg, calls) = versioned();
    let want = |d: &str| AdapterIdentity { id: "a".into(), path: "a".into(), digest: d.into() };
    reg.acquire_identity(&want("v1")).unwrap();
    rewrite(&dir, "v2-longer");
    reg.acquire_identity(&want("v2-longer")).unwrap();
    let loads = calls.load(Ordering::Relaxed);
    // A request that started before the change still gets its version, without a load.
    assert_eq!(reg.acquire_identity(&want("v1")).unwrap().identity().digest, "v1");
    assert_eq!(calls.load(Ordering::Relaxed), loads);
    // A digest the files do not have is refused, and refused again without reading them.
    assert!(matches!(reg.acquire_identity(&want("v9")), Err(LoraError::DigestMismatch { .. })));
    assert_eq!(calls.load(Ordering::Relaxed), loads + 1);
    for _ in 0..5 {
        assert!(matches!(reg.acquire_identity(&want("v9")), Err(LoraError::DigestMismatch { .. })));
    }
    assert_eq!(calls.load(Ordering::Relaxed), loads + 1, "a mismatch verdict is cached");
    rewrite(&dir, "v9");
    assert_eq!(reg.acquire_identity(&want("v9")).unwrap().identity().digest, "v9");
    // Only one superseded version is kept per id.
    assert!(reg.acquire_identity(&want("v2-longer")).is_ok());
    assert!(matches!(reg.acquire_identity(&want("v1")), Err(LoraError::DigestMismatch { .. })));
}

/// Defect: a load that read the adapter before `forget_loaded` (a worker's LoadExperts) was
/// inserted afterwards, so its stale version (no pairs for the new experts) served on with a
/// matching identity. With the loader held on a barrier across a forget, the version kept is
/// the one loaded after it.
#[test]
fn a_load_that_straddles_forget_loaded_is_not_kept() {
    use std::sync::atomic::AtomicUsize;
    use std::sync::{Barrier, Condvar};
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("a")).unwrap();
    std::fs::write(dir.path().join("a").join("adapter_config.json"), "{}").unwrap();
    // What the loader sees: the "hosted experts" version, changed by the test.
    let world = Arc::new(AtomicUsize::new(1));
    let started = Arc::new(Barrier::new(2));
    let release = Arc::new((std::sync::Mutex::new(false), Condvar::new()));
    let calls = Arc::new(AtomicUsize::new(0));
    let reg = {
        let (world, started, release, calls) = (world.clone(), started.clone(), release.clone(), calls.clone());
        Arc::new(AdapterRegistry::new(Some(dir.path().into()), RegistryLimits::default(), move |_, mut i| {
            let seen = world.load(Ordering::SeqCst);
            if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                // The first load read the world, then waits while the world changes.
                started.wait();
                let (lock, cv) = &*release;
                let mut go = lock.lock().unwrap();
                while !*go {
                    go = cv.wait(go).unwrap();
                }
            }
            i.digest = "d".into();
            Ok(Fake(i, seen))
        }))
    };
    let loader = {
        let reg = reg.clone();
        std::thread::spawn(move || reg.acquire("a").map(|v| v.1))
    };
    started.wait();
    world.store(2, Ordering::SeqCst);
    reg.forget_loaded();
    {
        let (lock, cv) = &*release;
        *lock.lock().unwrap() = true;
        cv.notify_all();
    }
    assert_eq!(loader.join().unwrap().unwrap(), 2, "the request got the version loaded before the change");
    assert_eq!(reg.acquire("a").unwrap().1, 2, "the stale version stayed resident");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}
