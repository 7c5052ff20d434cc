//! Helpers shared by the gRPC test binaries: server processes, clients, waiting.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use shmgrpc::ShmChannel;
use shmgrpc_demo::{Addr, BlobClient};

pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_shmgrpc");

/// A `shmgrpc serve` process; SIGTERM (then SIGKILL) on drop.
pub(crate) struct Served {
    pub child: Child,
    pub unix: String,
    pub tcp: String,
    pub side: Option<String>,
    _dir: tempfile::TempDir,
}

/// Starts `shmgrpc serve` on a fresh Unix socket and a TCP port; returns once its readiness line says every address
/// accepts calls. The start (a blocking read of the child's stdout) runs on a blocking thread, never on a runtime
/// worker.
pub(crate) fn serve(extra: &[&str]) -> impl Future<Output = Served> + use<> {
    let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    async move {
        tokio::task::spawn_blocking(move || serve_blocking(&extra.iter().map(String::as_str).collect::<Vec<_>>()))
            .await
            .unwrap()
    }
}

/// Like [`serve`], for tests that run outside any runtime.
pub(crate) fn serve_blocking(extra: &[&str]) -> Served {
    let dir = tempfile::tempdir().unwrap();
    let unix = format!("unix:{}", dir.path().join("grpc.sock").display());
    serve_in_blocking(dir, unix, extra)
}

/// Like [`serve`], at `unix` (inside `dir`, which the returned value keeps).
pub(crate) fn serve_in(dir: tempfile::TempDir, unix: String, extra: &[&str]) -> impl Future<Output = Served> + use<> {
    let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    async move {
        tokio::task::spawn_blocking(move || {
            serve_in_blocking(dir, unix, &extra.iter().map(String::as_str).collect::<Vec<_>>())
        })
        .await
        .unwrap()
    }
}

fn serve_in_blocking(dir: tempfile::TempDir, unix: String, extra: &[&str]) -> Served {
    let mut child = Command::new(BIN)
        .args(["serve", "--listen", &unix, "--listen", "127.0.0.1:0"])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // `serve` prints one line on stdout, its readiness line (JSON), once every address accepts calls.
    let line = BufReader::new(child.stdout.take().unwrap()).lines().next().expect("a readiness line").unwrap();
    let ready: serde_json::Value = serde_json::from_str(&line).expect("the readiness line is JSON");
    assert_eq!(ready["event"], "ready", "{line}");
    assert_eq!(ready["pid"], child.id(), "{line}");
    let listen: Vec<&str> = ready["listen"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    let tcp = listen.iter().find(|a| !a.starts_with("unix:")).expect("tcp address").to_string();
    let side = ready["side_channel"].as_str().map(String::from);
    assert_eq!(ready["shared_memory"], side.is_some(), "{line}");
    Served { child, unix, tcp, side, _dir: dir }
}

impl Served {
    /// SIGTERM, then waits (at most 5 s, then SIGKILL) for the server to clean up and exit.
    fn stop(&mut self) {
        let _ = Command::new("kill").arg(self.child.id().to_string()).status();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Served {
    /// Stops the server. Inside a multi-threaded runtime the wait runs with `block_in_place`, so the worker's other
    /// tasks move to another worker instead of waiting with it.
    fn drop(&mut self) {
        let on_worker = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        if on_worker {
            tokio::task::block_in_place(|| self.stop());
        } else {
            self.stop();
        }
    }
}

pub(crate) fn client(ch: &ShmChannel) -> BlobClient<ShmChannel> {
    BlobClient::new(ch.clone()).max_decoding_message_size(usize::MAX).max_encoding_message_size(usize::MAX)
}

/// The JSON lines of `shmgrpc call --json` output.
pub(crate) fn json_lines(stdout: &[u8]) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(stdout).lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

/// How many calls of `shmgrpc call --json` output sent their request and got their response as `request` and
/// `response` (`"shm"` or `"inline"`).
pub(crate) fn calls_via(stdout: &[u8], request: &str, response: &str) -> usize {
    json_lines(stdout)
        .iter()
        .filter(|l| {
            l["event"] == "call" && l["request"] == request && l["response"] == response && l["checksum"] == "ok"
        })
        .count()
}

/// Waits until `f` holds (releases travel asynchronously on the side channel).
pub(crate) async fn eventually(what: &str, f: impl Fn() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < Duration::from_secs(10), "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Serves the demo service with shmgrpc in this process; returns once it listens.
pub(crate) async fn serve_here(sock: std::path::PathBuf, layer: shmgrpc::ShmLayer) -> shmgrpc_demo::Spawned {
    shmgrpc_demo::spawn(vec![Addr::Unix(sock)], Some(layer)).await.unwrap()
}

/// A plain tonic channel (no shmgrpc session) to `unix:/path` or `host:port`, with the HTTP/2 windows shmgrpc's own
/// channels use.
pub(crate) async fn plain_channel(target: &str) -> tonic::transport::Channel {
    let endpoint = |uri: String| {
        tonic::transport::Endpoint::from_shared(uri)
            .unwrap()
            .initial_stream_window_size(8 << 20)
            .initial_connection_window_size(16 << 20)
    };
    match target.strip_prefix("unix:") {
        Some(path) => {
            let path = std::path::PathBuf::from(path);
            endpoint("http://localhost".into())
                .connect_with_connector(tower::service_fn(move |_: http::Uri| {
                    let path = path.clone();
                    async move {
                        let stream = tokio::net::UnixStream::connect(path).await?;
                        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
                    }
                }))
                .await
                .unwrap()
        }
        None => endpoint(format!("http://{target}")).connect().await.unwrap(),
    }
}
