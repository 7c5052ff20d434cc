"""
The asyncio server: :func:`server`, a drop-in for ``grpc.aio.server`` (exported as ``shmgrpc.aio.server``).

Handlers are written as for ``grpc.aio`` (``async def``, async generators, async request iterators). Nothing that
waits for a peer runs on the event loop: a request whose reference overtook its segment's registration is resolved
on a worker thread, responses are encoded in the handler's wrapper (a large one, and any wait for the client's
answer, on a worker thread), and the response serializer only passes the encoded bytes on. ``shmgrpc.loan(n)``
works inside async handlers (the call's session is a context variable).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc
import grpc.aio

from . import _codec, _core
from ._core import Session, StatusError
from .server import CALL, CURRENT, ServerBase, _Failed, _HelloHandler, _is_ours, session_of

LARGE = 1 << 20
"""Responses from this size up are encoded (copied into shared memory) on a worker thread."""


class AioShmServer(ServerBase):
    """A ``grpc.aio.Server`` with shmgrpc (see the module docs). Every ``grpc.aio.Server`` method works as usual."""

    def __init__(
        self,
        inner: grpc.aio.Server,
        *,
        threshold: int,
        side_channel: str | None,
        allowed_uids: Sequence[int] | None,
        budget: int | None,
        views: dict[str, str] | None = None,
    ) -> None:
        super().__init__(
            inner,
            _AioHello,
            threshold=threshold,
            side_channel=side_channel,
            allowed_uids=allowed_uids,
            budget=budget,
            views=views,
        )

    def _wrap(self, h: grpc.RpcMethodHandler, method: str | None) -> grpc.RpcMethodHandler:
        return _wrap_aio(self, h, method)

    # ---- grpc.aio.Server ----
    async def start(self) -> None:
        """See ``grpc.aio.Server.start``."""
        await self._inner.start()

    async def stop(self, grace: float | None) -> None:
        """Stops the gRPC server, then the side channel and every session."""
        await self._inner.stop(grace)
        await asyncio.get_running_loop().run_in_executor(None, self._shm.close)

    async def wait_for_termination(self, timeout: float | None = None) -> bool:
        """See ``grpc.aio.Server.wait_for_termination``."""
        return await self._inner.wait_for_termination(timeout)


class _AioHello(_HelloHandler):
    """Answers discovery (protocol section 2) on the event loop: issuing a ticket never waits."""

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        if handler_call_details.method != _core.HELLO_PATH:
            return None
        return grpc.unary_unary_rpc_method_handler(self._aio_hello)

    async def _aio_hello(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        answer, code, details = self.answer(request)
        if answer is None:
            await context.abort(code, details)
        return answer  # type: ignore[return-value]


def _wrap_aio(server: AioShmServer, h: grpc.RpcMethodHandler, method: str | None = None) -> grpc.RpcMethodHandler:
    """The method with shmgrpc's decoding and encoding around it, nothing of it waiting on the event loop."""
    if _is_ours(h):
        return h
    core, counters, threshold = server._shm, server._counters, server.threshold
    de, ser = h.request_deserializer, h.response_serializer
    field = server._views.get(method) if method is not None else None
    if field is not None and de is not None:
        de = _codec.ViewOf(de, field)
    behaviour = h.unary_unary or h.unary_stream or h.stream_unary or h.stream_stream
    if not (inspect.iscoroutinefunction(behaviour) or inspect.isasyncgenfunction(behaviour)):
        # A synchronous handler (run on the server's migration thread pool): the thread server's wrapper, its
        # responses encoded on that thread (grpcio serializes them on the event loop, where no call is entered).
        from .server import _wrap

        return _wrap(server, h, method, encode_in_handler=True)

    def slow_deserialize(data: bytes) -> Any:
        if _core.is_reference(data) and core.needs_wait(data):
            return _codec.Deferred(data, de)  # resolved by the wrapper, on a worker thread
        try:
            return _codec.decode(data, de, lambda d: core.receive(d, False), counters)
        except StatusError as e:
            return _Failed(e)

    def serialize(message: Any) -> bytes:
        if isinstance(message, _codec.Encoded):
            return message.data
        # A message written with `context.write`: encoded here, on the loop, which must not wait for the client: a
        # message that would (a new segment's registration, a full window) goes inline instead.
        return _codec.settle_now(_codec.encode(message, ser, CURRENT.get(), counters, threshold, None, CALL.get()))

    async def resolve(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, _codec.Deferred):
            loop = asyncio.get_running_loop()
            try:
                received = await loop.run_in_executor(None, core.receive, request.data, True)
                request = _codec.decode(request.data, de, lambda _: received, counters)
            except StatusError as e:
                request = _Failed(e)
        if isinstance(request, _Failed):
            await context.abort(request.code, request.message)
        return request

    async def requests_of(it: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        call = CALL.get()
        async for r in it:
            if call is not None:
                call.received()
            yield await resolve(r, context)
        if call is not None:
            call.complete()

    async def encode(message: Any, session: Session | None, large: dict[str, bytes] | None = None) -> _codec.Encoded:
        items = _codec.prepare(message, ser, session, large)
        args = (items, session, counters, threshold, None, CALL.get())
        if session is not None and sum(len(x) for x in items) >= LARGE:
            loop = asyncio.get_running_loop()
            return _codec.Encoded(await loop.run_in_executor(None, lambda: _codec.settle(_codec.send(*args))))
        return _codec.Encoded(await _codec.settle_async(_codec.send(*args)))

    def enter(context: grpc.aio.ServicerContext, unary: bool = False) -> Session | None:
        session, call = session_of(core, context.invocation_metadata())
        if call is not None and unary:
            # A unary request is read to its end at once: the scope's `end` would have nothing to say.
            call.received()
            call.complete()
        elif call is not None:
            context.add_done_callback(lambda _: call.end())
        CURRENT.set(session)
        CALL.set(call)
        return session

    async def unary_in(request: Any, context: grpc.aio.ServicerContext) -> Any:
        session = enter(context, unary=True)
        if isinstance(request, (_codec.Deferred, _Failed)):
            request = await resolve(request, context)
        response = await behaviour(request, context)
        if response is None:
            return None
        # A small response: encoded, counted and numbered in one Rust call; anything else below (a large one from
        # the field values that call read: each read copies).
        data = fast.inline(response, CALL.get(), session) if not isinstance(response, _codec.Loaned) else None
        if isinstance(data, bytes):
            return _codec.Encoded(data)
        return await encode(response, session, data)

    async def stream_in(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
        session = enter(context)
        response = await behaviour(requests_of(requests, context), context)
        return None if response is None else await encode(response, session)

    def streaming(request_in: Callable[[Any, Any], Any], unary: bool) -> Callable[..., AsyncIterator[Any]]:
        async def run(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            session = enter(context, unary)
            source = behaviour(await request_in(request, context), context)
            if inspect.isasyncgen(source):
                async for response in source:
                    yield await encode(response, session)
            else:
                await source  # writes with `context.write` (encoded by the serializer)

        return run

    async def one_request(request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await resolve(request, context)

    async def many_requests(requests: Any, context: grpc.aio.ServicerContext) -> Any:
        return requests_of(requests, context)

    plain = de if de is not None and not isinstance(de, _codec.ViewOf) else None
    deserialize = _core.Deserializer(plain, slow_deserialize, counters)  # inline messages: the Rust fast path
    fields = functools.partial(_codec.large_fields, serialize=ser)
    fast = _core.Serializer(ser, _codec.inline_only, fields, counters, threshold)  # `inline` only
    kw = {"request_deserializer": deserialize, "response_serializer": serialize}
    if h.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(unary_in, **kw)
    if h.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(streaming(one_request, unary=True), **kw)
    if h.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(stream_in, **kw)
    return grpc.stream_stream_rpc_method_handler(streaming(many_requests, unary=False), **kw)


class _AioGuard(grpc.aio.ServerInterceptor):
    """
    An application's interceptor, made to pass shmgrpc's discovery untouched (it carries no application metadata),
    and whose own handlers (a rejection, say) still resolve and release the references of the requests they get.
    """

    def __init__(self, server: Callable[[], AioShmServer | None], inner: grpc.aio.ServerInterceptor) -> None:
        self._server, self._inner = server, inner

    async def intercept_service(self, continuation: Any, handler_call_details: grpc.HandlerCallDetails) -> Any:
        if handler_call_details.method == _core.HELLO_PATH:
            return await continuation(handler_call_details)
        h = await self._inner.intercept_service(continuation, handler_call_details)
        server = self._server()
        return _wrap_aio(server, h) if h is not None and server is not None else h


def server(
    migration_thread_pool: Any = None,
    handlers: Sequence[grpc.GenericRpcHandler] | None = None,
    interceptors: Sequence[Any] | None = None,
    options: Sequence[tuple[str, Any]] | None = None,
    maximum_concurrent_rpcs: int | None = None,
    compression: grpc.Compression | None = None,
    *,
    threshold: int = _core.DEFAULT_THRESHOLD,
    side_channel: str | None = None,
    allowed_uids: Sequence[int] | None = None,
    budget: int | None = None,
    views: dict[str, str] | None = None,
) -> AioShmServer:
    """
    Like ``grpc.aio.server``, with shmgrpc; the same options as :func:`shmgrpc.server`. ``interceptors`` see every
    application call; shmgrpc's discovery passes them untouched.
    """
    opts = list(options or ())
    names = {k for k, _ in opts}
    for key in ("grpc.max_receive_message_length", "grpc.max_send_message_length"):
        if key not in names:
            opts.append((key, -1))
    holder: list[AioShmServer] = []
    guarded = [_AioGuard(lambda: holder[0] if holder else None, i) for i in interceptors or ()]
    inner = grpc.aio.server(
        migration_thread_pool,
        interceptors=guarded or None,
        options=opts,
        maximum_concurrent_rpcs=maximum_concurrent_rpcs,
        compression=compression,
    )
    s = AioShmServer(
        inner,
        threshold=threshold,
        side_channel=side_channel,
        allowed_uids=allowed_uids,
        budget=budget,
        views=views,
    )
    holder.append(s)
    if handlers:
        s.add_generic_rpc_handlers(handlers)
    return s
