//! The crate's error type.
//!
//! Every error says which operation failed, on what kind of segment and with which sizes or errno, so a log line is
//! enough to act on. No variant carries a segment *name*: names of a peer's segments are capabilities, and an error
//! message may travel back to that peer or to a third party (a gRPC status, a log shipped elsewhere).

use std::io;

use crate::segment::Backend;

/// Errors of the segment, pool and attach layers.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A system call failed.
    #[error("{op} failed on a {backend} segment: {source}")]
    Os {
        /// The call, for example `shm_open` or `mmap`.
        op: &'static str,
        /// The backend the segment belongs to.
        backend: Backend,
        /// The errno, as an `io::Error`.
        #[source]
        source: io::Error,
    },

    /// A peer claimed more bytes than the segment really has (as reported by `fstat` or `IPC_STAT`).
    #[error("a {backend} segment holds {actual} bytes but {claimed} were claimed: refusing to map past its end")]
    SizeMismatch {
        /// The backend the segment belongs to.
        backend: Backend,
        /// The size the peer claimed.
        claimed: u64,
        /// The size the kernel reports.
        actual: u64,
    },

    /// `offset + len` overflowed or went past the end of a mapping.
    #[error("range {offset}+{len} is outside a {backend} segment of {size} bytes")]
    OutOfRange {
        /// The backend the segment belongs to.
        backend: Backend,
        /// Requested start.
        offset: u64,
        /// Requested length.
        len: u64,
        /// The mapping's real size.
        size: u64,
    },

    /// A memfd lacks the seals that make it safe to map (it could shrink under us and raise SIGBUS).
    #[error("memfd is missing required seals (has {present:#x}, needs {required:#x})")]
    MissingSeals {
        /// The seals the fd carries.
        present: u32,
        /// The seals we require.
        required: u32,
    },

    /// A handle or name from a peer is not one of ours (wrong prefix or shape, wrong file type, zero size...).
    #[error("invalid segment handle: {0}")]
    InvalidHandle(&'static str),

    /// A system call on something other than a segment failed (a socket, a file, a thread).
    #[error("{op} failed: {source}")]
    Io {
        /// What was being done, for example `bind side channel`.
        op: &'static str,
        /// The errno, as an `io::Error`.
        #[source]
        source: io::Error,
    },

    /// The operating system gave no randomness (segment names, session ids and ticket secrets need it).
    #[error("no randomness for {purpose}: {source}")]
    Randomness {
        /// What it was for.
        purpose: &'static str,
        /// The error of `getrandom`.
        #[source]
        source: getrandom::Error,
    },

    /// A resource limit of this process was reached (not the caller's argument, not the peer's fault).
    #[error("limit reached: {0}")]
    Limit(&'static str),

    /// An argument was out of its valid range (zero size, size above the limit, bad configuration...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// The pool's byte budget is used up and the pool is configured to fail rather than wait.
    #[error(
        "pool budget exhausted: {requested} bytes requested, {in_use} of {budget} bytes in use and none can be freed"
    )]
    Exhausted {
        /// Bytes the allocation needed (the size class).
        requested: u64,
        /// Bytes held by leases right now.
        in_use: u64,
        /// The configured budget.
        budget: u64,
    },
}

/// Shorthand for `Result<T, shmgrpc::Error>`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn randomness(purpose: &'static str) -> impl FnOnce(getrandom::Error) -> Error {
        move |source| Error::Randomness { purpose, source }
    }

    pub(crate) fn os(op: &'static str, backend: Backend, errno: impl Into<io::Error>) -> Self {
        Error::Os { op, backend, source: errno.into() }
    }
}
