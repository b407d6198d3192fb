//! Safetensors checkpoints, memory-mapped: a single `model.safetensors` or the shards listed in
//! `model.safetensors.index.json`. Tensors are read by name, checked against the shape the config
//! implies, and widened to f32 (from f32, bf16 or f16).

use crate::error::{ModelError, Result};
use memmap2::Mmap;
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

struct Shard {
    path: PathBuf,
    map: Mmap,
    /// Tensor name -> (dtype as written in the header, shape, byte range within the file).
    tensors: HashMap<String, (String, Vec<usize>, std::ops::Range<usize>)>,
}

/// All tensors of a checkpoint directory.
pub struct Checkpoint {
    dir: PathBuf,
    shards: Vec<Shard>,
    by_name: HashMap<String, usize>,
    /// The block of FP8 weights' scales (config.json's `quantization_config.weight_block_size`).
    fp8_block: Option<[usize; 2]>,
}

/// `quantization_config.weight_block_size` of `<dir>/config.json`, when it says block-scaled FP8.
fn fp8_block_of(dir: &Path) -> Option<[usize; 2]> {
    let text = std::fs::read_to_string(dir.join("config.json")).ok()?;
    let cfg = crate::config::ModelConfig::parse(&text, &dir.join("config.json")).ok()?;
    match cfg.quantization? {
        crate::config::Quantization::Fp8Block { block } => Some(block),
        crate::config::Quantization::Other(_) => None,
    }
}

/// Bytes per element of the safetensors dtypes we can size (all the format defines but sub-byte).
fn dtype_size(dtype: &str) -> Option<usize> {
    Some(match dtype {
        "F64" | "I64" | "U64" | "C64" => 8,
        "F32" | "I32" | "U32" => 4,
        "F16" | "BF16" | "I16" | "U16" => 2,
        "I8" | "U8" | "BOOL" | "F8_E4M3" | "F8_E5M2" | "F8_E8M0" => 1,
        _ => return None,
    })
}

fn open_shard(path: &Path) -> Result<Shard> {
    let file = File::open(path).map_err(|error| ModelError::Io { path: path.to_path_buf(), error })?;
    // SAFETY: the file is opened read-only; like every mmap reader we rely on no one truncating
    // the checkpoint while it is loaded (contents are copied out at load time).
    let map = unsafe { Mmap::map(&file) }.map_err(|error| ModelError::Io { path: path.to_path_buf(), error })?;
    let tensors =
        parse_header(&map).map_err(|message| ModelError::Safetensors { path: path.to_path_buf(), message })?;
    Ok(Shard { path: path.to_path_buf(), map, tensors })
}

type TensorIndex = HashMap<String, (String, Vec<usize>, std::ops::Range<usize>)>;

/// Checks a whole safetensors file image and returns its tensor count (for fuzzing and tools:
/// every malformed input is an error message, never a panic).
pub fn check_safetensors(file: &[u8]) -> std::result::Result<usize, String> {
    parse_header(file).map(|t| t.len())
}

/// Reads and checks a safetensors header with the `safetensors` crate (every tensor's byte
/// range must match its shape and dtype, the ranges must tile the data section exactly); when
/// it refuses a file, [`explain`] says which tensor and which numbers disagree.
fn parse_header(file: &[u8]) -> std::result::Result<TensorIndex, String> {
    let (n, metadata) = safetensors::SafeTensors::read_metadata(file).map_err(|e| explain(file, &e))?;
    let data_start = 8 + n;
    Ok(metadata
        .tensors()
        .into_iter()
        .map(|(name, info)| {
            let (start, end) = info.data_offsets;
            (name, (info.dtype.to_string(), info.shape.clone(), data_start + start..data_start + end))
        })
        .collect())
}

/// The precise reason behind the crate's refusal `e` of `file`: the length field, the JSON, or
/// the tensor whose shape, dtype and offsets disagree (or that runs past the end of the file).
fn explain(file: &[u8], e: &safetensors::SafeTensorError) -> String {
    use safetensors::SafeTensorError as E;
    let len = file.len();
    let Some(head) = file.get(..8) else {
        return format!("file is {len} bytes, too short for a safetensors header (truncated?)");
    };
    let n = u64::from_le_bytes([head[0], head[1], head[2], head[3], head[4], head[5], head[6], head[7]]);
    let data_start = 8u64.saturating_add(n);
    match e {
        E::HeaderTooLarge | E::InvalidHeaderLength if data_start > len as u64 => {
            return format!(
                "header length {n} runs past the end of the {len}-byte file (truncated, or not safetensors?)"
            );
        }
        E::HeaderTooLarge => return format!("header length {n} is over the format's limit of 100 MB"),
        E::InvalidHeader(e) => return format!("header is not valid UTF-8: {e}"),
        E::InvalidHeaderDeserialization(e) => return format!("header is not a valid safetensors JSON header: {e}"),
        _ => {}
    }
    // The header parsed as JSON: find the tensor that breaks the rules, in data order.
    let data_start = data_start as usize;
    let Some(Ok(header)) = file.get(8..data_start).map(serde_json::from_slice::<serde_json::Value>) else {
        return format!("header is not valid JSON ({e})");
    };
    let mut tensors: Vec<(&String, &serde_json::Value)> =
        header.as_object().into_iter().flatten().filter(|(k, _)| *k != "__metadata__").collect();
    let offset = |v: &serde_json::Value, i: usize| v["data_offsets"][i].as_u64().unwrap_or(0) as usize;
    tensors.sort_by_key(|(_, v)| (offset(v, 0), offset(v, 1)));
    let data_len = len - data_start;
    let mut expected_start = 0usize;
    for (name, info) in &tensors {
        let (start, end) = (offset(info, 0), offset(info, 1));
        let dtype = info["dtype"].as_str().unwrap_or("?");
        let shape: Vec<u64> = info["shape"].as_array().into_iter().flatten().filter_map(|d| d.as_u64()).collect();
        if end < start {
            return format!("tensor {name:?}: data_offsets [{start}, {end}] end before they start");
        }
        if start != expected_start {
            return format!(
                "tensor {name:?}: data starts at byte {start} of the data section, but the previous tensor ends at {expected_start} (gaps and overlaps are not allowed)"
            );
        }
        let size = dtype_size(dtype).map(|s| s as u64);
        let bytes = size.and_then(|s| shape.iter().try_fold(s, |a, &d| a.checked_mul(d)));
        match bytes {
            None if size.is_some() => return format!("tensor {name:?}: shape {shape:?} overflows"),
            Some(b) if b != (end - start) as u64 => {
                return format!(
                    "tensor {name:?}: the header says shape {shape:?} of {dtype} ({b} bytes) but its data_offsets span {} bytes",
                    end - start
                )
            }
            _ => {}
        }
        if end > data_len {
            return format!(
                "tensor {name:?}: data ends at byte {end} of the data section, but the file holds only {data_len} bytes of data (truncated?)"
            );
        }
        expected_start = end;
    }
    if expected_start < data_len {
        return format!("{} bytes after the last tensor's data (not a safetensors file?)", data_len - expected_start);
    }
    format!("invalid safetensors file: {e}")
}

impl Checkpoint {
    /// Opens every safetensors file of `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index.exists() {
            let text =
                std::fs::read_to_string(&index).map_err(|error| ModelError::Io { path: index.clone(), error })?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| ModelError::ShardIndex { path: index.clone(), message: format!("not valid JSON: {e}") })?;
            let map = v.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| ModelError::ShardIndex {
                path: index.clone(),
                message: "`weight_map` object is missing".into(),
            })?;
            let mut files: Vec<String> = Vec::new();
            for (name, f) in map {
                let f = f.as_str().ok_or_else(|| ModelError::ShardIndex {
                    path: index.clone(),
                    message: format!("file for tensor {name:?} is not a string"),
                })?;
                if f.contains('/') || f.contains("..") {
                    return Err(ModelError::ShardIndex {
                        path: index.clone(),
                        message: format!("shard name {f:?} must be a plain file name"),
                    });
                }
                if !files.iter().any(|x| x == f) {
                    files.push(f.to_string());
                }
            }
            files.sort();
            files.into_iter().map(|f| dir.join(f)).collect()
        } else if single.exists() {
            vec![single]
        } else {
            return Err(ModelError::Io {
                path: single,
                error: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no model.safetensors or model.safetensors.index.json in the model directory",
                ),
            });
        };
        let mut shards = Vec::with_capacity(files.len());
        let mut by_name = HashMap::new();
        for f in &files {
            let shard = open_shard(f)?;
            for name in shard.tensors.keys() {
                by_name.insert(name.clone(), shards.len());
            }
            shards.push(shard);
        }
        Ok(Self { dir: dir.to_path_buf(), shards, by_name, fp8_block: fp8_block_of(dir) })
    }

    /// Opens one safetensors file (a PEFT adapter's `adapter_model.safetensors`, say).
    pub fn open_file(path: &Path) -> Result<Self> {
        let shard = open_shard(path)?;
        let by_name = shard.tensors.keys().map(|n| (n.clone(), 0)).collect();
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Ok(Self { dir, shards: vec![shard], by_name, fp8_block: None })
    }

    /// Every tensor name, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.by_name.keys().map(String::as_str).collect();
        v.sort_unstable();
        v
    }

    /// The shape of tensor `name` as stored.
    pub fn shape_of(&self, name: &str) -> Option<&[usize]> {
        let s = &self.shards[*self.by_name.get(name)?];
        s.tensors.get(name).map(|t| t.1.as_slice())
    }

    pub fn contains(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }

    /// The dtype of the first tensor found (for logs), e.g. `BF16`.
    pub fn dtype_of(&self, name: &str) -> Option<String> {
        let s = &self.shards[*self.by_name.get(name)?];
        s.tensors.get(name).map(|t| t.0.clone())
    }

    /// Tensor `name` as raw bf16 bits when it is stored as BF16 (checked to have `shape`), else
    /// `None` (read it with [`Checkpoint::read`]).
    pub fn read_bf16(&self, name: &str, shape: &[usize]) -> Result<Option<Vec<u16>>> {
        let Some(&idx) = self.by_name.get(name) else { return Ok(None) };
        let shard = &self.shards[idx];
        let (dtype, got, range) = &shard.tensors[name];
        if dtype != "BF16" {
            return Ok(None);
        }
        if got.as_slice() != shape {
            return Err(ModelError::ShapeMismatch {
                path: shard.path.clone(),
                name: name.to_string(),
                expected: shape.to_vec(),
                got: got.clone(),
            });
        }
        Ok(Some(shard.map[range.clone()].chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect()))
    }

    /// The bytes and dtype of entry `index` along the first dimension of tensor `name`, checking
    /// the tensor has exactly `shape` (a fused `[experts, ...]` tensor read one expert at a time).
    pub fn raw_slice(&self, name: &str, shape: &[usize], index: usize) -> Result<(&str, &[u8])> {
        let &idx = self
            .by_name
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor { name: name.to_string(), dir: self.dir.clone() })?;
        let shard = &self.shards[idx];
        let (dtype, got, range) = &shard.tensors[name];
        if got.as_slice() != shape || shape.is_empty() || index >= shape[0] {
            return Err(ModelError::ShapeMismatch {
                path: shard.path.clone(),
                name: name.to_string(),
                expected: shape.to_vec(),
                got: got.clone(),
            });
        }
        let per = (range.end - range.start) / shape[0];
        let start = range.start + index * per;
        Ok((dtype.as_str(), &shard.map[start..start + per]))
    }

    /// Entry `index` along the first dimension of tensor `name` (of `shape`) as f32.
    pub fn read_slice(&self, name: &str, shape: &[usize], index: usize) -> Result<Vec<f32>> {
        let (dtype, bytes) = self.raw_slice(name, shape, index)?;
        widen(dtype, bytes).ok_or_else(|| ModelError::UnsupportedDtype {
            path: self.dir.clone(),
            name: name.to_string(),
            dtype: dtype.to_string(),
        })
    }

    /// Reads tensor `name` as f32, checking it has exactly `shape`.
    pub fn read(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let &idx = self
            .by_name
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor { name: name.to_string(), dir: self.dir.clone() })?;
        let shard = &self.shards[idx];
        let (dtype, got, range) = &shard.tensors[name];
        if got.as_slice() != shape {
            return Err(ModelError::ShapeMismatch {
                path: shard.path.clone(),
                name: name.to_string(),
                expected: shape.to_vec(),
                got: got.clone(),
            });
        }
        let bytes = &shard.map[range.clone()];
        if let Some(values) = widen(dtype, bytes) {
            return Ok(values);
        }
        let out = match dtype.as_str() {
            "F8_E4M3" if shape.len() == 2 => {
                let block = self.fp8_block.ok_or_else(|| ModelError::UnsupportedDtype {
                    path: shard.path.clone(),
                    name: name.to_string(),
                    dtype: "F8_E4M3 without quantization_config.weight_block_size in config.json".into(),
                })?;
                let (rows, cols) = (shape[0], shape[1]);
                let scale_shape = [rows.div_ceil(block[0]), cols.div_ceil(block[1])];
                let scales = self.read(&format!("{name}_scale_inv"), &scale_shape)?;
                crate::fp8::dequantize(bytes, rows, cols, &scales, block)
            }
            other => {
                return Err(ModelError::UnsupportedDtype {
                    path: shard.path.clone(),
                    name: name.to_string(),
                    dtype: other.to_string(),
                })
            }
        };
        Ok(out)
    }
}

/// Little-endian F32, BF16 or F16 values as f32; `None` for other dtypes.
fn widen(dtype: &str, bytes: &[u8]) -> Option<Vec<f32>> {
    Some(match dtype {
        "F32" => bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        "BF16" => bytes.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        "F16" => bytes.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::check_safetensors;

    /// A file image: the header JSON, then `data` bytes.
    fn image(header: &str, data: usize) -> Vec<u8> {
        let mut f = (header.len() as u64).to_le_bytes().to_vec();
        f.extend_from_slice(header.as_bytes());
        f.resize(f.len() + data, 0);
        f
    }

    /// The crate parses; refusals name the tensor and the numbers.
    #[test]
    fn refusals_say_what_is_wrong() {
        let two = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"BF16","shape":[2],"data_offsets":[8,12]}}"#;
        assert_eq!(check_safetensors(&image(two, 12)), Ok(2));
        let err = |h: &str, data: usize| check_safetensors(&image(h, data)).expect_err("refused");
        let e = err(two, 10);
        assert!(e.contains("\"b\"") && e.contains("truncated"), "{e}");
        let e = err(r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#, 8);
        assert!(e.contains("\"a\"") && e.contains("[3]") && e.contains("12 bytes") && e.contains("span 8"), "{e}");
        let e = err(r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#, 12);
        assert!(e.contains("\"a\"") && e.contains("starts at byte 4"), "{e}");
        let e = err(r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#, 9);
        assert!(e.contains("1 bytes after"), "{e}");
        let e = check_safetensors(&[1, 0, 0]).expect_err("short");
        assert!(e.contains("too short"), "{e}");
        let mut huge = image("{}", 0);
        huge[..8].copy_from_slice(&1000u64.to_le_bytes());
        assert!(check_safetensors(&huge).expect_err("long").contains("runs past the end"));
        assert!(err("{not json", 0).contains("JSON"));
    }
}
