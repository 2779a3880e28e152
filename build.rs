//! Compiles `proto/` with a pure-Rust toolchain (protox), so building needs no `protoc`.
//! Writes the generated Rust code and the encoded descriptor set (for gRPC reflection) to
//! OUT_DIR.

use std::path::PathBuf;

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(["portcullis/approvals/v1/approvals.proto"], ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("approvals_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
