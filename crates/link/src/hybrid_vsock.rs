//! Hybrid vsock: a guest's AF_VSOCK as the VMM maps it onto host unix
//! sockets (Firecracker, Cloud Hypervisor, rust-vmm's vhost-device-vsock).
//!
//! How this works. The VMM owns one unix socket, `UDS`, for the guest's
//! vsock device. A host process reaches guest port P by connecting to
//! `UDS` and writing the line `CONNECT P\n`; the VMM opens a vsock
//! connection to the guest and answers `OK <host-port>\n` once the guest
//! accepted it, or closes the connection (some VMMs answer something else
//! first) when nothing listens there. Only after `OK` does the stream carry
//! the guest's bytes: vhost-device-vsock 0.3.0 drops bytes written together
//! with the `CONNECT` line, so [`connect`] writes nothing more until the
//! answer came, and reads the answer one byte at a time so not one byte the
//! guest sends right after it is taken from the caller. The other direction:
//! a guest connection to CID 2 (the host) port P makes the VMM connect to the
//! unix socket `UDS_P` (the path with `_P` appended), which must already be
//! listening when the guest dials ([`listener_path`]).
//!
//! What the VMM does not carry over: a unix half-close (vhost-device-vsock
//! 0.3.0 shows the guest's `shutdown(SHUT_WR)` to the host only when the
//! guest closes), and the peer credentials of an accepted connection name
//! the VMM, not the guest. Nothing above relies on either.
//!
//! URL form: `hybridvsock:///path/to/uds:PORT` (the last `:` separates the
//! port), for dialing and listening alike.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::time::timeout;

/// How long the VMM gets to answer `CONNECT` (it asks the guest first).
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest answer line read; `OK 4294967295\n` is 14 bytes.
const MAX_REPLY: usize = 64;

/// The unix socket a VMM connects to for a guest's connection to host port
/// `port`: `uds` with `_PORT` appended.
pub fn listener_path(uds: &Path, port: u32) -> PathBuf {
    let mut p = uds.as_os_str().to_owned();
    p.push(format!("_{port}"));
    PathBuf::from(p)
}

/// Connects to guest port `port` through the VMM socket `uds`, waiting up
/// to [`REPLY_TIMEOUT`] for its answer.
pub async fn connect(uds: &Path, port: u32) -> io::Result<UnixStream> {
    connect_within(uds, port, REPLY_TIMEOUT).await
}

/// [`connect`] with the answer's time limit given.
pub async fn connect_within(uds: &Path, port: u32, limit: Duration) -> io::Result<UnixStream> {
    let mut s = UnixStream::connect(uds).await?;
    s.write_all(format!("CONNECT {port}\n").as_bytes()).await?;
    let reply = match timeout(limit, read_line(&mut s)).await {
        Ok(r) => r?,
        Err(_) => {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the VMM at {} did not answer CONNECT {port} within {limit:?}", uds.display()),
            ));
        }
    };
    match reply {
        Some(line) if is_ok(&line) => Ok(s),
        Some(line) => Err(io::Error::new(
            io::ErrorKind::ConnectionRefused,
            format!(
                "the VMM at {} refused CONNECT {port}: {:?}",
                uds.display(),
                String::from_utf8_lossy(&line[..line.len().min(MAX_REPLY)])
            ),
        )),
        None => Err(io::Error::new(
            io::ErrorKind::ConnectionRefused,
            format!(
                "the VMM at {} closed the connection on CONNECT {port} (nothing listens on that guest port?)",
                uds.display()
            ),
        )),
    }
}

/// `OK` followed by a space and the host-side port number.
fn is_ok(line: &[u8]) -> bool {
    line.strip_prefix(b"OK ").is_some_and(|n| !n.is_empty() && n.iter().all(u8::is_ascii_digit))
}

/// One line without its newline (a `\r` before it is dropped too); `None`
/// if the peer closed first. Reads byte by byte: what follows the newline
/// belongs to the caller. A line longer than [`MAX_REPLY`] is returned as
/// it is, to be refused.
async fn read_line(s: &mut UnixStream) -> io::Result<Option<Vec<u8>>> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        if s.read(&mut byte).await? == 0 {
            return Ok(None);
        }
        if byte[0] == b'\n' {
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            return Ok(Some(line));
        }
        line.push(byte[0]);
        if line.len() > MAX_REPLY {
            return Ok(Some(line));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoint::{Endpoint, dial, listen};
    use tokio::net::UnixListener;

    struct Dir(PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    fn dir(name: &str) -> Dir {
        let d = std::env::temp_dir().join(format!("rdnet-hv-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        Dir(d)
    }

    /// A fake VMM: accepts one connection on `uds`, reads the request line
    /// and hands it, with the connection, to `answer`.
    async fn vmm_once<F, Fut>(l: UnixListener, answer: F) -> Vec<u8>
    where
        F: FnOnce(UnixStream) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let (mut s, _) = l.accept().await.unwrap();
        let line = read_line(&mut s).await.unwrap().unwrap();
        answer(s).await;
        line
    }

    #[test]
    fn listener_paths() {
        assert_eq!(listener_path(Path::new("/run/vm/v.sock"), 6656), PathBuf::from("/run/vm/v.sock_6656"));
    }

    #[test]
    fn ok_lines() {
        assert!(is_ok(b"OK 1073741824"));
        for bad in [&b"OK"[..], b"OK ", b"OK x", b"ok 5", b"ERR 5", b"OK 5 6", b""] {
            assert!(!is_ok(bad), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[tokio::test]
    async fn dial_waits_for_ok_and_keeps_the_bytes_after_it() {
        let d = dir("ok");
        let uds = d.0.join("vm.vsock");
        let l = UnixListener::bind(&uds).unwrap();
        let ep: Endpoint = format!("hybridvsock://{}:6669", uds.display()).parse().unwrap();
        let vmm = vmm_once(l, |mut s| async move {
            // The guest writes at once, in the same segment as OK.
            s.write_all(b"OK 1073741824\r\nsignature").await.unwrap();
            let mut buf = [0u8; 5];
            s.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf, b"READY");
        });
        let client = async {
            let mut s = dial(&ep).await.unwrap();
            let mut buf = [0u8; 9];
            s.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf, b"signature");
            s.write_all(b"READY").await.unwrap();
        };
        let (line, ()) = tokio::join!(vmm, client);
        assert_eq!(line, b"CONNECT 6669");
    }

    #[tokio::test]
    async fn a_refused_connect_is_an_error() {
        let d = dir("refused");
        let uds = d.0.join("vm.vsock");
        // The VMM closes (nothing listens on that guest port) ...
        let l = UnixListener::bind(&uds).unwrap();
        let (line, r) = tokio::join!(vmm_once(l, |s| async move { drop(s) }), connect(&uds, 7));
        assert_eq!(line, b"CONNECT 7");
        let e = r.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused, "{e}");
        assert!(e.to_string().contains("closed the connection"), "{e}");
        std::fs::remove_file(&uds).unwrap();
        // ... or answers something other than OK.
        let l = UnixListener::bind(&uds).unwrap();
        let vmm = vmm_once(l, |mut s| async move {
            s.write_all(b"ERROR no listener\n").await.unwrap();
        });
        let (_, r) = tokio::join!(vmm, connect(&uds, 7));
        let e = r.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused, "{e}");
        assert!(e.to_string().contains("ERROR no listener"), "{e}");
        std::fs::remove_file(&uds).unwrap();
        // ... or an endless line without a newline.
        let l = UnixListener::bind(&uds).unwrap();
        let vmm = vmm_once(l, |mut s| async move {
            s.write_all(&[b'O'; 1000]).await.unwrap();
        });
        let (_, r) = tokio::join!(vmm, connect(&uds, 7));
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::ConnectionRefused);
    }

    #[tokio::test]
    async fn a_silent_vmm_times_out() {
        let d = dir("silent");
        let uds = d.0.join("vm.vsock");
        let l = UnixListener::bind(&uds).unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let vmm = vmm_once(l, |s| async move {
            // Holds the connection open without answering until the client gave up.
            let _ = rx.await;
            drop(s);
        });
        let client = async {
            let r = connect_within(&uds, 9, Duration::from_millis(200)).await;
            let _ = tx.send(());
            r
        };
        let (_, r) = tokio::join!(vmm, client);
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::TimedOut);
    }

    #[tokio::test]
    async fn no_vmm_socket() {
        let d = dir("none");
        let ep: Endpoint = format!("hybridvsock://{}:1", d.0.join("absent").display()).parse().unwrap();
        assert_eq!(dial(&ep).await.unwrap_err().kind(), io::ErrorKind::NotFound);
    }

    /// A fake VMM serving many connections: `CONNECT P` is bridged to the
    /// "guest" listener `guest_dir/P.sock` if it exists, else closed.
    async fn vmm_bridge(l: UnixListener, guest_dir: PathBuf) {
        loop {
            let Ok((mut s, _)) = l.accept().await else { return };
            let guest_dir = guest_dir.clone();
            tokio::spawn(async move {
                let Ok(Some(line)) = read_line(&mut s).await else { return };
                let Some(port) = std::str::from_utf8(&line).ok().and_then(|l| l.strip_prefix("CONNECT ")) else {
                    return;
                };
                let Ok(mut guest) = UnixStream::connect(guest_dir.join(format!("{port}.sock"))).await else {
                    return; // nothing listens on that guest port: close
                };
                if s.write_all(b"OK 1073741824\n").await.is_ok() {
                    let _ = tokio::io::copy_bidirectional(&mut s, &mut guest).await;
                }
            });
        }
    }

    #[tokio::test]
    async fn the_handshake_runs_through_a_vmm() {
        use crate::handshake::{
            HandshakeError, HostTiming, SIGNATURE, guest_accept_ready, host_find_peer, host_send_ready,
        };
        let d = dir("handshake");
        let uds = d.0.join("vm.vsock");
        let guest_dir = d.0.join("guest");
        std::fs::create_dir_all(&guest_dir).unwrap();
        let vmm = tokio::spawn(vmm_bridge(UnixListener::bind(&uds).unwrap(), guest_dir.clone()));
        let ep: Endpoint = format!("hybridvsock://{}:6669", uds.display()).parse().unwrap();
        let t = HostTiming {
            interval: Duration::from_millis(20),
            deadline: Duration::from_secs(5),
            io_timeout: Duration::from_secs(2),
            ..HostTiming::default()
        };
        // Nobody listens on guest port 6669 yet: every CONNECT is refused
        // and the host keeps probing until its deadline.
        let short = HostTiming { deadline: Duration::from_millis(200), ..t.clone() };
        let e = host_find_peer(&ep, &[SIGNATURE], &short).await.unwrap_err();
        let refused = matches!(&e, HandshakeError::NotFound { last: Some(last), .. }
            if matches!(&**last, HandshakeError::Dial { source, .. } if source.kind() == io::ErrorKind::ConnectionRefused));
        assert!(refused, "{e:?}");
        // Then network-setup listens, and the host finds it and says READY.
        let guest_l = listen(&Endpoint::Unix(guest_dir.join("6669.sock"))).await.unwrap();
        let guest = guest_accept_ready(&guest_l, SIGNATURE, Duration::from_secs(2));
        let host = async {
            host_find_peer(&ep, &[SIGNATURE], &t).await.unwrap();
            host_send_ready(&ep, &[SIGNATURE], t.io_timeout).await.unwrap();
        };
        tokio::time::timeout(Duration::from_secs(10), async { tokio::join!(guest, host) })
            .await
            .expect("handshake through the VMM finished");
        vmm.abort();
    }

    #[tokio::test]
    async fn listen_takes_the_guests_connections_on_uds_port() {
        let d = dir("listen");
        let uds = d.0.join("vm.vsock");
        let ep: Endpoint = format!("hybridvsock://{}:6656", uds.display()).parse().unwrap();
        let l = listen(&ep).await.unwrap();
        assert_eq!(l.local_endpoint(), Some(ep.clone()));
        let path = listener_path(&uds, 6656);
        // The VMM, for a guest that dialled CID 2 port 6656.
        let (vmm, accepted) = tokio::join!(UnixStream::connect(&path), l.accept());
        let (mut guest_side, peer) = accepted.unwrap();
        assert!(peer.starts_with(&format!("hybridvsock://{}:6656 (unix:", uds.display())), "{peer}");
        let mut vmm = vmm.unwrap();
        vmm.write_all(b"frames").await.unwrap();
        let mut buf = [0u8; 6];
        guest_side.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"frames");
        drop(l);
        assert!(!path.exists(), "the listener's socket file is removed with it");
    }
}
