//! Compiles the protocol and demo protos with protox (pure Rust: no system `protoc`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(["proto/shmgrpc.proto"], ["proto"])?;
    tonic_prost_build::configure().bytes(".").compile_fds(fds)?;
    let fds = protox::compile(["proto/blob.proto"], ["proto"])?;
    tonic_prost_build::configure().bytes(".").codec_path("crate::codec::ShmCodec").compile_fds(fds)?;
    Ok(())
}
