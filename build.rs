//! Compiles `proto/` with protox (no system `protoc` needed) into the gRPC code and the
//! encoded descriptor set that server reflection serves.

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
    Ok(())
}
