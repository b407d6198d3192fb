//! Tenants: who may call, with which adapters, how many requests at once. Loaded from a TOML
//! file (mounted from a Secret in Kubernetes):
//!
//! ```toml
//! [[tenants]]
//! name = "acme"
//! api_key = "…"              # presented as `authorization: Bearer …`
//! adapters = ["acme-router"] # adapter ids this tenant may use; "*" for any
//! base_model = true          # may call without an adapter (default true)
//! max_concurrent = 8         # requests in flight at most (default: no limit)
//! admin = false              # may load and unload adapters (default false)
//! weight = 1.0                 # share of the service when tenants compete (default 1)
//! max_priority = 0             # highest request priority it may ask for (default 0)
//! tokens_per_minute = 100000   # prompt + generated tokens a minute (default: no budget)
//! ```
//!
//! Keys are compared in constant time against every tenant (no early exit) and never logged or
//! printed (`Debug` redacts them).

use crate::error::RouterError;
use serde::Deserialize;
use std::path::Path;
use std::sync::Arc;
use subtle::ConstantTimeEq;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantFile {
    #[serde(default)]
    tenants: Vec<TenantEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantEntry {
    name: String,
    api_key: String,
    #[serde(default)]
    adapters: Vec<String>,
    #[serde(default = "yes")]
    base_model: bool,
    #[serde(default)]
    max_concurrent: Option<usize>,
    #[serde(default)]
    admin: bool,
    #[serde(default = "one")]
    weight: f64,
    #[serde(default)]
    max_priority: i32,
    #[serde(default)]
    tokens_per_minute: Option<u64>,
}

fn one() -> f64 {
    1.0
}

fn yes() -> bool {
    true
}

/// Longest API key accepted; keys are compared over this fixed length.
const MAX_KEY_BYTES: usize = 256;

/// An API key kept for comparisons whose time depends on neither its content nor its length:
/// both sides are padded to [`MAX_KEY_BYTES`] and the lengths compared in constant time too.
struct ApiKey {
    padded: [u8; MAX_KEY_BYTES],
    len: u64,
}

impl ApiKey {
    fn new(key: &[u8]) -> Self {
        let mut padded = [0u8; MAX_KEY_BYTES];
        let n = key.len().min(MAX_KEY_BYTES);
        padded[..n].copy_from_slice(&key[..n]);
        Self { padded, len: key.len() as u64 }
    }

    fn matches(&self, other: &ApiKey) -> bool {
        bool::from(self.padded.ct_eq(&other.padded) & self.len.ct_eq(&other.len))
    }
}

/// One tenant.
pub struct Tenant {
    pub name: String,
    api_key: ApiKey,
    adapters: Vec<String>,
    base_model: bool,
    pub admin: bool,
    limit: Option<Arc<Semaphore>>,
    pub max_concurrent: Option<usize>,
    /// Its share of the service under fair scheduling, relative to the other tenants'.
    pub weight: f64,
    /// The highest priority its requests may ask for; higher ones are lowered to it.
    pub max_priority: i32,
    /// Its tokens-per-minute budget, when it has one.
    pub budget: Option<Arc<crate::budget::TokenBudget>>,
}

impl std::fmt::Debug for Tenant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tenant").field("name", &self.name).field("api_key", &"<redacted>").finish_non_exhaustive()
    }
}

impl Tenant {
    /// Whether this tenant may run with `adapter` (empty: the base model).
    pub fn may_use(&self, adapter: &str) -> bool {
        if adapter.is_empty() {
            return self.base_model;
        }
        self.adapters.iter().any(|a| a == "*" || a == adapter)
    }

    /// A slot among the tenant's concurrent requests, held until the request ends; refused
    /// while the tenant's token budget is spent.
    pub fn admit(&self) -> Result<Option<OwnedSemaphorePermit>, RouterError> {
        if let Some(wait) = self.budget.as_ref().and_then(|b| b.retry_after()) {
            let per_minute = self.budget.as_ref().map_or(0, |b| b.per_minute());
            return Err(RouterError::RateLimited {
                message: format!("tenant {:?} has used its budget of {per_minute} tokens per minute", self.name),
                retry_after: wait,
            });
        }
        match &self.limit {
            None => Ok(None),
            Some(s) => s.clone().try_acquire_owned().map(Some).map_err(|_| {
                RouterError::ResourceExhausted(format!(
                    "tenant {:?} already has {} requests in flight (its limit)",
                    self.name,
                    self.max_concurrent.unwrap_or(0)
                ))
            }),
        }
    }

    /// Requests of this tenant in flight now.
    pub fn in_flight(&self) -> usize {
        match (&self.limit, self.max_concurrent) {
            (Some(s), Some(max)) => max - s.available_permits(),
            _ => 0,
        }
    }
}

/// Every tenant of a router.
#[derive(Debug)]
pub struct Tenants {
    tenants: Vec<Arc<Tenant>>,
}

impl Tenants {
    /// Parses the tenants file; errors say which tenant and field is wrong.
    pub fn parse(text: &str) -> Result<Self, String> {
        // The parser's own message quotes the offending line, which may hold an api_key: say
        // only where and what.
        let file: TenantFile = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
            match line {
                Some(l) => format!("line {l}: {}", e.message().trim_end()),
                None => e.message().trim_end().to_string(),
            }
        })?;
        let mut tenants: Vec<Arc<Tenant>> = Vec::new();
        for t in file.tenants {
            if t.name.is_empty() {
                return Err("a tenant has an empty name".into());
            }
            if t.api_key.len() < 16 || t.api_key.len() > MAX_KEY_BYTES {
                return Err(format!(
                    "tenant {:?}: api_key must be at least 16 and at most {MAX_KEY_BYTES} characters",
                    t.name
                ));
            }
            if tenants.iter().any(|o| o.name == t.name) {
                return Err(format!("tenant {:?} appears twice", t.name));
            }
            let key = ApiKey::new(t.api_key.as_bytes());
            if tenants.iter().any(|o| o.api_key.matches(&key)) {
                return Err(format!("tenant {:?} reuses another tenant's api_key", t.name));
            }
            if t.max_concurrent == Some(0) {
                return Err(format!("tenant {:?}: max_concurrent must be at least 1", t.name));
            }
            if !(t.weight.is_finite() && t.weight > 0.0 && t.weight <= 1e6) {
                return Err(format!("tenant {:?}: weight must be a positive number (at most 1e6)", t.name));
            }
            if t.tokens_per_minute == Some(0) {
                return Err(format!("tenant {:?}: tokens_per_minute must be at least 1", t.name));
            }
            tenants.push(Arc::new(Tenant {
                limit: t.max_concurrent.map(|n| Arc::new(Semaphore::new(n))),
                max_concurrent: t.max_concurrent,
                name: t.name,
                api_key: key,
                adapters: t.adapters,
                base_model: t.base_model,
                admin: t.admin,
                weight: t.weight,
                max_priority: t.max_priority,
                budget: t.tokens_per_minute.map(|n| Arc::new(crate::budget::TokenBudget::new(n))),
            }));
        }
        if tenants.is_empty() {
            return Err("the file defines no [[tenants]]".into());
        }
        Ok(Self { tenants })
    }

    pub fn from_file(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// The tenant whose key is in `authorization: Bearer KEY`.
    pub fn authenticate(&self, authorization: Option<&str>) -> Result<Arc<Tenant>, RouterError> {
        let Some(value) = authorization else {
            return Err(RouterError::Unauthenticated("missing `authorization: Bearer <api key>` metadata".into()));
        };
        let key = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .ok_or_else(|| RouterError::Unauthenticated("authorization must be `Bearer <api key>`".into()))?
            .trim()
            .as_bytes();
        let key = ApiKey::new(key);
        let mut found: Option<&Arc<Tenant>> = None;
        for t in &self.tenants {
            // Every key is compared over the same length, matched or not, so timing tells
            // neither which one matched nor how long the keys are.
            if t.api_key.matches(&key) {
                found = Some(t);
            }
        }
        found.cloned().ok_or_else(|| RouterError::Unauthenticated("unknown api key".into()))
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Tenant>> {
        self.tenants.iter().find(|t| t.name == name)
    }

    /// Every tenant, in file order.
    pub fn all(&self) -> &[Arc<Tenant>] {
        &self.tenants
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
        [[tenants]]
        name = "acme"
        api_key = "acme-key-0123456789"
        adapters = ["acme-gate"]
        max_concurrent = 1

        [[tenants]]
        name = "ops"
        api_key = "ops-key-0123456789ab"
        adapters = ["*"]
        base_model = false
        admin = true
    "#;

    #[test]
    fn keys_adapters_and_limits() {
        let t = Tenants::parse(FILE).unwrap();
        let acme = t.authenticate(Some("Bearer acme-key-0123456789")).unwrap();
        assert_eq!(acme.name, "acme");
        assert!(acme.may_use("") && acme.may_use("acme-gate") && !acme.may_use("other"));
        let ops = t.authenticate(Some("Bearer ops-key-0123456789ab")).unwrap();
        assert!(ops.admin && ops.may_use("anything") && !ops.may_use(""));
        for bad in [None, Some("acme-key-0123456789"), Some("Bearer nope"), Some("Bearer ")] {
            assert!(matches!(t.authenticate(bad), Err(RouterError::Unauthenticated(_))), "{bad:?}");
        }
        let p = acme.admit().unwrap();
        assert!(matches!(acme.admit(), Err(RouterError::ResourceExhausted(_))));
        assert_eq!(acme.in_flight(), 1);
        drop(p);
        assert!(acme.admit().is_ok());
        assert!(!format!("{acme:?}").contains("acme-key"));
    }

    #[test]
    fn bad_files_are_refused_with_the_reason() {
        for (text, needle) in [
            ("", "no [[tenants]]"),
            ("[[tenants]]\nname = \"a\"\napi_key = \"short\"", "at least 16"),
            ("[[tenants]]\nname = \"a\"\napi_key = \"0123456789abcdef\"\nmax_concurrent = 0", "at least 1"),
            ("[[tenants]]\nname = \"a\"\napi_key = \"0123456789abcdef\"\nextra = 1", "unknown field"),
            (
                "[[tenants]]\nname = \"a\"\napi_key = \"0123456789abcdef\"\n[[tenants]]\nname = \"b\"\napi_key = \"0123456789abcdef\"",
                "reuses",
            ),
        ] {
            let e = Tenants::parse(text).unwrap_err();
            assert!(e.contains(needle), "{text}: {e}");
        }
    }

    /// A syntax error names the line, never quotes it: the line may hold a key.
    #[test]
    fn parse_errors_do_not_quote_keys() {
        let text = "[[tenants]]\nname = \"a\"\napi_key = \"super-secret-key-0123456789\" junk\n";
        let e = Tenants::parse(text).unwrap_err();
        assert!(e.starts_with("line 3"), "{e}");
        assert!(!e.contains("super-secret"), "the error quotes the key: {e}");
    }

    /// Keys match exactly: not a prefix, not an extension, not one over the length limit.
    #[test]
    fn keys_match_only_exactly() {
        let t = Tenants::parse("[[tenants]]\nname = \"a\"\napi_key = \"0123456789abcdef\"").expect("parse");
        assert!(t.authenticate(Some("Bearer 0123456789abcdef")).is_ok());
        for wrong in ["0123456789abcde", "0123456789abcdef0", "0123456789abcdeF", &"0".repeat(300)] {
            assert!(t.authenticate(Some(&format!("Bearer {wrong}"))).is_err(), "{wrong}");
        }
        let long = format!("[[tenants]]\nname = \"a\"\napi_key = \"{}\"", "k".repeat(257));
        assert!(Tenants::parse(&long).unwrap_err().contains("at most 256"));
    }
}
