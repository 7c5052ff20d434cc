"""
The server: :func:`server`, a drop-in for ``grpc.server`` that answers shmgrpc discovery, runs the side channel
and moves large messages of every registered service through shared memory.

Calls that name a live session (``shmgrpc-session`` metadata) get references resolved in their requests and large
responses sent as references; every other call is plain gRPC. A bad reference gets the protocol's status
(``docs/protocol.md`` section 9), never a crash.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any, Callable

import grpc

from . import protocol
from ._io import LOOP, Conn, peer_cred
from .pool import DEFAULT_BUDGET, Pool
from .protocol import BadReference
from .segment import Segment
from .session import SERVER, Loan, Session, decode_message, encode_outgoing, lookup_hex
from .stats import Both, Recorder

log = logging.getLogger("shmgrpc")

MAX_HANDSHAKES = 64
"""Side-channel handshakes in progress at once; more connections are closed at once."""

_current = threading.local()


class _Failed:
    """A request that could not be decoded: the handler aborts the call with this status."""

    def __init__(self, code: str, message: str) -> None:
        self.code = getattr(grpc.StatusCode, code)
        self.message = message


class Tickets:
    """Stateless discovery tickets: nonce, expiry and HMAC-SHA256 under a per-server secret (56 bytes)."""

    def __init__(self) -> None:
        self._secret = os.urandom(32)
        self._used: dict[bytes, float] = {}
        self._lock = threading.Lock()

    def issue(self) -> bytes:
        """A fresh ticket, valid once within :data:`protocol.TICKET_TTL` seconds."""
        body = os.urandom(16) + struct.pack("<d", time.time() + protocol.TICKET_TTL)
        return body + hmac.new(self._secret, body, hashlib.sha256).digest()

    def redeem(self, ticket: bytes) -> bool:
        """Whether ``ticket`` is ours, unexpired and unused (and marks it used)."""
        if len(ticket) != 56:
            return False
        body, mac = ticket[:24], ticket[24:]
        if not hmac.compare_digest(mac, hmac.new(self._secret, body, hashlib.sha256).digest()):
            return False
        (expiry,) = struct.unpack("<d", body[16:])
        now = time.time()
        with self._lock:
            for k in [k for k, t in self._used.items() if t < now]:
                del self._used[k]
            if expiry < now or body[:16] in self._used:
                return False
            self._used[body[:16]] = expiry
        return True


class _Handshake(Conn):
    """The server's side of one side-channel handshake, on the I/O thread (protocol section 4)."""

    def __init__(self, server: ShmServer, sock: socket.socket, pid: int) -> None:
        super().__init__(sock)
        self.server = server
        self.pid = pid
        self.state = "attach"
        self.challenge = b""
        self.deadline = time.monotonic() + protocol.HANDSHAKE_TIMEOUT
        self.done = False

    def on_frame(self, msg: Any, fd: int | None) -> None:
        kind = msg.WhichOneof("kind")
        if fd is not None:
            os.close(fd)
            self._refuse("unexpected descriptor")
        elif self.state == "attach" and kind == "attach":
            a = msg.attach
            if not protocol.MIN_PROTOCOL_VERSION <= a.version <= protocol.PROTOCOL_VERSION:
                self._refuse("unsupported protocol version")
            elif not self.server._tickets.redeem(a.ticket):
                self._refuse("unknown, used or expired ticket")
            else:
                self.challenge = os.urandom(protocol.CHALLENGE_LEN)
                seg = Segment(protocol.CHALLENGE_LEN, "shmgrpc-challenge")
                seg.view[:] = self.challenge
                self.send(protocol.side(challenge=protocol.Challenge(len=protocol.CHALLENGE_LEN)), seg.fd)
                seg.close()
                self.state = "proof"
        elif self.state == "proof" and kind == "proof":
            if not hmac.compare_digest(msg.proof.answer, self.challenge):
                self._refuse("wrong proof")
                return
            self.state = "done"
            self.deadline = None
            self.server._establish(self)
        else:
            self._refuse(f"unexpected {kind} frame")

    def _refuse(self, reason: str) -> None:
        self.server._recorder.add("peer_refusals")
        log.debug("shmgrpc session refused: %s", reason)
        self.send(protocol.side(refused=protocol.Refused(reason=reason)))
        self.close()

    def on_close(self) -> None:
        if not self.done:
            self.done = True
            self.server._handshake_done()


class ShmServer:
    """A ``grpc.Server`` with shmgrpc (see the module docs). Every ``grpc.Server`` method works as usual."""

    def __init__(
        self,
        inner: grpc.Server,
        *,
        threshold: int = protocol.DEFAULT_THRESHOLD,
        side_channel: str | None = None,
        allowed_uids: Sequence[int] | None = None,
        pool: Pool | None = None,
        budget: int = DEFAULT_BUDGET,
    ) -> None:
        self._inner = inner
        self.threshold = threshold
        self.pool = pool if pool is not None else Pool(budget=budget)
        self._own = Recorder()
        self._recorder = Both(self._own)
        self._tickets = Tickets()
        me = os.getuid()
        self._allowed = set(allowed_uids) | {me, 0} if allowed_uids is not None else {me, 0}
        if side_channel is None:
            side_channel = os.path.join(tempfile.gettempdir(), f"shmgrpc-{os.getpid()}-{os.urandom(8).hex()}.sock")
        self.side_channel_path = os.path.abspath(side_channel)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._listener.bind(self.side_channel_path)
        os.chmod(self.side_channel_path, 0o600 if self._allowed <= {me, 0} else 0o666)
        self._listener.listen(128)
        self._sessions: list[Session] = []
        self._lock = threading.Lock()
        self._handshakes = 0
        self._stopped = False
        inner.add_generic_rpc_handlers((_HelloHandler(self),))
        LOOP.add_listener(self._listener, self._accept)

    # ---- side channel (I/O thread) ----
    def _accept(self, sock: socket.socket) -> None:
        try:
            pid, uid, _ = peer_cred(sock)
        except OSError:
            sock.close()
            return
        with self._lock:
            busy = self._handshakes >= MAX_HANDSHAKES or self._stopped
            if not busy:
                self._handshakes += 1
        if busy:
            self._recorder.add("peer_refusals")
            sock.close()
            return
        hs = _Handshake(self, sock, pid)
        if uid not in self._allowed:
            LOOP._add(hs)
            hs._refuse("uid not allowed")
            return
        LOOP._add(hs)

    def _handshake_done(self) -> None:
        with self._lock:
            self._handshakes -= 1

    def _establish(self, hs: _Handshake) -> None:
        """Turns a finished handshake into a session (I/O thread)."""
        sid = os.urandom(16)
        welcome = protocol.Welcome(session=sid, threshold=self.threshold)
        LOOP.forget_keep_open(hs)
        session = Session(hs.sock, sid, SERVER, hs.pid, self.pool, self.threshold, self._recorder, hs.reader)
        hs.done = True
        self._handshake_done()
        with self._lock:
            self._sessions = [s for s in self._sessions if s.alive] + [session]
        session.send(protocol.side(welcome=welcome))
        LOOP._add(session)

    # ---- what shmgrpc adds ----
    def stats(self) -> dict[str, object]:
        """Transfer counters of this server (see :func:`shmgrpc.stats`)."""
        return self._own.snapshot()

    def sessions(self) -> int:
        """Sessions currently open."""
        with self._lock:
            return sum(1 for s in self._sessions if s.alive)

    def session_figures(self) -> dict[str, int]:
        """Holds and peer segments summed over the open sessions."""
        with self._lock:
            live = [s for s in self._sessions if s.alive]
        out = {"holds": 0, "peer_segments": 0}
        for s in live:
            for k, v in s.figures().items():
                out[k] += v
        return out

    # ---- grpc.Server ----
    def add_generic_rpc_handlers(self, generic_rpc_handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        """See ``grpc.Server.add_generic_rpc_handlers``; every handler's methods move through shared memory."""
        self._inner.add_generic_rpc_handlers(tuple(_Generic(self, h) for h in generic_rpc_handlers))

    def add_registered_method_handlers(self, service_name: str, method_handlers: dict[str, Any]) -> None:
        """See ``grpc.Server.add_registered_method_handlers``."""
        wrapped = {name: _wrap(self, h) for name, h in method_handlers.items()}
        add = getattr(self._inner, "add_registered_method_handlers", None)
        if add is not None:
            add(service_name, wrapped)

    def add_insecure_port(self, address: str) -> int:
        """See ``grpc.Server.add_insecure_port``."""
        return self._inner.add_insecure_port(address)

    def add_secure_port(self, address: str, server_credentials: grpc.ServerCredentials) -> int:
        """See ``grpc.Server.add_secure_port``."""
        return self._inner.add_secure_port(address, server_credentials)

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
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            sessions = list(self._sessions)
        LOOP.remove_listener(self._listener)
        try:
            os.unlink(self.side_channel_path)
        except FileNotFoundError:
            pass
        for s in sessions:
            s.close()
        self.pool.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class _HelloHandler(grpc.GenericRpcHandler):
    """Answers ``/shmgrpc.v1.Session/Hello`` (protocol section 2)."""

    def __init__(self, server: ShmServer) -> None:
        self._server = server

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        if handler_call_details.method != protocol.HELLO_PATH:
            return None
        return grpc.unary_unary_rpc_method_handler(
            self._hello,
            request_deserializer=protocol.HelloRequest.FromString,
            response_serializer=lambda m: m.SerializeToString(),
        )

    def _hello(self, request: Any, context: grpc.ServicerContext) -> Any:
        if request.version < protocol.MIN_PROTOCOL_VERSION:
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"shmgrpc protocol versions {protocol.MIN_PROTOCOL_VERSION}..{protocol.PROTOCOL_VERSION} only",
            )
        s = self._server
        return protocol.HelloResponse(
            version=min(request.version, protocol.PROTOCOL_VERSION),
            side_channel=s.side_channel_path,
            ticket=s._tickets.issue(),
        )


class _Generic(grpc.GenericRpcHandler):
    def __init__(self, server: ShmServer, inner: grpc.GenericRpcHandler) -> None:
        self._server, self._inner = server, inner

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        h = self._inner.service(handler_call_details)
        return _wrap(self._server, h) if h is not None else None


def _wrap(server: ShmServer, h: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """The same method with shmgrpc's request decoding and response encoding around its (de)serializers."""
    recorder = server._recorder
    de = h.request_deserializer or (lambda b: b)
    ser = h.response_serializer or (lambda m: m)
    threshold = server.threshold

    def deserialize(data: bytes) -> Any:
        try:
            return decode_message(data, de, SERVER, recorder)
        except BadReference as e:
            return _Failed(e.code, str(e))

    def serialize(message: Any) -> bytes:
        session: Session | None = getattr(_current, "session", None)
        return encode_outgoing(message, ser, session, threshold, recorder)

    def enter(context: grpc.ServicerContext) -> None:
        # The response serializer runs on this thread after the behaviour returns (and while a response iterator
        # is consumed): the call's session is left current until the next call on this thread sets its own.
        value = None
        for key, v in context.invocation_metadata():
            if key == protocol.SESSION_HEADER:
                value = v if isinstance(v, str) else v.decode()
        _current.session = lookup_hex(value, SERVER) if value else None

    def check(request: Any, context: grpc.ServicerContext) -> Any:
        if isinstance(request, _Failed):
            context.abort(request.code, request.message)
        return request

    def checked_iter(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
        for r in requests:
            yield check(r, context)

    def unary_in(behaviour: Callable[..., Any]) -> Callable[..., Any]:
        def run(request: Any, context: grpc.ServicerContext) -> Any:
            enter(context)
            return behaviour(check(request, context), context)

        return run

    def stream_in(behaviour: Callable[..., Any]) -> Callable[..., Any]:
        def run(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
            enter(context)
            return behaviour(checked_iter(requests, context), context)

        return run

    kw = {"request_deserializer": deserialize, "response_serializer": serialize}
    if h.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(unary_in(h.unary_unary), **kw)
    if h.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(unary_in(h.unary_stream), **kw)
    if h.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(stream_in(h.stream_unary), **kw)
    return grpc.stream_stream_rpc_method_handler(stream_in(h.stream_stream), **kw)


def loan(n: int) -> Loan:
    """
    Inside a handler: a buffer of ``n`` bytes to write a response payload into and send without a copy (see
    :class:`shmgrpc.session.Loan`); ordinary memory when the call has no session.
    """
    session: Session | None = getattr(_current, "session", None)
    if session is not None and session.alive:
        return session.loan(n)
    return Loan(n, None, None)


def server(
    thread_pool: Any,
    handlers: Sequence[grpc.GenericRpcHandler] | None = None,
    interceptors: Sequence[grpc.ServerInterceptor] | None = None,
    options: Sequence[tuple[str, Any]] | None = None,
    maximum_concurrent_rpcs: int | None = None,
    compression: grpc.Compression | None = None,
    *,
    threshold: int = protocol.DEFAULT_THRESHOLD,
    side_channel: str | None = None,
    allowed_uids: Sequence[int] | None = None,
    pool: Pool | None = None,
    budget: int = DEFAULT_BUDGET,
) -> ShmServer:
    """
    Like ``grpc.server``, with shmgrpc: discovery, the side channel (mode 0600 at ``side_channel``, a fresh path
    in the temporary directory by default; sessions only for ``allowed_uids``, the server's own uid and root by
    default) and references both ways. Message size limits are lifted (``-1``) unless ``options`` set them.
    """
    opts = list(options or ())
    names = {k for k, _ in opts}
    for key in ("grpc.max_receive_message_length", "grpc.max_send_message_length"):
        if key not in names:
            opts.append((key, -1))
    inner = grpc.server(
        thread_pool,
        interceptors=interceptors,
        options=opts,
        maximum_concurrent_rpcs=maximum_concurrent_rpcs,
        compression=compression,
    )
    s = ShmServer(
        inner, threshold=threshold, side_channel=side_channel, allowed_uids=allowed_uids, pool=pool, budget=budget
    )
    if handlers:
        s.add_generic_rpc_handlers(handlers)
    return s
