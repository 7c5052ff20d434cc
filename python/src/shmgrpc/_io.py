"""
The process's side-channel I/O: one thread (``shmgrpc-io``) runs every side channel of the process.

Sockets are non-blocking. Sending a frame only queues it (and tries a non-blocking write at once); the I/O thread
writes the rest when the socket is writable. Nothing on the I/O thread ever waits on a peer, and the number of
threads does not depend on the number of sessions. A peer that lets :data:`MAX_QUEUED_FRAMES` frames pile up, or
whose socket makes no progress for :data:`WRITE_STALL` seconds, loses its connection.
"""

from __future__ import annotations

import array
import collections
import logging
import os
import selectors
import socket
import struct
import threading
import time
from typing import Any, Callable

from . import protocol

log = logging.getLogger("shmgrpc")

MAX_QUEUED_FRAMES = 65536
"""Frames that may wait for a peer's socket before its connection is closed."""
WRITE_STALL = 10.0
"""Seconds a write may make no progress before the connection is closed."""
MAX_FDS = 16
"""Most descriptors one ``recvmsg`` accepts."""
_FDS_WITH_FRAME = ("challenge", "register")


class FrameReader:
    """
    Splits a side-channel byte stream into frames and pairs each descriptor with its frame.

    The rule (protocol section 3): a descriptor belongs to the last frame whose first byte the same ``recvmsg``
    returned. Anything else (no frame start in that ``recvmsg``, two descriptors for one frame, a descriptor on a
    frame that may not carry one) is a protocol error.
    """

    def __init__(self) -> None:
        self.buf = bytearray()
        self.base = 0  # stream offset of buf[0]
        self.scan = 0  # stream offset of the next frame start not yet walked past
        self.fds: dict[int, list[int]] = {}

    def feed(self, data: bytes, fds: list[int]) -> list[tuple[Any, int | None]]:
        """Adds one ``recvmsg``'s bytes and descriptors; returns the complete frames, each with its descriptor."""
        start = self.base + len(self.buf)
        end = start + len(data)
        self.buf += data
        starts: list[int] = []
        while self.scan < end:
            if self.scan >= start:
                starts.append(self.scan)
            at = self.scan - self.base
            if at + 4 > len(self.buf):
                break
            (n,) = struct.unpack_from("<I", self.buf, at)
            if n > protocol.MAX_FRAME_LEN:
                self._close_all(fds)
                raise protocol.ProtocolError("frame too long")
            self.scan += 4 + n
        if fds:
            if not starts:
                self._close_all(fds)
                raise protocol.ProtocolError("a descriptor arrived without a frame")
            if len(fds) > 1 or starts[-1] in self.fds:
                self._close_all(fds)
                raise protocol.ProtocolError("more than one descriptor for one frame")
            self.fds[starts[-1]] = fds
        out: list[tuple[Any, int | None]] = []
        while len(self.buf) >= 4:
            (n,) = struct.unpack_from("<I", self.buf, 0)
            if len(self.buf) < 4 + n:
                break
            offset = self.base
            body = bytes(self.buf[4 : 4 + n])
            del self.buf[: 4 + n]
            self.base += 4 + n
            fd_list = self.fds.pop(offset, [])
            msg = protocol.SideMessage()
            try:
                msg.ParseFromString(body)
            except Exception:
                self._close_all(fd_list)
                raise protocol.ProtocolError("undecodable frame") from None
            kind = msg.WhichOneof("kind")
            if kind is None:
                self._close_all(fd_list)
                raise protocol.ProtocolError("a frame without a kind")
            if fd_list and kind not in _FDS_WITH_FRAME:
                self._close_all(fd_list)
                raise protocol.ProtocolError(f"a descriptor on a {kind} frame")
            out.append((msg, fd_list[0] if fd_list else None))
        return out

    def pending(self) -> bool:
        """Whether a frame is cut short (bytes or descriptors waiting)."""
        return bool(self.buf) or bool(self.fds)

    @staticmethod
    def _close_all(fds: list[int]) -> None:
        for fd in fds:
            os.close(fd)


def recv_with_fds(sock: socket.socket, size: int = 65536) -> tuple[bytes, list[int]]:
    """One ``recvmsg``: bytes and the descriptors that came with them (close-on-exec)."""
    data, anc, flags, _ = sock.recvmsg(size, socket.CMSG_SPACE(MAX_FDS * 4), socket.MSG_CMSG_CLOEXEC)
    fds: list[int] = []
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            a = array.array("i")
            a.frombytes(payload[: len(payload) - len(payload) % a.itemsize])
            fds.extend(a)
    if flags & socket.MSG_CTRUNC:
        FrameReader._close_all(fds)
        raise protocol.ProtocolError("descriptors truncated")
    return data, fds


def peer_cred(sock: socket.socket) -> tuple[int, int, int]:
    """``(pid, uid, gid)`` of the socket's peer (``SO_PEERCRED``)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


class Conn:
    """
    One side-channel connection on the I/O thread. Subclasses handle frames (:meth:`on_frame`) and the end
    (:meth:`on_close`); :meth:`send` may be called from any thread.
    """

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.reader = FrameReader()
        self._out: collections.deque[list[Any]] = collections.deque()
        self._lock = threading.Lock()
        self._closed = False
        self._writing = False
        self._stalled_since: float | None = None
        self.deadline: float | None = None

    # -- called on the I/O thread --
    def on_frame(self, msg: Any, fd: int | None) -> None:
        """One frame from the peer. Raise :class:`protocol.ProtocolError` to close the connection."""
        raise NotImplementedError

    def on_close(self) -> None:
        """The connection ended (either side)."""

    def on_timeout(self) -> None:
        """``deadline`` passed."""
        self.close()

    def _readable(self) -> None:
        try:
            data, fds = recv_with_fds(self.sock)
        except (BlockingIOError, InterruptedError):
            return
        except (OSError, protocol.ProtocolError) as e:
            log.debug("side channel closed: %s", e)
            self.close()
            return
        if not data:
            if fds:
                FrameReader._close_all(fds)
            self.close()
            return
        try:
            for msg, fd in self.reader.feed(data, fds):
                if self._closed:
                    if fd is not None:
                        os.close(fd)
                    continue
                self.on_frame(msg, fd)
        except protocol.ProtocolError as e:
            log.debug("side-channel protocol error: %s", e)
            self.close()

    # -- any thread --
    def send(self, msg: Any, fd: int | None = None) -> bool:
        """
        Queues one frame (with a descriptor, sent by a ``sendmsg`` of its own); never waits on the peer.
        Returns False when the connection is closed.
        """
        frame = protocol.encode_frame(msg)
        with self._lock:
            if self._closed:
                return False
            if len(self._out) >= MAX_QUEUED_FRAMES:
                log.debug("the peer does not read its side channel; closing")
                overflow = True
            else:
                overflow = False
                self._out.append([memoryview(frame), os.dup(fd) if fd is not None else None])
                self._flush_locked()
                want_write = bool(self._out) and not self._writing
                if want_write:
                    self._writing = True
        if overflow:
            self.close()
            return False
        if want_write:
            LOOP.call_soon(lambda: LOOP.watch(self, write=True))
        return True

    def _flush_locked(self) -> None:
        while self._out:
            item = self._out[0]
            data, fd = item
            try:
                if fd is not None:
                    n = self.sock.sendmsg(
                        [data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))], socket.MSG_NOSIGNAL
                    )
                    os.close(fd)
                    item[1] = None
                else:
                    n = self.sock.send(data, socket.MSG_NOSIGNAL)
            except (BlockingIOError, InterruptedError):
                if self._stalled_since is None:
                    self._stalled_since = time.monotonic()
                return
            except OSError:
                self._out.clear()
                return
            self._stalled_since = None
            if n < len(data):
                item[0] = data[n:]
                continue
            self._out.popleft()

    def _writable(self) -> None:
        with self._lock:
            self._flush_locked()
            done = not self._out
            if done:
                self._writing = False
        if done:
            LOOP.watch(self, write=False)

    def stalled(self, now: float) -> bool:
        """Whether a write has made no progress for too long."""
        s = self._stalled_since
        return s is not None and now - s > WRITE_STALL

    def close(self) -> None:
        """Closes the connection (idempotent; from any thread)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for _, fd in self._out:
                if fd is not None:
                    os.close(fd)
            self._out.clear()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        LOOP.call_soon(lambda: LOOP.forget(self))
        self.on_close()

    @property
    def closed(self) -> bool:
        """Whether the connection has ended."""
        return self._closed


class Loop:
    """The I/O thread: a selector over every side channel and listener of the process."""

    def __init__(self) -> None:
        self.sel = selectors.DefaultSelector()
        self._calls: collections.deque[Callable[[], None]] = collections.deque()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._conns: set[Conn] = set()
        self._thread: threading.Thread | None = None
        self._start = threading.Lock()

    def _ensure(self) -> None:
        if self._thread is None:
            with self._start:
                if self._thread is None:
                    t = threading.Thread(target=self._run, name="shmgrpc-io", daemon=True)
                    t.start()
                    self._thread = t

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Runs ``fn`` on the I/O thread."""
        self._ensure()
        self._calls.append(fn)
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass

    def add(self, conn: Conn) -> None:
        """Starts reading ``conn`` on the I/O thread."""
        self.call_soon(lambda: self._add(conn))

    def _add(self, conn: Conn) -> None:
        if conn.closed:
            return
        self._conns.add(conn)
        self.sel.register(conn.sock, selectors.EVENT_READ, conn)

    def add_listener(self, sock: socket.socket, on_accept: Callable[[socket.socket], None]) -> None:
        """Accepts connections on ``sock`` on the I/O thread."""
        sock.setblocking(False)

        def go() -> None:
            self.sel.register(sock, selectors.EVENT_READ, on_accept)

        self.call_soon(go)

    def remove_listener(self, sock: socket.socket) -> None:
        """Stops accepting on ``sock`` and closes it."""

        def go() -> None:
            try:
                self.sel.unregister(sock)
            except (KeyError, ValueError):
                pass
            sock.close()

        self.call_soon(go)

    def watch(self, conn: Conn, write: bool) -> None:
        """Whether the I/O thread waits for ``conn`` to be writable (I/O thread only)."""
        if conn not in self._conns:
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if write else 0)
        try:
            self.sel.modify(conn.sock, events, conn)
        except (KeyError, ValueError):
            pass

    def forget_keep_open(self, conn: Conn) -> None:
        """Stops watching ``conn`` without closing its socket (I/O thread only): another connection takes it over."""
        if conn in self._conns:
            self._conns.discard(conn)
            try:
                self.sel.unregister(conn.sock)
            except (KeyError, ValueError):
                pass

    def forget(self, conn: Conn) -> None:
        """Drops a closed connection (I/O thread only)."""
        self.forget_keep_open(conn)
        conn.sock.close()

    def _run(self) -> None:
        while True:
            for key, mask in self.sel.select(timeout=0.25):
                target = key.data
                if target is None:
                    try:
                        while os.read(self._wake_r, 4096):
                            pass
                    except BlockingIOError:
                        pass
                elif isinstance(target, Conn):
                    if mask & selectors.EVENT_READ:
                        target._readable()
                    if mask & selectors.EVENT_WRITE and not target.closed:
                        target._writable()
                else:
                    try:
                        s, _ = key.fileobj.accept()  # type: ignore[union-attr]
                    except (BlockingIOError, InterruptedError, OSError):
                        continue
                    target(s)
            while self._calls:
                try:
                    self._calls.popleft()()
                except Exception:  # a callback must not end the I/O thread
                    log.exception("shmgrpc I/O callback failed")
            now = time.monotonic()
            for c in list(self._conns):
                if c.deadline is not None and now > c.deadline:
                    c.deadline = None
                    c.on_timeout()
                elif c.stalled(now):
                    log.debug("side-channel write stalled; closing")
                    c.close()

    def threads(self) -> int:
        """How many I/O threads run (0 or 1)."""
        return 0 if self._thread is None else 1


LOOP = Loop()
