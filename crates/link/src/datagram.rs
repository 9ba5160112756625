//! Datagram links: one Ethernet frame per unix datagram (gvproxy's "vfkit"
//! transport, used by macOS-style VMs).
//!
//! How this works: host-switch binds a SOCK_DGRAM unix socket; the VM side
//! sends from its own bound socket, so each datagram carries the peer's
//! address, and replies go back there. The first datagram a vfkit client
//! sends is the 4-byte greeting `VFKT`, which is consumed. There is no
//! stream to lose sync with: a bad datagram is dropped, the link goes on.

#[cfg(unix)]
use std::io;
#[cfg(unix)]
use std::path::{Path, PathBuf};

/// The greeting a vfkit client sends first.
pub const VFKIT_GREETING: &[u8] = b"VFKT";

#[cfg(unix)]
pub struct DatagramLink {
    sock: tokio::net::UnixDatagram,
    path: PathBuf,
}

#[cfg(unix)]
impl DatagramLink {
    /// Binds `path` (a stale socket file is replaced).
    pub fn bind(path: &Path) -> io::Result<Self> {
        crate::endpoint::remove_stale_socket(path)?;
        let sock = tokio::net::UnixDatagram::bind(path)?;
        crate::endpoint::enlarge_buffers(socket2::SockRef::from(&sock));
        Ok(DatagramLink { sock, path: path.to_path_buf() })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Receives one datagram and the path of its sender (`None` if the
    /// sender is unbound and so cannot be answered).
    pub async fn recv(&self, buf: &mut [u8]) -> io::Result<(usize, Option<PathBuf>)> {
        let (n, from) = self.sock.recv_from(buf).await?;
        Ok((n, from.as_pathname().map(Path::to_path_buf)))
    }

    pub async fn send_to(&self, frame: &[u8], peer: &Path) -> io::Result<usize> {
        self.sock.send_to(frame, peer).await
    }
}

#[cfg(unix)]
impl Drop for DatagramLink {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_both_ways_and_greeting_visible() {
        let dir = std::env::temp_dir().join(format!("rdnet-dgram-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let server = DatagramLink::bind(&dir.join("host.sock")).unwrap();
        let client = tokio::net::UnixDatagram::bind(dir.join("vm.sock")).unwrap();
        client.send_to(VFKIT_GREETING, dir.join("host.sock")).await.unwrap();
        client.send_to(&[1u8; 1514], dir.join("host.sock")).await.unwrap();
        let mut buf = vec![0u8; 65536];
        let (n, from) = server.recv(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], VFKIT_GREETING);
        let from = from.unwrap();
        let (n, _) = server.recv(&mut buf).await.unwrap();
        assert_eq!(n, 1514);
        server.send_to(&[2u8; 60], &from).await.unwrap();
        let n = client.recv(&mut buf).await.unwrap();
        assert_eq!(n, 60);
        drop(server);
        assert!(!dir.join("host.sock").exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
