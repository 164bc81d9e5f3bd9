//! Compiles `proto/` with protox (no system `protoc` needed) into the gRPC code and the
//! encoded descriptor set that server reflection serves; then Envoy's external
//! authorization API (`third_party/envoy-api/`) the same way, for `Check`.

use std::{env, fs, path::PathBuf};

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/sessioncache/v1/session_cache.proto";
    println!("cargo:rerun-if-changed={proto}");

    let fds = protox::compile([proto], ["proto"])?;
    // `file_descriptor_set_path` is ignored by `compile_fds`, so reflection's copy is
    // written here by hand.
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(
        out_dir.join("session_cache_descriptor.bin"),
        fds.encode_to_vec(),
    )?;

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .codec_path("crate::codec::SmallBuffers")
        .compile_fds(fds)?;

    envoy(&out_dir)
}

/// Envoy's `envoy.service.auth.v3` and what it imports, as one module tree
/// (`envoy_api.rs`, included by `src/edge/mod.rs`): its messages refer to each other
/// across packages, so every package gets its module.
fn envoy(out_dir: &std::path::Path) -> Result<(), Box<dyn std::error::Error>> {
    let root = "third_party/envoy-api";
    let proto = "envoy/service/auth/v3/external_auth.proto";
    println!("cargo:rerun-if-changed={root}");
    let fds = protox::compile([proto], [root])?;
    fs::write(
        out_dir.join("envoy_auth_descriptor.bin"),
        fds.encode_to_vec(),
    )?;
    tonic_prost_build::configure()
        // The server for the service; the client for the tests and the benchmark.
        .build_client(true)
        .build_server(true)
        .include_file("envoy_api.rs")
        .compile_fds(fds)?;
    Ok(())
}
