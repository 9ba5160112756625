//! Writes the seed corpora under fuzz/corpus/<target>/ (committed; rerun
//! after a wire-format change): `cargo run --example make_seeds` in fuzz/.
//! Valid frames of each kind come from the real code: the DHCP client's
//! DISCOVER/REQUEST answered by the real gateway gives the DHCP seeds.

use std::fs;
use std::path::Path;
use std::time::Instant;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query};
use hickory_proto::rr::{Name, RecordType};
use rdnet_guest::dhcp_client::{ClientConfig, DhcpClient, Output};
use rdnet_link::codec::{Framing, encode_frame};
use rdnet_vnet::{NetConfig, Network, PortId};
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol, EthernetRepr, Icmpv4Packet,
    Icmpv4Repr, Icmpv6Packet, Icmpv6Repr, IpAddress, IpProtocol, Ipv4Address, Ipv4Packet, Ipv4Repr, Ipv6Address,
    Ipv6Packet, Ipv6Repr, NdiscRepr, TcpControl, TcpPacket, TcpRepr, TcpSeqNumber, UdpPacket, UdpRepr,
};

const GUEST_MAC: EthernetAddress = EthernetAddress([0x5a, 0x94, 0xef, 0xe4, 0x0c, 0xee]);
const GW_MAC: EthernetAddress = EthernetAddress([0x5a, 0x94, 0xef, 0xe4, 0x0c, 0xdd]);
const GUEST: Ipv4Address = Ipv4Address::new(192, 168, 127, 2);
const GW: Ipv4Address = Ipv4Address::new(192, 168, 127, 1);
const HOST: Ipv4Address = Ipv4Address::new(192, 168, 127, 254);

const GUEST6: Ipv6Address = Ipv6Address::new(0xfd5a, 0x94ef, 0xe40c, 0, 0x5894, 0xefff, 0xfee4, 0x0cee);
const LL: Ipv6Address = Ipv6Address::new(0xfe80, 0, 0, 0, 0x5894, 0xefff, 0xfee4, 0x0cee);
const GW6: Ipv6Address = Ipv6Address::new(0xfd5a, 0x94ef, 0xe40c, 0, 0, 0, 0, 1);
const ALL_ROUTERS: Ipv6Address = Ipv6Address::new(0xff02, 0, 0, 0, 0, 0, 0, 2);
const ALL_DHCP: Ipv6Address = Ipv6Address::new(0xff02, 0, 0, 0, 0, 0, 1, 2);
const SOLICITED: Ipv6Address = Ipv6Address::new(0xff02, 0, 0, 0, 0, 1, 0xffe4, 0x0cee);

fn multicast_mac(ip: Ipv6Address) -> EthernetAddress {
    let o = ip.octets();
    EthernetAddress([0x33, 0x33, o[12], o[13], o[14], o[15]])
}

fn ipv6(
    src: Ipv6Address,
    dst: Ipv6Address,
    mac: EthernetAddress,
    proto: IpProtocol,
    hop: u8,
    len: usize,
    fill: impl FnOnce(&mut [u8]),
) -> Vec<u8> {
    let ip = Ipv6Repr { src_addr: src, dst_addr: dst, next_header: proto, payload_len: len, hop_limit: hop };
    eth(mac, EthernetProtocol::Ipv6, 40 + len, |b| {
        ip.emit(&mut Ipv6Packet::new_unchecked(&mut *b));
        fill(&mut b[40..]);
    })
}

fn icmp6(src: Ipv6Address, dst: Ipv6Address, mac: EthernetAddress, hop: u8, r: &Icmpv6Repr) -> Vec<u8> {
    ipv6(src, dst, mac, IpProtocol::Icmpv6, hop, r.buffer_len(), |b| {
        r.emit(&src, &dst, &mut Icmpv6Packet::new_unchecked(b), &ChecksumCapabilities::default())
    })
}

fn udp6(src: Ipv6Address, dst: Ipv6Address, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mac = if dst.is_multicast() { multicast_mac(dst) } else { GW_MAC };
    let repr = UdpRepr { src_port: sport, dst_port: dport };
    ipv6(src, dst, mac, IpProtocol::Udp, 64, 8 + payload.len(), |b| {
        repr.emit(
            &mut UdpPacket::new_unchecked(b),
            &IpAddress::Ipv6(src),
            &IpAddress::Ipv6(dst),
            payload.len(),
            |p| p.copy_from_slice(payload),
            &ChecksumCapabilities::default(),
        )
    })
}

fn dhcp6_information_request() -> Vec<u8> {
    use dhcproto::Encodable;
    use dhcproto::v6::{DhcpOption, Message, MessageType};
    let mut m = Message::new_with_id(MessageType::InformationRequest, [1, 2, 3]);
    m.opts_mut().insert(DhcpOption::ClientId(vec![0, 3, 0, 1, 0x5a, 0x94, 0xef, 0xe4, 0x0c, 0xee]));
    m.to_vec().unwrap()
}

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus").join(target);
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join(name), bytes).unwrap();
}

fn framed(ctl: u8, frames: &[Vec<u8>]) -> Vec<u8> {
    let mut out = vec![ctl];
    for f in frames {
        encode_frame(Framing::U16Le, f, &mut out).unwrap();
    }
    out
}

fn eth(dst: EthernetAddress, proto: EthernetProtocol, payload_len: usize, fill: impl FnOnce(&mut [u8])) -> Vec<u8> {
    let repr = EthernetRepr { src_addr: GUEST_MAC, dst_addr: dst, ethertype: proto };
    let mut buf = vec![0u8; repr.buffer_len() + payload_len];
    let mut frame = EthernetFrame::new_unchecked(&mut buf);
    repr.emit(&mut frame);
    fill(frame.payload_mut());
    buf
}

fn ipv4(dst: Ipv4Address, proto: IpProtocol, payload_len: usize, fill: impl FnOnce(&mut [u8])) -> Vec<u8> {
    let ip = Ipv4Repr { src_addr: GUEST, dst_addr: dst, next_header: proto, payload_len, hop_limit: 64 };
    eth(GW_MAC, EthernetProtocol::Ipv4, ip.buffer_len() + payload_len, |b| {
        let mut p = Ipv4Packet::new_unchecked(b);
        ip.emit(&mut p, &ChecksumCapabilities::default());
        fill(p.payload_mut());
    })
}

fn udp(dst: Ipv4Address, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let repr = UdpRepr { src_port: sport, dst_port: dport };
    ipv4(dst, IpProtocol::Udp, 8 + payload.len(), |b| {
        let mut p = UdpPacket::new_unchecked(b);
        repr.emit(
            &mut p,
            &IpAddress::Ipv4(GUEST),
            &IpAddress::Ipv4(dst),
            payload.len(),
            |d| d.copy_from_slice(payload),
            &ChecksumCapabilities::default(),
        );
    })
}

fn tcp(dst: Ipv4Address, dport: u16, control: TcpControl, payload: &[u8]) -> Vec<u8> {
    let repr = TcpRepr {
        src_port: 40000,
        dst_port: dport,
        control,
        seq_number: TcpSeqNumber(1000),
        ack_number: (control != TcpControl::Syn).then_some(TcpSeqNumber(1)),
        window_len: 64240,
        window_scale: Some(7),
        max_seg_size: Some(1460),
        sack_permitted: true,
        sack_ranges: [None; 3],
        timestamp: None,
        payload,
    };
    ipv4(dst, IpProtocol::Tcp, repr.buffer_len(), |b| {
        let mut p = TcpPacket::new_unchecked(b);
        repr.emit(&mut p, &IpAddress::Ipv4(GUEST), &IpAddress::Ipv4(dst), &ChecksumCapabilities::default());
    })
}

fn ping(dst: Ipv4Address) -> Vec<u8> {
    let data = [0x42u8; 56];
    let repr = Icmpv4Repr::EchoRequest { ident: 7, seq_no: 1, data: &data };
    ipv4(dst, IpProtocol::Icmp, repr.buffer_len(), |b| {
        repr.emit(&mut Icmpv4Packet::new_unchecked(b), &ChecksumCapabilities::default());
    })
}

fn arp(target: Ipv4Address) -> Vec<u8> {
    let repr = ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Request,
        source_hardware_addr: GUEST_MAC,
        source_protocol_addr: GUEST,
        target_hardware_addr: EthernetAddress([0; 6]),
        target_protocol_addr: target,
    };
    eth(EthernetAddress::BROADCAST, EthernetProtocol::Arp, repr.buffer_len(), |b| {
        repr.emit(&mut ArpPacket::new_unchecked(b))
    })
}

fn dns_query(name: &str, rtype: RecordType, edns: bool) -> Vec<u8> {
    let mut m = Message::new(0x1234, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
    if edns {
        let mut e = Edns::new();
        e.set_max_payload(1232);
        m.set_edns(e);
    }
    m.to_vec().unwrap()
}

/// The DHCP exchange between the real client and the real gateway: the
/// client's DISCOVER and REQUEST, the server's OFFER and ACK.
fn dhcp_exchange() -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let now = Instant::now();
    let mut net = Network::new(NetConfig::new("192.168.127.0/24".parse().unwrap(), 1500).unwrap());
    let port = net.add_port();
    let mut cfg = ClientConfig::new(GUEST_MAC.0);
    cfg.seed = 7;
    cfg.hostname = Some("fuzz".into());
    let mut client = DhcpClient::new(cfg, now);
    client.handle_timeout(now);
    let (mut sent, mut replies) = (Vec::new(), Vec::new());
    for _ in 0..4 {
        let mut out: Vec<(PortId, Vec<u8>)> = Vec::new();
        while let Some(o) = client.poll_output() {
            if let Output::Transmit(f) = o {
                net.handle_frame(port, &f, now, &mut out);
                sent.push(f);
            }
        }
        for (_, f) in out {
            client.handle_frame(now, &f);
            replies.push(f);
        }
    }
    assert!(client.lease().is_some(), "the seed exchange did not end in a lease");
    (sent, replies)
}

fn main() {
    // link_codec: control byte (framing, max, chunk size), then a stream.
    let mut stream = vec![0x18u8];
    for len in [60usize, 1514, 1] {
        encode_frame(Framing::U16Le, &vec![0xabu8; len], &mut stream).unwrap();
    }
    write("link_codec", "u16le-three", &stream);
    let mut stream = vec![0x05u8];
    encode_frame(Framing::U32Be, &[1u8; 100], &mut stream).unwrap();
    stream.extend_from_slice(&[0, 0, 0x10]);
    write("link_codec", "u32be-truncated", &stream);
    write("link_codec", "u16le-zero-length", &[0x00, 0x02, 0x00, 1, 2, 0x00, 0x00]);
    write("link_codec", "u16le-too-long", &[0x00, 0xff, 0xff, 0]);

    let (dhcp_sent, dhcp_replies) = dhcp_exchange();

    // network_frames: control 0x05 = fix checksums, time step 1 s.
    let frames = vec![
        ("arp-gateway", vec![arp(GW)]),
        ("arp-host-alias", vec![arp(HOST)]),
        ("icmp-gateway", vec![arp(GW), ping(GW)]),
        ("icmp-host-alias", vec![ping(HOST)]),
        ("udp-dns", vec![udp(GW, 5353, 53, &dns_query("gateway.rancher-desktop.internal.", RecordType::A, false))]),
        ("udp-nat", vec![udp(HOST, 40000, 9999, b"hello")]),
        ("tcp-syn", vec![tcp(HOST, 80, TcpControl::Syn, &[])]),
        ("tcp-api", vec![tcp(GW, 80, TcpControl::Syn, &[]), tcp(GW, 80, TcpControl::Psh, b"GET / HTTP/1.1\r\n\r\n")]),
        ("dhcp", dhcp_sent.clone()),
        (
            "ipv6-router-solicit",
            vec![icmp6(
                LL,
                ALL_ROUTERS,
                multicast_mac(ALL_ROUTERS),
                255,
                &Icmpv6Repr::Ndisc(NdiscRepr::RouterSolicit { lladdr: Some(GUEST_MAC.into()) }),
            )],
        ),
        (
            "ipv6-neighbor-solicit",
            vec![icmp6(
                LL,
                GW6,
                GW_MAC,
                255,
                &Icmpv6Repr::Ndisc(NdiscRepr::NeighborSolicit { target_addr: GW6, lladdr: Some(GUEST_MAC.into()) }),
            )],
        ),
        (
            "ipv6-dad",
            vec![icmp6(
                Ipv6Address::UNSPECIFIED,
                SOLICITED,
                multicast_mac(SOLICITED),
                255,
                &Icmpv6Repr::Ndisc(NdiscRepr::NeighborSolicit { target_addr: GUEST6, lladdr: None }),
            )],
        ),
        (
            "ipv6-ping-gateway",
            vec![icmp6(GUEST6, GW6, GW_MAC, 64, &Icmpv6Repr::EchoRequest { ident: 1, seq_no: 1, data: b"ping" })],
        ),
        (
            "ipv6-ping-away",
            vec![icmp6(
                GUEST6,
                Ipv6Address::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1),
                GW_MAC,
                64,
                &Icmpv6Repr::EchoRequest { ident: 1, seq_no: 1, data: b"ping" },
            )],
        ),
        ("ipv6-dhcp-information-request", vec![udp6(LL, ALL_DHCP, 546, 547, &dhcp6_information_request())]),
        (
            "ipv6-dns",
            vec![udp6(GUEST6, GW6, 5353, 53, &dns_query("host.rancher-desktop.internal.", RecordType::AAAA, false))],
        ),
    ];
    for (name, fs) in frames {
        write("network_frames", name, &framed(0x05, &fs));
    }

    // dhcp_client: control 0x07 = patch xid, follow timers, 100 ms steps.
    write("dhcp_client", "offer-ack", &framed(0x07, &dhcp_replies));
    write("dhcp_client", "offer-ack-raw", &framed(0x00, &dhcp_replies));
    if let Some(offer) = dhcp_replies.first() {
        write("dhcp_client", "offer", &framed(0x01, std::slice::from_ref(offer)));
    }

    // dns_query: wire-format queries.
    write("dns_query", "a-local", &dns_query("gateway.rancher-desktop.internal.", RecordType::A, false));
    write("dns_query", "aaaa-local", &dns_query("host.docker.internal.", RecordType::AAAA, true));
    write("dns_query", "a-regexp", &dns_query("db12.example.internal.", RecordType::A, false));
    write("dns_query", "nx-local", &dns_query("nope.docker.internal.", RecordType::TXT, false));
    write("dns_query", "forward", &dns_query("example.com.", RecordType::MX, true));
    write("dns_query", "header-only", &[0x12, 0x34, 0x01, 0, 0, 1, 0, 0, 0, 0, 0, 0]);

    // api_json: request bodies.
    for (name, body) in [
        ("expose", r#"{"local":"127.0.0.1:6443","remote":"192.168.127.2:6443","protocol":"tcp"}"#),
        ("expose-empty-host", r#"{"local":":8080","remote":":80","protocol":"udp"}"#),
        ("expose-unix", r#"{"local":"/tmp/x.sock","remote":"tcp://192.168.127.2:22","protocol":"unix"}"#),
        ("unexpose", r#"{"local":"127.0.0.1:6443","protocol":"tcp"}"#),
        ("wrong-type", r#"{"Local":1,"REMOTE":null,"protoco\u006c":"tcp"} trailing"#),
        (
            "zone",
            r#"{"Name":"example.internal.","Records":[{"Name":"db","IP":"192.168.127.9"},{"Regexp":"^x.*$"}],"DefaultIP":"10.0.0.1"}"#,
        ),
    ] {
        write("api_json", name, body.as_bytes());
    }

    // wsl_mapping: guest agent messages.
    for (name, body) in [
        (
            "publish",
            r#"{"remove":false,"ports":{"6443/tcp":[{"HostIp":"127.0.0.1","HostPort":"6443"}]},"connectAddrs":null}"#,
        ),
        (
            "remove-udp",
            r#"{"remove":true,"ports":{"53/UDP":[{"HostIp":"","HostPort":"5353"},{"HostIp":"::1","HostPort":53}]}}"#,
        ),
        ("null-ports", r#"{"remove":false,"ports":null}"#),
        ("two-messages", r#"{"remove":false,"ports":{}}{"remove":true}"#),
    ] {
        write("wsl_mapping", name, body.as_bytes());
    }
    println!("seed corpora written");
}
