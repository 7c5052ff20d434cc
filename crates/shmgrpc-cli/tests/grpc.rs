//! gRPC over shared memory end to end, with server and client in separate processes wherever the property is about
//! two processes: every RPC kind in both directions, metadata, deadlines, status codes, interceptors, the fallback
//! matrix, release and reclamation (also after `kill -9`), hostile references, and 1 GiB messages.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use shmgrpc::proto::v1::{Part, Reference, Region, part};
use shmgrpc::stats::Fallback;
use shmgrpc::wire;
use shmgrpc::{ClientConfig, Pool, PoolConfig, ServerConfig, ShmChannel, ShmServer};
use shmgrpc_demo::{BlobClient, DownloadRequest, Payload};
use tonic::transport::Server;
use tonic::{Code, Request, Status};

mod common;

use common::{BIN, calls_via, client, eventually, json_lines, serve, serve_here};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_kind_moves_payloads_through_shared_memory_both_ways() {
    let srv = serve(&[]).await;
    let ch = ShmChannel::connect(&srv.unix).await.unwrap();
    assert!(ch.is_shared_memory(), "{:?}", ch.fallback());
    let mut c = client(&ch);
    let size = 1 << 20;

    // The channel's own counters: other tests of this binary run alongside and move the process-wide ones.
    let before = ch.stats();
    let p = shmgrpc_demo::payload(size, 1);
    let r = c.echo(p.clone()).await.unwrap().into_inner();
    assert_eq!(r.crc32, p.crc32);
    shmgrpc_demo::verify(&r).unwrap();
    assert!(shmgrpc::is_shared(&r.data), "echo reply not in shared memory");
    let after = ch.stats();
    assert_eq!(after.shm_sent - before.shm_sent, 1);
    assert_eq!(after.shm_received - before.shm_received, 1);
    assert!(after.shm_received_bytes - before.shm_received_bytes >= size as u64);
    assert_eq!((after.inline_sent, after.fallbacks_total()), (before.inline_sent, 0));

    let d = c.upload(shmgrpc_demo::payload(size, 2)).await.unwrap().into_inner();
    assert!(d.via_shm, "the server did not receive the upload through shared memory");
    assert_eq!(d.len, size as u64);

    let r = c.download(DownloadRequest { size: size as u64, seed: 3, count: 1 }).await.unwrap().into_inner();
    shmgrpc_demo::verify(&r).unwrap();
    assert_eq!(r.data.len(), size);
    assert!(shmgrpc::is_shared(&r.data));

    // Client streaming.
    let sent: Vec<Payload> = (0..3).map(|i| shmgrpc_demo::payload(size / 2 + i, 10 + i as u32)).collect();
    let list = c.upload_stream(futures_stream(sent.clone())).await.unwrap().into_inner();
    assert_eq!(list.digests.len(), 3);
    for (d, p) in list.digests.iter().zip(&sent) {
        assert_eq!((d.len, d.crc32, d.via_shm), (p.data.len() as u64, p.crc32, true));
    }

    // Server streaming.
    let mut s = c.download_stream(DownloadRequest { size: size as u64, seed: 7, count: 4 }).await.unwrap().into_inner();
    let mut n = 0;
    while let Some(p) = s.message().await.unwrap() {
        shmgrpc_demo::verify(&p).unwrap();
        assert!(shmgrpc::is_shared(&p.data));
        n += 1;
    }
    assert_eq!(n, 4);

    // Bidirectional streaming.
    let mut s = c.echo_stream(futures_stream(sent.clone())).await.unwrap().into_inner();
    let mut got = Vec::new();
    while let Some(p) = s.message().await.unwrap() {
        assert!(shmgrpc::is_shared(&p.data));
        got.push(p.crc32);
    }
    assert_eq!(got, sent.iter().map(|p| p.crc32).collect::<Vec<_>>());

    // Below the threshold everything stays inline, both ways.
    let r = c.echo(shmgrpc_demo::payload(1024, 5)).await.unwrap().into_inner();
    shmgrpc_demo::verify(&r).unwrap();
    assert!(!shmgrpc::is_shared(&r.data));
    assert!(!c.upload(shmgrpc_demo::payload(1024, 6)).await.unwrap().into_inner().via_shm);
}

fn futures_stream(v: Vec<Payload>) -> impl tokio_stream::Stream<Item = Payload> + Send + 'static {
    tokio_stream::iter(v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_deadlines_status_codes_and_interceptors_keep_working() {
    let srv = serve(&[]).await;
    let ch = ShmChannel::connect(&srv.unix).await.unwrap();
    assert!(ch.is_shared_memory());

    // Metadata both ways, through an interceptor that adds it.
    let mut c = BlobClient::with_interceptor(ch.clone(), |mut req: Request<()>| {
        req.metadata_mut().insert(shmgrpc_demo::ECHO_HEADER, "from-interceptor".parse().unwrap());
        Ok(req)
    });
    let r = c.echo(shmgrpc_demo::payload(256 << 10, 1)).await.unwrap();
    assert_eq!(r.metadata().get(shmgrpc_demo::ECHO_HEADER).unwrap(), "from-interceptor");
    assert!(shmgrpc::is_shared(&r.get_ref().data));

    // Status codes from the handler pass through unchanged.
    let mut c = client(&ch);
    let err = c.download(DownloadRequest { size: u64::MAX, seed: 0, count: 1 }).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");

    // A checksum mismatch detected by the server is its own status.
    let mut p = shmgrpc_demo::payload(128 << 10, 2);
    p.crc32 ^= 1;
    assert_eq!(c.upload(p).await.unwrap_err().code(), Code::DataLoss);

    // Deadlines: a 1 ms deadline on a large download expires.
    let mut req = Request::new(DownloadRequest { size: 256 << 20, seed: 0, count: 1 });
    req.set_timeout(Duration::from_millis(1));
    let err = c.download(req).await.unwrap_err();
    assert!(matches!(err.code(), Code::DeadlineExceeded | Code::Cancelled), "{err}");

    // The channel is still fine afterwards.
    let r = c.echo(shmgrpc_demo::payload(1 << 20, 3)).await.unwrap().into_inner();
    shmgrpc_demo::verify(&r).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shmgrpc_client_against_a_plain_tonic_server_goes_inline() {
    let srv = serve(&["--plain"]).await;
    for target in [&srv.unix, &srv.tcp] {
        let ch = ShmChannel::connect(target).await.unwrap();
        assert!(!ch.is_shared_memory());
        assert_eq!(ch.fallback(), Some(Fallback::PeerLacksShmgrpc));
        let mut c = client(&ch);
        let r = c.echo(shmgrpc_demo::payload(1 << 20, 1)).await.unwrap().into_inner();
        shmgrpc_demo::verify(&r).unwrap();
        let stats = ch.stats();
        assert_eq!(stats.shm_sent, 0, "a reference was sent to a plain server");
        assert_eq!((stats.inline_sent, stats.inline_received), (1, 1), "{stats:?}");
        assert_eq!(stats.fallback(Fallback::PeerLacksShmgrpc), 1, "{stats:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_tonic_client_against_a_shmgrpc_server_works() {
    let srv = serve(&[]).await;
    for target in [&srv.unix, &srv.tcp] {
        let channel = common::plain_channel(target).await;
        let mut c = shmgrpc_demo::plain::BlobClient::new(channel).max_decoding_message_size(usize::MAX);
        let p = shmgrpc_demo::payload(1 << 20, 4);
        let r = c.echo(p.clone()).await.unwrap().into_inner();
        assert_eq!(r, p);
        let d = c.upload(shmgrpc_demo::payload(1 << 20, 5)).await.unwrap().into_inner();
        assert!(!d.via_shm);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_side_channel_falls_back_inline() {
    let srv = serve(&[]).await;
    std::fs::remove_file(srv.side.as_ref().unwrap()).unwrap();
    let ch = ShmChannel::connect(&srv.tcp).await.unwrap();
    assert_eq!(ch.fallback(), Some(Fallback::SideChannelUnreachable));
    let r = client(&ch).echo(shmgrpc_demo::payload(1 << 20, 1)).await.unwrap().into_inner();
    shmgrpc_demo::verify(&r).unwrap();
    assert!(!shmgrpc::is_shared(&r.data));
}

/// Needs root (a private mount namespace); `.ci/run` runs it explicitly with `--ignored`.
#[test]
#[ignore = "needs root"]
fn a_client_in_a_private_mount_namespace_falls_back_inline() {
    let side_dir = tempfile::tempdir().unwrap();
    let side = side_dir.path().join("side.sock");
    let srv = common::serve_blocking(&["--side-channel", side.to_str().unwrap()]);
    // A private view of the side channel's directory and of /dev/shm, as in a container without --ipc=host.
    let script = format!(
        "mount -t tmpfs none {} && mount -t tmpfs none /dev/shm && exec {BIN} call --target {} --size 1MiB --repeat 2 --json",
        side_dir.path().display(),
        srv.tcp
    );
    let out = Command::new("unshare").args(["-m", "--propagation", "private", "sh", "-c", &script]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert_eq!(json_lines(&out.stdout)[0]["fallback"], "side_channel_unreachable", "{text}");
    assert_eq!(calls_via(&out.stdout, "inline", "inline"), 2, "{text}");
}

/// Server in this process (so its pool can be inspected), client too: buffers come back by the release protocol
/// while the session lives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_many_calls_both_pools_are_idle_again() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("g.sock");
    let shm = ShmServer::new(ServerConfig::default()).unwrap();
    let (stop, server) = serve_here(sock.clone(), shm.layer()).await;
    let pool = Pool::new(PoolConfig::default().budget(256 << 20)).unwrap();
    let ch = ShmChannel::connect_with(&format!("unix:{}", sock.display()), ClientConfig::default().pool(pool.clone()))
        .await
        .unwrap();
    assert!(ch.is_shared_memory());
    let mut c = client(&ch);
    for i in 0..50u32 {
        let size = [100 << 10, 1 << 20, 3 << 20][i as usize % 3];
        let r = c.echo(shmgrpc_demo::payload(size, i)).await.unwrap().into_inner();
        shmgrpc_demo::verify(&r).unwrap();
    }
    eventually("the client's buffers are released", || pool.stats().is_idle()).await;
    eventually("the server's buffers are released", || shm.pool().stats().is_idle()).await;
    assert_eq!(shm.sessions(), 1, "idle because of releases, not because the session ended");
    let s = pool.stats();
    // Three sizes, 50 calls: a handful of buffers per size (one may still be on its way back when the next call
    // starts), never one per call.
    assert!(s.grows <= 9, "buffers are reused, not created per call: {s}");
    drop(c);
    drop(ch);
    let _ = stop.send(());
    server.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_client_gives_back_every_buffer_it_held() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("g.sock");
    let shm = ShmServer::new(ServerConfig::default()).unwrap();
    let (stop, server) = serve_here(sock.clone(), shm.layer()).await;
    // The client keeps every reply: the server's buffers stay lent until it dies.
    let mut child = Command::new(BIN)
        .args(["call", "--target", &format!("unix:{}", sock.display()), "--op", "download", "--size", "2MiB"])
        .args(["--repeat", "1000000", "--keep", "--json"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // Its first lines, read on a blocking thread (the reader is kept until the child is killed).
    let stdout = child.stdout.take().unwrap();
    let (lines, _reader) = tokio::task::spawn_blocking(move || {
        let mut reader = BufReader::new(stdout).lines();
        let lines: Vec<serde_json::Value> =
            (0..6).map(|_| serde_json::from_str(&reader.next().unwrap().unwrap()).unwrap()).collect();
        (lines, reader)
    })
    .await
    .unwrap();
    assert_eq!(lines[0]["shared_memory"], true, "{}", lines[0]);
    for l in &lines[1..] {
        assert_eq!(l["response"], "shm", "{l}");
    }
    tokio::task::block_in_place(|| {
        let _ = child.kill();
        let _ = child.wait();
    });
    let start = Instant::now();
    while !(shm.sessions() == 0 && shm.pool().stats().is_idle()) {
        assert!(start.elapsed() < Duration::from_secs(10), "not reclaimed: {}", shm.pool().stats());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(shm.pool().stats().grows >= 5, "{}", shm.pool().stats());
    let _ = stop.send(());
    server.await.unwrap().unwrap();
}

async fn raw_echo(ch: &ShmChannel, body: Bytes) -> Result<Bytes, Status> {
    let mut g = tonic::client::Grpc::new(ch.clone());
    g.ready().await.map_err(|e| Status::unavailable(e.to_string()))?;
    let path = http::uri::PathAndQuery::from_static("/shmgrpc.demo.v1.Blob/Echo");
    g.unary(Request::new(body), path, shmgrpc_conformance::peer::Raw).await.map(|r| r.into_inner())
}

fn reference(r: Reference) -> Bytes {
    let mut b = Vec::new();
    wire::encode_reference(r, &mut b);
    b.into()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_references_get_clear_statuses_and_the_server_keeps_serving() {
    let srv = serve(&[]).await;
    // A fresh pool: its first buffer is segment 1.
    let pool = Pool::new(PoolConfig::default()).unwrap();
    let ch = ShmChannel::connect_with(&srv.unix, ClientConfig::default().pool(pool)).await.unwrap();
    assert!(ch.is_shared_memory());
    let mut good = client(&ch);
    // Register segment 1 (1 MiB class) with the server by a legitimate call.
    shmgrpc_demo::verify(&good.echo(shmgrpc_demo::payload(1 << 20, 1)).await.unwrap().into_inner()).unwrap();
    let id = ch.session_id().unwrap();
    let reg = Region { segment: 1, generation: 0, offset: 0, len: 16 };
    let refer = |session: Vec<u8>, from_server: bool, parts: Vec<part::Kind>| {
        reference(Reference {
            session: session.into(),
            from_server,
            parts: parts.into_iter().map(|k| Part { kind: Some(k) }).collect(),
        })
    };
    let ours = |parts: Vec<part::Kind>| refer(id.to_vec(), false, parts);
    let sender = |r: Region| vec![part::Kind::Sender(r)];
    let ok = ours(sender(reg));

    let cases: Vec<(&str, Bytes, Code)> = vec![
        ("unknown session", refer(vec![9; 16], false, sender(reg)), Code::FailedPrecondition),
        ("short session id", refer(vec![9; 3], false, sender(reg)), Code::FailedPrecondition),
        ("claims to come from the server", refer(id.to_vec(), true, sender(reg)), Code::FailedPrecondition),
        ("unregistered segment", ours(sender(Region { segment: 999, ..reg })), Code::InvalidArgument),
        ("offset past the end", ours(sender(Region { offset: 1 << 40, ..reg })), Code::OutOfRange),
        ("length past the end", ours(sender(Region { len: 1 << 40, ..reg })), Code::OutOfRange),
        ("overflowing offset + length", ours(sender(Region { offset: u64::MAX, len: 2, ..reg })), Code::OutOfRange),
        ("no parts", ours(vec![]), Code::InvalidArgument),
        (
            "too many parts",
            ours((0..65).map(|_| part::Kind::Inline(Bytes::from_static(b"x"))).collect()),
            Code::InvalidArgument,
        ),
        ("a buffer of the server's it never lent", ours(vec![part::Kind::Receiver(reg)]), Code::InvalidArgument),
        (
            "more than 32 KiB of inline bytes",
            ours(vec![part::Kind::Inline(vec![0; 20 << 10].into()), part::Kind::Inline(vec![0; 13 << 10].into())]),
            Code::InvalidArgument,
        ),
        (
            "malformed",
            {
                let mut b = ok[..3].to_vec(); // the reference key, then garbage
                b.extend_from_slice(&[0x05, 0x01]);
                b.into()
            },
            Code::InvalidArgument,
        ),
        (
            "trailing fields",
            {
                let mut b = ok.to_vec();
                b.extend_from_slice(&[0x08, 0x01]);
                b.into()
            },
            Code::InvalidArgument,
        ),
    ];
    let before = ch.stats();
    for (what, body, code) in &cases {
        let err = raw_echo(&ch, body.clone()).await.unwrap_err();
        assert_eq!(err.code(), *code, "{what}: {err}");
        // No segment name ever appears in a status.
        assert!(!err.message().contains("shmgrpc-"), "{what}: {err}");
    }
    // A well-formed reference to 16 real bytes of our own segment: they hold the start of a 1 MiB Payload, which
    // does not decode from 16 bytes. The server says so; it does not crash.
    let err = raw_echo(&ch, ok.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    // The same undecodable bytes sent inline get the same status (tonic's own codec would say INTERNAL).
    let err = raw_echo(&ch, Bytes::from_static(&[0x0a, 0xff, 0x01])).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "inline: {err}");
    // The server is still up and serves both this client and a fresh one, through shared memory.
    shmgrpc_demo::verify(&good.echo(shmgrpc_demo::payload(2 << 20, 2)).await.unwrap().into_inner()).unwrap();
    let other = ShmChannel::connect(&srv.unix).await.unwrap();
    assert!(other.is_shared_memory());
    shmgrpc_demo::verify(&client(&other).echo(shmgrpc_demo::payload(2 << 20, 3)).await.unwrap().into_inner()).unwrap();
    assert_eq!(ch.stats().bad_references, before.bad_references, "the client itself received no bad reference");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_above_tonic_limits_need_no_settings() {
    let srv = serve(&[]).await;
    let ch = ShmChannel::connect(&srv.unix).await.unwrap();
    // Default tonic limits on this client: 4 MiB to decode.
    let mut c = BlobClient::new(ch.clone());
    let r = c.echo(shmgrpc_demo::payload(16 << 20, 9)).await.unwrap().into_inner();
    shmgrpc_demo::verify(&r).unwrap();
    assert_eq!(r.data.len(), 16 << 20);
}

#[test]
fn one_gib_each_way_between_processes() {
    let srv = common::serve_blocking(&[]);
    let out = Command::new(BIN)
        .args(["call", "--target", &srv.unix, "--size", "1GiB", "--repeat", "1", "--json"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert_eq!(calls_via(&out.stdout, "shm", "shm"), 1, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loans_are_sent_and_echoed_back_without_any_copy() {
    let srv = serve(&[]).await;
    let pool = Pool::new(PoolConfig::default()).unwrap();
    let ch = ShmChannel::connect_with(&srv.unix, ClientConfig::default().pool(pool.clone())).await.unwrap();
    let mut c = client(&ch);
    for round in 0..3u32 {
        let mut loan = ch.loan(4 << 20);
        assert!(loan.is_shared());
        shmgrpc_demo::fill_pattern(&mut loan, round);
        let crc32 = crc32fast::hash(&loan);
        let data = loan.freeze();
        let at = data.as_ptr();
        // Other fields around the loaned one travel inline in the reference.
        let r = c.echo(Payload { data, crc32, note: format!("round {round}") }).await.unwrap().into_inner();
        shmgrpc_demo::verify(&r).unwrap();
        assert_eq!(r.note, format!("round {round}"));
        assert_eq!(r.data.as_ptr(), at, "the reply must be the very memory we loaned: no copy either way");
    }
    eventually("the loans are back in the pool", || pool.stats().is_idle()).await;
    assert!(pool.stats().grows <= 2, "{}", pool.stats());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn received_payloads_are_forwarded_back_without_a_copy() {
    let srv = serve(&[]).await;
    let ch = ShmChannel::connect(&srv.unix).await.unwrap();
    let mut c = client(&ch);
    // The server writes downloads into loans of its own.
    let d = c.download(DownloadRequest { size: 3 << 20, seed: 8, count: 1 }).await.unwrap().into_inner();
    shmgrpc_demo::verify(&d).unwrap();
    assert!(shmgrpc::is_shared(&d.data));
    // Sending the server's own bytes back to it: it resolves them in its own buffer.
    let digest = c.upload(d.clone()).await.unwrap().into_inner();
    assert_eq!((digest.len, digest.crc32), (3 << 20, d.crc32));
    assert!(digest.via_shm);
    // And again after the first reference was answered: holds are counted, not consumed.
    let digest = c.upload(d.clone()).await.unwrap().into_inner();
    assert_eq!(digest.crc32, d.crc32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loans_without_a_session_are_ordinary_memory() {
    let srv = serve(&["--plain"]).await;
    let ch = ShmChannel::connect(&srv.unix).await.unwrap();
    let mut loan = ch.loan(1 << 20);
    assert!(!loan.is_shared());
    shmgrpc_demo::fill_pattern(&mut loan, 1);
    let crc32 = crc32fast::hash(&loan);
    let r = client(&ch).echo(Payload { data: loan.freeze(), crc32, note: String::new() }).await.unwrap().into_inner();
    shmgrpc_demo::verify(&r).unwrap();
}

#[test]
fn call_with_loans_between_processes() {
    let srv = common::serve_blocking(&[]);
    let out = Command::new(BIN)
        .args(["call", "--target", &srv.unix, "--size", "8MiB", "--repeat", "3", "--loan", "--json"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert_eq!(calls_via(&out.stdout, "shm", "shm"), 3, "{text}");
}

#[test]
fn posix_and_sysv_segments_can_be_exchanged_by_name() {
    for (server, client) in [("sysv", "posix"), ("posix", "sysv")] {
        let srv = common::serve_blocking(&["--backend", server]);
        let out = Command::new(BIN)
            .args(["call", "--target", &srv.unix, "--size", "2MiB", "--repeat", "3", "--backend", client, "--json"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{server}/{client}: {text}");
        assert_eq!(calls_via(&out.stdout, "shm", "shm"), 3, "{server}/{client}: {text}");
        // Downloads come from the server's own (named) segments.
        let out = Command::new(BIN)
            .args(["call", "--target", &srv.unix, "--size", "2MiB", "--repeat", "2", "--op", "download", "--json"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert_eq!(calls_via(&out.stdout, "inline", "shm"), 2, "{server}/{client}: {text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_holding_buffers_cannot_take_more_than_the_budget() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("g.sock");
    // 8 MiB of budget: two 4 MiB-class buffers.
    let pool = Pool::new(PoolConfig::default().budget(8 << 20)).unwrap();
    let shm = ShmServer::new(ServerConfig::default().pool(pool.clone())).unwrap();
    let (stop, server) = serve_here(sock.clone(), shm.layer()).await;
    let ch = ShmChannel::connect(&format!("unix:{}", sock.display())).await.unwrap();
    let mut c = client(&ch);
    let mut kept = Vec::new();
    for seed in 0..4 {
        let d = c.download(DownloadRequest { size: 3 << 20, seed, count: 1 }).await.unwrap().into_inner();
        shmgrpc_demo::verify(&d).unwrap();
        kept.push(d);
    }
    // The first two are the server's loans; the budget is then used up and the rest came inline.
    let shared: Vec<bool> = kept.iter().map(|d| shmgrpc::is_shared(&d.data)).collect();
    assert_eq!(shared, [true, true, false, false]);
    assert!(pool.stats().bytes <= 8 << 20);
    drop(kept);
    eventually("the server's buffers come back", || pool.stats().is_idle()).await;
    // With budget again, shared memory resumes.
    let d = c.download(DownloadRequest { size: 3 << 20, seed: 9, count: 1 }).await.unwrap().into_inner();
    assert!(shmgrpc::is_shared(&d.data));
    drop((d, c, ch));
    let _ = stop.send(());
    server.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exhausted_pool_is_waited_for_asynchronously_before_a_call() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("g.sock");
    // Room for two 4 MiB-class buffers; a call may wait up to 5 s for one to come back.
    let pool = Pool::new(PoolConfig::default().budget(8 << 20)).unwrap();
    let config = ServerConfig::default().pool(pool.clone()).exhausted_wait(Duration::from_secs(5));
    let shm = ShmServer::new(config).unwrap();
    let (stop, server) = serve_here(sock.clone(), shm.layer()).await;
    let ch = ShmChannel::connect(&format!("unix:{}", sock.display())).await.unwrap();
    let mut c = client(&ch);
    let download = |seed| DownloadRequest { size: 3 << 20, seed, count: 1 };
    let mut kept = Vec::new();
    for seed in 0..3 {
        kept.push(c.download(download(seed)).await.unwrap().into_inner());
    }
    // The third found the pool exhausted and went inline at once (the encoder never waits).
    let shared: Vec<bool> = kept.iter().map(|d| shmgrpc::is_shared(&d.data)).collect();
    assert_eq!(shared, [true, true, false]);
    // The next call waits, asynchronously, for a buffer to come back.
    let waits = shm.stats().pool_waits;
    let mut c2 = c.clone();
    let waiting = tokio::spawn(async move { c2.download(download(7)).await.unwrap().into_inner() });
    eventually("the call waits for room", || shm.stats().pool_waits == waits + 1).await;
    assert!(!waiting.is_finished(), "the call waits for room");
    kept.remove(0);
    let d = tokio::time::timeout(Duration::from_secs(4), waiting).await.expect("woken by the return").unwrap();
    shmgrpc_demo::verify(&d).unwrap();
    assert!(shmgrpc::is_shared(&d.data), "the call went through shared memory once a buffer came back");
    drop((kept, d, c, ch));
    let _ = stop.send(());
    server.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_in_flight_window_bounds_what_one_peer_holds_and_waits_a_bounded_time() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("g.sock");
    // A 4 MiB window, a 300 ms wait for it; the pool's budget is far larger.
    let config = ServerConfig::default().window(4 << 20).window_wait(Duration::from_millis(300));
    let shm = ShmServer::new(config).unwrap();
    let (stop, server) = serve_here(sock.clone(), shm.layer()).await;
    let ch = ShmChannel::connect(&format!("unix:{}", sock.display())).await.unwrap();
    let mut c = client(&ch);
    let download = |seed| DownloadRequest { size: 1 << 20, seed, count: 1 };
    // The client keeps every reply: the server's buffers stay held.
    let mut kept = Vec::new();
    for seed in 0..4 {
        kept.push(c.download(download(seed)).await.unwrap().into_inner());
    }
    assert!(kept.iter().all(|d| shmgrpc::is_shared(&d.data)));
    let held = shm.session_stats().held_bytes;
    assert!((4 << 20..(4 << 20) + 4096).contains(&held), "held {held}");
    // Calls whose messages go inline never wait for the window: a 1 KiB echo, an upload with a 12-byte reply.
    let waits = shm.stats().window_waits;
    let r = c.echo(shmgrpc_demo::payload(1 << 10, 1)).await.unwrap().into_inner();
    shmgrpc_demo::verify(&r).unwrap();
    assert_eq!(c.upload(shmgrpc_demo::payload(1 << 20, 2)).await.unwrap().into_inner().len, 1 << 20);
    assert_eq!(shm.stats().window_waits, waits, "a reply that goes inline waited for the window");
    // The window is full: the next reply waits for a release, then goes inline.
    let (before, waits) = (shm.stats().fallback(Fallback::WindowFull), shm.stats().window_waits);
    let d = c.download(download(9)).await.unwrap().into_inner();
    shmgrpc_demo::verify(&d).unwrap();
    assert!(!shmgrpc::is_shared(&d.data));
    assert_eq!(shm.stats().window_waits, waits + 1, "it waited for the window");
    assert_eq!(shm.stats().fallback(Fallback::WindowFull), before + 1, "then went inline");
    assert_eq!(shm.session_stats().held_bytes, held, "nothing more is held");
    // A release opens the window: a waiting reply goes through shared memory as soon as it comes.
    let mut c2 = c.clone();
    let waiting = tokio::spawn(async move { c2.download(download(10)).await.unwrap().into_inner() });
    eventually("the reply waits for the window", || shm.stats().window_waits == waits + 2).await;
    kept.pop();
    let d = waiting.await.unwrap();
    shmgrpc_demo::verify(&d).unwrap();
    assert!(shmgrpc::is_shared(&d.data), "the reply went through shared memory once a buffer came back");
    drop((kept, d, c, ch));
    let _ = stop.send(());
    server.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_whose_uid_is_not_allowed_is_served_inline() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("g.sock");
    // Allow only a uid that is not ours (nor root).
    let shm = ShmServer::new(ServerConfig::default().allowed_uids([4_000_000_000])).unwrap();
    let (stop, server) = serve_here(sock.clone(), shm.layer()).await;
    let ch = ShmChannel::connect(&format!("unix:{}", sock.display())).await.unwrap();
    assert_eq!(ch.fallback(), Some(Fallback::HandshakeFailed));
    assert_eq!(shm.sessions(), 0);
    let r = client(&ch).echo(shmgrpc_demo::payload(1 << 20, 1)).await.unwrap().into_inner();
    shmgrpc_demo::verify(&r).unwrap();
    assert!(!shmgrpc::is_shared(&r.data));
    drop(ch);
    let _ = stop.send(());
    server.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffers_the_pool_drops_are_forgotten_by_the_peer() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("g.sock");
    let shm = ShmServer::new(ServerConfig::default()).unwrap();
    let (stop, server) = serve_here(sock.clone(), shm.layer()).await;
    // 8 MiB of client budget: a 4 MiB buffer, then an 8 MiB one that needs the 4 MiB one dropped.
    let pool = Pool::new(PoolConfig::default().budget(8 << 20)).unwrap();
    let ch = ShmChannel::connect_with(&format!("unix:{}", sock.display()), ClientConfig::default().pool(pool.clone()))
        .await
        .unwrap();
    let mut c = client(&ch);
    assert!(c.upload(shmgrpc_demo::payload(3 << 20, 1)).await.unwrap().into_inner().via_shm);
    eventually("the server maps one segment of ours", || shm.session_stats().peer_segments == 1).await;
    assert_eq!(ch.session_stats().shared_segments, 1);
    eventually("the first buffer is idle", || pool.stats().is_idle()).await;
    let d = c.upload(shmgrpc_demo::payload(6 << 20, 2)).await.unwrap().into_inner();
    assert!(d.via_shm);
    assert_eq!(pool.stats().evictions, 1);
    eventually("the server forgets the dropped segment", || shm.session_stats().peer_segments == 1).await;
    assert_eq!(shm.session_stats().peer_bytes, 8 << 20);
    assert_eq!(ch.session_stats().shared_segments, 1);
    drop((c, ch));
    let _ = stop.send(());
    server.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_carry_on_across_server_crashes_mid_transfer() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("grpc.sock");
    let unix = format!("unix:{}", path.display());
    let keep = tempfile::tempdir().unwrap(); // the servers get their own (empty) temp dirs
    let start_server = |round: u32| {
        let backend = if round % 2 == 0 { "memfd" } else { "posix" };
        common::serve_in(tempfile::tempdir_in(keep.path()).unwrap(), unix.clone(), &["--backend", backend])
    };
    let mut srv = start_server(0).await;
    let ch = ShmChannel::connect(&unix).await.unwrap();
    assert!(ch.is_shared_memory());
    // A client busy with large transfers all along; calls that meet a crash fail, none hangs or corrupts.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let busy = {
        let (mut c, stop) = (client(&ch), stop.clone());
        tokio::spawn(async move {
            let (mut ok, mut failed, mut seed) = (0u32, 0u32, 0u32);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                seed += 1;
                let mut req = tonic::Request::new(shmgrpc_demo::payload(16 << 20, seed));
                req.set_timeout(Duration::from_secs(20));
                match c.echo(req).await {
                    Ok(r) => {
                        shmgrpc_demo::verify(r.get_ref()).unwrap();
                        ok += 1;
                    }
                    Err(_) => {
                        failed += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
            (ok, failed)
        })
    };
    let mut pids = Vec::new();
    let mut seed = 0x1234_5678u32;
    for round in 0..10u32 {
        seed ^= seed << 13;
        seed ^= seed >> 17;
        seed ^= seed << 5;
        tokio::time::sleep(Duration::from_millis(30 + u64::from(seed % 200))).await;
        // kill -9 in the middle of whatever transfer is running: no cleanup at all on the server's side.
        pids.push(srv.child.id());
        tokio::task::block_in_place(|| {
            let _ = srv.child.kill();
            let _ = srv.child.wait();
        });
        srv = start_server(round + 1).await;
        // The channel reconnects (tonic) and reopens its session (shmgrpc).
        let start = Instant::now();
        let mut c = client(&ch);
        loop {
            assert!(start.elapsed() < Duration::from_secs(20), "round {round}: no shared memory again");
            if let Ok(r) = c.echo(shmgrpc_demo::payload(1 << 20, round)).await {
                let r = r.into_inner();
                shmgrpc_demo::verify(&r).unwrap();
                if shmgrpc::is_shared(&r.data) && ch.is_shared_memory() {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = busy.await.unwrap();
    assert!(ok > 0, "the busy client never got through ({failed} failures)");
    // What the killed servers held of the client's buffers came back when their side channels closed.
    let pool = ch.pool().unwrap().clone();
    eventually("the client's pool is idle", || pool.stats().is_idle()).await;
    drop((ch, srv));
    // Killed servers cannot unlink their POSIX segments: that is what gc is for. Afterwards none is left.
    shmgrpc::inventory::gc(false).unwrap();
    let left: Vec<_> =
        shmgrpc::inventory::list().unwrap().into_iter().filter(|s| s.pid.is_some_and(|p| pids.contains(&p))).collect();
    assert!(left.is_empty(), "{left:?}");
    drop(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_clients_mid_transfer_never_hurts_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("g.sock");
    let target = format!("unix:{}", sock.display());
    let shm = ShmServer::new(ServerConfig::default()).unwrap();
    let (stop, server) = serve_here(sock.clone(), shm.layer()).await;
    let bystander = ShmChannel::connect(&target).await.unwrap();
    let mut b = client(&bystander);
    let mut seed = 0x9e37_79b9u32;
    for i in 0..40u32 {
        seed ^= seed << 13;
        seed ^= seed >> 17;
        seed ^= seed << 5;
        let (op, size) = [("echo", "8MiB"), ("download", "16MiB"), ("upload", "12MiB")][i as usize % 3];
        let mut child = Command::new(BIN)
            .args(["call", "--target", &target, "--op", op, "--size", size, "--repeat", "1000000", "--quiet"])
            .args(if i % 2 == 0 { &["--keep"][..] } else { &["--loan"][..] })
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        tokio::time::sleep(Duration::from_millis(20 + u64::from(seed % 150))).await;
        tokio::task::block_in_place(|| {
            let _ = child.kill();
            let _ = child.wait();
        });
        // The bystander is served all along, through shared memory.
        let r = b.echo(shmgrpc_demo::payload(2 << 20, i)).await.unwrap().into_inner();
        shmgrpc_demo::verify(&r).unwrap();
        assert!(shmgrpc::is_shared(&r.data));
    }
    drop(b);
    drop(bystander);
    eventually("every killed client's buffers came back", || {
        shm.sessions() == 0 && shm.pool().stats().is_idle() && shm.session_stats() == Default::default()
    })
    .await;
    let _ = stop.send(());
    server.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_fields_beside_live_regions_still_go_through_shared_memory() {
    let srv = serve(&[]).await;
    let ch = ShmChannel::connect(&srv.unix).await.unwrap();
    let mut c = client(&ch);
    // Holding a received payload keeps a region of the server's alive, so the encoder looks for slices it could
    // send back without a copy; a fresh heap payload is not one of them and is copied once into a pool buffer.
    let held = c.download(DownloadRequest { size: 2 << 20, seed: 1, count: 1 }).await.unwrap().into_inner();
    assert!(shmgrpc::is_shared(&held.data));
    for seed in 0..5 {
        let p = shmgrpc_demo::payload((3 << 20) + seed as usize, seed);
        let r = c.echo(Payload { note: "beside a live region".into(), ..p.clone() }).await.unwrap().into_inner();
        shmgrpc_demo::verify(&r).unwrap();
        assert_eq!(r.note, "beside a live region");
        assert!(shmgrpc::is_shared(&r.data));
        // And the held region itself, sent back, is not copied either.
        let d = c.upload(held.clone()).await.unwrap().into_inner();
        assert_eq!(d.crc32, held.crc32);
    }
    shmgrpc_demo::verify(&held).unwrap();
}

/// A tonic server with a whole-server auth interceptor, inside the shmgrpc layer (`shm_first`, as the README says)
/// or outside it, on a Unix socket in `dir`.
async fn serve_with_auth(
    dir: &std::path::Path,
    shm: &ShmServer,
    shm_first: bool,
) -> (String, tokio::task::JoinHandle<Result<(), tonic::transport::Error>>) {
    let sock = dir.join("auth.sock");
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(tokio::net::UnixListener::bind(&sock).unwrap());
    let check = |req: Request<()>| match req.metadata().get("authorization") {
        Some(_) => Ok(req),
        None => Err(Status::unauthenticated("no token")),
    };
    let service = shmgrpc_demo::BlobServer::new(shmgrpc_demo::BlobService)
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX);
    let auth = tonic::service::InterceptorLayer::new(check);
    let server = if shm_first {
        tokio::spawn(
            Server::builder().layer(shm.layer()).layer(auth).add_service(service).serve_with_incoming(incoming),
        )
    } else {
        tokio::spawn(
            Server::builder().layer(auth).layer(shm.layer()).add_service(service).serve_with_incoming(incoming),
        )
    };
    (format!("unix:{}", sock.display()), server)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_an_interceptor_rejects_give_their_buffers_back_at_once() {
    // Versions 4 and 3 (`CallEnd`; the call's number in the session header, or in a header of its own) and version 2
    // (the server reads the rejected bodies to their end).
    for version in [4, 3, 2] {
        requests_an_interceptor_rejects_give_their_buffers_back(version).await;
    }
}

async fn requests_an_interceptor_rejects_give_their_buffers_back(version: u32) {
    let dir = tempfile::tempdir().unwrap();
    let shm = ShmServer::new(ServerConfig::default()).unwrap();
    let (target, server) = serve_with_auth(dir.path(), &shm, true).await;
    let pool = Pool::new(PoolConfig::default()).unwrap();
    let config = ClientConfig::default().pool(pool.clone()).protocol_version(version);
    let ch = ShmChannel::connect_with(&target, config).await.unwrap();
    assert!(ch.is_shared_memory(), "discovery passes an interceptor inside the shmgrpc layer: {:?}", ch.fallback());
    assert_eq!(ch.protocol_version(), Some(version));
    let mut c = client(&ch);
    // 40 uploads of 20 MiB, each rejected before its handler ran: nobody on the server decodes the reference.
    for i in 0..40u32 {
        let err = c.upload(shmgrpc_demo::payload(20 << 20, i)).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{err}");
    }
    assert_eq!(ch.stats().shm_sent, 40, "the requests went through shared memory: {:?}", ch.stats());
    // The server released what it never decoded when it dropped each request: the session is still up, and holds
    // nothing.
    eventually("every rejected request's buffer came back", || ch.session_stats().holds == 0 && pool.stats().is_idle())
        .await;
    assert!(ch.is_shared_memory());
    // Version 3: the server's `CallEnd` said the requests were never read; version 2: it read and released them.
    let lost = ch.stats().lost_in_flight;
    assert!(if version >= 3 { lost > 0 } else { lost == 0 }, "version {version}: {lost} lost in flight");
    // An authorised call still goes through shared memory both ways.
    let mut req = Request::new(shmgrpc_demo::payload(20 << 20, 99));
    req.metadata_mut().insert("authorization", "Bearer t".parse().unwrap());
    let r = c.echo(req).await.unwrap().into_inner();
    shmgrpc_demo::verify(&r).unwrap();
    assert!(shmgrpc::is_shared(&r.data));
    drop((r, c, ch));
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_auth_layer_outside_shmgrpcs_rejects_discovery_and_the_channel_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let shm = ShmServer::new(ServerConfig::default()).unwrap();
    let (target, server) = serve_with_auth(dir.path(), &shm, false).await;
    let ch = ShmChannel::connect(&target).await.unwrap();
    // Discovery carries none of the application's metadata: an auth layer that sees it first refuses it. The
    // channel still works, inline, and names the reason (the README says where the layer goes).
    assert_eq!(ch.fallback(), Some(Fallback::DiscoveryFailed));
    let mut req = Request::new(shmgrpc_demo::payload(1 << 20, 1));
    req.metadata_mut().insert("authorization", "Bearer t".parse().unwrap());
    shmgrpc_demo::verify(&client(&ch).echo(req).await.unwrap().into_inner()).unwrap();
    drop(ch);
    server.abort();
}

/// Streams cancelled with messages in flight (protocol version 3, `CallEnd`): HTTP/2 discards what the reader had
/// not read, and the reader tells the sender how many messages it read, so the holds of the rest go too. Both ends
/// in this process, so that both sides' holds can be seen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_cancelled_with_messages_in_flight_leave_no_hold_behind() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("c.sock");
    let shm = ShmServer::new(ServerConfig::default()).unwrap();
    let (stop, server) = serve_here(sock.clone(), shm.layer()).await;
    let pool = Pool::new(PoolConfig::default()).unwrap();
    let ch = ShmChannel::connect_with(&format!("unix:{}", sock.display()), ClientConfig::default().pool(pool.clone()))
        .await
        .unwrap();
    assert!(ch.is_shared_memory(), "{:?}", ch.fallback());
    let mut c = client(&ch);
    // 20 downloads of 32 replies of 4 MiB, each abandoned after its second reply once the server has sent at
    // least six: the client's HTTP/2 connection has received replies nobody will read.
    for i in 0..20u32 {
        let sent = shm.stats().shm_sent;
        let req = DownloadRequest { size: 4 << 20, seed: i, count: 32 };
        let mut s = c.download_stream(req).await.unwrap().into_inner();
        for _ in 0..2 {
            shmgrpc_demo::verify(&s.message().await.unwrap().unwrap()).unwrap();
        }
        eventually("the server sent more than was read", || shm.stats().shm_sent >= sent + 6).await;
        drop(s);
    }
    let lost_downloads = shm.stats().lost_in_flight;
    assert!(lost_downloads >= 20 * 4, "the client's `CallEnd` named the replies it never read: {lost_downloads}");
    // 20 echo streams of 16 requests of 1 MiB, each abandoned after its second reply once the server has sent six:
    // requests and replies (which send the requests' regions back) in flight both ways.
    for i in 0..20u32 {
        let sent = shm.stats().shm_sent;
        let requests: Vec<Payload> = (0..16).map(|j| shmgrpc_demo::payload(1 << 20, i * 100 + j)).collect();
        let mut s = c.echo_stream(tokio_stream::iter(requests)).await.unwrap().into_inner();
        for _ in 0..2 {
            shmgrpc_demo::verify(&s.message().await.unwrap().unwrap()).unwrap();
        }
        eventually("the server sent more than was read", || shm.stats().shm_sent >= sent + 6).await;
        drop(s);
    }
    assert!(shm.stats().lost_in_flight >= lost_downloads + 20 * 4, "{:?}", shm.stats());
    // 20 downloads the client gives up on at once, whether the reply is out already or not (dropped futures).
    for i in 0..20u32 {
        let req = DownloadRequest { size: 4 << 20, seed: 500 + i, count: 1 };
        let _ = tokio::time::timeout(Duration::from_millis(1 + u64::from(i % 5)), c.download(req)).await;
    }
    let stats = ch.stats();
    assert!(stats.shm_sent >= 40 && stats.shm_received >= 80, "through shared memory: {stats:?}");
    let quiet = || {
        let (cs, ss) = (ch.session_stats(), shm.session_stats());
        cs.holds == 0 && cs.sent_back == 0 && ss.holds == 0 && ss.sent_back == 0
    };
    eventually("no hold is left on either side", quiet).await;
    eventually("both pools are idle", || pool.stats().is_idle() && shm.pool().stats().is_idle()).await;
    assert_eq!(shm.sessions(), 1, "given back by the session, not by its end");
    // The session goes on: a whole stream still comes through shared memory.
    let req = DownloadRequest { size: 1 << 20, seed: 7, count: 3 };
    let mut s = c.download_stream(req).await.unwrap().into_inner();
    while let Some(p) = s.message().await.unwrap() {
        shmgrpc_demo::verify(&p).unwrap();
        assert!(shmgrpc::is_shared(&p.data));
    }
    drop((s, c, ch));
    let _ = stop.send(());
    let served = server.await.unwrap();
    assert!(served.is_ok(), "{served:?}");
}
