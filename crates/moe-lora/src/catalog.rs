//! The device-independent face of a registry: what servers and admin RPCs need (list, load,
//! unload, usage, pins) without knowing which backend holds the weights. A pin taken here
//! ([`AdapterPin`]) keeps the adapter resident; the compute side, which knows the backend,
//! turns it into the weights with [`AdapterRegistry::resolve`].

use crate::error::{LoraError, Result};
use crate::registry::{AdapterInfo, AdapterRegistry, RegistryCounters, RegistryLimits, Resident};
use moe_model::AdapterIdentity;
use std::any::Any;
use std::sync::Arc;

/// A resident adapter held for a request: while it lives the adapter is neither evicted nor
/// unloaded. Names exactly which version (id, path, digest) was pinned.
#[derive(Clone)]
pub struct AdapterPin {
    identity: AdapterIdentity,
    /// The registry's `Arc<T>`, typed away: the compute side gets it back by downcasting, so a
    /// pin stays usable after the registry replaced the version (files changed in place).
    held: Arc<dyn Any + Send + Sync>,
}

impl AdapterPin {
    pub fn identity(&self) -> &AdapterIdentity {
        &self.identity
    }

    pub fn id(&self) -> &str {
        &self.identity.id
    }
}

impl std::fmt::Debug for AdapterPin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdapterPin").field("identity", &self.identity).finish()
    }
}

/// A registry seen without its backend.
pub trait AdapterCatalog: Send + Sync {
    fn limits(&self) -> RegistryLimits;
    /// Resident adapters, then adapters found in the adapter dir that are not loaded.
    fn list(&self) -> Vec<AdapterInfo>;
    /// Registers `id` at `rel_path` under the adapter dir and loads it now (blocking).
    fn load(&self, id: &str, rel_path: &str) -> Result<AdapterInfo>;
    /// Drops a resident adapter; refused while requests hold it.
    fn unload(&self, id: &str) -> Result<()>;
    /// (resident adapters, of them pinned, resident bytes).
    fn usage(&self) -> (usize, usize, usize);
    /// Loads, failed loads and evictions since start.
    fn counters(&self) -> &RegistryCounters;
    /// The adapter `id`, pinned, if it is resident and its files were checked recently (never
    /// blocks; `None` sends the caller to [`Self::pin`], which looks at the files).
    fn pin_resident(&self, id: &str) -> Option<AdapterPin>;
    /// The adapter `id`, pinned, loading it if needed: call from a blocking context.
    fn pin(&self, id: &str) -> Result<AdapterPin>;
}

fn pin_of<T: Resident>(value: Arc<T>) -> AdapterPin {
    AdapterPin { identity: value.identity().clone(), held: value }
}

impl<T: Resident> AdapterCatalog for AdapterRegistry<T> {
    fn limits(&self) -> RegistryLimits {
        AdapterRegistry::limits(self)
    }
    fn list(&self) -> Vec<AdapterInfo> {
        AdapterRegistry::list(self)
    }
    fn load(&self, id: &str, rel_path: &str) -> Result<AdapterInfo> {
        let v = AdapterRegistry::load(self, id, rel_path)?;
        Ok(AdapterInfo {
            id: id.to_string(),
            path: v.identity().path.clone(),
            resident: true,
            pinned: 0,
            bytes: v.bytes(),
            digest: v.identity().digest.clone(),
        })
    }
    fn unload(&self, id: &str) -> Result<()> {
        AdapterRegistry::unload(self, id)
    }
    fn usage(&self) -> (usize, usize, usize) {
        AdapterRegistry::usage(self)
    }
    fn counters(&self) -> &RegistryCounters {
        &self.counters
    }
    fn pin_resident(&self, id: &str) -> Option<AdapterPin> {
        self.get_checked(id).map(pin_of)
    }
    fn pin(&self, id: &str) -> Result<AdapterPin> {
        self.acquire(id).map(pin_of)
    }
}

impl<T: Resident> AdapterRegistry<T> {
    /// The weights a pin holds: the version pinned, even when the registry has since loaded a
    /// newer one. Fails only when the pin came from a registry of another kind.
    pub fn resolve(&self, pin: &AdapterPin) -> Result<Arc<T>> {
        pin.held.clone().downcast::<T>().map_err(|_| LoraError::NotFound {
            id: pin.id().to_string(),
            why: "the pinned adapter is not this registry's".into(),
        })
    }
}
