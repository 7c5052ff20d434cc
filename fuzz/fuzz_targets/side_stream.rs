//! Side-channel bytes from a peer, with or without a descriptor riding somewhere in them (protocol §3): the frame
//! reader never panics; it yields frames, then a clean end or an error that closes the session.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (u16, bool, &[u8])| {
    let (split, fd, data) = input;
    let _ = shmgrpc::__fuzz::read_side_frames(data, usize::from(split), fd);
});
