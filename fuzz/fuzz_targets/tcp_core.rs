//! The TCP NAT's sans-I/O core (`nat::tcp::TcpCore`) driven with arbitrary
//! guest segments and host events on a virtual clock: SYNs, ACKs, data,
//! FINs and RSTs from up to three guests over IPv4 and IPv6 (sequence
//! numbers either tracked, so handshakes complete and data flows, or the
//! input's own), raw junk packets, host connect results, host streams that
//! send, stall, close or fail, connections into a guest, and time moving on
//! so every timer fires. No sockets: the target plays the shell.
//! Checked after every step: the flow bounds hold, every frame the core
//! sends is a well-formed TCP segment to a guest address of the family it
//! came from, flows the core ended are gone, and nothing panics.
#![no_main]

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::task::Poll;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use rdnet_vnet::NetConfig;
use rdnet_vnet::nat::NatPolicy;
use rdnet_vnet::nat::tcp::{Arrival, ConnectResult, FlowId, GuestLink, HostStream, Step, TcpCore};
use smoltcp::wire::{IpAddress, IpProtocol, Ipv4Packet, Ipv6Packet, TcpControl, TcpPacket, TcpRepr, TcpSeqNumber};

const MAX_FLOWS: usize = 6;
const MTU: usize = 1500;
const PREFIX6: u128 = 0xfd5a_94ef_e40c_0000_0000_0000_0000_0000;

struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn u8(&mut self) -> u8 {
        let Some((&b, rest)) = self.0.split_first() else { return 0 };
        self.0 = rest;
        b
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    fn bytes(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a
    }
}

fn is_guest(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.octets()[..3] == [192, 168, 127],
        IpAddr::V6(v6) => u128::from(v6) >> 64 == PREFIX6 >> 64,
    }
}

fn guest_ip(six: bool, b: u8) -> IpAddr {
    if six {
        Ipv6Addr::from(PREFIX6 | u128::from(2 + b % 3)).into()
    } else {
        Ipv4Addr::new(192, 168, 127, 2 + b % 3).into()
    }
}

/// Destinations: the host alias, the gateway (DNS is served, 22 is not),
/// elsewhere, and ones the policy refuses.
fn remote(six: bool, b: u8) -> SocketAddr {
    let port = [80, 53, 22, 443][usize::from(b >> 4) % 4];
    let ip: IpAddr = match (six, b % 4) {
        (false, 0) => Ipv4Addr::new(192, 168, 127, 254).into(),
        (false, 1) => Ipv4Addr::new(192, 168, 127, 1).into(),
        (false, 2) => Ipv4Addr::new(10, 0, 0, 1).into(),
        (false, _) => Ipv4Addr::new(192, 168, 127, 9).into(),
        (true, 0) => Ipv6Addr::from(PREFIX6 | 0xfe).into(),
        (true, 1) => Ipv6Addr::from(PREFIX6 | 1).into(),
        (true, 2) => Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1).into(),
        (true, _) => Ipv4Addr::new(127, 0, 0, 1).to_ipv6_mapped().into(),
    };
    SocketAddr::new(ip, port)
}

/// The frames the core sends, checked as they come.
#[derive(Default)]
struct Link {
    /// The next byte each remote end will send a guest (learned from the
    /// core's segments): what a tracked guest acknowledges.
    peer_next: HashMap<(SocketAddr, SocketAddr), u32>,
    /// A junk packet is being handled: its answer (a RST) goes to whatever
    /// source it claims (the switch drops spoofed sources before the NAT).
    junk: bool,
}

impl GuestLink for Link {
    fn emit<R>(&mut self, dst: IpAddr, len: usize, fill: impl FnOnce(&mut [u8]) -> R) -> R {
        let mut packet = vec![0u8; len];
        let r = fill(&mut packet);
        assert!(self.junk || is_guest(dst), "a frame to someone outside: {dst}");
        let (src_ip, dst_ip, body): (IpAddress, IpAddress, &[u8]) = match packet[0] >> 4 {
            4 => {
                let ip = Ipv4Packet::new_checked(&packet[..]).expect("an IPv4 packet");
                (ip.src_addr().into(), ip.dst_addr().into(), &packet[usize::from(ip.header_len())..])
            }
            6 => {
                let ip = Ipv6Packet::new_checked(&packet[..]).expect("an IPv6 packet");
                assert_eq!(ip.next_header(), IpProtocol::Tcp);
                (ip.src_addr().into(), ip.dst_addr().into(), &packet[40..])
            }
            v => panic!("IP version {v}"),
        };
        assert_eq!(IpAddr::from(dst_ip), dst);
        let tcp = TcpPacket::new_checked(body).expect("a TCP segment");
        // Above the MTU only a large-frame guest gets it, and the checksum
        // is left to its offload.
        assert!(len > MTU || tcp.verify_checksum(&src_ip, &dst_ip), "TCP checksum");
        let key = (SocketAddr::new(dst_ip.into(), tcp.dst_port()), SocketAddr::new(src_ip.into(), tcp.src_port()));
        let used = tcp.payload().len() as u32 + u32::from(tcp.syn()) + u32::from(tcp.fin());
        self.peer_next.insert(key, (tcp.seq_number().0 as u32).wrapping_add(used));
        r
    }
}

/// One flow's scripted host stream.
#[derive(Default)]
struct Host {
    incoming: VecDeque<u8>,
    eof: bool,
    fail_read: bool,
    fail_write: bool,
    /// Bytes the host takes before it stalls.
    write_room: usize,
}

impl HostStream for Host {
    fn read(&mut self, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        if self.fail_read {
            return Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()));
        }
        if self.incoming.is_empty() {
            return if self.eof { Poll::Ready(Ok(0)) } else { Poll::Pending };
        }
        let n = buf.len().min(self.incoming.len());
        for (d, s) in buf.iter_mut().zip(self.incoming.drain(..n)) {
            *d = s;
        }
        Poll::Ready(Ok(n))
    }

    fn write(&mut self, buf: &[u8]) -> Poll<io::Result<usize>> {
        if self.fail_write {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        let n = buf.len().min(self.write_room);
        self.write_room -= n;
        if n == 0 { Poll::Pending } else { Poll::Ready(Ok(n)) }
    }

    fn shutdown_write(&mut self) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// A guest segment: tracked sequence numbers, or the input's.
fn segment(
    guest: SocketAddr,
    remote: SocketAddr,
    control: TcpControl,
    seq: u32,
    ack: Option<u32>,
    window: u16,
    payload: &[u8],
) -> Vec<u8> {
    let tcp = TcpRepr {
        src_port: guest.port(),
        dst_port: remote.port(),
        control,
        seq_number: TcpSeqNumber(seq as i32),
        ack_number: ack.map(|a| TcpSeqNumber(a as i32)),
        window_len: window,
        window_scale: (control == TcpControl::Syn).then_some(2),
        max_seg_size: (control == TcpControl::Syn).then_some(1460),
        sack_permitted: false,
        sack_ranges: [None; 3],
        timestamp: None,
        payload,
    };
    rdnet_wire::frame::ip_tcp_packet(guest.ip().into(), remote.ip().into(), &tcp)
}

fuzz_target!(|data: &[u8]| {
    let cfg = NetConfig::new("192.168.127.0/24".parse().unwrap(), MTU as u32)
        .unwrap()
        .with_ipv6(Some("fd5a:94ef:e40c::/64".parse().unwrap()))
        .unwrap();
    let policy = NatPolicy::new(&cfg, data.first().is_some_and(|b| b & 1 == 1));
    let mut input = Input(data.get(1..).unwrap_or_default());
    let mut now = Instant::now();
    let gateway6 = Ipv6Addr::from(PREFIX6 | 1);
    let mut core = TcpCore::new(now, cfg.gateway_ip, 24, Some((gateway6, 64)), MTU, MAX_FLOWS);
    core.add_service(53);
    let mut link = Link::default();
    // Connects the shell would be running, and flows it would be driving.
    let mut connecting: Vec<FlowId> = Vec::new();
    let mut open: Vec<(FlowId, Host)> = Vec::new();
    // A tracked guest's next sequence number per 4-tuple.
    let mut guest_next: HashMap<(SocketAddr, SocketAddr), u32> = HashMap::new();
    let mut steps = 0;
    while !input.0.is_empty() && steps < 400 {
        steps += 1;
        match input.u8() % 9 {
            0 | 1 => {
                let six = input.u8() & 1 == 1;
                let guest = SocketAddr::new(guest_ip(six, input.u8()), 40000 + u16::from(input.u8() % 4));
                let remote = remote(six, input.u8());
                let flags = input.u8();
                let control = match flags % 6 {
                    0 => TcpControl::Syn,
                    1 => TcpControl::Fin,
                    2 => TcpControl::Rst,
                    3 => TcpControl::Psh,
                    _ => TcpControl::None,
                };
                let len = usize::from(input.u8()) * usize::from(flags >> 6).pow(3);
                let payload = if control == TcpControl::Syn { Vec::new() } else { vec![0x61; len.min(1400)] };
                let key = (guest, remote);
                let tracked = flags & 0x20 == 0;
                let (seq, ack) = if tracked {
                    let seq = *guest_next.entry(key).or_insert(1000);
                    let ack = link.peer_next.get(&key).copied();
                    (seq, if control == TcpControl::Syn && ack.is_none() { None } else { ack })
                } else {
                    (input.u32(), (flags & 0x10 != 0).then(|| input.u32()))
                };
                let packet = segment(guest, remote, control, seq, ack, input.u16(), &payload);
                if tracked {
                    let used = payload.len() as u32 + u32::from(matches!(control, TcpControl::Syn | TcpControl::Fin));
                    guest_next.insert(key, seq.wrapping_add(used));
                }
                let port = u32::from(guest.ip().is_ipv6()) + 1;
                // Whether more frames of the same read follow: the ACK of
                // in-order data then waits for the flow's next drive.
                let arrival = Arrival { large_frames: flags & 0x08 != 0, more_follow: input.u8() & 1 != 0 };
                let outcome = core.guest_packet(now, port, &policy, &packet, arrival, &mut link);
                assert!(!outcome.malformed, "a well-formed segment taken for junk");
                if let Some(c) = outcome.connect {
                    assert!(c.give_up_at > now);
                    connecting.push(c.id);
                }
            }
            2 => {
                // Junk: any bytes, the version nibble the input's.
                let len = usize::from(input.u8());
                let mut packet = input.bytes(len).to_vec();
                if let Some(first) = packet.first_mut() {
                    *first = (*first & 0x0f) | if *first & 0x10 != 0 { 0x60 } else { 0x40 };
                }
                link.junk = true;
                let _ = core.guest_packet(now, 1, &policy, &packet, Arrival::default(), &mut link);
                link.junk = false;
            }
            3 => {
                if connecting.is_empty() {
                    continue;
                }
                let id = connecting.remove(usize::from(input.u8()) % connecting.len());
                let result = match input.u8() % 4 {
                    0 => ConnectResult::Failed(io::ErrorKind::ConnectionRefused.into()),
                    1 => ConnectResult::TimedOut,
                    _ => ConnectResult::Connected,
                };
                if core.connected(now, id, result, &mut link) == rdnet_vnet::nat::tcp::Connected::Run {
                    open.push((id, Host { write_room: usize::from(input.u16()), ..Host::default() }));
                }
            }
            4 | 5 => {
                if open.is_empty() {
                    continue;
                }
                let i = usize::from(input.u8()) % open.len();
                let mut yields = 0;
                loop {
                    let (id, host) = &mut open[i];
                    match core.drive(now, *id, host, &mut link) {
                        Step::Yield if yields < 64 => yields += 1,
                        Step::Done(_) => {
                            let id = *id;
                            open.remove(i);
                            // Gone from the core: a later drive finds nothing.
                            assert!(matches!(core.drive(now, id, &mut Host::default(), &mut link), Step::Done(_)));
                            break;
                        }
                        Step::Wait(Some(at)) => {
                            assert!(at >= now, "a wake-up in the past");
                            break;
                        }
                        _ => break,
                    }
                }
            }
            6 => {
                if open.is_empty() {
                    continue;
                }
                let i = usize::from(input.u8()) % open.len();
                let host = &mut open[i].1;
                match input.u8() % 6 {
                    0 => host.eof = true,
                    1 => host.fail_read = true,
                    2 => host.fail_write = true,
                    3 => host.write_room = host.write_room.saturating_add(usize::from(input.u16()) * 16),
                    _ => {
                        let n = usize::from(input.u16()) * 8;
                        host.incoming.extend(std::iter::repeat_n(0x62, n));
                    }
                }
            }
            7 => {
                // Time moves on, by up to ~65 s, then every flow runs.
                now += Duration::from_millis(u64::from(input.u16()));
                let mut i = 0;
                while i < open.len() {
                    let (id, host) = &mut open[i];
                    match core.drive(now, *id, host, &mut link) {
                        Step::Done(_) => {
                            open.remove(i);
                        }
                        _ => i += 1,
                    }
                }
            }
            _ => {
                let six = input.u8() & 1 == 1;
                let guest = SocketAddr::new(guest_ip(six, input.u8()), input.u16());
                if let Ok(id) = core.open_to_guest(now, guest) {
                    open.push((id, Host { write_room: usize::MAX, ..Host::default() }));
                }
            }
        }
        assert!(core.len() <= MAX_FLOWS, "{} flows", core.len());
        assert!(core.connecting() <= core.len(), "{} half-open of {}", core.connecting(), core.len());
    }
});
