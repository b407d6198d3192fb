//! The device plan's kernels against their references (issue 32): `gate_route_f32` must choose
//! the experts and weights of `gpu_plan::routing` (the host's routing) bit for bit, on logits
//! with ties, NaN, −∞ and +∞, softmax and grouped sigmoid rules; `expert_plan_f32` must write
//! the tables of `gpu_plan::plan::build` (the host's ExpertPlan) exactly. Then both are timed on
//! a DeepSeek-V3-sized gate (256 experts, top-8) at decode batch sizes.

use super::{grid, launched, CheckRow, Gpu, Result, Rng};
use crate::gpu_plan::plan::{build, PLAN_BLOCK};
use crate::gpu_plan::routing::{route_row, GateRule};
use crate::gpu_plan::tiles::GemmTiling;
use crate::ComputeError;
use cudarc::driver::{CudaSlice, PushKernelArg};

const ROUTE_WARPS: usize = 4;

fn exact(kernel: &str, shape: String, mismatches: usize, total: usize) -> CheckRow {
    CheckRow {
        kernel: kernel.into(),
        shape,
        rel_err: if mismatches == 0 { 0.0 } else { f64::INFINITY },
        bound: 0.0,
        passed: mismatches == 0,
        note: if mismatches == 0 {
            "bit-identical to the host".into()
        } else {
            format!("{mismatches} of {total} differ")
        },
        ..Default::default()
    }
}

struct Routed {
    ids: CudaSlice<i32>,
    weights: CudaSlice<f32>,
}

fn route_on_device(
    g: &Gpu,
    rule: &GateRule,
    logits: &CudaSlice<f32>,
    bias: &CudaSlice<f32>,
    rows: usize,
    e: usize,
    k: usize,
) -> Result<Routed> {
    let mut ids = g.up(&vec![-7i32; rows * k])?;
    let mut weights = g.poisoned(rows * k)?;
    launch_route(g, rule, logits, bias, rows, e, k, &mut ids, &mut weights)?;
    Ok(Routed { ids, weights })
}

#[allow(clippy::too_many_arguments)]
fn launch_route(
    g: &Gpu,
    rule: &GateRule,
    logits: &CudaSlice<f32>,
    bias: &CudaSlice<f32>,
    rows: usize,
    e: usize,
    k: usize,
    ids: &mut CudaSlice<i32>,
    weights: &mut CudaSlice<f32>,
) -> Result<()> {
    let flags = rule.sigmoid as i32 | (rule.renormalize as i32) << 1;
    let (ri, ei, ki, gi, tg) = (rows as i32, e as i32, k as i32, rule.n_group as i32, rule.topk_group as i32);
    let mut cfg = grid(rows.div_ceil(ROUTE_WARPS) as u32, 1, 1, (ROUTE_WARPS * 32) as u32);
    cfg.shared_mem_bytes = (ROUTE_WARPS * ((2 * e + k) * 4 + e * 4)) as u32;
    let mut b = g.stream.launch_builder(g.func("gate_route_f32")?);
    b.arg(logits)
        .arg(bias)
        .arg(&ri)
        .arg(&ei)
        .arg(&ki)
        .arg(&flags)
        .arg(&gi)
        .arg(&tg)
        .arg(&rule.scaling)
        .arg(ids)
        .arg(weights);
    // SAFETY: the arguments match gate_route_f32's parameters (kernels/expert_plan.cu) and the
    // buffers hold rows × E logits, E biases and rows × k outputs.
    launched(unsafe { b.launch(cfg) }, "gate_route_f32")
}

struct PlanBuffers {
    offsets: CudaSlice<i32>,
    row_of_slot: CudaSlice<i32>,
    weight_of_slot: CudaSlice<f32>,
    slot_of_pair: CudaSlice<i32>,
    tile_offsets: CudaSlice<i32>,
}

impl PlanBuffers {
    /// Tables for `experts` and `pairs`, poisoned (-1, NaN) so an entry the kernel skips shows.
    fn poisoned(g: &Gpu, experts: usize, pairs: usize) -> Result<Self> {
        Ok(Self {
            offsets: g.up(&vec![-1i32; experts + 1])?,
            row_of_slot: g.up(&vec![-1i32; pairs])?,
            weight_of_slot: g.poisoned(pairs)?,
            slot_of_pair: g.up(&vec![-1i32; pairs])?,
            tile_offsets: g.up(&vec![-1i32; experts + 1])?,
        })
    }
}

#[allow(clippy::too_many_arguments)]
fn launch_plan(
    g: &Gpu,
    routed: &Routed,
    pairs: usize,
    k: usize,
    e: usize,
    tiling: &GemmTiling,
    n_tiles: u32,
    out: &mut PlanBuffers,
) -> Result<()> {
    let (pi, ki, ei, bm, nt) = (pairs as i32, k as i32, e as i32, tiling.block_m as i32, n_tiles as i32);
    let load = 0u64; // no load counters: a null pointer
    let mut cfg = grid(1, 1, 1, PLAN_BLOCK as u32);
    cfg.shared_mem_bytes = ((2 + 32) * e * 4) as u32;
    let func = g.func("expert_plan_f32")?;
    if cfg.shared_mem_bytes > 48 * 1024 {
        func.set_attribute(
            cudarc::driver::sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            cfg.shared_mem_bytes as i32,
        )
        .map_err(|err| ComputeError::Cuda(format!("expert_plan_f32 shared memory: {err}")))?;
    }
    let mut b = g.stream.launch_builder(func);
    b.arg(&routed.ids).arg(&routed.weights).arg(&pi).arg(&ki).arg(&ei).arg(&bm).arg(&nt);
    b.arg(&mut out.offsets).arg(&mut out.row_of_slot).arg(&mut out.weight_of_slot).arg(&mut out.slot_of_pair);
    b.arg(&mut out.tile_offsets).arg(&load);
    // SAFETY: the arguments match expert_plan_f32's parameters; the tables hold E + 1 offsets and
    // `pairs` slots; `load` is a null pointer (no counters).
    launched(unsafe { b.launch(cfg) }, "expert_plan_f32")
}

fn logits_with_edge_cases(rng: &mut Rng, rows: usize, e: usize) -> Vec<f32> {
    (0..rows * e)
        .map(|i| match ((i / e) % 6, rng.below(10)) {
            (0, _) => rng.below(4) as f32 * 0.5,
            (1, 0) => f32::NAN,
            (2, 0..=7) => f32::NEG_INFINITY,
            (3, 0) => f32::INFINITY,
            (4, _) => f32::NAN,
            _ => rng.uniform() * 4.0,
        })
        .collect()
}

pub(super) fn plan(g: &Gpu, rng: &mut Rng, quick: bool) -> Result<Vec<CheckRow>> {
    let mut out = Vec::new();
    let softmax = GateRule { sigmoid: false, renormalize: true, n_group: 1, topk_group: 1, scaling: 1.0 };
    let deepseek = GateRule { sigmoid: true, renormalize: true, n_group: 8, topk_group: 4, scaling: 2.5 };
    let tiling = GemmTiling::EXPERT_DEFAULT;
    for (rule, name, rows, e, k) in [
        (softmax, "softmax, renormalized", 37usize, 8usize, 2usize),
        (softmax, "softmax, renormalized", 300, 64, 8),
        (deepseek, "sigmoid, 8 groups keep 4, scaling 2.5", 257, 256, 8),
        (GateRule { renormalize: false, ..softmax }, "softmax", 2100, 128, 8),
    ] {
        let logits = logits_with_edge_cases(rng, rows, e);
        let bias = rng.vec(e, 0.1);
        let (dl, db) = (g.up(&logits)?, g.up(&bias)?);
        let routed = route_on_device(g, &rule, &dl, &db, rows, e, k)?;
        g.sync()?;
        let (ids, weights) = (g.down(&routed.ids)?, g.down(&routed.weights)?);
        let (mut want_ids, mut want_w) = (vec![0u32; rows * k], vec![0f32; rows * k]);
        let mut scratch = Vec::new();
        for r in 0..rows {
            route_row(
                &rule,
                &logits[r * e..(r + 1) * e],
                Some(&bias),
                &mut scratch,
                &mut want_ids[r * k..(r + 1) * k],
                &mut want_w[r * k..(r + 1) * k],
            );
        }
        let bad = (0..rows * k)
            .filter(|&i| ids[i] as u32 != want_ids[i] || weights[i].to_bits() != want_w[i].to_bits())
            .count();
        let shape = format!("{rows} rows, {e} experts, top-{k}, {name}; ties, NaN, ±inf rows");
        out.push(exact("gate_route_f32", shape.clone(), bad, rows * k));

        let n_tiles = tiling.n_tiles(14336);
        let pairs = rows * k;
        let mut bufs = PlanBuffers::poisoned(g, e, pairs)?;
        launch_plan(g, &routed, pairs, k, e, &tiling, n_tiles, &mut bufs)?;
        g.sync()?;
        let want = build(e, k, &want_ids, &want_w, &tiling, n_tiles);
        let as_u32 = |v: Vec<i32>| v.into_iter().map(|x| x as u32).collect::<Vec<u32>>();
        let mut bad = 0;
        bad += (as_u32(g.down(&bufs.offsets)?) != want.offsets) as usize;
        bad += (as_u32(g.down(&bufs.row_of_slot)?) != want.row_of_slot) as usize;
        bad += (as_u32(g.down(&bufs.slot_of_pair)?) != want.slot_of_pair) as usize;
        bad += (as_u32(g.down(&bufs.tile_offsets)?) != want.tile_offsets) as usize;
        let ws: Vec<u32> = g.down(&bufs.weight_of_slot)?.iter().map(|w| w.to_bits()).collect();
        bad += (ws != want.weight_of_slot.iter().map(|w| w.to_bits()).collect::<Vec<_>>()) as usize;
        out.push(exact("expert_plan_f32", format!("{shape}; offsets, rows, weights, pair slots, tile table"), bad, 5));
    }
    // Timing: routing and plan of a DeepSeek-V3 gate at decode batch sizes.
    for rows in if quick { vec![64] } else { vec![1, 64, 256] } {
        let (e, k) = (256usize, 8usize);
        let logits = rng.vec(rows * e, 3.0);
        let bias = rng.vec(e, 0.1);
        let (dl, db) = (g.up(&logits)?, g.up(&bias)?);
        let mut routed = route_on_device(g, &deepseek, &dl, &db, rows, e, k)?;
        let pairs = rows * k;
        let mut bufs = PlanBuffers::poisoned(g, e, pairs)?;
        let n_tiles = tiling.n_tiles(2048);
        let ms = g.time(|| {
            launch_route(g, &deepseek, &dl, &db, rows, e, k, &mut routed.ids, &mut routed.weights)?;
            launch_plan(g, &routed, pairs, k, e, &tiling, n_tiles, &mut bufs)
        })?;
        out.push(CheckRow {
            kernel: "gate_route_f32 + expert_plan_f32".into(),
            shape: format!("{rows} rows, 256 experts top-8, grouped sigmoid"),
            passed: true,
            ms: Some(ms),
            rate: Some((ms * 1e3, "µs")),
            note: "replaces a host round trip per MoE layer".into(),
            ..Default::default()
        });
    }
    Ok(out)
}
