//! The demo blob service: echo, upload, download and their streaming variants, with every payload checksummed.
//!
//! Used by `shmgrpc serve` / `shmgrpc call`, the README, the examples, the benchmarks and the tests. Built with
//! [`shmgrpc::ShmCodec`], so it moves large payloads through shared memory under [`shmgrpc::ShmServer`] and
//! [`shmgrpc::ShmChannel`], and is a plain gRPC service otherwise. Its proto is `proto/blob.proto`.

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::str::FromStr;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

mod proto {
    //! Generated code, compiled from `proto/blob.proto` by `build.rs`.
    #![allow(missing_docs, missing_debug_implementations, unreachable_pub, clippy::all, clippy::pedantic)]

    /// The blob service built with [`shmgrpc::ShmCodec`].
    pub mod demo {
        tonic::include_proto!("shmgrpc.demo.v1");
    }

    /// The blob service generated with tonic's own prost codec: plain gRPC, for baselines and fallback tests.
    pub mod demo_plain {
        include!(concat!(env!("OUT_DIR"), "/plain/shmgrpc.demo.v1.rs"));
    }
}

pub use proto::demo::blob_client::BlobClient;
pub use proto::demo::blob_server::{Blob, BlobServer};
pub use proto::demo::{Digest, DigestList, DownloadRequest, Payload};

/// The same service with tonic's own prost codec (`tonic_prost::ProstCodec`): a plain gRPC client and server.
pub mod plain {
    pub use crate::proto::demo_plain::blob_client::BlobClient;
    pub use crate::proto::demo_plain::blob_server::{Blob, BlobServer};
}

/// Request metadata that `echo` copies into its response metadata.
pub const ECHO_HEADER: &str = "x-shmgrpc-echo";

/// Largest payload `download` agrees to produce.
pub const MAX_DOWNLOAD: u64 = 4 << 30;

/// Payloads from this size up are made on tokio's blocking pool rather than on an async worker.
const BLOCKING_SIZE: usize = 1 << 20;

/// Fills `buf` with a pattern derived from `seed`, a word at a time (memory-bound, like a real payload write).
pub fn fill_pattern(buf: &mut [u8], seed: u32) {
    let mut chunks = buf.chunks_exact_mut(8);
    let base = u64::from(seed).wrapping_mul(0x0101_0101_0101_0101) | 1;
    for (i, c) in (&mut chunks).enumerate() {
        c.copy_from_slice(&(base ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)).to_le_bytes());
    }
    chunks.into_remainder().fill(seed as u8);
}

/// A payload of `size` pattern bytes with its checksum.
pub fn payload(size: usize, seed: u32) -> Payload {
    let mut data = vec![0u8; size];
    fill_pattern(&mut data, seed);
    Payload { crc32: crc32fast::hash(&data), data: Bytes::from(data), note: String::new() }
}

/// Checks a payload against its checksum.
pub fn verify(p: &Payload) -> Result<(), Status> {
    let got = crc32fast::hash(&p.data);
    if got != p.crc32 {
        return Err(Status::data_loss(format!("checksum mismatch: payload says {:#x}, data is {got:#x}", p.crc32)));
    }
    Ok(())
}

fn digest(p: &Payload) -> Result<Digest, Status> {
    verify(p)?;
    Ok(Digest { len: p.data.len() as u64, crc32: p.crc32, via_shm: shmgrpc::is_shared(&p.data) })
}

/// The blob service.
#[derive(Debug, Default, Clone)]
pub struct BlobService;

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

fn download_size(r: &DownloadRequest) -> Result<usize, Status> {
    if r.size > MAX_DOWNLOAD {
        return Err(Status::invalid_argument(format!("size {} is above the limit of {MAX_DOWNLOAD}", r.size)));
    }
    Ok(r.size as usize)
}

#[tonic::async_trait]
impl Blob for BlobService {
    async fn echo(&self, request: Request<Payload>) -> Result<Response<Payload>, Status> {
        // No checksum here: the caller checks the reply, which covers both directions.
        let echoed = request.metadata().get(ECHO_HEADER).cloned();
        let mut response = Response::new(request.into_inner());
        if let Some(v) = echoed {
            response.metadata_mut().insert(ECHO_HEADER, v);
        }
        Ok(response)
    }

    async fn upload(&self, request: Request<Payload>) -> Result<Response<Digest>, Status> {
        Ok(Response::new(digest(&request.into_inner())?))
    }

    async fn download(&self, request: Request<DownloadRequest>) -> Result<Response<Payload>, Status> {
        // Written in place into a loan: through a shmgrpc session the reply goes out without a copy. Making a
        // large payload is CPU work (and may create a pool buffer): it runs off the async workers, so it never
        // delays other calls' tasks.
        let size = download_size(request.get_ref())?;
        let make = move || {
            let mut loan = shmgrpc::server::loan(&request, size);
            fill_pattern(&mut loan, request.get_ref().seed);
            let crc32 = crc32fast::hash(&loan);
            Payload { data: loan.freeze(), crc32, note: String::new() }
        };
        let payload = if size >= BLOCKING_SIZE {
            tokio::task::spawn_blocking(make).await.map_err(|e| Status::internal(format!("payload task: {e}")))?
        } else {
            make()
        };
        Ok(Response::new(payload))
    }

    async fn upload_stream(&self, request: Request<Streaming<Payload>>) -> Result<Response<DigestList>, Status> {
        let mut stream = request.into_inner();
        let mut digests = Vec::new();
        while let Some(p) = stream.next().await {
            digests.push(digest(&p?)?);
        }
        Ok(Response::new(DigestList { digests }))
    }

    type DownloadStreamStream = BoxStream<Payload>;

    async fn download_stream(
        &self,
        request: Request<DownloadRequest>,
    ) -> Result<Response<Self::DownloadStreamStream>, Status> {
        let r = request.into_inner();
        let size = download_size(&r)?;
        let stream = futures_util::stream::iter(0..r.count).map(move |i| Ok(payload(size, r.seed.wrapping_add(i))));
        Ok(Response::new(Box::pin(stream)))
    }

    type EchoStreamStream = BoxStream<Payload>;

    async fn echo_stream(
        &self,
        request: Request<Streaming<Payload>>,
    ) -> Result<Response<Self::EchoStreamStream>, Status> {
        let stream = request.into_inner().map(|p| {
            let p = p?;
            verify(&p)?;
            Ok(p)
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

/// The plain service delegates to the shared-memory one: same behaviour, only the codec differs.
#[tonic::async_trait]
impl plain::Blob for BlobService {
    async fn echo(&self, request: Request<Payload>) -> Result<Response<Payload>, Status> {
        Blob::echo(self, request).await
    }
    async fn upload(&self, request: Request<Payload>) -> Result<Response<Digest>, Status> {
        Blob::upload(self, request).await
    }
    async fn download(&self, request: Request<DownloadRequest>) -> Result<Response<Payload>, Status> {
        Blob::download(self, request).await
    }
    async fn upload_stream(&self, request: Request<Streaming<Payload>>) -> Result<Response<DigestList>, Status> {
        Blob::upload_stream(self, request).await
    }
    type DownloadStreamStream = BoxStream<Payload>;
    async fn download_stream(
        &self,
        request: Request<DownloadRequest>,
    ) -> Result<Response<Self::DownloadStreamStream>, Status> {
        Blob::download_stream(self, request).await
    }
    type EchoStreamStream = BoxStream<Payload>;
    async fn echo_stream(
        &self,
        request: Request<Streaming<Payload>>,
    ) -> Result<Response<Self::EchoStreamStream>, Status> {
        Blob::echo_stream(self, request).await
    }
}

/// Where a demo server listens or a client connects: `unix:/path` or `host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Addr {
    /// A Unix socket path.
    Unix(PathBuf),
    /// A TCP address.
    Tcp(SocketAddr),
}

impl FromStr for Addr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err("unix: needs a path".into());
            }
            return Ok(Addr::Unix(p.into()));
        }
        let hostport = s.strip_prefix("http://").unwrap_or(s);
        hostport.parse().map(Addr::Tcp).map_err(|_| format!("{s:?} is neither unix:/path nor host:port"))
    }
}

impl fmt::Display for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Addr::Unix(p) => write!(f, "unix:{}", p.display()),
            Addr::Tcp(a) => write!(f, "{a}"),
        }
    }
}

/// Binds a Unix socket, replacing a stale one (a socket file nobody listens on, left by a killed server); a live
/// socket or any other file is an error.
fn bind_unix(path: &std::path::Path) -> std::io::Result<tokio::net::UnixListener> {
    match tokio::net::UnixListener::bind(path) {
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            use std::os::unix::fs::FileTypeExt;
            let is_socket = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket());
            let refused = matches!(
                std::os::unix::net::UnixStream::connect(path),
                Err(ref c) if c.kind() == std::io::ErrorKind::ConnectionRefused
            );
            if !(is_socket && refused) {
                return Err(e);
            }
            std::fs::remove_file(path)?;
            tokio::net::UnixListener::bind(path)
        }
        other => other,
    }
}

/// HTTP/2 settings that give plain gRPC a fair chance with large messages: 8 MiB stream and 16 MiB connection
/// windows, 16 MiB frames, `TCP_NODELAY`.
pub fn server_builder() -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .initial_stream_window_size(8 << 20)
        .initial_connection_window_size(16 << 20)
        .max_frame_size((16 << 20) - 1)
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
}

/// Serves [`BlobService`] on every address until `shutdown` completes: with shmgrpc when `shm` is given, as a plain
/// tonic server (tonic's prost codec, no layer) otherwise. Message size limits are lifted, so inline messages of
/// any size work too. `ready` gets the bound addresses (TCP port 0 resolved) before serving starts.
pub async fn serve(
    addrs: &[Addr],
    shm: Option<shmgrpc::ShmLayer>,
    ready: impl FnOnce(&[Addr]),
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
    enum Bound {
        Unix(tokio::net::UnixListener),
        Tcp(tokio::net::TcpListener),
    }
    let mut bound = Vec::new();
    let mut names = Vec::new();
    for a in addrs {
        match a {
            Addr::Unix(p) => {
                bound.push(Bound::Unix(bind_unix(p)?));
                names.push(a.clone());
            }
            Addr::Tcp(t) => {
                let l = tokio::net::TcpListener::bind(t).await?;
                names.push(Addr::Tcp(l.local_addr()?));
                bound.push(Bound::Tcp(l));
            }
        }
    }
    ready(&names);
    let (tx, rx) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::new();
    for b in bound {
        let mut rx = rx.clone();
        let stop = async move {
            let _ = rx.wait_for(|&s| s).await;
        };
        let shm = shm.clone();
        macro_rules! run {
            ($incoming:expr) => {
                match shm {
                    Some(layer) => {
                        let svc = BlobServer::new(BlobService)
                            .max_decoding_message_size(usize::MAX)
                            .max_encoding_message_size(usize::MAX);
                        tokio::spawn(
                            server_builder()
                                .layer(layer)
                                .add_service(svc)
                                .serve_with_incoming_shutdown($incoming, stop),
                        )
                    }
                    None => {
                        let svc = plain::BlobServer::new(BlobService)
                            .max_decoding_message_size(usize::MAX)
                            .max_encoding_message_size(usize::MAX);
                        tokio::spawn(server_builder().add_service(svc).serve_with_incoming_shutdown($incoming, stop))
                    }
                }
            };
        }
        tasks.push(match b {
            Bound::Unix(l) => run!(UnixListenerStream::new(l)),
            // serve_with_incoming bypasses the builder's TCP settings: set TCP_NODELAY on each connection here.
            Bound::Tcp(l) => run!(TcpListenerStream::new(l).map(|s| s.inspect(|s| {
                let _ = s.set_nodelay(true);
            }))),
        });
    }
    shutdown.await;
    let _ = tx.send(true);
    for t in tasks {
        t.await.map_err(std::io::Error::other)?.map_err(std::io::Error::other)?;
    }
    for a in addrs {
        if let Addr::Unix(p) = a {
            let _ = std::fs::remove_file(p);
        }
    }
    Ok(())
}

/// A [`serve`] running in a task of the current tokio runtime (see [`spawn`]).
pub type Spawned = (tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<std::io::Result<()>>);

/// Serves [`BlobService`] on `addrs` in a task of the current runtime, returning once every address accepts calls:
/// the sender that stops it, and the task to await for its end.
///
/// # Errors
///
/// Binding an address failed (the error `serve` returned).
pub async fn spawn(addrs: Vec<Addr>, shm: Option<shmgrpc::ShmLayer>) -> std::io::Result<Spawned> {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (ready, is_ready) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let ready = move |_: &[Addr]| {
            let _ = ready.send(());
        };
        serve(&addrs, shm, ready, async {
            let _ = stopped.await;
        })
        .await
    });
    if is_ready.await.is_err() {
        // `serve` ended before it was ready: its error says why.
        return Err(task.await.map_err(std::io::Error::other)?.err().unwrap_or_else(|| std::io::Error::other("ended")));
    }
    Ok((stop, task))
}
