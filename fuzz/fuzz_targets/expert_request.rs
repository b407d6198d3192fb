//! Any bytes as an ExpertRequest message: protobuf decoding, row decoding and the worker's
//! validation and compute (on the mixtral test fixture's experts).
#![no_main]
use moe_proto::prost::Message;
use moe_proto::v1::{ExpertRequest, WireDtype};

static HOST: std::sync::OnceLock<moe_worker::ExpertHost> = std::sync::OnceLock::new();

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let host = HOST.get_or_init(|| {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/mixtral");
        moe_worker::ExpertHost::load(&dir, &moe_worker::ExpertSpec::All).expect("fixture")
    });
    let Ok(req) = ExpertRequest::decode(data) else { return };
    let Ok(dtype) = WireDtype::try_from(req.dtype) else { return };
    let mut rows = Vec::new();
    if moe_proto::wire::decode_rows(&req.rows, dtype, req.hidden_size as usize, &mut rows).is_err() {
        return;
    }
    let input = moe_worker::ComputeInput {
        layer: req.layer as usize,
        hidden_size: req.hidden_size as usize,
        rows: &rows,
        row_pairs: &req.row_pairs,
        experts: &req.experts,
        weights: &req.weights,
        adapters: &[],
        row_adapters: &req.row_adapters,
    };
    let mut out = Vec::new();
    let _ = host.compute(&input, &mut out);
});
