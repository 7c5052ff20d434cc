"""
Sessions: what a client and a server share once they have proven they share memory (``docs/protocol.md``).

A :class:`Session` is one side-channel connection after the handshake. It registers our segments with the peer
(without waiting for the answer), keeps the peer's holds on our buffers until their releases, maps the peer's
segments, resolves references into bytes and sends the releases. Frames are handled on the I/O thread
(:mod:`shmgrpc._io`); nothing there waits on the peer.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from typing import Any

from . import protocol
from ._io import LOOP, Conn
from .pool import Lease, Pool, PoolExhausted
from .protocol import BadReference
from .segment import PeerSegment, SegmentError
from .stats import Both, Fallback

log = logging.getLogger("shmgrpc")

LOAN_HEADROOM = 64
"""Bytes a loan keeps free before its payload, for the message's other fields and the payload's key and length."""

CLIENT = "client"
SERVER = "server"

_REGISTRY: dict[tuple[bytes, str], weakref.ref[Session]] = {}
_REGISTRY_LOCK = threading.Lock()


def lookup(session_id: bytes, role: str) -> Session | None:
    """A live session of this process by id and role."""
    with _REGISTRY_LOCK:
        ref = _REGISTRY.get((bytes(session_id), role))
    s = ref() if ref is not None else None
    return s if s is not None and s.alive else None


def lookup_hex(value: str, role: str) -> Session | None:
    """Like :func:`lookup`, from the ``shmgrpc-session`` header's hex."""
    if len(value) != 32:
        return None
    try:
        return lookup(bytes.fromhex(value), role)
    except ValueError:
        return None


class Session(Conn):
    """One end of a session over an established side channel."""

    def __init__(
        self,
        sock: Any,
        session_id: bytes,
        role: str,
        peer_pid: int,
        pool: Pool,
        threshold: int,
        recorder: Both,
        reader: Any = None,
    ) -> None:
        super().__init__(sock)
        if reader is not None:
            self.reader = reader
        self.id = bytes(session_id)
        self.role = role
        self.peer_pid = peer_pid
        self.pool = pool
        self.threshold = threshold
        self.recorder = recorder
        self.header = self.id.hex()
        self.alive = True
        self._cv = threading.Condition()
        self._peer: dict[int, PeerSegment] = {}
        self._peer_bytes = 0
        self._refused: set[int] = set()
        self._registered: set[int] = set()  # our segments the peer has (or is being sent)
        self._unusable: set[int] = set()  # our segments the peer refused
        self._holds: dict[tuple[int, int], Lease] = {}  # one per sender part: every send uses a fresh lease
        self._seen_evictions = pool.evicted_since(0)[0]
        self._async_waiters: list[tuple[Any, Any]] = []
        with _REGISTRY_LOCK:
            _REGISTRY[(self.id, role)] = weakref.ref(self)

    def start(self) -> None:
        """Starts reading frames on the I/O thread."""
        LOOP.add(self)

    # ---- frames from the peer (I/O thread) ----
    def on_frame(self, msg: Any, fd: int | None) -> None:
        """Handles one frame of an established session."""
        kind = msg.WhichOneof("kind")
        if kind == "register":
            self._on_register(msg.register, fd)
        elif kind == "registered":
            if msg.registered.error:
                log.debug("the peer refused one of our segments: %s", msg.registered.error)
                with self._cv:
                    self._unusable.add(msg.registered.segment)
        elif kind == "release":
            lease = None
            with self._cv:
                lease = self._holds.pop((msg.release.segment, msg.release.generation), None)
            if lease is None:
                self.recorder.add("bad_releases")
                self.recorder.add("peer_refusals")
                log.debug("refused a release of a buffer the peer does not hold")
            else:
                lease.release()
        elif kind == "returned":
            # We never send `receiver` parts, so nothing can be returned to us.
            self.recorder.add("bad_releases")
            self.recorder.add("peer_refusals")
        elif kind == "forget":
            with self._cv:
                seg = self._peer.pop(msg.forget.segment, None)
                if seg is not None:
                    self._peer_bytes -= seg.size
            if seg is not None:
                seg.close()
        elif kind == "refused":
            raise protocol.ProtocolError(f"peer refused: {msg.refused.reason}")
        else:
            raise protocol.ProtocolError(f"unexpected {kind} frame on an established side channel")

    def _on_register(self, reg: Any, fd: int | None) -> None:
        error = ""
        source = reg.WhichOneof("source")
        with self._cv:
            known = reg.segment in self._peer
            count = len(self._peer)
        if fd is None:
            error = "registrations by name are not accepted by this implementation" if source else "no descriptor"
        elif source is not None:
            error = "a descriptor and a name at once"
        elif known:
            error = "segment id already registered"
        elif count >= protocol.MAX_PEER_SEGMENTS:
            error = "too many segments"
        if error:
            if fd is not None:
                os.close(fd)
        else:
            assert fd is not None
            try:
                seg = PeerSegment(fd, reg.len)
            except (SegmentError, OSError) as e:
                error = str(e)
            else:
                with self._cv:
                    if self._peer_bytes + seg.size > protocol.MAX_SESSION_PEER_BYTES:
                        error = "too many bytes of segments"
                    else:
                        self._peer[reg.segment] = seg
                        self._peer_bytes += seg.size
                        self._refused.discard(reg.segment)
                if error:
                    seg.close()
        if error:
            self.recorder.add("peer_refusals")
            log.debug("refused a segment from the peer: %s", error)
            with self._cv:
                if len(self._refused) < protocol.MAX_PEER_SEGMENTS:
                    self._refused.add(reg.segment)
        self._wake()
        self.send(protocol.side(registered=protocol.Registered(segment=reg.segment, error=error)))

    def _wake(self) -> None:
        """Wakes every waiter for registrations: threads, and asyncio futures (on their own loops)."""
        with self._cv:
            self._cv.notify_all()
            waiters, self._async_waiters = self._async_waiters, []
        for loop, fut in waiters:
            loop.call_soon_threadsafe(_set_done, fut)

    def on_close(self) -> None:
        """The side channel ended: holds return to the pool, the peer's mappings go."""
        with self._cv:
            self.alive = False
            holds = list(self._holds.values())
            self._holds.clear()
            peer = list(self._peer.values())
            self._peer.clear()
            self._peer_bytes = 0
        self._wake()
        for lease in holds:
            lease.release()
        for seg in peer:
            seg.close()
        with _REGISTRY_LOCK:
            ref = _REGISTRY.get((self.id, self.role))
            if ref is not None and ref() is self:
                del _REGISTRY[(self.id, self.role)]

    # ---- sending ----
    def encode(self, data: bytes | memoryview) -> bytes | None:
        """
        Writes ``data`` (an encoded message) into a pool buffer and returns the reference to send, registering
        the buffer's segment first if the peer lacks it; ``None`` (counted) when it must go inline.
        """
        if not self.alive:
            self.recorder.fallback(Fallback.SESSION_CLOSED)
            return None
        n = len(data)
        try:
            lease = self.pool.alloc(n)
        except (PoolExhausted, OSError) as e:
            log.debug("sending inline: %s", e)
            self.recorder.fallback(Fallback.POOL_EXHAUSTED)
            return None
        lease.view[:n] = data
        return self._refer(lease, n)

    def loan(self, n: int) -> Loan:
        """
        A buffer of ``n`` bytes to write a payload into (see :class:`Loan`); ordinary memory when the pool has no
        room or the session is closed.
        """
        if self.alive:
            try:
                return Loan(n, self.pool.alloc(n + LOAN_HEADROOM), self, LOAN_HEADROOM)
            except (PoolExhausted, OSError) as e:
                log.debug("loan from ordinary memory: %s", e)
                self.recorder.fallback(Fallback.POOL_EXHAUSTED)
        return Loan(n, None, None)

    def encode_loaned(self, head: bytes, loan: Loan) -> bytes | None:
        """
        A reference whose message is ``head`` followed by the loan's bytes in place, or ``None``. A head that fits
        the loan's headroom is written right before the payload, so the message is one contiguous region (the
        receiver parses it without joining anything); a longer one travels inline.
        """
        lease = loan._take(self)
        if lease is None:
            return None
        k = len(head)
        if k <= loan.offset:
            lease.view[loan.offset - k : loan.offset] = head
            return self._refer(lease, k + loan.length, offset=loan.offset - k)
        return self._refer(lease, loan.length, head, offset=loan.offset)

    def _forget_evicted(self) -> None:
        """
        Tells the peer to drop its mappings of our buffers the pool has dropped since (their memory would
        otherwise live on in the peer's mapping).
        """
        now, gone = self.pool.evicted_since(self._seen_evictions)
        if now == self._seen_evictions:
            return
        self._seen_evictions = now
        with self._cv:
            forget = [sid for sid in gone if sid in self._registered]
            for sid in forget:
                self._registered.discard(sid)
        for sid in forget:
            self.send(protocol.side(forget=protocol.Forget(segment=sid)))

    def _refer(self, lease: Lease, n: int, head: bytes = b"", offset: int = 0) -> bytes | None:
        self._forget_evicted()
        sid = lease.segment_id
        with self._cv:
            unusable = sid in self._unusable
            new = sid not in self._registered
            if new and not unusable:
                self._registered.add(sid)
        if unusable:
            lease.release()
            self.recorder.fallback(Fallback.REGISTRATION_FAILED)
            return None
        if new:
            reg = protocol.Register(segment=sid, len=lease.segment.size)
            if not self.send(protocol.side(register=reg), lease.segment.fd):
                lease.release()
                self.recorder.fallback(Fallback.SESSION_CLOSED)
                return None
        with self._cv:
            if not self.alive:
                lease.release()
                self.recorder.fallback(Fallback.SESSION_CLOSED)
                return None
            self._holds[(sid, lease.generation)] = lease
        region = protocol.Region(segment=sid, generation=lease.generation, offset=offset, len=n)
        parts = [protocol.Part(inline=head)] if head else []
        parts.append(protocol.Part(sender=region))
        ref = protocol.Reference(session=self.id, from_server=self.role == SERVER, parts=parts)
        self.recorder.message("sent", "shm", len(head) + n)
        return protocol.encode_reference(ref)

    # ---- receiving ----
    def resolve(self, ref: Any) -> tuple[list[bytes | memoryview], list[tuple[str, int, int]]]:
        """
        The message bytes a reference names, and the answers (``Release`` for each ``sender`` part, ``Returned``
        for each ``receiver`` part) to send once they were parsed.

        Waits (at most :data:`protocol.REGISTRATION_WAIT`) for the registration of a segment the reference names
        and the peer has neither registered nor been refused yet (protocol section 6). Raises
        :class:`protocol.BadReference` with the protocol's status for anything else.
        """
        parts = list(ref.parts)
        if not parts or len(parts) > protocol.MAX_PARTS:
            raise BadReference("INVALID_ARGUMENT", "a reference needs 1 to 64 parts")
        inline = sum(len(p.inline) for p in parts if p.WhichOneof("kind") == "inline")
        if inline > protocol.MAX_INLINE:
            raise BadReference("INVALID_ARGUMENT", "too many inline bytes in a reference")
        views: list[bytes | memoryview] = []
        releases: list[tuple[str, int, int]] = []
        for p in parts:
            kind = p.WhichOneof("kind")
            if kind == "inline":
                views.append(p.inline)
            elif kind == "sender":
                r = p.sender
                seg = self._peer_segment(r.segment)
                if r.offset + r.len > seg.size:
                    raise BadReference("OUT_OF_RANGE", "reference range is outside the segment")
                views.append(_fold(views, seg.view, r.offset, r.len))
                releases.append(("release", r.segment, r.generation))
            elif kind == "receiver":
                # One of our own buffers, sent back while the peer still holds it (zero-copy echo, forwarding).
                r = p.receiver
                with self._cv:
                    lease = self._holds.get((r.segment, r.generation))
                if lease is None:
                    raise BadReference("INVALID_ARGUMENT", "receiver part naming a buffer the peer does not hold")
                if r.offset + r.len > lease.segment.size:
                    raise BadReference("OUT_OF_RANGE", "reference range is outside the segment")
                views.append(_fold(views, lease.segment.view, r.offset, r.len))
                releases.append(("returned", r.segment, r.generation))
            else:
                raise BadReference("INVALID_ARGUMENT", "a part without a kind")
        return views, releases

    def _missing(self, ref: Any) -> bool:
        """Whether a reference names a segment the peer has neither registered nor been refused (lock held)."""
        for p in ref.parts:
            if p.WhichOneof("kind") == "sender":
                sid = p.sender.segment
                if sid not in self._peer and sid not in self._refused:
                    return True
        return False

    async def wait_registered(self, ref: Any) -> None:
        """
        Waits, without blocking the event loop, until every segment ``ref`` names is registered or refused, the
        session ends, or :data:`protocol.REGISTRATION_WAIT` has passed (then resolving fails with a status).
        """
        import asyncio

        loop = asyncio.get_running_loop()
        deadline = loop.time() + protocol.REGISTRATION_WAIT
        while True:
            with self._cv:
                if not self.alive or not self._missing(ref):
                    return
                fut = loop.create_future()
                self._async_waiters.append((loop, fut))
            left = deadline - loop.time()
            if left <= 0:
                return
            try:
                await asyncio.wait_for(fut, left)
            except asyncio.TimeoutError:
                return

    def _peer_segment(self, segment: int) -> PeerSegment:
        deadline = time.monotonic() + protocol.REGISTRATION_WAIT
        with self._cv:
            while True:
                seg = self._peer.get(segment)
                if seg is not None:
                    return seg
                left = deadline - time.monotonic()
                if segment in self._refused or not self.alive or left <= 0:
                    raise BadReference("INVALID_ARGUMENT", "reference to a segment the peer never registered")
                self._cv.wait(left)

    def release(self, answers: list[tuple[str, int, int]]) -> None:
        """Sends one ``Release`` per ``sender`` part and one ``Returned`` per ``receiver`` part that was read."""
        for kind, segment, generation in answers:
            if kind == "release":
                self.send(protocol.side(release=protocol.Release(segment=segment, generation=generation)))
            else:
                self.send(protocol.side(returned=protocol.Returned(segment=segment, generation=generation)))

    def figures(self) -> dict[str, int]:
        """Holds the peer has on our buffers, and the peer's segments mapped here."""
        with self._cv:
            return {"holds": len(self._holds), "peer_segments": len(self._peer)}


def _set_done(fut: Any) -> None:
    if not fut.done():
        fut.set_result(None)


class Loan:
    """
    A buffer to write a large ``bytes`` field into before sending it, so that it goes out without a copy.

    Write the payload into :attr:`view`, then send :func:`shmgrpc.loaned` ``(message, field, loan)`` in place of
    ``message`` (with ``field`` left unset): the message's other fields are encoded as usual and the loan's bytes
    follow in place. Through shared memory nothing of the payload is copied; without a session (or when the pool
    had no room: :attr:`shared` is false) the message is encoded normally from the loan's bytes. A loan is sent
    once; sending it hands the buffer to the peer until it releases it. :meth:`release` (or dropping the last
    reference) returns an unsent loan.
    """

    def __init__(self, n: int, lease: Lease | None, session: Session | None, offset: int = 0) -> None:
        self.length = n
        self.offset = offset
        self._lease = lease
        self._session = session
        self._sent = False
        self.view: memoryview = lease.view[offset : offset + n] if lease is not None else memoryview(bytearray(n))

    @property
    def shared(self) -> bool:
        """Whether the loan lies in shared memory (sending it copies nothing)."""
        return self._lease is not None

    def _take(self, session: Session) -> Lease | None:
        if self._sent:
            raise ValueError("a loan is sent once")
        if self._lease is None or session is not self._session:
            return None
        self._sent = True
        lease, self._lease = self._lease, None
        return lease

    def bytes(self) -> bytes:
        """A copy of the loan's bytes (what an inline message carries)."""
        return bytes(self.view)

    def release(self) -> None:
        """Returns an unsent loan's buffer to the pool (also done when the loan is garbage-collected)."""
        if self._lease is not None and not self._sent:
            self._lease.release()
            self._lease = None

    def __del__(self) -> None:
        self.release()


class Loaned:
    """A message whose ``bytes`` field ``field`` is a :class:`Loan` (built by :func:`shmgrpc.loaned`)."""

    def __init__(self, message: Any, field: str, loan: Loan) -> None:
        desc = message.DESCRIPTOR.fields_by_name.get(field)
        if desc is None or desc.type != desc.TYPE_BYTES:
            raise ValueError(f"{field} is not a bytes field of {message.DESCRIPTOR.full_name}")
        if message.HasField(field) if desc.has_presence else getattr(message, field):
            raise ValueError(f"{field} must be left unset: the loan carries it")
        self.message = message
        self.loan = loan
        self.tag = protocol._varint(desc.number << 3 | 2)

    def head(self, serialize: Any) -> bytes:
        """The message without the field, then the field's key and length: what precedes the loan's bytes."""
        return bytes(serialize(self.message)) + self.tag + protocol._varint(self.loan.length)

    def encode(self, serialize: Any) -> bytes:
        """The whole message, inline (copies the loan's bytes)."""
        return self.head(serialize) + self.loan.bytes()


def encode_outgoing(
    message: Any,
    inner: Any,
    session: Session | None,
    threshold: int,
    recorder: Both,
    fallback: Fallback | None = None,
) -> bytes:
    """
    One outgoing gRPC message: a reference through ``session`` when the message is loaned or its encoding (by
    ``inner``) reaches ``threshold``, else the encoding itself (counted inline, and as a fallback for ``fallback``
    when there is no session).
    """
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
    n = len(data)
    if n >= threshold:
        if session is not None:
            ref = session.encode(data)
            if ref is not None:
                return ref
        elif fallback is not None:
            recorder.fallback(fallback)
    recorder.message("sent", "inline", n)
    return data


def decode_message(
    data: bytes,
    deserializer: Any,
    role: str,
    recorder: Both | None,
) -> Any:
    """
    Decodes one incoming gRPC message (inline or a reference) with ``deserializer``; raises
    :class:`protocol.BadReference` with the protocol's status when it cannot.
    """
    if not protocol.is_reference(data):
        try:
            msg = deserializer(data)
        except Exception as e:
            raise BadReference("INVALID_ARGUMENT", f"message does not decode: {e}") from None
        if recorder is not None:
            recorder.message("received", "inline", len(data))
        return msg
    try:
        ref = protocol.decode_reference(bytes(data))
    except BadReference:
        if recorder is not None:
            recorder.add("bad_references")
        raise
    if len(ref.session) != 16 or ref.from_server != (role == CLIENT):
        raise BadReference("FAILED_PRECONDITION", "shmgrpc reference to an unknown or closed session")
    session = lookup(ref.session, role)
    if session is None:
        raise BadReference("FAILED_PRECONDITION", "shmgrpc reference to an unknown or closed session")
    try:
        payload, releases = session.resolve(ref)
    except BadReference:
        session.recorder.add("bad_references")
        raise
    n = msg_len(ref)
    if isinstance(deserializer, ViewOf):
        view = deserializer.view(payload, session, releases)
        if view is not None:
            session.recorder.message("received", "shm", n)
            return view
    try:
        msg = _parse(payload, deserializer)
    except Exception as e:
        raise BadReference("INVALID_ARGUMENT", f"message in shared memory does not decode: {e}") from None
    finally:
        for v in payload:
            if isinstance(v, memoryview):
                v.release()
        session.release(releases)
    session.recorder.message("received", "shm", n)
    return msg


class View:
    """
    A response whose large ``bytes`` field is read in place from shared memory, without a copy.

    :attr:`message` holds every other field; :attr:`data` is a read-only ``memoryview`` of the field's bytes in the
    sender's segment (or, when the message came inline or the field could not be located in one piece, of a
    ``bytes`` copy). The sender's buffer stays held until :meth:`release` (or until the view is garbage-collected):
    release it as soon as the bytes were used. Made by channels created with ``views=`` (see
    :func:`shmgrpc.insecure_channel`).
    """

    def __init__(self, message: Any, data: memoryview, done: Any = None) -> None:
        self.message = message
        self.data = data
        self._done = done

    @property
    def shared(self) -> bool:
        """Whether :attr:`data` lies in shared memory."""
        return self._done is not None

    def release(self) -> None:
        """Lets the sender reuse its buffer (idempotent); :attr:`data` must not be used afterwards."""
        done, self._done = self._done, None
        if done is not None:
            self.data.release()
            done()

    def __del__(self) -> None:
        self.release()

    def __enter__(self) -> View:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class ViewOf:
    """A response deserializer that returns a :class:`View` of field ``field`` instead of the parsed message."""

    def __init__(self, parse: Any, field: str) -> None:
        cls = getattr(parse, "__self__", None)
        desc = getattr(cls, "DESCRIPTOR", None)
        f = desc.fields_by_name.get(field) if desc is not None else None
        repeated = f is not None and (
            f.is_repeated if hasattr(f, "is_repeated") else f.label == f.LABEL_REPEATED  # protobuf < 6.31
        )
        if f is None or f.type != f.TYPE_BYTES or repeated:
            raise ValueError(f"{field} is not a singular bytes field of the response message")
        self.parse = parse
        self.number = f.number
        self.field = field

    def __call__(self, data: bytes | memoryview) -> View:
        """An inline message: parsed, the field copied out (no shared memory to point into)."""
        msg = self.parse(data)
        value = getattr(msg, self.field)
        msg.ClearField(self.field)
        return View(msg, memoryview(value))

    def view(
        self, spans: list[bytes | memoryview], session: Session, answers: list[tuple[str, int, int]]
    ) -> View | None:
        """
        The view of a resolved reference, or ``None`` when the field is not one piece of one span (the message
        is then parsed as usual).
        """
        fields = _top_level_fields(spans)
        if fields is None:
            return None
        found = [content for number, _, content in fields if number == self.number]
        if len(found) != 1 or found[0] is None or not isinstance(spans[found[0][0]], memoryview):
            return None
        si, a, b = found[0]
        span = spans[si]
        assert isinstance(span, memoryview)
        rest = b"".join(
            bytes(spans[j][x:y]) for number, pieces, _ in fields if number != self.number for j, x, y in pieces
        )
        msg = self.parse(rest)
        return View(msg, span[a:b], lambda: session.release(answers))


Piece = tuple[int, int, int]


def _top_level_fields(spans: list[bytes | memoryview]) -> list[tuple[int, list[Piece], Piece | None]] | None:
    """
    The top-level fields of a message given as spans: ``(number, pieces, content)`` where the field's encoding is
    the concatenation of ``spans[i][a:b]`` for ``(i, a, b)`` in ``pieces``, and ``content`` locates a
    length-delimited field's content when it lies in one span (``None`` otherwise). A field's key and length must
    lie in one span; its content may be the start of the next one (how a field written in place travels: key and
    length inline, then the region). ``None`` when the encoding is malformed.
    """
    out: list[tuple[int, list[Piece], Piece | None]] = []
    si, pos = 0, 0
    while si < len(spans):
        buf = spans[si]
        end = len(buf)
        if pos >= end:
            si, pos = si + 1, 0
            continue
        start = pos
        try:
            key, pos = protocol.read_varint(buf, pos, end)
            wire = key & 7
            if wire == 0:
                _, pos = protocol.read_varint(buf, pos, end)
            elif wire in (1, 5):
                pos += 8 if wire == 1 else 4
            elif wire == 2:
                n, pos = protocol.read_varint(buf, pos, end)
                if pos == end and n > 0 and si + 1 < len(spans) and len(spans[si + 1]) >= n:
                    # Key and length end this span; the content opens the next.
                    out.append((key >> 3, [(si, start, end), (si + 1, 0, n)], (si + 1, 0, n)))
                    si, pos = si + 1, n
                    continue
                content = (si, pos, pos + n)
                pos += n
                if pos > end:
                    return None
                out.append((key >> 3, [(si, start, pos)], content))
                continue
            else:
                return None
        except ValueError:
            return None
        if pos > end:
            return None
        out.append((key >> 3, [(si, start, pos)], None))
    return out


def _fold(views: list[bytes | memoryview], memory: memoryview, offset: int, length: int) -> memoryview:
    """
    The region ``memory[offset:offset+length]``; when the inline part before it (``views[-1]``) holds exactly the
    bytes that precede the region in memory (a field's key and length written in front of a payload, as shmgrpc's
    loans do), that part is folded in and the view starts earlier, so the two parse without being joined.
    """
    if views and isinstance(views[-1], bytes):
        head = views[-1]
        k = len(head)
        if 0 < k <= offset and memory[offset - k : offset] == head:
            views.pop()
            return memory[offset - k : offset + length]
    return memory[offset : offset + length]


def _parse(spans: list[bytes | memoryview], deserializer: Any) -> Any:
    """
    Parses a message from its spans without joining them when they split at top-level field boundaries (a
    protobuf message parsed from A+B equals A parsed, then B merged); joins them otherwise.
    """
    if len(spans) == 1:
        return deserializer(spans[0])
    try:
        msg = deserializer(spans[0])
        merge = getattr(msg, "MergeFromString", None)
        if merge is None:
            raise TypeError("not a protobuf message")
        for span in spans[1:]:
            merge(span)
        return msg
    except Exception:
        return deserializer(b"".join(spans))


def msg_len(ref: Any) -> int:
    """Bytes a reference names."""
    total = 0
    for p in ref.parts:
        kind = p.WhichOneof("kind")
        total += len(p.inline) if kind == "inline" else getattr(p, kind).len if kind else 0
    return total
