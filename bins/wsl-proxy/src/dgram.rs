//! UDP receive and send that keep the details plain `recv_from` loses.
//!
//! How this works: a listener bound to a wildcard address (every address,
//! `0.0.0.0` or `::`) asks the kernel for each datagram's destination
//! address (`IP_PKTINFO` / `IPV6_RECVPKTINFO`; a dual-stack socket reports
//! IPv4 destinations as IPv4-mapped IPv6 addresses) and sends each reply
//! with that address as its source. Without this the kernel picks the
//! source by route, which on a host with several addresses (127.0.0.2,
//! IPv6 temporary addresses, WSL's mirrored interfaces) differs from the one
//! the client wrote to, and a connected client drops the reply. A listener
//! bound to one address needs none of this. `recvmsg` also tells whether a
//! datagram was longer than the buffer (`MSG_TRUNC`), so truncation by
//! `-udpBuffer` is known rather than guessed.

use std::io::{self, IoSlice, IoSliceMut};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsFd, AsRawFd};

use nix::libc;
use nix::sys::socket::{
    ControlMessage, ControlMessageOwned, MsgFlags, SockaddrStorage, recvmsg, sendmsg, setsockopt, sockopt,
};
use tokio::io::Interest;
use tokio::net::UdpSocket;

/// One datagram as received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    pub len: usize,
    pub from: SocketAddr,
    /// The address it was sent to, when the socket reports it and it can
    /// serve as a reply's source (not multicast or broadcast).
    pub to: Option<IpAddr>,
    /// Longer than the buffer: only the first `len` bytes were kept.
    pub truncated: bool,
}

/// Asks for each datagram's destination address on a wildcard socket.
pub fn want_destination<S: AsFd>(socket: &S, ipv6: bool) -> io::Result<()> {
    if ipv6 {
        setsockopt(socket, sockopt::Ipv6RecvPacketInfo, &true)?;
    } else {
        setsockopt(socket, sockopt::Ipv4PacketInfo, &true)?;
    }
    Ok(())
}

pub async fn recv(socket: &UdpSocket, buf: &mut [u8]) -> io::Result<Received> {
    socket.async_io(Interest::READABLE, || recv_now(socket, buf)).await
}

fn recv_now(socket: &UdpSocket, buf: &mut [u8]) -> io::Result<Received> {
    let mut cmsg = nix::cmsg_space!(libc::in6_pktinfo, libc::in_pktinfo);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<SockaddrStorage>(socket.as_raw_fd(), &mut iov, Some(&mut cmsg), MsgFlags::empty())?;
    let from =
        msg.address.as_ref().and_then(socket_addr).ok_or_else(|| io::Error::other("datagram without a source"))?;
    let mut to = None;
    // A truncated control buffer only loses the destination: the reply then
    // goes out from the kernel's choice, as without pktinfo.
    if let Ok(cmsgs) = msg.cmsgs() {
        for c in cmsgs {
            match c {
                ControlMessageOwned::Ipv6PacketInfo(info) => {
                    to = reply_source(Ipv6Addr::from(info.ipi6_addr.s6_addr).into())
                }
                ControlMessageOwned::Ipv4PacketInfo(info) => {
                    // ipi_spec_dst, not the header's address: for a broadcast
                    // it is the receiving interface's own address.
                    to = reply_source(Ipv4Addr::from(u32::from_be(info.ipi_spec_dst.s_addr)).into());
                }
                _ => {}
            }
        }
    }
    Ok(Received { len: msg.bytes, from, to, truncated: msg.flags.contains(MsgFlags::MSG_TRUNC) })
}

/// Sends `data` to `to`, from `source` when given.
pub async fn send(socket: &UdpSocket, data: &[u8], to: SocketAddr, source: Option<IpAddr>) -> io::Result<usize> {
    let Some(source) = source else { return socket.send_to(data, to).await };
    let dest = SockaddrStorage::from(to);
    let iov = [IoSlice::new(data)];
    socket
        .async_io(Interest::WRITABLE, || {
            let fd = socket.as_raw_fd();
            let sent = match source {
                IpAddr::V6(ip) => {
                    let info =
                        libc::in6_pktinfo { ipi6_addr: libc::in6_addr { s6_addr: ip.octets() }, ipi6_ifindex: 0 };
                    sendmsg(fd, &iov, &[ControlMessage::Ipv6PacketInfo(&info)], MsgFlags::empty(), Some(&dest))
                }
                IpAddr::V4(ip) => {
                    let info = libc::in_pktinfo {
                        ipi_ifindex: 0,
                        ipi_spec_dst: libc::in_addr { s_addr: u32::from(ip).to_be() },
                        ipi_addr: libc::in_addr { s_addr: 0 },
                    };
                    sendmsg(fd, &iov, &[ControlMessage::Ipv4PacketInfo(&info)], MsgFlags::empty(), Some(&dest))
                }
            };
            sent.map_err(io::Error::from)
        })
        .await
}

fn socket_addr(s: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = s.as_sockaddr_in() {
        return Some(SocketAddr::V4(SocketAddrV4::from(*v4)));
    }
    s.as_sockaddr_in6().map(|v6| SocketAddr::V6(SocketAddrV6::from(*v6)))
}

/// A destination that can be a reply's source: not multicast, not the
/// broadcast address, not unspecified (IPv4-mapped ones judged as IPv4).
fn reply_source(ip: IpAddr) -> Option<IpAddr> {
    let usable = match ip {
        IpAddr::V4(v4) => !(v4.is_multicast() || v4.is_broadcast() || v4.is_unspecified()),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => !(v4.is_multicast() || v4.is_broadcast() || v4.is_unspecified()),
            None => !(v6.is_multicast() || v6.is_unspecified()),
        },
    };
    usable.then_some(ip)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_sources() {
        let ok = |s: &str| reply_source(s.parse().unwrap()).is_some();
        assert!(ok("127.0.0.2") && ok("::1") && ok("::ffff:127.0.0.2") && ok("fe80::1"));
        assert!(!ok("255.255.255.255") && !ok("224.0.0.1") && !ok("0.0.0.0"));
        assert!(!ok("::ffff:255.255.255.255") && !ok("ff02::1") && !ok("::"));
    }

    /// A wildcard socket learns the destination and replies from it, so a
    /// client connected to 127.0.0.2 accepts the reply (the kernel's own
    /// choice of source would be 127.0.0.1).
    #[tokio::test]
    async fn replies_come_from_the_address_written_to() {
        let server = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).unwrap();
        server.set_nonblocking(true).unwrap();
        server.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)).into()).unwrap();
        want_destination(&server, false).unwrap();
        let server = UdpSocket::from_std(server.into()).unwrap();
        let port = server.local_addr().unwrap().port();

        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        client.connect(("127.0.0.2", port)).await.unwrap();
        client.send(b"hello").await.unwrap();
        let mut buf = [0u8; 3];
        let got = recv(&server, &mut buf).await.unwrap();
        assert_eq!(got.from, client.local_addr().unwrap());
        assert_eq!(got.to, Some("127.0.0.2".parse().unwrap()));
        assert!(got.truncated && got.len == 3);

        send(&server, b"back", got.from, got.to).await.unwrap();
        let mut reply = [0u8; 16];
        let n =
            tokio::time::timeout(std::time::Duration::from_secs(5), client.recv(&mut reply)).await.unwrap().unwrap();
        assert_eq!(&reply[..n], b"back");
    }
}
