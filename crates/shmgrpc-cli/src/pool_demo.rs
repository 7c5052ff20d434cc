//! `shmgrpc pool-demo`: a payload moved between two real processes through the pool, next to the same payload
//! pushed through a Unix socket. Each round the parent writes the whole payload and the child checksums all of it.
//!
//! Over the pool, only a reference crosses the socket: `seg <buffer id> <len>`, with the segment itself (a memfd
//! descriptor, a POSIX name or a System V id) sent the first time a buffer is used; the child keeps the mapping in
//! its attach cache.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytesize::ByteSize;
use shmgrpc::segment::{PosixName, SysVId};
use shmgrpc::{AttachCache, Backend, Pool, PoolConfig, SegmentHandle, fdpass};

#[derive(clap::Args)]
pub(crate) struct Args {
    /// Payload size (for example 20MiB, 1GiB).
    #[arg(long, default_value = "20MiB")]
    size: ByteSize,
    /// Rounds per transport.
    #[arg(long, default_value_t = 5)]
    repeat: usize,
    /// Segment backend: memfd, posix or sysv.
    #[arg(long, default_value = "memfd")]
    backend: Backend,
    /// Print one JSON line per round and one at the end (`"event": "round"` / `"done"`) instead of the tables.
    #[arg(long)]
    json: bool,
}

/// Prints `human` or, with `--json`, `json` as one line.
fn say(json: bool, human: impl FnOnce() -> String, line: impl FnOnce() -> serde_json::Value) {
    if json {
        println!("{}", line());
    } else {
        println!("{}", human());
    }
}

#[derive(clap::Args)]
pub(crate) struct ChildArgs {
    #[arg(long)]
    socket: PathBuf,
}

fn send_line(sock: &UnixStream, line: &str, fd: Option<std::os::fd::BorrowedFd<'_>>) -> anyhow::Result<()> {
    let msg = format!("{line}\n");
    let sent = match fd {
        Some(fd) => fdpass::send_with_fds(sock, msg.as_bytes(), &[fd])?,
        None => 0,
    };
    (&*sock).write_all(&msg.as_bytes()[sent..])?;
    Ok(())
}

fn recv_line(sock: &UnixStream) -> anyhow::Result<(String, Vec<std::os::fd::OwnedFd>)> {
    let mut out = Vec::new();
    let mut fds = Vec::new();
    while !out.ends_with(b"\n") {
        let mut byte = [0u8; 1];
        // One byte at a time: the line is short and must not swallow payload bytes that follow it.
        let (n, got) = fdpass::recv_with_fds(sock, &mut byte)?;
        if n == 0 {
            bail!("peer closed the connection");
        }
        fds.extend(got);
        out.push(byte[0]);
    }
    out.pop();
    Ok((String::from_utf8(out)?, fds))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The first round (cold: the segment is created and mapped) and the median of the others (warm; the lower
/// middle for an even count). With one round, both are that round.
fn cold_and_warm(v: &[Duration]) -> (Duration, Duration) {
    let mut warm = if v.len() > 1 { v[1..].to_vec() } else { v.to_vec() };
    warm.sort();
    (v[0], warm[(warm.len() - 1) / 2])
}

pub(crate) fn run(a: Args) -> anyhow::Result<()> {
    let size = usize::try_from(a.size.as_u64()).context("size does not fit in memory")?;
    if size == 0 || a.repeat == 0 {
        bail!("size and repeat must be above 0");
    }
    let pool = Pool::new(PoolConfig::default().backend(a.backend).budget((size as u64 * 2).max(4 << 30)))?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("demo.sock");
    let listener = UnixListener::bind(&path)?;
    let mut child = Command::new(std::env::current_exe()?)
        .arg("pool-demo-child")
        .arg("--socket")
        .arg(&path)
        .stdin(Stdio::null())
        .spawn()
        .context("starting the child process")?;
    let (sock, _) = listener.accept()?;
    if !a.json {
        println!(
            "pool-demo: {} ({size} bytes), {} rounds, backend {}, parent pid {} -> child pid {}",
            a.size,
            a.repeat,
            a.backend,
            std::process::id(),
            child.id()
        );
        println!("each round: the parent writes the whole payload, the child checksums all of it (crc32)\n");
        println!(
            "{:<6} {:>5} {:>10} {:>10} {:>12} {:>10}  notes",
            "via", "round", "alloc ms", "write ms", "transfer ms", "e2e ms"
        );
    }

    let mut shared = HashSet::new();
    let (mut shm_t, mut shm_e2e) = (Vec::new(), Vec::new());
    for round in 0..a.repeat {
        let grows = pool.stats().grows;
        let t0 = Instant::now();
        let mut lease = pool.try_alloc(size)?;
        let t_alloc = t0.elapsed();
        let t1 = Instant::now();
        shmgrpc_demo::fill_pattern(&mut lease, round as u32);
        let t_write = t1.elapsed();
        let want = crc32fast::hash(&lease);
        let t2 = Instant::now();
        let first = shared.insert(lease.id());
        let line = format!("seg {} {size}", lease.id());
        match (first, lease.share()?) {
            (true, SegmentHandle::Memfd(fd)) => send_line(&sock, &format!("{line} memfd"), Some(fd.as_fd()))?,
            (true, SegmentHandle::Posix(n)) => send_line(&sock, &format!("{line} posix {}", n.as_str()), None)?,
            (true, SegmentHandle::SysV(id)) => send_line(&sock, &format!("{line} sysv {}", id.as_raw()), None)?,
            (false, _) => send_line(&sock, &line, None)?,
        }
        let (reply, _) = recv_line(&sock)?;
        let t_transfer = t2.elapsed();
        let words: Vec<&str> = reply.split(' ').collect();
        if words.first() != Some(&"ok") || words.get(1) != Some(&want.to_string().as_str()) {
            bail!("child answered {reply:?}, expected checksum {want}");
        }
        let buffer = if pool.stats().grows > grows { "new" } else { "reused" };
        let mapping = words[2..].join(" ");
        let e2e = t0.elapsed();
        say(
            a.json,
            || {
                format!(
                    "{:<6} {:>5} {:>10.2} {:>10.2} {:>12.2} {:>10.2}  crc ok; {buffer} buffer {}; child {mapping}",
                    "shm",
                    round,
                    ms(t_alloc),
                    ms(t_write),
                    ms(t_transfer),
                    ms(e2e),
                    lease.id(),
                )
            },
            || {
                serde_json::json!({
                    "event": "round", "via": "shm", "round": round, "checksum": "ok", "buffer": buffer,
                    "child_mapping": if mapping == "reused its mapping" { "reused" } else { "new" },
                    "transfer_ns": t_transfer.as_nanos() as u64, "e2e_ns": e2e.as_nanos() as u64,
                })
            },
        );
        shm_t.push(t_transfer);
        shm_e2e.push(t0.elapsed());
    }

    let (mut sock_t, mut sock_e2e) = (Vec::new(), Vec::new());
    let mut payload = vec![0u8; size];
    for round in 0..a.repeat {
        let t0 = Instant::now();
        shmgrpc_demo::fill_pattern(&mut payload, round as u32);
        let t_write = t0.elapsed();
        let want = crc32fast::hash(&payload);
        let t2 = Instant::now();
        send_line(&sock, &format!("raw {size}"), None)?;
        (&sock).write_all(&payload)?;
        let (reply, _) = recv_line(&sock)?;
        let t_transfer = t2.elapsed();
        if reply != format!("ok {want} copy") {
            bail!("child answered {reply:?}, expected checksum {want}");
        }
        let e2e = t0.elapsed();
        say(
            a.json,
            || {
                format!(
                    "{:<6} {:>5} {:>10} {:>10.2} {:>12.2} {:>10.2}  crc ok; heap buffer, copied through the kernel",
                    "socket",
                    round,
                    "-",
                    ms(t_write),
                    ms(t_transfer),
                    ms(e2e)
                )
            },
            || {
                serde_json::json!({
                    "event": "round", "via": "socket", "round": round, "checksum": "ok",
                    "transfer_ns": t_transfer.as_nanos() as u64, "e2e_ns": e2e.as_nanos() as u64,
                })
            },
        );
        sock_t.push(t_transfer);
        sock_e2e.push(t0.elapsed());
    }
    send_line(&sock, "quit", None)?;
    let status = child.wait()?;
    if !status.success() {
        bail!("child failed: {status}");
    }

    let idle = pool.stats().is_idle();
    if !a.json {
        summary(&pool, &shm_t, &sock_t, &shm_e2e, &sock_e2e);
    }
    drop(pool);
    let left: Vec<_> = shmgrpc::inventory::list()?
        .into_iter()
        .filter(|s| s.pid == Some(std::process::id()) && s.backend != Backend::Memfd)
        .collect();
    if !left.is_empty() {
        bail!("segments left behind: {left:?}");
    }
    say(
        a.json,
        || "all segments released".to_string(),
        || serde_json::json!({"event": "done", "pool_idle": idle, "segments_left": 0}),
    );
    Ok(())
}

/// The human summary: warm medians and first rounds side by side, and the pool's table.
fn summary(pool: &Pool, shm_t: &[Duration], sock_t: &[Duration], shm_e2e: &[Duration], sock_e2e: &[Duration]) {
    println!();
    for (what, shm, socket) in [("transfer", shm_t, sock_t), ("end to end", shm_e2e, sock_e2e)] {
        let ((sc, sw), (uc, uw)) = (cold_and_warm(shm), cold_and_warm(socket));
        println!(
            "{what:<10}: warm median shm {:.2} ms, socket {:.2} ms ({:.1}x); first round shm {:.2} ms, socket {:.2} ms",
            ms(sw),
            ms(uw),
            uw.as_secs_f64() / sw.as_secs_f64(),
            ms(sc),
            ms(uc)
        );
    }
    println!("transfer = reference (or payload) sent -> child has checksummed everything and answered;");
    println!("end to end adds allocating and writing the payload\n");
    println!("pool after the run:\n{}", pool.stats());
}

pub(crate) fn child(a: ChildArgs) -> anyhow::Result<()> {
    let sock = UnixStream::connect(&a.socket)?;
    let cache = AttachCache::<u32>::new();
    let mut buf = Vec::new();
    loop {
        let (line, mut fds) = recv_line(&sock)?;
        let w: Vec<&str> = line.split(' ').collect();
        match w[0] {
            "seg" => {
                let id: u32 = w[1].parse()?;
                let len: u64 = w[2].parse()?;
                let before = cache.stats().misses;
                let seg = cache.attach(id, len, || match w.get(3).copied() {
                    Some("memfd") => fds.pop().map(SegmentHandle::Memfd).ok_or(shmgrpc::Error::InvalidHandle("no fd")),
                    Some("posix") => Ok(SegmentHandle::Posix(PosixName::parse(w[4])?)),
                    Some("sysv") => Ok(SegmentHandle::SysV(SysVId::from_raw(
                        w[4].parse().map_err(|_| shmgrpc::Error::InvalidHandle("bad id"))?,
                    ))),
                    _ => Err(shmgrpc::Error::InvalidHandle("unknown buffer and no segment sent")),
                })?;
                let crc = crc32fast::hash(seg.range(0, len)?);
                let how = if cache.stats().misses > before { "mapped it" } else { "reused its mapping" };
                send_line(&sock, &format!("ok {crc} {how}"), None)?;
            }
            "raw" => {
                let len: usize = w[1].parse()?;
                buf.resize(len, 0);
                (&sock).read_exact(&mut buf)?;
                send_line(&sock, &format!("ok {} copy", crc32fast::hash(&buf)), None)?;
            }
            "quit" => return Ok(()),
            other => bail!("unknown request {other:?}"),
        }
    }
}
