//! vm-switch end to end: in a fresh namespace, against a host link the test
//! owns (a unix socket, u16-LE framed), acting as the host itself, or in a
//! world with host-switch (the Rancher Desktop features at the end).
//!
//! Build the binaries first: `cargo build --bins`.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rdnet_e2e::{DEVICE_MAC, GATEWAY, Guest, HOST_ALIAS, Netns, Proc, TempDir, World, bin, privileged, wait_until};

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
    // The test plays a raw-framed host: no gvproxy-style POST /connect.
    let args = [
        "--connect",
        &url,
        "-connect-http=false",
        "-logfile",
        "/dev/stdout",
        "--resolv-conf",
        resolv.to_str().unwrap(),
        "-debug",
    ];
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

// ---------------------------------------------------------------------------
// vm-switch as Rancher Desktop runs it today: -trace-packets, SIGUSR1 and the
// other signals, -dhcp-script (udhcpc's script interface), resolv.conf
// through wsl-init's symlink, and a command line checked before anything.

const LEASE_WAIT: Duration = Duration::from_secs(20);
const NAK: u8 = 6;

/// Sends `sig` (a `kill -s` name) to `pid`.
fn signal(pid: i32, sig: &str) {
    let ok = Command::new("kill").args(["-s", sig, &pid.to_string()]).status().is_ok_and(|s| s.success());
    assert!(ok, "kill -s {sig} {pid} failed");
}

/// Log lines of `text` after the last one containing `marker`.
fn lines_after<'a>(text: &'a str, marker: &str) -> Vec<&'a str> {
    let lines: Vec<&str> = text.lines().collect();
    match lines.iter().rposition(|l| l.contains(marker)) {
        Some(i) => lines[i + 1..].to_vec(),
        None => Vec::new(),
    }
}

fn is_trace(line: &str) -> bool {
    line.contains("vm→host") || line.contains("host→vm")
}

/// A one-line HTTP server for the host namespace's 127.0.0.1.
const HELLO_SERVER: &str = r#"
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        b = b"hello from the host\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(b)))
        self.end_headers()
        self.wfile.write(b)
    def log_message(self, *a):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"#;

/// curl of the host server through the NAT (the host alias).
fn curl_host(world: &World, g: usize, port: u16) -> String {
    let url = format!("http://{HOST_ALIAS}:{port}/");
    let out = world.guest(g).ns.exec("curl", &["-sS", "-m", "10", &url]);
    assert!(out.status.success(), "curl {url}: {}\n{}", String::from_utf8_lossy(&out.stderr), world.logs());
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn trace_packets_logs_decoded_lines_both_ways() {
    if !privileged() {
        return;
    }
    let mut world = World::new(&[]);
    let g = world.add_guest(DEVICE_MAC, &["-trace-packets"]);
    assert!(world.guest(g).wait_for_address(LEASE_WAIT).is_some(), "{}", world.logs());
    assert!(world.guest(g).ping(GATEWAY), "ping failed\n{}", world.logs());
    let logs = world.guest(g).vm_switch.as_ref().unwrap().logs();
    let has = |dir: &str, what: &str| logs.lines().any(|l| l.contains(dir) && l.contains(what));
    assert!(logs.contains("packet tracing on"), "{logs}");
    assert!(has("vm→host", "IPv4 ICMP 192.168.127.2 → 192.168.127.1 echo request id "), "{logs}");
    assert!(has("host→vm", "IPv4 ICMP 192.168.127.1 → 192.168.127.2 echo reply id "), "{logs}");
    // The DHCP exchange and ARP are decoded too, with their sizes.
    assert!(has("vm→host", "IPv4 UDP 0.0.0.0:68 → 255.255.255.255:67 len "), "{logs}");
    assert!(has("vm→host", "(DHCP DISCOVER)") && has("host→vm", "(DHCP ACK)"), "{logs}");
    assert!(logs.lines().any(|l| is_trace(l) && l.contains(" bytes ARP ") && l.contains("5a:94:ef:e4:0c:")), "{logs}");
    for line in logs.lines().filter(|l| is_trace(l)) {
        assert!(line.contains(" bytes "), "{line}");
        assert!(!line.contains("Packet {") && !line.contains("[90, 148"), "debug output: {line}");
    }
}

#[test]
fn sigusr1_toggles_tracing_and_only_term_int_hup_end_vm_switch() {
    if !privileged() {
        return;
    }
    let mut world = World::new(&[]);
    let g = world.add_guest(DEVICE_MAC, &[]);
    let addr = world.guest(g).wait_for_address(LEASE_WAIT);
    assert_eq!(addr.as_deref(), Some("192.168.127.2/24"), "{}", world.logs());
    let port = 18080 + (std::process::id() % 1000) as u16;
    let _server = world.host_server(port, HELLO_SERVER, &[]);
    assert_eq!(curl_host(&world, g, port), "hello from the host\n");
    let pid = world.guest(g).vm_switch.as_ref().unwrap().pid();
    let logs = || world.guest(g).vm_switch.as_ref().unwrap().logs();
    assert!(!logs().lines().any(is_trace), "tracing starts off:\n{}", logs());

    // Rancher Desktop's debugging step: tracing on.
    signal(pid, "USR1");
    assert!(wait_until(Duration::from_secs(5), || logs().contains("packet tracing on (SIGUSR1)")), "{}", logs());
    assert_eq!(curl_host(&world, g, port), "hello from the host\n");
    let text = logs();
    let traced = lines_after(&text, "packet tracing on (SIGUSR1)");
    let syn = format!("→ {HOST_ALIAS}:{port} [SYN]");
    assert!(
        traced.iter().any(|l| l.contains("vm→host") && l.contains("IPv4 TCP 192.168.127.2:") && l.contains(&syn)),
        "{text}"
    );
    let synack = format!("IPv4 TCP {HOST_ALIAS}:{port} → 192.168.127.2:");
    assert!(traced.iter().any(|l| l.contains("host→vm") && l.contains(&synack) && l.contains("[SYN, ACK]")), "{text}");

    // And off again: nothing is traced after it.
    signal(pid, "USR1");
    assert!(wait_until(Duration::from_secs(5), || logs().contains("packet tracing off (SIGUSR1)")), "{}", logs());
    assert!(world.guest(g).ping(GATEWAY), "{}", world.logs());
    let text = logs();
    assert!(!lines_after(&text, "packet tracing off (SIGUSR1)").iter().any(|l| is_trace(l)), "{text}");

    // Signals that would kill a process by default do not end vm-switch.
    for sig in ["USR2", "ALRM", "PIPE", "QUIT", "VTALRM", "RTMIN+1"] {
        signal(pid, sig);
    }
    assert!(wait_until(Duration::from_secs(5), || logs().contains("SIGUSR2 ignored")), "{}", logs());
    std::thread::sleep(Duration::from_millis(300));
    let vm = world.guests[g].vm_switch.as_mut().unwrap();
    assert!(vm.try_wait().is_none(), "vm-switch died of a signal:\n{}", vm.logs());
    // The lease and the traffic survived all of it.
    assert_eq!(world.guest(g).address().as_deref(), Some("192.168.127.2/24"));
    assert_eq!(curl_host(&world, g, port), "hello from the host\n");

    // SIGHUP ends it cleanly.
    signal(pid, "HUP");
    let vm = world.guests[g].vm_switch.as_mut().unwrap();
    let status = wait_exit(vm, Duration::from_secs(5));
    assert_eq!(status.code(), Some(0), "{status}:\n{}", vm.logs());
    assert!(vm.logs().contains("SIGHUP: exiting"), "{}", vm.logs());
}

/// One call of a recording script: its argument count, the event and the
/// udhcpc variables it was given.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Call {
    argc: usize,
    event: String,
    env: BTreeMap<String, String>,
}

const UDHCPC_VARIABLES: &str =
    "interface ip mask subnet broadcast router dns domain search lease serverid mtu message siaddr";

/// A udhcpc-style script that appends each call to `calls` (see [`Call`])
/// and, when `address`, applies the lease with `ip` as busybox's example
/// script does.
fn recording_script(dir: &TempDir, name: &str, calls: &Path, address: bool) -> PathBuf {
    let apply = if address {
        r#"case "$1" in
  bound|renew)
    ip addr replace "$ip/$mask" dev "$interface" || exit 1
    [ -z "$router" ] || ip route replace default via "$router" dev "$interface" ;;
  deconfig) ip -4 addr flush dev "$interface" ;;
esac"#
    } else {
        ""
    };
    let text = format!(
        r#"#!/bin/sh
{{
  echo "call $# $1"
  for v in {UDHCPC_VARIABLES}; do
    if eval "[ -n \"\${{$v+x}}\" ]"; then eval "printf '%s=%s\n' $v \"\$$v\""; fi
  done
  echo end
}} >> "{}"
{apply}
exit 0
"#,
        calls.display()
    );
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

fn read_calls(path: &Path) -> Vec<Call> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut calls = Vec::new();
    let mut cur: Option<Call> = None;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("call ") {
            let (argc, event) = rest.split_once(' ').unwrap_or((rest, ""));
            cur = Some(Call { argc: argc.parse().unwrap_or(99), event: event.to_string(), env: BTreeMap::new() });
        } else if line == "end" {
            calls.extend(cur.take());
        } else if let (Some(c), Some((k, v))) = (cur.as_mut(), line.split_once('=')) {
            c.env.insert(k.to_string(), v.to_string());
        }
    }
    calls
}

fn env_of(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

#[test]
fn dhcp_script_gets_what_busybox_udhcpc_gives_and_does_the_addressing() {
    if !privileged() {
        return;
    }
    let mut world = World::new(&[]);
    // host-switch again, with a search domain in its resolver so that the
    // leases carry option 119 as well.
    world.host_switch = None;
    let _ = std::fs::remove_file(&world.socket);
    std::fs::write(
        Path::new("/etc/netns").join(&world.host.name).join("resolv.conf"),
        "search rd.example\nnameserver 127.0.0.1\n",
    )
    .unwrap();
    world.start_host_switch(&[]);

    // What the real udhcpc gives its script, on a guest of its own.
    let bb_calls = world.dir.join("busybox.calls");
    let bb_script = recording_script(&world.dir, "busybox.sh", &bb_calls, false);
    let bb = world.add_guest("02:00:00:aa:bb:03", &["-dhcp=false"]);
    let bb_ns = &world.guest(bb).ns;
    assert!(
        wait_until(Duration::from_secs(10), || !bb_ns.exec("ip", &["link", "show", "eth0", "up"]).stdout.is_empty()),
        "{}",
        world.logs()
    );
    let script = bb_script.to_str().unwrap();
    let out = bb_ns.exec("busybox", &["udhcpc", "-f", "-q", "-n", "-i", "eth0", "-t", "5", "-T", "1", "-s", script]);
    assert!(out.status.success(), "udhcpc: {}\n{}", String::from_utf8_lossy(&out.stderr), world.logs());
    let bb_bound = read_calls(&bb_calls).into_iter().find(|c| c.event == "bound").expect("udhcpc ran bound");

    // vm-switch with -dhcp-script, started with stale udhcpc variables in
    // its own environment that must not reach the script.
    let calls = world.dir.join("vm-switch.calls");
    let script = recording_script(&world.dir, "vm-switch.sh", &calls, true);
    let ns = Netns::new("rdg");
    let resolv_conf = world.dir.join(format!("{}.resolv.conf", ns.name));
    let connect = format!("unix://{}", world.socket.display());
    let mut cmd = ns.command(bin("vm-switch"));
    cmd.args(["--connect", &connect, "-tap-mac-address", DEVICE_MAC, "-logfile", "/dev/stdout", "-debug"])
        .args(["--resolv-conf", resolv_conf.to_str().unwrap(), "-dhcp-script", script.to_str().unwrap()])
        .env("dns", "6.6.6.6")
        .env("ip", "10.9.9.9");
    let vm = Proc::spawn(&world.dir, &mut cmd);
    world.guests.push(Guest { vm_switch: Some(vm), ns, resolv_conf, mac: DEVICE_MAC.into() });
    let g = world.guests.len() - 1;

    // The script, not vm-switch, addresses the interface.
    let addr = world.guest(g).wait_for_address(LEASE_WAIT);
    assert_eq!(addr.as_deref(), Some("192.168.127.2/24"), "{}", world.logs());
    assert!(wait_until(Duration::from_secs(5), || read_calls(&calls).len() >= 2), "{}", world.logs());
    let got = read_calls(&calls);
    assert_eq!(got[0], Call { argc: 1, event: "deconfig".into(), env: env_of(&[("interface", "eth0")]) }, "{got:?}");
    let bound = &got[1];
    assert_eq!((bound.argc, bound.event.as_str()), (1, "bound"), "{got:?}");
    assert_eq!(
        bound.env,
        env_of(&[
            ("interface", "eth0"),
            ("ip", "192.168.127.2"),
            ("mask", "24"),
            ("subnet", "255.255.255.0"),
            ("router", "192.168.127.1"),
            ("dns", "192.168.127.1"),
            // Option 15, the first search domain (host-switch sends it too).
            ("domain", "rd.example"),
            ("search", "rd.example"),
            ("lease", "3600"),
            ("serverid", "192.168.127.1"),
            ("mtu", "1500"),
            ("siaddr", "192.168.127.1"),
        ]),
        "{got:?}"
    );
    // Variable for variable what udhcpc gave, but for the address.
    let strip = |env: &BTreeMap<String, String>| {
        env.iter().filter(|(k, _)| *k != "ip").map(|(k, v)| (k.clone(), v.clone())).collect::<Vec<_>>()
    };
    assert_eq!(strip(&bound.env), strip(&bb_bound.env), "vm-switch vs busybox udhcpc");

    assert!(world.guest(g).ping(GATEWAY), "{}", world.logs());
    let routes = world.guest(g).ns.stdout("ip", &["-4", "route", "show", "default"]);
    assert!(routes.contains("default via 192.168.127.1 dev eth0"), "{routes}");
    // With a script vm-switch writes no resolv.conf of its own.
    assert!(!world.guest(g).resolv_conf.exists(), "vm-switch wrote {}", world.guest(g).resolv_conf.display());
}

/// Reads frames until a DHCP message of `kind`; returns its xid.
fn expect_dhcp_kind(conn: &mut UnixStream, kind: u8) -> [u8; 4] {
    expect_dhcp(conn, kind, Duration::from_secs(10)).1
}

/// Like [`dhcp_reply`], with extra options; a NAK leaves `yiaddr` empty.
fn dhcp_reply_with(kind: u8, xid: [u8; 4], extra: &[(u8, &[u8])]) -> Vec<u8> {
    let mut f = dhcp_reply(kind, xid);
    let udp = 14 + 20;
    let bootp = udp + 8;
    if kind == NAK {
        f[bootp + 16..bootp + 20].fill(0);
    }
    // Drop the END, append the options and a new END, fix the lengths.
    f.pop();
    for (code, data) in extra {
        f.push(*code);
        f.push(data.len() as u8);
        f.extend_from_slice(data);
    }
    f.push(255);
    let udp_len = (f.len() - udp) as u16;
    f[udp + 4..udp + 6].copy_from_slice(&udp_len.to_be_bytes());
    f[14 + 2..14 + 4].copy_from_slice(&(udp_len + 20).to_be_bytes());
    f[14 + 10..14 + 12].fill(0);
    let sum = ip_checksum(&f[14..34]);
    f[14 + 10..14 + 12].copy_from_slice(&sum.to_be_bytes());
    f
}

#[test]
fn dhcp_script_hears_leasefail_and_nak() {
    if !privileged() {
        return;
    }
    let dir = TempDir::new("vmscript");
    let ns = Netns::new("vn");
    let sock = dir.join("link.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let calls = dir.join("calls");
    let script = recording_script(&dir, "script.sh", &calls, true);
    let url = format!("unix://{}", sock.display());
    let args =
        ["--connect", &url, "-connect-http=false", "-logfile", "/dev/stdout", "-dhcp-script", script.to_str().unwrap()];
    let mut vm = ns.spawn(&dir, bin("vm-switch"), &args);
    let mut conn = accept(&listener, Duration::from_secs(10));

    // No server answers: after three DISCOVERs the script hears leasefail
    // (udhcpc's -t 3), and vm-switch keeps trying.
    let events = || read_calls(&calls).into_iter().map(|c| c.event).collect::<Vec<_>>();
    let end = Instant::now() + Duration::from_secs(15);
    while !events().contains(&"leasefail".to_string()) {
        assert!(Instant::now() < end, "no leasefail: {:?}\n{}", events(), vm.logs());
        expect_dhcp_kind(&mut conn, DISCOVER);
    }
    assert_eq!(events(), ["deconfig", "leasefail"], "{}", vm.logs());
    assert_eq!(read_calls(&calls)[1].env, env_of(&[("interface", "eth0")]));

    // An offer, then a NAK for the REQUEST: the script hears nak with the
    // server's id and reason.
    let xid = expect_dhcp_kind(&mut conn, DISCOVER);
    write_frame(&mut conn, &dhcp_reply(OFFER, xid));
    let xid = expect_dhcp_kind(&mut conn, REQUEST);
    write_frame(&mut conn, &dhcp_reply_with(NAK, xid, &[(56, b"lease is gone")]));
    assert!(wait_until(Duration::from_secs(5), || events().len() == 3), "{:?}\n{}", events(), vm.logs());
    let nak = &read_calls(&calls)[2];
    assert_eq!(nak.event, "nak");
    assert_eq!(
        nak.env,
        env_of(&[
            ("interface", "eth0"),
            ("ip", "0.0.0.0"),
            ("serverid", "192.168.127.1"),
            ("message", "lease is gone")
        ])
    );

    // Discovery starts over and the next ACK is a new lease: bound.
    let xid = expect_dhcp_kind(&mut conn, DISCOVER);
    write_frame(&mut conn, &dhcp_reply(OFFER, xid));
    let xid = expect_dhcp_kind(&mut conn, REQUEST);
    write_frame(&mut conn, &dhcp_reply(ACK, xid));
    assert!(wait_until(Duration::from_secs(5), || events().len() >= 4), "{:?}\n{}", events(), vm.logs());
    let bound = read_calls(&calls)[3].clone();
    assert_eq!(bound.event, "bound", "{:?}", events());
    // Option 15 is udhcpc's `domain`; without option 119 there is no `search`.
    assert_eq!(bound.env.get("domain").map(String::as_str), Some("rd.test"));
    assert!(!bound.env.contains_key("search"));
    assert!(
        wait_until(Duration::from_secs(5), || ns
            .stdout("ip", &["-4", "-o", "addr", "show", "eth0"])
            .contains("192.168.127.2/24")),
        "{}",
        vm.logs()
    );
    assert_eq!(vm.terminate(Duration::from_secs(5)).and_then(|s| s.code()), Some(0), "{}", vm.logs());
}

#[test]
fn resolv_conf_is_written_through_its_symlink() {
    if !privileged() {
        return;
    }
    let mut world = World::new(&[]);
    // wsl-init's layout: etc/resolv.conf -> ../var/lib/resolv.conf, whose
    // target does not exist yet.
    let etc = world.dir.join("etc");
    let var = world.dir.join("var/lib");
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::create_dir_all(&var).unwrap();
    let link = etc.join("resolv.conf");
    std::os::unix::fs::symlink("../var/lib/resolv.conf", &link).unwrap();
    let g = world.add_guest(DEVICE_MAC, &["--resolv-conf", link.to_str().unwrap()]);
    assert!(world.guest(g).wait_for_address(LEASE_WAIT).is_some(), "{}", world.logs());
    let target = var.join("resolv.conf");
    assert!(
        wait_until(Duration::from_secs(5), || std::fs::read_to_string(&target)
            .is_ok_and(|t| t.contains("nameserver 192.168.127.1"))),
        "{}",
        world.logs()
    );
    let meta = std::fs::symlink_metadata(&link).unwrap();
    assert!(meta.file_type().is_symlink(), "the symlink was replaced");
    assert_eq!(std::fs::read_link(&link).unwrap(), Path::new("../var/lib/resolv.conf"));
    assert_eq!(std::fs::read_dir(&etc).unwrap().count(), 1, "nothing else in etc/");
    assert_eq!(std::fs::read_dir(&var).unwrap().count(), 1, "no temporary file left");
    // The world's default resolv.conf path was overridden, not written.
    assert!(!world.guest(g).resolv_conf.exists());
}

/// Runs vm-switch in `ns` to completion (10 s at most) with `args`.
fn run_vm_switch(ns: &Netns, args: &[&str]) -> (Option<i32>, String) {
    let mut child = ns
        .command(bin("vm-switch"))
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn vm-switch");
    let status = wait_child(&mut child, Duration::from_secs(10));
    let out = child.wait_with_output().expect("vm-switch output");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (status.code(), text)
}

#[test]
fn the_command_line_is_checked_before_anything_is_touched() {
    if !privileged() {
        return;
    }
    let dir = TempDir::new("vmargs");
    let ns = Netns::new("va");
    let log = dir.join("vm-switch.log");
    let log_arg = log.to_str().unwrap();
    // No descriptor 200 is open: a bad flag is still what gets reported.
    let (code, text) = run_vm_switch(&ns, &["-subnet", "garbage", "-vsock-fd", "200", "-logfile", log_arg]);
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains("vm-switch: invalid value \"garbage\" for flag -subnet: "), "{text}");
    assert_eq!(text.matches("invalid value").count(), 1, "printed once: {text}");
    assert!(!text.contains("descriptor"), "{text}");
    assert!(!log.exists(), "the log file was opened");
    assert!(link_line(&ns, "eth0").is_none(), "a tap was created");

    let plain = dir.join("not-executable.sh");
    std::fs::write(&plain, "#!/bin/sh\n").unwrap();
    let (code, text) =
        run_vm_switch(&ns, &["-dhcp-script", plain.to_str().unwrap(), "-vsock-fd", "200", "-logfile", log_arg]);
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains("for flag -dhcp-script: not executable"), "{text}");
    let (code, text) = run_vm_switch(&ns, &["-dhcp-script", "/nonexistent/script", "-logfile", log_arg]);
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains("for flag -dhcp-script: no such file"), "{text}");
    assert!(!log.exists() && link_line(&ns, "eth0").is_none());

    // A good command line without its host link: a runtime failure (1),
    // reported once on stderr and in the log. `-dhcp-script ""` is what
    // Rancher Desktop passes.
    let (code, text) = run_vm_switch(&ns, &["-dhcp-script", "", "-vsock-fd", "200", "-logfile", log_arg]);
    assert_eq!(code, Some(1), "{text}");
    assert_eq!(text.matches("no such open descriptor").count(), 1, "{text}");
    let logged = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(logged.contains("no such open descriptor"), "{logged}");
    assert!(link_line(&ns, "eth0").is_none());
}

/// The gateway's router advertisement for fd5a:94ef:e40c::/64 (SLAAC),
/// MTU 1500, with RDNSS fd5a:94ef:e40c::1 and DNSSL corp.example, from
/// fe80::5894:efff:fee4:cdd to all nodes, ICMPv6 checksum filled in.
fn router_advert() -> Vec<u8> {
    let src: std::net::Ipv6Addr = "fe80::5894:efff:fee4:cdd".parse().unwrap();
    let dst: std::net::Ipv6Addr = "ff02::1".parse().unwrap();
    let prefix: std::net::Ipv6Addr = "fd5a:94ef:e40c::".parse().unwrap();
    let dns: std::net::Ipv6Addr = "fd5a:94ef:e40c::1".parse().unwrap();
    // Type 134, code 0, checksum, hop limit 64, flags 0, router lifetime 1800.
    let mut icmp = vec![134, 0, 0, 0, 64, 0, 0x07, 0x08, 0, 0, 0, 0, 0, 0, 0, 0];
    // Prefix information: /64, on-link and autonomous, valid/preferred 3600.
    icmp.extend_from_slice(&[3, 4, 64, 0xc0]);
    icmp.extend_from_slice(&3600u32.to_be_bytes());
    icmp.extend_from_slice(&3600u32.to_be_bytes());
    icmp.extend_from_slice(&[0; 4]);
    icmp.extend_from_slice(&prefix.octets());
    // MTU.
    icmp.extend_from_slice(&[5, 1, 0, 0]);
    icmp.extend_from_slice(&1500u32.to_be_bytes());
    // RDNSS (RFC 8106): one server, lifetime 1800.
    icmp.extend_from_slice(&[25, 3, 0, 0]);
    icmp.extend_from_slice(&1800u32.to_be_bytes());
    icmp.extend_from_slice(&dns.octets());
    // DNSSL: corp.example, padded to 8 bytes.
    let mut names = vec![4];
    names.extend_from_slice(b"corp");
    names.push(7);
    names.extend_from_slice(b"example");
    names.push(0);
    let len = (8 + names.len()).div_ceil(8) * 8;
    icmp.extend_from_slice(&[31, (len / 8) as u8, 0, 0]);
    icmp.extend_from_slice(&1800u32.to_be_bytes());
    icmp.extend_from_slice(&names);
    icmp.resize(icmp.len() + len - 8 - names.len(), 0);
    // Checksum over the IPv6 pseudo-header and the message.
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&(icmp.len() as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, 58]);
    pseudo.extend_from_slice(&icmp);
    let c = ip_checksum(&pseudo);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let mut f = vec![0x33, 0x33, 0, 0, 0, 1];
    f.extend_from_slice(&GW_MAC);
    f.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0]);
    f.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
    f.extend_from_slice(&[58, 255]);
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&dst.octets());
    f.extend_from_slice(&icmp);
    f
}

/// IPv6 from the gateway's router advertisement: the tap gets its SLAAC
/// address (EUI-64 of its MAC) and the default route, and resolv.conf the
/// RA's DNS server and search list beside the lease's.
#[test]
fn ipv6_comes_from_the_gateways_router_advertisement() {
    if !privileged() {
        return;
    }
    let dir = TempDir::new("vmsw6");
    let ns = Netns::new("v6");
    let sock = dir.join("link.sock");
    let resolv = dir.join("resolv.conf");
    let listener = UnixListener::bind(&sock).unwrap();
    let url = format!("unix://{}", sock.display());
    // The test plays a raw-framed host.
    let args = [
        "--connect",
        &url,
        "-connect-http=false",
        "-logfile",
        "/dev/stdout",
        "--resolv-conf",
        resolv.to_str().unwrap(),
    ];
    let vm = ns.spawn(&dir, bin("vm-switch"), &args);
    let mut conn = accept(&listener, Duration::from_secs(10));
    let (_, xid) = expect_dhcp(&mut conn, DISCOVER, Duration::from_secs(5));
    write_frame(&mut conn, &dhcp_reply(OFFER, xid));
    let _ = expect_dhcp(&mut conn, REQUEST, Duration::from_secs(5));
    write_frame(&mut conn, &dhcp_reply(ACK, xid));
    write_frame(&mut conn, &router_advert());
    let addr = "fd5a:94ef:e40c:0:5894:efff:fee4:cee/64";
    let slaac = wait_until(Duration::from_secs(10), || ns.stdout("ip", &["-6", "addr", "show", "eth0"]).contains(addr));
    assert!(slaac, "no SLAAC address {addr}:\n{}\n{}", ns.stdout("ip", &["-6", "addr"]), vm.logs());
    let routes = ns.stdout("ip", &["-6", "route", "show", "default"]);
    assert!(routes.contains("via fe80::5894:efff:fee4:cdd dev eth0"), "{routes}");
    let written = wait_until(Duration::from_secs(5), || {
        std::fs::read_to_string(&resolv).is_ok_and(|t| t.contains("nameserver fd5a:94ef:e40c::1"))
    });
    let text = std::fs::read_to_string(&resolv).unwrap_or_default();
    assert!(written, "{text}\n{}", vm.logs());
    // The lease's server first, then the RA's; both search lists.
    let v4 = text.find("nameserver 192.168.127.1").expect("the lease's server");
    assert!(v4 < text.find("nameserver fd5a:94ef:e40c::1").unwrap_or(0), "{text}");
    assert!(text.contains("search rd.test corp.example"), "{text}");
    drop(conn);
}

/// `-subnet6=` turns IPv6 off on the tap.
#[test]
fn subnet6_empty_turns_ipv6_off() {
    if !privileged() {
        return;
    }
    let dir = TempDir::new("vmsw6off");
    let ns = Netns::new("v6o");
    let sock = dir.join("link.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let url = format!("unix://{}", sock.display());
    let resolv = dir.join("resolv.conf");
    let args = [
        "--connect",
        &url,
        "-connect-http=false",
        "-subnet6=",
        "-logfile",
        "/dev/stdout",
        "--resolv-conf",
        resolv.to_str().unwrap(),
    ];
    let vm = ns.spawn(&dir, bin("vm-switch"), &args);
    let _conn = accept(&listener, Duration::from_secs(10));
    assert!(wait_until(Duration::from_secs(5), || link_line(&ns, "eth0").is_some()), "{}", vm.logs());
    let off = wait_until(Duration::from_secs(5), || {
        ns.stdout("cat", &["/proc/sys/net/ipv6/conf/eth0/disable_ipv6"]).trim() == "1"
    });
    assert!(off, "IPv6 still on: {}", vm.logs());
}
