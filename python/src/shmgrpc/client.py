"""
The client: :func:`insecure_channel`, a ``grpc.Channel`` that moves large messages through shared memory.

On creation the channel asks the server for shmgrpc (``/shmgrpc.v1.Session/Hello``) and, when it answers, the Rust
core (:mod:`shmgrpc._core`) opens a session on the server's side channel (uid checks, the memfd challenge).
Requests whose encoded size reaches the threshold are written into the core's pool and only a reference crosses
the gRPC stream; responses that are references are resolved from the server's segments. Without a session every
message is plain gRPC, and :meth:`ShmChannel.fallback` says why; a channel whose session ended, or whose server
was not up yet, tries again in the background (at most once a second). Generated stubs work unchanged.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from . import _codec, _core
from ._codec import ViewOf
from ._core import Loan, NoSession, Session, StatusError
from .stats import Fallback, Stats

log = logging.getLogger("shmgrpc")

PROTOCOL_VERSION = _core.PROTOCOL_VERSION
"""The highest protocol version the package speaks (the Rust core's: docs/protocol.md section 2)."""

RETRY_INTERVAL = 1.0
"""Smallest pause, in seconds, between two attempts to open a session."""

_UNARY_REQUEST = frozenset({"unary_unary", "unary_stream"})
"""The kinds of call whose one request grpcio encodes before it starts the call (see ``Session.unary_call``)."""


@dataclass
class PoolStats:
    """A snapshot of a pool (bytes are what the pool's segments occupy; ``in_use_bytes`` what is leased)."""

    budget: int
    bytes: int
    in_use_bytes: int
    buffers: int
    allocs: int
    grows: int
    evictions: int
    trimmed_bytes: int


class PoolView:
    """The pool a channel or server sends from (kept by the Rust core)."""

    def __init__(self, figures: Callable[[], dict[str, int]]) -> None:
        self._figures = figures

    def stats(self) -> PoolStats:
        """The pool's figures now."""
        f = self._figures()
        return PoolStats(**{k: f[k] for k in PoolStats.__dataclass_fields__})


def _channel_options(target: str, options: Sequence[tuple[str, Any]] | None) -> list[tuple[str, Any]]:
    """``options`` with the authority for ``unix:`` targets and lifted size limits, unless set."""
    opts = list(options or ())
    names = {k for k, _ in opts}
    if target.startswith("unix:") and "grpc.default_authority" not in names:
        opts.append(("grpc.default_authority", "localhost"))
    for key in ("grpc.max_receive_message_length", "grpc.max_send_message_length"):
        if key not in names:
            opts.append((key, -1))
    return opts


def _unix_path(target: str) -> str | None:
    """The socket path of a ``unix:`` target (where the client looks for the side channel first)."""
    if target.startswith("unix://"):
        return target[len("unix://") :]
    if target.startswith("unix:"):
        return target[len("unix:") :]
    return None


def _discovery_failed(e: Any) -> Fallback:
    code = e.code() if hasattr(e, "code") else None
    number = code.value[0] if code is not None else grpc.StatusCode.UNKNOWN.value[0]
    return Fallback(_core.Client.discovery_failed(number))


def _make_core(threshold: int, budget: int | None) -> _core.Client:
    return _core.Client(threshold=threshold, budget=budget, protocol_version=PROTOCOL_VERSION)


_CHANNELS: weakref.WeakSet[_ChannelBase] = weakref.WeakSet()
"""Live channels of this process (a forked child gives each a core of its own)."""

_INHERITED: list[Any] = []
"""A forked child's copies of its parent's cores and sessions: kept, never dropped (their socket and pool are the
parent's; the Rust core also refuses to use them: a session's copy is never alive in a child)."""


def _after_fork_in_child() -> None:
    """Gives every channel a new core (pool, counters) and no session: it opens its own on its next call."""
    for ch in list(_CHANNELS):
        _INHERITED.append((ch._shm, ch._session))
        ch._shm = _make_core(ch.threshold, ch._budget)
        ch._counters = ch._shm.counters()
        ch.pool = PoolView(ch._shm.pool_stats)
        ch._session = None
        ch._fallback = None
        ch._retry_lock = threading.Lock()
        ch._trying = False
        ch._last_try = 0.0


os.register_at_fork(after_in_child=_after_fork_in_child)


class _ChannelBase:
    """What the sync and asyncio channels share: the core client, the session, retries, the multi-callables."""

    _shm: _core.Client
    _session: Session | None
    _fallback: Fallback | None
    _wanted: bool
    _unix: str | None
    threshold: int

    def _init_base(self, threshold: int, budget: int | None, shared_memory: bool, unix: str | None) -> None:
        self.threshold = threshold
        self._budget = budget
        self._shm = _make_core(threshold, budget)
        self._counters = self._shm.counters()
        self._session = None
        self._fallback = None
        self._wanted = shared_memory
        self._unix = unix
        self._retry_lock = threading.Lock()
        self._last_try = 0.0
        self._trying = False
        self.pool = PoolView(self._shm.pool_stats)
        _CHANNELS.add(self)

    def _settle(self, hello: bytes | None, reason: Fallback | None) -> None:
        """Joins the session ``hello`` offers (on this thread, without the GIL), or records why there is none."""
        if hello is not None:
            try:
                self._session = self._shm.join(hello, self._unix)
                self._fallback = None
                return
            except NoSession as e:
                reason = Fallback(e.args[0])
        self._session = None
        self._fallback = reason
        log.info("shmgrpc: no shared memory with this server (%s); messages go inline", reason.value if reason else "")

    def _live(self) -> Session | None:
        s = self._session
        return s if s is not None and s.alive else None

    def _want_retry(self) -> bool:
        """Whether to try for a session again now (and marks the try as started)."""
        if not self._wanted or self._live() is not None or self._fallback == Fallback.PEER_LACKS_SHMGRPC:
            return False
        with self._retry_lock:
            now = time.monotonic()
            if self._trying or now - self._last_try < RETRY_INTERVAL:
                return False
            self._trying, self._last_try = True, now
        return True

    def is_shared_memory(self) -> bool:
        """Whether large messages currently go through shared memory."""
        return self._live() is not None

    def fallback(self) -> Fallback | None:
        """Why this channel sends inline, if it does (``None`` also while an asyncio channel opens its session)."""
        if self._session is not None:
            return None if self._session.alive else Fallback.SESSION_CLOSED
        return self._fallback

    def stats(self) -> Stats:
        """Transfer counters of this channel (see :func:`shmgrpc.stats`)."""
        return self._counters.snapshot()

    def session_stats(self) -> dict[str, int]:
        """Figures of the session (``holds``, ``held_bytes``, ``peer_segments``, ...; zeros without one)."""
        s = self._session
        if s is None:
            return {
                "sessions": 0,
                "peer_segments": 0,
                "peer_bytes": 0,
                "shared_segments": 0,
                "holds": 0,
                "held_bytes": 0,
                "sent_back": 0,
            }
        return s.stats()

    def session_figures(self) -> dict[str, int]:
        """Holds the server has on our buffers and the server's segments mapped here (zeros without a session)."""
        s = self.session_stats()
        return {"holds": s["holds"], "peer_segments": s["peer_segments"]}

    def loan(self, n: int) -> Loan:
        """
        A buffer of ``n`` bytes to write a request payload into and send without a copy (see :class:`Loan` and
        :func:`shmgrpc.loaned`); ordinary memory when this channel has no session.
        """
        s = self._live()
        if s is None:
            s = self._session
        if s is not None:
            return s.loan(n)
        return _heap_loan(n)

    def _encode(
        self,
        session: Session | None,
        ser: Any,
        message: Any,
        call: _core.Call | None = None,
        large: dict[str, Any] | None = None,
    ) -> Any:
        return _codec.encode(message, ser, session, self._counters, self.threshold, self._fallback, call, large)

    def _callable(self, kind: str, method: str, ser: Any, de: Any, kw: dict[str, Any]) -> Any:
        raise NotImplementedError

    def unary_unary(
        self, method: str, request_serializer: Any = None, response_deserializer: Any = None, *args: Any, **kw: Any
    ) -> Any:
        """See ``grpc.Channel.unary_unary``."""
        return self._callable("unary_unary", method, request_serializer, response_deserializer, _extra(args, kw))

    def unary_stream(
        self, method: str, request_serializer: Any = None, response_deserializer: Any = None, *args: Any, **kw: Any
    ) -> Any:
        """See ``grpc.Channel.unary_stream``."""
        return self._callable("unary_stream", method, request_serializer, response_deserializer, _extra(args, kw))

    def stream_unary(
        self, method: str, request_serializer: Any = None, response_deserializer: Any = None, *args: Any, **kw: Any
    ) -> Any:
        """See ``grpc.Channel.stream_unary``."""
        return self._callable("stream_unary", method, request_serializer, response_deserializer, _extra(args, kw))

    def stream_stream(
        self, method: str, request_serializer: Any = None, response_deserializer: Any = None, *args: Any, **kw: Any
    ) -> Any:
        """See ``grpc.Channel.stream_stream``."""
        return self._callable("stream_stream", method, request_serializer, response_deserializer, _extra(args, kw))


def _extra(args: tuple[Any, ...], kw: dict[str, Any]) -> dict[str, Any]:
    """
    The multi-callable factory's further arguments by name: grpcio passes ``_registered_method`` as a fourth
    positional argument (``grpc.intercept_channel`` does), which the wrapped channel gets back by name.
    """
    if args:
        if len(args) > 1 or "_registered_method" in kw:
            raise TypeError("unexpected positional arguments")
        kw = {**kw, "_registered_method": args[0]}
    return kw


def _heap_loan(n: int) -> Loan:
    """A loan of ordinary memory (no session to lend shared memory)."""
    return _core.heap_loan(n)


class ShmChannel(_ChannelBase, grpc.Channel):
    """A ``grpc.Channel`` whose calls move large messages through shared memory (see the module docs)."""

    def __init__(
        self,
        channel: grpc.Channel,
        *,
        shared_memory: bool = True,
        threshold: int = _core.DEFAULT_THRESHOLD,
        budget: int | None = None,
        views: dict[str, str] | None = None,
        unix: str | None = None,
    ) -> None:
        self._channel = channel
        self._views = dict(views or {})
        self._init_base(threshold, budget, shared_memory, unix)
        if shared_memory:
            self._last_try = time.monotonic()
            self._connect()

    def _connect(self) -> None:
        hello = self._channel.unary_unary(_core.HELLO_PATH)
        try:
            answer = hello(self._shm.hello_request(), timeout=_core.HANDSHAKE_TIMEOUT)
        except grpc.RpcError as e:
            self._settle(None, _discovery_failed(e))
            return
        self._settle(answer, None)

    def _retry(self) -> None:
        """A new attempt at a session, on a thread of its own (calls meanwhile go inline)."""

        def run() -> None:
            try:
                self._connect()
                if self._live() is not None:
                    log.info("shmgrpc: session opened")
            finally:
                self._trying = False

        threading.Thread(target=run, name="shmgrpc-reconnect", daemon=True).start()

    def _encoded_stream(self, requests: Any, session: Session | None, ser: Any, call: _core.Call) -> Any:
        """The request stream, each message encoded as its call's next (grpcio consumes it on a thread of its own)."""
        for message in requests:
            yield _codec.Encoded(_codec.settle(self._encode(session, ser, message, call)))

    # ---- grpc.Channel ----
    def subscribe(self, callback: Callable[..., Any], try_to_connect: bool = False) -> None:
        """See ``grpc.Channel.subscribe``."""
        self._channel.subscribe(callback, try_to_connect)

    def unsubscribe(self, callback: Callable[..., Any]) -> None:
        """See ``grpc.Channel.unsubscribe``."""
        self._channel.unsubscribe(callback)

    def _callable(self, kind: str, method: str, ser: Any, de: Any, kw: dict[str, Any]) -> Any:
        c = _Callable(self, kind, method, ser, de, kw)
        # A blocking unary call through a session is made in Rust (the hot path of small calls); the rest in Python.
        return _core.UnaryUnary(c, self, _codec.Loaned) if kind == "unary_unary" else c

    def close(self) -> None:
        """Closes the session (the server's holds and mappings go) and the gRPC channel."""
        self._wanted = False
        if self._session is not None:
            self._session.close()
        self._channel.close()
        self._shm.trim()

    def __enter__(self) -> ShmChannel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- per call ----
    def _serializer(self, session: Session | None, ser: Any) -> Callable[[Any], bytes]:
        """
        The request serializer through ``session`` (or inline): the Rust fast path for ordinary messages, this
        slow path for loaned and already encoded messages and large ``bytes`` fields.
        """

        def serialize(message: Any, large: dict[str, Any] | None = None) -> bytes:
            if isinstance(message, _codec.Encoded):
                return message.data
            call = _core.current()[1]  # the call `_invoke` entered on this thread (grpcio serializes in-thread)
            return _codec.settle(self._encode(session, ser, message, call, large))

        def reason() -> str | None:
            return self._fallback.value if self._fallback is not None else None

        fields = functools.partial(_codec.large_fields, serialize=ser)
        return _core.Serializer(ser, serialize, fields, self._counters, self.threshold, reason=reason, session=session)

    def _deserializer(self, de: Any, hint: _core.SizeHint | None = None) -> Callable[[bytes], Any]:
        """
        The response deserializer: the Rust fast path for inline messages, this slow path for the rest; ``hint``
        learns the sizes of the responses.
        """

        def deserialize(data: bytes) -> Any:
            # grpcio deserializes on the caller's thread for blocking unary calls, and on the channel's one polling
            # thread for futures and response streams: there a reference that overtook its segment's registration
            # is handed on as it is and resolved on the caller's thread when it reads it (`_resolve`).
            may_wait = _core.current()[2]
            if not may_wait and _core.is_reference(data) and self._shm.needs_wait(data):
                return _codec.Deferred(data, de)
            try:
                return _codec.decode(data, de, lambda d: self._shm.receive(d, may_wait), self._counters)
            except StatusError as e:
                # grpcio turns a deserializer's exception into INTERNAL; the message keeps the protocol's code.
                raise ValueError(f"{_codec.status_code(e).name}: {e.args[1]}") from None

        plain = de if de is not None and not isinstance(de, ViewOf) else None
        return _core.Deserializer(plain, deserialize, self._counters, hint)

    def _resolve(self, item: Any) -> Any:
        """A response as read by the caller: a deferred reference is resolved here, waiting (at most 2 s)."""
        if not isinstance(item, _codec.Deferred):
            return item
        try:
            return _codec.decode(item.data, item.parse, lambda d: self._shm.receive(d, True), self._counters)
        except StatusError as e:
            raise _codec.ShmRpcError(_codec.status_code(e), str(e.args[1])) from None


class _Callable:
    """
    A multi-callable that decides per call whether it has a session: adds the header, and serializes through
    that session (a call never mixes a header with a dead session's references).
    """

    def __init__(self, ch: ShmChannel, kind: str, method: str, ser: Any, de: Any, kw: dict[str, Any]) -> None:
        self._ch, self._kind, self._method, self._ser, self._kw = ch, kind, method, ser, kw
        field = ch._views.get(method)
        if field is not None and de is not None:
            de = ViewOf(de, field)
        # A unary method's sizes decide whether its blocking calls need the session's header (`_core.UnaryUnary`):
        # once its first calls showed only small messages, a small request goes without it, as plain gRPC.
        self._hint = _core.SizeHint(ch.threshold) if kind == "unary_unary" else None
        self._de = ch._deserializer(de, self._hint)
        self._plain_serializer = ch._serializer(None, ser)
        self._plain = getattr(ch._channel, kind)(method, self._plain_serializer, self._de, **kw)
        self._raw = getattr(ch._channel, kind)(method, None, self._de, **kw) if self._hint is not None else None
        self._bound: tuple[Session, Any] | None = None

    def _for_call(
        self, metadata: Sequence[tuple[str, str]] | None
    ) -> tuple[Any, Any, Session | None, _core.Call | None]:
        s = self._ch._live()
        if s is None:
            if self._ch._want_retry():
                self._ch._retry()
            return self._plain, metadata, None, None
        inner = self._inner_for(s)
        # Protocol version 3 and later: the call's number, which tags its messages. A unary request is encoded
        # before grpcio starts the call: its scope needs no place in the ledger of open calls.
        call = s.unary_call() if self._kind in _UNARY_REQUEST else s.call()
        header = s.headers(call.number if call is not None else None)
        md = header if not metadata else (*metadata, *header)
        return inner, md, s, call

    def _inner_for(self, s: Session) -> Any:
        """The grpcio multi-callable for calls through ``s``: its serializer sends through ``s`` (made once)."""
        cached = self._bound
        if cached is None or cached[0] is not s:
            inner = getattr(self._ch._channel, self._kind)(
                self._method, self._ch._serializer(s, self._ser), self._de, **self._kw
            )
            cached = self._bound = (s, inner)
        return cached[1]

    def _invoke(self, attr: str, request: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        _codec._check_loan(request)
        if len(args) >= 2:  # (timeout, metadata, ...) positionally
            args = list(args)  # type: ignore[assignment]
            inner, args[1], session, call = self._for_call(args[1])  # type: ignore[index]
        else:
            inner, kwargs["metadata"], session, call = self._for_call(kwargs.get("metadata"))
        if session is None:
            return getattr(inner, attr)(request, *args, **kwargs)
        if call is not None and self._kind.startswith("stream_"):
            request = self._ch._encoded_stream(request, session, self._ser, call)
        # Blocking unary calls deserialize the response on this thread, which may wait for a registration.
        _core.enter_call(call, attr != "future" and self._kind in ("unary_unary", "stream_unary"))
        try:
            result = getattr(inner, attr)(request, *args, **kwargs)
        except BaseException:
            if call is not None:
                call.end()  # no response was read: the server drops what it sent of it
            raise
        finally:
            _core.leave_call()
        return _Tracked.wrap(self._kind, attr, result, call, self._ch._resolve)

    def __call__(self, request: Any, *args: Any, **kwargs: Any) -> Any:
        return self._invoke("__call__", request, args, kwargs)

    def with_call(self, request: Any, *args: Any, **kwargs: Any) -> Any:
        return self._invoke("with_call", request, args, kwargs)

    def future(self, request: Any, *args: Any, **kwargs: Any) -> Any:
        return self._invoke("future", request, args, kwargs)


class _Tracked:
    """
    The response side of a call with a session: resolves responses deferred off grpcio's polling thread when the
    caller reads them, and in a numbered call (protocol version 3) counts the responses read and, when reading
    stops before the end (the call is cancelled, fails, or a response stream is dropped half read), tells the
    server how many were read (`CallEnd`), so it drops the holds of the rest at once.
    """

    @staticmethod
    def wrap(kind: str, attr: str, result: Any, call: _core.Call | None, resolve: Callable[[Any], Any]) -> Any:
        if kind.endswith("_stream"):
            return _TrackedStream(result, call, resolve)
        if attr == "future":
            return _TrackedFuture(result, call, resolve)
        if call is not None:
            call.received()  # the response, decoded
            call.complete()
        return result


class _TrackedFuture:
    """A unary call's future (a ``grpc.Future`` and ``grpc.Call``) whose result is resolved when it is read."""

    def __init__(self, inner: Any, call: _core.Call | None, resolve: Callable[[Any], Any]) -> None:
        self._inner, self._resolve = inner, resolve
        if call is not None:

            def done(f: Any) -> None:
                if f.cancelled() or f.exception() is not None:
                    call.end()
                else:
                    call.received()
                    call.complete()

            inner.add_done_callback(done)

    def result(self, timeout: float | None = None) -> Any:
        """See ``grpc.Future.result``."""
        return self._resolve(self._inner.result(timeout))

    def add_done_callback(self, fn: Callable[[Any], None]) -> None:
        """See ``grpc.Future.add_done_callback``; ``fn`` gets this future."""
        self._inner.add_done_callback(lambda _: fn(self))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class _TrackedStream:
    """A response stream (a ``grpc.Call`` and iterator): resolved as read, and counted for its numbered call."""

    def __init__(self, inner: Any, call: _core.Call | None, resolve: Callable[[Any], Any]) -> None:
        self._inner = inner
        self._call = call
        self._resolve = resolve

    def __iter__(self) -> _TrackedStream:
        return self

    def __next__(self) -> Any:
        try:
            item = self._resolve(next(self._inner))
        except StopIteration:
            if self._call is not None:
                self._call.complete()
            raise
        except BaseException:
            if self._call is not None:
                self._call.end()
            raise
        if self._call is not None:
            self._call.received()
        return item

    def cancel(self) -> bool:
        """See ``grpc.RpcContext.cancel``; the server drops what it sent and was not read."""
        done = bool(self._inner.cancel())
        if self._call is not None:
            self._call.end()
        return done

    def __del__(self) -> None:
        if self._call is not None:
            self._call.end()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def insecure_channel(
    target: str,
    options: Sequence[tuple[str, Any]] | None = None,
    compression: grpc.Compression | None = None,
    *,
    shared_memory: bool = True,
    threshold: int = _core.DEFAULT_THRESHOLD,
    budget: int | None = None,
    views: dict[str, str] | None = None,
) -> ShmChannel:
    """
    Like ``grpc.insecure_channel``, with shared memory when the server speaks shmgrpc.

    ``unix:`` targets get ``grpc.default_authority=localhost`` unless ``options`` set one: grpcio otherwise sends
    the percent-encoded socket path as ``:authority``, which tonic (h2) rejects. Message size limits are lifted
    (``-1``) unless set: through shared memory only a small reference crosses the gRPC stream. ``budget`` bounds the
    pool requests are written into (default: 4 GiB, or half the cgroup's memory limit when that is less).

    ``views`` maps full method names (``/package.Service/Method``) to a singular ``bytes`` field of the response:
    those methods return a :class:`shmgrpc.View` (the field read in place from shared memory, the other fields in
    ``.message``) instead of the message, which saves protobuf's copy of the field; release each view once used.
    """
    channel = grpc.insecure_channel(target, options=_channel_options(target, options), compression=compression)
    return ShmChannel(
        channel, shared_memory=shared_memory, threshold=threshold, budget=budget, views=views, unix=_unix_path(target)
    )
