//! `shmgrpc._core`: the Rust session layer ([`shmgrpc::embed`]) as a Python extension module, for the Python
//! package's grpcio channel and server (`python/src/shmgrpc`).
//!
//! Python keeps what must be Python (grpcio's wrappers, serializer hooks, asyncio glue); everything of the protocol
//! is here: discovery answers and the handshake, sessions on the one `shmgrpc-io` thread, the pool, references,
//! holds and releases, the window, the caps, statistics. Every payload copy and every wait runs with the GIL
//! released ([`Python::detach`]). Loans and received pieces export their memory through the buffer protocol, so
//! numpy, `memoryview` and protobuf read and write them in place; the memory (and the peer's hold on it) lives as
//! long as any export does.

mod codec;

use std::ffi::c_int;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use pyo3::buffer::PyBuffer;
use pyo3::create_exception;
use pyo3::exceptions::{PyBufferError, PyException, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyTuple};
use shmgrpc::embed::{self, ClientCore, CoreSession, Resolution, Sending, ServerCore};
use shmgrpc::protocol::{CALL_HEADER, SESSION_HEADER};
use shmgrpc::{ClientConfig, Fallback, PoolConfig, ServerConfig, TransferStats};

create_exception!(_core, StatusError, PyException, "A gRPC status: `args` are the code (an int) and the message.");
create_exception!(_core, NoSession, PyException, "No session: `args[0]` is the fallback reason's label.");

fn status_error(s: tonic::Status) -> PyErr {
    StatusError::new_err((s.code() as i32, s.message().to_string()))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Applies the options both ends share to a `ClientConfig` or `ServerConfig` (which have the same builder methods
/// for them); the `?` of a bad `window_wait` returns from the calling function.
macro_rules! send_options {
    ($config:expr, $threshold:expr, $budget:expr, $window:expr, $window_wait:expr, $version:expr) => {{
        let mut config = $config.threshold($threshold).pool_config(pool_config($budget));
        if let Some(w) = $window {
            config = config.window(w);
        }
        if let Some(w) = $window_wait {
            let wait = Duration::try_from_secs_f64(w).map_err(|e| PyValueError::new_err(e.to_string()))?;
            config = config.window_wait(wait);
        }
        if let Some(v) = $version {
            config = config.protocol_version(v);
        }
        config
    }};
}

/// The pool configuration of a budget (the default's when none is given).
fn pool_config(budget: Option<u64>) -> PoolConfig {
    match budget {
        Some(b) => PoolConfig::default().budget(b),
        None => PoolConfig::default(),
    }
}

fn stats_dict<'py>(py: Python<'py>, s: &TransferStats) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    for (k, v) in [
        ("shm_sent", s.shm_sent),
        ("shm_sent_bytes", s.shm_sent_bytes),
        ("shm_received", s.shm_received),
        ("shm_received_bytes", s.shm_received_bytes),
        ("inline_sent", s.inline_sent),
        ("inline_sent_bytes", s.inline_sent_bytes),
        ("inline_received", s.inline_received),
        ("inline_received_bytes", s.inline_received_bytes),
        ("bad_references", s.bad_references),
        ("bad_releases", s.bad_releases),
        ("peer_refusals", s.peer_refusals),
        ("window_waits", s.window_waits),
        ("pool_waits", s.pool_waits),
        ("lost_in_flight", s.lost_in_flight),
    ] {
        d.set_item(k, v)?;
    }
    let f = PyDict::new(py);
    for reason in Fallback::ALL {
        f.set_item(reason.label(), s.fallback(reason))?;
    }
    d.set_item("fallbacks", f)?;
    Ok(d)
}

fn session_stats_dict<'py>(py: Python<'py>, s: &shmgrpc::SessionStats) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("sessions", s.sessions)?;
    d.set_item("peer_segments", s.peer_segments)?;
    d.set_item("peer_bytes", s.peer_bytes)?;
    d.set_item("shared_segments", s.shared_segments)?;
    d.set_item("holds", s.holds)?;
    d.set_item("held_bytes", s.held_bytes)?;
    d.set_item("sent_back", s.sent_back)?;
    Ok(d)
}

fn pool_stats_dict<'py>(py: Python<'py>, pool: &shmgrpc::Pool) -> PyResult<Bound<'py, PyDict>> {
    let s = pool.stats();
    let d = PyDict::new(py);
    for (k, v) in [
        ("budget", s.budget),
        ("bytes", s.bytes),
        ("in_use_bytes", s.in_use_bytes),
        ("allocs", s.allocs),
        ("grows", s.grows),
        ("waits", s.waits),
        ("exhausted", s.exhausted),
        ("evictions", s.evictions),
        ("trimmed_bytes", s.trimmed_bytes),
    ] {
        d.set_item(k, v)?;
    }
    d.set_item("buffers", s.classes.iter().map(|c| c.total).sum::<usize>())?;
    Ok(d)
}

fn fallback_of(label: &str) -> PyResult<Fallback> {
    Fallback::ALL
        .into_iter()
        .find(|f| f.label() == label)
        .ok_or_else(|| PyValueError::new_err(format!("unknown fallback reason {label:?}")))
}

/// Counters of one channel or server (and the process's).
#[pyclass(frozen, module = "shmgrpc._core")]
struct Counters(embed::Counters);

#[pymethods]
impl Counters {
    /// One message sent inline, of `n` bytes; `fallback` (a reason's label) says why when it was meant for shared
    /// memory.
    #[pyo3(signature = (n, fallback=None))]
    fn inline_sent(&self, n: usize, fallback: Option<&str>) -> PyResult<()> {
        let reason = fallback.map(fallback_of).transpose()?;
        self.0.inline_sent(n, reason);
        Ok(())
    }

    /// One message received inline, of `n` bytes.
    fn inline_received(&self, n: usize) {
        self.0.inline_received(n);
    }

    /// A message that could not be decoded.
    fn bad_reference(&self) {
        self.0.bad_reference();
    }

    /// The counters, as a dict (`shm_sent`, ..., `fallbacks`: label to count).
    fn snapshot<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        stats_dict(py, &self.0.snapshot())
    }
}

/// The process-wide counters.
#[pyfunction]
fn stats(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    stats_dict(py, &shmgrpc::stats::snapshot())
}

/// A client channel's side of the session layer.
#[pyclass(frozen, module = "shmgrpc._core")]
struct Client(ClientCore);

#[pymethods]
impl Client {
    /// A client with its pool (`budget` bytes, default 4 GiB or half the cgroup's memory limit), threshold, window
    /// and highest protocol version.
    #[new]
    #[pyo3(signature = (*, threshold, budget=None, window=None, window_wait=None, protocol_version=None))]
    fn new(
        threshold: usize,
        budget: Option<u64>,
        window: Option<u64>,
        window_wait: Option<f64>,
        protocol_version: Option<u32>,
    ) -> PyResult<Self> {
        let config = ClientConfig::default();
        let config = send_options!(config, threshold, budget, window, window_wait, protocol_version);
        ClientCore::new(config).map(Client).map_err(|e| PyValueError::new_err(e.to_string()))
    }

    /// The encoded `HelloRequest` for `/shmgrpc.v1.Session/Hello`.
    fn hello_request<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.0.hello_request())
    }

    /// The fallback label for a discovery call that failed with status code `code`.
    #[staticmethod]
    fn discovery_failed(code: i32) -> &'static str {
        ClientCore::discovery_failed(tonic::Code::from_i32(code)).label()
    }

    /// Joins the session offered by the encoded `HelloResponse` `hello` (the handshake runs on the I/O thread; this
    /// thread waits without the GIL, at most 5 s). Raises `NoSession(label)` when there is none.
    #[pyo3(signature = (hello, unix=None))]
    fn join(&self, py: Python<'_>, hello: &[u8], unix: Option<PathBuf>) -> PyResult<Session> {
        let joined = py.detach(|| self.0.join(hello, unix.as_deref()));
        joined.map(Session).map_err(|reason| NoSession::new_err(reason.label()))
    }

    /// Resolves a response that is a reference; with `wait`, one that overtook its registration waits for it
    /// (without the GIL, at most 2 s). Raises `StatusError`.
    #[pyo3(signature = (data, wait=true))]
    fn receive(&self, py: Python<'_>, data: &[u8], wait: bool) -> PyResult<Received> {
        let r = py.detach(|| self.0.receive(data, wait)).map_err(status_error)?;
        Ok(Received::new(r))
    }

    /// Whether resolving this reference would wait for a registration.
    fn needs_wait(&self, data: &[u8]) -> bool {
        self.0.needs_wait(data)
    }

    /// This client's counters.
    fn counters(&self) -> Counters {
        Counters(self.0.counters())
    }

    /// Messages from this size up are meant for shared memory.
    #[getter]
    fn threshold(&self) -> usize {
        self.0.threshold()
    }

    /// The pool's figures.
    fn pool_stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        pool_stats_dict(py, self.0.pool())
    }

    /// Gives the pool's idle buffers back to the system.
    fn trim(&self) {
        self.0.pool().trim();
    }
}

/// A server's side of the session layer: the side channel and its sessions. `close()` removes the socket and
/// ends every session.
/// A call's session and numbered call (see `Server.session_of`).
type CallOf = (Option<Py<Session>>, Option<Py<Call>>);

/// A call's scope, shared by its `Call` objects and the thread serving it (no Python object is made for the scope
/// of a call made in Rust).
pub(crate) type Scope = Arc<embed::CallScope>;

#[pyclass(frozen, module = "shmgrpc._core")]
struct Server {
    core: Mutex<Option<ServerCore>>,
    path: String,
    counters: embed::Counters,
}

impl Server {
    fn with<R>(&self, f: impl FnOnce(&ServerCore) -> R) -> PyResult<R> {
        lock(&self.core).as_ref().map(f).ok_or_else(|| PyValueError::new_err("the shmgrpc server is closed"))
    }

    /// `session_of`, with the session and the call's scope as Rust handles (the thread serving the call shares
    /// them; Python objects are made only when Python asks for them).
    fn call_of(&self, metadata: &Bound<'_, PyAny>) -> PyResult<(Option<CoreSession>, Option<Scope>)> {
        let mut header = None;
        let mut number = None;
        if !metadata.is_none() {
            for item in metadata.try_iter()? {
                let item = item?;
                let key = item.get_item(0)?;
                let Ok(key) = key.cast::<pyo3::types::PyString>() else { continue };
                let key = key.to_cow()?;
                if key == SESSION_HEADER {
                    header = Some(text(&item.get_item(1)?)?);
                } else if key == CALL_HEADER {
                    number = Some(text(&item.get_item(1)?)?);
                }
            }
        }
        let Some(header) = header else { return Ok((None, None)) };
        let Some((session, number)) = self.with(|c| c.session(&header, number.as_deref()))? else {
            return Ok((None, None));
        };
        let call = number.and_then(|n| session.call(Some(n))).map(Arc::new);
        Ok((Some(session), call))
    }
}

#[pymethods]
impl Server {
    /// Binds the side channel (`side_channel`: a path, `@name` for an abstract socket, or a fresh path in the
    /// temporary directory) for `allowed_uids` (default: the server's own uid and root; a list replaces that set).
    #[new]
    #[pyo3(signature = (*, threshold, side_channel=None, allowed_uids=None, budget=None, window=None,
                        window_wait=None, protocol_version=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        threshold: usize,
        side_channel: Option<PathBuf>,
        allowed_uids: Option<Vec<u32>>,
        budget: Option<u64>,
        window: Option<u64>,
        window_wait: Option<f64>,
        protocol_version: Option<u32>,
    ) -> PyResult<Self> {
        let mut config = ServerConfig::default();
        if let Some(p) = side_channel {
            config = config.side_channel(p);
        }
        if let Some(uids) = allowed_uids {
            config = config.allowed_uids(uids);
        }
        let config = send_options!(config, threshold, budget, window, window_wait, protocol_version);
        let core = ServerCore::new(config).map_err(|e| PyValueError::new_err(e.to_string()))?;
        let path = core.server().side_channel_path().to_string_lossy().into_owned();
        let counters = core.counters();
        Ok(Server { core: Mutex::new(Some(core)), path, counters })
    }

    /// The side channel's path (`@name` for an abstract socket).
    #[getter]
    fn side_channel_path(&self) -> &str {
        &self.path
    }

    /// The encoded `HelloResponse` for the encoded `HelloRequest` `request`. Raises `StatusError`.
    fn answer_hello<'py>(&self, py: Python<'py>, request: &[u8]) -> PyResult<Bound<'py, PyBytes>> {
        let answer = self.with(|c| c.answer_hello(request))?.map_err(status_error)?;
        Ok(PyBytes::new(py, &answer))
    }

    /// A call's session and call from its metadata (grpcio's `(key, value)` pairs): the live session its
    /// `shmgrpc-session` header names, and in a session that numbers calls (protocol version 3 and later) the
    /// scope of the call its headers number (our responses are the call's numbered messages; end the scope when
    /// the call ends). `(None, None)` for a plain call.
    fn session_of(&self, py: Python<'_>, metadata: &Bound<'_, PyAny>) -> PyResult<CallOf> {
        let (session, call) = self.call_of(metadata)?;
        Ok((session.map(|s| Py::new(py, Session(s))).transpose()?, call.map(|c| Py::new(py, Call(c))).transpose()?))
    }

    /// Enters a call on this thread (see `session_of`): its response serializer sends through the call's session
    /// (it runs on this thread after the handler returns, and while a response iterator is consumed, so the call
    /// stays this thread's until the next one). A unary request counts as read to its end, and `None` is returned;
    /// for a request stream, the call's scope, to end when the call ends (`None` for a call that is not numbered).
    fn enter(&self, py: Python<'_>, metadata: &Bound<'_, PyAny>, unary: bool) -> PyResult<Option<Py<Call>>> {
        let (session, call) = self.call_of(metadata)?;
        if unary {
            if let Some(c) = &call {
                c.received();
                c.complete();
            }
            codec::serve(session, call);
            return Ok(None);
        }
        codec::serve(session, call.clone());
        call.map(|c| Py::new(py, Call(c))).transpose()
    }

    /// Resolves a request that is a reference (see `Client.receive`).
    #[pyo3(signature = (data, wait=true))]
    fn receive(&self, py: Python<'_>, data: &[u8], wait: bool) -> PyResult<Received> {
        // Server sessions are process-wide (the registry): resolving needs no server, only its side.
        let r = py.detach(|| embed::receive_request(data, wait)).map_err(status_error)?;
        Ok(Received::new(r))
    }

    /// Whether resolving this request would wait for a registration.
    fn needs_wait(&self, data: &[u8]) -> bool {
        embed::request_needs_wait(data)
    }

    /// This server's counters.
    fn counters(&self) -> Counters {
        Counters(self.counters.clone())
    }

    /// Sessions currently open.
    fn sessions(&self) -> PyResult<usize> {
        self.with(|c| c.server().sessions())
    }

    /// Figures summed over the open sessions.
    fn session_stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.with(|c| c.server().session_stats())?;
        session_stats_dict(py, &s)
    }

    /// The pool's figures.
    fn pool_stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let core = lock(&self.core);
        let c = core.as_ref().ok_or_else(|| PyValueError::new_err("the shmgrpc server is closed"))?;
        pool_stats_dict(py, c.server().pool())
    }

    /// Removes the side channel and ends every session (idempotent).
    fn close(&self, py: Python<'_>) {
        let core = lock(&self.core).take();
        py.detach(move || drop(core));
    }
}

/// One end of a session.
#[pyclass(frozen, module = "shmgrpc._core")]
pub(crate) struct Session(pub(crate) CoreSession);

#[pymethods]
impl Session {
    /// The session id in lowercase hex: the `shmgrpc-session` header value of a call that is not numbered.
    #[getter]
    fn header(&self) -> &str {
        self.0.header()
    }

    /// The metadata that puts a call numbered `number` (or an unnumbered one) in this session: one header from
    /// protocol version 4 on, two in version 3 (see docs/protocol.md §6).
    #[pyo3(signature = (number=None))]
    fn headers<'py>(&self, py: Python<'py>, number: Option<u64>) -> PyResult<Bound<'py, PyTuple>> {
        let mut items = Vec::with_capacity(2);
        codec::push_call_headers(py, &self.0, number, &mut items)?;
        PyTuple::new(py, items)
    }

    /// Whether the session is open.
    #[getter]
    fn alive(&self) -> bool {
        self.0.is_alive()
    }

    /// The protocol version agreed on.
    #[getter]
    fn version(&self) -> u32 {
        self.0.version()
    }

    /// Messages from this size up are meant for shared memory.
    #[getter]
    fn threshold(&self) -> usize {
        self.0.threshold()
    }

    /// Figures of this session (`holds`, `peer_segments`, ...).
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        session_stats_dict(py, &self.0.stats())
    }

    /// Ends the session: the peer's holds come back, its mappings go.
    fn close(&self) {
        self.0.close();
    }

    /// A buffer of `n` bytes to write a payload into and send without a copy (ordinary memory when the pool has no
    /// room or the session is closed).
    fn loan(&self, py: Python<'_>, n: usize) -> Loan {
        Loan::new(py.detach(|| self.0.loan(n + LOAN_HEADROOM)), LOAN_HEADROOM)
    }

    /// Encodes the serialized message `items` (buffers, `Loan`s and `Piece`s, concatenated) for the peer: returns
    /// the bytes to send (the reference, or the message itself inline: counted, with its reason), or a `Waiting`
    /// when it must wait for the peer first. Copies run without the GIL. A loan counts as sent either way.
    fn send(&self, py: Python<'_>, items: Vec<Bound<'_, PyAny>>) -> PyResult<Py<PyAny>> {
        send_items(py, items, self.0.threshold(), |slices| self.0.send(slices))
    }

    /// The scope of one call when the session numbers calls (protocol version 3), else `None`: a client passes
    /// no number (a new one is taken: send it in the `shmgrpc-call` header), a server the header's.
    #[pyo3(signature = (number=None))]
    fn call(&self, number: Option<u64>) -> Option<Call> {
        self.0.call(number).map(|c| Call(Arc::new(c)))
    }

    /// The scope of a new call of a client whose one request is encoded before the call starts (grpcio's
    /// unary-unary and unary-stream calls, blocking or asyncio), else `None` as `call`: it stays out of the
    /// session's ledger of open calls (see `shmgrpc::embed::CoreSession::unary_call`).
    fn unary_call(&self) -> Option<Call> {
        self.0.unary_call().map(|c| Call(Arc::new(c)))
    }
}

/// One call of a session that numbers calls: see `shmgrpc::embed::CallScope`.
#[pyclass(frozen, module = "shmgrpc._core")]
pub(crate) struct Call(pub(crate) Scope);

#[pymethods]
impl Call {
    /// The call's number (the `shmgrpc-call` header's value).
    #[getter]
    fn number(&self) -> u64 {
        self.0.number()
    }

    /// Sends our next message on the call (as `Session.send`, numbered).
    fn send(&self, py: Python<'_>, items: Vec<Bound<'_, PyAny>>) -> PyResult<Py<PyAny>> {
        send_items(py, items, self.0.threshold(), |slices| self.0.send(slices))
    }

    /// One more message of the peer's was decoded on this call.
    fn received(&self) {
        self.0.received();
    }

    /// The peer's stream was read to its end.
    fn complete(&self) {
        self.0.complete();
    }

    /// The call is over on our side: if we stopped reading the peer's stream early, the peer learns how many of
    /// its messages we read (`CallEnd`). Once; never blocks.
    fn end(&self) {
        self.0.end();
    }
}

/// Encodes `items` with `send` (see `Session.send`). A message below `threshold` goes inline without a copy, so the
/// GIL is released only for messages that may be copied into shared memory.
fn send_items(
    py: Python<'_>,
    items: Vec<Bound<'_, PyAny>>,
    threshold: usize,
    send: impl FnOnce(&[&[u8]]) -> Sending + Send,
) -> PyResult<Py<PyAny>> {
    let mut kept: Vec<Bytes> = Vec::new();
    let mut buffers: Vec<PyBuffer<u8>> = Vec::new();
    enum Src {
        Kept(usize),
        Buffer(usize),
    }
    let mut order = Vec::with_capacity(items.len());
    // A loaned message (its head, then the loan): the head goes into the loan's headroom, and the message is
    // one region of the loan.
    let mut rest: &[Bound<'_, PyAny>] = &items;
    if let [head, loan] = &items[..]
        && let (Ok(head), Ok(loan)) = (head.cast::<PyBytes>(), loan.cast::<Loan>())
        && head.as_bytes().len() <= loan.get().headroom
    {
        kept.push(loan.get().freeze(Some(head.as_bytes()))?);
        order.push(Src::Kept(0));
        rest = &[];
    }
    for item in rest {
        if let Ok(loan) = item.cast::<Loan>() {
            kept.push(loan.get().freeze(None)?);
            order.push(Src::Kept(kept.len() - 1));
        } else if let Ok(piece) = item.cast::<Piece>() {
            kept.push(piece.get().0.clone());
            order.push(Src::Kept(kept.len() - 1));
        } else {
            let b = PyBuffer::<u8>::get(item)?;
            if !b.is_c_contiguous() {
                return Err(PyBufferError::new_err("a message slice must be C-contiguous bytes"));
            }
            buffers.push(b);
            order.push(Src::Buffer(buffers.len() - 1));
        }
    }
    let slices: Vec<&[u8]> = order
        .iter()
        .map(|s| match *s {
            Src::Kept(i) => &kept[i][..],
            // SAFETY: the buffer is C-contiguous (checked above) and stays exported (so its memory stays
            // valid) until `buffers` is dropped at the end of this function, after the last use of the
            // slice. Its exporter may let another thread write the memory meanwhile (a `bytearray` changed
            // while the GIL is released): the bytes sent are then some mix of old and new, as with any C
            // extension that copies without the GIL; nothing here depends on their value.
            Src::Buffer(i) => unsafe {
                std::slice::from_raw_parts(buffers[i].buf_ptr() as *const u8, buffers[i].len_bytes())
            },
        })
        .collect();
    let total: usize = slices.iter().map(|s| s.len()).sum();
    let sending = if total < threshold { send(&slices) } else { py.detach(|| send(&slices)) };
    let out = match sending {
        Sending::Reference(r) => PyBytes::new(py, &r).into_any().unbind(),
        Sending::Inline(_) => match (&items[..], &order[..]) {
            // One `bytes` object: it is the message.
            ([one], [Src::Buffer(_)]) if one.is_exact_instance_of::<PyBytes>() => one.clone().unbind(),
            _ => {
                let len = slices.iter().map(|s| s.len()).sum();
                PyBytes::new_with(py, len, |out| {
                    py.detach(|| concat_into(out, &slices));
                    Ok(())
                })?
                .into_any()
                .unbind()
            }
        },
        Sending::Waiting(w) => Py::new(py, Waiting(Mutex::new(Some(w))))?.into_any(),
    };
    drop(slices);
    drop(buffers);
    Ok(out)
}

/// A message in shared memory waiting for the peer (a new segment's registration, a full window).
#[pyclass(frozen, module = "shmgrpc._core")]
struct Waiting(Mutex<Option<embed::Waiting>>);

fn resolution(py: Python<'_>, r: Resolution) -> (Bound<'_, PyBytes>, bool) {
    match r {
        Resolution::Reference(b) => (PyBytes::new(py, &b), true),
        Resolution::Inline(b, _) => (PyBytes::new(py, &b), false),
    }
}

#[pymethods]
impl Waiting {
    /// Blocks (without the GIL; at most 2 s for a registration, the window wait for the window) until the peer
    /// answered: `(reference, True)`, or `(message, False)` to send inline.
    fn wait<'py>(&self, py: Python<'py>) -> PyResult<(Bound<'py, PyBytes>, bool)> {
        let w = lock(&self.0).take().ok_or_else(|| PyValueError::new_err("already resolved"))?;
        let r = py.detach(move || w.wait());
        Ok(resolution(py, r))
    }

    /// Without waiting, for a caller that must not wait (an event loop's thread): as `wait` would answer now, the
    /// message inline if the peer has not answered yet.
    fn now<'py>(&self, py: Python<'py>) -> PyResult<(Bound<'py, PyBytes>, bool)> {
        let w = lock(&self.0).take().ok_or_else(|| PyValueError::new_err("already resolved"))?;
        Ok(resolution(py, w.now()))
    }

    /// Without waiting: the resolution as `wait` gives it once the peer answered, `None` before.
    fn poll<'py>(&self, py: Python<'py>) -> PyResult<Option<(Bound<'py, PyBytes>, bool)>> {
        let mut guard = lock(&self.0);
        let w = guard.as_mut().ok_or_else(|| PyValueError::new_err("already resolved"))?;
        let r = w.poll();
        if r.is_some() {
            *guard = None;
        }
        Ok(r.map(|r| resolution(py, r)))
    }
}

/// Fills `view` with `len` bytes at `ptr`, exported by `obj` (which keeps them alive).
///
/// # Safety
///
/// `view` must be the pointer Python passed to `__getbuffer__`; `ptr..ptr + len` must stay valid (and, unless
/// `readonly`, writable) for as long as `obj` lives.
unsafe fn fill(
    view: *mut ffi::Py_buffer,
    obj: Bound<'_, PyAny>,
    ptr: *mut u8,
    len: usize,
    readonly: bool,
    flags: c_int,
) -> PyResult<()> {
    if view.is_null() {
        return Err(PyBufferError::new_err("no view to fill"));
    }
    let len = ffi::Py_ssize_t::try_from(len).map_err(|_| PyBufferError::new_err("buffer too large"))?;
    // SAFETY: `view` is Python's, non-null; `obj` owns the memory for as long as the view holds its reference
    // (PyBuffer_FillInfo takes one), which the caller promises covers `ptr..ptr + len`. PyBuffer_FillInfo refuses
    // a writable request for read-only memory.
    let rc = unsafe { ffi::PyBuffer_FillInfo(view, obj.as_ptr(), ptr.cast(), len, c_int::from(readonly), flags) };
    if rc == -1 { Err(PyErr::fetch(obj.py())) } else { Ok(()) }
}

/// A piece of a received message (or of a field in it): read-only bytes in the peer's memory, exported through the
/// buffer protocol (`memoryview(piece)`, `np.frombuffer(piece, dtype)`) without a copy. The peer's buffer stays
/// held while the piece or any export of it lives.
#[pyclass(frozen, module = "shmgrpc._core")]
struct Piece(Bytes);

#[pymethods]
impl Piece {
    fn __len__(&self) -> usize {
        self.0.len()
    }

    /// The piece's address (for tests that check a view points into the mapping).
    #[getter]
    fn address(&self) -> usize {
        self.0.as_ptr() as usize
    }

    /// Whether the piece lies in shared memory of a live session.
    #[getter]
    fn shared(&self) -> bool {
        shmgrpc::is_shared(&self.0)
    }

    /// A copy as `bytes` (made without the GIL).
    fn tobytes<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        copy_out(py, std::slice::from_ref(&self.0))
    }

    unsafe fn __getbuffer__(slf: Bound<'_, Self>, view: *mut ffi::Py_buffer, flags: c_int) -> PyResult<()> {
        let (ptr, len) = (slf.get().0.as_ptr().cast_mut(), slf.get().0.len());
        // SAFETY: the bytes are immutable and owned by the piece, which the view keeps alive; exported read-only.
        unsafe { fill(view, slf.into_any(), ptr, len, true, flags) }
    }

    unsafe fn __releasebuffer__(&self, _view: *mut ffi::Py_buffer) {}
}

/// Concatenates `parts` into a new `bytes` object, copying without the GIL.
fn copy_out<'py>(py: Python<'py>, parts: &[Bytes]) -> PyResult<Bound<'py, PyBytes>> {
    let len = parts.iter().map(Bytes::len).sum();
    PyBytes::new_with(py, len, |out| {
        py.detach(|| concat_into(out, parts));
        Ok(())
    })
}

/// Writes `parts` one after the other into `out`, whose length is their total (large parts are copied by several
/// threads, `shmgrpc::copy`).
fn concat_into<T: AsRef<[u8]>>(out: &mut [u8], parts: &[T]) {
    let mut at = 0;
    for p in parts {
        let p = p.as_ref();
        shmgrpc::copy::copy(&mut out[at..at + p.len()], p);
        at += p.len();
    }
}

/// A resolved reference: the message's pieces in order. `release()` (or dropping it) lets the peer reuse what no
/// piece handed out still holds.
#[pyclass(frozen, module = "shmgrpc._core")]
struct Received(Mutex<Option<embed::Received>>);

impl Received {
    fn new(r: embed::Received) -> Self {
        Received(Mutex::new(Some(r)))
    }

    fn parts(&self) -> PyResult<Vec<Bytes>> {
        lock(&self.0)
            .as_ref()
            .map(|r| r.parts().to_vec())
            .ok_or_else(|| PyValueError::new_err("the message was released"))
    }
}

#[pymethods]
impl Received {
    fn __len__(&self) -> PyResult<usize> {
        Ok(self.parts()?.iter().map(Bytes::len).sum())
    }

    /// The pieces, in order.
    fn pieces(&self) -> PyResult<Vec<Piece>> {
        Ok(self.parts()?.into_iter().map(Piece).collect())
    }

    /// The message as one `bytes` object (a copy, made without the GIL).
    fn join<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        copy_out(py, &self.parts()?)
    }

    /// Whether every boundary between pieces falls between two top-level fields of the message: then parsing the
    /// first piece and merging the others in order gives the message (protobuf's merge of concatenated encodings),
    /// without joining them.
    fn aligned(&self) -> PyResult<bool> {
        Ok(embed::aligned(&self.parts()?))
    }

    /// Raises `StatusError(DATA_LOSS)` if the peer shrank a segment while the message was read.
    fn check(&self) -> PyResult<()> {
        match lock(&self.0).as_ref() {
            Some(r) => r.check().map_err(status_error),
            None => Ok(()),
        }
    }

    /// The one top-level length-delimited field `number` when its content lies in one piece: `(content, rest)`, the
    /// content as a `Piece` (in place) and every other field's encoding as `bytes`. `None` when the field is
    /// absent, repeated, split across pieces, or the message does not parse as protobuf.
    fn split_field<'py>(&self, py: Python<'py>, number: u32) -> PyResult<Option<(Piece, Bound<'py, PyBytes>)>> {
        let parts = self.parts()?;
        Ok(embed::split_field(&parts, number).map(|(field, rest)| (Piece(field), PyBytes::new(py, &rest))))
    }

    /// Lets the peer reuse its buffers, except what pieces handed out still hold (idempotent).
    fn release(&self, py: Python<'_>) {
        let r = lock(&self.0).take();
        py.detach(move || drop(r));
    }
}

/// What a loan holds: the buffer until it is sent; then the `Bytes` that were sent (the same memory) only while
/// exports of it live, so that a sent loan's buffer goes back to the pool once the peer is done with it.
enum LoanState {
    Open(shmgrpc::Loan),
    Sent(Option<Bytes>),
    Released,
}

/// A buffer to write a payload into and send without a copy: writable through the buffer protocol
/// (`memoryview(loan)[:] = data`, `np.ndarray(shape, dtype, buffer=loan)`). Sent once; `release()` gives an unsent
/// loan back. Its memory lives as long as the loan or any export of it does.
#[pyclass(frozen, module = "shmgrpc._core")]
struct Loan {
    state: Mutex<LoanState>,
    /// The payload's address and length, fixed for the loan's life (sending does not move it).
    addr: usize,
    len: usize,
    /// Bytes of the buffer before the payload: the message's other fields and the field's key and length are
    /// written there when it is sent, so that the whole message is one region (the receiver parses it in place).
    headroom: usize,
    shared: bool,
    exports: AtomicUsize,
}

/// Headroom of a session's loans (see [`Loan::headroom`]).
const LOAN_HEADROOM: usize = 64;

impl Loan {
    /// A loan whose payload starts `headroom` bytes into `loan`.
    fn new(mut loan: shmgrpc::Loan, headroom: usize) -> Loan {
        let headroom = headroom.min(loan.len());
        let (base, total, shared) = (loan.as_mut_ptr() as usize, loan.len(), loan.is_shared());
        Loan {
            state: Mutex::new(LoanState::Open(loan)),
            addr: base + headroom,
            len: total - headroom,
            headroom,
            shared,
            exports: AtomicUsize::new(0),
        }
    }

    /// The `Bytes` to send: the payload, frozen, preceded by `head` when it fits the headroom (written there
    /// first). The loan keeps them only while exports live.
    fn freeze(&self, head: Option<&[u8]>) -> PyResult<Bytes> {
        let mut state = lock(&self.state);
        match std::mem::replace(&mut *state, LoanState::Released) {
            LoanState::Open(mut loan) => {
                let k = head.filter(|h| h.len() <= self.headroom).map_or(0, |h| {
                    loan[self.headroom - h.len()..self.headroom].copy_from_slice(h);
                    h.len()
                });
                let whole = loan.freeze();
                if whole.as_ptr() as usize + self.headroom != self.addr {
                    *state = LoanState::Released;
                    return Err(PyValueError::new_err("the loan's memory moved"));
                }
                let bytes = whole.slice(self.headroom - k..self.headroom + self.len);
                let exported = self.exports.load(Ordering::Acquire) > 0;
                *state = LoanState::Sent(exported.then(|| bytes.clone()));
                Ok(bytes)
            }
            sent @ LoanState::Sent(_) => {
                *state = sent;
                Err(PyValueError::new_err("a loan is sent once"))
            }
            LoanState::Released => Err(PyValueError::new_err("the loan was released")),
        }
    }
}

#[pymethods]
impl Loan {
    fn __len__(&self) -> usize {
        self.len
    }

    /// Whether the loan lies in shared memory (sending it copies nothing).
    #[getter]
    fn shared(&self) -> bool {
        self.shared
    }

    /// Whether the loan was sent.
    #[getter]
    fn sent(&self) -> bool {
        matches!(*lock(&self.state), LoanState::Sent(_))
    }

    /// A writable `memoryview` of the loan (read-only once sent).
    #[getter]
    fn view<'py>(slf: Bound<'py, Self>) -> PyResult<Bound<'py, pyo3::types::PyMemoryView>> {
        pyo3::types::PyMemoryView::from(slf.as_any())
    }

    /// The loan's address (for tests that check an array points into it).
    #[getter]
    fn address(&self) -> usize {
        self.addr
    }

    /// A copy of an unsent loan's payload as `bytes` (made without the GIL).
    fn tobytes<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        let state = lock(&self.state);
        let LoanState::Open(l) = &*state else { return Err(PyValueError::new_err("the loan was sent or released")) };
        // The payload, after the headroom; the loan stays open while we copy: `state` is locked, so neither
        // sending nor releasing can take it.
        let src = &l[self.headroom..];
        let out = PyBytes::new_with(py, src.len(), |out| {
            py.detach(|| shmgrpc::copy::copy(out, src));
            Ok(())
        });
        drop(state);
        out
    }

    /// Copies `data` (`bytes`, `bytearray`, a `memoryview`, a C-contiguous numpy array: any object with the
    /// buffer protocol, read as bytes) into the unsent loan at byte `offset`, without the GIL; a large copy is
    /// shared by a few threads (`shmgrpc::copy`). Returns the number of bytes written. The fast way to fill a loan
    /// from a buffer that already exists (`memoryview(loan)[:] = data` copies while holding the GIL).
    #[pyo3(signature = (data, offset = 0))]
    fn write(&self, py: Python<'_>, data: &Bound<'_, PyAny>, offset: usize) -> PyResult<usize> {
        let buffer = match PyBuffer::<u8>::get(data) {
            Ok(b) => b,
            // Another item format (a float array): the same memory read as bytes.
            Err(_) => {
                let view = pyo3::types::PyMemoryView::from(data)?;
                if !view.getattr(pyo3::intern!(py, "c_contiguous"))?.is_truthy()? {
                    return Err(PyBufferError::new_err("the data to write must be C-contiguous"));
                }
                PyBuffer::<u8>::get(&view.call_method1(pyo3::intern!(py, "cast"), ("B",))?)?
            }
        };
        if !buffer.is_c_contiguous() {
            return Err(PyBufferError::new_err("the data to write must be C-contiguous"));
        }
        let n = buffer.len_bytes();
        let end = offset.checked_add(n).filter(|&e| e <= self.len).ok_or_else(|| {
            PyValueError::new_err(format!("{n} bytes at offset {offset} do not fit a loan of {} bytes", self.len))
        })?;
        let mut state = lock(&self.state);
        let LoanState::Open(l) = &mut *state else {
            return Err(PyValueError::new_err("the loan was sent or released"));
        };
        let at = buffer.buf_ptr() as usize;
        let (base, whole) = (l.as_ptr() as usize, l.len());
        if at < base + whole && base < at + n {
            // Bytes of the loan itself (an export of it passed back): a move within the buffer.
            let from = at
                .checked_sub(base)
                .filter(|f| f + n <= whole)
                .ok_or_else(|| PyBufferError::new_err("the data to write straddles the loan's memory"))?;
            let to = self.headroom + offset;
            py.detach(|| l.copy_within(from..from + n, to));
            drop(state);
            return Ok(n);
        }
        let dst = &mut l[self.headroom + offset..self.headroom + end];
        // SAFETY: the buffer is C-contiguous (checked above) and stays exported, so its memory stays valid, until
        // `buffer` is dropped after the copy; it does not overlap the loan (checked above), so `dst` and `src`
        // are disjoint. Its exporter may let another thread write it meanwhile (a `bytearray` changed while the
        // GIL is released): the loan then holds some mix of old and new bytes, as with any C extension that copies
        // without the GIL; nothing here depends on their value.
        let src = unsafe { std::slice::from_raw_parts(at as *const u8, n) };
        py.detach(|| shmgrpc::copy::copy(dst, src));
        drop(state);
        drop(buffer);
        Ok(n)
    }

    /// Sends the loan inline: a copy of its bytes (made without the GIL), after which it counts as sent.
    fn take<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        let bytes = self.freeze(None)?;
        copy_out(py, &[bytes])
    }

    /// Gives an unsent loan's buffer back (idempotent). Exports (memoryviews, arrays) made from the loan keep the
    /// memory until they go.
    fn release(&self) {
        let mut state = lock(&self.state);
        *state = if self.exports.load(Ordering::Acquire) == 0 {
            LoanState::Released
        } else {
            match std::mem::replace(&mut *state, LoanState::Released) {
                LoanState::Open(l) => LoanState::Sent(Some(l.freeze())), // the exports keep the memory
                other => other,
            }
        };
    }

    unsafe fn __getbuffer__(slf: Bound<'_, Self>, view: *mut ffi::Py_buffer, flags: c_int) -> PyResult<()> {
        let this = slf.get();
        let readonly = match &*lock(&this.state) {
            LoanState::Open(_) => false,
            LoanState::Sent(Some(_)) => true,
            LoanState::Sent(None) | LoanState::Released => {
                return Err(PyBufferError::new_err("the loan was sent or released"));
            }
        };
        let (addr, len) = (this.addr, this.len);
        this.exports.fetch_add(1, Ordering::AcqRel);
        // SAFETY: the memory at `addr` belongs to the loan's buffer (or its sent `Bytes`, the same memory), which
        // `state` keeps until `release`, and `release` keeps it while any export lives; the view holds a reference
        // to the loan. Writable only before it was sent.
        let filled = unsafe { fill(view, slf.clone().into_any(), addr as *mut u8, len, readonly, flags) };
        if filled.is_err() {
            this.exports.fetch_sub(1, Ordering::AcqRel);
        }
        filled
    }

    unsafe fn __releasebuffer__(&self, _view: *mut ffi::Py_buffer) {
        let mut state = lock(&self.state);
        if self.exports.fetch_sub(1, Ordering::AcqRel) == 1 && matches!(*state, LoanState::Sent(Some(_))) {
            // The last export of a sent loan went: the sent `Bytes` are the peer's business now.
            *state = LoanState::Sent(None);
        }
    }
}

/// The protocol's constants, from the Rust crate (docs/protocol.md).
fn constants(m: &Bound<'_, PyModule>) -> PyResult<()> {
    use shmgrpc::protocol as p;
    m.add("PROTOCOL_VERSION", p::PROTOCOL_VERSION)?;
    m.add("MIN_PROTOCOL_VERSION", p::MIN_PROTOCOL_VERSION)?;
    m.add("DEFAULT_THRESHOLD", p::DEFAULT_THRESHOLD)?;
    m.add("SESSION_HEADER", p::SESSION_HEADER)?;
    m.add("CALL_HEADER", p::CALL_HEADER)?;
    m.add("LARGE_FIELD", codec::LARGE_FIELD)?;
    m.add("LEARNING_CALLS", shmgrpc::embed::SizeHint::LEARNING_CALLS)?;
    m.add("HELLO_PATH", p::HELLO_PATH)?;
    m.add("HANDSHAKE_TIMEOUT", p::HANDSHAKE_TIMEOUT.as_secs_f64())?;
    m.add("DEFAULT_BUDGET", shmgrpc::pool::default_budget())?;
    Ok(())
}

/// A loan of `n` bytes of ordinary memory (for a channel without a session).
#[pyfunction]
fn heap_loan(n: usize) -> Loan {
    Loan::new(embed::heap_loan(n), 0)
}

/// A message's slices (as `Session.send` takes them: `bytes` and other buffers, a loan, a received piece) joined into
/// one `bytes` object to send inline, copied once without the GIL (a loan counts as sent). One `bytes` object is
/// returned as it is.
#[pyfunction]
fn join(py: Python<'_>, items: Vec<Bound<'_, PyAny>>) -> PyResult<Py<PyAny>> {
    send_items(py, items, usize::MAX, |_| Sending::Inline(None))
}

/// A metadata value as text (grpcio gives `str`, or `bytes` for binary headers).
fn text(value: &Bound<'_, PyAny>) -> PyResult<String> {
    match value.cast::<PyBytes>() {
        Ok(b) => Ok(String::from_utf8_lossy(b.as_bytes()).into_owned()),
        Err(_) => value.extract(),
    }
}

/// Whether `data` is a reference rather than an inline message.
#[pyfunction]
fn is_reference(data: &[u8]) -> bool {
    embed::is_reference(data)
}

/// The extension module.
#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Client>()?;
    m.add_class::<Server>()?;
    m.add_class::<Session>()?;
    m.add_class::<Call>()?;
    m.add_class::<Waiting>()?;
    m.add_class::<Received>()?;
    m.add_class::<Piece>()?;
    m.add_class::<Loan>()?;
    m.add_class::<Counters>()?;
    m.add("StatusError", m.py().get_type::<StatusError>())?;
    m.add("NoSession", m.py().get_type::<NoSession>())?;
    m.add_function(wrap_pyfunction!(stats, m)?)?;
    m.add_function(wrap_pyfunction!(is_reference, m)?)?;
    m.add_function(wrap_pyfunction!(heap_loan, m)?)?;
    m.add_function(wrap_pyfunction!(join, m)?)?;
    m.add_class::<codec::Serializer>()?;
    m.add_class::<codec::Deserializer>()?;
    m.add_class::<codec::SizeHint>()?;
    m.add_class::<codec::UnaryUnary>()?;
    m.add_class::<codec::UnaryHandler>()?;
    m.add_function(wrap_pyfunction!(codec::enter_call, m)?)?;
    m.add_function(wrap_pyfunction!(codec::leave_call, m)?)?;
    m.add_function(wrap_pyfunction!(codec::current, m)?)?;
    constants(m)
}
