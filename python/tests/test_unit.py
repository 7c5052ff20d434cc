"""Unit tests of the Python layer over the Rust core: constants from Rust, loans and the buffer protocol, loaned
messages, references told from inline messages, ``allowed_uids``."""

from __future__ import annotations

import os
import zlib
from concurrent import futures
from typing import Any

import grpc
import numpy as np
import pytest

import shmgrpc
from shmgrpc import _core

from .conftest import encode_reference, serving


def test_the_protocols_constants_come_from_the_rust_crate() -> None:
    assert _core.PROTOCOL_VERSION == 4 and _core.MIN_PROTOCOL_VERSION == 2
    assert shmgrpc.PROTOCOL_VERSION == 4, "the grpcio glue numbers calls: it speaks the core's version"
    assert _core.DEFAULT_THRESHOLD == shmgrpc.DEFAULT_THRESHOLD == 64 * 1024
    assert _core.SESSION_HEADER == "shmgrpc-session" and _core.HELLO_PATH == "/shmgrpc.v1.Session/Hello"
    assert _core.HANDSHAKE_TIMEOUT == 5.0
    assert 0 < _core.DEFAULT_BUDGET <= 4 << 30


def test_references_are_told_from_inline_messages(wire: Any) -> None:
    region = wire.Region(segment=3, generation=9, offset=64, len=1 << 20)
    ref = encode_reference(wire, b"s" * 16, [wire.Part(sender=region)], True)
    assert ref[:3] == b"\xfa\xe1\x09" and _core.is_reference(ref)
    assert not _core.is_reference(b"\x0a\x03abc") and not _core.is_reference(b"")


def test_a_loan_is_an_array_in_place_and_is_sent_once() -> None:
    loan = _core.heap_loan(4096)
    a = np.ndarray((1024,), np.float32, buffer=loan)  # type: ignore[arg-type]  # numpy's stubs: a buffer from Python 3.12
    assert a.ctypes.data == loan.address, "the array is the loan's memory"
    a[:] = np.arange(1024, dtype=np.float32)
    assert np.frombuffer(loan.tobytes(), np.float32)[1023] == 1023.0
    del a
    data = loan.take()
    assert loan.sent and len(data) == 4096
    with pytest.raises(ValueError, match="sent once"):
        loan.take()
    with pytest.raises(BufferError):
        memoryview(loan)


def test_write_fills_a_loan_from_any_buffer_at_an_offset() -> None:
    loan = _core.heap_loan(64)
    assert loan.write(b"abcd") == 4 and loan.write(bytearray(b"ef"), 4) == 2
    assert loan.write(np.arange(3, dtype=np.float32), 8) == 12, "an array is written as its bytes"  # type: ignore[arg-type]  # numpy's stubs: a buffer from Python 3.12
    assert loan.write(memoryview(b"xyz")[1:], 62) == 2, "up to the loan's last byte"
    out = loan.tobytes()
    assert out[:6] == b"abcdef" and np.array_equal(np.frombuffer(out[8:20], np.float32), [0, 1, 2])
    assert out[62:] == b"yz"
    assert loan.write(loan.view[0:4], 30) == 4, "the loan's own bytes are moved within it"
    assert loan.tobytes()[30:34] == b"abcd"
    with pytest.raises(ValueError, match="65 bytes at offset 0 do not fit a loan of 64 bytes"):
        loan.write(bytes(65))
    with pytest.raises(ValueError, match="do not fit"):
        loan.write(b"x", 64)
    with pytest.raises(BufferError, match="C-contiguous"):
        loan.write(np.zeros((4, 4))[:, 1])  # type: ignore[arg-type]  # numpy's stubs: a buffer from Python 3.12
    loan.take()
    with pytest.raises(ValueError, match="sent or released"):
        loan.write(b"late")


def test_a_session_loans_bytes_are_its_payload_only(blob_grpc: Any, tmp_path: Any) -> None:
    """A session's loan has headroom before its payload (for the message's other fields): ``tobytes`` and
    ``write`` see the payload alone (``tobytes`` once returned the headroom too)."""
    target = f"unix:{tmp_path / 'payload.sock'}"
    with serving(blob_grpc, target), shmgrpc.insecure_channel(target) as ch:
        assert ch.is_shared_memory(), ch.fallback()
        loan = ch.loan(100)
        assert loan.shared
        loan.write(b"p" * 100)
        assert loan.tobytes() == b"p" * 100
        assert bytes(loan.view) == b"p" * 100
        loan.release()


def test_join_makes_one_inline_message_of_its_slices() -> None:
    """An inline message's slices (a loaned message without a session) are joined in one copy; a loan counts as
    sent, one ``bytes`` object is returned as it is."""
    one = b"whole message"
    assert _core.join([one]) is one
    loan = _core.heap_loan(4)
    loan.write(b"WXYZ")
    assert _core.join([b"\x0a\x04", loan]) == b"\x0a\x04WXYZ" and loan.sent
    assert _core.join([bytearray(b"ab"), memoryview(b"xcdx")[1:3], np.frombuffer(b"ef", np.uint8)]) == b"abcdef"


def test_a_released_loan_keeps_memory_that_an_array_still_uses() -> None:
    loan = _core.heap_loan(1024)
    view = loan.view
    view[:4] = b"abcd"
    loan.release()
    assert bytes(view[:4]) == b"abcd", "the export keeps the memory"
    view.release()
    with pytest.raises(BufferError):
        memoryview(loan)


def test_loaned_messages_are_checked(blob: Any) -> None:
    loan = _core.heap_loan(8)
    with pytest.raises(ValueError, match="unset"):
        shmgrpc.loaned(blob.Payload(data=b"x"), "data", loan)
    with pytest.raises(ValueError, match="not a bytes field"):
        shmgrpc.loaned(blob.Payload(), "crc32", loan)


def test_allowed_uids_replaces_the_default_set(blob: Any, blob_grpc: Any, tmp_path: Any) -> None:
    """One meaning everywhere (docs/python.md): the list replaces the server's own uid and root."""
    me = os.getuid()
    for allowed, shared in (([me + 1], False), ([me], True), (None, True)):
        target = f"unix:{tmp_path / f'uids-{allowed}.sock'}"
        with serving(blob_grpc, target, allowed_uids=allowed), shmgrpc.insecure_channel(target) as ch:
            assert ch.is_shared_memory() == shared, (allowed, ch.fallback())
            if not shared:
                assert ch.fallback() == shmgrpc.Fallback.HANDSHAKE_FAILED
            d = os.urandom(1 << 20)
            assert blob_grpc.BlobStub(ch).Echo(blob.Payload(data=d, crc32=zlib.crc32(d))).data == d


def test_a_channel_made_before_its_server_gets_shared_memory_once_it_is_up(
    blob: Any, blob_grpc: Any, tmp_path: Any
) -> None:
    from .blob_server import Blob
    from .conftest import eventually

    target = f"unix:{tmp_path / 'late.sock'}"
    with shmgrpc.insecure_channel(target) as ch:
        assert not ch.is_shared_memory()
        server = shmgrpc.server(futures.ThreadPoolExecutor(2))
        blob_grpc.add_BlobServicer_to_server(Blob(), server)
        server.add_insecure_port(target)
        server.start()
        try:
            stub = blob_grpc.BlobStub(ch)
            d = os.urandom(1 << 20)

            def echoed_through_shared_memory() -> bool:
                try:
                    assert stub.Echo(blob.Payload(data=d, crc32=zlib.crc32(d)), timeout=10).data == d
                except grpc.RpcError:
                    return False
                return ch.stats()["shm_sent"] > 0

            eventually("the channel opens a session", echoed_through_shared_memory, timeout=30)
        finally:
            server.stop(None)


class Recorder(grpc.ServerInterceptor):
    """Keeps the metadata of every call."""

    def __init__(self) -> None:
        self.seen: list[dict[str, str]] = []

    def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        self.seen.append({k: v for k, v in details.invocation_metadata or () if isinstance(v, str)})
        return continuation(details)


def test_blocking_unary_calls_made_in_rust_carry_the_callers_metadata_and_options(
    blob: Any, blob_grpc: Any, tmp_path: Any
) -> None:
    """
    The hot path of small calls (``_core.UnaryUnary``, the Rust serializer and deserializer, the server's
    ``_core.UnaryHandler``) does what the Python multi-callable does: the caller's metadata and the session's
    headers, a new call number per call, options by name or by position, inline and shared-memory messages counted.
    """
    rec = Recorder()
    target = f"unix:{tmp_path / 'hot.sock'}"
    with serving(blob_grpc, target, interceptors=[rec]) as server:
        with shmgrpc.insecure_channel(target) as ch:
            assert ch.is_shared_memory(), ch.fallback()
            stub = blob_grpc.BlobStub(ch)
            assert isinstance(stub.Echo, _core.UnaryUnary)
            small = blob.Payload(data=os.urandom(1024), crc32=7)
            assert stub.Echo(small, metadata=[("x-user", "ann")], timeout=10) == small
            assert stub.Echo(small, 10, [("x-user", "bob")]) == small  # positional: the Python multi-callable
            big = blob.Payload(data=os.urandom(1 << 20), crc32=8)
            assert stub.Echo(big) == big
            reply, call = stub.Echo.with_call(small, metadata=[("x-user", "cy")])
            assert reply == small and call.code() == grpc.StatusCode.OK
            echoes = [m for m in rec.seen if _core.SESSION_HEADER in m]
            assert [m.get("x-user") for m in echoes] == ["ann", "bob", None, "cy"], echoes
            # Protocol version 4: one header, the session's id and the call's number (§6).
            assert ch._session.version == 4 and all(_core.CALL_HEADER not in m for m in echoes)  # type: ignore[union-attr]
            ids = {m[_core.SESSION_HEADER].partition(".")[0] for m in echoes}
            assert ids == {ch._session.header}  # type: ignore[union-attr]
            numbers = [int(m[_core.SESSION_HEADER].partition(".")[2]) for m in echoes]
            assert len(set(numbers)) == 4, numbers
            s = ch.stats()
            assert (s["inline_sent"], s["inline_received"], s["shm_sent"], s["shm_received"]) == (3, 3, 1, 1), s
            # A call that fails (no such method on the server) raises as grpcio does, and its scope is closed.
            missing = ch.unary_unary("/shmgrpc.demo.v1.Blob/Missing", small.SerializeToString, blob.Payload.FromString)
            with pytest.raises(grpc.RpcError) as e:
                missing(small, metadata=[("x-user", "dee")])
            assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
            assert stub.Echo(small) == small
        s = server.stats()
        assert (s["inline_received"], s["shm_received"]) == (4, 1), s


def test_a_large_field_is_read_once_and_sent_from_that_value(blob: Any) -> None:
    """
    Reading a ``bytes`` field of a upb message copies it (a new ``bytes`` object each time): the Rust serializer
    reads each field once to find the large ones and hands those values to the slow path, which sends them as they
    are (a second read would cost a copy of the payload and a fresh allocation).
    """
    from shmgrpc import _codec

    ser = blob.Payload.SerializeToString
    calls: list[tuple[Any, ...]] = []

    def slow(*args: Any) -> bytes:
        calls.append(args)
        return b"sent"

    def fields(ty: type) -> tuple[str, ...] | None:
        return _codec.large_fields(ty, ser)

    counters = _core.Client(threshold=1 << 16).counters()
    serialize = _core.Serializer(ser, slow, fields, counters, 1 << 16)
    small = blob.Payload(data=b"x" * 100, crc32=1)
    assert serialize(small) == small.SerializeToString() and calls == []
    big = blob.Payload(data=os.urandom(_core.LARGE_FIELD), crc32=2)
    assert serialize(big) == b"sent"
    [(message, read)] = calls
    assert message is big and list(read) == ["data"] and read["data"] == big.data
    items = _codec._split(big, ser, read)
    assert items is not None and items[-1] is read["data"], "the value read is the one sent"
    assert blob.Payload.FromString(b"".join(bytes(i) for i in items)) == big


def test_messages_that_are_not_protobuf_are_serialized_as_they_say() -> None:
    """A class of its own with a ``SerializeToString`` (no descriptor, as some protobuf libraries make) is sent as
    its serializer makes it: no field scan, no split."""
    from shmgrpc import _codec

    class Plain:
        def SerializeToString(self) -> bytes:
            return b"plain" * 10

    ser = Plain.SerializeToString
    assert _codec.large_fields(Plain, ser) == ()
    assert _codec._split(Plain(), ser) is None

    def slow(*args: Any) -> bytes:
        raise AssertionError(f"the slow path took {args}")

    def fields(ty: type) -> tuple[str, ...] | None:
        return _codec.large_fields(ty, ser)

    counters = _core.Client(threshold=1 << 16).counters()
    assert _core.Serializer(ser, slow, fields, counters, 1 << 16)(Plain()) == b"plain" * 10


def test_the_rust_call_objects_take_part_in_cycle_collection(tmp_path: Any) -> None:
    """
    The per-call objects made in Rust hold Python objects (the application's serializers, the channel): a cycle
    through them and the application's own objects is collected like any other (they report what they hold).
    """
    import gc
    import weakref

    class Holder:
        def serialize(self, message: bytes) -> bytes:
            return message

        def parse(self, data: bytes) -> bytes:
            return data

    ch = shmgrpc.insecure_channel(f"unix:{tmp_path / 'none.sock'}", shared_memory=False)
    try:
        holder = Holder()
        holder.call = ch.unary_unary("/x.Y/Z", holder.serialize, holder.parse)  # type: ignore[attr-defined]
        assert isinstance(holder.call, _core.UnaryUnary)  # type: ignore[attr-defined]
        gone = weakref.ref(holder)
        del holder
        gc.collect()
        assert gone() is None, "a cycle through a Rust call object was not collected"
    finally:
        ch.close()


def test_the_stats_type_names_every_counter() -> None:
    """``shmgrpc.Stats``, the type of every ``stats()``, has exactly the keys the core reports, and ``fallbacks``
    one per :class:`shmgrpc.Fallback`."""
    from typing import get_type_hints

    counters = shmgrpc.stats()
    assert set(get_type_hints(shmgrpc.Stats)) == set(counters)
    assert set(counters["fallbacks"]) == {f.value for f in shmgrpc.Fallback}
    channel = shmgrpc.insecure_channel("unix:/nonexistent/stats.sock", shared_memory=False)
    try:
        assert set(channel.stats()) == set(counters)
    finally:
        channel.close()
