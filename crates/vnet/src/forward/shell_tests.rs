//! UDP port forwards into an IPv6 guest through a whole engine, without
//! root: the test is the VM (a socketpair carrying u16-LE frames) and the
//! host client a socket on this process's loopback. What the end-to-end
//! test cannot easily show: a reply from the wrong guest port is dropped,
//! a datagram sent before the gateway knows the guest's MAC still arrives
//! (the retries), and a network without IPv6 drops without opening a flow.

use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6};
use std::rc::Rc;
use std::time::Duration;

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    EthernetAddress, EthernetFrame, EthernetProtocol, IpAddress, IpProtocol, Ipv6Packet, Ipv6Repr, UdpPacket, UdpRepr,
};
use tokio::net::UdpSocket;

use crate::NetConfig;
use crate::config::DEFAULT_SUBNET6;
use crate::shell::test_vm::{TestVm, run_engine};
use crate::shell::{Engine, EngineConfig};

const GUEST_MAC: EthernetAddress = EthernetAddress([0x02, 0, 0, 0, 0, 0x02]);

fn guest6() -> Ipv6Addr {
    "fd5a:94ef:e40c::2".parse().unwrap()
}

fn gateway6() -> Ipv6Addr {
    "fd5a:94ef:e40c::1".parse().unwrap()
}

struct Vm(TestVm);

impl Vm {
    fn connect(engine: &Rc<Engine>) -> Vm {
        Vm(TestVm::connect(engine))
    }

    async fn send_udp6(&mut self, src: SocketAddrV6, dst: SocketAddrV6, payload: &[u8]) {
        let udp = UdpRepr { src_port: src.port(), dst_port: dst.port() };
        let ip = Ipv6Repr {
            src_addr: *src.ip(),
            dst_addr: *dst.ip(),
            next_header: IpProtocol::Udp,
            payload_len: 8 + payload.len(),
            hop_limit: 64,
        };
        let mut frame = Vec::new();
        rdnet_wire::frame::ethernet(
            &mut frame,
            GUEST_MAC,
            self.0.gateway_mac,
            EthernetProtocol::Ipv6,
            40 + ip.payload_len,
            |b| {
                ip.emit(&mut Ipv6Packet::new_unchecked(&mut *b));
                udp.emit(
                    &mut UdpPacket::new_unchecked(&mut b[40..]),
                    &IpAddress::Ipv6(*src.ip()),
                    &IpAddress::Ipv6(*dst.ip()),
                    payload.len(),
                    |p| p.copy_from_slice(payload),
                    &ChecksumCapabilities::default(),
                );
            },
        );
        self.0.send_frame(&frame).await;
    }

    /// The next UDP/IPv6 datagram to the guest within `wait` (other frames
    /// skipped): (source, destination, payload).
    async fn recv_udp6(&mut self, wait: Duration) -> Option<(SocketAddrV6, SocketAddrV6, Vec<u8>)> {
        self.0
            .recv_within(wait, |frame| {
                let eth = EthernetFrame::new_checked(frame).ok()?;
                if eth.ethertype() != EthernetProtocol::Ipv6 || eth.dst_addr() != GUEST_MAC {
                    return None;
                }
                let ip = Ipv6Packet::new_checked(eth.payload()).ok()?;
                if ip.next_header() != IpProtocol::Udp {
                    return None;
                }
                let udp = UdpPacket::new_checked(ip.payload()).ok()?;
                let (src, dst) = (ip.src_addr(), ip.dst_addr());
                assert!(udp.verify_checksum(&IpAddress::Ipv6(src), &IpAddress::Ipv6(dst)));
                Some((
                    SocketAddrV6::new(src, udp.src_port(), 0, 0),
                    SocketAddrV6::new(dst, udp.dst_port(), 0, 0),
                    udp.payload().to_vec(),
                ))
            })
            .await
    }
}

fn run(ipv6: bool, test: impl AsyncFnOnce(Rc<Engine>)) {
    let mut cfg = NetConfig::new("192.168.127.0/24".parse().unwrap(), 1500).unwrap();
    if ipv6 {
        cfg = cfg.with_ipv6(Some(DEFAULT_SUBNET6.parse().unwrap())).unwrap();
    }
    run_engine(cfg, EngineConfig::default(), test);
}

/// Exposes a UDP forward from a free loopback port to `remote`; returns
/// the host address to send to.
fn expose_udp(engine: &Rc<Engine>, remote: &str) -> SocketAddr {
    let free = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    engine.forwarder.expose(engine, "udp", &free.to_string(), remote).unwrap();
    free
}

async fn recv_within(socket: &UdpSocket, wait: Duration) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 2048];
    let n = tokio::time::timeout(wait, socket.recv(&mut buf)).await.ok()?.ok()?;
    buf.truncate(n);
    Some(buf)
}

#[test]
fn an_ipv6_guest_answers_through_the_forward_and_only_from_its_target() {
    run(true, async |engine| {
        let mut vm = Vm::connect(&engine);
        let target = SocketAddrV6::new(guest6(), 7, 0, 0);
        let local = expose_udp(&engine, &format!("[{}]:7", guest6()));
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        client.connect(local).await.unwrap();

        // Sent before the gateway has seen the guest's address: it waits.
        client.send(b"ping").await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(vm.recv_udp6(Duration::from_millis(10)).await.is_none());
        // Any datagram from the guest teaches the gateway its MAC (this one
        // goes to a gateway port no flow uses: not for us).
        let before = engine.net.borrow().stats.drops.not_for_us;
        vm.send_udp6(target, SocketAddrV6::new(gateway6(), 9, 0, 0), b"hello").await;
        let (src, dst, payload) = vm.recv_udp6(Duration::from_secs(3)).await.expect("the retried datagram");
        assert_eq!((*src.ip(), dst, payload.as_slice()), (gateway6(), target, &b"ping"[..]));
        assert!(super::UDP_PORTS.contains(&src.port()), "{src}");
        assert_eq!(engine.net.borrow().stats.drops.not_for_us, before + 1);

        // The target's reply reaches the client.
        vm.send_udp6(target, src, b"pong").await;
        assert_eq!(recv_within(&client, Duration::from_secs(3)).await.as_deref(), Some(&b"pong"[..]));
        // Another port of the same guest may not answer for it.
        vm.send_udp6(SocketAddrV6::new(guest6(), 8, 0, 0), src, b"forged").await;
        assert_eq!(recv_within(&client, Duration::from_millis(200)).await, None);

        // Once the MAC is known, no waiting.
        client.send(b"again").await.unwrap();
        let (src2, _, payload) = vm.recv_udp6(Duration::from_secs(1)).await.expect("a datagram");
        assert_eq!((src2, payload.as_slice()), (src, &b"again"[..]));

        let stats = engine.forwarder.stats();
        assert_eq!(
            (stats.udp_flows_opened, stats.udp_datagrams_in, stats.udp_datagrams_out, stats.udp_dropped),
            (1, 2, 1, 1),
            "{stats:?}"
        );
        assert_eq!(engine.forwarder.udp_flows(), 1);
        engine.forwarder.close_all();
        assert_eq!(engine.forwarder.udp_flows(), 0);
    });
}

#[test]
fn an_ipv6_guest_on_a_network_without_ipv6_is_dropped_without_a_flow() {
    run(false, async |engine| {
        let _vm = Vm::connect(&engine);
        let local = expose_udp(&engine, &format!("[{}]:7", guest6()));
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        client.send_to(b"ping", local).await.unwrap();
        let dropped = async {
            while engine.forwarder.stats().udp_dropped == 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(3), dropped).await.expect("the datagram is dropped");
        let stats = engine.forwarder.stats();
        assert_eq!((stats.udp_flows_opened, stats.udp_datagrams_in), (0, 0), "{stats:?}");
        assert_eq!(engine.forwarder.udp_flows(), 0);
        engine.forwarder.close_all();
    });
}
