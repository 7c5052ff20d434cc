"""
Messages through the Rust core: what a serializer and a deserializer of shmgrpc's grpcio wrappers do.

Encoding hands the serialized message (or, for a :class:`Loaned` message, its head and the loan in place) to the
session in :mod:`shmgrpc._core`, which writes it into shared memory without the GIL and returns the reference to
send, or says the message goes inline. Decoding resolves a reference into pieces of the peer's memory and parses
from them in place; the peer's buffer is released as soon as parsing ends (or, for a :class:`View`, when the view
and every array made from it are gone).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from . import _core
from ._core import Call, Counters, Loan, Piece, Received, Session, StatusError
from .stats import Fallback

CODES = {code.value[0]: code for code in grpc.StatusCode}
"""gRPC status codes by number."""


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


def status_code(e: StatusError) -> grpc.StatusCode:
    """The ``grpc.StatusCode`` of a core ``StatusError``."""
    return CODES.get(e.args[0], grpc.StatusCode.UNKNOWN)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


class Loaned:
    """
    A message whose ``bytes`` field ``field`` is carried by a :class:`Loan`, or by a received :class:`View`
    (built by :func:`shmgrpc.loaned`). A view's bytes in the peer's memory go back to it in place (a ``receiver``
    part: an echo or a forward without a copy).
    """

    def __init__(self, message: Any, field: str, loan: Loan | View) -> None:
        desc = message.DESCRIPTOR.fields_by_name.get(field)
        if desc is None or desc.type != desc.TYPE_BYTES:
            raise ValueError(f"{field} is not a bytes field of {message.DESCRIPTOR.full_name}")
        if message.HasField(field) if desc.has_presence else getattr(message, field):
            raise ValueError(f"{field} must be left unset: the loan carries it")
        self.message = message
        self.loan = loan
        self.key = _varint(desc.number << 3 | 2)

    def head(self, serialize: Callable[[Any], bytes] | None) -> bytes:
        """The message without the field, then the field's key and length: what precedes the loan's bytes."""
        body = serialize(self.message) if serialize is not None else self.message.SerializeToString()
        return bytes(body) + self.key + _varint(len(self.loan))


def _check_loan(message: Any) -> None:
    if isinstance(message, Loaned) and isinstance(message.loan, Loan) and message.loan.sent:
        raise ValueError("a loan is sent once")


def prepare(
    message: Any,
    serialize: Callable[[Any], bytes] | None,
    session: Session | None,
    large: dict[str, Any] | None = None,
) -> list[Any]:
    """
    The slices of ``message``'s encoding: for a :class:`Loaned` message its head and the loan; with a session,
    large ``bytes`` fields as their own values (see :func:`_split`; ``large`` gives those values when the caller
    already read them); else the serialized message.
    """
    if isinstance(message, Loaned):
        carrier = message.loan
        if isinstance(carrier, View):
            return [message.head(serialize), carrier._piece if carrier._piece is not None else carrier.data]
        return [message.head(serialize), carrier]
    if session is not None:
        split = _split(message, serialize, large)
        if split is not None:
            return split
    return [serialize(message) if serialize is not None else message]


def send(
    items: list[Any],
    session: Session | None,
    counters: Counters,
    threshold: int,
    fallback: Fallback | None,
    call: Call | None = None,
) -> Any:
    """
    What goes on the gRPC stream for the message ``items`` make: ``bytes`` (a reference or the message inline) or
    a ``_core.Waiting`` when the message waits for the peer (resolve it with :func:`settle` or
    :func:`settle_async`). With ``call`` (a session that numbers calls), the message is the call's next one.
    """
    if session is not None and session.alive:
        return (call or session).send(items)
    n = sum(len(x) for x in items)
    reason = (fallback or (Fallback.SESSION_CLOSED if session is not None else None)) if n >= threshold else None
    counters.inline_sent(n, reason.value if reason is not None else None)
    return _inline(items)


def encode(
    message: Any,
    serialize: Callable[[Any], bytes] | None,
    session: Session | None,
    counters: Counters,
    threshold: int,
    fallback: Fallback | None,
    call: Call | None = None,
    large: dict[str, Any] | None = None,
) -> Any:
    """:func:`prepare`, then :func:`send`."""
    return send(prepare(message, serialize, session, large), session, counters, threshold, fallback, call)


class Encoded:
    """
    A message already encoded (by shmgrpc's wrapper around a call or a handler): the serializer passes ``data`` on
    as it is. A wrapper, not a ``bytes`` subclass, which would copy the message when made and again when turned
    back into ``bytes``.
    """

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


def inline_only(message: Any, large: Any = None) -> bytes:
    """
    The slow path of a Rust serializer that only ``Serializer.inline`` is asked of (the asyncio client's and
    server's fast paths, which send everything else their own way): never called.
    """
    raise AssertionError("a serializer made for Serializer.inline was called")


LARGE_FIELD = _core.LARGE_FIELD
"""A top-level ``bytes`` field from this size up is written straight from its value into shared memory."""


def large_fields(ty: type, serialize: Callable[[Any], bytes] | None) -> tuple[str, ...] | None:
    """
    For the Rust serializer (``_core.Serializer``): the fields of message type ``ty`` that, when one is large,
    make :func:`_split` write it from its value (the message then takes the slow path, :func:`encode`), or ``None``
    when every message of the type takes the slow path (a loaned or an already encoded message, no serializer).
    """
    if serialize is None or issubclass(ty, (Loaned, Encoded, bytes, bytearray, memoryview)):
        return None
    if not hasattr(ty, "SerializeToString") or serialize != ty.SerializeToString:
        return ()  # a custom serializer: its output is sent as it is
    desc = getattr(ty, "DESCRIPTOR", None)
    if desc is None:
        return ()  # not a protobuf message (a class of its own with a SerializeToString)
    return tuple(fd.name for fd in _bytes_fields(desc))


_BYTES_FIELDS: dict[Any, tuple[Any, ...]] = {}
"""The singular ``bytes`` fields of each message type seen (those :func:`_split` looks at)."""


def _split(message: Any, serialize: Any, read: dict[str, Any] | None = None) -> list[Any] | None:
    """
    ``message``'s encoding as slices when it has large top-level ``bytes`` fields: the other fields serialized,
    then each large field's key, length and value (the value object itself, which the core copies once into shared
    memory, without the GIL). protobuf's ``SerializeToString`` would first build the whole encoding in a fresh
    ``bytes`` object: a second copy of every payload, and a fresh allocation that costs page faults (and upb's
    ``ByteSize`` encodes the whole message to count it). A field's position in the encoding does not change the
    message (protobuf parsers take fields in any order). ``None`` (serialize as usual) when there is no large
    ``bytes`` field, and for a custom serializer, extensions or unknown fields. ``read`` holds the large fields'
    values when the caller already read every ``bytes`` field (the Rust serializer does): reading one again would
    copy it again (upb returns a new ``bytes`` object on each read).
    """
    if isinstance(message, (bytes, bytearray, memoryview)) or not hasattr(message, "SerializeToString"):
        return None
    if serialize is not None and serialize != type(message).SerializeToString:
        return None
    desc = getattr(message, "DESCRIPTOR", None)
    if desc is None:
        return None
    fields = _bytes_fields(desc)
    large = []
    for fd in fields:
        value = read.get(fd.name, b"") if read is not None else getattr(message, fd.name)
        if len(value) >= LARGE_FIELD:
            large.append((fd, value))
    if not large:
        return None
    try:
        if desc.extensions or _has_unknown(message):
            return None
        big = {fd.name for fd, _ in large}
        rest = type(message)()
        for fd in desc.fields:
            name = fd.name
            if name in big:
                continue
            if _repeated(fd):
                values = getattr(message, name)
                if len(values):
                    if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
                        target = getattr(rest, name)
                        for k in values:
                            if fd.message_type.fields_by_name["value"].message_type is not None:
                                target[k].CopyFrom(values[k])
                            else:
                                target[k] = values[k]
                    else:
                        getattr(rest, name).extend(values)
                continue
            if fd.has_presence and not message.HasField(name):
                continue
            value = getattr(message, name)
            if fd.message_type is not None:
                getattr(rest, name).CopyFrom(value)
            else:
                setattr(rest, name, value)
    except Exception:
        return None
    items: list[Any] = [rest.SerializeToString()]
    for fd, value in large:
        items.append(_varint(fd.number << 3 | 2) + _varint(len(value)))
        items.append(value)
    return items


def _bytes_fields(desc: Any) -> tuple[Any, ...]:
    fields = _BYTES_FIELDS.get(desc)
    if fields is None:
        fields = _BYTES_FIELDS[desc] = tuple(fd for fd in desc.fields if fd.type == fd.TYPE_BYTES and not _repeated(fd))
    return fields


def _repeated(fd: Any) -> bool:
    return bool(fd.is_repeated if hasattr(fd, "is_repeated") else fd.label == fd.LABEL_REPEATED)


def _has_unknown(message: Any) -> bool:
    try:
        from google.protobuf import unknown_fields

        return len(unknown_fields.UnknownFieldSet(message)) > 0
    except Exception:
        return True


def _inline(items: list[Any]) -> bytes:
    """The message's bytes, joined in one copy without the GIL (a loan counts as sent); one ``bytes`` as it is."""
    if len(items) == 1 and isinstance(items[0], bytes):
        return items[0]
    out: bytes = _core.join(items)
    return out


def settle(out: Any) -> bytes:
    """The bytes to send for what :func:`encode` returned, waiting (without the GIL) if it must."""
    if isinstance(out, (bytes, bytearray, memoryview)):
        return bytes(out)
    data, _ = out.wait()
    return data


def settle_now(out: Any) -> bytes:
    """As :func:`settle`, for a thread that must not wait (an event loop): a message still waiting goes inline."""
    if isinstance(out, (bytes, bytearray, memoryview)):
        return bytes(out)
    data, _ = out.now()
    return data


class Deferred:
    """
    A reference that overtook its segment's registration, met on a thread that must not wait for it (grpcio's
    channel or server polling thread, an event loop): resolved later, on the call's own thread.
    """

    def __init__(self, data: bytes, parse: Any) -> None:
        self.data = data
        self.parse = parse


async def settle_async(out: Any) -> bytes:
    """As :func:`settle`, without blocking the event loop (a wait runs on the default executor)."""
    if isinstance(out, (bytes, bytearray, memoryview)):
        return bytes(out)
    ready = out.poll()
    if ready is None:
        ready = await asyncio.get_running_loop().run_in_executor(None, out.wait)
    return ready[0]


@contextlib.contextmanager
def _decoding(r: Received) -> Iterator[None]:
    """
    Decoding a resolved reference: a failure that is not a status already is a message that does not decode
    (:func:`undecodable`); the peer's buffer is released either way.
    """
    try:
        yield
    except StatusError:
        raise
    except Exception as e:
        raise undecodable(e) from None
    finally:
        r.release()


def parse_received(r: Received, parse: Callable[[Any], Any] | None) -> Any:
    """Parses a resolved reference in place (one piece) or from its joined bytes; then lets the peer reuse it."""
    with _decoding(r):
        if parse is None:
            return r.join()
        pieces = r.pieces()
        if len(pieces) == 1 or r.aligned():
            # In place: the first piece parsed, the others merged (pieces end between top-level fields).
            msg = _in_place(parse, pieces[0], None)
            for piece in pieces[1:]:
                _in_place(msg.MergeFromString, piece, msg)
        else:
            msg = parse(r.join())
        r.check()
        return msg


def undecodable(e: Exception) -> StatusError:
    """The status of a message in shared memory that does not decode as the method's message (section 9)."""
    return StatusError(grpc.StatusCode.INVALID_ARGUMENT.value[0], f"message in shared memory does not decode: {e}")


def _in_place(f: Callable[[Any], Any], piece: Piece, result: Any) -> Any:
    """``f`` of a memoryview of ``piece``, released afterwards (unless ``f`` kept an export: it keeps the piece)."""
    view = memoryview(piece)
    try:
        out = f(view)
    finally:
        try:
            view.release()
        except BufferError:
            pass
    return result if result is not None else out


def parse_inline(data: bytes, parse: Callable[[Any], Any] | None, counters: Counters) -> Any:
    """Parses an inline message; a message that does not decode is ``INVALID_ARGUMENT`` (the peer's fault)."""
    if parse is None:
        counters.inline_received(len(data))
        return data
    try:
        msg = parse(data)
    except Exception as e:
        counters.bad_reference()
        raise StatusError(grpc.StatusCode.INVALID_ARGUMENT.value[0], f"message does not decode: {e}") from None
    counters.inline_received(len(data))
    return msg


class View:
    """
    A message whose large ``bytes`` field is read in place from shared memory, without a copy.

    :attr:`message` holds every other field; :attr:`data` is a read-only ``memoryview`` of the field's bytes in the
    sender's memory (or, when the message came inline or the field was not in one piece, of a copy). The sender's
    buffer stays held while the view is open or any export of :attr:`data` lives (``np.frombuffer(view.data)``
    keeps it, and the array stays valid after :meth:`release`): release the view, and drop such arrays, once the
    bytes were used. Made by channels created with ``views=`` (see :func:`shmgrpc.insecure_channel`).
    """

    def __init__(self, message: Any, data: memoryview, piece: Piece | None = None) -> None:
        self.message = message
        self.data = data
        self._piece = piece

    @property
    def shared(self) -> bool:
        """Whether :attr:`data` lies in shared memory."""
        return self._piece is not None

    def __len__(self) -> int:
        return len(self.data)

    def release(self) -> None:
        """Lets the sender reuse its buffer once no array made from :attr:`data` lives (idempotent)."""
        if self._piece is not None:
            try:
                self.data.release()
            except BufferError:
                pass  # an array made from the view keeps the memory (and the sender's hold) until it goes
            self._piece = None

    def __del__(self) -> None:
        self.release()

    def __enter__(self) -> View:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class ViewOf:
    """A deserializer that returns a :class:`View` of field ``field`` instead of the parsed message."""

    def __init__(self, parse: Any, field: str) -> None:
        cls = getattr(parse, "__self__", None)
        desc = getattr(cls, "DESCRIPTOR", None)
        f = desc.fields_by_name.get(field) if desc is not None else None
        repeated = f is not None and (
            f.is_repeated if hasattr(f, "is_repeated") else f.label == f.LABEL_REPEATED  # protobuf < 6.31
        )
        if f is None or f.type != f.TYPE_BYTES or repeated:
            raise ValueError(f"{field} is not a singular bytes field of the message")
        self.parse = parse
        self.number = f.number
        self.field = field

    def inline(self, data: bytes) -> View:
        """An inline message: parsed, the field copied out (no shared memory to point into)."""
        msg = self.parse(data)
        value = getattr(msg, self.field)
        msg.ClearField(self.field)
        return View(msg, memoryview(value))

    def received(self, r: Received) -> View:
        """A resolved reference: the field in place when it lies in one piece, else parsed as usual."""
        with _decoding(r):
            split = r.split_field(self.number)
            if split is None:
                return self.inline(r.join())
            piece, rest = split
            msg = self.parse(rest)
            r.check()
            return View(msg, memoryview(piece), piece)


def decode(
    data: bytes,
    parse: Any,
    receive: Callable[[bytes], Received],
    counters: Counters,
) -> Any:
    """One incoming message (inline or a reference) parsed with ``parse`` (a :class:`ViewOf` gives a view)."""
    if not _core.is_reference(data):
        if isinstance(parse, ViewOf):
            return parse_inline(data, parse.inline, counters)
        return parse_inline(data, parse, counters)
    r = receive(data)
    if isinstance(parse, ViewOf):
        return parse.received(r)
    return parse_received(r, parse)
