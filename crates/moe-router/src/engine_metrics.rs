//! What the engine reports to the metrics registry: request outcomes, time to first token,
//! inter-token and end-to-end latency, tokens in and out per tenant, queue depth, KV pages, and
//! tokens routed to each (layer, expert), the load that expert placement needs.

use moe_metrics::{Counter, Family, Gauge, Histogram, LatencyFamily, Registry};
use std::time::Duration;

type OutcomeLabel = [(&'static str, &'static str); 1];
type TenantLabel = [(&'static str, String); 1];
type TenantKindLabel = [(&'static str, String); 2];
type ExpertLabel = [(&'static str, u32); 2];

/// The engine's metric families, registered once in a [`Registry`] and cloned into whatever
/// records them. Per-token and per-step recording is an atomic add (no lookup by name, no
/// allocation); per-request recording with a tenant label builds that one label.
#[derive(Clone, Debug)]
pub struct EngineMetrics {
    requests: Family<OutcomeLabel, Counter>,
    request_duration: LatencyFamily<OutcomeLabel>,
    prompt_tokens: Family<TenantLabel, Counter>,
    generated_tokens: Family<TenantLabel, Counter>,
    prefix_queried: Family<TenantLabel, Counter>,
    prefix_hits: Family<TenantLabel, Counter>,
    prefix_pages: Gauge,
    prefix_evictable: Gauge,
    prefix_evicted: Gauge,
    time_to_first_token: Histogram,
    inter_token: Histogram,
    queue_depth: Gauge,
    running: Gauge,
    pages_used: Gauge,
    pages_total: Gauge,
    expert_tokens: Family<ExpertLabel, Counter>,
    constrained: Family<OutcomeLabel, Counter>,
    constraint_mask: Histogram,
    scheduled_tokens: Family<TenantKindLabel, Counter>,
    queue_time: LatencyFamily<TenantLabel>,
    preemptions: Family<TenantLabel, Counter>,
    budget_refusals: Family<TenantLabel, Counter>,
}

/// How an accepted request ended, as the `outcome` label.
pub fn outcome_label(code: tonic::Code) -> &'static str {
    match code {
        tonic::Code::Ok => "ok",
        tonic::Code::Cancelled => "cancelled",
        tonic::Code::InvalidArgument => "invalid_argument",
        tonic::Code::NotFound => "not_found",
        tonic::Code::ResourceExhausted => "resource_exhausted",
        tonic::Code::Unavailable => "unavailable",
        tonic::Code::DeadlineExceeded => "deadline_exceeded",
        tonic::Code::Unauthenticated => "unauthenticated",
        tonic::Code::PermissionDenied => "permission_denied",
        tonic::Code::FailedPrecondition => "failed_precondition",
        _ => "internal",
    }
}

impl EngineMetrics {
    /// Registers the engine's families in `r` (or finds them there, registered before).
    pub fn new(r: &Registry) -> Self {
        Self {
            requests: r.counter_family("moe_requests_total", "Requests by terminal outcome (or rejection code)."),
            request_duration: r.latency_family("moe_request_duration_seconds", "End-to-end time of accepted requests."),
            prompt_tokens: r
                .counter_family("moe_prompt_tokens_total", "Prompt tokens of accepted requests, by tenant."),
            generated_tokens: r.counter_family("moe_generated_tokens_total", "Generated tokens, by tenant."),
            prefix_queried: r.counter_family(
                "moe_prefix_cache_queries_tokens_total",
                "Prompt tokens looked up in the prefix cache.",
            ),
            prefix_hits: r.counter_family(
                "moe_prefix_cache_hits_tokens_total",
                "Prompt tokens whose KV came from the prefix cache.",
            ),
            prefix_pages: r.gauge("moe_prefix_cache_pages", "KV pages kept for reuse by the prefix cache."),
            prefix_evictable: r.gauge("moe_prefix_cache_evictable_pages", "Cached KV pages no running request holds."),
            prefix_evicted: r
                .gauge("moe_prefix_cache_evicted_pages", "Cached KV pages evicted to make room (since start)."),
            time_to_first_token: r
                .latency("moe_time_to_first_token_seconds", "Time from submission to the first generated token."),
            inter_token: r.latency("moe_inter_token_latency_seconds", "Time between consecutive tokens of a request."),
            queue_depth: queue_depth(r),
            running: running_requests(r),
            pages_used: kv_pages_used(r),
            pages_total: kv_pages_total(r),
            expert_tokens: r
                .counter_family("moe_expert_tokens_total", "Tokens routed to each expert of each MoE layer."),
            constrained: r.counter_family(
                "moe_constrained_requests_total",
                "Requests admitted with an output constraint, by kind (json_schema, json_object, regex, lark).",
            ),
            constraint_mask: r.latency(
                "moe_constraint_mask_seconds",
                "Time to compute one constrained request's token mask (during the forward pass).",
            ),
            scheduled_tokens: r.counter_family(
                "moe_scheduled_tokens_total",
                "Tokens computed per tenant, by kind (prefill: prompt and recomputed; decode: generated).",
            ),
            queue_time: r.latency_family(
                "moe_queue_seconds",
                "Time from submission to first admission into the batch, by tenant.",
            ),
            preemptions: r.counter_family("moe_preemptions_total", "Running requests preempted, by tenant."),
            budget_refusals: r.counter_family(
                "moe_budget_refusals_total",
                "Requests refused because the tenant's token budget was spent.",
            ),
        }
    }

    /// The counters of tokens computed for `tenant`, prefill then decode: looked up once per
    /// request, so that each step's recording is an atomic add.
    pub fn scheduled(&self, tenant: &str) -> (Counter, Counter) {
        let series = |kind: &str| {
            self.scheduled_tokens.get_or_create(&[("tenant", tenant.to_string()), ("kind", kind.to_string())]).clone()
        };
        (series("prefill"), series("decode"))
    }

    /// A request entered the batch for the first time after waiting `waited`.
    pub fn queued(&self, tenant: &str, waited: Duration) {
        self.queue_time.get_or_create(&[("tenant", tenant.to_string())]).observe(waited.as_secs_f64());
    }

    pub fn preempted(&self, tenant: &str) {
        self.preemptions.get_or_create(&[("tenant", tenant.to_string())]).inc();
    }

    pub fn budget_refused(&self, tenant: &str) {
        self.budget_refusals.get_or_create(&[("tenant", tenant.to_string())]).inc();
    }

    /// A request's prompt met the prefix cache: `queried` prompt tokens, `hit` of them reused.
    pub fn prefix_cache(&self, tenant: &str, queried: usize, hit: usize) {
        let labels = [("tenant", tenant.to_string())];
        self.prefix_queried.get_or_create(&labels).inc_by(queried as u64);
        self.prefix_hits.get_or_create(&labels).inc_by(hit as u64);
    }

    /// The prefix cache's pages: published (`cached`), of which nobody holds `evictable`, and
    /// evictions so far.
    pub fn prefix_pages(&self, cached: usize, evictable: usize, evicted: u64) {
        self.prefix_pages.set(cached as i64);
        self.prefix_evictable.set(evictable as i64);
        self.prefix_evicted.set(evicted as i64);
    }

    /// A request with an output constraint of `kind` was admitted.
    pub fn constrained(&self, kind: &'static str) {
        self.constrained.get_or_create(&[("kind", kind)]).inc();
    }

    /// The mask-time histogram (a handle for the thread that computes masks).
    pub fn constraint_mask_seconds(&self) -> Histogram {
        self.constraint_mask.clone()
    }

    pub fn first_token(&self, after: Duration) {
        self.time_to_first_token.observe(after.as_secs_f64());
    }

    pub fn next_token(&self, after: Duration) {
        self.inter_token.observe(after.as_secs_f64());
    }

    /// A request's terminal state (`outcome` from [`outcome_label`]) with its token counts.
    pub fn ended(&self, outcome: &'static str, tenant: &str, prompt_tokens: usize, generated: usize, total: Duration) {
        let by_outcome = [("outcome", outcome)];
        self.requests.get_or_create(&by_outcome).inc();
        self.request_duration.get_or_create(&by_outcome).observe(total.as_secs_f64());
        let by_tenant = [("tenant", tenant.to_string())];
        self.prompt_tokens.get_or_create(&by_tenant).inc_by(prompt_tokens as u64);
        self.generated_tokens.get_or_create(&by_tenant).inc_by(generated as u64);
    }

    /// A request refused before it reached the engine.
    pub fn rejected(&self, code: tonic::Code) {
        self.requests.get_or_create(&[("outcome", outcome_label(code))]).inc();
    }

    pub fn state(&self, waiting: usize, running: usize, pages_used: usize, pages_total: usize) {
        self.queue_depth.set(waiting as i64);
        self.running.set(running as i64);
        self.pages_used.set(pages_used as i64);
        self.pages_total.set(pages_total as i64);
    }

    /// Adds the tokens routed to each expert (`counts[layer * experts + e]`), then zeroes them.
    pub fn expert_tokens(&self, num_experts: usize, counts: &mut [u64]) {
        let per_layer = num_experts.max(1);
        for (i, c) in counts.iter_mut().enumerate().filter(|(_, c)| **c > 0) {
            let labels = [("layer", (i / per_layer) as u32), ("expert", (i % per_layer) as u32)];
            self.expert_tokens.get_or_create(&labels).inc_by(*c);
            *c = 0;
        }
    }
}

/// Gauges that the engine sets after each step and the HTTP scrape refreshes from the engine's
/// counters (so they are current even while the engine is idle).
pub fn queue_depth(r: &Registry) -> Gauge {
    r.gauge("moe_queue_depth", "Requests waiting for admission.")
}

pub fn running_requests(r: &Registry) -> Gauge {
    r.gauge("moe_running_requests", "Requests in the running batch.")
}

pub fn kv_pages_used(r: &Registry) -> Gauge {
    r.gauge("moe_kv_cache_pages_used", "KV-cache pages held by requests.")
}

pub fn kv_pages_total(r: &Registry) -> Gauge {
    r.gauge("moe_kv_cache_pages_total", "KV-cache pages in the pool.")
}
