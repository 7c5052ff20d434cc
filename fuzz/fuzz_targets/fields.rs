//! Messages in a peer's memory, cut into parts as references cut them, scanned for their top-level fields (the
//! Python package's views and in-place parsing): never a panic, and what is handed out lies in the input.
#![no_main]
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&cut, rest)) = data.split_first() else { return };
    let cut = usize::from(cut).min(rest.len());
    let parts = [Bytes::copy_from_slice(&rest[..cut]), Bytes::copy_from_slice(&rest[cut..])];
    let _ = shmgrpc::embed::aligned(&parts);
    for number in 1..4 {
        if let Some((content, other)) = shmgrpc::embed::split_field(&parts, number) {
            assert!(content.len() + other.len() <= rest.len());
        }
    }
});
