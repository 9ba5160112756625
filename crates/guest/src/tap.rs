//! A tap device (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`) driven by tokio.
//!
//! How this works: `/dev/net/tun` is opened non-blocking and attached to a
//! new tap with `TUNSETIFF` (with `IFF_TUN_EXCL`, so an existing device of
//! that name is never reused). The descriptor is registered with tokio's
//! reactor through `AsyncFd`; every `read` returns exactly one Ethernet
//! frame and every `write` injects one. Readers wait for readiness with
//! [`Tap::readable`] and then drain every frame already queued with
//! [`ReadGuard::try_read`] before doing anything else, so a busy tap costs
//! one wake-up per batch. The device lives as long as the descriptor: it
//! disappears when the [`Tap`] is dropped or the process exits.
//!
//! Every frame read or written is preceded by a `virtio_net_hdr`
//! ([`rdnet_wire::vnet_hdr`]), read and written with one vectored call. Offloads
//! start off, so the header says nothing until [`Tap::set_offload`] turns
//! on TSO and checksum offload.

use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::os::unix::fs::OpenOptionsExt;

use tokio::io::unix::{AsyncFd, AsyncFdReadyGuard};

use crate::sys;
use rdnet_wire::vnet_hdr::{VNET_HDR_LEN, VnetHdr};

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("invalid interface name {0:?} (1 to 15 bytes, no '/', ':' or whitespace)")]
    BadName(String),
    #[error("interface {0} already exists")]
    Exists(String),
    #[error("cannot open /dev/net/tun")]
    Open(#[source] io::Error),
    #[error("cannot create tap device {name}")]
    Create {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot register the tap device with the event loop")]
    Register(#[source] io::Error),
}

/// Checks an interface name the way the kernel does (`dev_valid_name`).
pub fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() < libc::IFNAMSIZ
        && name != "."
        && name != ".."
        && !name.bytes().any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace())
}

pub struct Tap {
    fd: AsyncFd<File>,
    name: String,
}

impl Tap {
    /// Creates the tap `name`; fails with [`TapError::Exists`] if any
    /// interface of that name exists. Must be called inside a tokio runtime.
    pub fn create(name: &str) -> Result<Tap, TapError> {
        if !valid_ifname(name) {
            return Err(TapError::BadName(name.to_string()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::Open)?;
        let flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_TUN_EXCL | libc::IFF_VNET_HDR) as libc::c_short;
        let name = sys::tun_set_iff(&file, name, flags).map_err(|e| match e.raw_os_error() {
            // EBUSY: a tun/tap of that name (IFF_TUN_EXCL); EEXIST: another kind.
            Some(libc::EBUSY) | Some(libc::EEXIST) => TapError::Exists(name.to_string()),
            _ => TapError::Create { name: name.to_string(), source: e },
        })?;
        let fd = sys::register_file(file).map_err(TapError::Register)?;
        Ok(Tap { fd, name })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Waits until a frame can be read. Cancel-safe.
    pub async fn readable(&self) -> io::Result<ReadGuard<'_>> {
        Ok(ReadGuard(self.fd.readable().await?))
    }

    /// Turns the guest kernel's TSO and checksum offload on or off for
    /// this tap (`TUNSETOFFLOAD`). On, it hands over TCP segments of up to
    /// 64 KiB with partial checksums; the header of each says so.
    pub fn set_offload(&self, on: bool) -> io::Result<()> {
        let flags = if on { libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 } else { 0 };
        sys::tun_set_offload(self.fd.get_ref(), flags)
    }

    /// Reads one frame (without its header), waiting for it.
    pub async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut guard = self.readable().await?;
            if let Some(r) = guard.try_read(buf) {
                return r.map(|(_, n)| n);
            }
        }
    }

    /// Writes one frame with an empty header (no offload asked for).
    pub async fn write(&self, frame: &[u8]) -> io::Result<()> {
        self.write_with_header(&VnetHdr::default(), frame).await
    }

    /// Writes one frame with its header, waiting while the device cannot
    /// take it.
    pub async fn write_with_header(&self, hdr: &VnetHdr, frame: &[u8]) -> io::Result<()> {
        let hdr = hdr.to_bytes();
        loop {
            let mut guard = self.fd.writable().await?;
            match guard.try_io(|f| f.get_ref().write_vectored(&[IoSlice::new(&hdr), IoSlice::new(frame)])) {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }
}

/// Read readiness of a [`Tap`].
pub struct ReadGuard<'a>(AsyncFdReadyGuard<'a, File>);

impl ReadGuard<'_> {
    /// Reads one frame into `buf` without waiting: its header and length.
    /// `None` once nothing is left (the readiness is then cleared, and
    /// [`Tap::readable`] waits again). A frame longer than `buf` is cut
    /// short, so `buf` should hold the largest the tap can give.
    pub fn try_read(&mut self, buf: &mut [u8]) -> Option<io::Result<(VnetHdr, usize)>> {
        let mut hdr = [0u8; VNET_HDR_LEN];
        loop {
            let r =
                self.0.try_io(|f| f.get_ref().read_vectored(&mut [IoSliceMut::new(&mut hdr), IoSliceMut::new(buf)]));
            match r {
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(Ok(n)) if n < VNET_HDR_LEN => {
                    return Some(Err(io::Error::new(io::ErrorKind::InvalidData, "tap read shorter than its header")));
                }
                Ok(Ok(n)) => return Some(Ok((VnetHdr::parse(&hdr), n - VNET_HDR_LEN))),
                Ok(Err(e)) => return Some(Err(e)),
                Err(_would_block) => return None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netlink::Netlink;
    use crate::netns::NetNs;

    #[test]
    fn create_read_write_in_a_namespace() {
        if !nix::unistd::geteuid().is_root() || !std::path::Path::new("/dev/net/tun").exists() {
            eprintln!("skipping: needs root and /dev/net/tun");
            return;
        }
        let ns = NetNs::new_anonymous().unwrap();
        ns.block_on(|| async {
            let mac = [0x5a, 0x94, 0xef, 0xe4, 0x0c, 0xee];
            let tap = Tap::create("tp0").unwrap();
            assert_eq!(tap.name(), "tp0");
            assert!(matches!(Tap::create("tp0"), Err(TapError::Exists(_))));
            assert!(matches!(Tap::create("lo"), Err(TapError::Exists(_))));
            assert!(matches!(Tap::create("bad name"), Err(TapError::BadName(_))));
            let nl = Netlink::new().unwrap();
            nl.set_mac("tp0", mac).await.unwrap();
            nl.set_up("tp0").await.unwrap();
            nl.add_address("tp0", "10.7.0.1/24".parse().unwrap()).await.unwrap();

            // A datagram to a neighbour makes the kernel ask for its MAC.
            let sock = std::net::UdpSocket::bind("10.7.0.1:0").unwrap();
            sock.send_to(b"x", "10.7.0.2:9").unwrap();
            let mut buf = vec![0u8; 65536];
            let arp = tokio::time::timeout(std::time::Duration::from_secs(5), async {
                loop {
                    let n = tap.read(&mut buf).await.unwrap();
                    let f = &buf[..n];
                    if n >= 42 && f[12..14] == [0x08, 0x06] {
                        return f.to_vec();
                    }
                }
            })
            .await
            .expect("an ARP request on the tap");
            assert_eq!(arp[..6], [0xff; 6]);
            assert_eq!(arp[6..12], mac);
            assert_eq!(arp[38..42], [10, 7, 0, 2]);

            // The kernel takes a frame written to the tap (the ARP reply).
            let mut reply = vec![0u8; 42];
            reply[..6].copy_from_slice(&mac);
            reply[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
            reply[12..14].copy_from_slice(&[0x08, 0x06]);
            reply[14..22].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 2]);
            reply[22..28].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
            reply[28..32].copy_from_slice(&[10, 7, 0, 2]);
            reply[32..38].copy_from_slice(&mac);
            reply[38..42].copy_from_slice(&[10, 7, 0, 1]);
            tap.write(&reply).await.unwrap();
            drop(tap);
            // The device goes away with its descriptor.
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            assert!(!nl.link_exists("tp0").await.unwrap());
        })
        .unwrap();
    }

    #[test]
    fn names() {
        assert!(valid_ifname("eth0"));
        assert!(valid_ifname("veth-rd1"));
        assert!(valid_ifname("a23456789012345"));
        for bad in ["", ".", "..", "a234567890123456", "a/b", "a b", "a:b", "a\0"] {
            assert!(!valid_ifname(bad), "{bad:?}");
        }
    }
}
