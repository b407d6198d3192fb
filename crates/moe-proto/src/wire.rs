//! Hidden-state rows on the wire: raw little-endian bytes, bf16 (half the bytes; the default)
//! or f32 (exact), never repeated floats.

use crate::v1::WireDtype;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("rows are {bytes} bytes, not a whole number of {hidden}-value rows of {dtype}")]
    RaggedRows { bytes: usize, hidden: usize, dtype: &'static str },
}

pub fn dtype_name(dtype: WireDtype) -> &'static str {
    match dtype {
        WireDtype::Bf16 => "bf16",
        WireDtype::F32 => "f32",
    }
}

pub fn bytes_per_value(dtype: WireDtype) -> usize {
    match dtype {
        WireDtype::Bf16 => 2,
        WireDtype::F32 => 4,
    }
}

/// Appends `values` to `out` in `dtype`.
pub fn encode_into(values: &[f32], dtype: WireDtype, out: &mut Vec<u8>) {
    out.reserve(values.len() * bytes_per_value(dtype));
    match dtype {
        WireDtype::F32 => {
            for v in values {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
        WireDtype::Bf16 => {
            for v in values {
                out.extend_from_slice(&half::bf16::from_f32(*v).to_le_bytes());
            }
        }
    }
}

pub fn encode(values: &[f32], dtype: WireDtype) -> Vec<u8> {
    let mut out = Vec::new();
    encode_into(values, dtype, &mut out);
    out
}

/// Decodes rows of `hidden` values, checking the byte count; returns the number of rows.
pub fn decode_rows(bytes: &[u8], dtype: WireDtype, hidden: usize, out: &mut Vec<f32>) -> Result<usize, WireError> {
    let row_bytes = hidden * bytes_per_value(dtype);
    if row_bytes == 0 || !bytes.len().is_multiple_of(row_bytes) {
        return Err(WireError::RaggedRows { bytes: bytes.len(), hidden, dtype: dtype_name(dtype) });
    }
    out.clear();
    match dtype {
        WireDtype::F32 => out.extend(bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))),
        WireDtype::Bf16 => out.extend(bytes.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())),
    }
    Ok(bytes.len() / row_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_ragged_rows() {
        let v = [1.0f32, -2.5, 3.25, 0.1];
        let mut out = Vec::new();
        assert_eq!(decode_rows(&encode(&v, WireDtype::F32), WireDtype::F32, 2, &mut out), Ok(2));
        assert_eq!(out, v);
        assert_eq!(decode_rows(&encode(&v, WireDtype::Bf16), WireDtype::Bf16, 4, &mut out), Ok(1));
        assert!((out[3] - 0.1).abs() < 1e-3);
        assert!(matches!(decode_rows(&[0u8; 6], WireDtype::F32, 2, &mut out), Err(WireError::RaggedRows { .. })));
    }
}
