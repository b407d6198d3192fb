//! The launches several operations share: a dense GEMM through cuBLAS (bf16 weights multiply a
//! bf16 copy of the activations), BGMV LoRA shrink/expand over a row→adapter table, SwiGLU rows.

use super::tables::LoraTable;
use super::{elementwise, grid, launch, Blas, CudaAct, CudaBackend, CudaMatrix, MatrixBuf};
use crate::LoraWeights;
use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType};

impl CudaBackend {
    /// `out[m, n] = x[m, k] · Wᵀ` for `W` `[n, k]`, addresses given; bf16 weights multiply a bf16
    /// copy of `x` (f32 accumulation and output), f32 weights multiply `x` as is.
    pub(super) fn gemm(&self, blas: &mut Blas, m: usize, x: u64, w: &CudaMatrix, out: u64) {
        let (n, k) = (w.rows, w.cols);
        if m == 0 || n == 0 {
            return;
        }
        let (a, a_type, b, b_type) = match &w.data {
            MatrixBuf::Bf16(_) => {
                let x16 = self.ensure_u16(&mut blas.x16, m * k);
                launch!(self, "to_bf16_f32", elementwise(m * k), [x, x16, (m * k) as i64]);
                if super::deterministic() && k.is_multiple_of(8) {
                    // One "expert" of m rows on the tensor-core GEMM: the same bits for a row
                    // whatever m is.
                    let offsets = [0, m as i32];
                    let (d_offsets, d_ptrs) = (self.table(&offsets), self.table(&[self.matrix_ptr(w)]));
                    let (po, pw) = (self.ptr(&d_offsets), self.ptr(&d_ptrs));
                    self.tc_gemm(&offsets, m, x16, pw, out, po, n, k);
                    return;
                }
                (self.matrix_ptr(w), cudaDataType::CUDA_R_16BF, x16, cudaDataType::CUDA_R_16BF)
            }
            MatrixBuf::F32(_) => (self.matrix_ptr(w), cudaDataType::CUDA_R_32F, x, cudaDataType::CUDA_R_32F),
        };
        let (alpha, beta) = (1.0f32, 0.0f32);
        self.checked(self.inner.ctx.bind_to_thread(), "binding the context");
        // Row-major out = x · Wᵀ is column-major outᵀ[n, m] = W[n, k] (stored as [k, n], so
        // transposed) · xᵀ[k, m].
        // SAFETY: W holds n*k values, x (or its bf16 copy) m*k and out m*n, at the addresses
        // given; alpha and beta are host f32 as CUBLAS_COMPUTE_32F expects.
        let r = unsafe {
            cudarc::cublas::result::gemm_ex(
                *blas.handle.handle(),
                cublasOperation_t::CUBLAS_OP_T,
                cublasOperation_t::CUBLAS_OP_N,
                n as i32,
                m as i32,
                k as i32,
                &alpha as *const f32 as *const _,
                a as *const _,
                a_type,
                k as i32,
                b as *const _,
                b_type,
                k as i32,
                &beta as *const f32 as *const _,
                out as *mut _,
                cudaDataType::CUDA_R_32F,
                n as i32,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        };
        self.checked(r, "cuBLAS GEMM");
    }

    /// BGMV over `rows` rows at `x` (`in_dim` columns): `out[r, col..] += scale · x_r Aᵀ Bᵀ` for
    /// each row with a pair; one shrink and one expand launch for any mix of adapters.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn bgmv(
        &self,
        rows: usize,
        x: u64,
        in_dim: usize,
        table: &LoraTable<'_, LoraWeights<Self>>,
        tmp: &mut CudaAct,
        out: u64,
        out_stride: usize,
        col: usize,
    ) {
        if table.pairs.is_empty() || rows == 0 {
            return;
        }
        let mut a_ptrs = Vec::with_capacity(table.pairs.len());
        let mut b_ptrs = Vec::with_capacity(table.pairs.len());
        for p in &table.pairs {
            let (MatrixBuf::F32(_), MatrixBuf::F32(_)) = (&p.a.data, &p.b.data) else {
                self.fatal("LoRA", "adapter factors must be uploaded with lora_matrix (f32)");
            };
            a_ptrs.push(self.matrix_ptr(&p.a));
            b_ptrs.push(self.matrix_ptr(&p.b));
        }
        let ranks: Vec<i32> = table.pairs.iter().map(|p| p.a.rows as i32).collect();
        let scales: Vec<f32> = table.pairs.iter().map(|p| p.scale).collect();
        let out_dim = table.pairs[0].b.rows;
        let max_rank = ranks.iter().copied().max().unwrap_or(1).max(1) as usize;
        let (da, db, dr, ds, dm) = (
            self.table(&a_ptrs),
            self.table(&b_ptrs),
            self.table(&ranks),
            self.table(&scales),
            self.table(&table.row_adapter),
        );
        self.reshape(tmp, rows, max_rank);
        let t = self.act_ptr(tmp);
        let (pa, pb, pr, ps, pm) = (self.ptr(&da), self.ptr(&db), self.ptr(&dr), self.ptr(&ds), self.ptr(&dm));
        launch!(self, "lora_shrink_f32", grid(rows, 1, 128), [x, in_dim as i32, pa, pr, pm, t, max_rank as i32]);
        let col_blocks = out_dim.div_ceil(256).min(64);
        launch!(
            self,
            "lora_expand_f32",
            grid(rows, col_blocks, 256),
            [t, max_rank as i32, pb, pr, ps, pm, out, out_stride as i32, col as i32, out_dim as i32]
        );
    }

    pub(super) fn swiglu_rows(&self, rows: usize, gate_up: u64, inter: usize, out: u64) {
        if rows * inter > 0 {
            launch!(self, "swiglu_f32", elementwise(rows * inter), [gate_up, out, rows as i64, inter as i32]);
        }
    }

    /// The tensor-core grouped GEMM over the plan's experts: out[slot] = x16[slot] · W_e^T (f32
    /// out), with the tile table for these offsets; the 64-row tiling when no expert has more
    /// than 64 rows (decode), else 128.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn tc_gemm(
        &self,
        offsets: &[i32],
        max_load: usize,
        x16: u64,
        w_ptrs: u64,
        out: u64,
        d_offsets: u64,
        n: usize,
        k: usize,
    ) {
        let entry = if max_load <= 64 { "grouped_gemm_tc_small_bf16" } else { "grouped_gemm_tc_bf16" };
        let Some(tiling) = super::tc_tiling(entry) else { return };
        let off: Vec<u32> = offsets.iter().map(|&o| o as u32).collect();
        let n_tiles = tiling.n_tiles(n as u32);
        let table: Vec<i32> = tiling.tile_offsets(&off, n_tiles).into_iter().map(|t| t as i32).collect();
        let tiles = *table.last().unwrap_or(&0);
        if tiles == 0 {
            return;
        }
        let d_table = self.table(&table);
        let cfg = cudarc::driver::LaunchConfig {
            grid_dim: (tiles as u32, 1, 1),
            block_dim: (tiling.threads(), 1, 1),
            shared_mem_bytes: tiling.shared_bytes(),
        };
        let experts = (offsets.len() - 1) as i32;
        launch!(self, entry, cfg, [x16, w_ptrs, out, d_offsets, self.ptr(&d_table), experts, n as i32, k as i32]);
    }

    /// Attention by flash_prefill_bf16 when `--cuda-attention flash` is chosen and it applies
    /// (bf16 cache, head size 64 or 128, no sinks); false when the caller must run the classic
    /// kernel. `p`: device addresses of q (the qkv rows), the layer's k and v caches, each row's
    /// position, the flat page table, each sequence's first page, and the output; then q's row
    /// stride, the cache's page size and the sliding window (0: none).
    pub(super) fn flash_attention(
        &self,
        shape: &crate::AttentionShape<'_>,
        seqs: &[crate::AttentionSeq],
        bf16_cache: bool,
        p: [u64; 7],
        [q_stride, page_size, window]: [i32; 3],
    ) -> crate::Result<bool> {
        use super::{attention_kernel, AttentionKernel};
        let applies = attention_kernel() == AttentionKernel::Flash
            && bf16_cache
            && matches!(shape.head_dim, 64 | 128)
            && shape.sinks.is_none()
            && shape.n_kv_heads > 0
            && shape.n_heads.is_multiple_of(shape.n_kv_heads);
        if !applies {
            return Ok(false);
        }
        let group = shape.n_heads / shape.n_kv_heads;
        if seqs.iter().all(|s| s.rows.len() == 1) && crate::gpu_plan::splits::flash_decode_serves(group, shape.head_dim)
        {
            self.flash_decode(shape, seqs, p, [q_stride, page_size, window]);
            return Ok(true);
        }
        let spans: Vec<(usize, usize, usize)> =
            seqs.iter().enumerate().map(|(i, s)| (s.rows.start, s.rows.len(), i)).collect();
        let tiles = crate::gpu_plan::splits::prefill_tiles(&spans);
        if tiles.is_empty() {
            return Ok(true);
        }
        let d_tiles = self.table(&tiles);
        let cfg = cudarc::driver::LaunchConfig {
            grid_dim: ((tiles.len() / 3) as u32, shape.n_heads as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: crate::gpu_plan::splits::flash_prefill_shared_bytes(shape.head_dim) as u32,
        };
        let [q, k, v, pos, pages, starts, o] = p;
        let (qc, nh, kvh, hd) =
            (shape.q_col as i32, shape.n_heads as i32, shape.n_kv_heads as i32, shape.head_dim as i32);
        let out_stride = nh * hd;
        let pt = self.ptr(&d_tiles);
        launch!(
            self,
            "flash_prefill_bf16",
            cfg,
            [q, q_stride, qc, k, v, pt, pos, pages, starts, nh, kvh, hd, page_size, window, shape.scale, o, out_stride]
        );
        Ok(true)
    }

    /// gate_route_f32 over every row of `logits`, then the chosen (expert, weight) pairs to the
    /// host (one small copy and sync per MoE layer instead of every row's logits). False when
    /// the kernel's shared memory would not fit (over 2,048 experts).
    pub(super) fn gate_route(
        &self,
        logits: &CudaAct,
        rule: &crate::gpu_plan::routing::GateRule,
        bias: Option<&[f32]>,
        k: usize,
        out: &mut Vec<(u32, f32)>,
    ) -> bool {
        const WARPS: usize = 4;
        let (rows, experts) = (logits.rows, logits.cols);
        let shared = WARPS * ((2 * experts + k) * 4 + experts * 4);
        if shared > 48 * 1024 || k == 0 {
            return false;
        }
        out.clear();
        if rows == 0 {
            return true;
        }
        let d_bias = bias.map(|b| self.table(b));
        // Outputs only: allocated on the device, nothing uploaded.
        let d_ids = self.checked(self.alloc::<i32>(rows * k), "allocating routed experts");
        let d_weights = self.checked(self.alloc::<f32>(rows * k), "allocating routing weights");
        let flags = rule.sigmoid as i32 | (rule.renormalize as i32) << 1;
        let cfg = cudarc::driver::LaunchConfig {
            grid_dim: (rows.div_ceil(WARPS) as u32, 1, 1),
            block_dim: ((WARPS * 32) as u32, 1, 1),
            shared_mem_bytes: shared as u32,
        };
        let pb = d_bias.as_ref().map_or(0u64, |b| self.ptr(b));
        launch!(
            self,
            "gate_route_f32",
            cfg,
            [
                self.act_ptr(logits),
                pb,
                rows as i32,
                experts as i32,
                k as i32,
                flags,
                rule.n_group as i32,
                rule.topk_group as i32,
                rule.scaling,
                self.ptr(&d_ids),
                self.ptr(&d_weights)
            ]
        );
        let (mut ids, mut weights) = (vec![0i32; rows * k], vec![0f32; rows * k]);
        let r = self.stream().memcpy_dtoh(&d_ids, &mut ids[..]);
        self.checked(r, "copying routed experts from the device");
        let r = self.stream().memcpy_dtoh(&d_weights, &mut weights[..]);
        self.checked(r, "copying routing weights from the device");
        self.wait_for_device();
        out.extend(ids.iter().zip(&weights).map(|(&e, &w)| (e.max(0) as u32, w)));
        true
    }

    /// A decode-only call on flash-decoding: a block per (sequence, KV head, split), then the
    /// merge; the splits depend on each sequence's own length (gpu_plan::splits).
    fn flash_decode(
        &self,
        shape: &crate::AttentionShape<'_>,
        seqs: &[crate::AttentionSeq],
        p: [u64; 7],
        ints: [i32; 3],
    ) {
        use crate::gpu_plan::splits::{flash_decode_shared_bytes, split_bucket, DecodeSplits, MAX_SPLITS};
        let [q, k, v, _pos, pages, starts, o] = p;
        let [q_stride, page_size, window] = ints;
        let (n, heads, dim) = (seqs.len(), shape.n_heads, shape.head_dim);
        let lens: Vec<i32> = seqs.iter().map(|s| (s.start_pos + 1) as i32).collect();
        let rows: Vec<i32> = seqs.iter().map(|s| s.rows.start as i32).collect();
        let win = (window > 0).then_some(window as usize);
        let max_count =
            seqs.iter().map(|s| DecodeSplits::new(s.start_pos + 1, win, page_size as usize).count).max().unwrap_or(1);
        let (d_lens, d_rows) = (self.table(&lens), self.table(&rows));
        let partials = n * heads * MAX_SPLITS;
        let mut blas = self.blas();
        let need = partials * (dim + 2);
        if blas.splits.as_ref().is_none_or(|b| b.len() < need) {
            blas.splits = None;
            blas.splits = Some(self.checked(self.alloc::<f32>(need), "growing the attention splits"));
        }
        let base = blas.splits.as_ref().map_or(0, |b| self.ptr(b));
        let (part_out, part_max, part_sum) =
            (base, base + (partials * dim * 4) as u64, base + (partials * (dim + 1) * 4) as u64);
        let cfg = cudarc::driver::LaunchConfig {
            grid_dim: (n as u32, shape.n_kv_heads as u32, split_bucket(max_count)),
            block_dim: (128, 1, 1),
            shared_mem_bytes: flash_decode_shared_bytes(heads / shape.n_kv_heads, dim) as u32,
        };
        let (qc, nh, kvh, hd) = (shape.q_col as i32, heads as i32, shape.n_kv_heads as i32, dim as i32);
        let (pl, pr) = (self.ptr(&d_lens), self.ptr(&d_rows));
        launch!(
            self,
            "flash_decode_bf16",
            cfg,
            [
                q,
                q_stride,
                qc,
                pr,
                k,
                v,
                pages,
                starts,
                pl,
                window,
                page_size,
                nh,
                kvh,
                hd,
                shape.scale,
                part_out,
                part_max,
                part_sum
            ]
        );
        let merge = cudarc::driver::LaunchConfig {
            grid_dim: (n as u32, heads as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(
            self,
            "flash_decode_merge_f32",
            merge,
            [part_out, part_max, part_sum, pl, pr, 0u64, window, page_size, nh, hd, o, nh * hd]
        );
    }
}
