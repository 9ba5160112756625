//! vm-switch end to end: in a fresh namespace, against a host link the test
//! owns (a unix socket, u16-LE framed), acting as the host itself.
//!
//! Build the binaries first: `cargo build --bins`.

use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::Stdio;
use std::time::{Duration, Instant};

use rdnet_e2e::{Netns, Proc, TempDir, bin, privileged, wait_until};

const TAP_MAC: [u8; 6] = [0x5a, 0x94, 0xef, 0xe4, 0x0c, 0xee];
const GW_MAC: [u8; 6] = [0x5a, 0x94, 0xef, 0xe4, 0x0c, 0xdd];
const GW_IP: [u8; 4] = [192, 168, 127, 1];
const TAP_IP: [u8; 4] = [192, 168, 127, 2];

const DISCOVER: u8 = 1;
const OFFER: u8 = 2;
const REQUEST: u8 = 3;
const ACK: u8 = 5;

fn read_frame(s: &mut UnixStream) -> io::Result<Vec<u8>> {
    let mut len = [0u8; 2];
    s.read_exact(&mut len)?;
    let mut f = vec![0u8; u16::from_le_bytes(len) as usize];
    s.read_exact(&mut f)?;
    Ok(f)
}

fn write_frame(s: &mut UnixStream, f: &[u8]) {
    let mut buf = (f.len() as u16).to_le_bytes().to_vec();
    buf.extend_from_slice(f);
    s.write_all(&buf).expect("write a frame to vm-switch");
}

/// The DHCP message type and xid of a client frame (IPv4/UDP to port 67).
fn dhcp_client_message(f: &[u8]) -> Option<(u8, [u8; 4])> {
    if f.len() < 14 + 20 + 8 + 240 || f[12..14] != [0x08, 0x00] || f[23] != 17 {
        return None;
    }
    let udp = 14 + usize::from(f[14] & 0x0f) * 4;
    if f.get(udp + 2..udp + 4)? != [0, 67] {
        return None;
    }
    let bootp = f.get(udp + 8..)?;
    if bootp.get(236..240)? != [99, 130, 83, 99] {
        return None;
    }
    let xid = bootp[4..8].try_into().ok()?;
    let mut opts = &bootp[240..];
    while let [code, rest @ ..] = opts {
        match code {
            0 => opts = rest,
            255 => return None,
            _ => {
                let (&len, rest) = rest.split_first()?;
                let data = rest.get(..usize::from(len))?;
                if *code == 53 && len == 1 {
                    return Some((data[0], xid));
                }
                opts = &rest[usize::from(len)..];
            }
        }
    }
    None
}

/// Reads frames until a DHCP message of `kind` arrives; returns its frame
/// and xid.
fn expect_dhcp(s: &mut UnixStream, kind: u8, within: Duration) -> (Vec<u8>, [u8; 4]) {
    s.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let end = Instant::now() + within;
    while Instant::now() < end {
        match read_frame(s) {
            Ok(f) => {
                if let Some((k, xid)) = dhcp_client_message(&f)
                    && k == kind
                {
                    return (f, xid);
                }
            }
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
            Err(e) => panic!("reading from vm-switch: {e}"),
        }
    }
    panic!("no DHCP message {kind} from vm-switch within {within:?}");
}

fn ip_checksum(header: &[u8]) -> u16 {
    let mut sum = 0u32;
    for pair in header.chunks(2) {
        sum += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// gateway:67 → broadcast:68, a BOOTP reply of `kind` with the usual options.
fn dhcp_reply(kind: u8, xid: [u8; 4]) -> Vec<u8> {
    let mut bootp = vec![0u8; 240];
    bootp[0] = 2; // BOOTREPLY
    bootp[1] = 1;
    bootp[2] = 6;
    bootp[4..8].copy_from_slice(&xid);
    bootp[16..20].copy_from_slice(&TAP_IP); // yiaddr
    bootp[20..24].copy_from_slice(&GW_IP); // siaddr
    bootp[28..34].copy_from_slice(&TAP_MAC);
    bootp[236..240].copy_from_slice(&[99, 130, 83, 99]);
    let mut opt = |code: u8, data: &[u8]| {
        bootp.push(code);
        bootp.push(data.len() as u8);
        bootp.extend_from_slice(data);
    };
    opt(53, &[kind]);
    opt(54, &GW_IP);
    opt(51, &3600u32.to_be_bytes());
    opt(1, &[255, 255, 255, 0]);
    opt(3, &GW_IP);
    opt(6, &GW_IP);
    opt(26, &1500u16.to_be_bytes());
    opt(15, b"rd.test");
    bootp.push(255);

    let udp_len = 8 + bootp.len();
    let mut f = Vec::new();
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&GW_MAC);
    f.extend_from_slice(&[0x08, 0x00]);
    let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0];
    ip[2..4].copy_from_slice(&((20 + udp_len) as u16).to_be_bytes());
    ip.extend_from_slice(&GW_IP);
    ip.extend_from_slice(&[255; 4]);
    let sum = ip_checksum(&ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&67u16.to_be_bytes());
    f.extend_from_slice(&68u16.to_be_bytes());
    f.extend_from_slice(&(udp_len as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]); // no UDP checksum
    f.extend_from_slice(&bootp);
    f
}

/// A broadcast ARP request from the gateway for the tap's address.
fn arp_request() -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&GW_MAC);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&GW_MAC);
    f.extend_from_slice(&GW_IP);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&TAP_IP);
    f
}

fn accept(listener: &UnixListener, within: Duration) -> UnixStream {
    listener.set_nonblocking(true).unwrap();
    let mut conn = None;
    let ok = wait_until(within, || match listener.accept() {
        Ok((s, _)) => {
            conn = Some(s);
            true
        }
        Err(_) => false,
    });
    assert!(ok, "vm-switch did not connect within {within:?}");
    let s = conn.unwrap();
    s.set_nonblocking(false).unwrap();
    s
}

/// `ip -o link show DEV` in the namespace, or None if there is no such link.
fn link_line(ns: &Netns, dev: &str) -> Option<String> {
    let out = ns.exec("ip", &["-o", "link", "show", dev]);
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ifindex(line: &str) -> u32 {
    line.split(':').next().and_then(|n| n.trim().parse().ok()).expect("ifindex")
}

fn rx_packets(ns: &Netns, dev: &str) -> u64 {
    ns.stdout("cat", &[format!("/sys/class/net/{dev}/statistics/rx_packets")]).trim().parse().expect("rx_packets")
}

fn wait_exit(p: &mut Proc, within: Duration) -> std::process::ExitStatus {
    let mut status = None;
    wait_until(within, || {
        status = p.try_wait();
        status.is_some()
    });
    status.unwrap_or_else(|| panic!("{} did not exit within {within:?}:\n{}", p.name, p.logs()))
}

#[test]
fn vm_switch_redials_and_configures_the_tap() {
    if !privileged() {
        return;
    }
    let dir = TempDir::new("vmsw");
    let ns = Netns::new("vs");
    let sock = dir.join("link.sock");
    let resolv = dir.join("resolv.conf");
    let listener = UnixListener::bind(&sock).unwrap();
    let url = format!("unix://{}", sock.display());
    let args = ["--connect", &url, "-logfile", "/dev/stdout", "--resolv-conf", resolv.to_str().unwrap(), "-debug"];
    let mut vm = ns.spawn(&dir, bin("vm-switch"), &args);
    let mut conn = accept(&listener, Duration::from_secs(10));

    // The DHCP client's DISCOVER, framed, from the tap's MAC, broadcast.
    let (discover, xid) = expect_dhcp(&mut conn, DISCOVER, Duration::from_secs(5));
    assert_eq!(discover[6..12], TAP_MAC);
    assert_eq!(discover[..6], [0xff; 6]);

    // The tap: right MAC, up.
    let line = link_line(&ns, "eth0").expect("eth0 exists");
    assert!(line.contains("link/ether 5a:94:ef:e4:0c:ee"), "{line}");
    assert!(line.contains(",UP") || line.contains("<UP"), "{line}");
    let index = ifindex(&line);
    assert!(link_line(&ns, "lo").unwrap().contains("UP"));

    // Answer as the gateway's DHCP server; the replies go to the DHCP client,
    // not to the tap.
    let rx_before = rx_packets(&ns, "eth0");
    write_frame(&mut conn, &dhcp_reply(OFFER, xid));
    let (_, req_xid) = expect_dhcp(&mut conn, REQUEST, Duration::from_secs(5));
    assert_eq!(req_xid, xid);
    write_frame(&mut conn, &dhcp_reply(ACK, xid));
    let configured = wait_until(Duration::from_secs(5), || {
        ns.stdout("ip", &["-o", "-4", "addr", "show", "eth0"]).contains("inet 192.168.127.2/24")
    });
    assert!(configured, "lease not applied:\n{}", vm.logs());
    let routes = ns.stdout("ip", &["route"]);
    assert!(routes.contains("default via 192.168.127.1 dev eth0"), "{routes}");
    assert!(wait_until(Duration::from_secs(2), || resolv.exists()));
    let text = std::fs::read_to_string(&resolv).unwrap();
    assert!(text.contains("nameserver 192.168.127.1") && text.contains("search rd.test"), "{text}");
    assert!(vm.logs().contains("lease 192.168.127.2/24 router 192.168.127.1 dns 192.168.127.1 mtu 1500 lease 3600s"));
    assert_eq!(rx_packets(&ns, "eth0"), rx_before, "DHCP replies must not reach the tap");

    // A frame from the host reaches the tap.
    write_frame(&mut conn, &arp_request());
    assert!(
        wait_until(Duration::from_secs(5), || rx_packets(&ns, "eth0") > rx_before),
        "the ARP request was not seen on the tap"
    );
    // ... and the kernel answers it through vm-switch.
    conn.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let end = Instant::now() + Duration::from_secs(5);
    let mut answered = false;
    while !answered && Instant::now() < end {
        if let Ok(f) = read_frame(&mut conn) {
            answered = f.len() >= 42 && f[12..14] == [0x08, 0x06] && f[20..22] == [0, 2] && f[..6] == GW_MAC;
        }
    }
    assert!(answered, "no ARP reply from the guest kernel");

    // The host goes away: vm-switch redials, keeping the same tap.
    drop(conn);
    let mut conn = accept(&listener, Duration::from_secs(10));
    let line = link_line(&ns, "eth0").expect("eth0 survives the redial");
    assert_eq!(ifindex(&line), index, "the tap must not be recreated");
    assert!(ns.stdout("ip", &["-o", "-4", "addr", "show", "eth0"]).contains("192.168.127.2/24"));
    // Frames flow over the new connection.
    let rx = rx_packets(&ns, "eth0");
    write_frame(&mut conn, &arp_request());
    assert!(wait_until(Duration::from_secs(5), || rx_packets(&ns, "eth0") > rx), "no frames after the redial");

    // A second vm-switch for the same tap refuses to start.
    let mut second = ns.spawn(&dir, bin("vm-switch"), &args);
    let status = wait_exit(&mut second, Duration::from_secs(10));
    assert!(!status.success(), "a second vm-switch must fail");
    assert!(second.logs().contains("already exists"), "{}", second.logs());
    assert_eq!(ifindex(&link_line(&ns, "eth0").unwrap()), index);

    // SIGTERM: clean exit, and the tap is gone with its descriptor.
    let status = vm.terminate(Duration::from_secs(5)).expect("vm-switch exits on SIGTERM");
    assert!(status.success(), "{status}:\n{}", vm.logs());
    assert!(wait_until(Duration::from_secs(3), || link_line(&ns, "eth0").is_none()));
}

#[test]
fn vm_switch_with_inherited_link_exits_with_it() {
    if !privileged() {
        return;
    }
    let dir = TempDir::new("vmfd");
    let ns = Netns::new("vf");

    // The link is handed over as an inherited descriptor (here stdin, so
    // `-vsock-fd 0`); -dhcp=false leaves DHCP traffic to the tap.
    let log = dir.join("vm.log");
    let start = |stdin: UnixStream| {
        let out = std::fs::File::options().create(true).append(true).open(&log).unwrap();
        ns.command(bin("vm-switch"))
            .args(["-vsock-fd", "0", "-dhcp=false", "-tap-interface", "tapfd", "-logfile", "/dev/stderr"])
            .stdin(Stdio::from(OwnedFd::from(stdin)))
            .stdout(Stdio::null())
            .stderr(out)
            .spawn()
            .expect("spawn vm-switch")
    };

    let (mut host, guest) = UnixStream::pair().unwrap();
    let mut child = start(guest);
    assert!(wait_until(Duration::from_secs(10), || link_line(&ns, "tapfd").is_some_and(|l| l.contains("UP"))));
    // No DHCP client: a DHCP reply to port 68 goes to the tap.
    let rx = rx_packets(&ns, "tapfd");
    write_frame(&mut host, &dhcp_reply(OFFER, [1, 2, 3, 4]));
    assert!(wait_until(Duration::from_secs(5), || rx_packets(&ns, "tapfd") > rx));
    // Nothing the guest sends is a DHCP message.
    host.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let end = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < end {
        if let Ok(f) = read_frame(&mut host) {
            assert!(dhcp_client_message(&f).is_none(), "-dhcp=false must not send DHCP");
        }
    }
    // EOF on the link: exit status 0, tap gone. The host half-closes and
    // drains what vm-switch still sends until vm-switch closes: a unix
    // socket closed with unread data reads as a reset on the other end, not
    // an EOF (that made this test flaky).
    host.shutdown(std::net::Shutdown::Write).unwrap();
    let drain_until = Instant::now() + Duration::from_secs(10);
    let mut sink = vec![0u8; 65536];
    while Instant::now() < drain_until {
        match host.read(&mut sink) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
            Err(_) => break,
        }
    }
    drop(host);
    let status = wait_child(&mut child, Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "{status}: {}", std::fs::read_to_string(&log).unwrap_or_default());
    assert!(wait_until(Duration::from_secs(3), || link_line(&ns, "tapfd").is_none()));

    // A protocol error on the link (a zero length): non-zero exit.
    let (mut host, guest) = UnixStream::pair().unwrap();
    let mut child = start(guest);
    assert!(wait_until(Duration::from_secs(10), || link_line(&ns, "tapfd").is_some()));
    host.write_all(&[0, 0, 1, 2, 3]).unwrap();
    let status = wait_child(&mut child, Duration::from_secs(10));
    assert!(!status.success(), "{status}");
}

fn wait_child(child: &mut std::process::Child, within: Duration) -> std::process::ExitStatus {
    let mut status = None;
    wait_until(within, || {
        status = child.try_wait().ok().flatten();
        status.is_some()
    });
    match status {
        Some(s) => s,
        None => {
            let _ = child.kill();
            panic!("vm-switch did not exit within {within:?}");
        }
    }
}
