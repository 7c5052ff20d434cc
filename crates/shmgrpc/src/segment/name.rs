//! Names: the POSIX segment names we create and accept, and the System V key marker.
//!
//! A name is `/shmgrpc-<creator pid>-<16 hex digits of randomness>`. The pid lets `shmgrpc gc` find orphans; the 64
//! random bits make names unguessable, so knowing one is a capability. Names from a peer are parsed strictly: we
//! never open anything that is not shaped like one of ours.

use std::fmt;

use crate::error::{Error, Result};

/// Prefix of every POSIX segment name (without the leading slash), as it appears in `/dev/shm`.
pub const POSIX_PREFIX: &str = "shmgrpc-";

/// The `proj_id` shmgrpc passes to `ftok`: the top byte of every keyed System V segment we create.
pub const SYSV_PROJ_ID: u8 = b'G';

/// A validated POSIX shared-memory name of ours: `/shmgrpc-<pid>-<16 hex digits>`.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct PosixName {
    name: String,
    pid: u32,
}

impl PosixName {
    /// A fresh, unguessable name for a segment created by this process.
    pub(crate) fn generate() -> Result<PosixName> {
        let mut bytes = [0u8; 8];
        getrandom::fill(&mut bytes).map_err(Error::randomness("a segment name"))?;
        let pid = crate::pid::id();
        Ok(PosixName { name: format!("/{POSIX_PREFIX}{pid}-{:016x}", u64::from_le_bytes(bytes)), pid })
    }

    /// Parses a name received from a peer (with or without the leading slash); refuses anything not of our shape.
    pub fn parse(s: &str) -> Result<PosixName> {
        let bad = || Error::InvalidHandle("not a shmgrpc POSIX segment name");
        let body = s.strip_prefix('/').unwrap_or(s);
        let rest = body.strip_prefix(POSIX_PREFIX).ok_or_else(bad)?;
        let (pid, random) = rest.split_once('-').ok_or_else(bad)?;
        let pid_ok = !pid.is_empty() && pid.len() <= 10 && pid.bytes().all(|b| b.is_ascii_digit());
        let random_ok = random.len() == 16 && random.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if !pid_ok || !random_ok {
            return Err(bad());
        }
        let pid: u32 = pid.parse().map_err(|_| bad())?;
        Ok(PosixName { name: format!("/{body}"), pid })
    }

    /// The name, with its leading slash, as `shm_open` takes it.
    pub fn as_str(&self) -> &str {
        &self.name
    }

    /// The pid of the process that created the segment.
    pub fn creator_pid(&self) -> u32 {
        self.pid
    }
}

/// Debug output hides the random part: names are capabilities and debug output ends up in logs.
impl fmt::Debug for PosixName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PosixName(/{POSIX_PREFIX}{}-…)", self.pid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_names_parse_back_and_differ() {
        let a = PosixName::generate().unwrap();
        let b = PosixName::generate().unwrap();
        assert_ne!(a, b);
        assert_eq!(PosixName::parse(a.as_str()).unwrap(), a);
        assert_eq!(a.creator_pid(), std::process::id());
        assert!(!format!("{a:?}").contains(&a.as_str()[12..]));
    }

    #[test]
    fn foreign_shapes_are_refused() {
        for s in [
            "",
            "/",
            "/other-1-0123456789abcdef",
            "/shmgrpc-",
            "/shmgrpc-12-0123456789abcde",
            "/shmgrpc-12-0123456789abcdefa",
            "/shmgrpc-12-0123456789ABCDEF",
            "/shmgrpc--0123456789abcdef",
            "/shmgrpc-99999999999-0123456789abcdef",
            "/shmgrpc-1-../../etc/passwd",
            "/shmgrpc-1-0123456789abcdef/x",
        ] {
            assert!(PosixName::parse(s).is_err(), "{s:?} accepted");
        }
        assert!(PosixName::parse("shmgrpc-1-0123456789abcdef").is_ok());
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics_and_accepts_only_our_shape(s in "\\PC{0,40}") {
            if let Ok(n) = PosixName::parse(&s) {
                proptest::prop_assert!(n.as_str().starts_with("/shmgrpc-"));
                proptest::prop_assert!(!n.as_str()[1..].contains('/'));
            }
        }
    }
}
