//! Hostile peers on the side channel: garbage and truncated handshakes, bad registrations, floods of releases, and
//! references to another session's buffers. The server answers each with a refusal or a status, never crashes, and
//! keeps serving a well-behaved client.

mod common;

use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::{Served, client, serve};
use prost::Message;
use shmgrpc::proto::v1::{self, HelloRequest, session_client::SessionClient};
use shmgrpc::protocol::PROTOCOL_VERSION;
use shmgrpc::wire::{self, Kind};
use shmgrpc::{PeerSegment, SegmentHandle, ShmChannel};

async fn ticket(srv: &Served) -> Vec<u8> {
    let mut c = SessionClient::new(common::plain_channel(&srv.unix).await);
    c.hello(HelloRequest { version: PROTOCOL_VERSION }).await.unwrap().into_inner().ticket.to_vec()
}

fn side(srv: &Served) -> UnixStream {
    let s = UnixStream::connect(srv.side.as_ref().unwrap()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// Reads until the server closes the connection; returns the refusal reason if it sent one.
fn closed(s: &UnixStream) -> Option<String> {
    let mut reason = None;
    loop {
        match wire::read_frame(s) {
            Ok(Some((m, _))) => {
                if let Some(Kind::Refused(r)) = m.kind {
                    reason = Some(r.reason);
                }
            }
            Ok(None) | Err(_) => return reason,
        }
    }
}

fn send(s: &UnixStream, kind: Kind) {
    wire::write_frame(s, &wire::frame(kind), None).unwrap();
}

/// A complete, correct handshake by hand; returns the socket and the session id.
async fn handshake(srv: &Served) -> (UnixStream, Vec<u8>) {
    let t = ticket(srv).await;
    let s = side(srv);
    send(&s, Kind::Attach(v1::Attach { version: PROTOCOL_VERSION, ticket: t.into() }));
    let (m, mut fds) = wire::read_frame(&s).unwrap().unwrap();
    let Some(Kind::Challenge(ch)) = m.kind else { panic!("expected a challenge, got {m:?}") };
    let seg = PeerSegment::open(SegmentHandle::Memfd(fds.pop().unwrap()), ch.len).unwrap();
    send(&s, Kind::Proof(v1::Proof { answer: seg.range(0, ch.len).unwrap().to_vec().into() }));
    let (m, _) = wire::read_frame(&s).unwrap().unwrap();
    let Some(Kind::Welcome(w)) = m.kind else { panic!("expected welcome, got {m:?}") };
    (s, w.session.to_vec())
}

async fn still_serves(srv: &Served) {
    let ch = ShmChannel::connect(&srv.unix).await.unwrap();
    assert!(ch.is_shared_memory(), "{:?}", ch.fallback());
    let r = client(&ch).echo(shmgrpc_demo::payload(1 << 20, 7)).await.unwrap().into_inner();
    shmgrpc_demo::verify(&r).unwrap();
    assert!(shmgrpc::is_shared(&r.data));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_truncated_handshakes_are_refused() {
    let srv = serve(&[]);
    // Random bytes.
    let mut s = side(&srv);
    s.write_all(&[0x17, 0x03, 0x03, 0x00, 0x45, 0xde, 0xad, 0xbe, 0xef]).unwrap();
    closed(&s);
    // A length far beyond the frame limit.
    let mut s = side(&srv);
    s.write_all(&u32::MAX.to_le_bytes()).unwrap();
    closed(&s);
    // A frame cut short.
    let mut s = side(&srv);
    s.write_all(&100u32.to_le_bytes()).unwrap();
    s.write_all(&[0u8; 10]).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    closed(&s);
    // A well-formed frame of the wrong kind.
    let s = side(&srv);
    send(&s, Kind::Proof(v1::Proof { answer: Bytes::from_static(b"early") }));
    assert_eq!(closed(&s).as_deref(), Some("expected attach"));
    // Unknown ticket, wrong version.
    let s = side(&srv);
    send(&s, Kind::Attach(v1::Attach { version: PROTOCOL_VERSION, ticket: vec![0; 32].into() }));
    assert_eq!(closed(&s).as_deref(), Some("unknown or expired ticket"));
    let s = side(&srv);
    send(&s, Kind::Attach(v1::Attach { version: PROTOCOL_VERSION + 1, ticket: ticket(&srv).await.into() }));
    assert_eq!(closed(&s).as_deref(), Some("unsupported protocol version"));
    // A ticket is good once.
    let t = ticket(&srv).await;
    let s = side(&srv);
    send(&s, Kind::Attach(v1::Attach { version: PROTOCOL_VERSION, ticket: t.clone().into() }));
    let _ = wire::read_frame(&s).unwrap();
    send(&s, Kind::Proof(v1::Proof { answer: vec![0; 32].into() }));
    assert_eq!(closed(&s).as_deref(), Some("wrong answer to the challenge"));
    let s = side(&srv);
    send(&s, Kind::Attach(v1::Attach { version: PROTOCOL_VERSION, ticket: t.into() }));
    assert_eq!(closed(&s).as_deref(), Some("unknown or expired ticket"));
    // Hanging up in the middle of the handshake.
    let s = side(&srv);
    send(&s, Kind::Attach(v1::Attach { version: PROTOCOL_VERSION, ticket: ticket(&srv).await.into() }));
    drop(s);
    // A protobuf that is no SideMessage kind at all.
    let mut s = side(&srv);
    let junk = v1::HelloResponse { version: 9, side_channel: "x".into(), ticket: Bytes::new() }.encode_to_vec();
    s.write_all(&(junk.len() as u32).to_le_bytes()).unwrap();
    s.write_all(&junk).unwrap();
    closed(&s);
    still_serves(&srv).await;
}

fn register(
    s: &UnixStream,
    segment: u32,
    len: u64,
    source: Option<v1::register::Source>,
    fd: Option<std::os::fd::BorrowedFd<'_>>,
) -> String {
    wire::write_frame(s, &wire::frame(Kind::Register(v1::Register { segment, len, source })), fd).unwrap();
    loop {
        let (m, _) = wire::read_frame(s).unwrap().expect("the server keeps the session open");
        if let Some(Kind::Registered(r)) = m.kind {
            assert_eq!(r.segment, segment);
            return r.error;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_registrations_are_refused_and_floods_of_releases_are_ignored() {
    use rustix::fs::{MemfdFlags, SealFlags};
    let srv = serve(&[]);
    let (s, _id) = handshake(&srv).await;

    // A memfd without seals: it could shrink under the server's mapping.
    let fd = rustix::fs::memfd_create("x", MemfdFlags::ALLOW_SEALING).unwrap();
    rustix::fs::ftruncate(&fd, 1 << 20).unwrap();
    assert!(register(&s, 1, 1 << 20, None, Some(fd.as_fd())).contains("seals"));
    // Sealed, but smaller than claimed.
    rustix::fs::fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::GROW).unwrap();
    assert!(!register(&s, 2, 2 << 20, None, Some(fd.as_fd())).is_empty());
    // Neither a descriptor nor a name.
    assert!(!register(&s, 3, 4096, None, None).is_empty());
    // A descriptor and a name at once.
    let name = Some(v1::register::Source::PosixName("/shmgrpc-1-0123456789abcdef".into()));
    assert!(!register(&s, 4, 4096, name.clone(), Some(fd.as_fd())).is_empty());
    // A POSIX name that is not ours, and one of another process (pid 1).
    let other = Some(v1::register::Source::PosixName("/etc/passwd".into()));
    assert!(!register(&s, 5, 4096, other, None).is_empty());
    assert!(register(&s, 6, 4096, name, None).contains("not created by the expected process"));
    // A System V id that does not exist, or is not the peer's.
    assert!(!register(&s, 7, 4096, Some(v1::register::Source::SysvId(i32::MAX)), None).is_empty());
    // A pipe instead of a memfd.
    let (r, _w) = rustix::pipe::pipe().unwrap();
    assert!(!register(&s, 8, 1, None, Some(r.as_fd())).is_empty());
    // The session is still up: a proper registration works.
    assert_eq!(register(&s, 9, 1 << 20, None, Some(fd.as_fd())), "");

    // Floods of releases and returns of buffers this peer never held.
    for i in 0..20_000u32 {
        send(
            &s,
            if i % 2 == 0 {
                Kind::Release(v1::Release { segment: i, generation: i })
            } else {
                Kind::Returned(v1::Returned { segment: i, generation: 0 })
            },
        );
    }
    assert_eq!(register(&s, 10, 1 << 20, None, Some(fd.as_fd())), "", "the session survives the flood");
    still_serves(&srv).await;
    // An unexpected frame kind ends only this session.
    send(&s, Kind::Welcome(v1::Welcome { session: vec![0; 16].into(), threshold: 0 }));
    closed(&s);
    still_serves(&srv).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_session_cannot_reach_another_sessions_buffers() {
    let srv = serve(&[]);
    let a = ShmChannel::connect(&srv.unix).await.unwrap();
    let b = ShmChannel::connect(&srv.unix).await.unwrap();
    // A registers its segment 1 and holds a server buffer (a download it keeps).
    let mut ca = client(&a);
    let kept =
        ca.download(shmgrpc_demo::DownloadRequest { size: 1 << 20, seed: 1, count: 1 }).await.unwrap().into_inner();
    ca.upload(shmgrpc_demo::payload(1 << 20, 2)).await.unwrap();
    // B names A's segment 1 and the server buffer A holds, under B's own session: both refused.
    let b_id = b.session_id().unwrap();
    let region = v1::Region { segment: 1, generation: 0, offset: 0, len: 16 };
    for (what, part) in [
        ("another session's segment", v1::part::Kind::Sender(region)),
        ("a buffer lent to another session", v1::part::Kind::Receiver(region)),
    ] {
        let r = v1::Reference {
            session: b_id.to_vec().into(),
            from_server: false,
            parts: vec![v1::Part { kind: Some(part) }],
        };
        let mut body = Vec::new();
        wire::encode_reference(r, &mut body);
        let mut g = tonic::client::Grpc::new(b.clone());
        g.ready().await.unwrap();
        let path = http::uri::PathAndQuery::from_static("/shmgrpc.demo.v1.Blob/Upload");
        let err = g.unary(tonic::Request::new(Bytes::from(body)), path, common::Raw).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{what}: {err}");
    }
    shmgrpc_demo::verify(&kept).unwrap();
    still_serves(&srv).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_posix_segment_shrunk_after_sharing_is_data_loss_not_sigbus() {
    let srv = serve(&[]);
    let (s, id) = handshake(&srv).await;
    // Our POSIX segment (this process created it, as the server checks) holding a valid 1 MiB Payload.
    let body = shmgrpc_demo::payload(1 << 20, 5).encode_to_vec();
    let mut seg = shmgrpc::Segment::create(2 << 20, &shmgrpc::SegmentOptions::new(shmgrpc::Backend::Posix)).unwrap();
    seg.as_mut_slice()[..body.len()].copy_from_slice(&body);
    let name = seg.posix_name().unwrap().as_str().to_string();
    let source = Some(v1::register::Source::PosixName(name.clone()));
    assert_eq!(register(&s, 1, 2 << 20, source, None), "");
    // Shrink it after the server mapped it: its reads past 4 KiB would raise SIGBUS.
    let fd = rustix::shm::open(name.as_str(), rustix::shm::OFlags::RDWR, rustix::fs::Mode::empty()).unwrap();
    rustix::fs::ftruncate(&fd, 4096).unwrap();
    let region = v1::Region { segment: 1, generation: 0, offset: 0, len: body.len() as u64 };
    let r = v1::Reference {
        session: id.into(),
        from_server: false,
        parts: vec![v1::Part { kind: Some(v1::part::Kind::Sender(region)) }],
    };
    let mut msg = Vec::new();
    wire::encode_reference(r, &mut msg);
    let mut g = tonic::client::Grpc::new(common::plain_channel(&srv.unix).await);
    g.ready().await.unwrap();
    let path = http::uri::PathAndQuery::from_static("/shmgrpc.demo.v1.Blob/Upload");
    let err = g.unary(tonic::Request::new(Bytes::from(msg)), path, common::Raw).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::DataLoss, "{err}");
    assert!(!err.message().contains(&name[9..]), "{err}");
    still_serves(&srv).await;
    drop(seg); // never read again by us: our own mapping is short now too
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_never_reads_its_side_channel_loses_its_session() {
    let srv = serve(&[]);
    let (s, _id) = handshake(&srv).await;
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    // Every Register asks for an answer; never reading them fills the socket, then the server's queue.
    let mut sent = 0;
    for i in 0..200_000u32 {
        let frame = wire::frame(Kind::Register(v1::Register { segment: i, len: 1, source: None }));
        if wire::write_frame(&s, &frame, None).is_err() {
            break; // the server closed the session
        }
        sent += 1;
    }
    assert!(sent > 1000, "only {sent} frames went out");
    // The session is gone: after the answers already sent, the stream ends.
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut answers = 0;
    while let Ok(Some(_)) = wire::read_frame(&s) {
        answers += 1;
    }
    assert!(
        answers < sent,
        "the server answered everything ({answers}) instead of giving up on a peer that does not read"
    );
    still_serves(&srv).await;
}

/// Calls `Download` of 20 MiB under session `id` (hex in the header) until `stop`, on a plain channel of its own:
/// the server answers with references into its pool, which this raw peer never resolves nor releases.
async fn drive_downloads(unix: String, id: Vec<u8>, stop: Arc<AtomicBool>) -> usize {
    let ch = common::plain_channel(&unix).await;
    let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
    let mut calls = 0;
    while !stop.load(Ordering::Relaxed) {
        let mut g = tonic::client::Grpc::new(ch.clone()).max_decoding_message_size(usize::MAX);
        g.ready().await.unwrap();
        let body = shmgrpc_demo::DownloadRequest { size: 20 << 20, seed: calls as u32, count: 1 }.encode_to_vec();
        let mut req = tonic::Request::new(Bytes::from(body));
        req.metadata_mut().insert("shmgrpc-session", hex.parse().unwrap());
        let path = http::uri::PathAndQuery::from_static("/shmgrpc.demo.v1.Blob/Download");
        let _ = g.unary(req, path, common::Raw).await;
        calls += 1;
    }
    calls
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn peers_that_never_answer_or_never_read_cost_a_bystander_no_time() {
    let srv = serve(&[]);
    // One peer reads its side channel but never answers a registration and never releases anything...
    let (silent, silent_id) = handshake(&srv).await;
    let reader = std::thread::spawn(move || while let Ok(Some(_)) = wire::read_frame(&silent) {});
    // ...the other never reads it at all.
    let (deaf, deaf_id) = handshake(&srv).await;
    let stop = Arc::new(AtomicBool::new(false));
    let mut attackers = Vec::new();
    for id in [silent_id, deaf_id] {
        for _ in 0..4 {
            attackers.push(tokio::spawn(drive_downloads(srv.unix.clone(), id.clone(), stop.clone())));
        }
    }
    // A bystander on the same server, 1 KiB and 1 MiB echoes back to back.
    let ch = ShmChannel::connect(&srv.unix).await.unwrap();
    assert!(ch.is_shared_memory(), "{:?}", ch.fallback());
    let mut c = client(&ch);
    let (mut latencies, mut calls) = (Vec::new(), 0);
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_secs(20) {
        let size = if calls % 2 == 0 { 1 << 10 } else { 1 << 20 };
        let t = std::time::Instant::now();
        let r = c.echo(shmgrpc_demo::payload(size, calls as u32)).await.unwrap().into_inner();
        latencies.push(t.elapsed());
        shmgrpc_demo::verify(&r).unwrap();
        calls += 1;
    }
    stop.store(true, Ordering::Relaxed);
    let mut attacks = 0;
    for a in attackers {
        attacks += a.await.unwrap();
    }
    latencies.sort();
    let (median, p99, worst) =
        (latencies[latencies.len() / 2], latencies[latencies.len() * 99 / 100], *latencies.last().unwrap());
    println!(
        "bystander: {calls} calls, median {median:?}, p99 {p99:?}, worst {worst:?}; attackers made {attacks} 20 MiB calls"
    );
    assert!(attacks >= 8, "the attack did not run ({attacks} calls)");
    assert!(worst < Duration::from_secs(1), "a bystander call took {worst:?}");
    drop(deaf);
    let _ = reader.join();
    still_serves(&srv).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_thousand_hellos_leave_a_new_client_its_session() {
    let srv = serve(&[]);
    // Discovery is open to anyone who reaches the gRPC port, TCP included.
    let plain = common::plain_channel(&srv.tcp).await;
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let ch = plain.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = SessionClient::new(ch);
            for _ in 0..2_500 {
                let hello = c.hello(HelloRequest { version: PROTOCOL_VERSION }).await.unwrap().into_inner();
                assert_eq!(hello.version, PROTOCOL_VERSION);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // A new client gets its session at once, not after tickets expire.
    let ch = ShmChannel::connect(&srv.unix).await.unwrap();
    assert!(ch.is_shared_memory(), "{:?}", ch.fallback());
    let r = client(&ch).echo(shmgrpc_demo::payload(1 << 20, 3)).await.unwrap().into_inner();
    shmgrpc_demo::verify(&r).unwrap();
    assert!(shmgrpc::is_shared(&r.data));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_are_negotiated_and_old_clients_are_told_why() {
    let srv = serve(&[]);
    let mut c = SessionClient::new(common::plain_channel(&srv.unix).await);
    // A client that speaks a newer version too gets the newest both speak.
    let hello = c.hello(HelloRequest { version: PROTOCOL_VERSION + 3 }).await.unwrap().into_inner();
    assert_eq!(hello.version, PROTOCOL_VERSION);
    assert!(std::path::Path::new(&hello.side_channel).is_absolute(), "a bare absolute path, no scheme");
    // Version 1 (wait for `Registered`) is not spoken any more: a clear status, no ticket.
    let err = c.hello(HelloRequest { version: 1 }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_idle_side_channel_connections_is_bounded() {
    let srv = serve(&[]);
    // 1 100 connections that never say anything: the first 1 024 wait out their handshake timeout, the rest are
    // closed at once, without a word.
    let conns: Vec<UnixStream> = (0..1100).map(|_| side(&srv)).collect();
    let last = conns.last().unwrap();
    last.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let t = std::time::Instant::now();
    let mut buf = [0u8; 16];
    let n = std::io::Read::read(&mut &*last, &mut buf).expect("closed within the handshake timeout");
    assert_eq!(n, 0, "closed without a frame");
    assert!(t.elapsed() < Duration::from_secs(3));
    drop(conns);
    still_serves(&srv).await;
}
