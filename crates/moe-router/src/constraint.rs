//! A request's output constraint between the gRPC API's `Constraint` message and the engine's
//! [`ConstraintSpec`], both ways (the service reads it; Rust clients such as `moe generate`
//! write it).

use moe_constrain::ConstraintSpec;
use moe_proto::v1::constraint::Kind;

/// The engine's form of a request's `constraint` (unset, a oneof with no kind, or
/// `json_object: false`: none).
pub fn from_proto(c: Option<moe_proto::v1::Constraint>) -> Option<ConstraintSpec> {
    match c?.kind? {
        Kind::JsonSchema(s) => Some(ConstraintSpec::JsonSchema(s)),
        Kind::JsonObject(true) => Some(ConstraintSpec::JsonObject),
        Kind::JsonObject(false) => None,
        Kind::Regex(r) => Some(ConstraintSpec::Regex(r)),
        Kind::Lark(g) => Some(ConstraintSpec::Lark(g)),
    }
}

/// A constraint as the gRPC API carries it.
pub fn to_proto(c: ConstraintSpec) -> moe_proto::v1::Constraint {
    let kind = match c {
        ConstraintSpec::JsonSchema(s) => Kind::JsonSchema(s),
        ConstraintSpec::JsonObject => Kind::JsonObject(true),
        ConstraintSpec::Regex(r) => Kind::Regex(r),
        ConstraintSpec::Lark(g) => Kind::Lark(g),
    };
    moe_proto::v1::Constraint { kind: Some(kind) }
}
