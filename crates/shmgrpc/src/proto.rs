//! Generated protobuf and gRPC code of the shmgrpc protocol (`shmgrpc.v1`): discovery service, side-channel
//! frames, references. Compiled from `proto/shmgrpc.proto` by `build.rs` with protox.

#![allow(missing_docs, missing_debug_implementations, unreachable_pub, clippy::all, clippy::pedantic)]

/// The shmgrpc wire protocol: discovery service, side-channel frames, references.
pub mod v1 {
    tonic::include_proto!("shmgrpc.v1");
}
