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
from .client import _channel_options, _ChannelBase, _check_hello, _discovery_failed, _handshake, _hello_call, _Refused
from .pool import DEFAULT_BUDGET, Pool
from .protocol import BadReference
from .session import CLIENT, Loaned, Session, decode_message, encode_outgoing, lookup
from .stats import Both, Fallback, Recorder

log = logging.getLogger("shmgrpc")


class AioShmChannel(_ChannelBase):
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
        try:
            try:
                r = _check_hello(
                    await _hello_call(self._channel)(
                        protocol.HelloRequest(version=protocol.PROTOCOL_VERSION), timeout=protocol.HANDSHAKE_TIMEOUT
                    )
                )
            except grpc.aio.AioRpcError as e:
                raise _discovery_failed(e) from None
            loop = asyncio.get_running_loop()
            self._session = await loop.run_in_executor(
                None, _handshake, r.side_channel, r.ticket, r.version, self.pool, self.threshold, self._recorder
            )
        except _Refused as e:
            log.info("shmgrpc: no shared memory with this server (%s); messages go inline", e.reason.value)
            self._fallback = e.reason

    def _callable(self, kind: str, method: str, ser: Any, de: Any, kw: dict[str, Any]) -> Any:
        return _AioCallable(self, kind, method, ser, de, kw)

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
            return encode_outgoing(message, inner, session, threshold, recorder, fallback)

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
    channel = grpc.aio.insecure_channel(target, options=_channel_options(target, options), compression=compression)
    return AioShmChannel(channel, shared_memory=shared_memory, threshold=threshold, pool=pool, budget=budget)
