"""Unit tests: references, frames and the descriptor rule, tickets, segments, the pool, the embedded descriptor."""

from __future__ import annotations

import array
import fcntl
import mmap
import os
import socket
import subprocess
import sys
import time

import pytest

from shmgrpc import protocol
from shmgrpc._io import FrameReader, recv_with_fds
from shmgrpc.pool import Pool, PoolExhausted
from shmgrpc.protocol import BadReference
from shmgrpc.segment import PeerSegment, Segment, SegmentError
from shmgrpc.server import Tickets


def sample() -> object:
    region = protocol.Region(segment=3, generation=9, offset=64, len=1 << 20)
    return protocol.Reference(session=b"s" * 16, from_server=True, parts=[protocol.Part(sender=region)])


def test_references_round_trip_and_start_with_the_key() -> None:
    data = protocol.encode_reference(sample())
    assert data[:3] == b"\xfa\xe1\x09"
    assert protocol.is_reference(data)
    assert protocol.decode_reference(data) == sample()


@pytest.mark.parametrize(
    "data",
    [
        b"\xfa\xe1\x09",  # no length
        b"\xfa\xe1\x09\x05ab",  # short
        protocol.encode_reference(sample()) + b"\x08\x01",  # a trailing field
        b"\xfa\xe1\x09" + b"\xff" * 11,  # an overlong varint
        b"\x0a\x03abc",  # an ordinary message
        b"\xfa\xe1\x09\x80\x80\x04" + b"\x00" * 65536,  # too long
    ],
)
def test_malformed_references_are_invalid_arguments(data: bytes) -> None:
    with pytest.raises(BadReference) as e:
        protocol.decode_reference(data)
    assert e.value.code == "INVALID_ARGUMENT"


def frame(**kind: object) -> bytes:
    return protocol.encode_frame(protocol.side(**kind))


def memfd() -> int:
    fd = os.memfd_create("t", os.MFD_CLOEXEC)
    os.ftruncate(fd, 4096)
    return fd


def send(sock: socket.socket, data: bytes, fd: int | None = None) -> None:
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))] if fd is not None else []
    assert sock.sendmsg([data], anc) == len(data)


def read_all(sock: socket.socket, reader: FrameReader, n: int) -> list[tuple[object, int | None]]:
    out: list[tuple[object, int | None]] = []
    while len(out) < n:
        data, fds = recv_with_fds(sock)
        out += reader.feed(data, fds)
    return out


def test_a_descriptor_belongs_to_the_last_frame_that_starts_in_its_recvmsg() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    release = frame(release=protocol.Release(segment=1, generation=1))
    register = frame(register=protocol.Register(segment=7, len=4096))
    fd = memfd()
    # Release and the first half of Register together, the descriptor with the second half: the descriptor's
    # sendmsg holds no frame start, so it is sent with the frame start (protocol section 3). Here: one sendmsg with
    # both frames, the descriptor attached -> it belongs to Register, the last frame starting in that recvmsg.
    send(a, release + register, fd)
    got = read_all(b, FrameReader(), 2)
    assert got[0][0].WhichOneof("kind") == "release" and got[0][1] is None  # type: ignore[attr-defined]
    assert got[1][0].WhichOneof("kind") == "register" and got[1][1] is not None  # type: ignore[attr-defined]
    os.close(got[1][1])  # type: ignore[arg-type]
    # A frame split across writes: the descriptor with its first byte, the rest later.
    send(a, register[:3], fd)
    send(a, register[3:])
    got = read_all(b, FrameReader(), 1)
    assert got[0][1] is not None
    os.close(got[0][1])
    os.close(fd)


def test_descriptors_that_break_the_rule_are_protocol_errors() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    register = frame(register=protocol.Register(segment=7, len=4096))
    fd = memfd()
    # The descriptor arrives in a recvmsg in which no frame starts.
    r = FrameReader()
    send(a, register[:3])
    r.feed(*recv_with_fds(b))
    send(a, register[3:], fd)
    with pytest.raises(protocol.ProtocolError):
        r.feed(*recv_with_fds(b))
    # A descriptor on a frame that may not carry one.
    send(a, frame(release=protocol.Release(segment=1, generation=1)), fd)
    with pytest.raises(protocol.ProtocolError):
        FrameReader().feed(*recv_with_fds(b))
    # A frame longer than the limit, and a frame without a kind.
    with pytest.raises(protocol.ProtocolError):
        FrameReader().feed((1 << 20).to_bytes(4, "little"), [])
    with pytest.raises(protocol.ProtocolError):
        FrameReader().feed(b"\x00\x00\x00\x00", [])
    os.close(fd)


def test_tickets_are_valid_once_and_cannot_be_forged() -> None:
    t = Tickets()
    ticket = t.issue()
    assert len(ticket) <= protocol.MAX_TICKET_LEN
    forged = bytes([ticket[0] ^ 1]) + ticket[1:]
    assert not t.redeem(forged)
    assert not Tickets().redeem(ticket), "another server's secret"
    assert t.redeem(ticket)
    assert not t.redeem(ticket), "used twice"
    assert not t.redeem(b"short")


def test_a_peer_memfd_without_seals_or_smaller_than_claimed_is_refused() -> None:
    fd = os.memfd_create("t", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, 8192)
    with pytest.raises(SegmentError, match="seals"):
        PeerSegment(os.dup(fd), 8192)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    with pytest.raises(SegmentError, match="claimed"):
        PeerSegment(os.dup(fd), 1 << 20)
    seg = PeerSegment(os.dup(fd), 8192)
    assert bytes(seg.range(0, 4)) == b"\0\0\0\0"
    with pytest.raises(SegmentError):
        seg.range(8190, 4)
    seg.close()
    os.close(fd)


def test_our_segments_cannot_be_mapped_writable_by_a_peer() -> None:
    s = Segment(4096)
    with pytest.raises(PermissionError):
        mmap.mmap(s.fd, 4096, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    s.close()


def test_the_pool_reuses_buffers_under_new_generations_within_its_budget() -> None:
    p = Pool(budget=256 * 1024)
    a = p.alloc(100_000)
    sid, gen = a.segment_id, a.generation
    a.release()
    a.release()  # idempotent
    b = p.alloc(120_000)
    assert b.segment_id == sid and b.generation != gen
    with pytest.raises(PoolExhausted):
        p.alloc(200_000)  # 256 KiB class: over the budget while b is leased
    b.release()
    c = p.alloc(200_000)  # the idle 128 KiB buffer is dropped to make room
    assert p.stats().bytes == 256 * 1024
    c.release()
    p.close()
    assert p.stats().bytes == 0


def test_the_embedded_descriptor_matches_the_proto() -> None:
    tool = os.path.join(os.path.dirname(__file__), "..", "tools", "gen_descriptor.py")
    subprocess.run([sys.executable, tool, "--check"], check=True)


def test_frames_are_split_and_joined_at_any_boundary() -> None:
    frames = [frame(release=protocol.Release(segment=i, generation=i)) for i in range(50)]
    stream = b"".join(frames)
    for step in (1, 3, 7, 64, len(stream)):
        r = FrameReader()
        got = []
        for i in range(0, len(stream), step):
            got += r.feed(stream[i : i + step], [])
        assert [m.release.segment for m, _ in got] == list(range(50)), step  # type: ignore[attr-defined]
        assert not r.pending()


def test_hello_round_trips_through_the_embedded_messages() -> None:
    m = protocol.HelloResponse(version=2, side_channel="/tmp/x.sock", ticket=b"t" * 56)
    assert protocol.HelloResponse.FromString(memoryview(m.SerializeToString())) == m
    assert time.monotonic() > 0
