//! Issue 9's security checks: the inside API answers on the gateway only,
//! control sockets are owner-only, and daemons do not keep file
//! descriptors they inherited but do not own.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use rdnet_e2e::{DEVICE_MAC, Netns, Proc, TempDir, World, bin, privileged, socket_exists, wait_until};

fn world(host_flags: &[&str]) -> World {
    let mut w = World::new(host_flags);
    let g = w.add_guest(DEVICE_MAC, &[]);
    assert!(w.guest(g).wait_for_address(Duration::from_secs(20)).is_some(), "{}", w.logs());
    w
}

#[test]
fn inside_api_answers_on_the_gateway_only() {
    if !privileged() {
        return;
    }
    let world = world(&[]);
    let ns = &world.guest(0).ns;
    let ok = ns.exec("curl", &["-s", "-m", "5", "http://192.168.127.1/services/forwarder/all"]);
    assert!(ok.status.success() && String::from_utf8_lossy(&ok.stdout).trim() == "[]", "{}", world.logs());
    // The host alias is NATed to the host's loopback, where nothing listens
    // on :80: refused, not the API.
    let alias = ns.exec("curl", &["-s", "-m", "5", "http://192.168.127.254/services/forwarder/all"]);
    assert_eq!(alias.status.code(), Some(7), "the host alias answered: {}", String::from_utf8_lossy(&alias.stdout));
    // Nobody owns .3: no answer at all.
    let other = ns.exec("curl", &["-s", "-m", "3", "http://192.168.127.3/services/forwarder/all"]);
    assert!(!other.status.success(), "192.168.127.3 answered");
}

fn mode(path: &Path) -> u32 {
    fs::symlink_metadata(path).expect("socket").permissions().mode() & 0o777
}

#[test]
fn api_unix_socket_is_owner_only() {
    if !privileged() {
        return;
    }
    let dir = TempDir::new("apisock");
    let sock = dir.join("api.sock");
    let flag = format!("unix://{}", sock.display());
    let world = World::new(&["--api", &flag]);
    assert!(wait_until(Duration::from_secs(10), || socket_exists(&sock)), "{}", world.logs());
    assert!(wait_until(Duration::from_secs(5), || mode(&sock) == 0o600), "API socket mode {:o}", mode(&sock));
}

#[test]
fn wsl_proxy_socket_is_owner_only() {
    if !privileged() {
        return;
    }
    let dir = TempDir::new("wslsock");
    let ns = Netns::new("rdw");
    let sock = dir.join("wsl-proxy.sock");
    let p = ns.spawn(
        &dir,
        bin("wsl-proxy"),
        &["-socketFile", &sock.display().to_string(), "-logfile", "/dev/stdout", "-upstreamAddress", "127.0.0.1"],
    );
    assert!(wait_until(Duration::from_secs(10), || socket_exists(&sock)), "{}", p.logs());
    assert_eq!(mode(&sock), 0o600, "wsl-proxy socket mode");
}

/// Starts `program args` in `ns` through a python3 wrapper that first opens
/// `marker` without close-on-exec (an fd the program did not ask for).
fn spawn_with_inherited_fd(ns: &Netns, dir: &TempDir, marker: &Path, program: &Path, args: &[&str]) -> Proc {
    fs::write(marker, b"inherited").unwrap();
    let wrapper = r#"
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY); os.set_inheritable(fd, True)
fd2 = os.dup2(fd, 9); os.set_inheritable(9, True)
os.execv(sys.argv[2], sys.argv[2:])
"#;
    let mut all = vec!["-c", wrapper, marker.to_str().unwrap(), program.to_str().unwrap()];
    all.extend_from_slice(args);
    ns.spawn(dir, "python3", &all)
}

fn holds(pid: i32, marker: &Path) -> bool {
    let Ok(d) = fs::read_dir(format!("/proc/{pid}/fd")) else { return false };
    d.filter_map(Result::ok).any(|e| fs::read_link(e.path()).is_ok_and(|t| t == marker))
}

#[test]
fn daemons_close_inherited_descriptors() {
    if !privileged() {
        return;
    }
    let dir = TempDir::new("fds");
    let ns = Netns::new("rdf");
    let marker = dir.join("marker");
    let hs_sock = dir.join("hs.sock");
    let hs_listen = format!("unix://{}", hs_sock.display());
    let hs = spawn_with_inherited_fd(&ns, &dir, &marker, &bin("host-switch"), &["--listen", &hs_listen, "--capture="]);
    assert!(wait_until(Duration::from_secs(10), || socket_exists(&hs_sock)), "{}", hs.logs());
    assert!(!holds(hs.pid(), &marker), "host-switch kept an inherited fd");

    let wsl_sock = dir.join("wsl.sock");
    let wsl = spawn_with_inherited_fd(
        &ns,
        &dir,
        &marker,
        &bin("wsl-proxy"),
        &["-socketFile", wsl_sock.to_str().unwrap(), "-logfile", "/dev/stdout"],
    );
    assert!(wait_until(Duration::from_secs(10), || socket_exists(&wsl_sock)), "{}", wsl.logs());
    assert!(!holds(wsl.pid(), &marker), "wsl-proxy kept an inherited fd");

    // vm-switch keeps only its link: here it dials, so it keeps nothing.
    let guest = Netns::new("rdf");
    let vs = spawn_with_inherited_fd(
        &guest,
        &dir,
        &marker,
        &bin("vm-switch"),
        &[
            "--connect",
            &hs_listen,
            "--resolv-conf",
            dir.join("resolv.conf").to_str().unwrap(),
            "-logfile",
            "/dev/stdout",
        ],
    );
    assert!(
        wait_until(Duration::from_secs(10), || guest.exec("ip", &["link", "show", "eth0"]).status.success()),
        "{}",
        vs.logs()
    );
    assert!(!holds(vs.pid(), &marker), "vm-switch kept an inherited fd");
}

fn vm_rss_kib(pid: i32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// 10 000 `POST /services/dns/add` from inside the network, each adding
/// four new names: the zones stop growing at their bound (400 with the
/// reason beyond it), host-switch's memory stays bounded, and the log
/// stays quiet.
#[test]
fn ten_thousand_zone_adds_from_the_guest_are_bounded_and_quiet() {
    if !privileged() {
        return;
    }
    let mut world = world(&[]);
    let pid = world.host_switch().pid();
    let before = vm_rss_kib(pid);
    let out = world.guest_python(
        0,
        300,
        r#"
import http.client, json
c = http.client.HTTPConnection("192.168.127.1", 80, timeout=30)
codes = {}
last = ""
for i in range(10000):
    zone = {"Name": "flood.internal.", "Records": [{"Name": "n%d-%d" % (i, j), "IP": "10.1.2.3"} for j in range(4)]}
    body = json.dumps(zone)
    try:
        c.request("POST", "/services/dns/add", body)
        r = c.getresponse()
        text = r.read().decode()
    except (http.client.HTTPException, OSError):
        c = http.client.HTTPConnection("192.168.127.1", 80, timeout=30)
        continue
    codes[r.status] = codes.get(r.status, 0) + 1
    if r.status != 200:
        last = text.strip()
print(codes.get(200, 0), codes.get(400, 0), last)
"#,
        &[],
    );
    let mut parts = out.trim().splitn(3, ' ');
    let ok: usize = parts.next().unwrap_or("0").parse().unwrap_or(0);
    let refused: usize = parts.next().unwrap_or("0").parse().unwrap_or(0);
    let reason = parts.next().unwrap_or("");
    // 16 384 records in all; the two default zones hold four.
    assert_eq!(ok, (16_384 - 4) / 4, "{out}\n{}", world.logs());
    assert_eq!(ok + refused, 10_000, "{out}");
    assert!(reason.contains("too many DNS records"), "{out}");
    let listed = world.guest(0).ns.exec("curl", &["-s", "-m", "10", "http://192.168.127.1/services/dns/all"]);
    let listed = String::from_utf8_lossy(&listed.stdout).matches("\"Name\":\"n").count();
    assert_eq!(listed, ok * 4, "the table holds what was accepted");
    // Bounded memory: the records and their index, well under 64 MiB.
    let after = vm_rss_kib(pid);
    eprintln!("host-switch VmRSS: {before} KiB before, {after} KiB after 10 000 zone adds");
    assert!(after < before + 64 * 1024, "{before} KiB -> {after} KiB");
    // Quiet: the limiter lets a handful of lines through per 10 s.
    let logs = world.host_switch().logs();
    let lines = logs.lines().filter(|l| l.contains("DNS zone added")).count();
    assert!(lines <= 30, "{lines} zone lines in the log");
    // And DNS still answers, from the table.
    let dig =
        world.guest(0).ns.exec("dig", &["+short", "+time=2", "+tries=1", "@192.168.127.1", "n7-3.flood.internal"]);
    assert_eq!(String::from_utf8_lossy(&dig.stdout).trim(), "10.1.2.3", "{}", world.logs());
}

/// Prints every datagram it gets on 127.0.0.1:PORT, one per line.
const UDP_PRINTER: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", int(sys.argv[1])))
while True:
    d, _ = s.recvfrom(2048)
    print(d.decode(errors="replace"), flush=True)
"#;

/// In a guest: sends UDP datagrams to the host alias with a chosen source
/// address (raw IP socket, IP_HDRINCL), and a gratuitous ARP claiming an
/// address (raw packet socket). argv: PORT SRC_IP PAYLOAD COUNT.
const SPOOFER: &str = r#"
import socket, struct, sys, fcntl
port, src, payload, count = int(sys.argv[1]), sys.argv[2], sys.argv[3].encode(), int(sys.argv[4])
dst = "192.168.127.254"
def csum(b):
    if len(b) % 2: b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while s >> 16: s = (s & 0xffff) + (s >> 16)
    return ~s & 0xffff
udp = struct.pack("!HHHH", 40001, port, 8 + len(payload), 0) + payload
ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0, socket.inet_aton(src), socket.inet_aton(dst))
ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
r = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
for _ in range(count):
    r.sendto(ip + udp, (dst, 0))
# A gratuitous ARP reply: "SRC is at my MAC", broadcast.
p = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
p.bind(("eth0", 0))
mac = fcntl.ioctl(p.fileno(), 0x8927, struct.pack("256s", b"eth0"))[18:24]
arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 2, mac, socket.inet_aton(src), b"\xff" * 6, socket.inet_aton(src))
p.send(b"\xff" * 6 + mac + b"\x08\x06" + arp)
print("sent")
"#;

fn stats_field(world: &World, g: usize, field: &str) -> u64 {
    let stats = world.guest(g).ns.stdout("curl", &["-s", "-m", "5", "http://192.168.127.1/stats"]);
    let at = stats.find(&format!("\"{field}\":")).unwrap_or_else(|| panic!("no {field} in {stats}"));
    stats[at + field.len() + 3..].chars().take_while(char::is_ascii_digit).collect::<String>().parse().unwrap_or(0)
}

#[test]
fn a_guest_spoofing_anothers_address_gets_nothing_through() {
    if !privileged() {
        return;
    }
    let mut world = world(&[]);
    let b = world.add_guest("02:00:00:00:00:b2", &[]);
    let b_ip = world.guest(b).wait_for_address(Duration::from_secs(20)).expect("a lease for B");
    let b_ip = b_ip.split('/').next().unwrap_or_default().to_string();
    let printer = world.host_server_udp(18099, UDP_PRINTER);
    let before = stats_field(&world, 0, "spoofed_source");
    // B as itself: through. B as A (.2), and as an address outside the
    // subnet: nothing, and the counter moves.
    assert_eq!(world.guest_python(b, 20, SPOOFER, &["18099", &b_ip, "honest", "3"]), "sent");
    assert_eq!(world.guest_python(b, 20, SPOOFER, &["18099", "192.168.127.2", "spoofed", "20"]), "sent");
    assert_eq!(world.guest_python(b, 20, SPOOFER, &["18099", "10.9.9.9", "outside", "20"]), "sent");
    assert!(wait_until(Duration::from_secs(5), || printer.logs().contains("honest")), "{}", world.logs());
    std::thread::sleep(Duration::from_millis(500));
    let got = printer.logs();
    assert!(!got.contains("spoofed") && !got.contains("outside"), "a spoofed datagram got through: {got}");
    let after = stats_field(&world, 0, "spoofed_source");
    assert!(after >= before + 40, "spoofed_source {before} -> {after}");
    // A's address still reaches A: the gateway was not fooled by B's ARP.
    assert!(world.guest(0).ping("192.168.127.1"), "{}", world.logs());
    let from_a = world.guest(0).ns.exec("curl", &["-s", "-m", "5", "http://192.168.127.1/services/forwarder/all"]);
    assert!(from_a.status.success() && String::from_utf8_lossy(&from_a.stdout).trim() == "[]", "{}", world.logs());
}
