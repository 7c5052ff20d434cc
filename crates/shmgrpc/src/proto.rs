//! Generated protobuf and gRPC code: the shmgrpc protocol (`shmgrpc.v1`) and the demo blob service
//! (`shmgrpc.demo.v1`). Compiled from `proto/` by `build.rs` with protox.

#![allow(missing_docs, clippy::all, clippy::pedantic)]

/// The shmgrpc wire protocol: discovery service, side-channel frames, references.
pub mod v1 {
    tonic::include_proto!("shmgrpc.v1");
}

/// The demo blob service (echo, upload, download and streaming variants), built with [`crate::ShmCodec`].
pub mod demo {
    tonic::include_proto!("shmgrpc.demo.v1");
}

/// The demo blob service generated with tonic's own prost codec: plain gRPC, for baselines and fallback tests.
pub mod demo_plain {
    include!(concat!(env!("OUT_DIR"), "/plain/shmgrpc.demo.v1.rs"));
}
