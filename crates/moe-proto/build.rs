//! Compiles proto/moe/v1/*.proto with the protoc shipped by `protoc-bin-vendored`, so no one
//! installs protoc by hand, and writes the descriptor set used by server reflection.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let protos = [root.join("moe/v1/inference.proto"), root.join("moe/v1/expert.proto")];
    for p in &protos {
        println!("cargo:rerun-if-changed={}", p.display());
    }
    tonic_prost_build::configure()
        .codec_path("crate::codec::StrictCodec")
        .bytes(".moe.v1.ExpertRequest.rows")
        .bytes(".moe.v1.ExpertResponse.rows")
        .file_descriptor_set_path(out.join("moe_v1_descriptor.bin"))
        .compile_protos(&protos, &[root])?;
    Ok(())
}
