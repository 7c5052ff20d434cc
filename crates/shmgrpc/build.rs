//! Compiles the protocol's proto (`proto/shmgrpc.proto`) with protox (pure Rust: no system `protoc`), for the
//! gRPC layer.

#[cfg(feature = "grpc")]
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(["proto/shmgrpc.proto"], ["proto"])?;
    tonic_prost_build::configure().bytes(".").compile_fds(fds)?;
    Ok(())
}

#[cfg(not(feature = "grpc"))]
fn main() {}
