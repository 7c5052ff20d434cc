//! `shmgrpc serve` and `shmgrpc call`: the demo blob service and a client that checksums every reply.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytesize::ByteSize;
use shmgrpc::{ShmChannel, ShmServer};
use shmgrpc_demo::{Addr, BlobClient, DownloadRequest, Payload};

#[derive(clap::Args)]
pub(crate) struct ServeArgs {
    /// Address to listen on: unix:/path or host:port (repeat for several; port 0 picks a free port).
    #[arg(long, required = true)]
    listen: Vec<Addr>,
    /// Serve plain gRPC (tonic's own codec, no shmgrpc layer).
    #[arg(long)]
    plain: bool,
    /// Segment backend of the server's pool: memfd (descriptors over the side channel), posix or sysv (names).
    #[arg(long, default_value = "memfd")]
    backend: shmgrpc::Backend,
    /// Where the side-channel socket goes: a path, or @name for an abstract socket (no file; the network
    /// namespace's, as the containers of one pod share). Default: beside the first unix: address, as
    /// `<socket>.shmgrpc`, so a client that reaches the socket finds it; without one, a fresh path in the temporary
    /// directory.
    #[arg(long)]
    side_channel: Option<std::path::PathBuf>,
    /// Accept sessions from this uid; repeat for several. The list replaces the default set (the server's own uid
    /// and root), as `ServerConfig::allowed_uids` and Python's `allowed_uids=` do: list your own uid to keep it.
    #[arg(long)]
    allow_uid: Vec<u32>,
    /// Byte budget of the server's pool (for example 512MiB; default 4 GiB, or half the memory limit of the
    /// process's cgroup if that is less).
    #[arg(long)]
    pool_budget: Option<ByteSize>,
    /// Seconds a pool buffer may stay idle before its memory goes back to the system (0: never; fractions allowed).
    #[arg(long, default_value_t = shmgrpc::pool::DEFAULT_IDLE_RELEASE.as_secs_f64())]
    idle_release: f64,
}

#[derive(clap::Args)]
pub(crate) struct CallArgs {
    /// Server address: unix:/path or host:port.
    #[arg(long)]
    target: String,
    /// Payload size.
    #[arg(long, default_value = "20MiB")]
    size: ByteSize,
    /// Number of calls.
    #[arg(long, default_value_t = 5)]
    repeat: usize,
    /// Which method: echo (payload both ways), upload (payload to the server), download (payload from it), or a
    /// stream of `--messages` frames: download_stream, upload_stream, bidi (each frame echoed).
    #[arg(long, default_value = "echo")]
    op: Op,
    /// Frames per call of the streaming methods.
    #[arg(long, default_value_t = 32)]
    messages: usize,
    /// Use a plain gRPC channel (no shmgrpc session).
    #[arg(long)]
    plain: bool,
    /// Segment backend of the client's pool: memfd, posix or sysv.
    #[arg(long, default_value = "memfd")]
    backend: shmgrpc::Backend,
    /// Write request payloads into loans (sent without any copy) instead of ordinary memory.
    #[arg(long)]
    loan: bool,
    /// Print only the last call.
    #[arg(long)]
    quiet: bool,
    /// Print JSON lines instead of text: `{"event":"connected",...}`, one `{"event":"call",...}` per call, and
    /// `{"event":"done",...}` with the channel's transfer counters.
    #[arg(long)]
    json: bool,
    /// Keep every reply until the command ends, instead of dropping each after checking it (the server's buffers
    /// stay lent: exercises the release protocol and reclamation).
    #[arg(long)]
    keep: bool,
}

/// A demo method.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Op {
    Echo,
    Upload,
    Download,
    /// Server streaming: `messages` payloads from the server.
    #[value(name = "download_stream")]
    DownloadStream,
    /// Client streaming: `messages` payloads to the server, one digest list back.
    #[value(name = "upload_stream")]
    UploadStream,
    /// Bidirectional: `messages` payloads, each echoed as it arrives.
    Bidi,
}

impl Op {
    /// Whether the method streams frames.
    pub(crate) fn streams(self) -> bool {
        matches!(self, Op::DownloadStream | Op::UploadStream | Op::Bidi)
    }

    /// Payload bytes one call moves per frame, counting both directions.
    pub(crate) fn directions(self) -> usize {
        if matches!(self, Op::Echo | Op::Bidi) { 2 } else { 1 }
    }
}

/// The readiness line `serve` prints on stdout once every address accepts calls: one line of JSON, for example
/// `{"event":"ready","pid":42,"listen":["unix:/tmp/g.sock","127.0.0.1:40123"],"side_channel":"/tmp/shmgrpc-42-….sock","shared_memory":true,"protocol_version":4}`.
#[derive(serde::Serialize, Debug)]
pub(crate) struct Ready {
    /// Always `"ready"`.
    pub(crate) event: &'static str,
    /// The server's process id.
    pub(crate) pid: u32,
    /// Bound addresses (`unix:/path`, `host:port` with the real port), in the order of `--listen`.
    pub(crate) listen: Vec<String>,
    /// Path of the side-channel socket; absent with `--plain`.
    pub(crate) side_channel: Option<String>,
    /// Whether the server speaks shmgrpc (false with `--plain`).
    pub(crate) shared_memory: bool,
    /// The highest protocol version the server speaks.
    pub(crate) protocol_version: u32,
}

pub(crate) async fn serve(a: ServeArgs) -> anyhow::Result<()> {
    let idle = (a.idle_release > 0.0).then(|| Duration::from_secs_f64(a.idle_release));
    let budget = a.pool_budget.map_or_else(shmgrpc::pool::default_budget, |b| b.as_u64());
    let pool = shmgrpc::PoolConfig::default().backend(a.backend).idle_release(idle).budget(budget);
    let mut config = shmgrpc::ServerConfig::default().pool_config(pool);
    let first_unix = a.listen.iter().find_map(|l| match l {
        Addr::Unix(p) => Some(p.clone()),
        _ => None,
    });
    if let Some(path) = a.side_channel {
        config = config.side_channel(path);
    } else if let Some(sock) = first_unix {
        config = config.side_channel_beside(sock);
    }
    if !a.allow_uid.is_empty() {
        config = config.allowed_uids(a.allow_uid.iter().copied());
    }
    let shm = if a.plain { None } else { Some(ShmServer::new(config)?) };
    let layer = shm.as_ref().map(|s| s.layer());
    let side = shm.as_ref().map(|s| s.side_channel_path().display().to_string());
    let ready = |bound: &[Addr]| {
        // People read stderr; programs (the bench, the tests, a supervisor) read the one JSON line on stdout.
        for b in bound {
            eprintln!("listening {b}");
        }
        match &side {
            Some(p) => eprintln!("side channel {p}"),
            None => eprintln!("plain gRPC, no shared memory"),
        }
        let line = Ready {
            event: "ready",
            pid: std::process::id(),
            listen: bound.iter().map(ToString::to_string).collect(),
            side_channel: side.clone(),
            shared_memory: side.is_some(),
            protocol_version: shmgrpc::protocol::PROTOCOL_VERSION,
        };
        println!("{}", serde_json::to_string(&line).expect("plain data serializes"));
    };
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    shmgrpc_demo::serve(&a.listen, layer, ready, shutdown).await?;
    drop(shm);
    Ok(())
}

/// A demo client over a shmgrpc channel (or a plain one), with message limits lifted.
pub(crate) async fn client(target: &str, plain: bool) -> anyhow::Result<(BlobClient<ShmChannel>, ShmChannel)> {
    client_with(target, shmgrpc::ClientConfig::default().shared_memory(!plain)).await
}

/// [`client`] with a configuration of its own.
pub(crate) async fn client_with(
    target: &str,
    config: shmgrpc::ClientConfig,
) -> anyhow::Result<(BlobClient<ShmChannel>, ShmChannel)> {
    let ch = ShmChannel::connect_with(target, config).await.with_context(|| format!("connecting to {target}"))?;
    let c = BlobClient::new(ch.clone()).max_decoding_message_size(usize::MAX).max_encoding_message_size(usize::MAX);
    Ok((c, ch))
}

/// One checked call: the payload is written in full before the call and checksummed in full after.
pub(crate) struct CallResult {
    /// From the call to the response.
    pub transport: Duration,
    /// Including writing the payload and checksumming the reply.
    pub end_to_end: Duration,
    /// Messages that went through shared memory (sent, received).
    pub shm: (u64, u64),
}

pub(crate) async fn call_once(
    c: &mut BlobClient<ShmChannel>,
    ch: &ShmChannel,
    loans: Option<&ShmChannel>,
    op: Op,
    size: usize,
    messages: usize,
    seed: u32,
) -> anyhow::Result<CallResult> {
    call_keep(c, ch, loans, op, size, messages, seed, &mut Vec::new()).await
}

/// The request payload: written in full, into a loan of `loans` when given (sent without a copy), else into
/// ordinary memory.
fn request_payload(loans: Option<&ShmChannel>, size: usize, seed: u32) -> Payload {
    match loans {
        Some(ch) => {
            let mut loan = ch.loan(size);
            shmgrpc_demo::fill_pattern(&mut loan, seed);
            let crc32 = crc32fast::hash(&loan);
            Payload { data: loan.freeze(), crc32, note: String::new() }
        }
        None => shmgrpc_demo::payload(size, seed),
    }
}

/// Like [`call_once`], pushing the reply's payloads (if any) into `kept`. Streams (`messages` frames) are timed from
/// the call to the last reply; the receiver checks each frame as it arrives, inside that time, as a streaming
/// consumer would.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn call_keep(
    c: &mut BlobClient<ShmChannel>,
    ch: &ShmChannel,
    loans: Option<&ShmChannel>,
    op: Op,
    size: usize,
    messages: usize,
    seed: u32,
    kept: &mut Vec<Payload>,
) -> anyhow::Result<CallResult> {
    // The channel's own counters (a client's clones share them; concurrent calls on clones blur per-call figures).
    let before = ch.stats();
    let t0 = Instant::now();
    let (transport, ok) = match op {
        Op::Echo | Op::Upload => {
            let p = request_payload(loans, size, seed);
            let want = p.crc32;
            let t1 = Instant::now();
            if op == Op::Echo {
                let r: Payload = c.echo(p).await?.into_inner();
                let t = t1.elapsed();
                shmgrpc_demo::verify(&r)?;
                let ok = r.crc32 == want && r.data.len() == size;
                kept.push(r);
                (t, ok)
            } else {
                let d = c.upload(p).await?.into_inner();
                (t1.elapsed(), d.crc32 == want && d.len == size as u64)
            }
        }
        Op::Download => {
            let t1 = Instant::now();
            let r = c.download(DownloadRequest { size: size as u64, seed, count: 1 }).await?.into_inner();
            let t = t1.elapsed();
            shmgrpc_demo::verify(&r)?;
            let ok = r.data.len() == size;
            kept.push(r);
            (t, ok)
        }
        Op::DownloadStream => {
            let t1 = Instant::now();
            let request = DownloadRequest { size: size as u64, seed, count: messages as u32 };
            let mut replies = c.download_stream(request).await?.into_inner();
            let (mut n, mut ok) = (0, true);
            while let Some(p) = replies.message().await? {
                shmgrpc_demo::verify(&p)?;
                ok &= p.data.len() == size;
                n += 1;
                kept.push(p);
            }
            (t1.elapsed(), ok && n == messages)
        }
        Op::UploadStream | Op::Bidi => {
            let frames: Vec<Payload> =
                (0..messages).map(|i| request_payload(loans, size, seed.wrapping_add(i as u32))).collect();
            let want: Vec<u32> = frames.iter().map(|p| p.crc32).collect();
            let t1 = Instant::now();
            if op == Op::UploadStream {
                let d = c.upload_stream(tokio_stream::iter(frames)).await?.into_inner();
                let ok = d.digests.len() == messages
                    && d.digests.iter().zip(&want).all(|(d, w)| d.crc32 == *w && d.len == size as u64);
                (t1.elapsed(), ok)
            } else {
                let mut replies = c.echo_stream(tokio_stream::iter(frames)).await?.into_inner();
                let (mut n, mut ok) = (0, true);
                while let Some(p) = replies.message().await? {
                    shmgrpc_demo::verify(&p)?;
                    ok &= want.get(n) == Some(&p.crc32) && p.data.len() == size;
                    n += 1;
                    kept.push(p);
                }
                (t1.elapsed(), ok && n == messages)
            }
        }
    };
    let end_to_end = t0.elapsed();
    if !ok {
        bail!("the reply does not match what was sent");
    }
    let after = ch.stats();
    Ok(CallResult {
        transport,
        end_to_end,
        shm: (after.shm_sent - before.shm_sent, after.shm_received - before.shm_received),
    })
}

pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

pub(crate) async fn call(a: CallArgs) -> anyhow::Result<()> {
    let size = usize::try_from(a.size.as_u64())?;
    let config = shmgrpc::ClientConfig::default()
        .shared_memory(!a.plain)
        .pool_config(shmgrpc::PoolConfig::default().backend(a.backend));
    let (mut c, ch) = client_with(&a.target, config).await?;
    if a.json {
        let line = serde_json::json!({
            "event": "connected",
            "target": a.target,
            "shared_memory": ch.is_shared_memory(),
            "fallback": ch.fallback().map(|f| f.label()),
        });
        println!("{line}");
    } else {
        match ch.fallback() {
            None if ch.is_shared_memory() => println!("connected to {}: shared memory session", a.target),
            None => println!("connected to {}: plain gRPC (requested)", a.target),
            Some(why) => println!("connected to {}: inline only ({why})", a.target),
        }
    }
    let mut kept = Vec::new();
    for i in 0..a.repeat {
        let loans = a.loan.then_some(&ch);
        let r = call_keep(&mut c, &ch, loans, a.op, size, a.messages, i as u32, &mut kept).await?;
        if !a.keep {
            kept.clear();
        }
        let via = |n: u64| if n > 0 { "shm" } else { "inline" };
        if a.quiet && i + 1 < a.repeat {
            continue;
        }
        if a.json {
            let line = serde_json::json!({
                "event": "call",
                "call": i,
                "op": format!("{:?}", a.op),
                "size": size,
                "messages": if a.op.streams() { a.messages } else { 1 },
                "transport_ms": ms(r.transport),
                "end_to_end_ms": ms(r.end_to_end),
                "request": via(r.shm.0),
                "response": via(r.shm.1),
                "checksum": "ok",
            });
            println!("{line}");
            continue;
        }
        let frames = if a.op.streams() { format!(" x {}", a.messages) } else { String::new() };
        println!(
            "call {i}: {:?} {}{frames} in {:.3} ms (end to end {:.3} ms), request {}, response {}, checksum ok",
            a.op,
            a.size,
            ms(r.transport),
            ms(r.end_to_end),
            via(r.shm.0),
            via(r.shm.1)
        );
    }
    if a.json {
        let s = ch.stats();
        let fallbacks: serde_json::Map<String, serde_json::Value> =
            s.fallbacks.iter().map(|(f, n)| (f.label().to_string(), (*n).into())).collect();
        let line = serde_json::json!({
            "event": "done",
            "shm_sent": s.shm_sent,
            "shm_received": s.shm_received,
            "inline_sent": s.inline_sent,
            "inline_received": s.inline_received,
            "fallbacks": fallbacks,
        });
        println!("{line}");
    }
    drop(kept);
    if let Some(pool) = ch.pool() {
        println!("client pool: {}", pool.stats().to_string().lines().last().unwrap_or_default());
    }
    Ok(())
}
