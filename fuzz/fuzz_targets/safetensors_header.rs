//! Any byte string as a safetensors file: an error or a tensor count, never a panic.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = moe_model::checkpoint::check_safetensors(data);
});
