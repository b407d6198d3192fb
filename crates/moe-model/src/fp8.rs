//! Block-scaled FP8 checkpoints (DeepSeek-V3's and many Qwen3/GLM releases): a weight stored as
//! `F8_E4M3` with a `<name>_scale_inv` tensor of one f32 per `block[0] x block[1]` block (partial
//! blocks at the edges when a dimension is not a multiple: DeepSeek-V3's `kv_a_proj_with_mqa` has
//! 576 rows). Dequantized as transformers does: `weight = e4m3 value x scale of its block`, in f32.

/// The value of an e4m3fn byte (1 sign, 4 exponent bits with bias 7, 3 mantissa bits; no
/// infinities, 0x7f/0xff are NaN).
pub fn e4m3_to_f32(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
    let exp = ((b >> 3) & 0x0f) as i32;
    let man = (b & 0x07) as f32;
    if exp == 0x0f && b & 0x07 == 0x07 {
        return f32::NAN;
    }
    if exp == 0 {
        sign * man / 8.0 * 2f32.powi(-6)
    } else {
        sign * (1.0 + man / 8.0) * 2f32.powi(exp - 7)
    }
}

/// Dequantizes `[rows, cols]` e4m3 bytes with `scales` (`[ceil(rows/b0), ceil(cols/b1)]`,
/// row-major). The caller has checked the scales' shape.
pub fn dequantize(bytes: &[u8], rows: usize, cols: usize, scales: &[f32], block: [usize; 2]) -> Vec<f32> {
    let scale_cols = cols.div_ceil(block[1]);
    let mut out = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        let srow = &scales[(r / block[0]) * scale_cols..][..scale_cols];
        for c in 0..cols {
            out.push(e4m3_to_f32(bytes[r * cols + c]) * srow[c / block[1]]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e4m3_values_as_torch_decodes_them() {
        // torch.tensor([...]).to(torch.float8_e4m3fn).view(torch.uint8) for these values.
        let cases = [(0x00u8, 0.0f32), (0x38, 1.0), (0xb8, -1.0), (0x7e, 448.0), (0x01, 1.0 / 512.0), (0x40, 2.0)];
        for (b, want) in cases {
            assert_eq!(e4m3_to_f32(b), want, "byte {b:#04x}");
        }
        assert!(e4m3_to_f32(0x7f).is_nan());
    }

    #[test]
    fn partial_edge_blocks_use_their_own_scale() {
        // 3 x 3 with 2 x 2 blocks: scales [[1, 10], [100, 1000]].
        let bytes = [0x38u8; 9];
        let got = dequantize(&bytes, 3, 3, &[1.0, 10.0, 100.0, 1000.0], [2, 2]);
        assert_eq!(got, vec![1.0, 1.0, 10.0, 1.0, 1.0, 10.0, 100.0, 100.0, 1000.0]);
    }
}
