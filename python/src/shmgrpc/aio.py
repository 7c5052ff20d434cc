"""
The asyncio client: :func:`insecure_channel` for ``grpc.aio``.

The same protocol as :mod:`shmgrpc.client`, with nothing that blocks the event loop: discovery is a ``grpc.aio``
call, the side-channel handshake runs on a worker thread (``await channel.connect()``, or in the background from the
first call), and a reference whose segment's registration has not arrived yet is awaited asynchronously (at most
2 s) before it is decoded. Calls made before the session is ready go inline.

The multi-callables return awaitables (unary responses) or async iterators (streamed responses) that yield the
decoded messages; the other methods of ``grpc.aio`` call objects are not offered.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc
import grpc.aio

from . import protocol
from .client import _handshake, _Refused
from .pool import DEFAULT_BUDGET, Pool
from .protocol import BadReference
from .session import CLIENT, Loan, Loaned, Session, decode_message, lookup
from .stats import Both, Fallback, Recorder

log = logging.getLogger("shmgrpc")


class AioShmChannel:
    """
    A ``grpc.aio`` channel whose calls move large messages through shared memory. Generated ``*Stub`` classes
    work with it: their calls are awaited (``await stub.Echo(...)``) or iterated (``async for``).
    """

    def __init__(
        self,
        channel: grpc.aio.Channel,
        *,
        shared_memory: bool,
        threshold: int,
        pool: Pool | None,
        budget: int,
    ) -> None:
        self._channel = channel
        self.threshold = threshold
        self.pool = pool if pool is not None else Pool(budget=budget)
        self._own = Recorder()
        self._recorder = Both(self._own)
        self._session: Session | None = None
        self._fallback: Fallback | None = None
        self._wanted = shared_memory
        self._connecting: asyncio.Task[None] | None = None

    async def connect(self) -> bool:
        """
        Opens the session (discovery, then the handshake on a worker thread); returns whether shared memory is
        on. Calls started before it completes go inline.
        """
        if not self._wanted:
            return False
        if self._session is None and self._fallback is None:
            if self._connecting is None:
                self._connecting = asyncio.ensure_future(self._establish())
            await asyncio.shield(self._connecting)
        return self.is_shared_memory()

    async def _establish(self) -> None:
        hello = self._channel.unary_unary(
            protocol.HELLO_PATH,
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=protocol.HelloResponse.FromString,
        )
        try:
            try:
                r = await hello(
                    protocol.HelloRequest(version=protocol.PROTOCOL_VERSION), timeout=protocol.HANDSHAKE_TIMEOUT
                )
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.UNIMPLEMENTED:
                    raise _Refused(Fallback.PEER_LACKS_SHMGRPC, "UNIMPLEMENTED") from None
                if e.code() == grpc.StatusCode.FAILED_PRECONDITION:
                    raise _Refused(Fallback.UNSUPPORTED_VERSION, str(e)) from None
                raise _Refused(Fallback.DISCOVERY_FAILED, str(e)) from None
            if not protocol.MIN_PROTOCOL_VERSION <= r.version <= protocol.PROTOCOL_VERSION:
                raise _Refused(Fallback.UNSUPPORTED_VERSION, f"version {r.version}")
            if len(r.ticket) > protocol.MAX_TICKET_LEN:
                raise _Refused(Fallback.DISCOVERY_FAILED, "ticket too long")
            loop = asyncio.get_running_loop()
            self._session = await loop.run_in_executor(
                None, _handshake, r.side_channel, r.ticket, r.version, self.pool, self.threshold, self._recorder
            )
        except _Refused as e:
            log.info("shmgrpc: no shared memory with this server (%s); messages go inline", e.reason.value)
            self._fallback = e.reason

    def is_shared_memory(self) -> bool:
        """Whether large messages currently go through shared memory."""
        return self._session is not None and self._session.alive

    def fallback(self) -> Fallback | None:
        """Why this channel sends inline, if it does (``None`` also while the session is being opened)."""
        if self._session is not None:
            return None if self._session.alive else Fallback.SESSION_CLOSED
        return self._fallback

    def stats(self) -> dict[str, object]:
        """Transfer counters of this channel (see :func:`shmgrpc.stats`)."""
        return self._own.snapshot()

    def loan(self, n: int) -> Loan:
        """See :meth:`shmgrpc.ShmChannel.loan`."""
        s = self._session
        return s.loan(n) if s is not None and s.alive else Loan(n, None, None)

    def unary_unary(
        self, method: str, request_serializer: Any = None, response_deserializer: Any = None, **kw: Any
    ) -> Any:
        """See ``grpc.aio.Channel.unary_unary``."""
        return _AioCallable(self, "unary_unary", method, request_serializer, response_deserializer, kw)

    def unary_stream(
        self, method: str, request_serializer: Any = None, response_deserializer: Any = None, **kw: Any
    ) -> Any:
        """See ``grpc.aio.Channel.unary_stream``."""
        return _AioCallable(self, "unary_stream", method, request_serializer, response_deserializer, kw)

    def stream_unary(
        self, method: str, request_serializer: Any = None, response_deserializer: Any = None, **kw: Any
    ) -> Any:
        """See ``grpc.aio.Channel.stream_unary``."""
        return _AioCallable(self, "stream_unary", method, request_serializer, response_deserializer, kw)

    def stream_stream(
        self, method: str, request_serializer: Any = None, response_deserializer: Any = None, **kw: Any
    ) -> Any:
        """See ``grpc.aio.Channel.stream_stream``."""
        return _AioCallable(self, "stream_stream", method, request_serializer, response_deserializer, kw)

    async def close(self) -> None:
        """Closes the session and the gRPC channel."""
        if self._session is not None:
            self._session.close()
        await self._channel.close()
        self.pool.close()

    async def __aenter__(self) -> AioShmChannel:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _serializer(self, session: Session | None, inner: Any) -> Callable[[Any], bytes]:
        recorder, threshold, fallback = self._recorder, self.threshold, self._fallback

        def serialize(message: Any) -> bytes:
            if isinstance(message, Loaned):
                head = message.head(inner)
                if session is not None:
                    ref = session.encode_loaned(head, message.loan)
                    if ref is not None:
                        return ref
                data = head + message.loan.bytes()
                message.loan.release()
            else:
                data = inner(message) if inner is not None else message
            if len(data) >= threshold:
                if session is not None:
                    ref = session.encode(data)
                    if ref is not None:
                        return ref
                elif fallback is not None:
                    recorder.fallback(fallback)
            recorder.message("sent", "inline", len(data))
            return data

        return serialize

    async def _decode(self, data: bytes, parse: Any) -> Any:
        """Decodes one response; a reference waits asynchronously for the registrations it needs."""
        if protocol.is_reference(data):
            try:
                ref = protocol.decode_reference(bytes(data))
            except BadReference as e:
                raise _status(e) from None
            session = lookup(ref.session, CLIENT)
            if session is not None:
                await session.wait_registered(ref)
        try:
            return decode_message(data, parse, CLIENT, self._recorder)
        except BadReference as e:
            raise _status(e) from None


class ShmRpcError(grpc.RpcError):
    """A response that could not be decoded, with the protocol's status code."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        """The status code (see ``docs/protocol.md`` section 9)."""
        return self._code

    def details(self) -> str:
        """Why."""
        return self._details


def _status(e: BadReference) -> ShmRpcError:
    return ShmRpcError(getattr(grpc.StatusCode, e.code), str(e))


class _AioCallable:
    def __init__(self, ch: AioShmChannel, kind: str, method: str, ser: Any, de: Any, kw: dict[str, Any]) -> None:
        self._ch, self._kind, self._method, self._ser, self._kw = ch, kind, method, ser, kw
        self._parse = de if de is not None else (lambda b: b)
        self._bound: tuple[Session | None, Any] | None = None

    def _inner(self) -> tuple[Any, Sequence[tuple[str, str]]]:
        ch = self._ch
        s = ch._session if ch._session is not None and ch._session.alive else None
        if ch._wanted and ch._session is None and ch._fallback is None and ch._connecting is None:
            ch._connecting = asyncio.ensure_future(ch._establish())  # in the background; this call goes inline
        cached = self._bound
        if cached is None or cached[0] is not s:
            inner = getattr(ch._channel, self._kind)(self._method, ch._serializer(s, self._ser), None, **self._kw)
            cached = self._bound = (s, inner)
        return cached[1], (((protocol.SESSION_HEADER, s.header),) if s is not None else ())

    def __call__(self, request: Any, *, metadata: Sequence[tuple[str, str]] | None = None, **kw: Any) -> Any:
        if isinstance(request, Loaned) and request.loan._sent:
            raise ValueError("a loan is sent once")
        inner, header = self._inner()
        md = (*(metadata or ()), *header)
        call = inner(request, metadata=md or None, **kw)
        if self._kind in ("unary_unary", "stream_unary"):
            return self._unary(call)
        return self._stream(call)

    async def _unary(self, call: Awaitable[bytes]) -> Any:
        return await self._ch._decode(await call, self._parse)

    async def _stream(self, call: AsyncIterator[bytes]) -> AsyncIterator[Any]:
        async for data in call:
            yield await self._ch._decode(data, self._parse)


def insecure_channel(
    target: str,
    options: Sequence[tuple[str, Any]] | None = None,
    compression: grpc.Compression | None = None,
    *,
    shared_memory: bool = True,
    threshold: int = protocol.DEFAULT_THRESHOLD,
    pool: Pool | None = None,
    budget: int = DEFAULT_BUDGET,
) -> AioShmChannel:
    """
    Like ``grpc.aio.insecure_channel``, with shared memory once the session is open (``await
    channel.connect()``, or ``async with``); the same options as :func:`shmgrpc.insecure_channel`.
    """
    opts = list(options or ())
    names = {k for k, _ in opts}
    if target.startswith("unix:") and "grpc.default_authority" not in names:
        opts.append(("grpc.default_authority", "localhost"))
    for key in ("grpc.max_receive_message_length", "grpc.max_send_message_length"):
        if key not in names:
            opts.append((key, -1))
    channel = grpc.aio.insecure_channel(target, options=opts, compression=compression)
    return AioShmChannel(channel, shared_memory=shared_memory, threshold=threshold, pool=pool, budget=budget)
