//! Winsock stream sockets of any family — Hyper-V's AF_HYPERV, or AF_INET
//! where there is no Hyper-V — driven by tokio's own poller: no thread and no
//! copy per connection.
//!
//! How this works. tokio on Windows drives TCP without completion-based
//! reads: mio keeps one overlapped `IOCTL_AFD_POLL` per socket on the
//! runtime's completion port, and when it reports readiness the socket is
//! read or written with plain non-blocking `recv`/`send`, straight into or out
//! of the caller's buffer. AFD, the kernel side of Winsock, polls sockets of
//! any family behind the mswsock provider, not only TCP, and nothing else in
//! that path is TCP-specific; AF_HYPERV sockets are expected to be such
//! sockets (see the end of this comment for what is verified). The only door tokio opens to an outside
//! socket is `TcpStream::from_std`, so a socket made here goes through it as
//! a `std::net::TcpStream` — to the standard library any owned socket, whose
//! reads, writes, half-close and SO_ERROR are the family-neutral `recv`,
//! `send`, `shutdown` and `getsockopt` — and stays inside [`SockStream`] or
//! [`SockListener`], which expose only those operations; nothing TCP-only
//! (peer address, Nagle, keepalive) can be called on it.
//!
//! Dialing ([`connect`]): a non-blocking `connect` (WSAEWOULDBLOCK), the
//! socket handed to the poller, a wait until it is writable (AFD reports
//! `AFD_POLL_SEND` once connected, `AFD_POLL_CONNECT_FAIL` if not), then the
//! outcome from SO_ERROR, as tokio does for TCP; bounded by the caller's
//! limit. Listening ([`listen`]): the listening socket is handed to the poller
//! the same way, `accept()` waits for it to be readable (`AFD_POLL_ACCEPT`)
//! and then accepts without blocking; a client that gave up in between is
//! skipped. Dropping a stream or a listener deregisters it and closes the
//! socket at once; a stream's data already accepted by `send` is still
//! delivered (a graceful close), as for any socket.
//!
//! What runs where: under Wine (CI) these functions run with AF_INET
//! addresses (`winsock://` and the tests in `windows.rs`), Wine having no
//! AF_HYPERV; the Hyper-V addresses themselves only on real Windows, where
//! it is still to be checked that AFD polling serves AF_HYPERV sockets on
//! the Windows builds Rancher Desktop supports (a 2016-era note,
//! ocaml-hvsock's, says the first Hyper-V socket kernels did not support
//! `select`). If registering fails, dial and listen return that error; a
//! dial is bounded by its limit whatever the poller does.

use std::io;
use std::marker::PhantomData;
use std::mem::size_of;
use std::os::windows::io::{AsRawSocket, FromRawSocket, OwnedSocket, RawSocket};
use std::pin::Pin;
use std::sync::Once;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use windows_sys::Win32::Networking::WinSock as ws;

/// A socket address type this module can bind, connect and describe.
pub trait SockAddr: Copy + Default + Send + 'static {
    fn describe(&self) -> String;
}

fn wsa_init() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        let mut data = ws::WSADATA::default();
        // SAFETY: `data` is a valid, writable WSADATA. Winsock counts
        // startups; this one is never undone, like the standard library's.
        let r = unsafe { ws::WSAStartup(0x0202, &mut data) };
        if r != 0 {
            tracing::warn!(error = r, "WSAStartup failed");
        }
    });
}

fn last_error() -> io::Error {
    // SAFETY: reads the calling thread's last Winsock error; no arguments.
    io::Error::from_raw_os_error(unsafe { ws::WSAGetLastError() })
}

fn check(r: i32) -> io::Result<()> {
    if r == ws::SOCKET_ERROR { Err(last_error()) } else { Ok(()) }
}

fn raw(s: RawSocket) -> ws::SOCKET {
    s as ws::SOCKET
}

/// An owned Winsock socket (closed on drop), before it is handed to the
/// poller.
pub struct Sock(OwnedSocket);

impl Sock {
    /// A new overlapped-capable, non-inheritable stream socket.
    pub fn new(family: u16, protocol: i32) -> io::Result<Sock> {
        wsa_init();
        // WSA_FLAG_OVERLAPPED: AFD polling (and any overlapped I/O) needs it.
        let flags = ws::WSA_FLAG_OVERLAPPED | ws::WSA_FLAG_NO_HANDLE_INHERIT;
        // SAFETY: plain arguments; a null protocol-info pointer is allowed.
        let s = unsafe { ws::WSASocketW(i32::from(family), ws::SOCK_STREAM, protocol, std::ptr::null(), 0, flags) };
        if s == ws::INVALID_SOCKET {
            return Err(last_error());
        }
        // SAFETY: `s` is a socket just created and owned by nobody else.
        Ok(Sock(unsafe { OwnedSocket::from_raw_socket(s as RawSocket) }))
    }

    fn raw(&self) -> ws::SOCKET {
        raw(self.0.as_raw_socket())
    }

    fn set_nonblocking(&self) -> io::Result<()> {
        let mut on = 1u32;
        // SAFETY: FIONBIO reads one u32 through the valid pointer `on`.
        check(unsafe { ws::ioctlsocket(self.raw(), ws::FIONBIO, &mut on) })
    }

    pub fn set_opt_u32(&self, level: i32, name: i32, value: u32) -> io::Result<()> {
        let ptr = (&value as *const u32).cast::<u8>();
        // SAFETY: `ptr` points to `value`, 4 readable bytes, as declared.
        check(unsafe { ws::setsockopt(self.raw(), level, name, ptr, size_of::<u32>() as i32) })
    }

    fn connect<A: SockAddr>(&self, addr: &A) -> io::Result<()> {
        let ptr = (addr as *const A).cast::<ws::SOCKADDR>();
        // SAFETY: `ptr` points to a whole, initialised address of the
        // socket's family, `size_of::<A>()` bytes long.
        check(unsafe { ws::connect(self.raw(), ptr, size_of::<A>() as i32) })
    }

    fn bind<A: SockAddr>(&self, addr: &A) -> io::Result<()> {
        let ptr = (addr as *const A).cast::<ws::SOCKADDR>();
        // SAFETY: as in `connect`.
        check(unsafe { ws::bind(self.raw(), ptr, size_of::<A>() as i32) })
    }

    fn listen(&self) -> io::Result<()> {
        // SAFETY: plain arguments on a socket this value owns.
        check(unsafe { ws::listen(self.raw(), 128) })
    }

    /// Hands the socket to tokio's poller. Only for a socket that will be
    /// used through family-neutral calls (see the module comment).
    fn register(self) -> io::Result<tokio::net::TcpStream> {
        self.set_nonblocking()?;
        tokio::net::TcpStream::from_std(std::net::TcpStream::from(self.0))
    }
}

/// Accepts a connection on the listening socket `s`, without blocking.
fn accept<A: SockAddr>(s: RawSocket) -> io::Result<(Sock, A)> {
    let mut addr = A::default();
    let mut len = size_of::<A>() as i32;
    let ptr = (&mut addr as *mut A).cast::<ws::SOCKADDR>();
    // SAFETY: `ptr`/`len` describe `addr`, writable and `len` bytes long;
    // Winsock writes at most `len` bytes and updates `len`. A stale `s`
    // only makes the call fail (WSAENOTSOCK).
    let c = unsafe { ws::accept(raw(s), ptr, &mut len) };
    if c == ws::INVALID_SOCKET {
        return Err(last_error());
    }
    // SAFETY: `c` is a socket just accepted and owned by nobody else.
    Ok((Sock(unsafe { OwnedSocket::from_raw_socket(c as RawSocket) }), addr))
}

#[cfg(test)]
fn local_addr<A: SockAddr>(s: RawSocket) -> io::Result<A> {
    let mut addr = A::default();
    let mut len = size_of::<A>() as i32;
    let ptr = (&mut addr as *mut A).cast::<ws::SOCKADDR>();
    // SAFETY: as in `accept`.
    check(unsafe { ws::getsockname(raw(s), ptr, &mut len) })?;
    Ok(addr)
}

/// A connected stream socket on tokio's poller.
pub struct SockStream(tokio::net::TcpStream);

/// Connects `s` (already set up by the caller) to `addr` without blocking a
/// thread, giving up after `limit`.
pub async fn connect<A: SockAddr>(s: Sock, addr: &A, limit: Duration) -> io::Result<SockStream> {
    let failed = |e: io::Error| io::Error::new(e.kind(), format!("connecting to {}: {e}", addr.describe()));
    s.set_nonblocking()?;
    let pending = match s.connect(addr) {
        Ok(()) => false,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => true,
        Err(e) => return Err(failed(e)),
    };
    let io = s.register()?;
    if pending {
        match tokio::time::timeout(limit, io.writable()).await {
            Ok(ready) => ready?,
            Err(_) => return Err(failed(io::Error::new(io::ErrorKind::TimedOut, format!("no answer in {limit:?}")))),
        }
        if let Some(e) = io.take_error()? {
            return Err(failed(e));
        }
    }
    Ok(SockStream(io))
}

/// A listening socket on tokio's poller; `A` is its address type.
pub struct SockListener<A> {
    io: tokio::net::TcpStream,
    addr: PhantomData<fn() -> A>,
}

/// Binds `s` to `addr` and listens.
pub fn listen<A: SockAddr>(s: Sock, addr: &A) -> io::Result<SockListener<A>> {
    s.bind(addr).map_err(|e| io::Error::new(e.kind(), format!("binding {}: {e}", addr.describe())))?;
    s.listen()?;
    Ok(SockListener { io: s.register()?, addr: PhantomData })
}

impl<A: SockAddr> SockListener<A> {
    /// The next connection, and who made it.
    pub async fn accept(&self) -> io::Result<(SockStream, String)> {
        loop {
            self.io.readable().await?;
            // `try_io` clears the readiness when the accept would block, so
            // the next `readable()` waits for a new AFD poll.
            match self.io.try_io(Interest::READABLE, || accept::<A>(self.io.as_raw_socket())) {
                Ok((s, peer)) => return Ok((SockStream(s.register()?), peer.describe())),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // A client that gave up before we accepted it: not our error.
                // Windows says reset or aborted; Wine says not connected
                // (its `accept` asks for the peer's address, which a reset
                // connection no longer has).
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted | io::ErrorKind::NotConnected
                    ) => {}
                Err(e) => return Err(e),
            }
        }
    }

    #[cfg(test)]
    pub fn local_addr(&self) -> io::Result<A> {
        local_addr(self.io.as_raw_socket())
    }
}

impl AsyncRead for SockStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl AsyncWrite for SockStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }
    /// Half-closes (`shutdown(SD_SEND)`): the peer reads EOF.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}
