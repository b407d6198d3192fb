//! Buffers reused across forward calls, so that steady-state decoding does not allocate, and
//! the views a layer's expert call borrows from them.

use crate::adapter::AdapterIdentity;
use crate::experts::{ExpertRoutes, LayerCall};
use moe_compute::{AttentionSeq, Backend, ExpertPlan, FfnScratch};

/// Buffers reused across forward calls so that steady-state decoding does not allocate.
pub struct Workspace<B: Backend> {
    pub(crate) hidden: B::Act,
    pub(crate) normed: B::Act,
    pub(crate) qkv: B::Act,
    pub(crate) attn: B::Act,
    pub(crate) proj: B::Act,
    pub(crate) ffn_out: B::Act,
    pub(crate) shared_out: B::Act,
    pub(crate) gate_logits: B::Act,
    pub(crate) rope: B::Act,
    pub(crate) selected: B::Act,
    pub(crate) logits: B::Act,
    pub(crate) scratch: FfnScratch<B>,
    pub(crate) plan: ExpertPlan,
    pub(crate) choices: Vec<(u32, f32)>,
    pub(crate) host: Vec<f32>,
    pub(crate) ids: Vec<u32>,
    pub(crate) positions: Vec<u32>,
    pub(crate) out_rows: Vec<u32>,
    pub(crate) seqs: Vec<AttentionSeq>,
    pub(crate) page_table: Vec<u32>,
    /// Per item, its recurrent state slots (hybrid models only).
    pub(crate) state_slots: Vec<moe_compute::StateSlots>,
    pub(crate) unserved: Vec<(u32, String)>,
    /// Batch item of every row.
    pub(crate) row_item: Vec<u32>,
    pub(crate) adapter_table: Vec<AdapterIdentity>,
    pub(crate) row_adapter: Vec<u32>,
    /// Tokens routed to each (layer, expert) since the caller last drained them.
    pub(crate) expert_tokens: Vec<u64>,
    /// The same per load key: `[(key * layers + layer) * experts + expert]`.
    pub(crate) keyed_expert_tokens: Vec<u64>,
    /// Load key of every row.
    pub(crate) row_key: Vec<u32>,
    pub(crate) row_request: Vec<u64>,
    /// Latent attention: q (and its low-rank input), the latent KV rows, the heads' values.
    pub(crate) mla_q: B::Act,
    pub(crate) mla_kv: B::Act,
    pub(crate) mla_v: B::Act,
    /// Sigmoid routing's per-row scores.
    pub(crate) route_scratch: Vec<f32>,
    /// Where the forward calls' time went since the caller last took it.
    pub(crate) phases: StepPhases,
}

/// Time of the forward calls by part, nanoseconds (wall time of the calling thread, parallel
/// kernels included): the dense part of every layer (norms, attention, projections, routing),
/// the experts (dispatch and FFN), and the final norm with the LM head.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StepPhases {
    pub dense_ns: u64,
    pub experts_ns: u64,
    pub head_ns: u64,
}

impl StepPhases {
    /// Adds the time since `*since` to `part` and moves `*since` to now.
    pub(crate) fn lap(part: &mut u64, since: &mut std::time::Instant) {
        let now = std::time::Instant::now();
        *part += now.duration_since(*since).as_nanos() as u64;
        *since = now;
    }
}

impl<B: Backend> Workspace<B> {
    /// The expert call of MoE layer `layer` just gated (after `moe_route`), borrowed from this
    /// workspace: what an [`ExpertExecutor`] reads and what it writes.
    pub(crate) fn layer_call<'w>(&'w mut self, backend: &'w B, layer: usize, top_k: usize) -> LayerCall<'w, B> {
        LayerCall {
            backend,
            layer,
            x: &self.normed,
            routes: ExpertRoutes {
                top_k,
                choices: &self.choices,
                plan: &self.plan,
                adapters: &self.adapter_table,
                row_adapter: &self.row_adapter,
                row_request: &self.row_request,
            },
            out: &mut self.ffn_out,
            unserved: &mut self.unserved,
        }
    }

    /// The forward calls' time by part since the last call of this (which zeroes it).
    pub fn take_phases(&mut self) -> StepPhases {
        std::mem::take(&mut self.phases)
    }

    /// Batch rows (in the order of the last forward call's items and tokens) whose experts could
    /// not all be computed, with the reason; their outputs are not to be used.
    pub fn unserved_rows(&self) -> &[(u32, String)] {
        &self.unserved
    }

    /// Tokens routed to each expert (`[layer * num_experts + expert]`) since the caller last
    /// zeroed them: the expert load that placement and metrics need.
    pub fn expert_tokens_mut(&mut self) -> &mut [u64] {
        &mut self.expert_tokens
    }

    /// Tokens routed to each expert per load key (each item's [`BatchItem::load_key`]),
    /// `[(key * num_layers + layer) * num_experts + expert]`, since the caller last zeroed them:
    /// whose tokens make the load (a tenant's gate adapter changes where they go).
    ///
    /// [`BatchItem::load_key`]: crate::BatchItem::load_key
    pub fn keyed_expert_tokens_mut(&mut self) -> &mut [u64] {
        &mut self.keyed_expert_tokens
    }

    pub fn new(backend: &B) -> Self {
        Self {
            hidden: backend.act(),
            normed: backend.act(),
            qkv: backend.act(),
            attn: backend.act(),
            proj: backend.act(),
            ffn_out: backend.act(),
            shared_out: backend.act(),
            gate_logits: backend.act(),
            rope: backend.act(),
            selected: backend.act(),
            logits: backend.act(),
            scratch: FfnScratch::new(backend),
            plan: ExpertPlan::default(),
            choices: Vec::new(),
            host: Vec::new(),
            ids: Vec::new(),
            positions: Vec::new(),
            out_rows: Vec::new(),
            seqs: Vec::new(),
            page_table: Vec::new(),
            state_slots: Vec::new(),
            unserved: Vec::new(),
            row_item: Vec::new(),
            adapter_table: Vec::new(),
            row_adapter: Vec::new(),
            expert_tokens: Vec::new(),
            keyed_expert_tokens: Vec::new(),
            row_key: Vec::new(),
            row_request: Vec::new(),
            mla_q: backend.act(),
            mla_kv: backend.act(),
            mla_v: backend.act(),
            route_scratch: Vec::new(),
            phases: StepPhases::default(),
        }
    }
}
