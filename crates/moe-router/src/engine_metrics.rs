//! What the engine reports to the metrics registry: request outcomes, time to first token,
//! inter-token and end-to-end latency, tokens in and out per tenant, queue depth, KV pages, and
//! tokens routed to each (layer, expert), the load that expert placement needs.

use moe_metrics::{Registry, LATENCY_BUCKETS};
use std::time::Duration;

/// The engine's view of the registry.
#[derive(Clone, Debug, Default)]
pub struct EngineMetrics {
    pub registry: Registry,
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
    /// A request's prompt met the prefix cache: `queried` prompt tokens, `hit` of them reused.
    pub fn prefix_cache(&self, tenant: &str, queried: usize, hit: usize) {
        let r = &self.registry;
        let labels = [("tenant", tenant)];
        r.inc(
            "moe_prefix_cache_queries_tokens_total",
            "Prompt tokens looked up in the prefix cache.",
            &labels,
            queried as f64,
        );
        r.inc(
            "moe_prefix_cache_hits_tokens_total",
            "Prompt tokens whose KV came from the prefix cache.",
            &labels,
            hit as f64,
        );
    }

    /// The prefix cache's pages: published (`cached`), of which nobody holds `evictable`, and
    /// evictions so far.
    pub fn prefix_pages(&self, cached: usize, evictable: usize, evicted: u64) {
        let r = &self.registry;
        r.set("moe_prefix_cache_pages", "KV pages kept for reuse by the prefix cache.", &[], cached as f64);
        r.set("moe_prefix_cache_evictable_pages", "Cached KV pages no running request holds.", &[], evictable as f64);
        r.set(
            "moe_prefix_cache_evicted_pages",
            "Cached KV pages evicted to make room (since start).",
            &[],
            evicted as f64,
        );
    }

    pub fn first_token(&self, after: Duration) {
        self.registry.observe(
            "moe_time_to_first_token_seconds",
            "Time from submission to the first generated token.",
            &[],
            &LATENCY_BUCKETS,
            after.as_secs_f64(),
        );
    }

    pub fn next_token(&self, after: Duration) {
        self.registry.observe(
            "moe_inter_token_latency_seconds",
            "Time between consecutive tokens of a request.",
            &[],
            &LATENCY_BUCKETS,
            after.as_secs_f64(),
        );
    }

    /// A request's terminal state (`outcome` from [`outcome_label`]) with its token counts.
    pub fn ended(&self, outcome: &str, tenant: &str, prompt_tokens: usize, generated: usize, total: Duration) {
        let r = &self.registry;
        r.inc("moe_requests_total", "Requests by terminal outcome (or rejection code).", &[("outcome", outcome)], 1.0);
        r.observe(
            "moe_request_duration_seconds",
            "End-to-end time of accepted requests.",
            &[("outcome", outcome)],
            &LATENCY_BUCKETS,
            total.as_secs_f64(),
        );
        r.inc(
            "moe_prompt_tokens_total",
            "Prompt tokens of accepted requests, by tenant.",
            &[("tenant", tenant)],
            prompt_tokens as f64,
        );
        r.inc("moe_generated_tokens_total", "Generated tokens, by tenant.", &[("tenant", tenant)], generated as f64);
    }

    /// A request refused before it reached the engine.
    pub fn rejected(&self, code: tonic::Code) {
        self.registry.inc(
            "moe_requests_total",
            "Requests by terminal outcome (or rejection code).",
            &[("outcome", outcome_label(code))],
            1.0,
        );
    }

    pub fn state(&self, waiting: usize, running: usize, pages_used: usize, pages_total: usize) {
        let r = &self.registry;
        r.set("moe_queue_depth", "Requests waiting for admission.", &[], waiting as f64);
        r.set("moe_running_requests", "Requests in the running batch.", &[], running as f64);
        r.set("moe_kv_cache_pages_used", "KV-cache pages held by requests.", &[], pages_used as f64);
        r.set("moe_kv_cache_pages_total", "KV-cache pages in the pool.", &[], pages_total as f64);
    }

    /// Adds the tokens routed to each expert (`counts[layer * experts + e]`), then zeroes them.
    pub fn expert_tokens(&self, num_experts: usize, counts: &mut [u64]) {
        for (i, c) in counts.iter_mut().enumerate().filter(|(_, c)| **c > 0) {
            let (layer, expert) = ((i / num_experts.max(1)).to_string(), (i % num_experts.max(1)).to_string());
            self.registry.inc(
                "moe_expert_tokens_total",
                "Tokens routed to each expert of each MoE layer.",
                &[("layer", &layer), ("expert", &expert)],
                *c as f64,
            );
            *c = 0;
        }
    }
}
