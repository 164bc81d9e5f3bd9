//! Validation at the edge (SPEC §11).

/// Envoy's external authorization API v3 and the packages it imports.
#[allow(clippy::all, missing_docs)]
pub mod envoy_pb {
    include!(concat!(env!("OUT_DIR"), "/envoy_api.rs"));
}
