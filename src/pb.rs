//! The generated protobuf types and gRPC stubs of `sessioncache.v1`, and their encoded
//! descriptors for server reflection.

tonic::include_proto!("sessioncache.v1");

/// The encoded descriptors of `proto/`, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/session_cache_descriptor.bin"));
