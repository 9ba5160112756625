//! The NAT's sans-I/O cores (UDP: `nat::udp::UdpCore`, ICMP echo:
//! `nat::icmp::IcmpCore`) driven with arbitrary guest packets and host
//! events on a virtual clock: guest datagrams and pings, whether the shell
//! could open a socket, send results, datagrams a host socket read (any
//! bytes, any length), host errors and failures, the ICMP API's outcomes,
//! and time moving on so flows expire. No sockets are opened: the cores
//! only say what a shell should do, and the target plays the shell.
//! Checked after every step: the flow bounds hold, the idle deadline is
//! there exactly when flows are, replies go to the guest that sent, and
//! nothing panics. Guests use IPv4 or IPv6 by the input's choice. The TCP
//! core is not in here yet (issue 15).
#![no_main]

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use rdnet_vnet::NetConfig;
use rdnet_vnet::nat::NatPolicy;
use rdnet_vnet::nat::icmp::{self, ApiEcho, ApiOutcome, IcmpCore, Mode, Request};
use rdnet_vnet::nat::udp::{FlowId, Route, UdpCore};

const MAX_UDP_FLOWS: usize = 4;
const UDP_IDLE: Duration = Duration::from_secs(90);

/// Reads the input a byte or a u16 at a time; zeros once it runs out.
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
    fn bytes(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a
    }
    fn pick<T: Copy>(&mut self, items: &[T]) -> Option<T> {
        (!items.is_empty()).then(|| items[usize::from(self.u8()) % items.len()])
    }
}

/// Addresses a guest may send to: the host alias, others the policy
/// refuses or passes, by the input's choice.
fn address(b: u8) -> Ipv4Addr {
    match b % 6 {
        0 => Ipv4Addr::new(192, 168, 127, 254),
        1 => Ipv4Addr::new(192, 168, 127, 1),
        2 => Ipv4Addr::BROADCAST,
        3 => Ipv4Addr::new(169, 254, 169, 254),
        4 => Ipv4Addr::new(10, 0, 0, b),
        _ => Ipv4Addr::new(192, 168, 127, b),
    }
}

const PREFIX6: u128 = 0xfd5a_94ef_e40c_0000_0000_0000_0000_0000;

/// The IPv6 twins: the host alias, the gateway, multicast, link-local,
/// elsewhere, IPv4-mapped, and the network's own prefix.
fn address6(b: u8) -> Ipv6Addr {
    match b % 7 {
        0 => Ipv6Addr::from(PREFIX6 | 0xfe),
        1 => Ipv6Addr::from(PREFIX6 | 1),
        2 => Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1),
        3 => Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, u16::from(b)),
        4 => Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, u16::from(b)),
        5 => Ipv4Addr::new(10, 0, 0, b).to_ipv6_mapped(),
        _ => Ipv6Addr::from(PREFIX6 | u128::from(b)),
    }
}

/// A guest address and a destination, of one family chosen by `six`.
fn pair(six: bool, guest: u8, dst: u8) -> (IpAddr, IpAddr) {
    if six {
        (Ipv6Addr::from(PREFIX6 | u128::from(2 + guest % 3)).into(), address6(dst).into())
    } else {
        (Ipv4Addr::new(192, 168, 127, 2 + guest % 3).into(), address(dst).into())
    }
}

/// Whether `ip` is a guest's: in the IPv4 subnet or the IPv6 prefix.
fn is_guest(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.octets()[..3] == [192, 168, 127],
        IpAddr::V6(v6) => u128::from(v6) >> 64 == PREFIX6 >> 64,
    }
}

fn send_result(b: u8) -> io::Result<()> {
    match b % 4 {
        0 | 1 => Ok(()),
        2 => Err(io::ErrorKind::ConnectionRefused.into()),
        _ => Err(io::ErrorKind::WouldBlock.into()),
    }
}

fuzz_target!(|data: &[u8]| {
    let cfg = NetConfig::new("192.168.127.0/24".parse().unwrap(), 1500)
        .unwrap()
        .with_ipv6(Some("fd5a:94ef:e40c::/64".parse().unwrap()))
        .unwrap();
    let policy = NatPolicy::new(&cfg, data.first().is_some_and(|b| b & 1 == 1));
    let mut input = Input(data.get(1..).unwrap_or_default());
    let mut now = Instant::now();
    let mut udp = UdpCore::new(MAX_UDP_FLOWS, UDP_IDLE, 1500);
    let mut udp_ids: Vec<FlowId> = Vec::new();
    let mut icmp = IcmpCore::new();
    let mut icmp_ids: Vec<icmp::FlowId> = Vec::new();
    let mut waiting: Vec<ApiEcho> = Vec::new();
    let mut steps = 0;
    while !input.0.is_empty() && steps < 512 {
        steps += 1;
        match input.u8() % 10 {
            0 => {
                let six = input.u8() % 2 == 1;
                let (src_ip, dst_ip) = pair(six, input.u8(), input.u8());
                let src = SocketAddr::new(src_ip, input.u16());
                let dst = SocketAddr::new(dst_ip, input.u16());
                let len = usize::from(input.u16() % 2048);
                let id = match udp.route_guest(now, &policy, src, dst) {
                    Route::Refused => continue,
                    Route::Flow(id) => id,
                    Route::Open { id, target } => {
                        assert_eq!(target.port(), dst.port());
                        if input.u8() % 8 == 0 {
                            udp.open_failed(now, (src, dst), target, &io::Error::other("fuzz"));
                            continue;
                        }
                        for gone in udp.opened(now, (src, dst), id) {
                            udp_ids.retain(|&i| i != gone);
                        }
                        udp_ids.push(id);
                        id
                    }
                };
                if let Some(icmp) = udp.sent(now, id, len, send_result(input.u8())) {
                    assert!(icmp.len() >= 20 + 8 + 28);
                    assert_eq!(icmp[0] >> 4, if six { 6 } else { 4 });
                    udp.port_unreachable_sent();
                }
            }
            1 => {
                let Some(id) = input.pick(&udp_ids) else { continue };
                let len = usize::from(input.u16());
                if let Some((from, to)) = udp.host_datagram(now, id, len) {
                    assert!(len <= 1500 - if to.is_ipv6() { 48 } else { 28 });
                    assert!(is_guest(to.ip()), "a reply to someone outside: {to}");
                    assert_eq!(from.is_ipv6(), to.is_ipv6());
                }
            }
            2 => {
                let Some(id) = input.pick(&udp_ids) else { continue };
                match input.u8() % 3 {
                    0 => {
                        let _ = udp.host_refused(id);
                    }
                    1 => udp.host_error(now, id, &io::Error::other("fuzz")),
                    _ => {
                        if udp.host_failed(id) {
                            udp_ids.retain(|&i| i != id);
                        }
                    }
                }
            }
            3 => {
                now += Duration::from_secs(u64::from(input.u8()));
                for gone in udp.expire(now) {
                    assert!(udp_ids.contains(&gone));
                    udp_ids.retain(|&i| i != gone);
                }
                for gone in icmp.expire(now) {
                    assert!(icmp_ids.contains(&gone));
                    icmp_ids.retain(|&i| i != gone);
                }
                // What is left is not idle yet.
                assert!(udp.next_deadline().is_none_or(|d| d > now));
                assert!(icmp.next_deadline().is_none_or(|d| d > now));
            }
            4 | 5 => {
                let six = input.u8() % 2 == 1;
                let (src, dst) = pair(six, input.u8(), input.u8());
                let use_api = input.u8() % 4 == 0;
                let len = usize::from(input.u8());
                let packet = input.bytes(len).to_vec();
                match icmp.guest_packet(now, &policy, (src, dst), &packet, use_api) {
                    Request::Drop => {}
                    Request::Send { id, icmp: msg } => {
                        assert!(icmp_ids.contains(&id));
                        assert!(msg.len() >= 8);
                        icmp.sent(now, id, send_result(input.u8()));
                    }
                    Request::Open { id, icmp: msg, .. } => {
                        assert!(msg.len() >= 8);
                        let ident = u16::from_be_bytes([msg[4], msg[5]]);
                        if input.u8() % 8 == 0 {
                            icmp.open_failed(now, (src, dst, ident), dst, &io::Error::other("fuzz"));
                            continue;
                        }
                        let mode = if input.u8() % 2 == 0 { Mode::Ping } else { Mode::Raw };
                        for gone in icmp.opened(now, (src, dst, ident), id, mode) {
                            icmp_ids.retain(|&i| i != gone);
                        }
                        icmp_ids.push(id);
                    }
                    Request::Api { echo, .. } => {
                        assert!(use_api);
                        waiting.push(echo);
                    }
                }
            }
            6 | 7 => {
                let Some(id) = input.pick(&icmp_ids) else { continue };
                let len = usize::from(input.u8());
                let bytes = input.bytes(len).to_vec();
                if let Some(reply) = icmp.host_datagram(now, id, &bytes) {
                    assert!(reply.len() >= 28);
                    let to: IpAddr = match reply[0] >> 4 {
                        6 => Ipv6Addr::from(<[u8; 16]>::try_from(&reply[24..40]).unwrap()).into(),
                        _ => Ipv4Addr::from(<[u8; 4]>::try_from(&reply[16..20]).unwrap()).into(),
                    };
                    assert!(is_guest(to), "a reply to someone outside: {to}");
                }
                if input.u8() % 16 == 0 && icmp.host_failed(id) {
                    icmp_ids.retain(|&i| i != id);
                }
            }
            8 => {
                if waiting.is_empty() {
                    continue;
                }
                let echo = waiting.swap_remove(usize::from(input.u8()) % waiting.len());
                let outcome = match input.u8() % 3 {
                    0 => ApiOutcome::Reply(input.bytes(16).to_vec()),
                    1 => ApiOutcome::NoReply(11010),
                    _ => ApiOutcome::Failed(io::Error::other("fuzz")),
                };
                let _ = icmp.api_done(now, echo, outcome);
            }
            _ => now += Duration::from_millis(u64::from(input.u16())),
        }
        assert!(udp.len() <= MAX_UDP_FLOWS);
        assert_eq!(udp.len(), udp_ids.len());
        assert_eq!(udp.next_deadline().is_some(), !udp.is_empty());
        assert!(icmp.len() <= icmp::MAX_FLOWS + icmp::MAX_IN_FLIGHT);
        assert_eq!(icmp.len(), icmp_ids.len() + waiting.len());
    }
});
