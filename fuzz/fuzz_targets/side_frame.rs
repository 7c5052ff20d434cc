//! Side-channel frames (handshake, registrations, releases) received from a peer: decoding never panics.
#![no_main]
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = shmgrpc::wire::decode_frame(data) {
        assert!(m.kind.is_some());
        assert!(m.encoded_len() <= data.len() + 16);
    }
});
