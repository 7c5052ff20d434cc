"""
The server: :func:`server`, a drop-in for ``grpc.server`` that answers shmgrpc discovery, runs the side channel
and moves large messages of every registered service through shared memory.

Calls that name a live session (``shmgrpc-session`` metadata) get references resolved in their requests and large
responses sent as references; every other call is plain gRPC. A bad reference gets the protocol's status
(``docs/protocol.md`` section 9), never a crash.
"""

from __future__ import annotations

import contextvars
import functools
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grpc

from . import _codec, _core
from ._core import Loan, Session, StatusError
from .client import PROTOCOL_VERSION, PoolView
from .stats import Stats

log = logging.getLogger("shmgrpc")

CURRENT: contextvars.ContextVar[Session | None] = contextvars.ContextVar("shmgrpc_session", default=None)
"""The session of the call an asyncio handler serves (see :mod:`shmgrpc._aio_server`)."""

CALL: contextvars.ContextVar[_core.Call | None] = contextvars.ContextVar("shmgrpc_call", default=None)
"""The numbered call (protocol version 3) an asyncio handler serves."""


def session_of(core: _core.Server, metadata: Any) -> tuple[Session | None, _core.Call | None]:
    """
    The live session a call's ``shmgrpc-session`` header names, and in a session of protocol version 3 the scope of
    the call its ``shmgrpc-call`` header numbers: our responses are the call's numbered messages, and if the handler
    stops reading the request stream early, the client learns how many it read when the call ends (``CallEnd``).
    """
    return core.session_of(metadata)


def _is_ours(h: grpc.RpcMethodHandler) -> bool:
    """Whether a method handler already decodes and encodes through shmgrpc."""
    return isinstance(h.request_deserializer, _core.Deserializer)


class _Guard(grpc.ServerInterceptor):
    """
    An application's interceptor, made to pass shmgrpc's discovery untouched (it carries no application metadata),
    and whose own handlers (a rejection, say) still resolve and release the references of the requests they get.
    """

    def __init__(self, server: Callable[[], ShmServer | None], inner: grpc.ServerInterceptor) -> None:
        self._server, self._inner = server, inner

    def intercept_service(self, continuation: Any, handler_call_details: grpc.HandlerCallDetails) -> Any:
        if handler_call_details.method == _core.HELLO_PATH:
            return continuation(handler_call_details)
        h = self._inner.intercept_service(continuation, handler_call_details)
        server = self._server()
        return _wrap(server, h) if h is not None and server is not None else h


class _Failed:
    """A request that could not be decoded: the handler aborts the call with this status."""

    def __init__(self, e: StatusError) -> None:
        self.code = _codec.status_code(e)
        self.message = str(e.args[1])


class ServerBase:
    """What the thread and the asyncio servers share: the core server (side channel, sessions, pool) and figures."""

    def __init__(
        self,
        inner: Any,
        hello: type[_HelloHandler],
        *,
        threshold: int,
        side_channel: str | None,
        allowed_uids: Sequence[int] | None,
        budget: int | None,
        views: dict[str, str] | None,
    ) -> None:
        self._inner = inner
        self.threshold = threshold
        self._views = dict(views or {})
        self._shm = _core.Server(
            threshold=threshold,
            side_channel=side_channel,
            allowed_uids=list(allowed_uids) if allowed_uids is not None else None,
            budget=budget,
            protocol_version=PROTOCOL_VERSION,
        )
        self._counters = self._shm.counters()
        self.side_channel_path = self._shm.side_channel_path
        self.pool = PoolView(self._shm.pool_stats)
        inner.add_generic_rpc_handlers((hello(self._shm),))

    def stats(self) -> Stats:
        """Transfer counters of this server (see :func:`shmgrpc.stats`)."""
        return self._counters.snapshot()

    def sessions(self) -> int:
        """Sessions currently open."""
        return self._shm.sessions()

    def session_stats(self) -> dict[str, int]:
        """Figures summed over the open sessions (``holds``, ``held_bytes``, ``peer_segments``, ...)."""
        return self._shm.session_stats()

    def session_figures(self) -> dict[str, int]:
        """Holds and peer segments summed over the open sessions."""
        s = self._shm.session_stats()
        return {"holds": s["holds"], "peer_segments": s["peer_segments"]}

    def _wrap(self, h: grpc.RpcMethodHandler, method: str | None) -> grpc.RpcMethodHandler:
        """``h`` with shmgrpc's decoding and encoding around it (the thread or the asyncio server's way)."""
        raise NotImplementedError

    def add_generic_rpc_handlers(self, generic_rpc_handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        """See ``grpc.Server.add_generic_rpc_handlers``; every handler's methods move through shared memory."""
        self._inner.add_generic_rpc_handlers(tuple(_Generic(self, h) for h in generic_rpc_handlers))

    def add_registered_method_handlers(self, service_name: str, method_handlers: dict[str, Any]) -> None:
        """See ``grpc.Server.add_registered_method_handlers``."""
        wrapped = {name: self._wrap(h, f"/{service_name}/{name}") for name, h in method_handlers.items()}
        add = getattr(self._inner, "add_registered_method_handlers", None)
        if add is not None:
            add(service_name, wrapped)

    def add_insecure_port(self, address: str) -> int:
        """See ``grpc.Server.add_insecure_port``."""
        return int(self._inner.add_insecure_port(address))

    def add_secure_port(self, address: str, server_credentials: grpc.ServerCredentials) -> int:
        """See ``grpc.Server.add_secure_port``."""
        return int(self._inner.add_secure_port(address, server_credentials))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class ShmServer(ServerBase):
    """A ``grpc.Server`` with shmgrpc (see the module docs). Every ``grpc.Server`` method works as usual."""

    def __init__(
        self,
        inner: grpc.Server,
        *,
        threshold: int = _core.DEFAULT_THRESHOLD,
        side_channel: str | None = None,
        allowed_uids: Sequence[int] | None = None,
        budget: int | None = None,
        views: dict[str, str] | None = None,
    ) -> None:
        self._stopped = False
        super().__init__(
            inner,
            _HelloHandler,
            threshold=threshold,
            side_channel=side_channel,
            allowed_uids=allowed_uids,
            budget=budget,
            views=views,
        )

    def _wrap(self, h: grpc.RpcMethodHandler, method: str | None) -> grpc.RpcMethodHandler:
        return _wrap(self, h, method)

    # ---- grpc.Server ----
    def start(self) -> None:
        """See ``grpc.Server.start``."""
        self._inner.start()

    def stop(self, grace: float | None) -> threading.Event:
        """Stops the gRPC server, the side channel and every session."""
        event = self._inner.stop(grace)
        self._close()
        return event

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        """See ``grpc.Server.wait_for_termination``."""
        return self._inner.wait_for_termination(timeout)

    def _close(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._shm.close()


class _HelloHandler(grpc.GenericRpcHandler):
    """Answers ``/shmgrpc.v1.Session/Hello`` (protocol section 2) with the core's ticket and side channel."""

    def __init__(self, core: _core.Server) -> None:
        self.core = core

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        if handler_call_details.method != _core.HELLO_PATH:
            return None
        return grpc.unary_unary_rpc_method_handler(self._hello)

    def answer(self, request: bytes) -> tuple[bytes | None, grpc.StatusCode, str]:
        """The answer to a discovery request, or the status to abort with."""
        try:
            return self.core.answer_hello(request), grpc.StatusCode.OK, ""
        except StatusError as e:
            return None, _codec.status_code(e), str(e.args[1])
        except ValueError as e:
            return None, grpc.StatusCode.UNAVAILABLE, str(e)

    def _hello(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        answer, code, details = self.answer(request)
        if answer is None:
            context.abort(code, details)
        return answer  # type: ignore[return-value]


class _Generic(grpc.GenericRpcHandler):
    def __init__(self, server: ServerBase, inner: grpc.GenericRpcHandler) -> None:
        self._server, self._inner = server, inner

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        h = self._inner.service(handler_call_details)
        return self._server._wrap(h, handler_call_details.method) if h is not None else None


def _wrap(
    server: ServerBase, h: grpc.RpcMethodHandler, method: str | None = None, *, encode_in_handler: bool = False
) -> grpc.RpcMethodHandler:
    """
    The same method with shmgrpc's request decoding and response encoding around its (de)serializers; for a method
    named in the server's ``views``, the handler gets a :class:`shmgrpc.View` of the request.

    ``encode_in_handler`` (a synchronous handler on the asyncio server, which grpcio runs on a worker thread but
    whose responses it serializes on the event loop): responses are encoded on the thread that makes them, where
    the call is entered, and the serializer passes the encoded bytes on.
    """
    if _is_ours(h):
        return h
    core, counters, threshold = server._shm, server._counters, server.threshold
    de = h.request_deserializer
    field = server._views.get(method) if method is not None else None
    if field is not None and de is not None:
        de = _codec.ViewOf(de, field)
    ser = h.response_serializer

    def slow_deserialize(data: bytes) -> Any:
        # grpcio calls this on its server thread, which every call shares: a reference that overtook its segment's
        # registration is resolved by the call's own handler thread instead (`check`), which may wait for it.
        if _core.is_reference(data) and core.needs_wait(data):
            return _codec.Deferred(data, de)
        try:
            return _codec.decode(data, de, lambda d: core.receive(d, False), counters)
        except StatusError as e:
            return _Failed(e)

    def slow_serialize(message: Any, large: dict[str, Any] | None = None) -> bytes:
        if isinstance(message, _codec.Encoded):
            return message.data  # encoded where the handler ran (`encode_in_handler`)
        session, call, _ = _core.current()
        return _codec.settle(_codec.encode(message, ser, session, counters, threshold, None, call, large))

    # Inline messages take the Rust fast path; the rest these slow paths. The response serializer sends through
    # the session of the call its thread serves (`enter`).
    plain = de if de is not None and not isinstance(de, _codec.ViewOf) else None
    deserialize = _core.Deserializer(plain, slow_deserialize, counters)
    fields = functools.partial(_codec.large_fields, serialize=ser)
    serialize = _core.Serializer(ser, slow_serialize, fields, counters, threshold, thread=True)

    def enter(context: grpc.ServicerContext) -> _core.Call | None:
        # The response serializer runs on this thread after the behaviour returns (and while a response iterator
        # is consumed): the call's session is left current until the next call on this thread sets its own.
        call = core.enter(context.invocation_metadata(), False)
        if call is not None:
            context.add_callback(call.end)
        return call

    def check(request: Any, context: grpc.ServicerContext) -> Any:
        if isinstance(request, _codec.Deferred):
            try:
                request = _codec.decode(request.data, request.parse, lambda d: core.receive(d, True), counters)
            except StatusError as e:
                request = _Failed(e)
        if isinstance(request, _Failed):
            context.abort(request.code, request.message)
        return request

    def checked_iter(requests: Iterator[Any], context: grpc.ServicerContext, call: _core.Call | None) -> Iterator[Any]:
        for r in requests:
            if call is not None:
                call.received()
            yield check(r, context)
        if call is not None:
            call.complete()

    def unary_in(behaviour: Callable[..., Any]) -> Callable[..., Any]:
        # In Rust (the hot path of small calls): enters the call, hands `check` an unfinished request.
        return _core.UnaryHandler(behaviour, core, check, (_codec.Deferred, _Failed))

    def stream_in(behaviour: Callable[..., Any]) -> Callable[..., Any]:
        def run(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
            call = enter(context)
            return behaviour(checked_iter(requests, context, call), context)

        return run

    def encoded(message: Any) -> Any:
        return None if message is None else _codec.Encoded(serialize(message))

    def encoding_one(run: Callable[..., Any]) -> Callable[..., Any]:
        return lambda request, context: encoded(run(request, context))

    def encoding_each(run: Callable[..., Any]) -> Callable[..., Any]:
        def each(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            for message in run(request, context):
                yield encoded(message)

        return each

    one, each = (encoding_one, encoding_each) if encode_in_handler else (lambda f: f, lambda f: f)
    kw = {"request_deserializer": deserialize, "response_serializer": serialize}
    if h.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(one(unary_in(h.unary_unary)), **kw)
    if h.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(each(unary_in(h.unary_stream)), **kw)
    if h.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(one(stream_in(h.stream_unary)), **kw)
    return grpc.stream_stream_rpc_method_handler(each(stream_in(h.stream_stream)), **kw)


def loan(n: int) -> Loan:
    """
    Inside a handler: a buffer of ``n`` bytes to write a response payload into and send without a copy (see
    :class:`shmgrpc.Loan`); ordinary memory when the call has no session.
    """
    session: Session | None = CURRENT.get() or _core.current()[0]
    if session is not None and session.alive:
        return session.loan(n)
    return _core.heap_loan(n)


def server(
    thread_pool: Any,
    handlers: Sequence[grpc.GenericRpcHandler] | None = None,
    interceptors: Sequence[grpc.ServerInterceptor] | None = None,
    options: Sequence[tuple[str, Any]] | None = None,
    maximum_concurrent_rpcs: int | None = None,
    compression: grpc.Compression | None = None,
    *,
    threshold: int = _core.DEFAULT_THRESHOLD,
    side_channel: str | None = None,
    allowed_uids: Sequence[int] | None = None,
    budget: int | None = None,
    views: dict[str, str] | None = None,
) -> ShmServer:
    """
    Like ``grpc.server``, with shmgrpc: discovery, the side channel (at ``side_channel``: a path, mode 0600, or
    ``@name`` for an abstract socket; a fresh path in the temporary directory by default) and references both ways.
    Sessions are opened for the uids in ``allowed_uids``, which *replaces* the default set (the server's own uid
    and root), as ``ServerConfig::allowed_uids`` does in Rust. ``budget`` bounds the pool responses are written into
    (default: 4 GiB, or half the cgroup's memory limit when that is less). ``views`` maps full method names to a
    singular ``bytes`` field of the request: those handlers get a :class:`shmgrpc.View` (the field in place in the
    client's memory, the other fields in ``.message``), and ``shmgrpc.loaned(reply, field, view)`` sends it back
    without a copy. Message size limits are lifted (``-1``) unless ``options`` set them.
    """
    opts = list(options or ())
    names = {k for k, _ in opts}
    for key in ("grpc.max_receive_message_length", "grpc.max_send_message_length"):
        if key not in names:
            opts.append((key, -1))
    holder: list[ShmServer] = []
    guarded = [_Guard(lambda: holder[0] if holder else None, i) for i in interceptors or ()]
    inner = grpc.server(
        thread_pool,
        interceptors=guarded or None,
        options=opts,
        maximum_concurrent_rpcs=maximum_concurrent_rpcs,
        compression=compression,
    )
    s = ShmServer(
        inner, threshold=threshold, side_channel=side_channel, allowed_uids=allowed_uids, budget=budget, views=views
    )
    holder.append(s)
    if handlers:
        s.add_generic_rpc_handlers(handlers)
    return s
