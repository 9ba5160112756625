//! Link endpoints named by URL, and the streams they give.
//!
//! `unix:///path`, `tcp://127.0.0.1:port`, `vsock://CID:PORT` (`vsock://:PORT`
//! listens on any CID), `fd://N` (an inherited, already-connected socket),
//! `hvsock://VMGUID:PORT` and `npipe://./pipe/NAME` (Windows),
//! `winsock://IPv4:PORT` (Windows: TCP driven by the Hyper-V socket code
//! rather than tokio's TCP, so that Wine, which has no AF_HYPERV, can run and
//! measure that code), and
//! `hybridvsock:///path/to/uds:PORT` (unix hosts): a guest's vsock port P
//! behind a Firecracker / Cloud Hypervisor / vhost-device-vsock VMM socket —
//! dialing writes `CONNECT P` on the socket and waits for `OK`, listening
//! takes the guest's connections to host port P on `uds_P`
//! (`crate::hybrid_vsock`). Every kind dials or listens to the same
//! [`LinkStream`], so the code above does not care how frames travel.

use std::fmt;
use std::io;
use std::net::{SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::pin::Pin;
use std::str::FromStr;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::sys;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Endpoint {
    Unix(PathBuf),
    /// One frame per datagram on a unix SOCK_DGRAM socket (vfkit).
    Unixgram(PathBuf),
    Tcp(SocketAddr),
    /// `cid: None` means any CID (listen side).
    Vsock {
        cid: Option<u32>,
        port: u32,
    },
    Fd(i32),
    HvSock {
        vm: String,
        port: u32,
    },
    Npipe(String),
    /// TCP over IPv4 through the code that drives Hyper-V sockets (Windows),
    /// for tests and benchmarks where AF_HYPERV does not exist.
    Winsock(SocketAddrV4),
    /// A VMM's hybrid-vsock unix socket and a vsock port (guest port when
    /// dialing, host port when listening).
    HybridVsock {
        uds: PathBuf,
        port: u32,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid endpoint {url:?}: {reason}")]
pub struct EndpointError {
    pub url: String,
    pub reason: String,
}

impl FromStr for Endpoint {
    type Err = EndpointError;

    fn from_str(url: &str) -> Result<Self, Self::Err> {
        let err = |reason: &str| EndpointError { url: url.to_string(), reason: reason.to_string() };
        let (scheme, rest) = url.split_once("://").ok_or_else(|| err("expected SCHEME://…"))?;
        match scheme {
            "unix" => {
                if rest.is_empty() {
                    return Err(err("empty socket path"));
                }
                Ok(Endpoint::Unix(PathBuf::from(rest)))
            }
            "unixgram" => {
                if rest.is_empty() {
                    return Err(err("empty socket path"));
                }
                Ok(Endpoint::Unixgram(PathBuf::from(rest)))
            }
            "tcp" => rest.parse().map(Endpoint::Tcp).map_err(|_| err("expected tcp://IP:PORT")),
            "vsock" => {
                let (cid, port) = rest.rsplit_once(':').ok_or_else(|| err("expected vsock://CID:PORT"))?;
                let port = port.parse().map_err(|_| err("bad vsock port"))?;
                let cid = if cid.is_empty() || cid == "any" {
                    None
                } else {
                    Some(cid.parse().map_err(|_| err("bad vsock CID"))?)
                };
                Ok(Endpoint::Vsock { cid, port })
            }
            "fd" => {
                rest.parse::<i32>().ok().filter(|fd| *fd >= 0).map(Endpoint::Fd).ok_or_else(|| err("expected fd://N"))
            }
            "hvsock" => {
                let (vm, port) = rest.rsplit_once(':').ok_or_else(|| err("expected hvsock://VMGUID:PORT"))?;
                let port = port.parse().map_err(|_| err("bad hvsock port"))?;
                if vm.is_empty() {
                    return Err(err("missing VM GUID"));
                }
                Ok(Endpoint::HvSock { vm: vm.to_string(), port })
            }
            "npipe" => {
                if rest.is_empty() {
                    return Err(err("empty pipe name"));
                }
                Ok(Endpoint::Npipe(rest.to_string()))
            }
            "winsock" => rest.parse().map(Endpoint::Winsock).map_err(|_| err("expected winsock://IPv4:PORT")),
            "hybridvsock" => {
                let (uds, port) =
                    rest.rsplit_once(':').ok_or_else(|| err("expected hybridvsock:///path/to/uds:PORT"))?;
                let port = port.parse().map_err(|_| err("bad vsock port"))?;
                if uds.is_empty() {
                    return Err(err("empty socket path"));
                }
                Ok(Endpoint::HybridVsock { uds: PathBuf::from(uds), port })
            }
            _ => Err(err("unknown scheme (unix, unixgram, tcp, vsock, fd, hvsock, npipe, winsock, hybridvsock)")),
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "unix://{}", p.display()),
            Endpoint::Unixgram(p) => write!(f, "unixgram://{}", p.display()),
            Endpoint::Tcp(a) => write!(f, "tcp://{a}"),
            Endpoint::Vsock { cid: Some(c), port } => write!(f, "vsock://{c}:{port}"),
            Endpoint::Vsock { cid: None, port } => write!(f, "vsock://:{port}"),
            Endpoint::Fd(n) => write!(f, "fd://{n}"),
            Endpoint::HvSock { vm, port } => write!(f, "hvsock://{vm}:{port}"),
            Endpoint::Npipe(n) => write!(f, "npipe://{n}"),
            Endpoint::Winsock(a) => write!(f, "winsock://{a}"),
            Endpoint::HybridVsock { uds, port } => write!(f, "hybridvsock://{}:{port}", uds.display()),
        }
    }
}

/// A connected byte stream, whatever the endpoint kind.
pub enum LinkStream {
    Tcp(tokio::net::TcpStream),
    #[cfg(unix)]
    Unix(tokio::net::UnixStream),
    Sys(sys::SysStream),
}

impl fmt::Debug for LinkStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LinkStream::Tcp(_) => f.write_str("LinkStream::Tcp"),
            #[cfg(unix)]
            LinkStream::Unix(_) => f.write_str("LinkStream::Unix"),
            LinkStream::Sys(_) => f.write_str("LinkStream::Sys"),
        }
    }
}

impl LinkStream {
    /// The same connection, woken only for what it waits for: a unix link
    /// on Linux becomes a [`sys::FdStream`], which does not wake the process
    /// each time the peer takes a frame out of the socket buffer. Other
    /// kinds are returned as they are (TCP sockets only say "writable" to
    /// a writer that found them full).
    pub fn quiet(self) -> io::Result<LinkStream> {
        #[cfg(target_os = "linux")]
        if let LinkStream::Unix(s) = self {
            let fd: std::os::fd::OwnedFd = s.into_std()?.into();
            return Ok(LinkStream::Sys(sys::SysStream::Fd(sys::FdStream::from_owned(fd)?)));
        }
        Ok(self)
    }
}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            LinkStream::Tcp($s) => $e,
            #[cfg(unix)]
            LinkStream::Unix($s) => $e,
            LinkStream::Sys($s) => $e,
        }
    };
}

impl AsyncRead for LinkStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => Pin::new(s).poll_read(cx, buf))
    }
}

impl AsyncWrite for LinkStream {
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
            LinkStream::Tcp(s) => s.is_write_vectored(),
            #[cfg(unix)]
            LinkStream::Unix(s) => s.is_write_vectored(),
            LinkStream::Sys(s) => s.is_write_vectored(),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => Pin::new(s).poll_flush(cx))
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => Pin::new(s).poll_shutdown(cx))
    }
}

/// Connects to `ep`. `fd://N` takes ownership of that inherited descriptor.
pub async fn dial(ep: &Endpoint) -> io::Result<LinkStream> {
    match ep {
        Endpoint::Tcp(addr) => {
            let s = tokio::net::TcpStream::connect(addr).await?;
            s.set_nodelay(true)?;
            enlarge_buffers(socket2::SockRef::from(&s));
            Ok(LinkStream::Tcp(s))
        }
        #[cfg(unix)]
        Endpoint::Unix(path) => {
            let s = tokio::net::UnixStream::connect(path).await?;
            enlarge_buffers(socket2::SockRef::from(&s));
            Ok(LinkStream::Unix(s))
        }
        #[cfg(unix)]
        Endpoint::HybridVsock { uds, port } => {
            let s = crate::hybrid_vsock::connect(uds, *port).await?;
            enlarge_buffers(socket2::SockRef::from(&s));
            Ok(LinkStream::Unix(s))
        }
        Endpoint::Unixgram(_) => Err(datagram_not_stream()),
        other => sys::dial(other).await.map(LinkStream::Sys),
    }
}

/// Socket buffer size asked for on links. At MTU 65520 the default (about
/// 200 KiB for unix sockets) holds three frames, so every few frames cost a
/// wake-up of the other side; a few MiB let a burst through in one go.
pub const LINK_SOCKET_BUFFER: usize = 4 * 1024 * 1024;

/// Best effort: the kernel may cap the sizes, and a smaller buffer only
/// costs speed.
pub fn enlarge_buffers(sock: socket2::SockRef<'_>) {
    let _ = sock.set_send_buffer_size(LINK_SOCKET_BUFFER);
    let _ = sock.set_recv_buffer_size(LINK_SOCKET_BUFFER);
}

/// A listening endpoint.
pub enum Listener {
    Tcp(tokio::net::TcpListener),
    #[cfg(unix)]
    Unix {
        listener: tokio::net::UnixListener,
        path: PathBuf,
        /// What was asked for: `unix://path`, or `hybridvsock://uds:P`
        /// for a listener on `uds_P`.
        endpoint: Endpoint,
    },
    Sys(sys::SysListener),
}

impl Listener {
    pub async fn accept(&self) -> io::Result<(LinkStream, String)> {
        match self {
            Listener::Tcp(l) => {
                let (s, peer) = l.accept().await?;
                s.set_nodelay(true)?;
                enlarge_buffers(socket2::SockRef::from(&s));
                Ok((LinkStream::Tcp(s), format!("tcp://{peer}")))
            }
            #[cfg(unix)]
            Listener::Unix { listener, endpoint, .. } => {
                let (s, addr) = listener.accept().await?;
                enlarge_buffers(socket2::SockRef::from(&s));
                let mut peer = unix_peer_name(&s, &addr);
                // The unix peer is the VMM; the guest is behind the port.
                if matches!(endpoint, Endpoint::HybridVsock { .. }) {
                    peer = format!("{endpoint} ({peer})");
                }
                Ok((LinkStream::Unix(s), peer))
            }
            Listener::Sys(l) => l.accept().await,
        }
    }
}

/// Who is at the other end of an accepted unix connection: its path if it
/// bound one, else its process (the listening path would name us, not it).
#[cfg(unix)]
fn unix_peer_name(s: &tokio::net::UnixStream, addr: &tokio::net::unix::SocketAddr) -> String {
    if let Some(path) = addr.as_pathname() {
        return format!("unix://{}", path.display());
    }
    match s.peer_cred() {
        Ok(c) => match c.pid() {
            Some(pid) => format!("unix:pid={pid},uid={}", c.uid()),
            None => format!("unix:uid={}", c.uid()),
        },
        Err(_) => "unix:unnamed".to_string(),
    }
}

impl Listener {
    /// Where the listener really is: for `tcp://IP:0`, the port the system
    /// chose.
    pub fn local_endpoint(&self) -> Option<Endpoint> {
        match self {
            Listener::Tcp(l) => l.local_addr().ok().map(Endpoint::Tcp),
            #[cfg(unix)]
            Listener::Unix { endpoint, .. } => Some(endpoint.clone()),
            Listener::Sys(_) => None,
        }
    }
}

#[cfg(unix)]
impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix { path, .. } = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Listens on `ep`. A stale unix socket file is replaced; the file is
/// removed again when the listener is dropped.
pub async fn listen(ep: &Endpoint) -> io::Result<Listener> {
    match ep {
        Endpoint::Tcp(addr) => Ok(Listener::Tcp(tokio::net::TcpListener::bind(addr).await?)),
        #[cfg(unix)]
        Endpoint::Unix(path) => {
            remove_stale_socket(path)?;
            let listener = tokio::net::UnixListener::bind(path)?;
            Ok(Listener::Unix { listener, path: path.clone(), endpoint: ep.clone() })
        }
        #[cfg(unix)]
        Endpoint::HybridVsock { uds, port } => {
            // The VMM connects here when the guest dials CID 2 port `port`.
            let path = crate::hybrid_vsock::listener_path(uds, *port);
            remove_stale_socket(&path)?;
            let listener = tokio::net::UnixListener::bind(&path)?;
            Ok(Listener::Unix { listener, path, endpoint: ep.clone() })
        }
        Endpoint::Fd(_) => Err(io::Error::new(io::ErrorKind::InvalidInput, "cannot listen on fd://")),
        Endpoint::Unixgram(_) => Err(datagram_not_stream()),
        other => sys::listen(other).await.map(Listener::Sys),
    }
}

fn datagram_not_stream() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, "unixgram:// is a datagram link (see datagram::DatagramLink)")
}

/// Removes `path` if it is a socket nobody answers on; refuses to remove
/// anything else, so a typo cannot delete a regular file.
#[cfg(unix)]
pub fn remove_stale_socket(path: &std::path::Path) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("{} is in use by another process", path.display()),
                ));
            }
            std::fs::remove_file(path)
        }
        Ok(_) => {
            Err(io::Error::new(io::ErrorKind::AlreadyExists, format!("{} exists and is not a socket", path.display())))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        for url in [
            "unix:///run/x.sock",
            "unixgram:///run/x.sock",
            "tcp://127.0.0.1:1234",
            "tcp://[::1]:80",
            "vsock://2:6656",
            "vsock://:6669",
            "fd://3",
            "hvsock://00000000-0000-0000-0000-000000000000:6656",
            "npipe://./pipe/x",
            "winsock://127.0.0.1:6656",
            "hybridvsock:///run/vm/v.sock:6656",
        ] {
            let ep: Endpoint = url.parse().unwrap();
            assert_eq!(ep.to_string(), url);
        }
        assert_eq!("vsock://:6669".parse::<Endpoint>().unwrap(), Endpoint::Vsock { cid: None, port: 6669 });
        // The last colon separates the port, so paths may hold colons.
        assert_eq!(
            "hybridvsock:///tmp/a:b/v.sock:2".parse::<Endpoint>().unwrap(),
            Endpoint::HybridVsock { uds: PathBuf::from("/tmp/a:b/v.sock"), port: 2 }
        );
    }

    #[test]
    fn rejects_garbage() {
        for url in [
            "",
            "unix://",
            "tcp://localhost",
            "vsock://2",
            "fd://-1",
            "fd://x",
            "http://x",
            "/path",
            "hybridvsock:///run/v.sock",
            "hybridvsock://:6656",
            "hybridvsock:///run/v.sock:x",
            "winsock://[::1]:80",
            "winsock://localhost:80",
        ] {
            assert!(url.parse::<Endpoint>().is_err(), "{url}");
        }
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn unix_listen_dial_and_stale_file() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let dir = std::env::temp_dir().join(format!("rdnet-ep-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        // A stale socket file from a dead process.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let ep = Endpoint::Unix(path.clone());
        let l = listen(&ep).await.unwrap();
        let (mut a, b) = tokio::join!(dial(&ep), l.accept());
        let (mut b, _) = b.unwrap();
        a.as_mut().unwrap().write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        b.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
        // A second listener must not steal a live socket.
        assert!(listen(&ep).await.is_err());
        drop(l);
        assert!(!path.exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[cfg(unix)]
    #[test]
    fn regular_file_is_not_replaced() {
        let path = std::env::temp_dir().join(format!("rdnet-ep-file-{}", std::process::id()));
        std::fs::write(&path, "keep").unwrap();
        assert!(remove_stale_socket(&path).is_err());
        assert!(path.exists());
        let _ = std::fs::remove_file(&path);
    }
}
