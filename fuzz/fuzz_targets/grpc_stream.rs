//! The gRPC message stream of a call as a receiver's hold-back body scans it (protocol §6): whatever a peer sends,
//! in whatever chunks, the scanner never panics and hands every byte on unchanged and in order.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (u16, &[u8])| {
    let (chunk, data) = input;
    let out = shmgrpc::__fuzz::hold_back_scan(data, usize::from(chunk).max(1));
    assert_eq!(out, data);
});
