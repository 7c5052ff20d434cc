//! Side-channel I/O on the I/O runtime ([`crate::io`]): frames and their descriptors over a non-blocking Unix
//! socket, one reader and one writer task per connection, no thread of its own.
//!
//! Descriptors (protocol §3): a frame that carries one is sent by a `sendmsg` of its own that starts with the
//! frame's first byte and holds no byte of another frame. Linux returns such a descriptor with the `recvmsg` that
//! returns the first bytes of that `sendmsg` (earlier bytes may come in the same call) and ends that `recvmsg` no
//! later than the end of that `sendmsg`'s bytes, so the receiver's rule is: a descriptor belongs to the last frame
//! whose first byte the same `recvmsg` returned. A descriptor that arrives with no frame start, more
//! than one per frame, or with a frame kind that carries none is a protocol error.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;

use tokio::io::Interest;
use tokio::net::UnixStream;

use crate::protocol::{MAX_FRAME_LEN, WRITE_STALL};
use crate::wire::{self, Kind, SideMessage};

/// Whether a frame of this kind may carry a descriptor (§3): a challenge always does, a registration does when it
/// names no POSIX or System V segment.
fn may_carry_descriptor(msg: &SideMessage) -> bool {
    matches!(msg.kind, Some(Kind::Challenge(_)) | Some(Kind::Register(_)))
}

/// Descriptors that came with one `recvmsg`, which returned stream bytes `[start, end)`.
struct Arrival {
    fds: Vec<OwnedFd>,
    start: u64,
    end: u64,
}

/// The abstract socket name of a side-channel address written `@name`, if it is one (Linux's abstract namespace:
/// no file, scoped to the network namespace).
pub(crate) fn abstract_name(addr: &Path) -> Option<&[u8]> {
    addr.as_os_str().as_bytes().strip_prefix(b"@")
}

/// Binds a side-channel listener at `addr`: a socket file, or `@name` in the abstract namespace. A socket file left
/// behind by a server that died (nobody accepts on it) is replaced; a live one is an error.
pub(crate) fn bind(addr: &Path) -> io::Result<std::os::unix::net::UnixListener> {
    use std::os::unix::net::{SocketAddr, UnixListener};
    if let Some(name) = abstract_name(addr) {
        use std::os::linux::net::SocketAddrExt;
        return UnixListener::bind_addr(&SocketAddr::from_abstract_name(name)?);
    }
    match UnixListener::bind(addr) {
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
            let stale = std::fs::symlink_metadata(addr).is_ok_and(|m| m.file_type().is_socket())
                && std::os::unix::net::UnixStream::connect(addr)
                    .is_err_and(|e| e.kind() == io::ErrorKind::ConnectionRefused);
            if !stale {
                return Err(e);
            }
            tracing::debug!("replacing a side-channel socket nobody listens on");
            std::fs::remove_file(addr)?;
            UnixListener::bind(addr)
        }
        other => other,
    }
}

/// Connects to a side channel at `addr` (a socket file, or `@name`), from the I/O runtime.
pub(crate) async fn connect(addr: &Path) -> io::Result<UnixStream> {
    match abstract_name(addr) {
        // tokio takes a leading NUL as the abstract namespace.
        Some(name) => {
            let mut path = vec![0u8];
            path.extend_from_slice(name);
            UnixStream::connect(std::ffi::OsStr::from_bytes(&path)).await
        }
        None => UnixStream::connect(addr).await,
    }
}

/// The credentials of a Unix socket's peer (`SO_PEERCRED`), as the kernel reports them to this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PeerCredentials {
    /// The peer's pid in this process's pid namespace: 0 when the peer lives in a pid namespace this one cannot
    /// see (a sibling container), which is normal and not an error.
    pub(crate) pid: u32,
    /// The peer's uid (in this process's user namespace).
    pub(crate) uid: u32,
}

/// `SO_PEERCRED` of a connected Unix socket. (rustix's `socket_peercred` cannot represent pid 0, which peers in
/// another pid namespace have, hence `libc` here.)
pub(crate) fn peer_credentials(socket: BorrowedFd<'_>) -> io::Result<PeerCredentials> {
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `socket` is a live descriptor for the duration of the call; `cred` and `len` are valid for writes
    // and `len` holds the size of `cred`, which is what `SO_PEERCRED` fills.
    let rc = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&socket),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if len as usize != std::mem::size_of::<libc::ucred>() {
        return Err(invalid("short SO_PEERCRED answer"));
    }
    Ok(PeerCredentials { pid: u32::try_from(cred.pid).unwrap_or(0), uid: cred.uid })
}

fn invalid(why: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why)
}

/// Reads frames and assigns descriptors to them.
pub(crate) struct FrameReader {
    buf: Vec<u8>,
    /// `buf[head..tail]` is read and not yet parsed.
    head: usize,
    tail: usize,
    /// Stream offset of `buf[head]`.
    offset: u64,
    arrivals: VecDeque<Arrival>,
}

impl Default for FrameReader {
    fn default() -> Self {
        FrameReader { buf: vec![0; 4096], head: 0, tail: 0, offset: 0, arrivals: VecDeque::new() }
    }
}

impl FrameReader {
    /// The next frame and the descriptor it carries. `Ok(None)` at a clean end of stream.
    ///
    /// # Errors
    ///
    /// The socket failed, the stream ended mid-frame, or the peer broke the framing rules (§3).
    pub(crate) async fn next(&mut self, sock: &UnixStream) -> io::Result<Option<(SideMessage, Option<OwnedFd>)>> {
        loop {
            if let Some(frame) = self.parse()? {
                return Ok(Some(frame));
            }
            if !self.fill(sock).await? {
                if !self.arrivals.is_empty() {
                    return Err(invalid("a descriptor arrived without a frame"));
                }
                if self.head == self.tail {
                    return Ok(None);
                }
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "side channel closed mid-frame"));
            }
        }
    }

    /// Parses one frame out of what has been read, if it is complete.
    fn parse(&mut self) -> io::Result<Option<(SideMessage, Option<OwnedFd>)>> {
        let have = self.tail - self.head;
        if have < 4 {
            return Ok(None);
        }
        let head: [u8; 4] = self.buf[self.head..self.head + 4].try_into().expect("4 bytes");
        let len = u32::from_le_bytes(head) as usize;
        if len > MAX_FRAME_LEN {
            return Err(invalid("side-channel frame too long"));
        }
        if have < 4 + len {
            return Ok(None);
        }
        let start = self.offset;
        let next = start + 4 + len as u64;
        let msg = wire::decode_frame(&self.buf[self.head + 4..self.head + 4 + len]).map_err(invalid)?;
        self.head += 4 + len;
        self.offset = next;
        // Descriptors whose recvmsg returned no frame start up to here were not sent with a frame.
        if self.arrivals.front().is_some_and(|a| a.end <= start) {
            return Err(invalid("a descriptor arrived without a frame"));
        }
        // This frame takes the descriptors of its recvmsg if it is the last frame starting in what that call returned.
        let fd = match self.arrivals.front() {
            Some(a) if a.start <= start && next >= a.end => {
                let mut a = self.arrivals.pop_front().expect("front exists");
                if a.fds.len() != 1 || !may_carry_descriptor(&msg) {
                    return Err(invalid("unexpected descriptor"));
                }
                a.fds.pop()
            }
            _ => None,
        };
        Ok(Some((msg, fd)))
    }

    /// Reads more bytes; false at end of stream.
    async fn fill(&mut self, sock: &UnixStream) -> io::Result<bool> {
        let pending = self.tail - self.head;
        // Room for at least the frame being read (its length is known once its 4 length bytes are in).
        let frame = if pending >= 4 {
            let len = u32::from_le_bytes(self.buf[self.head..self.head + 4].try_into().expect("4 bytes"));
            4 + len as usize
        } else {
            4
        };
        if self.head + frame > self.buf.len() {
            self.buf.copy_within(self.head..self.tail, 0);
            self.head = 0;
            self.tail = pending;
        }
        if frame > self.buf.len() {
            // At most MAX_FRAME_LEN + 4 (parse refused longer ones).
            self.buf.resize(frame.next_power_of_two(), 0);
        }
        let tail = self.tail;
        let (n, fds) = {
            let buf = &mut self.buf[tail..];
            sock.async_io(Interest::READABLE, || crate::fdpass::recv_with_fds(sock.as_fd(), buf)).await?
        };
        let start = self.offset + (self.tail - self.head) as u64;
        self.tail += n;
        if !fds.is_empty() {
            if n == 0 {
                return Err(invalid("a descriptor arrived without data"));
            }
            let end = start + n as u64;
            // Known at once: no frame starts in these bytes, so no frame can ever take the descriptor (§3).
            if !self.frame_starts_in(start, end) {
                return Err(invalid("a descriptor arrived without a frame start"));
            }
            self.arrivals.push_back(Arrival { fds, start, end });
        }
        Ok(n > 0)
    }

    /// Whether a frame starts in the stream bytes `[from, to)`, where `to` is the end of what has been read. The
    /// frame at `buf[head]` starts at `offset`; each header read so far gives the next start. A frame that starts
    /// before `from` and whose header is not complete yet ends after `to`, so nothing starts in between.
    fn frame_starts_in(&self, from: u64, to: u64) -> bool {
        let (mut pos, mut at) = (self.offset, self.head);
        loop {
            if pos >= to {
                return false;
            }
            if pos >= from {
                return true;
            }
            let Some(header) = self.buf.get(at..at + 4).filter(|_| at + 4 <= self.tail) else { return false };
            let len = u32::from_le_bytes(header.try_into().expect("4 bytes")) as usize;
            pos += 4 + len as u64;
            at += 4 + len;
        }
    }
}

/// Writes all of `data`, the descriptor (if any) with its first byte, never blocking a thread; fails when the peer
/// lets a write make no progress for [`WRITE_STALL`].
pub(crate) async fn write_all(sock: &UnixStream, mut data: &[u8], fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
    let stalled = || io::Error::new(io::ErrorKind::TimedOut, "the peer does not read its side channel");
    if let Some(fd) = fd {
        let send = sock.async_io(Interest::WRITABLE, || crate::fdpass::send_with_fds(sock.as_fd(), data, &[fd]));
        let n = tokio::time::timeout(WRITE_STALL, send).await.map_err(|_| stalled())??;
        data = &data[n..];
    }
    while !data.is_empty() {
        let send = sock.async_io(Interest::WRITABLE, || {
            rustix::net::send(sock.as_fd(), data, rustix::net::SendFlags::NOSIGNAL).map_err(io::Error::from)
        });
        let n = tokio::time::timeout(WRITE_STALL, send).await.map_err(|_| stalled())??;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "side channel closed"));
        }
        data = &data[n..];
    }
    Ok(())
}

/// Writes one frame (with its descriptor, in a `sendmsg` of its own).
pub(crate) async fn write_frame(sock: &UnixStream, kind: Kind, fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
    let mut buf = Vec::new();
    wire::encode_frame(&wire::frame(kind), &mut buf);
    write_all(sock, &buf, fd).await
}

/// Turns a connected standard socket into one of the I/O runtime.
///
/// # Errors
///
/// The runtime could not start or the socket could not be registered with it.
#[cfg(test)]
pub(crate) fn adopt(sock: std::os::unix::net::UnixStream) -> io::Result<std::sync::Arc<UnixStream>> {
    sock.set_nonblocking(true)?;
    let _enter = crate::io::handle()?.enter();
    Ok(std::sync::Arc::new(UnixStream::from_std(sock)?))
}

/// Shuts a socket down both ways, so its reader sees the end and its writer an error.
pub(crate) fn shutdown(sock: &UnixStream) {
    let _ = rustix::net::shutdown(sock.as_fd(), rustix::net::Shutdown::Both);
}

/// See `crate::__fuzz::read_side_frames`.
#[cfg(fuzzing)]
pub(crate) fn read_all_for_fuzzing(data: &[u8], split: usize, with_fd: bool) -> usize {
    let Ok(rt) = crate::io::handle() else { return 0 };
    let Ok((a, b)) = std::os::unix::net::UnixStream::pair() else { return 0 };
    let data = data.to_vec();
    rt.block_on(async move {
        let adopt = |s: std::os::unix::net::UnixStream| {
            s.set_nonblocking(true).ok()?;
            UnixStream::from_std(s).ok()
        };
        let (Some(a), Some(b)) = (adopt(a), adopt(b)) else { return 0 };
        let writer = tokio::spawn(async move {
            let split = split.min(data.len());
            let fd = rustix::fs::memfd_create("fuzz", rustix::fs::MemfdFlags::CLOEXEC).ok();
            let _ = write_all(&a, &data[..split], None).await;
            let with = if with_fd && split < data.len() { fd.as_ref().map(|f| f.as_fd()) } else { None };
            let _ = write_all(&a, &data[split..], with).await;
        });
        let mut r = FrameReader::default();
        let mut n = 0;
        while let Ok(Some(_)) = r.next(&b).await {
            n += 1;
        }
        drop(b);
        let _ = writer.await;
        n
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::v1;

    fn pair() -> (std::sync::Arc<UnixStream>, std::sync::Arc<UnixStream>) {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        (adopt(a).unwrap(), adopt(b).unwrap())
    }

    fn memfd() -> OwnedFd {
        rustix::fs::memfd_create("t", rustix::fs::MemfdFlags::CLOEXEC).unwrap()
    }

    fn register(segment: u32) -> Kind {
        Kind::Register(v1::Register { segment, len: 1, source: None })
    }

    #[test]
    fn descriptors_go_to_their_frames_when_one_read_holds_several() {
        crate::io::handle().unwrap().block_on(async {
            let (a, b) = pair();
            let (fd1, fd2) = (memfd(), memfd());
            // A frame without a descriptor, then two with: all may arrive in few reads.
            write_frame(&a, Kind::Release(v1::Release { segment: 1, generation: 1 }), None).await.unwrap();
            write_frame(&a, register(2), Some(fd1.as_fd())).await.unwrap();
            write_frame(&a, register(3), None).await.unwrap();
            write_frame(&a, register(4), Some(fd2.as_fd())).await.unwrap();
            drop(a);
            let mut r = FrameReader::default();
            let mut got = Vec::new();
            while let Some((m, fd)) = r.next(&b).await.unwrap() {
                let id = match m.kind {
                    Some(Kind::Register(reg)) => reg.segment,
                    Some(Kind::Release(rel)) => rel.segment,
                    other => panic!("{other:?}"),
                };
                got.push((id, fd.is_some()));
            }
            assert_eq!(got, vec![(1, false), (2, true), (3, false), (4, true)]);
        });
    }

    #[test]
    fn a_descriptor_on_a_frame_that_takes_none_is_a_protocol_error() {
        crate::io::handle().unwrap().block_on(async {
            let (a, b) = pair();
            let fd = memfd();
            write_frame(&a, Kind::Release(v1::Release { segment: 1, generation: 1 }), Some(fd.as_fd())).await.unwrap();
            let err = FrameReader::default().next(&b).await.unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
        });
    }

    #[test]
    fn a_descriptor_sent_mid_frame_is_a_protocol_error() {
        crate::io::handle().unwrap().block_on(async {
            let (a, b) = pair();
            let mut buf = Vec::new();
            wire::encode_frame(&wire::frame(Kind::Release(v1::Release { segment: 1, generation: 1 })), &mut buf);
            let first = buf.len();
            wire::encode_frame(&wire::frame(register(2)), &mut buf);
            // The second frame's start goes out alone; the descriptor rides with bytes from its middle, which
            // the reader receives in a later recvmsg that returns no frame start.
            write_all(&a, &buf[..first + 2], None).await.unwrap();
            let mut r = FrameReader::default();
            assert!(r.next(&b).await.unwrap().unwrap().1.is_none());
            let writer = tokio::spawn(async move {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                let fd = memfd();
                write_all(&a, &buf[first + 2..], Some(fd.as_fd())).await.unwrap();
            });
            let mut refused = false;
            for _ in 0..3 {
                match r.next(&b).await {
                    Ok(Some((_, fd))) => assert!(fd.is_none(), "no frame may take a descriptor sent mid-frame"),
                    Ok(None) => break,
                    Err(_) => {
                        refused = true;
                        break;
                    }
                }
            }
            writer.await.unwrap();
            assert!(refused, "the stray descriptor must be refused");
        });
    }

    #[test]
    fn a_descriptor_with_no_frame_start_is_refused_at_once() {
        crate::io::handle().unwrap().block_on(async {
            let (a, b) = pair();
            let mut buf = Vec::new();
            wire::encode_frame(&wire::frame(register(2)), &mut buf);
            // The frame's first bytes alone, then a descriptor with bytes from its middle, and then nothing: the
            // reader must not wait for more bytes to find out that no frame can take the descriptor.
            write_all(&a, &buf[..3], None).await.unwrap();
            let mut r = FrameReader::default();
            // The reader takes those bytes first (a recvmsg returns bytes written before a descriptor together with
            // it, so only bytes read earlier can show that the descriptor came mid-frame).
            let waited = tokio::time::timeout(std::time::Duration::from_millis(100), r.next(&b)).await;
            assert!(waited.is_err(), "the frame is not complete yet");
            let fd = memfd();
            write_all(&a, &buf[3..buf.len() - 1], Some(fd.as_fd())).await.unwrap();
            let got = tokio::time::timeout(std::time::Duration::from_secs(5), r.next(&b)).await;
            let err = got.expect("refused without waiting for more bytes").unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
            drop(a);
        });
    }

    #[test]
    fn frames_split_across_reads_and_large_frames_parse() {
        crate::io::handle().unwrap().block_on(async {
            let (a, b) = pair();
            let big = Kind::Refused(v1::Refused { reason: "x".repeat(MAX_FRAME_LEN - 16) });
            let mut buf = Vec::new();
            wire::encode_frame(&wire::frame(big.clone()), &mut buf);
            let writer = tokio::spawn(async move {
                for chunk in buf.chunks(1000) {
                    write_all(&a, chunk, None).await.unwrap();
                    tokio::task::yield_now().await;
                }
            });
            let (m, fd) = FrameReader::default().next(&b).await.unwrap().unwrap();
            assert_eq!(m.kind, Some(big));
            assert!(fd.is_none());
            writer.await.unwrap();
        });
    }

    #[test]
    fn oversized_frames_are_refused() {
        crate::io::handle().unwrap().block_on(async {
            let (a, b) = pair();
            write_all(&a, &u32::MAX.to_le_bytes(), None).await.unwrap();
            assert!(FrameReader::default().next(&b).await.is_err());
        });
    }
}
