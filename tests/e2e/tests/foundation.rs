//! Issue 2's end-to-end checks: DHCP both ends, the switch, ARP/ICMP,
//! busybox udhcpc against our server, junk on the link.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::Duration;

use rdnet_e2e::{DEVICE_MAC, GATEWAY, World, bin, privileged, wait_until};

const LEASE_WAIT: Duration = Duration::from_secs(20);

#[test]
fn guest_gets_lease_route_mtu_dns_and_pings_gateway() {
    if !privileged() {
        return;
    }
    let mut world = World::new(&[]);
    let g = world.add_guest(DEVICE_MAC, &[]);
    let guest = world.guest(g);
    let addr = guest.wait_for_address(LEASE_WAIT);
    assert_eq!(addr.as_deref(), Some("192.168.127.2/24"), "{}", world.logs());

    let routes = guest.ns.stdout("ip", &["-4", "route", "show", "default"]);
    assert!(routes.contains("default via 192.168.127.1 dev eth0"), "routes: {routes}\n{}", world.logs());
    let link = guest.ns.stdout("ip", &["-o", "link", "show", "dev", "eth0"]);
    assert!(link.contains("mtu 1500"), "{link}");
    assert!(link.contains(DEVICE_MAC), "{link}");

    let mut resolv = String::new();
    assert!(
        wait_until(Duration::from_secs(5), || {
            resolv = std::fs::read_to_string(&guest.resolv_conf).unwrap_or_default();
            resolv.contains("nameserver 192.168.127.1")
        }),
        "resolv.conf: {resolv:?}\n{}",
        world.logs()
    );
    assert!(guest.ping(GATEWAY), "ping gateway failed\n{}", world.logs());
    // The host alias answers ARP at the gateway's MAC.
    let neigh = guest.ns.exec("ping", &["-c", "1", "-W", "1", "192.168.127.254"]);
    let _ = neigh; // the NAT answers pings later; ARP must resolve regardless
    let n = guest.ns.stdout("ip", &["neigh", "show", "192.168.127.254"]);
    assert!(n.contains("5a:94:ef:e4:0c:dd"), "neighbour entry: {n}");
    assert!(world.host_switch().try_wait().is_none(), "host-switch exited");
}

#[test]
fn mtu_flag_is_announced() {
    if !privileged() {
        return;
    }
    let mut world = World::new(&["--mtu", "9000"]);
    let g = world.add_guest(DEVICE_MAC, &["--mtu", "9000"]);
    let guest = world.guest(g);
    assert!(guest.wait_for_address(LEASE_WAIT).is_some(), "{}", world.logs());
    assert!(
        wait_until(Duration::from_secs(5), || guest
            .ns
            .stdout("ip", &["-o", "link", "show", "dev", "eth0"])
            .contains("mtu 9000")),
        "{}",
        world.logs()
    );
    // A ping larger than 1500 bytes crosses unfragmented.
    let out = guest.ns.exec("ping", &["-c", "1", "-W", "2", "-M", "do", "-s", "8000", GATEWAY]);
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stdout), world.logs());
}

#[test]
fn two_guests_get_distinct_leases_and_reach_each_other() {
    if !privileged() {
        return;
    }
    let mut world = World::new(&[]);
    let a = world.add_guest(DEVICE_MAC, &[]);
    let b = world.add_guest("02:00:00:aa:bb:03", &[]);
    assert_eq!(world.guest(a).wait_for_address(LEASE_WAIT).as_deref(), Some("192.168.127.2/24"), "{}", world.logs());
    assert_eq!(world.guest(b).wait_for_address(LEASE_WAIT).as_deref(), Some("192.168.127.3/24"), "{}", world.logs());
    assert!(world.guest(a).ping("192.168.127.3"), "a→b\n{}", world.logs());
    assert!(world.guest(b).ping("192.168.127.2"), "b→a\n{}", world.logs());
}

#[test]
fn busybox_udhcpc_gets_a_lease_from_our_server() {
    if !privileged() {
        return;
    }
    let mut world = World::new(&[]);
    let g = world.add_guest(DEVICE_MAC, &["-dhcp=false"]);
    let guest = world.guest(g);
    assert!(
        wait_until(Duration::from_secs(10), || !guest.ns.exec("ip", &["link", "show", "eth0", "up"]).stdout.is_empty()),
        "tap never came up\n{}",
        world.logs()
    );
    // -s /bin/true: report the lease but leave the interface alone.
    let out =
        guest.ns.exec("busybox", &["udhcpc", "-f", "-q", "-n", "-i", "eth0", "-t", "5", "-T", "1", "-s", "/bin/true"]);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "udhcpc failed: {text}\n{}", world.logs());
    assert!(text.contains("lease of 192.168.127.2 obtained"), "udhcpc said: {text}");
    // vm-switch's own client stayed off.
    assert!(guest.address().is_none());
}

#[test]
fn junk_on_one_link_does_not_disturb_others() {
    if !privileged() {
        return;
    }
    let mut world = World::new(&[]);
    let g = world.add_guest(DEVICE_MAC, &[]);
    assert!(world.guest(g).wait_for_address(LEASE_WAIT).is_some(), "{}", world.logs());

    let junk: [&[u8]; 4] = [
        &[0, 0, 1, 2, 3],          // zero length
        &[0xff, 0xff, 0, 0, 0, 0], // 65535 bytes: above the link's limit before the offload hello
        b"\x10\x00random bytes that are not a frame at all",
        &[0x40, 0x00, 0xde, 0xad], // 64 bytes announced, 2 sent, then the end
    ];
    for bytes in junk {
        let mut rogue = UnixStream::connect(&world.socket).expect("connect rogue");
        let _ = rogue.write_all(bytes);
        // The end comes as EOF: a close with frames host-switch sent this
        // port still unread (the guest's multicast, flooded) would reach
        // it as a reset instead, and the truncated frame would go unseen.
        let _ = rogue.shutdown(std::net::Shutdown::Write);
        std::thread::sleep(Duration::from_millis(100));
    }
    // Random but well-framed frames.
    let mut rogue = UnixStream::connect(&world.socket).expect("connect rogue");
    let mut x: u32 = 7;
    for _ in 0..2000 {
        x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        let len = 14 + (x % 200) as usize;
        let mut buf = (len as u16).to_le_bytes().to_vec();
        buf.extend((0..len).map(|i| (x >> (i % 24)) as u8));
        if rogue.write_all(&buf).is_err() {
            break;
        }
    }
    drop(rogue);
    assert!(world.host_switch().try_wait().is_none(), "host-switch died\n{}", world.logs());
    assert!(world.guest(g).ping(GATEWAY), "guest disturbed\n{}", world.logs());
    let logs = world.host_switch().logs();
    assert!(logs.contains("zero-length frame"), "{logs}");
    assert!(logs.contains("a 65535-byte frame is longer than the link allows (1514 bytes"), "{logs}");
    assert!(logs.contains("in the middle of a frame"), "{logs}");
}

#[test]
fn host_switch_refuses_a_too_small_subnet() {
    let out = Command::new(bin("host-switch"))
        .args(["-subnet", "10.0.0.0/30", "--listen", "unix:///nonexistent/x.sock"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("too small"), "{err}");
}

#[test]
fn help_lists_flags_with_defaults() {
    // Go's layout: `-name type`, then the text with the default.
    for (prog, flag) in [
        ("host-switch", "  -subnet string\n"),
        ("vm-switch", "  -subnet string\n"),
        ("network-setup", "  -vm-switch-path string\n"),
        ("wsl-proxy", "  -socketFile string\n"),
    ] {
        for h in ["-h", "--help", "-help"] {
            let out = Command::new(bin(prog)).arg(h).output().unwrap();
            assert!(out.status.success(), "{prog} {h}");
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(text.contains(&format!("Usage of {prog}:")) && text.contains(flag), "{prog}: {text}");
            assert!(!text.contains("\n  --"), "{prog}: double-dash forms in {text}");
        }
    }
}

#[test]
fn usage_errors_exit_2_with_one_message_naming_the_part() {
    let cases: [(&str, &[&str], &str); 6] = [
        ("host-switch", &["-bogus"], "flag provided but not defined: -bogus"),
        ("host-switch", &["-debug", "false"], "-debug=false"),
        (
            "host-switch",
            &["-port-forward", "127.0.0.1:99999=192.168.127.2:80"],
            "the host port 99999 is out of range: must be between 1 and 65535",
        ),
        ("host-switch", &["--mtu", "70000"], "invalid value \"70000\" for flag -mtu: must be between 576 and 65521"),
        ("vm-switch", &["--bogus=1"], "flag provided but not defined: --bogus"),
        ("wsl-proxy", &["-upstreamAddress"], "flag needs an argument: -upstreamAddress"),
    ];
    for (prog, args, want) in cases {
        let out = Command::new(bin(prog)).args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{prog} {args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{prog} {args:?}: {err}");
        assert_eq!(err.matches(want).count(), 1, "printed once: {err}");
        assert!(out.stdout.is_empty(), "{prog} {args:?}: {}", String::from_utf8_lossy(&out.stdout));
    }
}

#[test]
fn datagram_link_carries_one_frame_per_datagram() {
    use std::os::unix::net::UnixDatagram;
    if !privileged() {
        return;
    }
    let dir = rdnet_e2e::TempDir::new("dgram");
    let host = rdnet_e2e::Netns::new("rdd");
    let sock = dir.join("hs.dgram");
    let listen = format!("unixgram://{}", sock.display());
    let hs = host.spawn(&dir, bin("host-switch"), &["--listen", &listen]);
    assert!(wait_until(Duration::from_secs(10), || rdnet_e2e::socket_exists(&sock)), "{}", hs.logs());

    let vm = UnixDatagram::bind(dir.join("vm.dgram")).unwrap();
    vm.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    vm.send_to(b"VFKT", &sock).unwrap();
    // Junk that a stream link could not survive: empty and oversized.
    vm.send_to(&[], &sock).unwrap();
    vm.send_to(&vec![0u8; 4000], &sock).unwrap();
    // An ARP request for the gateway from 02:00:00:00:00:07 / 192.168.127.7.
    let mac = [2u8, 0, 0, 0, 0, 7];
    let mut arp = vec![0xff; 6];
    arp.extend_from_slice(&mac);
    arp.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    arp.extend_from_slice(&mac);
    arp.extend_from_slice(&[192, 168, 127, 7]);
    arp.extend_from_slice(&[0; 6]);
    arp.extend_from_slice(&[192, 168, 127, 1]);
    vm.send_to(&arp, &sock).unwrap();
    let mut buf = [0u8; 2048];
    let n = vm.recv(&mut buf).expect("an ARP reply");
    assert_eq!(&buf[0..6], &mac, "reply is addressed to the VM");
    assert_eq!(&buf[12..14], &[0x08, 0x06]);
    assert_eq!(&buf[20..22], &[0, 2], "ARP reply");
    assert_eq!(&buf[22..28], &[0x5a, 0x94, 0xef, 0xe4, 0x0c, 0xdd], "gateway MAC");
    assert!(n >= 42);
}

#[test]
fn capture_flag_writes_a_pcap_of_the_gateways_traffic() {
    if !privileged() {
        return;
    }
    let dir = rdnet_e2e::TempDir::new("cap");
    let pcap = dir.join("cap.pcap");
    let cap = pcap.display().to_string();
    let mut world = World::new(&["--capture", &cap]);
    let g = world.add_guest(DEVICE_MAC, &[]);
    assert!(world.guest(g).wait_for_address(LEASE_WAIT).is_some(), "{}", world.logs());
    // The capture is written off the packet path, at least once a second.
    let mut bytes = Vec::new();
    wait_until(Duration::from_secs(5), || {
        bytes = std::fs::read(&pcap).unwrap_or_default();
        bytes.windows(6).any(|w| w == [0x5a, 0x94, 0xef, 0xe4, 0x0c, 0xdd])
    });
    assert!(bytes.len() > 24, "capture is empty");
    assert_eq!(&bytes[..4], &0xa1b2_c3d4u32.to_le_bytes(), "pcap magic");
    assert_eq!(u32::from_le_bytes([bytes[20], bytes[21], bytes[22], bytes[23]]), 1, "Ethernet link type");
    // The DHCP exchange is in it: the gateway's MAC as a source.
    assert!(bytes.windows(6).any(|w| w == [0x5a, 0x94, 0xef, 0xe4, 0x0c, 0xdd]));
}

#[test]
fn a_debug_capture_stays_within_its_cap_under_a_1gb_transfer() {
    if !privileged() {
        return;
    }
    // With -debug (World always passes it) and the default cap.
    let dir = rdnet_e2e::TempDir::new("bigcap");
    let path = dir.join("capture.pcap");
    let mut world = World::new(&["--capture", path.to_str().unwrap()]);
    let g = world.add_guest(DEVICE_MAC, &[]);
    assert!(world.guest(g).wait_for_address(LEASE_WAIT).is_some(), "{}", world.logs());
    const GIB: u64 = 1 << 30;
    let _server = world.host_server(
        18090,
        r#"
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(4)
block = b"x" * (1 << 20)
while True:
    c, _ = s.accept()
    for _ in range(1024):
        c.sendall(block)
    c.close()
"#,
        &[],
    );
    let got = world.guest_python(
        g,
        120,
        r#"
import socket
c = socket.create_connection(("192.168.127.254", 18090), timeout=30)
n = 0
while True:
    b = c.recv(1 << 20)
    if not b: break
    n += len(b)
print(n)
"#,
        &[],
    );
    assert_eq!(got.trim(), GIB.to_string(), "{}", world.logs());
    let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    assert!(len > 24, "no capture at {}", path.display());
    assert!(len <= 256 * 1024 * 1024, "the capture grew to {len} bytes, beyond its 256 MiB cap");
    let logs = world.host_switch().logs();
    assert_eq!(logs.matches("capturing stops").count(), 1, "{logs}");
    assert!(world.host_switch().try_wait().is_none(), "{logs}");
}

#[test]
fn listener_logs_name_the_peer_and_the_real_port_and_ignore_probes() {
    if !privileged() {
        return;
    }
    // A listener on port 0 says which port it got.
    let mut world = World::new(&["--listen", "tcp://127.0.0.1:0"]);
    let port_line = world.host_switch().logs().lines().find(|l| l.contains("tcp://127.0.0.1:")).map(str::to_string);
    let port_line = port_line.unwrap_or_else(|| panic!("no tcp listener line\n{}", world.logs()));
    assert!(!port_line.contains("127.0.0.1:0 ") && !port_line.ends_with("127.0.0.1:0"), "{port_line}");
    // A probe (connect, close, as a second instance checking the socket
    // does) is not a VM.
    drop(UnixStream::connect(&world.socket).expect("probe"));
    let g = world.add_guest(DEVICE_MAC, &[]);
    assert!(world.guest(g).wait_for_address(Duration::from_secs(30)).is_some(), "{}", world.logs());
    let logs = world.host_switch().logs();
    let connected: Vec<&str> = logs.lines().filter(|l| l.contains("VM connected")).collect();
    assert_eq!(connected.len(), 1, "the probe was logged as a VM:\n{logs}");
    // peer= names vm-switch's process, not the listening path.
    let vm_pid = world.guests[g].vm_switch.as_ref().map(|p| p.pid()).unwrap_or_default();
    assert!(connected[0].contains(&format!("peer=unix:pid={vm_pid},")), "{}", connected[0]);
    assert!(!connected[0].contains("host-switch.sock"), "{}", connected[0]);
}
