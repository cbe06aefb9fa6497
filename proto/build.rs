//! Compiles `kiln/v1/kiln.proto` with the pure-Rust `protox`, so building
//! Kiln needs no system `protoc`.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "kiln/v1/kiln.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["."])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("kiln_descriptor.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )?;
    // `build_transport(false)`: the generated `connect(dst)` constructor would
    // clash with the `Connect` RPC; clients use `new(channel)` instead.
    tonic_prost_build::configure()
        .build_transport(false)
        .compile_fds(descriptors)?;
    Ok(())
}
