"""
Shared-memory segments: our sealed memfds (read-write) and the peer's (read-only, checked before mapping).

A peer's memfd is mapped only if it carries the shrink and grow seals and is at least as large as claimed, so it can
never shrink under the mapping (no SIGBUS), and every range is checked against the real size.
"""

from __future__ import annotations

import fcntl
import mmap
import os

F_SEAL_FUTURE_WRITE = getattr(fcntl, "F_SEAL_FUTURE_WRITE", 0x0010)
REQUIRED_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
"""Seals a peer's memfd must carry before we map it."""
OWNER_SEALS = REQUIRED_SEALS | F_SEAL_FUTURE_WRITE | fcntl.F_SEAL_SEAL
"""Seals we put on our own memfds once mapped: peers can only map them read-only."""


class SegmentError(Exception):
    """A segment could not be created, or a peer's segment was refused."""


class Segment:
    """A sealed memfd of ours, mapped read-write. Closed (and gone once no peer maps it) on :meth:`close`."""

    def __init__(self, size: int, name: str = "shmgrpc") -> None:
        if size <= 0:
            raise SegmentError("a segment needs at least one byte")
        fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            self.map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, OWNER_SEALS)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        self.size = size
        self.view = memoryview(self.map)

    def close(self) -> None:
        """
        Closes the descriptor and unmaps; a view still held elsewhere (a loan kept after sending) keeps the
        mapping until it is dropped.
        """
        if self.fd < 0:
            return
        os.close(self.fd)
        self.fd = -1
        try:
            self.view.release()
            self.map.close()
        except BufferError:
            pass  # the last view's release lets the mapping go


class PeerSegment:
    """A peer's memfd, mapped read-only after checking its seals and size."""

    def __init__(self, fd: int, claimed: int) -> None:
        """Takes ownership of ``fd`` (closed once mapped, or on refusal)."""
        try:
            st = os.fstat(fd)
            if st.st_size <= 0:
                raise SegmentError("empty segment")
            if st.st_size < claimed:
                raise SegmentError(f"segment holds {st.st_size} bytes but {claimed} were claimed")
            try:
                seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            except OSError:
                raise SegmentError("not a memfd (no seals)") from None
            if seals & REQUIRED_SEALS != REQUIRED_SEALS:
                raise SegmentError(f"memfd is missing required seals (has {seals:#x}, needs {REQUIRED_SEALS:#x})")
            self.map = mmap.mmap(fd, st.st_size, mmap.MAP_SHARED, mmap.PROT_READ)
            self.size = st.st_size
        finally:
            os.close(fd)
        self.view = memoryview(self.map)

    def range(self, offset: int, length: int) -> memoryview:
        """``length`` bytes at ``offset``, checked against the real size."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise SegmentError(f"range {offset}+{length} is outside a segment of {self.size} bytes")
        return self.view[offset : offset + length]

    def close(self) -> None:
        """Drops the mapping once no view of it is alive (views keep it mapped until released)."""
        try:
            self.view.release()
            self.map.close()
        except BufferError:
            pass  # a view is still exported: the mapping goes with the last one
