//! The CUDA kernel sources (`kernels/*.cu`), embedded in the binary so a GPU machine needs
//! nothing but the driver and NVRTC. Each file is compiled as `common.cuh` followed by a
//! `#line 1 "<file>"` directive and the file, so NVRTC's errors name the kernel file and line.
//! This module is plain data and is built with or without the `cuda` feature.

/// One kernel file and the entry points it defines (`<op>_<dtype>`).
#[derive(Clone, Copy, Debug)]
pub struct KernelSource {
    pub file: &'static str,
    pub source: &'static str,
    pub entry_points: &'static [&'static str],
}

pub const COMMON: &str = include_str!("../../../kernels/common.cuh");

macro_rules! kernel {
    ($file:literal, [$($entry:literal),* $(,)?]) => {
        KernelSource {
            file: $file,
            source: include_str!(concat!("../../../kernels/", $file)),
            entry_points: &[$($entry),*],
        }
    };
}

/// Every kernel of the project.
pub const KERNELS: &[KernelSource] = &[
    kernel!("rmsnorm.cu", ["rmsnorm_f32", "rmsnorm_bf16"]),
    kernel!("rope.cu", ["rope_f32", "rope_bf16"]),
    kernel!("swiglu.cu", ["swiglu_f32", "swiglu_bf16"]),
    kernel!("topk_gating.cu", ["topk_gating_f32"]),
    kernel!("permute.cu", ["moe_permute_f32", "moe_permute_bf16", "moe_unpermute_f32"]),
    kernel!("grouped_gemm.cu", ["grouped_gemm_bf16", "grouped_gemm_ptrs_bf16", "grouped_gemm_swiglu_bf16"]),
    kernel!("lora.cu", ["lora_shrink_f32", "lora_expand_f32"]),
    kernel!(
        "paged_attention.cu",
        [
            "kv_write_f32",
            "kv_write_bf16",
            "paged_attention_decode_f32",
            "attention_prefill_f32",
            "attention_prefill_bf16"
        ]
    ),
    kernel!("sampling.cu", ["sample_greedy_f32", "sample_top_p_f32"]),
    kernel!(
        "backend.cu",
        [
            "to_bf16_f32",
            "embed_bf16",
            "embed_f32",
            "add_bias_f32",
            "add_f32",
            "clamp_f32",
            "rmsnorm_groups_f32",
            "rope_table_f32",
            "rope_apply_f32",
            "sigmoid_gated_add_f32",
        ]
    ),
];

impl KernelSource {
    /// What NVRTC compiles: the shared helpers, then this file with its own line numbers.
    pub fn full_source(&self) -> String {
        format!("#line 1 \"common.cuh\"\n{COMMON}\n#line 1 \"{}\"\n{}", self.file, self.source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_entry_point_is_defined_extern_c_in_its_file() {
        for k in KERNELS {
            for e in k.entry_points {
                let decl = format!("extern \"C\" __global__ void {e}(");
                assert!(k.source.contains(&decl), "{} does not define {e}", k.file);
                let dtype = e.rsplit('_').next().unwrap_or_default();
                assert!(["f32", "bf16", "f16"].contains(&dtype), "{e} is not named <op>_<dtype>");
            }
            let declared = k.source.matches("extern \"C\" __global__").count();
            assert_eq!(declared, k.entry_points.len(), "{}: every entry point must be listed", k.file);
        }
    }
}
