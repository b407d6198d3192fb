//! `moe-proto` owns the wire: the code generated from `proto/moe/v1` (package `moe.v1`: the
//! public `Inference` service and the internal `ExpertWorker` service), the descriptor set for
//! server reflection, and the encoding of hidden-state rows as raw little-endian bf16 or f32
//! bytes, and the client's bookkeeping for resuming a broken stream ([`resume::ResumeState`]).

pub mod codec;
pub mod resume;
pub mod wire;

/// Generated messages, clients and servers of package `moe.v1`.
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("moe.v1");
}

/// The encoded `FileDescriptorSet` of package `moe.v1`, for `tonic-reflection`.
/// Largest `ExpertWorker` message either side (router transport, worker server) sends or
/// accepts; the router splits a step's rows into messages well below it.
pub const EXPERT_MAX_MESSAGE_BYTES: usize = 64 << 20;

/// Largest public `Inference` message the router accepts or sends.
pub const INFERENCE_MAX_MESSAGE_BYTES: usize = 16 << 20;

pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("moe_v1_descriptor");

/// The protobuf runtime the generated types use (for decoding raw messages, e.g. in fuzzing).
pub use prost;
