//! Compiles the demo proto with protox (pure Rust: no system `protoc`), twice: with shmgrpc's codec and with tonic's
//! own prost codec (the plain gRPC baseline).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(["proto/blob.proto"], ["proto"])?;
    tonic_prost_build::configure().bytes(".").codec_path("shmgrpc::ShmCodec").compile_fds(fds.clone())?;
    // The same service with tonic's own prost codec: the plain gRPC baseline and peer of the tests and benchmarks.
    let plain = std::path::PathBuf::from(std::env::var("OUT_DIR")?).join("plain");
    std::fs::create_dir_all(&plain)?;
    tonic_prost_build::configure()
        .bytes(".")
        .extern_path(".shmgrpc.demo.v1", "crate::proto::demo")
        .out_dir(plain)
        .compile_fds(fds)?;
    Ok(())
}
