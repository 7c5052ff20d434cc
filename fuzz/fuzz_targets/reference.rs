//! References received from a peer: decoding never panics, and what decodes re-encodes to the same bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = shmgrpc::wire::decode_reference(data) {
        let mut again = Vec::new();
        shmgrpc::wire::encode_reference(r, &mut again);
        assert!(shmgrpc::wire::is_reference(&again));
        assert_eq!(again.len(), data.len());
    }
});
