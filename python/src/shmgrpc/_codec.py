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
from collections.abc import Callable
from typing import Any

import grpc

from . import _core
from ._core import Counters, Loan, Piece, Received, Session, StatusError
from .stats import Fallback

CODES = {code.value[0]: code for code in grpc.StatusCode}
"""gRPC status codes by number."""


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
    """A message whose ``bytes`` field ``field`` is a :class:`Loan` (built by :func:`shmgrpc.loaned`)."""

    def __init__(self, message: Any, field: str, loan: Loan) -> None:
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
    if isinstance(message, Loaned) and message.loan.sent:
        raise ValueError("a loan is sent once")


def encode(
    message: Any,
    serialize: Callable[[Any], bytes] | None,
    session: Session | None,
    counters: Counters,
    threshold: int,
    fallback: Fallback | None,
) -> Any:
    """
    What goes on the gRPC stream for ``message``: ``bytes`` (a reference or the message inline) or a
    ``_core.Waiting`` when the message waits for the peer (resolve it with :func:`settle` or :func:`settle_async`).
    """
    if isinstance(message, Loaned):
        head = message.head(serialize)
        items: list[Any] = [head, message.loan]
        n = len(head) + len(message.loan)
    else:
        data = serialize(message) if serialize is not None else message
        items = [data]
        n = len(data)
    if session is None or not session.alive:
        reason = (fallback or (Fallback.SESSION_CLOSED if session is not None else None)) if n >= threshold else None
        counters.inline_sent(n, reason.value if reason is not None else None)
        return _inline(items)
    return session.send(items)


def _inline(items: list[Any]) -> bytes:
    """The message's bytes (a loan's are copied without the GIL, and the loan counts as sent)."""
    if len(items) == 1:
        return items[0] if isinstance(items[0], bytes) else bytes(items[0])
    head, loan = items
    return bytes(head) + loan.take()


def settle(out: Any) -> bytes:
    """The bytes to send for what :func:`encode` returned, waiting (without the GIL) if it must."""
    if isinstance(out, (bytes, bytearray, memoryview)):
        return bytes(out)
    data, _ = out.wait()
    return data


async def settle_async(out: Any) -> bytes:
    """As :func:`settle`, without blocking the event loop (a wait runs on the default executor)."""
    if isinstance(out, (bytes, bytearray, memoryview)):
        return bytes(out)
    ready = out.poll()
    if ready is None:
        ready = await asyncio.get_running_loop().run_in_executor(None, out.wait)
    return ready[0]


def parse_received(r: Received, parse: Callable[[Any], Any] | None) -> Any:
    """Parses a resolved reference in place (one piece) or from its joined bytes; then lets the peer reuse it."""
    try:
        if parse is None:
            return r.join()
        pieces = r.pieces()
        if len(pieces) == 1:
            view = memoryview(pieces[0])
            try:
                msg = parse(view)
            finally:
                try:
                    view.release()
                except BufferError:
                    pass  # the parser kept an export: the piece lives as long as it does
        else:
            msg = parse(r.join())
        r.check()
        return msg
    except StatusError:
        raise
    except Exception as e:
        raise StatusError(
            grpc.StatusCode.INVALID_ARGUMENT.value[0], f"message in shared memory does not decode: {e}"
        ) from None
    finally:
        r.release()


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
        try:
            split = r.split_field(self.number)
            if split is None:
                return self.inline(r.join())
            piece, rest = split
            msg = self.parse(rest)
            r.check()
            return View(msg, memoryview(piece), piece)
        except StatusError:
            raise
        except Exception as e:
            raise StatusError(
                grpc.StatusCode.INVALID_ARGUMENT.value[0], f"message in shared memory does not decode: {e}"
            ) from None
        finally:
            r.release()


def decode(
    data: bytes,
    parse: Any,
    receive: Callable[[bytes], Received],
    counters: Counters,
) -> Any:
    """One incoming message (inline or a reference) parsed with ``parse`` (a :class:`ViewOf` gives a view)."""
    if not _core.is_reference(data):
        if isinstance(parse, ViewOf):
            counters.inline_received(len(data))
            return parse.inline(data)
        return parse_inline(data, parse, counters)
    r = receive(data)
    if isinstance(parse, ViewOf):
        return parse.received(r)
    return parse_received(r, parse)
