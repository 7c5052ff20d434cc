//! Configuration of the gRPC layer: [`ClientConfig`], [`ServerConfig`], and the sending options they share.
//!
//! Both ends send the same way (threshold, pool, in-flight window, waits), so those options are one
//! [`SendConfig`] inside each configuration, with one set of builder methods written once by `send_options!`.
//! A configuration becomes a session's [`SessionParams`] when the channel or server is built.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use crate::pool::{Pool, PoolConfig};
use crate::protocol::{DEFAULT_THRESHOLD, DEFAULT_WINDOW, DEFAULT_WINDOW_WAIT, PROTOCOL_VERSION, Side};
use crate::stats::Recorder;

/// How one end sends (shared by the client and server configurations).
#[derive(Debug, Clone)]
pub(crate) struct SendConfig {
    pub(crate) pool: Option<Pool>,
    pub(crate) pool_config: PoolConfig,
    pub(crate) threshold: usize,
    pub(crate) exhausted_wait: Duration,
    pub(crate) window: u64,
    pub(crate) window_wait: Duration,
}

impl Default for SendConfig {
    fn default() -> Self {
        SendConfig {
            pool: None,
            pool_config: PoolConfig::default(),
            threshold: DEFAULT_THRESHOLD,
            exhausted_wait: Duration::ZERO,
            window: DEFAULT_WINDOW,
            window_wait: DEFAULT_WINDOW_WAIT,
        }
    }
}

impl SendConfig {
    /// The session parameters of `side`: the given pool, or a new one of `pool_config`, and a fresh recorder.
    ///
    /// # Errors
    ///
    /// The pool configuration is invalid.
    pub(crate) fn into_params(self, side: Side) -> crate::Result<SessionParams> {
        let pool = match self.pool {
            Some(p) => p,
            None => Pool::new(self.pool_config)?,
        };
        Ok(SessionParams {
            pool,
            threshold: self.threshold,
            exhausted_wait: self.exhausted_wait,
            window: self.window.max(1),
            window_wait: self.window_wait,
            recorder: Recorder::new(side),
            sessions: Arc::default(),
        })
    }
}

/// What every session of one channel or server is created with.
#[derive(Clone, Debug)]
pub(crate) struct SessionParams {
    pub(crate) pool: Pool,
    pub(crate) threshold: usize,
    /// How long a call may wait (asynchronously, before its first message) for a buffer to come back.
    pub(crate) exhausted_wait: Duration,
    /// Bytes of our buffers the peer may hold before sending waits.
    pub(crate) window: u64,
    /// How long sending waits for the window before going inline.
    pub(crate) window_wait: Duration,
    /// The counters of the channel or server the session belongs to.
    pub(crate) recorder: Arc<Recorder>,
    /// Live sessions of that channel or server, which share its pool (see `Sender::alloc`).
    pub(crate) sessions: Arc<AtomicUsize>,
}

/// The sending options `ClientConfig` and `ServerConfig` share, over their `send: SendConfig` field: one
/// definition and one set of docs. `$payloads` names what the side sends ("request", "response"), `$peer` its peer.
macro_rules! send_options {
    ($payloads:literal, $peer:literal) => {
        /// Messages whose encoded size reaches `bytes` go through shared memory (default 64 KiB).
        pub fn threshold(mut self, bytes: usize) -> Self {
            self.send.threshold = bytes;
            self
        }
        /// When the pool's budget is used up (a peer holding many buffers), how long a call may wait for a
        /// buffer to come back before its messages go inline (default 0: inline at once). The wait is
        /// asynchronous, before the call's first message, and only after a message found the pool exhausted; no
        /// thread ever blocks on it.
        pub fn exhausted_wait(mut self, wait: Duration) -> Self {
            self.send.exhausted_wait = wait;
            self
        }
        #[doc = concat!("The in-flight window: bytes of our buffers the ", $peer, " may hold before a ", $payloads)]
        /// waits for releases (default 512 MiB; see [`crate::protocol::DEFAULT_WINDOW`]).
        pub fn window(mut self, bytes: u64) -> Self {
            self.send.window = bytes;
            self
        }
        #[doc = concat!("How long a ", $payloads, " waits for the window to open before going inline (default 1 s).")]
        pub fn window_wait(mut self, wait: Duration) -> Self {
            self.send.window_wait = wait;
            self
        }
        #[doc = concat!("The pool ", $payloads, " payloads are written into (default: a new pool with")]
        /// [`PoolConfig::default`](crate::PoolConfig::default)).
        pub fn pool(mut self, pool: Pool) -> Self {
            self.send.pool = Some(pool);
            self
        }
        /// Configuration of the pool created when none is given.
        pub fn pool_config(mut self, config: PoolConfig) -> Self {
            self.send.pool_config = config;
            self
        }
    };
}

/// Client configuration, for [`crate::ShmChannel::connect_with`] and [`crate::ShmChannel::over`].
#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub(crate) send: SendConfig,
    pub(crate) shared_memory: bool,
    pub(crate) protocol_version: u32,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig { send: SendConfig::default(), shared_memory: true, protocol_version: PROTOCOL_VERSION }
    }
}

impl ClientConfig {
    send_options!("request", "server");
    /// Whether to try shared memory at all (default true); false gives a plain channel.
    pub fn shared_memory(mut self, yes: bool) -> Self {
        self.shared_memory = yes;
        self
    }
    /// The highest protocol version to ask the server for (default and most: [`PROTOCOL_VERSION`]; docs/protocol.md
    /// §2 says what each adds). For rolling upgrades, and to check a service against peers of an older version.
    /// A version this crate does not speak leaves the channel inline (`Fallback::UnsupportedVersion`).
    pub fn protocol_version(mut self, version: u32) -> Self {
        self.protocol_version = version;
        self
    }
}

/// Server configuration, for [`crate::ShmServer::new`].
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub(crate) side_channel: Option<PathBuf>,
    pub(crate) allowed_uids: Option<HashSet<u32>>,
    pub(crate) send: SendConfig,
    pub(crate) protocol_version: u32,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            side_channel: None,
            allowed_uids: None,
            send: SendConfig::default(),
            protocol_version: PROTOCOL_VERSION,
        }
    }
}

impl ServerConfig {
    /// The highest protocol version to speak (default and most: [`PROTOCOL_VERSION`]): a client asking for more
    /// gets this one. For rolling upgrades, and for front ends that do not implement a later version's duties.
    pub fn protocol_version(mut self, version: u32) -> Self {
        self.protocol_version = version;
        self
    }
    /// Where the side-channel socket goes (default: a fresh path in the temporary directory, which clients in
    /// another mount namespace cannot reach: see [`ServerConfig::side_channel_beside`]). A path written `@name` is
    /// a socket in Linux's abstract namespace: no file, reachable from the server's network namespace only (the
    /// containers of one Kubernetes pod share it), and without a file mode, so the uid check on every connection is
    /// the only gate (docs/security.md). A socket file left behind by a server that died is replaced.
    pub fn side_channel(mut self, path: impl Into<PathBuf>) -> Self {
        self.side_channel = Some(path.into());
        self
    }
    /// Puts the side channel next to the gRPC server's Unix socket `grpc_socket`, as `<grpc_socket>.shmgrpc`:
    /// a client that reaches that socket (through a directory shared between containers, under whatever path) finds
    /// the side channel beside it, so sharing the socket's directory is all a deployment needs (docs/deploy.md).
    pub fn side_channel_beside(self, grpc_socket: impl AsRef<std::path::Path>) -> Self {
        let mut name = grpc_socket.as_ref().as_os_str().to_owned();
        name.push(".shmgrpc");
        self.side_channel(name)
    }
    /// The uids allowed to open a session (default: the server's own uid and root). Others are served inline.
    pub fn allowed_uids(mut self, uids: impl IntoIterator<Item = u32>) -> Self {
        self.allowed_uids = Some(uids.into_iter().collect());
        self
    }
    send_options!("response", "client");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The defaults docs/protocol.md (§7), README and security.md state.
    #[test]
    fn the_defaults_are_what_the_docs_say() {
        for params in [ClientConfig::default().send, ServerConfig::default().send] {
            let p = params.into_params(Side::Client).unwrap();
            assert_eq!(p.window, 512 << 20, "the in-flight window");
            assert_eq!(p.window_wait, Duration::from_secs(1), "the wait for it");
            assert_eq!(p.threshold, 64 << 10, "the threshold");
            assert_eq!(p.exhausted_wait, Duration::ZERO, "no wait for an exhausted pool");
        }
        assert_eq!(ClientConfig::default().protocol_version, PROTOCOL_VERSION);
        assert!(ServerConfig::default().allowed_uids.is_none(), "the server's own uid and root");
    }
}
