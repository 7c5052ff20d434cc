//! `shmgrpc bench`: plain tonic over TCP and over a Unix socket, shmgrpc's transparent path and its loans, side by
//! side in one run, against server processes of their own. In every mode the sender writes the whole payload before
//! the call and the receiver checksums all of it after (the server for uploads, the client for echo replies).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytesize::ByteSize;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use shmgrpc::ShmChannel;
use shmgrpc::demo::BlobClient;

use crate::grpc::{Op, call_once, client};

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Payload sizes.
    #[arg(long, value_delimiter = ',', default_value = "1KiB,64KiB,1MiB,20MiB,256MiB,1GiB")]
    sizes: Vec<ByteSize>,
    /// Transports: tcp (plain tonic, TCP loopback), uds (plain tonic, Unix socket), shm (shmgrpc, transparent),
    /// loan (shmgrpc, request payloads written into loans).
    #[arg(long, value_delimiter = ',', default_value = "tcp,uds,shm,loan")]
    transports: Vec<Transport>,
    /// Operations: echo (payload there and back), upload (payload there, small reply).
    #[arg(long, value_delimiter = ',', default_value = "echo,upload")]
    ops: Vec<Op>,
    /// Calls per client and cell (default: 200 up to 64 KiB, 50 up to 1 MiB, 10 up to 20 MiB, 4 up to 256 MiB,
    /// 3 above).
    #[arg(long)]
    iterations: Option<usize>,
    /// Concurrent clients, each with its own connection (and session).
    #[arg(long, default_value_t = 1)]
    clients: usize,
    /// Write the results as JSON to this file (`-` for standard output).
    #[arg(long)]
    json: Option<String>,
    /// Write a plot of median latency against size (log axes, SVG).
    #[arg(long)]
    plot: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    Tcp,
    Uds,
    Shm,
    Loan,
}

impl Transport {
    fn name(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Uds => "uds",
            Transport::Shm => "shm",
            Transport::Loan => "loan",
        }
    }
}

fn op_name(op: Op) -> &'static str {
    match op {
        Op::Echo => "echo",
        Op::Upload => "upload",
        Op::Download => "download",
    }
}

/// A `shmgrpc serve` child process, stopped on drop.
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
        let mut addrs = Vec::new();
        for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
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

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // SIGTERM first, so the server removes its sockets and segments; then make sure.
        if let Some(pid) = i32::try_from(self.child.id()).ok().and_then(rustix::process::Pid::from_raw) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        for _ in 0..250 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// CPU time (user + system) of a process so far, from `/proc/<pid>/stat`.
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0.0 };
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|s| s.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    ticks / rustix::param::clock_ticks_per_second() as f64
}

/// Resets the peak resident set size of a process (`/proc/<pid>/clear_refs`, value 5); best effort.
fn reset_peak_rss(pid: u32) {
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
}

/// Peak resident set size of a process since the last reset, from `VmHWM`.
fn peak_rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

fn default_iterations(size: u64) -> usize {
    match size {
        0..=65_536 => 200,
        65_537..=1_048_576 => 50,
        1_048_577..=20_971_520 => 10,
        20_971_521..=268_435_456 => 4,
        _ => 3,
    }
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// One measured cell of the table.
#[derive(Serialize)]
struct CellResult {
    transport: Transport,
    op: &'static str,
    size: u64,
    clients: usize,
    iterations: usize,
    median_ns: u64,
    p99_ns: u64,
    e2e_median_ns: u64,
    bytes_per_sec: f64,
    client_cpu_s: f64,
    server_cpu_s: f64,
    client_peak_rss_bytes: u64,
    server_peak_rss_bytes: u64,
    /// Messages that went through shared memory during the cell (both directions, all clients).
    shm_messages: u64,
}

#[derive(Serialize)]
struct MemcpyResult {
    size: u64,
    median_ns: u64,
}

#[derive(Serialize)]
struct Machine {
    cpu_model: String,
    cores: usize,
    kernel: String,
}

#[derive(Serialize)]
struct Report {
    machine: Machine,
    plain_tonic_settings: &'static str,
    results: Vec<CellResult>,
    memcpy: Vec<MemcpyResult>,
}

const PLAIN_SETTINGS: &str =
    "message limits lifted, 8 MiB stream / 16 MiB connection windows, 16 MiB frames, TCP_NODELAY";

fn machine() -> Machine {
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or_else(|_| "unknown".into(), |s| s.trim().to_string());
    Machine { cpu_model, cores: std::thread::available_parallelism().map_or(1, |n| n.get()), kernel }
}

/// The floor for one copy: median time of `copy_from_slice` of `size` bytes between two warm heap buffers.
fn memcpy_median(size: usize, iterations: usize) -> u64 {
    let src = vec![0x5au8; size];
    let mut dst = vec![0u8; size];
    dst.copy_from_slice(&src);
    let mut t: Vec<u64> = (0..iterations.max(5))
        .map(|_| {
            let t0 = Instant::now();
            dst.copy_from_slice(std::hint::black_box(&src));
            std::hint::black_box(&dst);
            t0.elapsed().as_nanos() as u64
        })
        .collect();
    t.sort_unstable();
    percentile(&t, 0.5)
}

/// One (size, op) row group: every transport is measured for it, interleaved.
struct Group {
    op: Op,
    size: usize,
    iterations: usize,
}

/// One transport's clients and what was measured for it so far in a group.
struct Lane {
    transport: Transport,
    server_pid: u32,
    clients: Vec<(BlobClient<ShmChannel>, Option<ShmChannel>)>,
    acc: Acc,
}

#[derive(Default)]
struct Acc {
    tr: Vec<u64>,
    e2e: Vec<u64>,
    client_cpu: f64,
    server_cpu: f64,
    client_rss: u64,
    server_rss: u64,
    shm_messages: u64,
}

/// Runs `n` calls on every client of `lane` at once, adding times, CPU, peak RSS and shm messages to its figures.
/// (Only one lane runs at a time, so the process-wide figures belong to it.)
async fn measure_block(lane: &mut Lane, g: &Group, n: usize, block: usize, bar: &ProgressBar) -> anyhow::Result<()> {
    let me = std::process::id();
    reset_peak_rss(me);
    reset_peak_rss(lane.server_pid);
    let (cpu_c0, cpu_s0) = (cpu_seconds(me), cpu_seconds(lane.server_pid));
    let before = shmgrpc::stats::snapshot();
    let tasks: Vec<_> = std::mem::take(&mut lane.clients)
        .into_iter()
        .map(|(mut c, loans)| {
            let (op, size, bar) = (g.op, g.size, bar.clone());
            tokio::spawn(async move {
                let mut out = Vec::with_capacity(n);
                for i in 0..n {
                    let seed = (block * 100_000 + i + 1) as u32;
                    let r = call_once(&mut c, loans.as_ref(), op, size, seed).await?;
                    out.push((r.transport.as_nanos() as u64, r.end_to_end.as_nanos() as u64));
                    bar.inc(1);
                }
                anyhow::Ok((c, loans, out))
            })
        })
        .collect();
    for t in tasks {
        let (c, loans, out) = t.await??;
        lane.clients.push((c, loans));
        for (a, b) in out {
            lane.acc.tr.push(a);
            lane.acc.e2e.push(b);
        }
    }
    let after = shmgrpc::stats::snapshot();
    lane.acc.client_cpu += cpu_seconds(me) - cpu_c0;
    lane.acc.server_cpu += cpu_seconds(lane.server_pid) - cpu_s0;
    lane.acc.client_rss = lane.acc.client_rss.max(peak_rss_bytes(me));
    lane.acc.server_rss = lane.acc.server_rss.max(peak_rss_bytes(lane.server_pid));
    lane.acc.shm_messages += (after.shm_sent - before.shm_sent) + (after.shm_received - before.shm_received);
    Ok(())
}

pub async fn run(a: BenchArgs) -> anyhow::Result<()> {
    if a.clients == 0 {
        bail!("--clients must be at least 1");
    }
    let dir = tempfile::tempdir()?;
    let plain_sock = format!("unix:{}", dir.path().join("plain.sock").display());
    let shm_sock = format!("unix:{}", dir.path().join("shm.sock").display());
    let needs_plain = a.transports.iter().any(|t| matches!(t, Transport::Tcp | Transport::Uds));
    let needs_shm = a.transports.iter().any(|t| matches!(t, Transport::Shm | Transport::Loan));
    let plain = if needs_plain {
        Some(Server::start(&["--plain", "--listen", "127.0.0.1:0", "--listen", &plain_sock])?)
    } else {
        None
    };
    let shm = if needs_shm { Some(Server::start(&["--listen", &shm_sock])?) } else { None };
    let m = machine();
    eprintln!(
        "shmgrpc bench on {} ({} cores, Linux {}): server pids {} (plain) and {} (shmgrpc)",
        m.cpu_model,
        m.cores,
        m.kernel,
        plain.as_ref().map_or("-".into(), |s| s.pid().to_string()),
        shm.as_ref().map_or("-".into(), |s| s.pid().to_string())
    );

    let mut groups = Vec::new();
    for size in &a.sizes {
        let size = usize::try_from(size.as_u64())?;
        let iterations = a.iterations.unwrap_or_else(|| default_iterations(size as u64));
        for &op in &a.ops {
            if op == Op::Download {
                bail!("bench measures echo and upload");
            }
            groups.push(Group { op, size, iterations });
        }
    }
    let total: u64 = groups.iter().map(|g| (g.iterations * a.clients * a.transports.len()) as u64).sum();
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} calls  {msg}")
            .expect("valid template"),
    );

    let mut results = Vec::new();
    for g in &groups {
        bar.set_message(format!("{} {}", op_name(g.op), ByteSize(g.size as u64)));
        // Every transport of the group is connected and warmed up (connection, first segment, first mapping),
        // then measured in interleaved blocks, so drifts of a shared machine hit them all alike.
        let mut lanes = Vec::new();
        for &transport in &a.transports {
            let (server, target, plain_client) = match transport {
                Transport::Tcp => (plain.as_ref().expect("started"), 0, true),
                Transport::Uds => (plain.as_ref().expect("started"), 1, true),
                Transport::Shm | Transport::Loan => (shm.as_ref().expect("started"), 0, false),
            };
            let mut clients = Vec::new();
            for _ in 0..a.clients {
                let (mut c, ch) = client(&server.addrs[target], plain_client).await?;
                if !plain_client && !ch.is_shared_memory() {
                    bail!("no shared-memory session with the shmgrpc server: {:?}", ch.fallback());
                }
                let loans = (transport == Transport::Loan).then_some(ch.clone());
                call_once(&mut c, loans.as_ref(), g.op, g.size, 0).await?;
                clients.push((c, loans));
            }
            lanes.push(Lane { transport, server_pid: server.pid(), clients, acc: Acc::default() });
        }
        let blocks = g.iterations.clamp(1, 5);
        for block in 0..blocks {
            let n = g.iterations / blocks + usize::from(block < g.iterations % blocks);
            let k = lanes.len();
            for j in 0..k {
                let lane = &mut lanes[(j + block) % k];
                measure_block(lane, g, n, block, &bar).await?;
            }
        }
        for lane in lanes {
            let Acc { mut tr, mut e2e, client_cpu, server_cpu, client_rss, server_rss, shm_messages } = lane.acc;
            tr.sort_unstable();
            e2e.sort_unstable();
            let median = percentile(&tr, 0.5);
            let moved = if g.op == Op::Echo { 2 * g.size } else { g.size } as f64;
            results.push(CellResult {
                transport: lane.transport,
                op: op_name(g.op),
                size: g.size as u64,
                clients: a.clients,
                iterations: g.iterations,
                median_ns: median,
                p99_ns: percentile(&tr, 0.99),
                e2e_median_ns: percentile(&e2e, 0.5),
                bytes_per_sec: moved * a.clients as f64 / (median as f64 / 1e9),
                client_cpu_s: client_cpu,
                server_cpu_s: server_cpu,
                client_peak_rss_bytes: client_rss,
                server_peak_rss_bytes: server_rss,
                shm_messages,
            });
        }
    }
    bar.finish_and_clear();
    let memcpy: Vec<MemcpyResult> = a
        .sizes
        .iter()
        .map(|s| MemcpyResult {
            size: s.as_u64(),
            median_ns: memcpy_median(s.as_u64() as usize, default_iterations(s.as_u64())),
        })
        .collect();
    drop((plain, shm));

    let report = Report { machine: m, plain_tonic_settings: PLAIN_SETTINGS, results, memcpy };
    print_table(&report, &a);
    if let Some(path) = &a.json {
        let text = serde_json::to_string_pretty(&report)?;
        if path == "-" {
            println!("{text}");
        } else {
            std::fs::write(path, text).with_context(|| format!("writing {path}"))?;
            eprintln!("wrote {path}");
        }
    }
    if let Some(path) = &a.plot {
        crate::plot::latency_svg(path, &report_series(&report))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

/// (series name, [(size, median ms)]) for the plot.
fn report_series(r: &Report) -> Vec<(String, Vec<(f64, f64)>)> {
    let mut series: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    for c in &r.results {
        let name = format!("{} {}", c.transport.name(), c.op);
        let point = (c.size as f64, c.median_ns as f64 / 1e6);
        match series.iter_mut().find(|(n, _)| *n == name) {
            Some((_, pts)) => pts.push(point),
            None => series.push((name, vec![point])),
        }
    }
    series.push(("memcpy".into(), r.memcpy.iter().map(|m| (m.size as f64, m.median_ns as f64 / 1e6)).collect()));
    series
}

fn print_table(r: &Report, a: &BenchArgs) {
    println!("shmgrpc bench: {} ({} cores), Linux {}", r.machine.cpu_model, r.machine.cores, r.machine.kernel);
    println!("plain tonic: {PLAIN_SETTINGS}");
    println!("every call writes its whole payload before the call; the receiver checksums all of it after");
    println!("(transport = call to response; e2e adds writing the payload and checking the reply)");
    println!(
        "{} client(s) in parallel; CPU is user+system seconds per cell; RSS is the peak during the cell\n",
        a.clients
    );
    println!(
        "{:<6} {:<7} {:>9} {:>6} {:>11} {:>11} {:>11} {:>10} {:>8} {:>8} {:>9} {:>9} {:>6}",
        "via",
        "op",
        "size",
        "calls",
        "median ms",
        "p99 ms",
        "e2e ms",
        "MB/s",
        "cli cpu",
        "srv cpu",
        "cli rss",
        "srv rss",
        "shm"
    );
    for c in &r.results {
        println!(
            "{:<6} {:<7} {:>9} {:>6} {:>11.3} {:>11.3} {:>11.3} {:>10.0} {:>8.2} {:>8.2} {:>9} {:>9} {:>6}",
            c.transport.name(),
            c.op,
            ByteSize(c.size).to_string(),
            c.iterations * c.clients,
            c.median_ns as f64 / 1e6,
            c.p99_ns as f64 / 1e6,
            c.e2e_median_ns as f64 / 1e6,
            c.bytes_per_sec / 1e6,
            c.client_cpu_s,
            c.server_cpu_s,
            ByteSize(c.client_peak_rss_bytes).to_string(),
            ByteSize(c.server_peak_rss_bytes).to_string(),
            c.shm_messages
        );
    }
    println!();
    for m in &r.memcpy {
        println!(
            "memcpy {:>9}: {:>11.3} ms (one copy, warm heap buffers)",
            ByteSize(m.size).to_string(),
            m.median_ns as f64 / 1e6
        );
    }
    println!();
    for c in r.results.iter().filter(|c| matches!(c.transport, Transport::Shm | Transport::Loan)) {
        let base = |t: Transport| {
            r.results
                .iter()
                .find(|b| b.transport == t && b.op == c.op && b.size == c.size)
                .map(|b| format!("{:.1}x", b.median_ns as f64 / c.median_ns as f64))
                .unwrap_or_else(|| "-".into())
        };
        println!(
            "{:<4} {:<6} {:>9}: speedup {:>7} over tcp, {:>7} over uds",
            c.transport.name(),
            c.op,
            ByteSize(c.size).to_string(),
            base(Transport::Tcp),
            base(Transport::Uds)
        );
    }
}
