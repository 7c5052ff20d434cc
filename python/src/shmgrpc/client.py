"""
The client: :func:`insecure_channel`, a ``grpc.Channel`` that moves large messages through shared memory.

On creation the channel asks the server for shmgrpc (``/shmgrpc.v1.Session/Hello``) and, when it answers, opens a
session on the server's side channel (uid checks, the memfd challenge). Requests whose encoded size reaches the
threshold are written into a pooled sealed memfd and only a reference crosses the gRPC stream; responses that are
references are resolved from the server's segments. Without a session every message is plain gRPC, and
:meth:`ShmChannel.fallback` says why. Generated stubs work unchanged.
"""

from __future__ import annotations

import logging
import mmap
import os
import socket
import time
from collections.abc import Sequence
from typing import Any, Callable

import grpc

from . import protocol
from ._io import FrameReader, peer_cred, recv_with_fds
from .pool import DEFAULT_BUDGET, Pool
from .protocol import BadReference
from .segment import REQUIRED_SEALS
from .session import CLIENT, Loan, Loaned, Session, ViewOf, decode_message, encode_outgoing
from .stats import Both, Fallback, Recorder

log = logging.getLogger("shmgrpc")


class _Refused(Exception):
    def __init__(self, reason: Fallback, why: str) -> None:
        super().__init__(why)
        self.reason = reason


def _handshake(path: str, ticket: bytes, version: int, pool: Pool, threshold: int, recorder: Both) -> Session:
    """The client's side-channel handshake (protocol section 4), blocking with timeouts; the session on success."""
    if not os.path.isabs(path):
        raise _Refused(Fallback.SIDE_CHANNEL_UNREACHABLE, "side channel path is not absolute")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    deadline = time.monotonic() + protocol.HANDSHAKE_TIMEOUT
    try:
        sock.settimeout(protocol.HANDSHAKE_TIMEOUT)
        try:
            sock.connect(path)
        except OSError as e:
            raise _Refused(Fallback.SIDE_CHANNEL_UNREACHABLE, str(e)) from None
        pid, uid, _ = peer_cred(sock)
        if uid not in (os.getuid(), 0):
            raise _Refused(Fallback.HANDSHAKE_FAILED, "the side channel belongs to another uid")
        reader = FrameReader()
        pending: list[tuple[Any, int | None]] = []

        def next_frame() -> tuple[Any, int | None]:
            while not pending:
                sock.settimeout(max(0.01, deadline - time.monotonic()))
                data, fds = recv_with_fds(sock)
                if not data:
                    raise _Refused(Fallback.HANDSHAKE_FAILED, "side channel closed during the handshake")
                pending.extend(reader.feed(data, fds))
            return pending.pop(0)

        sock.sendall(protocol.encode_frame(protocol.side(attach=protocol.Attach(version=version, ticket=ticket))))
        msg, fd = next_frame()
        if msg.WhichOneof("kind") != "challenge" or fd is None:
            if fd is not None:
                os.close(fd)
            reason = msg.refused.reason if msg.WhichOneof("kind") == "refused" else "no challenge"
            raise _Refused(Fallback.HANDSHAKE_FAILED, reason)
        try:
            import fcntl

            n = msg.challenge.len
            st = os.fstat(fd)
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            if seals & REQUIRED_SEALS != REQUIRED_SEALS or st.st_size < n or n <= 0 or n > 4096:
                raise _Refused(Fallback.HANDSHAKE_FAILED, "bad challenge segment")
            with mmap.mmap(fd, n, mmap.MAP_SHARED, mmap.PROT_READ) as m:
                answer = m[:n]
        finally:
            os.close(fd)
        sock.sendall(protocol.encode_frame(protocol.side(proof=protocol.Proof(answer=answer))))
        msg, fd = next_frame()
        if fd is not None:
            os.close(fd)
        if msg.WhichOneof("kind") != "welcome" or len(msg.welcome.session) != 16:
            reason = msg.refused.reason if msg.WhichOneof("kind") == "refused" else "no welcome"
            raise _Refused(Fallback.HANDSHAKE_FAILED, reason)
        for extra, extra_fd in pending:
            if extra_fd is not None:
                os.close(extra_fd)
            raise _Refused(Fallback.HANDSHAKE_FAILED, f"unexpected {extra.WhichOneof('kind')} frame")
        session = Session(sock, msg.welcome.session, CLIENT, pid, pool, threshold, recorder, reader)
    except _Refused:
        sock.close()
        raise
    except (OSError, protocol.ProtocolError) as e:
        sock.close()
        raise _Refused(Fallback.HANDSHAKE_FAILED, str(e)) from None
    session.start()
    return session


def _hello_call(channel: Any) -> Any:
    """The discovery method on a ``grpc`` or ``grpc.aio`` channel."""
    return channel.unary_unary(
        protocol.HELLO_PATH,
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=protocol.HelloResponse.FromString,
    )


def _discovery_failed(e: grpc.RpcError) -> _Refused:
    """The fallback reason for a failed ``Hello`` (protocol section 2)."""
    code = e.code() if hasattr(e, "code") else None
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return _Refused(Fallback.PEER_LACKS_SHMGRPC, "UNIMPLEMENTED")
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return _Refused(Fallback.UNSUPPORTED_VERSION, str(e))
    return _Refused(Fallback.DISCOVERY_FAILED, str(e))


def _check_hello(hello: Any) -> Any:
    """A ``HelloResponse`` this client can use, or the reason it cannot."""
    if not protocol.MIN_PROTOCOL_VERSION <= hello.version <= protocol.PROTOCOL_VERSION:
        raise _Refused(Fallback.UNSUPPORTED_VERSION, f"version {hello.version}")
    if len(hello.ticket) > protocol.MAX_TICKET_LEN:
        raise _Refused(Fallback.DISCOVERY_FAILED, "ticket too long")
    return hello


def _hello(channel: grpc.Channel) -> Any:
    try:
        hello = _hello_call(channel)(
            protocol.HelloRequest(version=protocol.PROTOCOL_VERSION), timeout=protocol.HANDSHAKE_TIMEOUT
        )
    except grpc.RpcError as e:
        raise _discovery_failed(e) from None
    return _check_hello(hello)


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


class _ChannelBase:
    """What the sync and asyncio channels share: their session state and the four multi-callable factories."""

    _session: Session | None
    _fallback: Fallback | None
    _own: Recorder

    def is_shared_memory(self) -> bool:
        """Whether large messages currently go through shared memory."""
        return self._session is not None and self._session.alive

    def fallback(self) -> Fallback | None:
        """Why this channel sends inline, if it does (``None`` also while an asyncio channel opens its session)."""
        if self._session is not None:
            return None if self._session.alive else Fallback.SESSION_CLOSED
        return self._fallback

    def stats(self) -> dict[str, object]:
        """Transfer counters of this channel (see :func:`shmgrpc.stats`)."""
        return self._own.snapshot()

    def loan(self, n: int) -> Loan:
        """
        A buffer of ``n`` bytes to write a request payload into and send without a copy (see :class:`Loan` and
        :func:`shmgrpc.loaned`); ordinary memory when this channel has no session.
        """
        s = self._session
        if s is not None and s.alive:
            return s.loan(n)
        return Loan(n, None, None)

    def _callable(self, kind: str, method: str, ser: Any, de: Any, kw: dict[str, Any]) -> Any:
        raise NotImplementedError

    def unary_unary(
        self, method: str, request_serializer: Any = None, response_deserializer: Any = None, **kw: Any
    ) -> Any:
        """See ``grpc.Channel.unary_unary``."""
        return self._callable("unary_unary", method, request_serializer, response_deserializer, kw)

    def unary_stream(
        self, method: str, request_serializer: Any = None, response_deserializer: Any = None, **kw: Any
    ) -> Any:
        """See ``grpc.Channel.unary_stream``."""
        return self._callable("unary_stream", method, request_serializer, response_deserializer, kw)

    def stream_unary(
        self, method: str, request_serializer: Any = None, response_deserializer: Any = None, **kw: Any
    ) -> Any:
        """See ``grpc.Channel.stream_unary``."""
        return self._callable("stream_unary", method, request_serializer, response_deserializer, kw)

    def stream_stream(
        self, method: str, request_serializer: Any = None, response_deserializer: Any = None, **kw: Any
    ) -> Any:
        """See ``grpc.Channel.stream_stream``."""
        return self._callable("stream_stream", method, request_serializer, response_deserializer, kw)


class ShmChannel(_ChannelBase, grpc.Channel):
    """A ``grpc.Channel`` whose calls move large messages through shared memory (see the module docs)."""

    def __init__(
        self,
        channel: grpc.Channel,
        *,
        shared_memory: bool = True,
        threshold: int = protocol.DEFAULT_THRESHOLD,
        pool: Pool | None = None,
        budget: int = DEFAULT_BUDGET,
        views: dict[str, str] | None = None,
    ) -> None:
        self._channel = channel
        self._views = dict(views or {})
        self.threshold = threshold
        self.pool = pool if pool is not None else Pool(budget=budget)
        self._own = Recorder()
        self._recorder = Both(self._own)
        self._session: Session | None = None
        self._fallback: Fallback | None = None
        if shared_memory:
            self._connect()

    def _connect(self) -> None:
        try:
            hello = _hello(self._channel)
            self._session = _handshake(
                hello.side_channel, hello.ticket, hello.version, self.pool, self.threshold, self._recorder
            )
        except _Refused as e:
            log.info("shmgrpc: no shared memory with this server (%s); messages go inline", e.reason.value)
            self._fallback = e.reason

    # ---- what shmgrpc adds (and see _ChannelBase) ----
    def session_figures(self) -> dict[str, int]:
        """Holds the server has on our buffers and the server's segments mapped here (zeros without a session)."""
        return self._session.figures() if self._session is not None else {"holds": 0, "peer_segments": 0}

    # ---- grpc.Channel ----
    def subscribe(self, callback: Callable[..., Any], try_to_connect: bool = False) -> None:
        """See ``grpc.Channel.subscribe``."""
        self._channel.subscribe(callback, try_to_connect)

    def unsubscribe(self, callback: Callable[..., Any]) -> None:
        """See ``grpc.Channel.unsubscribe``."""
        self._channel.unsubscribe(callback)

    def _callable(self, kind: str, method: str, ser: Any, de: Any, kw: dict[str, Any]) -> Any:
        return _Callable(self, kind, method, ser, de, kw)

    def close(self) -> None:
        """Closes the session (the server's holds and mappings go) and the gRPC channel."""
        if self._session is not None:
            self._session.close()
        self._channel.close()
        self.pool.close()

    def __enter__(self) -> ShmChannel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- per call ----
    def _serializer(self, session: Session | None, inner: Any) -> Callable[[Any], bytes]:
        recorder, threshold, fallback = self._recorder, self.threshold, self._fallback

        def serialize(message: Any) -> bytes:
            return encode_outgoing(message, inner, session, threshold, recorder, fallback)

        return serialize

    def _deserializer(self, inner: Any) -> Callable[[bytes], Any]:
        recorder = self._recorder
        parse = inner if inner is not None else (lambda b: b)
        if isinstance(inner, ViewOf):
            view_of = inner

            def deserialize_view(data: bytes) -> Any:
                try:
                    if protocol.is_reference(data):
                        return decode_message(data, view_of, CLIENT, recorder)
                    recorder.message("received", "inline", len(data))
                    return view_of(data)
                except BadReference as e:
                    raise ValueError(f"{e.code}: {e}") from None

            return deserialize_view

        def deserialize(data: bytes) -> Any:
            try:
                return decode_message(data, parse, CLIENT, recorder)
            except BadReference as e:
                raise ValueError(f"{e.code}: {e}") from None

        return deserialize


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
        self._de = ch._deserializer(de)
        self._plain = getattr(ch._channel, kind)(method, ch._serializer(None, ser), self._de, **kw)
        self._bound: tuple[Session, Any, tuple[tuple[str, str], ...]] | None = None

    def _for_call(self, metadata: Sequence[tuple[str, str]] | None) -> tuple[Any, Any]:
        s = self._ch._session
        if s is None or not s.alive:
            return self._plain, metadata
        cached = self._bound
        if cached is None or cached[0] is not s:
            # Made once per session: the serializer sends through this session, whose header the call carries.
            inner = getattr(self._ch._channel, self._kind)(
                self._method, self._ch._serializer(s, self._ser), self._de, **self._kw
            )
            cached = self._bound = (s, inner, ((protocol.SESSION_HEADER, s.header),))
        md = cached[2] if not metadata else (*metadata, *cached[2])
        return cached[1], md

    def _invoke(self, attr: str, request: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if isinstance(request, Loaned) and request.loan._sent:
            raise ValueError("a loan is sent once")
        if len(args) >= 2:  # (timeout, metadata, ...) positionally
            args = list(args)  # type: ignore[assignment]
            inner, args[1] = self._for_call(args[1])  # type: ignore[index]
        else:
            inner, kwargs["metadata"] = self._for_call(kwargs.get("metadata"))
        return getattr(inner, attr)(request, *args, **kwargs)

    def __call__(self, request: Any, *args: Any, **kwargs: Any) -> Any:
        return self._invoke("__call__", request, args, kwargs)

    def with_call(self, request: Any, *args: Any, **kwargs: Any) -> Any:
        return self._invoke("with_call", request, args, kwargs)

    def future(self, request: Any, *args: Any, **kwargs: Any) -> Any:
        return self._invoke("future", request, args, kwargs)


def insecure_channel(
    target: str,
    options: Sequence[tuple[str, Any]] | None = None,
    compression: grpc.Compression | None = None,
    *,
    shared_memory: bool = True,
    threshold: int = protocol.DEFAULT_THRESHOLD,
    pool: Pool | None = None,
    budget: int = DEFAULT_BUDGET,
    views: dict[str, str] | None = None,
) -> ShmChannel:
    """
    Like ``grpc.insecure_channel``, with shared memory when the server speaks shmgrpc.

    ``unix:`` targets get ``grpc.default_authority=localhost`` unless ``options`` set one: grpcio otherwise sends
    the percent-encoded socket path as ``:authority``, which tonic (h2) rejects. Message size limits are lifted
    (``-1``) unless set: through shared memory only a small reference crosses the gRPC stream.

    ``views`` maps full method names (``/package.Service/Method``) to a singular ``bytes`` field of the response:
    those methods return a :class:`shmgrpc.View` (the field read in place from shared memory, the other fields in
    ``.message``) instead of the message, which saves protobuf's copy of the field; release each view once used.
    """
    channel = grpc.insecure_channel(target, options=_channel_options(target, options), compression=compression)
    return ShmChannel(channel, shared_memory=shared_memory, threshold=threshold, pool=pool, budget=budget, views=views)
