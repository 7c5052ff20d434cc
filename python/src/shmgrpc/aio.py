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
import functools
import logging
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

import grpc
import grpc.aio

from . import _codec, _core
from ._aio_server import AioShmServer, server
from ._codec import ShmRpcError, ViewOf
from ._core import StatusError
from .client import _UNARY_REQUEST, _channel_options, _ChannelBase, _discovery_failed, _unix_path

__all__ = ["AioShmChannel", "AioShmServer", "ShmRpcError", "insecure_channel", "server"]

log = logging.getLogger("shmgrpc")

LARGE = 1 << 20
"""Messages from this size up are serialized and copied off the event loop."""


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
        budget: int | None,
        views: dict[str, str] | None = None,
        unix: str | None = None,
    ) -> None:
        self._channel = channel
        self._views = dict(views or {})
        self._init_base(threshold, budget, shared_memory, unix)
        self._connecting: asyncio.Future[None] | None = None

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
                hello = await self._channel.unary_unary(_core.HELLO_PATH)(
                    self._shm.hello_request(), timeout=_core.HANDSHAKE_TIMEOUT
                )
            except grpc.aio.AioRpcError as e:
                self._settle(None, _discovery_failed(e))
                return
            await asyncio.get_running_loop().run_in_executor(None, self._settle, hello, None)
        finally:
            self._trying = False

    def _maybe_connect(self) -> None:
        """Opens the session in the background on first use, or again (at most once a second) once it ended."""
        if self._session is None and self._fallback is None and self._connecting is None and self._wanted:
            self._connecting = asyncio.ensure_future(self._establish())
        elif self._want_retry():
            self._connecting = asyncio.ensure_future(self._establish())

    def _callable(self, kind: str, method: str, ser: Any, de: Any, kw: dict[str, Any]) -> Any:
        return _AioCallable(self, kind, method, ser, de, kw)

    async def close(self) -> None:
        """Closes the session and the gRPC channel."""
        self._wanted = False
        if self._session is not None:
            self._session.close()
        await self._channel.close()
        self._shm.trim()

    async def __aenter__(self) -> AioShmChannel:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _encode_async(
        self, session: Any, ser: Any, message: Any, call: Any = None, large: dict[str, bytes] | None = None
    ) -> bytes:
        """
        One request's bytes. A large message is serialized and copied into shared memory on a worker thread, and
        a wait for the server (a registration, the window) runs off the event loop too: the loop never stalls.
        ``large``: the values of its large ``bytes`` fields when ``Serializer.inline`` read them already.
        """
        items = _codec.prepare(message, ser, session, large)
        send = (items, session, self._counters, self.threshold, self._fallback, call)
        if session is not None and sum(len(x) for x in items) >= LARGE:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(None, lambda: _codec.settle(_codec.send(*send)))
        return await _codec.settle_async(_codec.send(*send))

    async def _decode_held_back(self, data: bytes, parse: Any) -> Any:
        """
        A response reference that overtook its segment's registration: waited for (at most 2 s) on a worker
        thread, then decoded.
        """
        try:
            received = await asyncio.get_running_loop().run_in_executor(None, self._shm.receive, data, True)
            return _codec.decode(data, parse, lambda _: received, self._counters)
        except StatusError as e:
            raise ShmRpcError(_codec.status_code(e), str(e.args[1])) from None


class _AioCallable:
    def __init__(self, ch: AioShmChannel, kind: str, method: str, ser: Any, de: Any, kw: dict[str, Any]) -> None:
        self._ch, self._kind, self._method, self._ser = ch, kind, method, ser
        field = ch._views.get(method)
        self._parse = ViewOf(de, field) if field is not None and de is not None else de
        # Requests are encoded here (a wait must not block the loop) and responses decoded here: the inner
        # multi-callable moves bytes.
        self._inner = getattr(ch._channel, kind)(method, None, None, **kw)
        # The Rust fast paths: a small request encoded and counted in one call (`_core.Serializer.inline`, made per
        # session), an inline response parsed and counted (`_core.Deserializer`); the rest is the code below.
        plain = de if de is not None and not isinstance(self._parse, ViewOf) else None
        # A unary method's sizes decide whether its calls need the session's header (see `_core.SizeHint`).
        self._hint = _core.SizeHint(ch.threshold) if kind == "unary_unary" else None
        self._de = _core.Deserializer(plain, self._decode_now, ch._counters, self._hint)
        self._fast: tuple[Any, Any] | None = None
        self._plain: Any = None

    def _serializer_for(self, s: Any) -> Any:
        """The Rust serializer for requests through session ``s`` (or none), made once per session."""
        fast = self._fast
        if fast is None or fast[0] is not s:
            fields = functools.partial(_codec.large_fields, serialize=self._ser)
            ch = self._ch
            fast = self._fast = (
                s,
                _core.Serializer(self._ser, _codec.inline_only, fields, ch._counters, ch.threshold, session=s),
            )
        return fast[1]

    def _plain_serializer(self) -> Any:
        """The Rust serializer for requests sent inline without the header (made once)."""
        if self._plain is None:
            fields = functools.partial(_codec.large_fields, serialize=self._ser)
            ch = self._ch
            self._plain = _core.Serializer(self._ser, _codec.inline_only, fields, ch._counters, ch.threshold)
        return self._plain

    def _decode_now(self, data: bytes) -> Any:
        """A response the Rust deserializer does not take (a reference, a view), decoded without waiting."""
        return _codec.decode(data, self._parse, lambda d: self._ch._shm.receive(d, False), self._ch._counters)

    def __call__(self, request: Any, *, metadata: Sequence[tuple[str, str]] | None = None, **kw: Any) -> Any:
        _codec._check_loan(request)
        ch = self._ch
        ch._maybe_connect()
        s = ch._live()
        large = None
        hint = self._hint
        if hint is not None and s is not None and not hint.wants_session(s) and not isinstance(request, _codec.Loaned):
            # Every message of the method so far was small: a small request goes without the header.
            try:
                data = self._plain_serializer().inline(request)
            except Exception:
                # Not a sign of size: the path below raises it again, when the call is awaited (as grpc.aio does).
                data = ()
            if isinstance(data, bytes):
                return self._unary(data, metadata or None, kw, None, request)
            if data != ():
                hint.saw_large()  # a large request: this and every later call go through the session
                large = data  # the large fields' values (or None), read once: sent from these
        # Protocol version 3 and later: the call's number tags its messages. A unary request is encoded before the
        # call starts (below): its scope needs no place in the ledger of open calls.
        call = None if s is None else s.unary_call() if self._kind in _UNARY_REQUEST else s.call()
        header = s.headers(call.number if call is not None else None) if s is not None else ()
        md = (*(metadata or ()), *header) or None
        if self._kind == "unary_unary" and large is None and not isinstance(request, _codec.Loaned):
            try:
                data = self._serializer_for(s).inline(request, call)
            except Exception:
                data = None  # the path below raises it again, when the call is awaited (as grpc.aio does)
            if isinstance(data, bytes):
                return self._unary(data, md, kw, call, request)
            large = data  # the large fields' values, read once (a read copies): sent from these
        if self._kind in ("unary_unary", "unary_stream"):
            requests: Any = self._one(s, request, call, large)
        else:
            requests = self._many(s, request, call)
        if self._kind in ("unary_unary", "stream_unary"):
            return self._unary(requests, md, kw, call, request)
        return self._stream(requests, md, kw, call, request)

    async def _read(self, data: bytes) -> Any:
        """One response: a reference that overtook its registration is awaited off the loop, the rest decoded now."""
        if _core.is_reference(data) and self._ch._shm.needs_wait(data):
            if self._hint is not None:
                self._hint.saw_large()
            return await self._ch._decode_held_back(data, self._parse)
        try:
            return self._de(data)
        except StatusError as e:
            raise ShmRpcError(_codec.status_code(e), str(e.args[1])) from None

    async def _one(self, s: Any, request: Any, call: Any, large: dict[str, bytes] | None = None) -> bytes:
        return await self._ch._encode_async(s, self._ser, request, call, large)

    async def _many(self, s: Any, requests: Iterable[Any] | AsyncIterator[Any], call: Any) -> AsyncIterator[bytes]:
        if hasattr(requests, "__aiter__"):
            async for r in requests:
                yield await self._ch._encode_async(s, self._ser, r, call)
        else:
            for r in requests:
                yield await self._ch._encode_async(s, self._ser, r, call)

    async def _unary(self, requests: Any, md: Any, kw: dict[str, Any], call: Any, keep: Any) -> Any:
        # `keep` is the caller's request, held until the call ends as stock `grpc.aio` holds it. Let go of as soon
        # as it is encoded, a large message's blocks were freed while the reply was awaited, and glibc returned
        # them to the system, so the reply's parse found fresh pages (tests/test_aio.py).
        try:
            if isinstance(requests, bytes) or self._kind != "unary_unary":
                request = requests  # encoded already, or a stream of requests
            else:
                request = await requests
            reply = await self._read(await self._inner(request, metadata=md, **kw))
        except BaseException:
            if call is not None:
                call.end()  # cancelled or failed before the response was read: the server drops what it sent
            raise
        if call is not None:
            call.received()
            call.complete()
        return reply

    async def _stream(self, requests: Any, md: Any, kw: dict[str, Any], call: Any, keep: Any) -> AsyncIterator[Any]:
        # `keep`: the caller's request, held until the call ends (see `_unary`).
        try:
            request = await requests if self._kind == "unary_stream" else requests
            async for data in self._inner(request, metadata=md, **kw):
                item = await self._read(data)
                if call is not None:
                    call.received()
                yield item
            if call is not None:
                call.complete()
        finally:
            # Left early (the caller stopped iterating, or cancelled): the server learns how many were read.
            if call is not None:
                call.end()


def insecure_channel(
    target: str,
    options: Sequence[tuple[str, Any]] | None = None,
    compression: grpc.Compression | None = None,
    *,
    shared_memory: bool = True,
    threshold: int = _core.DEFAULT_THRESHOLD,
    budget: int | None = None,
    views: dict[str, str] | None = None,
    interceptors: Sequence[Any] | None = None,
) -> AioShmChannel:
    """
    Like ``grpc.aio.insecure_channel``, with shared memory once the session is open (``await
    channel.connect()``, or ``async with``); the same options as :func:`shmgrpc.insecure_channel`, and
    ``interceptors`` as ``grpc.aio.insecure_channel`` takes them (they see each call's metadata, shmgrpc's session
    header included, and its messages as the bytes that go on the wire).
    """
    channel = grpc.aio.insecure_channel(
        target, options=_channel_options(target, options), compression=compression, interceptors=interceptors
    )
    return AioShmChannel(
        channel,
        shared_memory=shared_memory,
        threshold=threshold,
        budget=budget,
        views=views,
        unix=_unix_path(target),
    )
