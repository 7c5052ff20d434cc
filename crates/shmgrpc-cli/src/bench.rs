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
use shmgrpc_demo::BlobClient;

use crate::grpc::{Op, call_once, client};

#[derive(clap::Args)]
pub(crate) struct BenchArgs {
    /// Payload sizes.
    #[arg(long, value_delimiter = ',', default_value = "1KiB,64KiB,1MiB,20MiB,256MiB,1GiB")]
    sizes: Vec<ByteSize>,
    /// Transports: tcp (plain tonic, TCP loopback), uds (plain tonic, Unix socket), shm (shmgrpc, transparent),
    /// loan (shmgrpc, request payloads written into loans).
    #[arg(long, value_delimiter = ',', default_value = "tcp,uds,shm,loan")]
    transports: Vec<Transport>,
    /// Operations: echo (payload there and back), upload (payload there, small reply), and streams of `--messages`
    /// frames: download_stream, upload_stream, bidi (each frame echoed as it arrives).
    #[arg(long, value_delimiter = ',', default_value = "echo,upload,bidi")]
    ops: Vec<Op>,
    /// Frame sizes of the streaming operations.
    #[arg(long, value_delimiter = ',', default_value = "256KiB,4MiB")]
    stream_sizes: Vec<ByteSize>,
    /// Frames per call of the streaming operations.
    #[arg(long, default_value_t = 32)]
    messages: usize,
    /// Also measure cold starts: fresh client processes (`shmgrpc call`) against the running servers, timed from
    /// process start to the verified first reply: a 20 MiB echo, and a first stream of 30 x 4 MiB bidi frames.
    #[arg(long)]
    cold: bool,
    /// Fresh processes per transport and cold measurement.
    #[arg(long, default_value_t = 5)]
    cold_samples: usize,
    /// Serve tcp and uds from a server process of their own, with tonic's own codec and no shmgrpc layer. By
    /// default every transport talks to the same shmgrpc server process, tcp and uds through plain channels (which
    /// that server serves byte for byte as tonic would).
    #[arg(long)]
    plain_server: bool,
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
pub(crate) enum Transport {
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
        Op::DownloadStream => "download_stream",
        Op::UploadStream => "upload_stream",
        Op::Bidi => "bidi",
    }
}

/// A `shmgrpc serve` child process, stopped on drop.
struct Server {
    child: Child,
    addrs: Vec<String>,
}

impl Server {
    /// The address to reach it through a Unix socket, or else over TCP.
    fn addr(&self, unix: bool) -> anyhow::Result<&str> {
        self.addrs
            .iter()
            .find(|a| a.starts_with("unix:") == unix)
            .map(String::as_str)
            .with_context(|| format!("the server has no {} address", if unix { "Unix socket" } else { "TCP" }))
    }

    fn start(args: &[&str]) -> anyhow::Result<Server> {
        let mut child = Command::new(std::env::current_exe()?)
            .arg("serve")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting the server process")?;
        for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
            // The readiness line (`serve`'s only stdout line): JSON with the bound addresses.
            if let Ok(ready) = serde_json::from_str::<serde_json::Value>(&line?)
                && ready["event"] == "ready"
            {
                let addrs = ready["listen"]
                    .as_array()
                    .map(|a| a.iter().filter_map(|v| v.as_str().map(String::from)).collect())
                    .unwrap_or_default();
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
    /// Frames per call (1 for unary calls).
    messages: usize,
    /// A fresh client process per sample, timed from its start to its verified first reply.
    cold: bool,
    clients: usize,
    iterations: usize,
    median_ns: u64,
    p99_ns: u64,
    /// Only with at least 1 000 samples.
    p999_ns: Option<u64>,
    msgs_per_sec: f64,
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

/// Unmeasured calls per client before a group's measurements (one above 64 MiB per call, where glibc always maps
/// fresh memory anyway): the connection, the first pool buffers and mappings, and the allocator's adaptation to the
/// payload size (glibc serves the first large payloads with fresh `mmap`s and frees them with `munmap` inside the
/// call) are start-up costs, measured by `--cold` instead.
const WARM_UP: u32 = 3;

/// One (size, op) row group: every transport is measured for it, interleaved.
struct Group {
    op: Op,
    size: usize,
    messages: usize,
    iterations: usize,
}

/// One transport's clients and what was measured for it so far in a group.
struct Lane {
    transport: Transport,
    server_pid: u32,
    /// Each client with its channel, and whether it writes requests into loans.
    clients: Vec<(BlobClient<ShmChannel>, ShmChannel, bool)>,
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
/// (Only one lane runs at a time, so the process's CPU and RSS figures belong to it.)
async fn measure_block(lane: &mut Lane, g: &Group, n: usize, block: usize, bar: &ProgressBar) -> anyhow::Result<()> {
    let me = std::process::id();
    reset_peak_rss(me);
    reset_peak_rss(lane.server_pid);
    let (cpu_c0, cpu_s0) = (cpu_seconds(me), cpu_seconds(lane.server_pid));
    let shm_messages = |clients: &[(BlobClient<ShmChannel>, ShmChannel, bool)]| -> u64 {
        clients.iter().map(|(_, ch, _)| ch.stats()).map(|s| s.shm_sent + s.shm_received).sum()
    };
    let before = shm_messages(&lane.clients);
    let tasks: Vec<_> = std::mem::take(&mut lane.clients)
        .into_iter()
        .map(|(mut c, ch, loan)| {
            let (op, size, messages, bar) = (g.op, g.size, g.messages, bar.clone());
            tokio::spawn(async move {
                let mut out = Vec::with_capacity(n);
                for i in 0..n {
                    let seed = (block * 100_000 + i + 1) as u32;
                    let r = call_once(&mut c, &ch, loan.then_some(&ch), op, size, messages, seed).await?;
                    out.push((r.transport.as_nanos() as u64, r.end_to_end.as_nanos() as u64));
                    bar.inc(1);
                }
                anyhow::Ok((c, ch, loan, out))
            })
        })
        .collect();
    for t in tasks {
        let (c, ch, loan, out) = t.await??;
        lane.clients.push((c, ch, loan));
        for (a, b) in out {
            lane.acc.tr.push(a);
            lane.acc.e2e.push(b);
        }
    }
    let after = shm_messages(&lane.clients);
    lane.acc.client_cpu += cpu_seconds(me) - cpu_c0;
    lane.acc.server_cpu += cpu_seconds(lane.server_pid) - cpu_s0;
    lane.acc.client_rss = lane.acc.client_rss.max(peak_rss_bytes(me));
    lane.acc.server_rss = lane.acc.server_rss.max(peak_rss_bytes(lane.server_pid));
    lane.acc.shm_messages += after - before;
    Ok(())
}

pub(crate) async fn run(a: BenchArgs) -> anyhow::Result<()> {
    if a.clients == 0 {
        bail!("--clients must be at least 1");
    }
    let dir = tempfile::tempdir()?;
    let plain_sock = format!("unix:{}", dir.path().join("plain.sock").display());
    let shm_sock = format!("unix:{}", dir.path().join("shm.sock").display());
    let needs_plain = a.transports.iter().any(|t| matches!(t, Transport::Tcp | Transport::Uds));
    let needs_shm = a.transports.iter().any(|t| matches!(t, Transport::Shm | Transport::Loan));
    let plain = if needs_plain && a.plain_server {
        Some(Server::start(&["--plain", "--listen", "127.0.0.1:0", "--listen", &plain_sock])?)
    } else {
        None
    };
    let shm = if needs_shm || (needs_plain && !a.plain_server) {
        Some(Server::start(&["--listen", "127.0.0.1:0", "--listen", &shm_sock])?)
    } else {
        None
    };
    let servers = Servers { plain: plain.as_ref().or(shm.as_ref()), shm: shm.as_ref() };
    let m = machine();
    eprintln!(
        "shmgrpc bench on {} ({} cores, Linux {}): server pids {} (plain tonic) and {} (shmgrpc)",
        m.cpu_model,
        m.cores,
        m.kernel,
        plain.as_ref().map_or("-".into(), |s| s.pid().to_string()),
        shm.as_ref().map_or("-".into(), |s| s.pid().to_string())
    );

    if a.messages == 0 {
        bail!("--messages must be at least 1");
    }
    let mut groups = Vec::new();
    for (streams, sizes) in [(false, &a.sizes), (true, &a.stream_sizes)] {
        for size in sizes {
            let size = usize::try_from(size.as_u64())?;
            for &op in a.ops.iter().filter(|op| op.streams() == streams) {
                if op == Op::Download {
                    bail!("bench measures echo, upload and the streams");
                }
                let messages = if streams { a.messages } else { 1 };
                let iterations = a.iterations.unwrap_or_else(|| default_iterations((size * messages) as u64));
                groups.push(Group { op, size, messages, iterations });
            }
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
            let (server, target, plain_client) = servers.target(transport)?;
            let mut clients = Vec::new();
            for _ in 0..a.clients {
                let (mut c, ch) = client(target, plain_client).await?;
                if !plain_client && !ch.is_shared_memory() {
                    bail!("no shared-memory session with the shmgrpc server: {:?}", ch.fallback());
                }
                let loan = transport == Transport::Loan;
                let warm_up = if g.size * g.messages <= 64 << 20 { WARM_UP } else { 1 };
                for seed in 0..warm_up {
                    call_once(&mut c, &ch, loan.then_some(&ch), g.op, g.size, g.messages, seed).await?;
                }
                clients.push((c, ch, loan));
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
            let moved = (g.op.directions() * g.size * g.messages) as f64;
            results.push(CellResult {
                transport: lane.transport,
                op: op_name(g.op),
                size: g.size as u64,
                messages: g.messages,
                cold: false,
                clients: a.clients,
                iterations: g.iterations,
                median_ns: median,
                p99_ns: percentile(&tr, 0.99),
                p999_ns: (tr.len() >= 1000).then(|| percentile(&tr, 0.999)),
                msgs_per_sec: (g.messages * a.clients) as f64 / (median as f64 / 1e9),
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
    if a.cold {
        results.extend(cold_rows(&a, &servers)?);
    }
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

/// The running servers: `plain` serves tcp and uds (the shmgrpc server itself unless `--plain-server`).
struct Servers<'a> {
    plain: Option<&'a Server>,
    shm: Option<&'a Server>,
}

impl Servers<'_> {
    /// The server, address and whether the client is plain, for a transport.
    fn target(&self, t: Transport) -> anyhow::Result<(&Server, &str, bool)> {
        let (server, unix, plain) = match t {
            Transport::Tcp => (self.plain, false, true),
            Transport::Uds => (self.plain, true, true),
            Transport::Shm | Transport::Loan => (self.shm, true, false),
        };
        let server = server.context("server not started")?;
        Ok((server, server.addr(unix)?, plain))
    }
}

/// What the cold measurements run: (operation, frame size, frames).
const COLD: [(Op, usize, usize); 2] = [(Op::Echo, 20 << 20, 1), (Op::Bidi, 4 << 20, 30)];

/// Cold starts: for each transport, fresh `shmgrpc call` processes against the running servers, timed from the
/// spawn to the process's exit after its verified first reply. Transports take turns sample by sample.
fn cold_rows(a: &BenchArgs, servers: &Servers<'_>) -> anyhow::Result<Vec<CellResult>> {
    let exe = std::env::current_exe()?;
    let mut rows = Vec::new();
    for (op, size, messages) in COLD {
        let mut times: Vec<Vec<u64>> = vec![Vec::new(); a.transports.len()];
        for sample in 0..a.cold_samples.max(1) {
            let k = a.transports.len();
            for j in 0..k {
                let i = (j + sample) % k;
                let transport = a.transports[i];
                let (_, target, _) = servers.target(transport)?;
                let mut cmd = Command::new(&exe);
                cmd.args(["call", "--target", target, "--op", op_name(op)])
                    .args(["--size", &size.to_string(), "--messages", &messages.to_string()])
                    .args(["--repeat", "1", "--quiet"])
                    .stdin(Stdio::null())
                    .stderr(Stdio::null());
                match transport {
                    Transport::Tcp | Transport::Uds => cmd.arg("--plain"),
                    Transport::Loan => cmd.arg("--loan"),
                    Transport::Shm => &mut cmd,
                };
                let t0 = Instant::now();
                let out = cmd.output().context("starting a cold client")?;
                let ns = t0.elapsed().as_nanos() as u64;
                let text = String::from_utf8_lossy(&out.stdout);
                if !out.status.success() || !text.contains("checksum ok") {
                    bail!("a cold {} client failed: {text}", transport.name());
                }
                if matches!(transport, Transport::Shm | Transport::Loan) && !text.contains("request shm") {
                    bail!("a cold {} client got no shared-memory session: {text}", transport.name());
                }
                times[i].push(ns);
            }
        }
        for (i, mut t) in times.into_iter().enumerate() {
            t.sort_unstable();
            let median = percentile(&t, 0.5);
            rows.push(CellResult {
                transport: a.transports[i],
                op: op_name(op),
                size: size as u64,
                messages,
                cold: true,
                clients: 1,
                iterations: t.len(),
                median_ns: median,
                p99_ns: percentile(&t, 0.99),
                p999_ns: None,
                msgs_per_sec: messages as f64 / (median as f64 / 1e9),
                e2e_median_ns: median,
                bytes_per_sec: (op.directions() * size * messages) as f64 / (median as f64 / 1e9),
                client_cpu_s: 0.0,
                server_cpu_s: 0.0,
                client_peak_rss_bytes: 0,
                server_peak_rss_bytes: 0,
                shm_messages: 0,
            });
        }
    }
    Ok(rows)
}

/// (series name, [(size, median ms)]) for the plot.
fn report_series(r: &Report) -> Vec<(String, Vec<(f64, f64)>)> {
    let mut series: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    let mut add = |name: String, point: (f64, f64)| match series.iter_mut().find(|(n, _)| *n == name) {
        Some((_, pts)) => pts.push(point),
        None => series.push((name, vec![point])),
    };
    for c in r.results.iter().filter(|c| !c.cold) {
        let ms = |ns: u64| ns as f64 / 1e6;
        add(format!("{} {} median", c.transport.name(), c.op), (c.size as f64, ms(c.median_ns)));
        add(format!("{} {} p99", c.transport.name(), c.op), (c.size as f64, ms(c.p99_ns)));
        if let Some(p) = c.p999_ns {
            add(format!("{} {} p99.9", c.transport.name(), c.op), (c.size as f64, ms(p)));
        }
    }
    series.push(("memcpy".into(), r.memcpy.iter().map(|m| (m.size as f64, m.median_ns as f64 / 1e6)).collect()));
    series
}

fn print_table(r: &Report, a: &BenchArgs) {
    println!("shmgrpc bench: {} ({} cores), Linux {}", r.machine.cpu_model, r.machine.cores, r.machine.kernel);
    println!("plain tonic: {PLAIN_SETTINGS}");
    if a.plain_server {
        println!("tcp and uds: a plain tonic server process of their own (tonic's codec, no shmgrpc layer)");
    } else {
        println!("tcp and uds: plain tonic channels to the same server process as shm and loan");
    }
    println!("every call writes its whole payload before the call; the receiver checksums all of it after");
    println!("(transport = call to response, or to a stream's last frame, each frame checked as it arrives;");
    println!(" e2e adds writing the payload and checking the reply; p99.9 only with 1 000 calls or more)");
    println!(
        "{} client(s) in parallel; CPU is user+system seconds per cell; RSS is the peak during the cell (the client's \
         includes heap kept from the other transports of the row)\n",
        a.clients
    );
    println!(
        "{:<5} {:<15} {:>9} {:>5} {:>6} {:>10} {:>10} {:>10} {:>10} {:>9} {:>9} {:>7} {:>7} {:>9} {:>9} {:>5}",
        "via",
        "op",
        "size",
        "msgs",
        "calls",
        "median ms",
        "p99 ms",
        "p99.9 ms",
        "e2e ms",
        "MB/s",
        "msgs/s",
        "cli cpu",
        "srv cpu",
        "cli rss",
        "srv rss",
        "shm"
    );
    for c in r.results.iter().filter(|c| !c.cold) {
        println!(
            "{:<5} {:<15} {:>9} {:>5} {:>6} {:>10.3} {:>10.3} {:>10} {:>10.3} {:>9.0} {:>9.0} {:>7.2} {:>7.2} {:>9} {:>9} {:>5}",
            c.transport.name(),
            c.op,
            ByteSize(c.size).to_string(),
            c.messages,
            c.iterations * c.clients,
            c.median_ns as f64 / 1e6,
            c.p99_ns as f64 / 1e6,
            c.p999_ns.map_or_else(|| "-".to_string(), |p| format!("{:.3}", p as f64 / 1e6)),
            c.e2e_median_ns as f64 / 1e6,
            c.bytes_per_sec / 1e6,
            c.msgs_per_sec,
            c.client_cpu_s,
            c.server_cpu_s,
            ByteSize(c.client_peak_rss_bytes).to_string(),
            ByteSize(c.server_peak_rss_bytes).to_string(),
            c.shm_messages
        );
    }
    if r.results.iter().any(|c| c.cold) {
        println!("\ncold starts: a fresh client process per sample, from its start to its verified first reply");
        println!(
            "{:<5} {:<15} {:>9} {:>5} {:>8} {:>10} {:>10}",
            "via", "op", "size", "msgs", "samples", "median ms", "p99 ms"
        );
        for c in r.results.iter().filter(|c| c.cold) {
            println!(
                "{:<5} {:<15} {:>9} {:>5} {:>8} {:>10.3} {:>10.3}",
                c.transport.name(),
                c.op,
                ByteSize(c.size).to_string(),
                c.messages,
                c.iterations,
                c.median_ns as f64 / 1e6,
                c.p99_ns as f64 / 1e6
            );
        }
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
                .find(|b| b.transport == t && b.op == c.op && b.size == c.size && b.cold == c.cold)
                .map(|b| format!("{:.1}x", b.median_ns as f64 / c.median_ns as f64))
                .unwrap_or_else(|| "-".into())
        };
        println!(
            "{:<4} {:<15} {:>9}{}: speedup {:>7} over tcp, {:>7} over uds",
            c.transport.name(),
            c.op,
            ByteSize(c.size).to_string(),
            if c.cold { " cold" } else { "" },
            base(Transport::Tcp),
            base(Transport::Uds)
        );
    }
}
