//! `Backend` for the CUDA backend: each operation as kernel launches and cuBLAS calls on the
//! backend's stream (see the module doc of `backend` for the error policy).

use super::buffers::rounded;
use super::tables::{ExpertTables, LoraTable};
use super::{
    elementwise, expert_gemm, grid, launch, CudaAct, CudaBackend, CudaKvStore, CudaMatrix, CudaVector, ExpertGemm,
    MatrixBuf,
};
use crate::{
    AttentionSeq, AttentionShape, Backend, ComputeError, Device, ExpertPlan, FfnScratch, KvLayout, Result,
    RowExpertLora, RowLora, SwigluWeights,
};
use std::ops::Range;

const F32: usize = 4;

impl Backend for CudaBackend {
    type Matrix = CudaMatrix;
    type Vector = CudaVector;
    type Act = CudaAct;
    type KvStore = CudaKvStore;

    fn name(&self) -> String {
        self.inner.name.clone()
    }

    fn device(&self) -> Device {
        Device::Cuda(self.inner.ordinal)
    }

    fn numerics(&self) -> String {
        // cuBLAS picks kernels by GPU model and shape: the GPU's name, the expert path, the
        // attention kernel and whether products avoid cuBLAS (--deterministic) all change bits.
        // Device routing gives the host's bits, so it is not part of the name.
        let mode = if super::deterministic() { ":deterministic" } else { "" };
        format!("cuda:{}:{:?}:{:?}{mode}", self.inner.name, super::expert_gemm(), super::attention_kernel())
    }

    fn matrix(&self, rows: usize, cols: usize, data: Vec<f32>) -> Result<CudaMatrix> {
        if data.len() != rows * cols {
            return Err(ComputeError::MatrixSize { rows, cols, expected: rows * cols, got: data.len() });
        }
        if self.f32_weights() {
            return self.upload_f32_matrix(rows, cols, &data);
        }
        self.upload_bf16_matrix(rows, cols, &rounded(&data))
    }

    fn matrix_bf16(&self, rows: usize, cols: usize, data: Vec<u16>) -> Result<CudaMatrix> {
        if data.len() != rows * cols {
            return Err(ComputeError::MatrixSize { rows, cols, expected: rows * cols, got: data.len() });
        }
        if self.f32_weights() {
            let widened: Vec<f32> = data.iter().map(|&b| f32::from_bits((b as u32) << 16)).collect();
            return self.upload_f32_matrix(rows, cols, &widened);
        }
        self.upload_bf16_matrix(rows, cols, &data)
    }

    fn random_matrix_bf16(&self, rows: usize, cols: usize, seed: u64, scale: f32) -> Result<CudaMatrix> {
        if self.f32_weights() {
            let data = crate::gpu_plan::draws::random_bf16_vec(rows * cols, seed, scale);
            return self.matrix_bf16(rows, cols, data);
        }
        self.random_bf16_matrix(rows, cols, seed, scale)
    }

    fn lora_matrix(&self, rows: usize, cols: usize, data: Vec<f32>) -> Result<CudaMatrix> {
        if data.len() != rows * cols {
            return Err(ComputeError::MatrixSize { rows, cols, expected: rows * cols, got: data.len() });
        }
        self.upload_f32_matrix(rows, cols, &data)
    }

    fn matrix_shape(&self, m: &CudaMatrix) -> (usize, usize) {
        (m.rows, m.cols)
    }

    fn matrix_bytes(&self, m: &CudaMatrix) -> usize {
        match &m.data {
            MatrixBuf::Bf16(_) => m.rows * m.cols * 2,
            MatrixBuf::F32(_) => m.rows * m.cols * 4,
        }
    }

    fn vector(&self, data: Vec<f32>) -> Result<CudaVector> {
        self.upload_vector(&data)
    }

    fn kv_store(&self, layout: KvLayout) -> Result<CudaKvStore> {
        self.new_kv_store(layout)
    }

    fn kv_bytes_per_value(&self) -> usize {
        self.kv_value_bytes()
    }

    fn ensure_room(&self, what: &str, bytes: usize) -> Result<()> {
        self.ensure_fits(what, bytes)
    }

    fn act(&self) -> CudaAct {
        CudaAct::default()
    }

    fn act_shape(&self, a: &CudaAct) -> (usize, usize) {
        (a.rows, a.cols)
    }

    fn upload(&self, rows: usize, cols: usize, data: &[f32], out: &mut CudaAct) {
        self.reshape(out, rows, cols);
        let n = rows * cols;
        if n > 0 {
            if let Some(buf) = out.buf.as_mut() {
                let r = self.stream().memcpy_htod(&data[..n], buf);
                self.checked(r, "copying rows to the device");
            }
        }
    }

    fn download(&self, a: &CudaAct, out: &mut Vec<f32>) {
        let n = a.rows * a.cols;
        out.clear();
        out.resize(n, 0.0);
        if let (Some(buf), true) = (a.buf.as_ref(), n > 0) {
            let r = self.stream().memcpy_dtoh(&buf.slice(0..n), &mut out[..]);
            self.checked(r, "copying rows from the device");
            self.wait_for_device();
        }
    }

    fn route_rows(
        &self,
        logits: &CudaAct,
        rule: &crate::gpu_plan::routing::GateRule,
        bias: Option<&[f32]>,
        k: usize,
        out: &mut Vec<(u32, f32)>,
    ) -> bool {
        super::device_routing() && self.gate_route(logits, rule, bias, k, out)
    }

    fn embed(&self, table: &CudaMatrix, ids: &[u32], out: &mut CudaAct) -> Result<()> {
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= table.rows) {
            return Err(ComputeError::IdOutOfRange { id, rows: table.rows });
        }
        self.reshape(out, ids.len(), table.cols);
        if ids.is_empty() {
            return Ok(());
        }
        let ids: Vec<i32> = ids.iter().map(|&i| i as i32).collect();
        let d = self.table(&ids);
        let (t, pi, o) = (self.matrix_ptr(table), self.ptr(&d), self.act_ptr(out));
        let cfg = grid(ids.len().min(65535), 1, 256);
        match table.data {
            MatrixBuf::Bf16(_) => launch!(self, "embed_bf16", cfg, [t, pi, o, ids.len() as i64, table.cols as i32]),
            MatrixBuf::F32(_) => launch!(self, "embed_f32", cfg, [t, pi, o, ids.len() as i64, table.cols as i32]),
        }
        Ok(())
    }

    fn linear(&self, x: &CudaAct, w: &CudaMatrix, bias: Option<&CudaVector>, out: &mut CudaAct) {
        debug_assert_eq!(x.cols, w.cols);
        self.reshape(out, x.rows, w.rows);
        if x.rows == 0 {
            return;
        }
        let (px, po) = (self.act_ptr(x), self.act_ptr(out));
        self.gemm(&mut self.blas(), x.rows, px, w, po);
        if let Some(b) = bias {
            let n = x.rows * w.rows;
            launch!(self, "add_bias_f32", elementwise(n), [po, self.ptr(&b.buf), n as i64, w.rows as i32]);
        }
    }

    fn rms_norm(&self, x: &CudaAct, w: &CudaVector, eps: f32, out: &mut CudaAct) {
        self.reshape(out, x.rows, x.cols);
        if x.rows == 0 {
            return;
        }
        let (px, pw, po) = (self.act_ptr(x), self.ptr(&w.buf), self.act_ptr(out));
        launch!(self, "rmsnorm_f32", grid(x.rows, 1, 256), [px, 0u64, 0u64, pw, po, x.cols as i32, eps]);
    }

    fn rms_norm_cols(&self, x: &mut CudaAct, cols: Range<usize>, group: usize, w: &CudaVector, eps: f32) {
        let group = group.max(1);
        let groups = cols.len() / group;
        if x.rows == 0 || groups == 0 {
            return;
        }
        let (px, pw) = (self.act_ptr(x), self.ptr(&w.buf));
        launch!(
            self,
            "rmsnorm_groups_f32",
            grid(x.rows, groups, 128),
            [px, x.cols as i32, cols.start as i32, group as i32, pw, eps]
        );
    }

    fn clamp(&self, x: &mut CudaAct, limit: f32) {
        let n = x.rows * x.cols;
        if n > 0 {
            launch!(self, "clamp_f32", elementwise(n), [self.act_ptr(x), n as i64, limit]);
        }
    }

    fn rope_table(&self, positions: &[u32], inv_freq: &[f32], scale: f32, out: &mut CudaAct) {
        let half = inv_freq.len();
        self.reshape(out, positions.len(), 2 * half);
        if positions.is_empty() || half == 0 {
            return;
        }
        let pos: Vec<i32> = positions.iter().map(|&p| p as i32).collect();
        let (dp, df) = (self.table(&pos), self.table(inv_freq));
        let (pp, pf, po) = (self.ptr(&dp), self.ptr(&df), self.act_ptr(out));
        launch!(self, "rope_table_f32", grid(positions.len(), 1, 128), [pp, pf, po, half as i32, scale]);
    }

    fn rope(&self, x: &mut CudaAct, col: usize, n_heads: usize, head_dim: usize, table: &CudaAct) {
        if x.rows == 0 {
            return;
        }
        let (px, pt) = (self.act_ptr(x), self.act_ptr(table));
        launch!(
            self,
            "rope_apply_f32",
            grid(x.rows, 1, 128),
            [
                px,
                x.cols as i32,
                col as i32,
                n_heads as i32,
                head_dim as i32,
                (table.cols / 2).min(head_dim / 2) as i32,
                pt
            ]
        );
    }

    fn attention(
        &self,
        qkv: &CudaAct,
        shape: &AttentionShape<'_>,
        seqs: &[AttentionSeq],
        page_table: &[u32],
        store: &mut CudaKvStore,
        layer: usize,
        out: &mut CudaAct,
    ) -> Result<()> {
        self.attend(qkv, shape, seqs, page_table, store, layer, out)
    }

    fn add(&self, x: &mut CudaAct, y: &CudaAct) {
        let n = (x.rows * x.cols).min(y.rows * y.cols);
        if n > 0 {
            launch!(self, "add_f32", elementwise(n), [self.act_ptr(x), self.act_ptr(y), n as i64]);
        }
    }

    fn gather_rows(&self, x: &CudaAct, rows: &[u32], out: &mut CudaAct) {
        self.reshape(out, rows.len(), x.cols);
        if rows.is_empty() || x.cols == 0 {
            return;
        }
        let idx: Vec<i32> = rows.iter().map(|&r| r as i32).collect();
        let d = self.table(&idx);
        let (px, pi, po) = (self.act_ptr(x), self.ptr(&d), self.act_ptr(out));
        launch!(
            self,
            "moe_permute_f32",
            grid(rows.len().min(65535), 1, 256),
            [px, pi, po, rows.len() as i32, x.cols as i32]
        );
    }

    fn swiglu(&self, x: &CudaAct, w: &SwigluWeights<Self>, s: &mut FfnScratch<Self>, out: &mut CudaAct) {
        self.linear(x, &w.gate_up, None, &mut s.gate_up);
        let inter = w.gate_up.rows / 2;
        self.reshape(&mut s.hidden, x.rows, inter);
        if x.rows > 0 {
            self.swiglu_rows(x.rows, self.act_ptr(&s.gate_up), inter, self.act_ptr(&s.hidden));
        }
        self.linear(&s.hidden, &w.down, None, out);
    }

    fn expert_ffn(
        &self,
        x: &CudaAct,
        experts: &[SwigluWeights<Self>],
        plan: &ExpertPlan,
        s: &mut FfnScratch<Self>,
        out: &mut CudaAct,
    ) {
        self.expert_ffn_lora(x, experts, plan, &|_, _| None, s, out);
    }

    fn lora_add(&self, x: &CudaAct, lora: &RowLora<'_, Self>, col: usize, s: &mut FfnScratch<Self>, out: &mut CudaAct) {
        let table = LoraTable::build(x.rows, lora);
        if table.pairs.is_empty() {
            return;
        }
        let (px, po) = (self.act_ptr(x), self.act_ptr(out));
        self.bgmv(x.rows, px, x.cols, &table, &mut s.lora_shrink, po, out.cols, col);
    }

    fn expert_ffn_lora(
        &self,
        x: &CudaAct,
        experts: &[SwigluWeights<Self>],
        plan: &ExpertPlan,
        lora: &RowExpertLora<'_, Self>,
        s: &mut FfnScratch<Self>,
        out: &mut CudaAct,
    ) {
        let slots = plan.rows.len();
        let num = plan.num_experts().min(experts.len());
        if slots == 0 || num == 0 || x.rows == 0 {
            return;
        }
        let (h, inter) = (x.cols, experts[0].gate_up.rows / 2);
        let t = ExpertTables::build(plan, out.rows);
        // Rows into expert order, then one GEMM per expert with rows for gate|up and for down.
        let d_rows = self.table(&t.row_of_slot);
        self.reshape(&mut s.rows, slots, h);
        self.reshape(&mut s.gate_up, slots, 2 * inter);
        self.reshape(&mut s.hidden, slots, inter);
        self.reshape(&mut s.out, slots, h);
        let (px, pr, xs, gu, hid, ys) = (
            self.act_ptr(x),
            self.ptr(&d_rows),
            self.act_ptr(&s.rows),
            self.act_ptr(&s.gate_up),
            self.act_ptr(&s.hidden),
            self.act_ptr(&s.out),
        );
        let row_of = |slot: usize| (plan.rows[slot] as usize, t.expert_of_slot[slot] as usize);
        let any_lora = (0..slots).any(|i| {
            let (r, e) = row_of(i);
            lora(r, e).is_some()
        });
        let bf16 = |m: &CudaMatrix| matches!(m.data, MatrixBuf::Bf16(_));
        let mode = expert_gemm().resolve(num);
        let grouped = matches!(mode, ExpertGemm::Grouped | ExpertGemm::Tc)
            && experts[..num].iter().all(|w| bf16(&w.gate_up) && bf16(&w.down));
        // The tensor-core kernel moves 16-byte rows: hidden and intermediate sizes multiples of 8.
        let tc = grouped && mode == ExpertGemm::Tc && h % 8 == 0 && inter % 8 == 0;
        if any_lora || !grouped {
            launch!(self, "moe_permute_f32", grid(slots.min(65535), 1, 256), [px, pr, xs, slots as i32, h as i32]);
        }
        let ranges: Vec<(usize, usize)> =
            (0..num).map(|e| (plan.offsets[e], plan.offsets[e + 1])).filter(|(a, b)| b > a).collect();
        // The grouped kernel's tables: expert offsets and each expert's weight addresses.
        let offsets: Vec<i32> = plan.offsets[..=num].iter().map(|&o| o as i32).collect();
        let max_load = ranges.iter().map(|(a, b)| b - a).max().unwrap_or(0);
        let group_cfg = |n: usize| cudarc::driver::LaunchConfig {
            grid_dim: (n.div_ceil(64) as u32, max_load.div_ceil(64).clamp(1, 65535) as u32, num as u32),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let (d_off, d_gu, d_down) = if grouped {
            let gu_ptrs: Vec<u64> = experts[..num].iter().map(|w| self.matrix_ptr(&w.gate_up)).collect();
            let down_ptrs: Vec<u64> = experts[..num].iter().map(|w| self.matrix_ptr(&w.down)).collect();
            (Some(self.table(&offsets)), Some(self.table(&gu_ptrs)), Some(self.table(&down_ptrs)))
        } else {
            (None, None, None)
        };
        {
            let mut blas = self.blas();
            if let (Some(off), Some(w)) = (&d_off, &d_gu) {
                let x16 = self.ensure_u16(&mut blas.x16, slots * h.max(inter));
                launch!(
                    self,
                    "moe_permute_bf16",
                    grid(slots.min(65535), 1, 256),
                    [px, pr, x16, slots as i32, h as i32]
                );
                let (po, pw) = (self.ptr(off), self.ptr(w));
                if tc {
                    self.tc_gemm(&offsets, max_load, x16, pw, gu, po, 2 * inter, h);
                } else {
                    launch!(
                        self,
                        "grouped_gemm_ptrs_bf16",
                        group_cfg(2 * inter),
                        [x16, pw, gu, po, (2 * inter) as i32, h as i32]
                    );
                }
            } else {
                for &(a, b) in &ranges {
                    let e = t.expert_of_slot[a] as usize;
                    let (xa, ga) = (xs + (a * h * F32) as u64, gu + (a * 2 * inter * F32) as u64);
                    self.gemm(&mut blas, b - a, xa, &experts[e].gate_up, ga);
                }
            }
        }
        if any_lora {
            let of = |i: usize| {
                let (r, e) = row_of(i);
                lora(r, e)
            };
            let gate = LoraTable::build(slots, |i| of(i).and_then(|l| l.gate.as_ref()));
            self.bgmv(slots, xs, h, &gate, &mut s.lora_shrink, gu, 2 * inter, 0);
            let up = LoraTable::build(slots, |i| of(i).and_then(|l| l.up.as_ref()));
            self.bgmv(slots, xs, h, &up, &mut s.lora_shrink, gu, 2 * inter, inter);
        }
        self.swiglu_rows(slots, gu, inter, hid);
        {
            let mut blas = self.blas();
            if let (Some(off), Some(w)) = (&d_off, &d_down) {
                let h16 = self.ensure_u16(&mut blas.x16, slots * h.max(inter));
                launch!(self, "to_bf16_f32", elementwise(slots * inter), [hid, h16, (slots * inter) as i64]);
                let (po, pw) = (self.ptr(off), self.ptr(w));
                if tc {
                    self.tc_gemm(&offsets, max_load, h16, pw, ys, po, h, inter);
                } else {
                    launch!(self, "grouped_gemm_ptrs_bf16", group_cfg(h), [h16, pw, ys, po, h as i32, inter as i32]);
                }
            } else {
                for &(a, b) in &ranges {
                    let e = t.expert_of_slot[a] as usize;
                    let (ha, ya) = (hid + (a * inter * F32) as u64, ys + (a * h * F32) as u64);
                    self.gemm(&mut blas, b - a, ha, &experts[e].down, ya);
                }
            }
        }
        if any_lora {
            let of = |i: usize| {
                let (r, e) = row_of(i);
                lora(r, e).and_then(|l| l.down.as_ref())
            };
            let down = LoraTable::build(slots, of);
            self.bgmv(slots, hid, inter, &down, &mut s.lora_shrink, ys, h, 0);
        }
        // Each output row adds its experts' weighted rows in ascending expert order.
        let (d_pairs, d_weights) = (self.table(&t.slot_of_pair), self.table(&t.weight_of_pair));
        let (po, pp, pw) = (self.act_ptr(out), self.ptr(&d_pairs), self.ptr(&d_weights));
        launch!(
            self,
            "moe_unpermute_f32",
            grid(out.rows.min(65535), 1, 256),
            [ys, pp, pw, po, out.rows as i32, t.k as i32, h as i32]
        );
    }

    fn add_sigmoid_gated(&self, out: &mut CudaAct, y: &CudaAct, gate: &CudaAct) {
        if out.rows == 0 {
            return;
        }
        let (po, py, pg) = (self.act_ptr(out), self.act_ptr(y), self.act_ptr(gate));
        launch!(
            self,
            "sigmoid_gated_add_f32",
            grid(out.rows.min(65535), 1, 256),
            [po, py, pg, gate.cols as i32, out.rows as i64, out.cols as i32]
        );
    }

    fn zeros(&self, rows: usize, cols: usize, out: &mut CudaAct) {
        self.reshape(out, rows, cols);
        let n = rows * cols;
        if let (Some(buf), true) = (out.buf.as_mut(), n > 0) {
            let r = self.stream().memset_zeros(&mut buf.slice_mut(0..n));
            self.checked(r, "zeroing an activation");
        }
    }
}
