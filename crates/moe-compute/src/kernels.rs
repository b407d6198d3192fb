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
    kernel!("expert_plan.cu", ["gate_route_f32", "expert_plan_f32"]),
    kernel!(
        "grouped_gemm_tc.cu",
        [
            "grouped_gemm_tc_bf16",
            "grouped_gemm_tc_small_bf16",
            "grouped_gemm_tc_swiglu_bf16",
            "grouped_gemm_tc_swiglu_small_bf16"
        ]
    ),
    kernel!("flash_decode.cu", ["flash_decode_bf16", "flash_decode_merge_f32"]),
    kernel!("flash_prefill.cu", ["flash_prefill_bf16"]),
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
    kernel!("sample_rows.cu", ["sample_rows_f32"]),
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
            "random_bf16",
        ]
    ),
];

impl KernelSource {
    /// What NVRTC compiles: the shared helpers, then this file with its own line numbers.
    pub fn full_source(&self) -> String {
        format!("#line 1 \"common.cuh\"\n{COMMON}\n#line 1 \"{}\"\n{}", self.file, self.source)
    }
}

/// What ptxas reports for one function of a cubin (`--ptxas-options=-v`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelResources {
    pub function: String,
    pub registers: u32,
    pub stack_bytes: u32,
    pub spill_store_bytes: u32,
    pub spill_load_bytes: u32,
    /// Static shared memory (dynamic shared memory is sized at launch and not counted).
    pub shared_bytes: u32,
}

impl KernelResources {
    pub fn spills(&self) -> bool {
        self.spill_store_bytes > 0 || self.spill_load_bytes > 0
    }
}

/// Parses ptxas's `-v` report: a `Function properties for F` line, then stack and spill bytes,
/// then `Used N registers, ..., S bytes smem`. Functions in report order.
pub fn parse_ptxas_log(log: &str) -> Vec<KernelResources> {
    fn number_before(text: &str, unit: &str) -> Option<u32> {
        let at = text.find(unit)?;
        text[..at].split(|c: char| !c.is_ascii_digit()).rfind(|w| !w.is_empty())?.parse().ok()
    }
    let mut out: Vec<KernelResources> = Vec::new();
    for line in log.lines() {
        if let Some(rest) = line.split("Function properties for ").nth(1) {
            out.push(KernelResources { function: rest.trim().to_string(), ..Default::default() });
            continue;
        }
        let Some(current) = out.last_mut() else { continue };
        if line.contains("bytes stack frame") {
            current.stack_bytes = number_before(line, " bytes stack frame").unwrap_or(0);
            current.spill_store_bytes = number_before(line, " bytes spill stores").unwrap_or(0);
            current.spill_load_bytes = number_before(line, " bytes spill loads").unwrap_or(0);
        } else if line.contains("Used ") && line.contains(" registers") {
            current.registers = number_before(line, " registers").unwrap_or(0);
            current.shared_bytes = number_before(line, " bytes smem").unwrap_or(0);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_entry_point_is_defined_extern_c_in_its_file() {
        for k in KERNELS {
            // Declarations with whitespace collapsed and launch bounds dropped.
            let mut flat = k.source.split_whitespace().collect::<Vec<_>>().join(" ");
            while let Some(at) = flat.find("__launch_bounds__(") {
                let end = flat[at..].find(')').map_or(flat.len(), |e| at + e + 1);
                flat.replace_range(at..(end + 1).min(flat.len()), "");
            }
            for e in k.entry_points {
                let decl = format!("extern \"C\" __global__ void {e}(");
                assert!(flat.contains(&decl), "{} does not define {e}", k.file);
                let dtype = e.rsplit('_').next().unwrap_or_default();
                assert!(["f32", "bf16", "f16"].contains(&dtype), "{e} is not named <op>_<dtype>");
            }
            let declared = k.source.matches("extern \"C\" __global__").count();
            assert_eq!(declared, k.entry_points.len(), "{}: every entry point must be listed", k.file);
        }
    }

    #[test]
    fn ptxas_reports_are_read_per_function() {
        let log = "ptxas info    : 0 bytes gmem\n\
ptxas info    : Compiling entry function 'k_f32' for 'sm_90'\n\
ptxas info    : Function properties for k_f32\n\
ptxas         .     8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n\
ptxas info    : Used 255 registers, used 1 barriers, 49152 bytes smem, 400 bytes cmem[0]\n\
ptxas info    : Function properties for g_bf16\n\
ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n\
ptxas info    : Used 40 registers, used 0 barriers\n";
        let r = parse_ptxas_log(log);
        assert_eq!(r.len(), 2);
        assert_eq!(
            r[0],
            KernelResources {
                function: "k_f32".into(),
                registers: 255,
                stack_bytes: 8,
                spill_store_bytes: 4,
                spill_load_bytes: 12,
                shared_bytes: 49152
            }
        );
        assert!(r[0].spills() && !r[1].spills());
        assert_eq!((r[1].registers, r[1].shared_bytes), (40, 0));
    }

    /// The canonical exp's constants in common.cuh are the Rust reference's, value for value, so
    /// the device's gate weights are the host's bits.
    #[test]
    fn the_canonical_exp_constants_match_the_rust_reference() {
        let define = |name: &str| -> f32 {
            let line =
                COMMON.lines().find(|l| l.starts_with(&format!("#define {name} "))).unwrap_or_else(|| panic!("{name}"));
            line.split_whitespace().nth(2).and_then(|v| v.trim_end_matches('f').parse().ok()).unwrap_or(f32::NAN)
        };
        let c = crate::gpu_plan::numerics::CONSTANTS;
        let names = [
            "EXP_C_LOG2E",
            "EXP_C_LN2_HI",
            "EXP_C_LN2_LO",
            "EXP_C_P0",
            "EXP_C_P1",
            "EXP_C_P2",
            "EXP_C_P3",
            "EXP_C_P4",
            "EXP_C_P5",
            "EXP_C_MAX",
            "EXP_C_MIN",
        ];
        assert_eq!(names.len(), c.len());
        for (name, want) in names.iter().zip(c) {
            assert_eq!(define(name).to_bits(), want.to_bits(), "{name}");
        }
    }
}
