//! Who may do what, applied before a request reaches the engine: the tenant behind the API key,
//! its right to the requested adapter, its concurrency slot, and the adapter itself, loaded on
//! a blocking thread (so a load never stalls the engine's batch) and pinned for the request.

use crate::engine::Engine;
use crate::error::RouterError;
use crate::request::{GenerationParams, PromptInput, ValidatedRequest};
use crate::tenants::Tenant;
use moe_lora::validate_id;
use std::sync::Arc;
use tokio::sync::OwnedSemaphorePermit;

/// What a request holds while it runs: its tenant's slot and its pinned adapter.
#[derive(Default)]
pub struct Admission {
    pub adapter: Option<moe_lora::AdapterPin>,
    /// The tenant's name, when tenants are configured.
    pub tenant: Option<String>,
    /// The tenant's share weight, highest priority and token budget (see [`Admission::apply`]).
    weight: f64,
    max_priority: Option<i32>,
    budget: Option<Arc<crate::budget::TokenBudget>>,
    /// Held, not read: dropping it frees the tenant's slot.
    _permit: Option<OwnedSemaphorePermit>,
}

impl Admission {
    /// Gives a validated request its tenant: the name, the share weight fair scheduling divides
    /// its service by, its priority lowered to the tenant's `max_priority`, and the token budget
    /// the engine spends its tokens from.
    pub fn apply(&self, req: &mut ValidatedRequest) {
        req.tenant = self.tenant.clone();
        req.share_weight = self.weight;
        if let Some(max) = self.max_priority {
            req.priority = req.priority.min(max);
        }
        req.budget = self.budget.clone();
    }
}

/// The caller's tenant from its `authorization` value (gRPC metadata or HTTP header), when
/// tenants are configured (`None` when they are not).
pub fn authenticate(engine: &Engine, authorization: Option<&str>) -> Result<Option<Arc<Tenant>>, RouterError> {
    let Some(tenants) = engine.tenants() else { return Ok(None) };
    tenants.authenticate(authorization).map(Some)
}

/// Requires an admin tenant when tenants are configured; `what` names the refused action in
/// the error ("manage adapters", "read the expert load").
pub fn require_admin(engine: &Engine, authorization: Option<&str>, what: &str) -> Result<(), RouterError> {
    match authenticate(engine, authorization)? {
        Some(t) if !t.admin => {
            Err(RouterError::PermissionDenied(format!("tenant {:?} may not {what} (an admin key is needed)", t.name)))
        }
        _ => Ok(()),
    }
}

/// Checks the tenant's rights, takes its concurrency slot, and loads and pins the adapter.
pub async fn admit(engine: &Engine, authorization: Option<&str>, adapter_id: &str) -> Result<Admission, RouterError> {
    let mut admission = entitle(engine, authorization, adapter_id)?;
    pin_adapter(engine, &mut admission, adapter_id).await?;
    Ok(admission)
}

/// The cheap part of [`admit`], which every front end runs before any costly work (tokenizing,
/// compiling a constraint, replaying a resume, loading an adapter): the tenant's right to the
/// adapter and its concurrency slot. So a tenant limited to one request cannot keep many
/// compiles running, nor make this router work for an adapter it may not use.
pub fn entitle(engine: &Engine, authorization: Option<&str>, adapter_id: &str) -> Result<Admission, RouterError> {
    let tenant = authenticate(engine, authorization)?;
    if !adapter_id.is_empty() {
        validate_id(adapter_id)?;
    }
    if let Some(t) = &tenant {
        if !t.may_use(adapter_id) {
            return Err(RouterError::PermissionDenied(if adapter_id.is_empty() {
                format!("tenant {:?} must name one of its adapters", t.name)
            } else {
                format!("tenant {:?} may not use adapter {adapter_id:?}", t.name)
            }));
        }
    }
    let permit = match &tenant {
        Some(t) => t.admit().inspect_err(|e| {
            if matches!(e, RouterError::RateLimited { .. }) {
                engine.record_budget_refusal(&t.name);
            }
        })?,
        None => None,
    };
    if let Some(t) = &tenant {
        tracing::debug!(tenant = %t.name, adapter = adapter_id, "entitled");
    }
    Ok(Admission {
        adapter: None,
        weight: tenant.as_ref().map_or(1.0, |t| t.weight),
        max_priority: tenant.as_ref().map(|t| t.max_priority),
        budget: tenant.as_ref().and_then(|t| t.budget.clone()),
        tenant: tenant.map(|t| t.name.clone()),
        _permit: permit,
    })
}

/// Loads (on a blocking thread) and pins the adapter into an [`entitle`]d admission.
pub async fn pin_adapter(engine: &Engine, admission: &mut Admission, adapter_id: &str) -> Result<(), RouterError> {
    admission.adapter = if adapter_id.is_empty() {
        None
    } else {
        let registry = engine.adapters().cloned().ok_or_else(|| {
            RouterError::NotFound(format!("adapter {adapter_id:?}: this router serves no adapters (no --adapter-dir)"))
        })?;
        let id = adapter_id.to_string();
        let loaded = match registry.pin_resident(&id) {
            Some(a) => a,
            None => tokio::task::spawn_blocking(move || registry.pin(&id))
                .await
                .map_err(|e| RouterError::Internal(format!("adapter load task: {e}")))??,
        };
        Some(loaded)
    };
    Ok(())
}

/// The scope a request's compiled constraint is cached under: its tenant (another tenant's
/// timing must not tell it whether the same schema was sent), or one scope for all when the
/// prefix cache is configured global (tenants share by choice).
pub fn constraint_scope(engine: &Engine, admission: &Admission) -> String {
    match engine.config().prefix_cache_scope {
        crate::PrefixCacheScope::Global => String::new(),
        _ => admission.tenant.clone().unwrap_or_default(),
    }
}

/// The adapter info of the public API.
pub fn adapter_info(a: &moe_lora::AdapterInfo) -> moe_proto::v1::AdapterInfo {
    moe_proto::v1::AdapterInfo {
        id: a.id.clone(),
        path: a.path.clone(),
        resident: a.resident,
        pinned: a.pinned as u32,
        bytes: a.bytes as u64,
        digest: a.digest.clone(),
    }
}

/// Validates a request for `engine` as every front end must: text over `--max-prompt-bytes` is
/// refused before any tokenizer work, and tokenization runs on a blocking thread, never on the
/// async runtime. Call it after [`authenticate`], so an unauthenticated request does no work.
pub async fn validate(
    engine: &Engine,
    prompt: PromptInput,
    params: GenerationParams,
) -> Result<ValidatedRequest, RouterError> {
    if let PromptInput::Text(text) = &prompt {
        check_text_size(engine, "prompt", text)?;
    }
    let (codec, config) = (engine.codec_arc(), engine.model_config_arc());
    let timeout = engine.config().default_timeout;
    tokio::task::spawn_blocking(move || ValidatedRequest::new(prompt, &params, &codec, &config, timeout))
        .await
        .map_err(|e| RouterError::Internal(format!("validation task: {e}")))?
}

/// Refuses text over `--max-prompt-bytes` (INVALID_ARGUMENT naming `field` and the limit).
pub fn check_text_size(engine: &Engine, field: &'static str, text: &str) -> Result<(), RouterError> {
    let max = engine.config().max_prompt_bytes;
    if text.len() > max {
        return Err(RouterError::invalid(
            field,
            format!("{} bytes of text; this router accepts at most {max} (--max-prompt-bytes)", text.len()),
        ));
    }
    Ok(())
}
