//! IPv6 in the virtual network (issue 16), end to end: real guest kernels
//! behind our vm-switch take their address, route and DNS server from
//! host-switch's router advertisements; the gateway answers pings and DNS
//! over IPv6 (UDP and TCP); TCP and UDP reach the host's `::1` through the
//! host alias; guests reach each other; what cannot be routed is refused at
//! once; a rogue guest's neighbour discovery flood leaves the tables
//! bounded. Everything stays in the test's namespaces: host-switch's own
//! namespace has only `lo`.

use std::time::{Duration, Instant};

use rdnet_e2e::{DEVICE_MAC, GATEWAY_MAC, RawLink, World, bin, privileged, wait_until};
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    EthernetAddress, EthernetFrame, EthernetProtocol, EthernetRepr, Icmpv6Packet, Icmpv6Repr, IpProtocol, Ipv6Packet,
    Ipv6Repr, NdiscRepr,
};

const PREFIX: &str = "fd5a:94ef:e40c:0:";
const GATEWAY6: &str = "fd5a:94ef:e40c::1";
const HOST6: &str = "fd5a:94ef:e40c::fe";
const GATEWAY_LL: &str = "fe80::5894:efff:fee4:cdd";
/// What SLAAC gives the default device MAC (5a:94:ef:e4:0c:ee).
const GUEST6: &str = "fd5a:94ef:e40c:0:5894:efff:fee4:cee";
const GUEST2_MAC: &str = "5a:94:ef:e4:0c:01";
const GUEST2_6: &str = "fd5a:94ef:e40c:0:5894:efff:fee4:c01";

/// Guest `g`'s global IPv6 address once duplicate address detection has
/// passed (a tentative address is no source yet: the kernel would pick
/// `::1` for a ping of the gateway).
fn global_address(world: &World, g: usize) -> Option<String> {
    let text = world.guest(g).ns.stdout("ip", &["-6", "-o", "addr", "show", "dev", "eth0", "scope", "global"]);
    let line = text.lines().find(|l| !l.contains("tentative"))?;
    line.split_whitespace().skip_while(|w| *w != "inet6").nth(1).map(|a| a.split('/').next().unwrap_or(a).to_string())
}

/// A world whose guest `0` has its IPv4 lease and its SLAAC address.
fn dual_stack_world(host_flags: &[&str]) -> World {
    let mut world = World::new(host_flags);
    let g = world.add_guest(DEVICE_MAC, &[]);
    assert!(world.guest(g).wait_for_address(Duration::from_secs(20)).is_some(), "{}", world.logs());
    let mut addr = None;
    wait_until(Duration::from_secs(20), || {
        addr = global_address(&world, g);
        addr.is_some()
    });
    assert_eq!(addr.as_deref(), Some(GUEST6), "no SLAAC address\n{}", world.logs());
    world
}

#[test]
fn the_guest_kernel_takes_address_route_and_dns_from_our_advertisements() {
    if !privileged() {
        return;
    }
    let world = dual_stack_world(&[]);
    let ns = &world.guest(0).ns;
    let routes = ns.stdout("ip", &["-6", "route", "show", "default"]);
    assert!(routes.contains(&format!("via {GATEWAY_LL} dev eth0")), "{routes}\n{}", world.logs());
    let mtu = ns.stdout("cat", &["/proc/sys/net/ipv6/conf/eth0/mtu"]);
    assert_eq!(mtu.trim(), "1500");
    // resolv.conf: the DHCP server first, then the advertised IPv6 one.
    let mut text = String::new();
    let written = wait_until(Duration::from_secs(10), || {
        text = std::fs::read_to_string(&world.guest(0).resolv_conf).unwrap_or_default();
        text.contains(&format!("nameserver {GATEWAY6}"))
    });
    assert!(written, "{text}\n{}", world.logs());
    // No search list here (the host has none): nothing about it expires,
    // so nothing is logged or rewritten on every advertisement.
    let vm_logs = world.guest(0).vm_switch.as_ref().map(|p| p.logs()).unwrap_or_default();
    assert!(!vm_logs.contains("expired"), "{vm_logs}");
    let v4 = text.find("nameserver 192.168.127.1").expect("the IPv4 server stays");
    assert!(v4 < text.find(&format!("nameserver {GATEWAY6}")).unwrap_or(0), "{text}");
    // The gateway answers pings on its global and link-local addresses; the
    // host alias's come from the host's own ::1 (a real reply through an
    // ICMPv6 socket in host-switch's namespace).
    for target in [GATEWAY6, &format!("{GATEWAY_LL}%eth0"), HOST6] {
        let out = ns.exec("ping", &["-6", "-c", "2", "-i", "0.2", "-W", "2", target]);
        assert!(out.status.success(), "ping -6 {target}: {}\n{}", String::from_utf8_lossy(&out.stdout), world.logs());
    }
}

#[test]
fn dns_answers_over_ipv6_with_aaaa_for_the_gateways_names() {
    if !privileged() {
        return;
    }
    let world = dual_stack_world(&[]);
    let ns = &world.guest(0).ns;
    let dig = |args: &[&str]| {
        let mut a = vec![format!("@{GATEWAY6}"), "+short".into(), "+time=2".into(), "+tries=2".into()];
        a.extend(args.iter().map(|s| s.to_string()));
        ns.stdout("dig", &a).trim().to_string()
    };
    // Over IPv6 transport, the local zones: AAAA and A for the host alias,
    // over UDP and over TCP.
    assert_eq!(dig(&["AAAA", "host.rancher-desktop.internal"]), HOST6, "{}", world.logs());
    assert_eq!(dig(&["+tcp", "AAAA", "host.rancher-desktop.internal"]), HOST6, "{}", world.logs());
    assert_eq!(dig(&["A", "host.rancher-desktop.internal"]), "192.168.127.254");
    assert_eq!(dig(&["AAAA", "gateway.docker.internal"]), GATEWAY6);
    // Over IPv4, the same AAAA answer.
    let v4 = ns.stdout("dig", &["@192.168.127.1", "+short", "+time=2", "AAAA", "host.docker.internal"]);
    assert_eq!(v4.trim(), HOST6);
    // The guest's resolver, through the IPv6 server alone.
    let only6 = world.dir.join("resolv6.conf");
    std::fs::write(&only6, format!("nameserver {GATEWAY6}\n")).unwrap();
    let script =
        "import socket,sys; print(sorted({a[4][0] for a in socket.getaddrinfo('host.rancher-desktop.internal', 80)}))";
    let out = ns.exec(
        "unshare",
        &[
            "--mount",
            "sh",
            "-c",
            &format!("mount --bind {} /etc/resolv.conf && python3 -c \"{script}\"", only6.display()),
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("192.168.127.254") && text.contains(HOST6),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn two_guests_reach_each_other_over_ipv6() {
    if !privileged() {
        return;
    }
    let mut world = dual_stack_world(&[]);
    let g2 = world.add_guest(GUEST2_MAC, &[]);
    assert!(world.guest(g2).wait_for_address(Duration::from_secs(20)).is_some(), "{}", world.logs());
    assert!(wait_until(Duration::from_secs(20), || global_address(&world, g2).as_deref() == Some(GUEST2_6)));
    for (from, to) in [(0, GUEST2_6), (g2, GUEST6)] {
        let out = world.guest(from).ns.exec("ping", &["-6", "-c", "2", "-i", "0.2", "-W", "2", to]);
        assert!(out.status.success(), "{from} → {to}: {}\n{}", String::from_utf8_lossy(&out.stdout), world.logs());
    }
    // TCP between them over IPv6, through the switch.
    let server = world.guest(g2).ns.spawn(
        &world.dir,
        "python3",
        &["-c", "import socket; s=socket.create_server(('::',7070),family=socket.AF_INET6); c,_=s.accept(); c.sendall(c.recv(100).upper())"],
    );
    assert!(
        wait_until(Duration::from_secs(10), || rdnet_e2e::tcp_ready_in(&world.guest(g2).ns, 7070)),
        "{}",
        server.logs()
    );
    let got = world.guest_python(
        0,
        10,
        "import socket,sys; c=socket.create_connection((sys.argv[1],7070)); c.sendall(b'hello v6'); print(c.recv(100).decode())",
        &[GUEST2_6],
    );
    assert_eq!(got, "HELLO V6");
}

#[test]
fn a_destination_with_no_route_is_refused_at_once() {
    if !privileged() {
        return;
    }
    let world = dual_stack_world(&[]);
    // 2001:db8::/32 is documentation space: nothing routes it, and the
    // frames never leave host-switch, which refuses them.
    let out = world.guest_python(
        0,
        10,
        "import socket,time
t=time.monotonic()
try:
    socket.create_connection(('2001:db8::1', 80), timeout=5); print('connected')
except OSError as e:
    print(e.errno, round((time.monotonic()-t)*1000))",
        &[],
    );
    let mut words = out.split_whitespace();
    let errno: i32 = words.next().and_then(|w| w.parse().ok()).unwrap_or(0);
    let ms: u64 = words.next().and_then(|w| w.parse().ok()).unwrap_or(u64::MAX);
    assert!([libc::ENETUNREACH, libc::EHOSTUNREACH].contains(&errno), "{out}\n{}", world.logs());
    assert!(ms < 100, "took {ms} ms to be refused");
    // UDP too: the host has no route, so no socket; the guest hears "no
    // route" (Linux passes that non-fatal error to a UDP socket only with
    // IPV6_RECVERR, 25).
    let out = world.guest_python(
        0,
        10,
        "import socket
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); s.settimeout(3); s.connect(('2001:db8::1', 53))
s.setsockopt(socket.IPPROTO_IPV6, 25, 1)
s.send(b'x')
try:
    s.recv(100); print('answered')
except OSError as e:
    print(e.errno)",
        &[],
    );
    let errno: i32 = out.trim().parse().unwrap_or(0);
    assert!([libc::ENETUNREACH, libc::EHOSTUNREACH].contains(&errno), "{out}\n{}", world.logs());
}

#[test]
fn subnet6_empty_keeps_the_network_ipv4_only_and_a_bad_one_is_a_usage_error() {
    if !privileged() {
        return;
    }
    let mut world = World::new(&["--subnet6="]);
    let g = world.add_guest(DEVICE_MAC, &[]);
    assert!(world.guest(g).wait_for_address(Duration::from_secs(20)).is_some(), "{}", world.logs());
    // The guest asks (its kernel sends solicitations at link up); nobody answers.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(global_address(&world, g), None, "{}", world.logs());
    assert!(world.host_switch().logs().contains("subnet6=off"), "{}", world.logs());

    for bad in ["fd00::/48", "fe80::/64", "nonsense"] {
        let out = std::process::Command::new(bin("host-switch"))
            .args([format!("--subnet6={bad}"), "--listen=unix:///nonexistent/x".into()])
            .output()
            .expect("run host-switch");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{bad}: {err}");
        assert!(err.contains(&format!("invalid value \"{bad}\" for flag -subnet6")), "{err}");
    }
}

fn icmp_frame(src_mac: EthernetAddress, dst_mac: EthernetAddress, ip: Ipv6Repr, r: &Icmpv6Repr) -> Vec<u8> {
    let eth = EthernetRepr { src_addr: src_mac, dst_addr: dst_mac, ethertype: EthernetProtocol::Ipv6 };
    let mut f = vec![0u8; 14 + 40 + r.buffer_len()];
    eth.emit(&mut EthernetFrame::new_unchecked(&mut f[..]));
    ip.emit(&mut Ipv6Packet::new_unchecked(&mut f[14..]));
    r.emit(
        &ip.src_addr,
        &ip.dst_addr,
        &mut Icmpv6Packet::new_unchecked(&mut f[54..]),
        &ChecksumCapabilities::default(),
    );
    f
}

fn stats_field(world: &World, field: &str) -> u64 {
    let stats = world.guest(0).ns.stdout("curl", &["-s", "-m", "5", "http://192.168.127.1/stats"]);
    let at = stats.find(&format!("\"{field}\":")).unwrap_or_else(|| panic!("no {field} in {stats}"));
    stats[at + field.len() + 3..].chars().take_while(char::is_ascii_digit).collect::<String>().parse().unwrap_or(0)
}

#[test]
fn a_rogue_guests_neighbour_discovery_flood_leaves_tables_bounded() {
    if !privileged() {
        return;
    }
    let world = dual_stack_world(&[]);
    let mut rogue = RawLink::connect(&world.socket);
    // Whatever comes back (RAs, flooded multicast) is read, so the link never stalls.
    let mut back = rogue.try_clone();
    let drainer = std::thread::spawn(move || while back.recv(Duration::from_millis(500)).is_ok() {});
    let mac = EthernetAddress([0x02, 0xba, 0xd0, 0, 0, 1]);
    let gateway_mac = EthernetAddress(GATEWAY_MAC);
    let all_routers: std::net::Ipv6Addr = "ff02::2".parse().unwrap();
    let start = Instant::now();
    let mut sent = 0u32;
    for i in 0..20_000u32 {
        // A fresh source every time: link-local and in the prefix.
        let src: std::net::Ipv6Addr = if i % 2 == 0 {
            format!("fe80::{:x}:{:x}", i >> 16, i & 0xffff).parse().unwrap()
        } else {
            format!("{PREFIX}1:0:{:x}:{:x}", i >> 16, i & 0xffff).parse().unwrap()
        };
        let target: std::net::Ipv6Addr = format!("{PREFIX}ab:0:{:x}:{:x}", i >> 16, i & 0xffff).parse().unwrap();
        let frame = match i % 3 {
            0 => icmp_frame(
                mac,
                EthernetAddress([0x33, 0x33, 0, 0, 0, 2]),
                Ipv6Repr {
                    src_addr: src,
                    dst_addr: all_routers,
                    next_header: IpProtocol::Icmpv6,
                    payload_len: 16,
                    hop_limit: 255,
                },
                &Icmpv6Repr::Ndisc(NdiscRepr::RouterSolicit { lladdr: Some(mac.into()) }),
            ),
            1 => icmp_frame(
                mac,
                gateway_mac,
                Ipv6Repr {
                    src_addr: src,
                    dst_addr: GATEWAY6.parse().unwrap(),
                    next_header: IpProtocol::Icmpv6,
                    payload_len: 32,
                    hop_limit: 255,
                },
                &Icmpv6Repr::Ndisc(NdiscRepr::NeighborSolicit { target_addr: target, lladdr: Some(mac.into()) }),
            ),
            // Duplicate address detection of random addresses and of the guest's.
            _ => icmp_frame(
                mac,
                EthernetAddress([0x33, 0x33, 0xff, 0, 0, 1]),
                Ipv6Repr {
                    src_addr: std::net::Ipv6Addr::UNSPECIFIED,
                    dst_addr: "ff02::1:ff00:1".parse().unwrap(),
                    next_header: IpProtocol::Icmpv6,
                    payload_len: 24,
                    hop_limit: 255,
                },
                &Icmpv6Repr::Ndisc(NdiscRepr::NeighborSolicit {
                    target_addr: if i % 7 == 0 { GUEST6.parse().unwrap() } else { target },
                    lladdr: None,
                }),
            ),
        };
        if rogue.send(&frame).is_err() {
            break;
        }
        sent += 1;
    }
    assert!(sent > 10_000, "sent only {sent} in {:?}", start.elapsed());
    // The good guest kept its address (nobody answered its DAD for it) and works.
    assert_eq!(global_address(&world, 0).as_deref(), Some(GUEST6), "{}", world.logs());
    let ping = world.guest(0).ns.exec("ping", &["-6", "-c", "2", "-i", "0.2", "-W", "2", GATEWAY6]);
    assert!(ping.status.success(), "{}", world.logs());
    let neighbors = stats_field(&world, "ipv6_neighbors");
    assert!(neighbors <= 2 * 16, "{neighbors} IPv6 neighbours after the flood");
    let rss_kib = std::fs::read_to_string(format!("/proc/{}/status", world.host_switch.as_ref().unwrap().pid()))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("VmRSS:").map(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().unwrap_or(0))
        })
        .unwrap_or(0);
    assert!(rss_kib < 200 * 1024, "host-switch RSS {rss_kib} KiB");
    rogue.shutdown();
    let _ = drainer.join();
}

#[test]
fn queries_over_ipv6_reach_an_ipv6_upstream() {
    if !privileged() {
        return;
    }
    let world = dual_stack_world(&["--dns-upstream", "[::1]:5353"]);
    // The host's resolver, on ::1 only (host-switch's namespace has only lo).
    let pid = format!("--pid-file={}", world.dir.join("dnsmasq.pid").display());
    let dnsmasq = world.host.spawn(
        &world.dir,
        "dnsmasq",
        &[
            "--no-daemon",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--listen-address=::1",
            "--bind-interfaces",
            "--port=5353",
            "--log-facility=-",
            &pid,
            "--host-record=dual.example.test,10.9.8.7,fd00::987",
        ],
    );
    assert!(
        wait_until(Duration::from_secs(10), || rdnet_e2e::udp_ready_in(&world.host, 5353)),
        "dnsmasq: {}",
        dnsmasq.logs()
    );
    let ns = &world.guest(0).ns;
    for (qtype, want) in [("AAAA", "fd00::987"), ("A", "10.9.8.7")] {
        let got =
            ns.stdout("dig", &[&format!("@{GATEWAY6}"), "+short", "+time=2", "+tries=2", qtype, "dual.example.test"]);
        assert_eq!(got.trim(), want, "{qtype}\n{}\n{}", dnsmasq.logs(), world.logs());
    }
}

#[test]
fn udp_over_ipv6_reaches_the_hosts_loopback_through_the_host_alias() {
    if !privileged() {
        return;
    }
    let world = dual_stack_world(&[]);
    // An echo server on the host's ::1 only, answering in upper case.
    let server = world.host.spawn(
        &world.dir,
        "python3",
        &[
            "-c",
            "import socket; s=socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); s.bind(('::1', 7171))
while True:
    d, a = s.recvfrom(65536); s.sendto(d.upper(), a)",
        ],
    );
    assert!(wait_until(Duration::from_secs(10), || rdnet_e2e::udp_ready_in(&world.host, 7171)), "{}", server.logs());
    // Many datagrams each way, of several sizes up to what the link carries.
    let out = world.guest_python(
        0,
        20,
        "import socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); s.settimeout(2)
s.connect((sys.argv[1], 7171))
ok = 0
for i in range(200):
    n = [1, 100, 1000, 1452][i % 4]
    d = bytes([97 + i % 26]) * n
    s.send(d)
    try:
        r, a = s.recvfrom(65536)
    except socket.timeout:
        continue
    ok += r == d.upper() and a[0] == sys.argv[1]
print(ok)",
        &[HOST6],
    );
    let ok: u32 = out.parse().unwrap_or(0);
    assert!(ok >= 195, "{ok} of 200 echoes\n{}", world.logs());
    // A port nobody listens on: the guest hears ICMPv6 port unreachable.
    let refused = world.guest_python(
        0,
        10,
        "import socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); s.settimeout(3); s.connect((sys.argv[1], 7172))
s.send(b'x')
try:
    s.recv(100); print('answered')
except ConnectionRefusedError:
    print('refused')
except socket.timeout:
    print('timeout')",
        &[HOST6],
    );
    assert_eq!(refused, "refused", "{}", world.logs());
}

/// Serves `GET` of the file named by argv[2] and answers `PUT` with the
/// sha256 of the body, over HTTP on the host's `[::1]` only.
const HTTP6_SERVER: &str = r#"
import hashlib, http.server, socket, sys
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        with open(sys.argv[2], "rb") as f:
            data = f.read()
        self.send_response(200); self.send_header("Content-Length", str(len(data))); self.end_headers()
        self.wfile.write(data)
    def do_PUT(self):
        left = int(self.headers["Content-Length"]); h = hashlib.sha256()
        while left:
            b = self.rfile.read(min(left, 1 << 20))
            if not b: break
            h.update(b); left -= len(b)
        body = h.hexdigest().encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
class S(http.server.HTTPServer):
    address_family = socket.AF_INET6
S(("::1", int(sys.argv[1])), H).serve_forever()
"#;

#[test]
fn curl_over_ipv6_moves_64_mib_both_ways_to_the_hosts_loopback() {
    if !privileged() {
        return;
    }
    let world = dual_stack_world(&[]);
    // 64 MiB of bytes that are not all alike, and their digest.
    let blob = world.dir.join("blob");
    let mut data = Vec::with_capacity(64 << 20);
    let mut x: u32 = 1;
    while data.len() < 64 << 20 {
        x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        data.extend_from_slice(&x.to_le_bytes());
    }
    std::fs::write(&blob, &data).unwrap();
    let sum = |path: &std::path::Path| {
        let out = rdnet_e2e::run("sha256sum", &[path]);
        String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap_or_default().to_string()
    };
    let want = sum(&blob);
    let blob_arg = blob.display().to_string();
    let server = world.host.spawn(&world.dir, "python3", &["-c", HTTP6_SERVER, "18086", &blob_arg]);
    assert!(wait_until(Duration::from_secs(10), || rdnet_e2e::tcp_ready_in(&world.host, 18086)), "{}", server.logs());
    let ns = &world.guest(0).ns;
    let url = format!("http://[{HOST6}]:18086/blob");
    // Host → guest.
    let got = world.dir.join("got");
    let out = ns.exec("curl", &["-6", "-sS", "--fail", "-m", "60", "-o", &got.display().to_string(), &url]);
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stderr), world.logs());
    assert_eq!(sum(&got), want, "the download differs");
    // Guest → host.
    let out = ns.exec("curl", &["-6", "-sS", "--fail", "-m", "60", "-T", &blob_arg, &url]);
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stderr), world.logs());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), want, "the upload differs");
    // A port nobody listens on over IPv6: refused at once (RST).
    let start = Instant::now();
    let out = ns.exec("curl", &["-6", "-s", "-m", "5", &format!("http://[{HOST6}]:18099/")]);
    assert_eq!(out.status.code(), Some(7), "curl should fail to connect\n{}", world.logs());
    assert!(start.elapsed() < Duration::from_secs(1), "refusal took {:?}", start.elapsed());
    // Every flow gone once closed (but the one asking for /stats).
    assert!(wait_until(Duration::from_secs(5), || stats_field(&world, "tcp") <= 1), "{}", world.logs());
}
