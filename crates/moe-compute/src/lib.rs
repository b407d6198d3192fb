//! `moe-compute` owns the device abstraction: the [`Backend`] trait with every numeric operation
//! the model needs, and the always-built CPU backend ([`cpu::CpuBackend`]).
//!
//! Everything above this crate is written against [`Backend`] only; [`on_device`] is the one
//! place a [`Device`] becomes a backend, so a CUDA backend is added here (its module and
//! `select.rs`) without touching the model, router, worker or dispatch code. Weights, activations and the paged KV store are
//! backend-owned associated types; routing decisions come back to the host as small tables.
//! This crate does not know about checkpoints, tokenizers or architectures.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
mod device;
mod error;
pub mod gpu_plan;
pub mod kernels;
mod layout;
mod plan;
pub mod rng;
mod select;

pub use device::Device;
pub use error::{ComputeError, Result};
pub use layout::{KvLayout, StateLayout};
pub use plan::ExpertPlan;
pub use select::{on_device, OnBackend};

use std::ops::Range;

/// The shape of a gated DeltaNet layer (Qwen3-Next's linear attention). Its input projection's
/// columns are, in order: q (`k_heads·k_head_dim`), k (same), v (`v_heads·v_head_dim`), z (same),
/// then b and a (`v_heads` each); q, k and v pass through the causal depthwise convolution.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DeltaNetShape {
    pub k_heads: usize,
    pub v_heads: usize,
    pub k_head_dim: usize,
    pub v_head_dim: usize,
    pub conv_kernel: usize,
    /// Epsilon of the gated RMSNorm on each value head's output.
    pub norm_eps: f32,
}

impl DeltaNetShape {
    pub fn key_dim(&self) -> usize {
        self.k_heads * self.k_head_dim
    }
    pub fn value_dim(&self) -> usize {
        self.v_heads * self.v_head_dim
    }
    /// Channels of the convolution: q, k and v.
    pub fn conv_dim(&self) -> usize {
        2 * self.key_dim() + self.value_dim()
    }
    /// Columns of the input projection.
    pub fn proj_cols(&self) -> usize {
        self.conv_dim() + self.value_dim() + 2 * self.v_heads
    }
    /// f32 values of one sequence's state in one layer: the convolution's last `conv_kernel - 1`
    /// inputs per channel, then the `[k_head_dim, v_head_dim]` matrix of every value head.
    pub fn state_floats(&self) -> usize {
        self.conv_dim() * (self.conv_kernel - 1) + self.v_heads * self.k_head_dim * self.v_head_dim
    }
}

/// A gated DeltaNet layer's weights besides its projections.
pub struct DeltaNetWeights<B: Backend> {
    /// The depthwise convolution, `[conv_dim, conv_kernel]`.
    pub conv: B::Vector,
    /// `dt_bias`, per value head.
    pub dt_bias: B::Vector,
    /// `-exp(A_log)`, per value head: the decay is `exp(decay_rate · softplus(a + dt_bias))`.
    pub decay_rate: B::Vector,
    /// The gated RMSNorm's weight, `[v_head_dim]`.
    pub norm: B::Vector,
}

/// Where a sequence's recurrent state is read from and written to (slots of [`StateLayout`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StateSlots {
    pub read: u32,
    pub write: u32,
    /// The state starts from zeros (a new sequence) rather than from `read`.
    pub fresh: bool,
}

/// Where q, k and v live inside the fused qkv activation rows, and how heads are grouped.
#[derive(Clone, Copy, Debug)]
pub struct AttentionShape<'a> {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub q_col: usize,
    pub k_col: usize,
    pub v_col: usize,
    pub scale: f32,
    /// Keys further back than this many positions are masked (Mixtral-style sliding window).
    pub sliding_window: Option<usize>,
    /// Per query head, a learned logit that joins every row's softmax and takes its share of the
    /// probability without contributing a value (gpt-oss's attention sinks).
    pub sinks: Option<&'a [f32]>,
}

/// One sequence's slice of a batched attention call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttentionSeq {
    /// Rows of the batch activations holding this sequence's new tokens.
    pub rows: Range<usize>,
    /// Tokens already in the KV cache before these rows; the first new row is at this position.
    pub start_pos: usize,
    /// This sequence's page ids, in order, as a range of the call's flat page table; they must
    /// cover `start_pos + rows.len()` slots.
    pub pages: Range<usize>,
}

/// One expert's (or a dense MLP's) SwiGLU weights: `gate_up` is `[2*I, H]` (gate rows first, then
/// up rows), `down` is `[H, I]`; optional biases (gpt-oss) and the gated activation.
pub struct SwigluWeights<B: Backend> {
    pub gate_up: B::Matrix,
    pub down: B::Matrix,
    /// `[2*I]`, added after the gate/up projection (gate entries first, then up).
    pub gate_up_bias: Option<B::Vector>,
    /// `[H]`, added after the down projection.
    pub down_bias: Option<B::Vector>,
    pub glu: Glu,
}

impl<B: Backend> SwigluWeights<B> {
    /// Plain SwiGLU without biases (every architecture but gpt-oss).
    pub fn plain(gate_up: B::Matrix, down: B::Matrix) -> Self {
        Self { gate_up, down, gate_up_bias: None, down_bias: None, glu: Glu::Silu }
    }

    /// Whether this FFN needs more than plain SwiGLU (biases or another activation).
    pub fn is_plain(&self) -> bool {
        self.gate_up_bias.is_none() && self.down_bias.is_none() && self.glu == Glu::Silu
    }
}

/// The gated activation between the projections.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Glu {
    /// `silu(gate) * up`.
    Silu,
    /// gpt-oss: `gate' = min(gate, limit)`, `up' = clamp(up, ±limit)`,
    /// `(up' + 1) * gate' * sigmoid(alpha * gate')`.
    ClampedSigmoid { alpha: f32, limit: f32 },
}

/// Reusable buffers for [`Backend::expert_ffn`], [`Backend::swiglu`] and [`Backend::lora_add`],
/// so that the decode loop does not allocate.
pub struct FfnScratch<B: Backend> {
    pub rows: B::Act,
    pub gate_up: B::Act,
    pub hidden: B::Act,
    pub out: B::Act,
    pub lora_shrink: B::Act,
    pub lora_expand: B::Act,
    /// Grouped products: each expert's (first row, rows), and the kernel's task list.
    pub segments: Vec<(usize, usize)>,
    pub tasks: Vec<(usize, usize, usize)>,
}

impl<B: Backend> FfnScratch<B> {
    pub fn new(backend: &B) -> Self {
        Self {
            rows: backend.act(),
            gate_up: backend.act(),
            hidden: backend.act(),
            out: backend.act(),
            lora_shrink: backend.act(),
            lora_expand: backend.act(),
            segments: Vec::new(),
            tasks: Vec::new(),
        }
    }
}

/// One low-rank pair of a LoRA adapter: `a` is `[r, in]`, `b` is `[out, r]`, and the layer's
/// output gains `scale · x · Aᵀ · Bᵀ` (the same as using the merged weight `W + scale · B·A`).
pub struct LoraWeights<B: Backend> {
    pub a: B::Matrix,
    pub b: B::Matrix,
    pub scale: f32,
}

/// An adapter's pairs for one expert's SwiGLU: on its gate and up projections (added into the
/// fused `[gate | up]` activation) and on its down projection.
pub struct ExpertLora<B: Backend> {
    pub gate: Option<LoraWeights<B>>,
    pub up: Option<LoraWeights<B>>,
    pub down: Option<LoraWeights<B>>,
}

/// Which LoRA pair each row of a batch uses (`None`: the base weights only). Rows of many
/// adapters share one call; the backend gathers each row's pair, as the BGMV/SGMV kernels do.
pub type RowLora<'l, B> = dyn Fn(usize) -> Option<&'l LoraWeights<B>> + Sync + 'l;

/// Where each head's slice of an activation lies for a per-head operation: head `h` reads
/// `x[r, x_col + h·x_stride ..]` and writes `out_width` values at `out[r, out_col + h·out_stride ..]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeadCols {
    pub heads: usize,
    pub x_col: usize,
    pub x_stride: usize,
    pub out_col: usize,
    pub out_stride: usize,
    pub out_width: usize,
}

/// Which expert LoRA a row of an expert call uses for expert `e` (`row`, `e`) → pairs.
pub type RowExpertLora<'l, B> = dyn Fn(usize, usize) -> Option<&'l ExpertLora<B>> + Sync + 'l;

/// The operations a compute device provides. Activations are row-major `[rows, cols]` f32;
/// matrices are `[out, in]` as in a Hugging Face `Linear` (so `linear` computes `x · Wᵀ`).
/// Accumulation is always f32.
pub trait Backend: Clone + Send + Sync + 'static {
    type Matrix: Send + Sync;
    type Vector: Send + Sync;
    type Act: Send;
    type KvStore: Send;

    /// A short name for logs, e.g. `cpu (2 threads)`.
    fn name(&self) -> String;
    /// The device this backend computes on.
    fn device(&self) -> Device;

    /// The arithmetic this backend computes, as workers announce it in membership: replicas
    /// with the same value give the same bits for the same rows, so a router may fail over or
    /// hedge between them (see `moe_dispatch::plan_membership`).
    fn numerics(&self) -> String {
        self.name()
    }

    fn matrix(&self, rows: usize, cols: usize, data: Vec<f32>) -> Result<Self::Matrix>;
    /// A bf16 matrix of random benchmark weights made where weights live: element i is
    /// [`gpu_plan::draws::random_bf16`]`(seed, i, scale)` on every backend (default: host cores).
    fn random_matrix_bf16(&self, rows: usize, cols: usize, seed: u64, scale: f32) -> Result<Self::Matrix> {
        let data = gpu_plan::draws::random_bf16_vec(rows * cols, seed, scale);
        self.matrix_bf16(rows, cols, data)
    }
    /// A matrix from raw bf16 bits, kept as bf16 where the backend can (the default widens).
    fn matrix_bf16(&self, rows: usize, cols: usize, data: Vec<u16>) -> Result<Self::Matrix> {
        let widened = data.into_iter().map(|b| f32::from_bits((b as u32) << 16)).collect();
        self.matrix(rows, cols, widened)
    }
    /// An adapter's low-rank factor (`A` or `B`): kept in f32 where the backend would round
    /// checkpoint weights (the GPU's BGMV kernels read f32 factors).
    fn lora_matrix(&self, rows: usize, cols: usize, data: Vec<f32>) -> Result<Self::Matrix> {
        self.matrix(rows, cols, data)
    }
    /// Refuses, naming the numbers, when `bytes` more would not fit in the device's memory (the
    /// model loader asks before loading weights; hosts' memory is not checked).
    fn ensure_room(&self, _what: &str, _bytes: usize) -> Result<()> {
        Ok(())
    }
    /// Bytes per key or value element in this backend's KV store (the engine sizes its page
    /// count from the KV budget with it): 4 for f32, 2 for bf16.
    fn kv_bytes_per_value(&self) -> usize {
        4
    }
    fn matrix_shape(&self, m: &Self::Matrix) -> (usize, usize);
    /// The bytes a matrix's values take on this backend (expert memory budgets count these).
    fn matrix_bytes(&self, m: &Self::Matrix) -> usize {
        let (r, c) = self.matrix_shape(m);
        r * c * 4
    }
    fn vector(&self, data: Vec<f32>) -> Result<Self::Vector>;
    fn kv_store(&self, layout: KvLayout) -> Result<Self::KvStore>;

    /// An empty activation buffer; ops resize their outputs, reusing capacity.
    fn act(&self) -> Self::Act;
    fn act_shape(&self, a: &Self::Act) -> (usize, usize);
    fn upload(&self, rows: usize, cols: usize, data: &[f32], out: &mut Self::Act);
    fn download(&self, a: &Self::Act, out: &mut Vec<f32>);
    /// Routes gate `logits` ([rows, experts]) where they are, `k` `(expert, weight)` pairs per row
    /// into `out` with the host's bits ([`gpu_plan::routing`]); false (default): route on the host.
    fn route_rows(
        &self,
        _logits: &Self::Act,
        _rule: &gpu_plan::routing::GateRule,
        _bias: Option<&[f32]>,
        _k: usize,
        _out: &mut Vec<(u32, f32)>,
    ) -> bool {
        false
    }

    /// `out[i] = table[ids[i]]`. Ids must already be validated against the table's rows.
    fn embed(&self, table: &Self::Matrix, ids: &[u32], out: &mut Self::Act) -> Result<()>;
    /// `out = x · Wᵀ (+ bias)`.
    fn linear(&self, x: &Self::Act, w: &Self::Matrix, bias: Option<&Self::Vector>, out: &mut Self::Act);
    /// Row-wise RMSNorm: `out = x / sqrt(mean(x²) + eps) * w`.
    fn rms_norm(&self, x: &Self::Act, w: &Self::Vector, eps: f32, out: &mut Self::Act);
    /// In place RMSNorm of the columns `cols` of every row, in groups of `group` columns, each
    /// group scaled by `w` (length `group`). Per-head q/k norm uses `group = head_dim`; a norm
    /// over the whole projection uses `group = cols.len()`.
    fn rms_norm_cols(&self, x: &mut Self::Act, cols: Range<usize>, group: usize, w: &Self::Vector, eps: f32);
    /// Clamp every element to `[-limit, limit]`.
    fn clamp(&self, x: &mut Self::Act, limit: f32);
    /// Rotary tables for the given positions: row i holds `cos` then `sin`, `inv_freq.len()` each,
    /// both multiplied by `scale` (YaRN's attention factor; 1 otherwise).
    fn rope_table(&self, positions: &[u32], inv_freq: &[f32], scale: f32, out: &mut Self::Act);
    /// Rotate-half rotary embedding in place on `n_heads` heads that start `head_dim` columns
    /// apart from `col`; the first `table.cols` columns of each head rotate (all of them for
    /// full rotary, a prefix for partial rotary or a decoupled rope part), the rest pass through.
    fn rope(&self, x: &mut Self::Act, col: usize, n_heads: usize, head_dim: usize, table: &Self::Act);
    /// Writes the new rows' k and v into the store, then computes causal attention of their q
    /// over everything cached; `out` is `[rows, n_heads*head_dim]`. `page_table` holds the page
    /// ids of all sequences back to back (each [`AttentionSeq::pages`] indexes into it).
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        qkv: &Self::Act,
        shape: &AttentionShape<'_>,
        seqs: &[AttentionSeq],
        page_table: &[u32],
        store: &mut Self::KvStore,
        layer: usize,
        out: &mut Self::Act,
    ) -> Result<()>;
    /// `x += y`.
    fn add(&self, x: &mut Self::Act, y: &Self::Act);
    /// `out = x` restricted to `rows`, in that order.
    fn gather_rows(&self, x: &Self::Act, rows: &[u32], out: &mut Self::Act);
    /// Dense SwiGLU MLP: `out = down(silu(gate(x)) * up(x))`.
    fn swiglu(&self, x: &Self::Act, w: &SwigluWeights<Self>, scratch: &mut FfnScratch<Self>, out: &mut Self::Act);
    /// Grouped expert FFN: for each expert of `plan`, runs its SwiGLU on the rows routed to it (as
    /// one matrix multiply per weight) and adds `weight * result` into those rows of `out`.
    /// `out` must already be `[x.rows, H]` (zeroed or holding other contributions).
    fn expert_ffn(
        &self,
        x: &Self::Act,
        experts: &[SwigluWeights<Self>],
        plan: &ExpertPlan,
        scratch: &mut FfnScratch<Self>,
        out: &mut Self::Act,
    );
    /// Batched multi-adapter LoRA: for every row r of `x` whose `lora(r)` is a pair,
    /// `out[r, col..col + out_dim] += scale · (x_r · Aᵀ) · Bᵀ`. Rows without a pair are untouched.
    fn lora_add(
        &self,
        x: &Self::Act,
        lora: &RowLora<'_, Self>,
        col: usize,
        s: &mut FfnScratch<Self>,
        out: &mut Self::Act,
    );
    /// Per-head multi-adapter LoRA (absorbed latent attention's `kv_b_proj` pairs): for every row r
    /// with a pair and every head h, `out[r, out_col + h·out_stride ..][..out_width] += scale ·
    /// B_h · (A_h · x_h)` with `x_h = x[r, x_col + h·x_stride ..][..A.cols]`. A is `[rank, in]`
    /// (shared by the heads) or `[heads·rank, in]` (A_h its h-th block of rows), B likewise
    /// `[out_width, rank]` or `[heads·out_width, rank]`.
    fn lora_add_heads(
        &self,
        x: &Self::Act,
        lora: &RowLora<'_, Self>,
        cols: HeadCols,
        s: &mut FfnScratch<Self>,
        out: &mut Self::Act,
    ) -> Result<()> {
        let _ = (x, lora, cols, s, out);
        Err(ComputeError::Unsupported { op: "lora_add_heads (LoRA on latent attention)", backend: self.name() })
    }
    /// [`Backend::expert_ffn`] where each (row, expert) may also carry an adapter's expert LoRA.
    fn expert_ffn_lora(
        &self,
        x: &Self::Act,
        experts: &[SwigluWeights<Self>],
        plan: &ExpertPlan,
        lora: &RowExpertLora<'_, Self>,
        scratch: &mut FfnScratch<Self>,
        out: &mut Self::Act,
    );
    /// Per-head matrix multiply: for every row r and head h < `n_heads`,
    /// `out[r, out_col + h·out_stride ..][..n] = x[r, x_col + h·x_stride ..][..k] · W_hᵀ`, where
    /// `w` is `[n_heads·n, k]` and `W_h` its rows `h·n..(h+1)·n`. `out` must already have `x`'s
    /// rows; other columns are untouched. (Absorbed multi-head latent attention.)
    #[allow(clippy::too_many_arguments)]
    fn head_linear(
        &self,
        x: &Self::Act,
        x_col: usize,
        x_stride: usize,
        n_heads: usize,
        w: &Self::Matrix,
        out: &mut Self::Act,
        out_col: usize,
        out_stride: usize,
    ) -> Result<()> {
        let _ = (x, x_col, x_stride, n_heads, w, out, out_col, out_stride);
        Err(ComputeError::Unsupported { op: "head_linear (latent attention)", backend: self.name() })
    }
    /// Strided column copy: for every row r and block i < `blocks`,
    /// `dst[r, dst_col + i·dst_stride ..][..width] = src[r, src_col + i·src_stride ..][..width]`.
    /// `dst` must already have `src`'s rows.
    #[allow(clippy::too_many_arguments)]
    fn copy_cols(
        &self,
        src: &Self::Act,
        src_col: usize,
        src_stride: usize,
        width: usize,
        blocks: usize,
        dst: &mut Self::Act,
        dst_col: usize,
        dst_stride: usize,
    ) -> Result<()> {
        let _ = (src, src_col, src_stride, width, blocks, dst, dst_col, dst_stride);
        Err(ComputeError::Unsupported { op: "copy_cols (latent attention)", backend: self.name() })
    }
    /// Whether [`Backend::head_linear`], [`Backend::copy_cols`] and a KV store whose values are
    /// its keys work here (multi-head latent attention); the model refuses to load otherwise.
    fn supports_latent_attention(&self) -> bool {
        false
    }
    /// Whether attention sinks ([`AttentionShape::sinks`]) and biased or clamped expert FFNs
    /// ([`SwigluWeights::is_plain`] false) work here (gpt-oss); the model refuses to load otherwise.
    fn supports_gpt_oss(&self) -> bool {
        false
    }
    /// Gated DeltaNet (Qwen3-Next's linear attention) on the input projection `proj`
    /// (`[rows, shape.proj_cols()]`): for each sequence, the causal convolution and the gated delta
    /// rule run over its rows in order, starting from its state in `states[i]` and leaving the
    /// advanced state in its write slot; `out` is `[rows, value_dim]`, each value head's output
    /// after the gated RMSNorm (`norm(o) · silu(z)`). A token's result does not depend on the batch.
    #[allow(clippy::too_many_arguments)]
    fn gated_delta_net(
        &self,
        proj: &Self::Act,
        w: &DeltaNetWeights<Self>,
        shape: &DeltaNetShape,
        seqs: &[AttentionSeq],
        states: &[StateSlots],
        store: &mut Self::KvStore,
        layer: usize,
        out: &mut Self::Act,
    ) -> Result<()> {
        let _ = (proj, w, shape, seqs, states, store, layer, out);
        Err(ComputeError::Unsupported { op: "gated_delta_net (linear attention)", backend: self.name() })
    }
    /// Copies recurrent state slot `from` to slot `to` in every linear-attention layer (a prefix
    /// cache snapshot).
    fn copy_state(&self, store: &mut Self::KvStore, from: u32, to: u32) -> Result<()> {
        let _ = (store, from, to);
        Err(ComputeError::Unsupported { op: "copy_state (linear attention)", backend: self.name() })
    }
    /// `x[r, c] *= sigmoid(gate[r, gate_col + c])` for every column of `x` (gated attention).
    fn mul_sigmoid_cols(&self, x: &mut Self::Act, gate: &Self::Act, gate_col: usize) -> Result<()> {
        let _ = (x, gate, gate_col);
        Err(ComputeError::Unsupported { op: "mul_sigmoid_cols (gated attention)", backend: self.name() })
    }
    /// Whether [`Backend::gated_delta_net`], [`Backend::mul_sigmoid_cols`] and recurrent state
    /// slots work here (Qwen3-Next); the model refuses to load otherwise.
    fn supports_linear_attention(&self) -> bool {
        false
    }
    /// Whether this backend computes on the host's thread pool (the CPU): a forward pass then
    /// runs under [`cpu::with_pool_awake`], so the pool's threads do not fall asleep in its gaps.
    fn computes_on_host_threads(&self) -> bool {
        false
    }
    /// `out[r] += sigmoid(gate[r, 0]) * y[r]` (Qwen2-MoE shared expert).
    fn add_sigmoid_gated(&self, out: &mut Self::Act, y: &Self::Act, gate: &Self::Act);
    /// Zeroed `[rows, cols]`.
    fn zeros(&self, rows: usize, cols: usize, out: &mut Self::Act);
}
