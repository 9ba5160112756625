//! Linux transports: AF_VSOCK (tokio-vsock) and inherited descriptors.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio_vsock::{VMADDR_CID_ANY, VsockAddr, VsockListener, VsockStream};

use crate::endpoint::Endpoint;

pub enum SysStream {
    Vsock(VsockStream),
    Fd(FdStream),
}

pub enum SysListener {
    Vsock(VsockListener),
}

pub async fn dial(ep: &Endpoint) -> io::Result<SysStream> {
    match ep {
        Endpoint::Vsock { cid: Some(cid), port } => {
            Ok(SysStream::Vsock(VsockStream::connect(VsockAddr::new(*cid, *port)).await?))
        }
        Endpoint::Vsock { cid: None, .. } => {
            Err(io::Error::new(io::ErrorKind::InvalidInput, "dialing vsock needs a CID"))
        }
        Endpoint::Fd(fd) => FdStream::take(*fd).map(SysStream::Fd),
        other => Err(unsupported(other)),
    }
}

pub async fn listen(ep: &Endpoint) -> io::Result<SysListener> {
    match ep {
        Endpoint::Vsock { cid, port } => {
            let addr = VsockAddr::new(cid.unwrap_or(VMADDR_CID_ANY), *port);
            Ok(SysListener::Vsock(VsockListener::bind(addr)?))
        }
        other => Err(unsupported(other)),
    }
}

fn unsupported(ep: &Endpoint) -> io::Error {
    io::Error::new(io::ErrorKind::Unsupported, format!("{ep} is not available on Linux"))
}

impl SysListener {
    pub async fn accept(&self) -> io::Result<(crate::LinkStream, String)> {
        match self {
            SysListener::Vsock(l) => {
                let (s, peer) = l.accept().await?;
                Ok((crate::LinkStream::Sys(SysStream::Vsock(s)), format!("vsock://{}:{}", peer.cid(), peer.port())))
            }
        }
    }
}

/// A connected stream socket as a raw descriptor: vm-switch's fd 3 (a vsock
/// connection handed over by network-setup), or a unix link made quiet
/// ([`crate::LinkStream::quiet`]).
///
/// How this works: the descriptor is registered with the event loop for
/// reading only. A unix (or vsock) socket reports "writable" each time its
/// peer takes a frame out while the buffer is less than a quarter full,
/// that is after nearly every frame of a request/response exchange, and an
/// edge-triggered registration for writing would wake the process for each
/// of them with nothing to do. So writes go straight to the descriptor, and
/// only one that finds the buffer full registers a duplicate of it for
/// writing, until the writer says it is done for now (`flush`).
pub struct FdStream {
    fd: AsyncFd<OwnedFd>,
    /// A duplicate registered for writability while a write waits for room.
    writer: Option<AsyncFd<OwnedFd>>,
}

impl FdStream {
    /// Takes ownership of `fd`. It must be open and owned by nobody else in
    /// this process; it is made non-blocking and close-on-exec.
    pub fn take(fd: RawFd) -> io::Result<Self> {
        // Refuse a descriptor that is not open, before claiming ownership.
        nix::fcntl::fcntl(
            // SAFETY: only queried; validity is what is being checked.
            unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) },
            nix::fcntl::FcntlArg::F_GETFD,
        )
        .map_err(|e| io::Error::new(io::Error::from(e).kind(), format!("fd {fd} is not open: {e}")))?;
        // SAFETY: the descriptor is open (checked above) and by this API's
        // contract nothing else in the process owns it.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        set_nonblocking_cloexec(&owned)?;
        crate::endpoint::enlarge_buffers(socket2::SockRef::from(&owned));
        Self::from_owned(owned)
    }

    /// A stream over an open, non-blocking stream socket.
    pub fn from_owned(owned: OwnedFd) -> io::Result<Self> {
        Ok(FdStream { fd: register(owned, Interest::READABLE)?, writer: None })
    }

    /// Writes with `op` straight to the descriptor; where the buffer is
    /// full, waits for room through the write registration (made then).
    fn poll_write_with(
        &mut self,
        cx: &mut Context<'_>,
        op: impl Fn(BorrowedFd<'_>) -> io::Result<usize>,
    ) -> Poll<io::Result<usize>> {
        loop {
            if let Some(writer) = &self.writer {
                let mut guard = ready!(writer.poll_write_ready(cx))?;
                match guard.try_io(|fd| op(fd.get_ref().as_fd())) {
                    Ok(r) => return Poll::Ready(r),
                    Err(_would_block) => continue,
                }
            }
            match op(self.fd.get_ref().as_fd()) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let dup = self.fd.get_ref().try_clone()?;
                    self.writer = Some(register(dup, Interest::WRITABLE)?);
                }
                r => return Poll::Ready(r),
            }
        }
    }
}

fn register(fd: OwnedFd, interest: Interest) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: `fd` is an OwnedFd moved into the AsyncFd, so it stays open
    // and names the same description for the AsyncFd's whole life.
    unsafe { AsyncFd::register_with_interest(fd, interest) }.map_err(|e| e.into_parts().1)
}

fn set_nonblocking_cloexec(fd: &OwnedFd) -> io::Result<()> {
    use nix::fcntl::{FcntlArg, FdFlag, OFlag, fcntl};
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))?;
    Ok(())
}

impl AsyncRead for FdStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            let want = unfilled.len();
            match guard.try_io(|fd| nix::unistd::read(fd, unfilled).map_err(io::Error::from)) {
                Ok(Ok(n)) => {
                    // A short read emptied the socket: the next one would
                    // only say EAGAIN (tokio's own streams skip it the same way).
                    if n > 0 && n < want {
                        guard.clear_ready();
                    }
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for FdStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.get_mut().poll_write_with(cx, |fd| nix::unistd::write(fd, buf).map_err(io::Error::from))
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_write_with(cx, |fd| nix::sys::uio::writev(fd, bufs).map_err(io::Error::from))
    }
    fn is_write_vectored(&self) -> bool {
        true
    }
    /// The writer is done for now: stop watching for room.
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().writer = None;
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = nix::sys::socket::shutdown(self.fd.get_ref().as_raw_fd(), nix::sys::socket::Shutdown::Write);
        Poll::Ready(r.or_else(|e| if e == nix::errno::Errno::ENOTSOCK { Ok(()) } else { Err(e.into()) }))
    }
}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            SysStream::Vsock($s) => $e,
            SysStream::Fd($s) => $e,
        }
    };
}

impl AsyncRead for SysStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => Pin::new(s).poll_read(cx, buf))
    }
}

impl AsyncWrite for SysStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        delegate!(self, s => Pin::new(s).poll_write(cx, buf))
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => Pin::new(s).poll_write_vectored(cx, bufs))
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            SysStream::Vsock(s) => s.is_write_vectored(),
            SysStream::Fd(s) => s.is_write_vectored(),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => Pin::new(s).poll_flush(cx))
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => Pin::new(s).poll_shutdown(cx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::IntoRawFd;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn fd_stream_over_socketpair() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut fa = FdStream::take(a.into_raw_fd()).unwrap();
        b.set_nonblocking(true).unwrap();
        let mut tb = tokio::net::UnixStream::from_std(b).unwrap();
        fa.write_all(b"abc").await.unwrap();
        let mut buf = [0u8; 3];
        tb.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"abc");
        tb.write_all(b"xyz").await.unwrap();
        fa.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"xyz");
    }

    #[test]
    fn closed_fd_is_refused() {
        assert!(FdStream::take(987_654).is_err());
    }
}
