//! Any text as config.json, adapter_config.json or a tenants file.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let _ = moe_model::ModelConfig::parse(&text, std::path::Path::new("config.json"));
    let _ = moe_lora::PeftConfig::parse(&text, std::path::Path::new("adapter_config.json"));
    let _ = moe_router::Tenants::parse(&text);
});
