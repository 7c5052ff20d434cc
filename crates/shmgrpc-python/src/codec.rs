//! The per-call path of the grpcio wrappers, in Rust: the serializer and deserializer shmgrpc gives grpcio, the
//! call a thread is serving, and the session headers of a call.
//!
//! grpcio calls a serializer and a deserializer per message, and a small message's whole cost over stock grpcio is
//! what those and the wrapper around the call add: Python bytecode run between grpcio's C calls, with cold caches.
//! Here the common case (a message below the threshold, inline) is a few C-API calls: serialize, length, count. The
//! rest (a loaned message, large `bytes` fields written from their values, a reference, views) goes to the Python
//! slow path the wrapper hands over (`python/src/shmgrpc/_codec.py`), which the fast path never second-guesses.

use std::cell::RefCell;
use std::sync::{Arc, Mutex};

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyString, PyTuple, PyType};
use pyo3::{PyTraverseError, PyVisit};
use shmgrpc::Fallback;
use shmgrpc::embed::{self, CoreSession};

use shmgrpc::protocol::{CALL_HEADER, SESSION_HEADER};

use crate::{Call, Counters, Scope, Session, Waiting, lock, send_items};

/// What this thread is serving: set by the wrapper around a call, read by the serializers grpcio runs on it.
#[derive(Default)]
struct Current {
    /// The session of the call (a server's handler thread; a client's serializer has its session bound). Rust
    /// handles: a Python `Session` is made only when Python asks (`current`).
    session: Option<CoreSession>,
    /// The call's scope when its session numbers calls (protocol version 3 and later).
    call: Option<Scope>,
    /// Whether a deserializer on this thread may wait for a registration (a client's blocking unary call).
    may_wait: bool,
}

thread_local! {
    static CURRENT: RefCell<Current> = RefCell::new(Current::default());
}

/// Makes `call` (and whether a response may wait for its registration) this thread's: a client calls it around a
/// call, whose request grpcio serializes on the caller's thread. `leave_call` undoes it.
#[pyfunction]
#[pyo3(signature = (call, may_wait))]
pub(crate) fn enter_call(call: Option<&Bound<'_, Call>>, may_wait: bool) {
    enter(call.map(|c| c.get().0.clone()), may_wait);
}

/// [`enter_call`] for a scope made in Rust (no Python object is made for it).
fn enter(call: Option<Scope>, may_wait: bool) {
    let old = CURRENT.with(|c| {
        let mut c = c.borrow_mut();
        c.may_wait = may_wait;
        std::mem::replace(&mut c.call, call)
    });
    drop(old);
}

/// Forgets this thread's call (see `enter_call`); the session a server thread serves stays until the next call.
#[pyfunction]
pub(crate) fn leave_call(py: Python<'_>) {
    let old = CURRENT.with(|c| {
        let mut c = c.borrow_mut();
        c.may_wait = false;
        c.call.take()
    });
    drop(old);
    let _ = py;
}

/// This thread's `(session, call, may_wait)` (see `enter_call` and `Server.enter`).
#[pyfunction]
pub(crate) fn current() -> (Option<Session>, Option<Call>, bool) {
    CURRENT.with(|c| {
        let c = c.borrow();
        (c.session.clone().map(Session), c.call.clone().map(Call), c.may_wait)
    })
}

/// Makes a server call's session and call this thread's (its response serializer runs on it after the handler
/// returns, and while a response iterator is consumed, so they stay until the next call on the thread).
pub(crate) fn serve(session: Option<CoreSession>, call: Option<Scope>) {
    let old = CURRENT.with(|c| {
        let mut c = c.borrow_mut();
        let old = (c.session.take(), c.call.take());
        c.session = session;
        c.call = call;
        c.may_wait = false;
        old
    });
    drop(old);
}

/// Whose session a serializer sends through.
enum Through {
    /// None: every message inline (a channel without a session).
    Nothing,
    /// The session it was made for (a client's: a call never mixes one session's header with another's messages).
    Bound(Py<Session>),
    /// The session this thread serves (a server's: see `Server.enter`).
    Thread,
}

/// A top-level `bytes` field from this size up is written straight from its value into shared memory, by the
/// slow path (`_codec._split`); this size must equal `_codec.LARGE_FIELD`.
pub(crate) const LARGE_FIELD: usize = 32 * 1024;

/// grpcio's request or response serializer for one method: the message serialized by the method's own serializer
/// and sent inline, or through the session as `Session.send` would (waiting, without the GIL, when it must). A
/// message the fast path does not take (see the module docs) goes to `slow(message)`, which returns the bytes to
/// send; one with large `bytes` fields to `slow(message, {field: value})`, with the values read here.
#[pyclass(frozen, module = "shmgrpc._core")]
pub(crate) struct Serializer {
    serialize: Py<PyAny>,
    slow: Py<PyAny>,
    /// Python: a message type's `bytes` fields that may be large (a tuple of names), or `None` when the slow path
    /// takes every message of the type.
    fields: Py<PyAny>,
    /// Python: the label of why the channel has no session (for a large message sent inline), or `None`.
    reason: Option<Py<PyAny>>,
    counters: embed::Counters,
    threshold: usize,
    through: Through,
    /// The last message type seen, and its `fields` (a method has one).
    seen: Mutex<Option<Seen>>,
}

/// A message type and its `bytes` fields to look at (see `Serializer::fields_of`).
type Seen = (Py<PyType>, Option<Py<PyTuple>>);

#[pymethods]
impl Serializer {
    /// See the type. `session` binds the serializer to a session; `thread` makes it send through the session the
    /// serving thread's call names (a server's); with neither, messages go inline.
    #[new]
    #[pyo3(signature = (serialize, slow, fields, counters, threshold, *, reason=None, session=None, thread=false))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        serialize: Py<PyAny>,
        slow: Py<PyAny>,
        fields: Py<PyAny>,
        counters: &Counters,
        threshold: usize,
        reason: Option<Py<PyAny>>,
        session: Option<Py<Session>>,
        thread: bool,
    ) -> Self {
        let through = match (session, thread) {
            (Some(s), _) => Through::Bound(s),
            (None, true) => Through::Thread,
            (None, false) => Through::Nothing,
        };
        Serializer {
            serialize,
            slow,
            fields,
            reason,
            counters: counters.0.clone(),
            threshold,
            through,
            seen: Mutex::new(None),
        }
    }

    /// The objects it holds, for Python's cycle collector (a serializer can be part of a cycle through the
    /// application's objects). A lock held elsewhere skips its contents: a missed edge only keeps objects alive.
    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        visit.call(&self.serialize)?;
        visit.call(&self.slow)?;
        visit.call(&self.fields)?;
        visit.call(&self.reason)?;
        if let Through::Bound(s) = &self.through {
            visit.call(s)?;
        }
        if let Ok(seen) = self.seen.try_lock()
            && let Some((ty, fields)) = seen.as_ref()
        {
            visit.call(ty)?;
            visit.call(fields)?;
        }
        Ok(())
    }

    fn __call__(&self, py: Python<'_>, message: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        let bytes = match self.encode_ordinary(py, message)? {
            Ordinary::Slow => return self.slow.call1(py, (message,)),
            // The large fields read here are handed to the slow path, which sends them from these values.
            Ordinary::Large(large) => return self.slow.call1(py, (message, large)),
            Ordinary::Encoded(bytes) => bytes,
        };
        let n = bytes.as_bytes().len();
        // The bound session is borrowed; the thread's is cloned out of the thread's state (a handle: no Python object).
        let served: Option<CoreSession>;
        let (session, call) = match &self.through {
            Through::Nothing => (None, None),
            Through::Bound(s) => (Some(&s.get().0), CURRENT.with(|c| c.borrow().call.clone())),
            Through::Thread => {
                let call;
                (served, call) = CURRENT.with(|c| {
                    let c = c.borrow();
                    (c.session.clone(), c.call.clone())
                });
                (served.as_ref(), call)
            }
        };
        match session {
            Some(s) if s.is_alive() => {
                if n < s.threshold() {
                    send_inline(s, call.as_deref(), bytes.as_bytes());
                    return Ok(bytes.into_any().unbind());
                }
                let items = vec![bytes.into_any()];
                let out = match &call {
                    Some(c) => send_items(py, items, s.threshold(), |slices| c.send(slices))?,
                    None => send_items(py, items, s.threshold(), |slices| s.send(slices))?,
                };
                settle(py, out)
            }
            _ => {
                let reason = if n < self.threshold {
                    None
                } else {
                    match &self.reason {
                        Some(f) => {
                            f.call0(py)?.extract::<Option<String>>(py)?.map(|l| crate::fallback_of(&l)).transpose()?
                        }
                        None => None,
                    }
                    .or(session.as_ref().map(|_| Fallback::SessionClosed))
                };
                self.counters.inline_sent(n, reason);
                Ok(bytes.into_any().unbind())
            }
        }
    }

    /// The bytes of `message` when it goes inline, counted (and numbered in `call`, or in the session when `call`
    /// is `None`: `session`, else the one the serializer is bound to). Otherwise the caller sends it its own way:
    /// for a message with large `bytes` fields the result is a `dict` of their values as read here (each read of
    /// a field copies it: the caller hands them to `_codec.prepare` instead of reading them again), else `None`
    /// (a type the slow path takes, an encoding at or above the threshold). Never waits and never copies into
    /// shared memory: the asyncio client's and server's fast path, on the event loop.
    #[pyo3(signature = (message, call=None, session=None))]
    fn inline(
        &self,
        py: Python<'_>,
        message: &Bound<'_, PyAny>,
        call: Option<&Bound<'_, Call>>,
        session: Option<&Bound<'_, Session>>,
    ) -> PyResult<Option<Py<PyAny>>> {
        let bytes = match self.encode_ordinary(py, message)? {
            Ordinary::Encoded(bytes) => bytes,
            Ordinary::Large(large) => return Ok(Some(large.into_any().unbind())),
            Ordinary::Slow => return Ok(None),
        };
        let n = bytes.as_bytes().len();
        let through = match (session, &self.through) {
            (Some(s), _) => Some(&s.get().0),
            (None, Through::Bound(s)) => Some(&s.get().0),
            (None, _) => None,
        };
        match through {
            Some(s) if s.is_alive() => {
                if n >= s.threshold() {
                    return Ok(None);
                }
                send_inline(s, call.map(|c| &*c.get().0), bytes.as_bytes());
            }
            _ if n >= self.threshold => return Ok(None),
            _ => self.counters.inline_sent(n, None),
        }
        Ok(Some(bytes.into_any().unbind()))
    }
}

/// Appends to `metadata` the items that put a call numbered `number` (or an unnumbered one) in `session` (protocol
/// §6): one header from version 4 on, two in version 3. Names are interned: every call sends the same ones.
pub(crate) fn push_call_headers<'py>(
    py: Python<'py>,
    session: &CoreSession,
    number: Option<u64>,
    metadata: &mut Vec<Bound<'py, PyAny>>,
) -> PyResult<()> {
    let (session_value, call_value) = session.call_headers(number);
    let item = |name: &Bound<'py, PyString>, value: &str| PyTuple::new(py, [name, &PyString::new(py, value)]);
    metadata.push(item(pyo3::intern!(py, SESSION_HEADER), &session_value)?.into_any());
    if let Some(value) = call_value {
        metadata.push(item(pyo3::intern!(py, CALL_HEADER), &value)?.into_any());
    }
    Ok(())
}

/// What [`Serializer::encode_ordinary`] made of a message.
enum Ordinary<'py> {
    /// A message of a type the slow path takes (loaned, already encoded, not protobuf-serialized to `bytes`).
    Slow,
    /// An ordinary message with large `bytes` fields: their values, read once (each read copies).
    Large(Bound<'py, PyDict>),
    /// An ordinary message, serialized.
    Encoded(Bound<'py, PyBytes>),
}

/// Sends the bytes of an inline message through `session` (in `call`, numbered, when there is one): the session
/// counts it; the bytes themselves are the message.
fn send_inline(session: &CoreSession, call: Option<&embed::CallScope>, bytes: &[u8]) {
    let slices = [bytes];
    let sent = match call {
        Some(c) => c.send(&slices),
        None => session.send(&slices),
    };
    debug_assert!(matches!(sent, embed::Sending::Inline(_)));
}

impl Serializer {
    /// Looks at `message` as both paths need it: its type, its large `bytes` fields (each read of a field copies
    /// it: upb returns a new `bytes` object, so the values read are kept), then its serialization.
    fn encode_ordinary<'py>(&self, py: Python<'py>, message: &Bound<'py, PyAny>) -> PyResult<Ordinary<'py>> {
        let Some(fields) = self.fields_of(py, message)? else { return Ok(Ordinary::Slow) };
        let mut large: Option<Bound<'py, PyDict>> = None;
        for name in fields.bind(py).iter() {
            let value = message.getattr(name.cast::<PyString>()?)?;
            if value.len()? >= LARGE_FIELD {
                large.get_or_insert_with(|| PyDict::new(py)).set_item(name, value)?;
            }
        }
        if let Some(large) = large {
            return Ok(Ordinary::Large(large));
        }
        let encoded = self.serialize.bind(py).call1((message,))?;
        Ok(encoded.cast_into::<PyBytes>().map_or(Ordinary::Slow, Ordinary::Encoded))
    }

    /// The `bytes` fields of `message`'s type to look at, or `None` when the slow path takes it.
    fn fields_of(&self, py: Python<'_>, message: &Bound<'_, PyAny>) -> PyResult<Option<Py<PyTuple>>> {
        let ty = message.get_type();
        if let Some((seen, fields)) = lock(&self.seen).as_ref()
            && seen.is(&ty)
        {
            return Ok(fields.as_ref().map(|f| f.clone_ref(py)));
        }
        let fields = self.fields.call1(py, (&ty,))?;
        let fields: Option<Py<PyTuple>> = fields.extract(py)?;
        *lock(&self.seen) = Some((ty.unbind(), fields.as_ref().map(|f| f.clone_ref(py))));
        Ok(fields)
    }
}

/// The bytes to send for what `send_items` returned, waiting for the peer (without the GIL) if it must.
fn settle(py: Python<'_>, out: Py<PyAny>) -> PyResult<Py<PyAny>> {
    let Ok(waiting) = out.bind(py).cast::<Waiting>() else {
        return Ok(out);
    };
    let (data, _) = waiting.get().wait(py)?;
    Ok(data.into_any().unbind())
}

/// What a client's channel has seen of one unary method's message sizes (see `shmgrpc::embed::SizeHint`): its
/// calls leave the session's header off once its first calls showed only small messages.
#[pyclass(frozen, module = "shmgrpc._core")]
pub(crate) struct SizeHint(Arc<embed::SizeHint>);

#[pymethods]
impl SizeHint {
    /// A method not seen yet, on a channel whose threshold is `threshold`.
    #[new]
    fn new(threshold: usize) -> Self {
        SizeHint(Arc::new(embed::SizeHint::new(threshold)))
    }

    /// Whether the next call should carry the session's header whatever its request; with `session`, the call's
    /// session, whose server's threshold then judges the responses too if it is the lower one.
    #[pyo3(signature = (session=None))]
    fn wants_session(&self, session: Option<&Session>) -> bool {
        match session {
            Some(s) => self.0.wants_session_in(&s.0),
            None => self.0.wants_session(),
        }
    }

    /// A message of the method that travels through shared memory (a large request, a reference received).
    fn saw_large(&self) {
        self.0.saw_large();
    }
}

/// grpcio's response or request deserializer for one method: an inline message parsed by the method's own
/// deserializer and counted; anything else (a reference, a view, a message that does not parse) goes to `slow`.
#[pyclass(frozen, module = "shmgrpc._core")]
pub(crate) struct Deserializer {
    parse: Option<Py<PyAny>>,
    slow: Py<PyAny>,
    counters: embed::Counters,
    /// A client's unary method: what its responses' sizes say of the next call (see `SizeHint`).
    hint: Option<Arc<embed::SizeHint>>,
}

#[pymethods]
impl Deserializer {
    /// See the type; `parse` is `None` when the slow path takes every message (a view of a field, raw bytes).
    /// `hint` learns from every message the sizes of the method's responses.
    #[new]
    #[pyo3(signature = (parse, slow, counters, hint=None))]
    fn new(parse: Option<Py<PyAny>>, slow: Py<PyAny>, counters: &Counters, hint: Option<&SizeHint>) -> Self {
        Deserializer { parse, slow, counters: counters.0.clone(), hint: hint.map(|h| h.0.clone()) }
    }

    /// The objects it holds, for Python's cycle collector.
    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        visit.call(&self.parse)?;
        visit.call(&self.slow)
    }

    fn __call__(&self, py: Python<'_>, data: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        if let Ok(bytes) = data.cast::<PyBytes>() {
            let b = bytes.as_bytes();
            let reference = embed::is_reference(b);
            if let Some(hint) = &self.hint {
                if reference { hint.saw_large() } else { hint.saw(b.len()) }
            }
            if let Some(parse) = &self.parse
                && !reference
                && let Ok(message) = parse.call1(py, (data,))
            {
                self.counters.inline_received(b.len());
                return Ok(message);
            }
        }
        self.slow.call1(py, (data,))
    }
}

/// A blocking unary-unary call through a session (`multi_callable(request, timeout=..., metadata=...)`), the hot
/// path of a client's small calls, made here rather than in Python: the session's header (carrying the call's
/// number; two headers with a protocol version 3 server) added to the metadata, the call entered on this thread
/// for the serializer, the call's scope closed once the response is read. Anything else (no live session,
/// positional options, a loaned request, the `with_call` and `future` forms) is the Python multi-callable's
/// (`client._Callable`), which does the same.
#[pyclass(frozen, module = "shmgrpc._core")]
pub(crate) struct UnaryUnary {
    /// The Python multi-callable: the slow path, and `with_call`/`future`.
    slow: Py<PyAny>,
    /// The Python channel, whose `_session` is the session calls go through.
    channel: Py<PyAny>,
    /// A loaned message's type (`_codec.Loaned`): the Python multi-callable checks and sends loans.
    loaned: Py<PyType>,
    /// The grpcio multi-callable for calls without a session (its serializer sends inline).
    plain: Py<PyAny>,
    /// The session the last call went through, and the multi-callable made for it (its serializer bound to the
    /// session).
    bound: Mutex<Option<Made>>,
    /// What the method's sizes say of the next call's header (see `SizeHint`).
    hint: Option<Arc<embed::SizeHint>>,
    /// The grpcio multi-callable for requests already serialized (no serializer): a call without the header.
    raw: Py<PyAny>,
    /// The serializer of `plain`: serializes a request to send without the header, and counts it.
    plain_serializer: Py<Serializer>,
}

/// The grpcio multi-callable made for a session (see `UnaryUnary`).
struct Made {
    session: Py<Session>,
    inner: Py<PyAny>,
}

#[pymethods]
impl UnaryUnary {
    /// See the type; `slow` is `client._Callable` for the method.
    #[new]
    fn new(py: Python<'_>, slow: Py<PyAny>, channel: Py<PyAny>, loaned: Py<PyType>) -> PyResult<Self> {
        let plain = slow.getattr(py, pyo3::intern!(py, "_plain"))?;
        let hint: Option<Bound<'_, SizeHint>> = slow.getattr(py, pyo3::intern!(py, "_hint"))?.extract(py)?;
        let raw = slow.getattr(py, pyo3::intern!(py, "_raw"))?;
        let plain_serializer = slow.getattr(py, pyo3::intern!(py, "_plain_serializer"))?.extract(py)?;
        let hint = hint.map(|h| h.get().0.clone());
        Ok(UnaryUnary { slow, channel, loaned, plain, bound: Mutex::new(None), hint, raw, plain_serializer })
    }

    /// The objects it holds, for Python's cycle collector (see `Serializer.__traverse__`).
    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        visit.call(&self.slow)?;
        visit.call(&self.channel)?;
        visit.call(&self.loaned)?;
        visit.call(&self.plain)?;
        visit.call(&self.raw)?;
        visit.call(&self.plain_serializer)?;
        if let Ok(bound) = self.bound.try_lock()
            && let Some(m) = bound.as_ref()
        {
            visit.call(&m.session)?;
            visit.call(&m.inner)?;
        }
        Ok(())
    }

    #[pyo3(signature = (request, *args, **kwargs))]
    fn __call__(
        &self,
        py: Python<'_>,
        request: &Bound<'_, PyAny>,
        args: &Bound<'_, PyTuple>,
        kwargs: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Py<PyAny>> {
        let slow = || self.slow.call(py, (request,).into_pyobject(py)?.add(args)?.cast_into::<PyTuple>()?, kwargs);
        if !args.is_empty() || request.is_instance(self.loaned.bind(py))? {
            return slow();
        }
        let channel = self.channel.bind(py);
        let session = channel.getattr(pyo3::intern!(py, "_session"))?;
        let session = match session.cast_into::<Session>() {
            Ok(s) if s.get().0.is_alive() => s,
            // No session (or it ended): a plain call, and maybe a new try for a session in the background.
            _ => {
                if channel.call_method0(pyo3::intern!(py, "_want_retry"))?.is_truthy()? {
                    channel.call_method0(pyo3::intern!(py, "_retry"))?;
                }
                return self.plain.call(py, (request,), kwargs);
            }
        };
        if let Some(hint) = &self.hint
            && !hint.wants_session_in(&session.get().0)
        {
            // Every message of the method so far was small: a small request goes without the header.
            let serializer = self.plain_serializer.get();
            let Ok(encoded) = serializer.encode_ordinary(py, request) else {
                // grpcio's multi-callable serializes it again and fails the call as stock grpcio does.
                return self.plain.call(py, (request,), kwargs);
            };
            match encoded {
                Ordinary::Encoded(bytes) if bytes.as_bytes().len() < session.get().0.threshold() => {
                    serializer.counters.inline_sent(bytes.as_bytes().len(), None);
                    return match kwargs.filter(|k| !k.is_empty()) {
                        Some(kwargs) => self.raw.call(py, (bytes,), Some(kwargs)),
                        None => self.raw.call1(py, (bytes,)),
                    };
                }
                // A type the session path takes as it is (a loan is not one: it went to `slow` above).
                Ordinary::Slow => {}
                // A large request: this and every later call go through the session (encoded again there).
                Ordinary::Encoded(_) | Ordinary::Large(_) => hint.saw_large(),
            }
        }
        let inner = {
            let bound = lock(&self.bound);
            match bound.as_ref() {
                Some(m) if m.session.is(&session) => m.inner.clone_ref(py),
                _ => {
                    drop(bound);
                    let inner = self.slow.call_method1(py, pyo3::intern!(py, "_inner_for"), (&session,))?;
                    *lock(&self.bound) = Some(Made { session: session.clone().unbind(), inner: inner.clone_ref(py) });
                    inner
                }
            }
        };
        // Its request is encoded before grpcio starts the call: a unary scope (see `CoreSession::unary_call`).
        let call = session.get().0.unary_call().map(Arc::new);
        let key = pyo3::intern!(py, "metadata");
        let kwargs = kwargs.filter(|k| !k.is_empty()).map(|k| k.copy()).transpose()?;
        let mut md: Vec<Bound<'_, PyAny>> = Vec::with_capacity(4);
        if let Some(user) = kwargs.as_ref().map(|k| k.get_item(key)).transpose()?.flatten()
            && !user.is_none()
        {
            for item in user.try_iter()? {
                md.push(item?);
            }
        }
        push_call_headers(py, &session.get().0, call.as_ref().map(|c| c.number()), &mut md)?;
        let md = PyTuple::new(py, md)?;
        enter(call.clone(), true);
        let result = match kwargs {
            Some(kwargs) => {
                kwargs.set_item(key, md)?;
                inner.call(py, (request,), Some(&kwargs))
            }
            // grpcio's multi-callables take `(request, timeout, metadata, ...)` by position too: no dict to make.
            None => inner.call1(py, (request, py.None(), md)),
        };
        leave_call(py);
        if let Some(c) = &call {
            match &result {
                // The response was read (decoded by the deserializer, on this thread).
                Ok(_) => {
                    c.received();
                    c.complete();
                }
                // No response was read: the server drops what it sent of it.
                Err(_) => c.end(),
            }
        }
        result
    }

    /// See `grpc.UnaryUnaryMultiCallable.with_call`.
    #[pyo3(signature = (*args, **kwargs))]
    fn with_call(
        &self,
        py: Python<'_>,
        args: &Bound<'_, PyTuple>,
        kwargs: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Py<PyAny>> {
        self.slow.call_method(py, pyo3::intern!(py, "with_call"), args, kwargs)
    }

    /// See `grpc.UnaryUnaryMultiCallable.future`.
    #[pyo3(signature = (*args, **kwargs))]
    fn future(
        &self,
        py: Python<'_>,
        args: &Bound<'_, PyTuple>,
        kwargs: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Py<PyAny>> {
        self.slow.call_method(py, pyo3::intern!(py, "future"), args, kwargs)
    }
}

/// A server's handler of a unary request (the behaviour of `grpc.unary_unary_rpc_method_handler` and
/// `unary_stream_rpc_method_handler`), the hot path of a server's small calls: enters the call on this thread
/// (`Server.enter`: its session and number, for the response serializer), hands a request the deserializer could
/// not finish (a reference that overtook its registration, one that failed) to `check`, then runs the application's
/// behaviour.
#[pyclass(frozen, module = "shmgrpc._core")]
pub(crate) struct UnaryHandler {
    behaviour: Py<PyAny>,
    server: Py<crate::Server>,
    /// Python: `check(request, context)`, the request to hand on (or the call aborted).
    check: Py<PyAny>,
    /// The types of requests `check` takes (`_codec.Deferred`, `server._Failed`).
    unfinished: Py<PyTuple>,
}

#[pymethods]
impl UnaryHandler {
    /// See the type.
    #[new]
    fn new(behaviour: Py<PyAny>, server: Py<crate::Server>, check: Py<PyAny>, unfinished: Py<PyTuple>) -> Self {
        UnaryHandler { behaviour, server, check, unfinished }
    }

    /// The objects it holds, for Python's cycle collector.
    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        visit.call(&self.behaviour)?;
        visit.call(&self.server)?;
        visit.call(&self.check)?;
        visit.call(&self.unfinished)
    }

    fn __call__(&self, py: Python<'_>, request: &Bound<'_, PyAny>, context: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        let metadata = context.call_method0(pyo3::intern!(py, "invocation_metadata"))?;
        self.server.get().enter(py, &metadata, true)?;
        if request.is_instance(self.unfinished.bind(py))? {
            let request = self.check.call1(py, (request, context))?;
            return self.behaviour.call1(py, (request, context));
        }
        self.behaviour.call1(py, (request, context))
    }
}
