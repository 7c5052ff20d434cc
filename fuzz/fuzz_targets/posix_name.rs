//! POSIX segment names received from a peer: only our exact shape is accepted, never a path elsewhere.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data)
        && let Ok(n) = shmgrpc::segment::PosixName::parse(s)
    {
        assert!(n.as_str().starts_with("/shmgrpc-"));
        assert!(!n.as_str()[1..].contains('/'));
        assert_eq!(shmgrpc::segment::PosixName::parse(n.as_str()).unwrap(), n);
    }
});
