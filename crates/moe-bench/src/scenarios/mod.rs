//! The measurement scenarios: `moe bench` ([`machine`], which runs the others in turn), the
//! device benchmark, the placement scenario and the load generator.

pub(crate) mod adapters;
pub mod device;
mod device_invariance;
pub(crate) mod failover;
pub(crate) mod fairness;
pub mod loadgen;
pub mod machine;
pub(crate) mod multiturn;
pub mod placement;
pub(crate) mod prefix;
mod progress;
pub(crate) mod shapes;
pub(crate) mod structured;
