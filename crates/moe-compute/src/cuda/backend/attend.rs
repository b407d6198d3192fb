//! The CUDA backend's attention call: the new rows' keys and values into the paged cache, then
//! attention by the classic kernel or, where chosen and applicable, flash_prefill_bf16.

use super::tables::AttentionTables;
use super::{grid, launch, CudaAct, CudaBackend, CudaKvStore};
use crate::{AttentionSeq, AttentionShape, ComputeError, Result};

impl CudaBackend {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn attend(
        &self,
        qkv: &CudaAct,
        shape: &AttentionShape<'_>,
        seqs: &[AttentionSeq],
        page_table: &[u32],
        store: &mut CudaKvStore,
        layer: usize,
        out: &mut CudaAct,
    ) -> Result<()> {
        let l = store.layout;
        self.reshape(out, qkv.rows, shape.n_heads * shape.head_dim);
        if qkv.rows == 0 {
            return Ok(());
        }
        if layer >= l.layers {
            return Err(ComputeError::Cuda(format!("layer {layer} outside the KV store of {} layers", l.layers)));
        }
        let t = AttentionTables::build(qkv.rows, seqs, page_table, l.page_size, l.num_pages)?;
        let pages: Vec<i32> = page_table.iter().map(|&p| p as i32).collect();
        let (d_slot, d_seq, d_pos, d_start, d_pages) = (
            self.table(&t.slot_of_row),
            self.table(&t.row_seq),
            self.table(&t.row_pos),
            self.table(&t.seq_page_start),
            self.table(&pages),
        );
        let (q, k, v, o) = (self.act_ptr(qkv), self.ptr(&store.k[layer]), self.ptr(&store.v[layer]), self.act_ptr(out));
        let (stride, kvh, hd) = (qkv.cols as i32, shape.n_kv_heads as i32, shape.head_dim as i32);
        let (slots, pages_d, starts, seqs_d, pos) =
            (self.ptr(&d_slot), self.ptr(&d_pages), self.ptr(&d_start), self.ptr(&d_seq), self.ptr(&d_pos));
        let write_cfg = grid(qkv.rows, 1, 128);
        let (kc, vc) = (shape.k_col as i32, shape.v_col as i32);
        let window = shape.sliding_window.map_or(0, |w| w.min(i32::MAX as usize) as i32);
        let att_cfg = grid(qkv.rows, shape.n_heads, 128);
        let (qc, nh, ps) = (shape.q_col as i32, shape.n_heads as i32, l.page_size as i32);
        let (write, attend) = if store.bf16 {
            ("kv_write_bf16", "attention_prefill_bf16")
        } else {
            ("kv_write_f32", "attention_prefill_f32")
        };
        launch!(self, write, write_cfg, [q, stride, kc, vc, k, v, slots, kvh, hd]);
        let pointers = [q, k, v, pos, pages_d, starts, o];
        if self.flash_attention(shape, seqs, store.bf16, pointers, [stride, ps, window])? {
            return Ok(());
        }
        launch!(
            self,
            attend,
            att_cfg,
            [q, stride, qc, k, v, pages_d, starts, seqs_d, pos, o, nh, kvh, hd, ps, shape.scale, window]
        );
        Ok(())
    }
}
