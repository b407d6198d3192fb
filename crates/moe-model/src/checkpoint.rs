//! Safetensors checkpoints, memory-mapped: a single `model.safetensors` or the shards listed in
//! `model.safetensors.index.json`. Tensors are read by name, checked against the shape the config
//! implies, and widened to f32 (from f32, bf16 or f16).

use crate::error::{ModelError, Result};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

struct Shard {
    path: PathBuf,
    map: Mmap,
    /// Tensor name -> (dtype, shape, byte range within the file).
    tensors: HashMap<String, (Dtype, Vec<usize>, std::ops::Range<usize>)>,
}

/// All tensors of a checkpoint directory.
pub struct Checkpoint {
    dir: PathBuf,
    shards: Vec<Shard>,
    by_name: HashMap<String, usize>,
}

fn open_shard(path: &Path) -> Result<Shard> {
    let file = File::open(path).map_err(|source| ModelError::Io { path: path.to_path_buf(), source })?;
    // SAFETY: the file is opened read-only; like every mmap reader we rely on no one truncating
    // the checkpoint while it is loaded (contents are copied out at load time).
    let map = unsafe { Mmap::map(&file) }.map_err(|source| ModelError::Io { path: path.to_path_buf(), source })?;
    let st = SafeTensors::deserialize(&map).map_err(|e| ModelError::Safetensors {
        path: path.to_path_buf(),
        message: describe_safetensors_error(&e, map.len()),
    })?;
    let base = st_data_offset(&map);
    let mut tensors = HashMap::new();
    for (name, view) in st.tensors() {
        let start = view.data().as_ptr() as usize - map.as_ptr() as usize;
        debug_assert!(start >= base);
        tensors.insert(name, (view.dtype(), view.shape().to_vec(), start..start + view.data().len()));
    }
    Ok(Shard { path: path.to_path_buf(), map, tensors })
}

fn st_data_offset(map: &[u8]) -> usize {
    map.get(..8).map(|b| u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as usize + 8).unwrap_or(0)
}

fn describe_safetensors_error(e: &safetensors::SafeTensorError, file_len: usize) -> String {
    use safetensors::SafeTensorError as E;
    match e {
        E::HeaderTooSmall => format!("file is {file_len} bytes, too short for a safetensors header (truncated?)"),
        E::InvalidHeaderLength => format!("header length exceeds the file size of {file_len} bytes (truncated?)"),
        E::MetadataIncompleteBuffer => {
            format!("tensor data extends past the end of the file ({file_len} bytes): truncated, or the header lies about sizes")
        }
        other => other.to_string(),
    }
}

impl Checkpoint {
    /// Opens every safetensors file of `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index.exists() {
            let text =
                std::fs::read_to_string(&index).map_err(|source| ModelError::Io { path: index.clone(), source })?;
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
                source: std::io::Error::new(
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
        Ok(Self { dir: dir.to_path_buf(), shards, by_name })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }

    /// The dtype of the first tensor found (for logs), e.g. `BF16`.
    pub fn dtype_of(&self, name: &str) -> Option<String> {
        let s = &self.shards[*self.by_name.get(name)?];
        s.tensors.get(name).map(|t| format!("{:?}", t.0))
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
        let out = match dtype {
            Dtype::F32 => bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            Dtype::BF16 => bytes.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            Dtype::F16 => bytes.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            other => {
                return Err(ModelError::UnsupportedDtype {
                    path: shard.path.clone(),
                    name: name.to_string(),
                    dtype: format!("{other:?}"),
                })
            }
        };
        Ok(out)
    }
}
