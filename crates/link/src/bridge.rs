//! A socket that tokio cannot register, driven by two threads and handed to
//! async code as an ordinary stream.
//!
//! How this works. tokio on Windows only drives the socket kinds it creates
//! itself (TCP, UDP, named pipes); a Hyper-V socket (AF_HYPERV) is none of
//! them. [`BridgeStream::spawn`] puts such a socket in non-blocking mode and
//! gives it two threads: one receives from the socket and writes into an
//! in-memory pipe ([`tokio::io::duplex`]) whose other end is the
//! [`BridgeStream`]; the other reads what async code wrote into the pipe and
//! sends it. Both wait for readiness with a bounded wait ([`TICK`]), so
//! neither can block forever and both notice within a tick that the stream
//! was dropped. The pipe is bounded, so a slow reader on either side pushes
//! back instead of buffering without limit: nothing is dropped.
//!
//! Ends: the peer closing (or a receive error) ends the stream's read side
//! (EOF); `shutdown()` on the stream half-closes the socket after everything
//! written before it has been sent; dropping the stream stops the receive
//! thread, lets the send thread flush what was written (giving up after
//! [`DRAIN_LIMIT`] without progress) and then closes the socket. A send
//! error stops both threads: reads then see EOF and writes fail.
//!
//! The socket is reached through [`BlockingSocket`], so the threads are
//! tested on Linux with a unix socket and under Wine with a Winsock TCP
//! socket; only the Hyper-V address itself is untested off Windows.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::executor::block_on;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream, ReadBuf, ReadHalf, WriteHalf};

/// Longest a bridge thread waits before it looks at its stop flag again.
pub const TICK: Duration = Duration::from_millis(200);
/// After the stream is dropped, how long the send thread keeps trying to
/// flush without any progress.
pub const DRAIN_LIMIT: Duration = Duration::from_secs(10);
/// Bytes in flight in each direction between the threads and async code.
const PIPE_BYTES: usize = 256 * 1024;
/// One receive or send.
const CHUNK: usize = 64 * 1024;

/// Which readiness to wait for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ready {
    Read,
    Write,
}

/// A connected stream socket in non-blocking mode, as the bridge threads
/// use it. `recv` and `send` return `WouldBlock` when they would wait.
pub trait BlockingSocket: Send + Sync + 'static {
    /// Waits up to `timeout` for the socket to become ready (an error or a
    /// closed connection counts as ready); true when it is.
    fn wait(&self, ready: Ready, timeout: Duration) -> io::Result<bool>;
    fn recv(&self, buf: &mut [u8]) -> io::Result<usize>;
    fn send(&self, buf: &[u8]) -> io::Result<usize>;
    /// Half-closes the sending side (the peer reads EOF).
    fn shutdown_write(&self) -> io::Result<()>;
}

/// The async end of a bridged socket.
pub struct BridgeStream {
    pipe: DuplexStream,
    stop: Arc<AtomicBool>,
}

impl BridgeStream {
    /// Starts the two threads (named after `name`) for `sock`, which must
    /// already be connected and non-blocking.
    pub fn spawn<S: BlockingSocket>(sock: S, name: &str) -> io::Result<BridgeStream> {
        let sock = Arc::new(sock);
        let stop = Arc::new(AtomicBool::new(false));
        let (pipe, threads_end) = tokio::io::duplex(PIPE_BYTES);
        let (from_user, to_user) = tokio::io::split(threads_end);
        let stream = BridgeStream { pipe, stop: stop.clone() };
        {
            let (sock, stop) = (sock.clone(), stop.clone());
            std::thread::Builder::new()
                .name(format!("{name}-recv"))
                .spawn(move || receive_loop(&*sock, to_user, &stop))?;
        }
        // If this spawn fails, `stream` drops here and stops the first thread.
        std::thread::Builder::new().name(format!("{name}-send")).spawn(move || send_loop(&*sock, from_user, &stop))?;
        Ok(stream)
    }
}

impl Drop for BridgeStream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

fn retry(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted)
}

/// Socket → pipe, until EOF, an error, or the stream is dropped.
fn receive_loop<S: BlockingSocket>(sock: &S, mut to_user: WriteHalf<DuplexStream>, stop: &AtomicBool) {
    let mut buf = vec![0u8; CHUNK];
    while !stop.load(Ordering::Acquire) {
        match sock.wait(Ready::Read, TICK) {
            Ok(false) => continue,
            Ok(true) => {}
            Err(e) => {
                tracing::debug!(error = %e, "bridged socket: waiting to receive failed");
                break;
            }
        }
        match sock.recv(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if block_on(to_user.write_all(&buf[..n])).is_err() {
                    // The stream is gone.
                    return;
                }
            }
            Err(e) if retry(&e) => {}
            Err(e) => {
                tracing::debug!(error = %e, "bridged socket: receive failed");
                break;
            }
        }
    }
    let _ = block_on(to_user.shutdown());
}

/// Pipe → socket, until the stream is shut down or dropped (then half-close)
/// or sending fails (then stop both threads).
fn send_loop<S: BlockingSocket>(sock: &S, mut from_user: ReadHalf<DuplexStream>, stop: &AtomicBool) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = match block_on(from_user.read(&mut buf)) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Err(e) = send_all(sock, &buf[..n], stop) {
            tracing::debug!(error = %e, "bridged socket: send failed");
            stop.store(true, Ordering::Release);
            return;
        }
    }
    let _ = sock.shutdown_write();
}

fn send_all<S: BlockingSocket>(sock: &S, mut data: &[u8], stop: &AtomicBool) -> io::Result<()> {
    let mut stalled: Option<Instant> = None;
    while !data.is_empty() {
        match sock.send(data) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                data = &data[n..];
                stalled = None;
            }
            Err(e) if retry(&e) => {
                if stop.load(Ordering::Acquire) && stalled.get_or_insert_with(Instant::now).elapsed() > DRAIN_LIMIT {
                    return Err(io::Error::new(io::ErrorKind::TimedOut, "the peer stopped reading"));
                }
                sock.wait(Ready::Write, TICK)?;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl AsyncRead for BridgeStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().pipe).poll_read(cx, buf)
    }
}

impl AsyncWrite for BridgeStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().pipe).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().pipe).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().pipe).poll_shutdown(cx)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Runs the contract checks against a freshly made pair: `pair()` gives
    /// a bridged end (not yet bridged) and a plain blocking peer.
    pub(crate) trait Peer: io::Read + io::Write + Send + 'static {
        fn shutdown_write(&self) -> io::Result<()>;
        fn set_read_timeout(&self, d: Option<Duration>) -> io::Result<()>;
    }

    pub(crate) async fn round_trips<S: BlockingSocket, P: Peer>(bridged: S, mut peer: P) {
        let mut s = BridgeStream::spawn(bridged, "test").unwrap();
        // Small both ways.
        s.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        peer.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"ping");
        peer.write_all(b"pong").unwrap();
        s.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"pong");

        // 8 MiB each way at once, checked byte for byte: back-pressure, no loss.
        const N: usize = 8 << 20;
        let pattern = |i: usize| (i * 7 + i / 4093) as u8;
        let echo = std::thread::spawn(move || {
            let mut buf = vec![0u8; 32 * 1024];
            let mut seen = 0usize;
            let mut out = 0usize;
            while seen < N {
                let n = peer.read(&mut buf).unwrap();
                assert!(n > 0, "EOF after {seen} bytes");
                for (k, b) in buf[..n].iter().enumerate() {
                    assert_eq!(*b, pattern(seen + k), "byte {}", seen + k);
                }
                seen += n;
                // Answer with the same amount of our own pattern.
                let reply: Vec<u8> = (out..out + n).map(|i| pattern(i).wrapping_add(1)).collect();
                peer.write_all(&reply).unwrap();
                out += n;
            }
            peer
        });
        let (mut rd, mut wr) = tokio::io::split(s);
        let writer = async {
            let data: Vec<u8> = (0..N).map(pattern).collect();
            for chunk in data.chunks(100_000) {
                wr.write_all(chunk).await.unwrap();
            }
        };
        let reader = async {
            let mut buf = vec![0u8; 50_000];
            let mut seen = 0usize;
            while seen < N {
                let n = rd.read(&mut buf).await.unwrap();
                assert!(n > 0, "EOF after {seen} bytes");
                for (k, b) in buf[..n].iter().enumerate() {
                    assert_eq!(*b, pattern(seen + k).wrapping_add(1));
                }
                seen += n;
            }
        };
        tokio::join!(writer, reader);
        let mut peer = echo.join().unwrap();
        let mut s = rd.unsplit(wr);

        // Half-close from our side: the peer reads EOF, and can still answer.
        s.write_all(b"last").await.unwrap();
        s.shutdown().await.unwrap();
        let mut rest = Vec::new();
        peer.read_to_end(&mut rest).unwrap();
        assert_eq!(rest, b"last");
        peer.write_all(b"after").unwrap();
        let mut got = [0u8; 5];
        s.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"after");

        // The peer closes: we read EOF.
        peer.shutdown_write().unwrap();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        drop(s);
    }

    /// Dropping the stream with unsent data: the data still arrives, then EOF.
    pub(crate) async fn drop_flushes<S: BlockingSocket, P: Peer>(bridged: S, mut peer: P) {
        let mut s = BridgeStream::spawn(bridged, "test").unwrap();
        let data = vec![0x5au8; 1 << 20];
        let reader = std::thread::spawn(move || {
            peer.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            let mut all = Vec::new();
            peer.read_to_end(&mut all).unwrap();
            all
        });
        s.write_all(&data).await.unwrap();
        drop(s);
        let got = reader.join().unwrap();
        assert_eq!(got.len(), data.len());
        assert!(got.iter().all(|b| *b == 0x5a));
    }

    #[cfg(unix)]
    mod unix {
        use super::*;
        use std::io::{Read, Write};
        use std::net::Shutdown;
        use std::os::unix::net::UnixStream;

        /// A unix socket behind the trait. `wait` always says "ready" and
        /// the receive/send timeouts bound each call instead, which keeps
        /// the test free of `unsafe` poll(2).
        struct Bridged(UnixStream);

        impl BlockingSocket for Bridged {
            fn wait(&self, _: Ready, _: Duration) -> io::Result<bool> {
                Ok(true)
            }
            fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
                (&self.0)
                    .read(buf)
                    .map_err(|e| if e.kind() == io::ErrorKind::TimedOut { io::ErrorKind::WouldBlock.into() } else { e })
            }
            fn send(&self, buf: &[u8]) -> io::Result<usize> {
                (&self.0)
                    .write(buf)
                    .map_err(|e| if e.kind() == io::ErrorKind::TimedOut { io::ErrorKind::WouldBlock.into() } else { e })
            }
            fn shutdown_write(&self) -> io::Result<()> {
                self.0.shutdown(Shutdown::Write)
            }
        }

        impl Peer for UnixStream {
            fn shutdown_write(&self) -> io::Result<()> {
                self.shutdown(Shutdown::Write)
            }
            fn set_read_timeout(&self, d: Option<Duration>) -> io::Result<()> {
                UnixStream::set_read_timeout(self, d)
            }
        }

        fn pair() -> (Bridged, UnixStream) {
            let (a, b) = UnixStream::pair().unwrap();
            a.set_read_timeout(Some(TICK)).unwrap();
            a.set_write_timeout(Some(TICK)).unwrap();
            (Bridged(a), b)
        }

        #[tokio::test]
        async fn bridged_unix_socket_round_trips() {
            let (a, b) = pair();
            round_trips(a, b).await;
        }

        #[tokio::test]
        async fn bridged_unix_socket_flushes_on_drop() {
            let (a, b) = pair();
            drop_flushes(a, b).await;
        }

        #[tokio::test]
        async fn threads_end_when_the_stream_is_dropped() {
            let (a, b) = UnixStream::pair().unwrap();
            a.set_read_timeout(Some(TICK)).unwrap();
            let s = BridgeStream::spawn(Bridged(a), "test").unwrap();
            drop(s);
            // Both threads gone ⇒ the bridged socket is closed ⇒ writing to
            // it fails, although the peer never wrote or closed anything.
            let closed = wait_for(Duration::from_secs(5), || (&b).write(b"x").is_err());
            assert!(closed, "the bridged socket stayed open after the stream was dropped");
        }

        fn wait_for(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
            let end = Instant::now() + limit;
            while Instant::now() < end {
                if f() {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            false
        }

        #[tokio::test]
        async fn a_send_error_ends_the_stream() {
            let (a, b) = pair();
            let mut s = BridgeStream::spawn(a, "test").unwrap();
            drop(b);
            // Writes fail (EPIPE in the send thread), and reads see EOF.
            let mut failed = false;
            for _ in 0..200 {
                if s.write_all(&[0u8; 65536]).await.is_err() {
                    failed = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert!(failed, "writes kept succeeding on a dead socket");
            let mut rest = Vec::new();
            s.read_to_end(&mut rest).await.unwrap();
        }
    }
}
