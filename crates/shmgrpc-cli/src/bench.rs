//! `shmgrpc bench`: plain tonic over TCP and over a Unix socket, and shmgrpc, side by side in one run, against a
//! server in another process. Every call writes its whole payload before the call and checksums all of the reply
//! after it, in every mode.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use bytesize::ByteSize;

use crate::grpc::{Op, call_once, client, ms};

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Payload sizes.
    #[arg(long, value_delimiter = ',', default_value = "1KiB,64KiB,1MiB,20MiB")]
    sizes: Vec<ByteSize>,
    /// Transports: tcp (plain tonic, TCP loopback), uds (plain tonic, Unix socket), shm (shmgrpc, transparent),
    /// loan (shmgrpc, request payloads written into loans).
    #[arg(long, value_delimiter = ',', default_value = "tcp,uds,shm,loan")]
    transports: Vec<Transport>,
    /// Calls per cell (default: fewer for larger sizes).
    #[arg(long)]
    iterations: Option<usize>,
    /// Method.
    #[arg(long, default_value = "echo")]
    op: Op,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum Transport {
    Tcp,
    Uds,
    Shm,
    Loan,
}

/// A `shmgrpc serve` child process, killed on drop.
struct Server {
    child: Child,
    addrs: Vec<String>,
}

impl Server {
    fn start(args: &[&str]) -> anyhow::Result<Server> {
        let mut child = Command::new(std::env::current_exe()?)
            .arg("serve")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting the server process")?;
        let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
        let mut addrs = Vec::new();
        for line in &mut lines {
            let line = line?;
            if let Some(a) = line.strip_prefix("listening ") {
                addrs.push(a.to_string());
            }
            if line == "ready" {
                return Ok(Server { child, addrs });
            }
        }
        bail!("the server process ended before it was ready")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // SIGTERM first, so the server removes its sockets; then make sure.
        if let Some(pid) = i32::try_from(self.child.id()).ok().and_then(rustix::process::Pid::from_raw) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        for _ in 0..100 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn default_iterations(size: u64) -> usize {
    match size {
        0..=65_536 => 200,
        65_537..=1_048_576 => 50,
        1_048_577..=33_554_432 => 20,
        _ => 5,
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

pub async fn run(a: BenchArgs) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let plain_sock = format!("unix:{}", dir.path().join("plain.sock").display());
    let shm_sock = format!("unix:{}", dir.path().join("shm.sock").display());
    let plain = Server::start(&["--plain", "--listen", "127.0.0.1:0", "--listen", &plain_sock])?;
    let shm = Server::start(&["--listen", &shm_sock])?;
    println!(
        "shmgrpc bench: {:?} of {}, transports {:?}; server pids {} (plain) and {} (shmgrpc)",
        a.op,
        a.sizes.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(", "),
        a.transports,
        plain.child.id(),
        shm.child.id()
    );
    println!(
        "plain tonic: message limits lifted, 8 MiB stream / 16 MiB connection windows, 16 MiB frames, TCP_NODELAY"
    );
    println!("every call writes the whole payload before it and checksums all of the reply after it\n");
    println!(
        "{:<6} {:>10} {:>6} {:>12} {:>12} {:>14} {:>12} {:>10}",
        "via", "size", "calls", "median ms", "p99 ms", "e2e median ms", "MB/s", "shm msgs"
    );
    let mut medians = std::collections::HashMap::new();
    for size in &a.sizes {
        let n = usize::try_from(size.as_u64())?;
        let iterations = a.iterations.unwrap_or_else(|| default_iterations(size.as_u64()));
        for &t in &a.transports {
            let (target, plain_client) = match t {
                Transport::Tcp => (plain.addrs[0].clone(), true),
                Transport::Uds => (plain.addrs[1].clone(), true),
                Transport::Shm | Transport::Loan => (shm.addrs[0].clone(), false),
            };
            let (mut c, ch) = client(&target, plain_client).await?;
            let loans = (t == Transport::Loan).then_some(&ch);
            if matches!(t, Transport::Shm | Transport::Loan) && !ch.is_shared_memory() {
                bail!("no shared-memory session with the shmgrpc server: {:?}", ch.fallback());
            }
            // One warm-up call: connection, first segment, first mapping.
            call_once(&mut c, loans, a.op, n, 0).await?;
            let mut tr = Vec::with_capacity(iterations);
            let mut e2e = Vec::with_capacity(iterations);
            let mut shm_msgs = 0;
            for i in 0..iterations {
                let r = call_once(&mut c, loans, a.op, n, i as u32 + 1).await?;
                tr.push(r.transport);
                e2e.push(r.end_to_end);
                shm_msgs += r.shm.0 + r.shm.1;
            }
            tr.sort();
            e2e.sort();
            let med = percentile(&tr, 0.5);
            medians.insert((t, n), med);
            let moved = match a.op {
                Op::Echo => 2 * n,
                _ => n,
            };
            println!(
                "{:<6} {:>10} {:>6} {:>12.3} {:>12.3} {:>14.3} {:>12.0} {:>10}",
                format!("{t:?}").to_lowercase(),
                size.to_string(),
                iterations,
                ms(med),
                ms(percentile(&tr, 0.99)),
                ms(percentile(&e2e, 0.5)),
                moved as f64 / med.as_secs_f64() / 1e6,
                shm_msgs
            );
        }
    }
    println!();
    for size in &a.sizes {
        let n = size.as_u64() as usize;
        for fast in [Transport::Shm, Transport::Loan] {
            if let Some(s) = medians.get(&(fast, n)) {
                let vs = |t| medians.get(&(t, n)).map(|m: &Duration| m.as_secs_f64() / s.as_secs_f64());
                println!(
                    "{size:>10}: {} speedup {} over tcp, {} over uds (median transport time)",
                    format!("{fast:?}").to_lowercase(),
                    vs(Transport::Tcp).map_or("-".into(), |x| format!("{x:.1}x")),
                    vs(Transport::Uds).map_or("-".into(), |x| format!("{x:.1}x"))
                );
            }
        }
    }
    drop((plain, shm));
    Ok(())
}
