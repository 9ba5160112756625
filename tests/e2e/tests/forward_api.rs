//! Issue 4: port forwards into the guest and the HTTP API, checked with real
//! clients (curl, python) against gvproxy's exact answers.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rdnet_e2e::{DEVICE_MAC, Netns, Proc, TempDir, World, privileged, tcp_ready_in, wait_until};

const LEASE_WAIT: Duration = Duration::from_secs(20);
const GUEST_PORT: u16 = 9001;
const STATIC_PORT: u16 = 16443;
const API_FWD_PORT: u16 = 17000;

/// A world whose host-switch serves the API on a unix socket in `api_dir`
/// (made before the world, so the flag can name it) with one guest.
fn world(api_dir: &TempDir, extra: &[&str]) -> (World, PathBuf) {
    let sock = api_dir.join("api.sock");
    let api = format!("unix://{}", sock.display());
    let mut flags = vec!["--api", api.as_str()];
    flags.extend_from_slice(extra);
    let mut w = World::new(&flags);
    let g = w.add_guest(DEVICE_MAC, &[]);
    assert!(w.guest(g).wait_for_address(LEASE_WAIT).is_some(), "no lease\n{}", w.logs());
    (w, sock)
}

/// One request to the API over its unix socket: (status, body).
fn api(world: &World, sock: &Path, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let sock = sock.display().to_string();
    let url = format!("http://api{path}");
    let mut args = vec!["-sS", "-m", "20", "--unix-socket", &sock, "-X", method, "-w", "\n@@%{http_code}"];
    if let Some(b) = body {
        args.extend_from_slice(&["--data-binary", b]);
    }
    args.push(&url);
    curl(world, &world.host, &args)
}

/// Runs curl in `ns`; its `-w` must end the output with `\n@@CODE`.
fn curl(world: &World, ns: &Netns, args: &[&str]) -> (u16, String) {
    let out = ns.exec("curl", args);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let Some((body, code)) = text.rsplit_once("\n@@") else {
        panic!("curl {args:?} failed: {}\n{}", String::from_utf8_lossy(&out.stderr), world.logs());
    };
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// A python3 program in `ns`, started and left running (ended on drop).
fn spawn_python(world: &World, ns: &Netns, script: &str, args: &[&str]) -> Proc {
    let mut all = vec!["-c", script];
    all.extend_from_slice(args);
    ns.spawn(&world.dir, "python3", &all)
}

/// Runs python3 in `ns` to completion; its trimmed stdout.
fn run_python(world: &World, ns: &Netns, script: &str, args: &[&str]) -> String {
    let mut all = vec!["-c", script];
    all.extend_from_slice(args);
    let out = ns.exec("python3", &all);
    assert!(out.status.success(), "python failed: {}\n{}", String::from_utf8_lossy(&out.stderr), world.logs());
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// In the guest: per connection, hash everything until EOF, answer
/// "N DIGEST\n", then send argv[2] bytes (default 32 MiB) of known data and
/// close.
const GUEST_SINK: &str = r#"
import socket, sys, hashlib
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(16)
block = hashlib.sha256(b"down").digest() * 4096
while True:
    c, _ = s.accept()
    h = hashlib.sha256(); n = 0
    while True:
        b = c.recv(1 << 20)
        if not b: break
        h.update(b); n += len(b)
    c.sendall(("%d %s\n" % (n, h.hexdigest())).encode())
    left = int(sys.argv[2]) if len(sys.argv) > 2 else 32 * 1024 * 1024
    while left:
        k = c.send(block[:min(left, len(block))]); left -= k
    c.close()
"#;

/// On the host (at 127.0.0.1, or the address in argv[2]): send 32 MiB, half-close, read the guest's digest line and
/// its 32 MiB; print "ok" when both directions arrived intact.
const HOST_CLIENT: &str = r#"
import socket, sys, hashlib
port = int(sys.argv[1]); size = 32 * 1024 * 1024
host = sys.argv[2] if len(sys.argv) > 2 else "127.0.0.1"
up = hashlib.sha256(b"up").digest() * 4096
c = socket.create_connection((host, port), timeout=60)
h = hashlib.sha256(); left = size
while left:
    chunk = up[:min(left, len(up))]; c.sendall(chunk); h.update(chunk); left -= len(chunk)
c.shutdown(socket.SHUT_WR)
data = b""
while b"\n" not in data:
    b = c.recv(65536)
    if not b: break
    data += b
line, _, rest = data.partition(b"\n")
got = hashlib.sha256(); got.update(rest); n = len(rest)
while True:
    b = c.recv(1 << 20)
    if not b: break
    got.update(b); n += len(b)
down = hashlib.sha256(b"down").digest() * 4096
want = hashlib.sha256(); left = size
while left:
    want.update(down[:min(left, len(down))]); left -= min(left, len(down))
up_ok = line.decode() == "%d %s" % (size, h.hexdigest())
down_ok = n == size and got.hexdigest() == want.hexdigest()
print("ok" if up_ok and down_ok else "bad up=%r down=%d" % (line, n))
"#;

/// True when a TCP connect to 127.0.0.1:`port` in `ns` is refused.
fn refused(world: &World, ns: &Netns, port: u16) -> bool {
    let out = run_python(
        world,
        ns,
        r#"
import socket, sys
try:
    socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5).close(); print("open")
except ConnectionRefusedError:
    print("refused")
"#,
        &[&port.to_string()],
    );
    out == "refused"
}

#[test]
fn ipv6_host_sides_forward_to_the_guests_ipv4_address() {
    if !privileged() {
        return;
    }
    let api_dir = TempDir::new("api");
    let (world, sock) = world(&api_dir, &["-port-forward", &format!("[::1]:17101=192.168.127.2:{GUEST_PORT}")]);
    let guest = &world.guest(0).ns;
    let _sink = spawn_python(&world, guest, GUEST_SINK, &[&GUEST_PORT.to_string()]);
    assert!(wait_until(Duration::from_secs(10), || tcp_ready_in(guest, GUEST_PORT)), "guest server did not start");
    let expose = format!(r#"{{"local":"[::1]:17100","remote":"192.168.127.2:{GUEST_PORT}"}}"#);
    assert_eq!(api(&world, &sock, "POST", "/services/forwarder/expose", Some(&expose)), (200, String::new()));
    // Written as Go writes an IPv6 host and port.
    let (code, body) = api(&world, &sock, "GET", "/services/forwarder/all", None);
    assert_eq!(
        (code, body.as_str()),
        (
            200,
            "[{\"local\":\"[::1]:17100\",\"remote\":\"192.168.127.2:9001\",\"protocol\":\"tcp\"},\
             {\"local\":\"[::1]:17101\",\"remote\":\"192.168.127.2:9001\",\"protocol\":\"tcp\"}]\n"
        )
    );
    for port in [17100u16, 17101] {
        let out = run_python(&world, &world.host, HOST_CLIENT, &[&port.to_string(), "::1"]);
        assert_eq!(out, "ok", "32 MiB each way through [::1]:{port}\n{}", world.logs());
    }
    // Only ::1 listens: the IPv4 loopback does not.
    assert!(refused(&world, &world.host, 17100));
}

#[test]
fn static_and_api_forwards_carry_32mib_and_the_table_behaves_like_gvproxy() {
    if !privileged() {
        return;
    }
    let api_dir = TempDir::new("api");
    let static_fwd = format!("127.0.0.1:{STATIC_PORT}=192.168.127.2:{GUEST_PORT}");
    let (world, sock) = world(&api_dir, &["-port-forward", &static_fwd]);
    let guest = &world.guest(0).ns;
    let _sink = spawn_python(&world, guest, GUEST_SINK, &[&GUEST_PORT.to_string()]);
    assert!(wait_until(Duration::from_secs(10), || tcp_ready_in(guest, GUEST_PORT)), "guest server did not start");

    // The API starts with the static forward only.
    let (code, body) = api(&world, &sock, "GET", "/services/forwarder/all", None);
    assert_eq!(
        (code, body.as_str()),
        (200, "[{\"local\":\"127.0.0.1:16443\",\"remote\":\"192.168.127.2:9001\",\"protocol\":\"tcp\"}]\n")
    );

    let expose = format!(r#"{{"local":"127.0.0.1:{API_FWD_PORT}","remote":"192.168.127.2:{GUEST_PORT}"}}"#);
    assert_eq!(api(&world, &sock, "POST", "/services/forwarder/expose", Some(&expose)), (200, String::new()));

    for port in [STATIC_PORT, API_FWD_PORT] {
        let out = run_python(&world, &world.host, HOST_CLIENT, &[&port.to_string()]);
        assert_eq!(out, "ok", "32 MiB each way through 127.0.0.1:{port}\n{}", world.logs());
    }

    let (code, body) = api(&world, &sock, "GET", "/services/forwarder/all", None);
    assert_eq!(code, 200);
    assert_eq!(
        body,
        "[{\"local\":\"127.0.0.1:16443\",\"remote\":\"192.168.127.2:9001\",\"protocol\":\"tcp\"},\
         {\"local\":\"127.0.0.1:17000\",\"remote\":\"192.168.127.2:9001\",\"protocol\":\"tcp\"}]\n"
    );

    // A duplicate, then unexpose twice.
    assert_eq!(
        api(&world, &sock, "POST", "/services/forwarder/expose", Some(&expose)),
        (500, "proxy already running\n".to_string())
    );
    let unexpose = format!(r#"{{"local":"127.0.0.1:{API_FWD_PORT}","protocol":"tcp"}}"#);
    assert_eq!(api(&world, &sock, "POST", "/services/forwarder/unexpose", Some(&unexpose)), (200, String::new()));
    assert!(refused(&world, &world.host, API_FWD_PORT), "the port still accepts after unexpose");
    assert_eq!(
        api(&world, &sock, "POST", "/services/forwarder/unexpose", Some(&unexpose)),
        (500, "proxy not found\n".to_string())
    );

    // Malformed requests: Go's decoder messages, 400.
    assert_eq!(
        api(&world, &sock, "POST", "/services/forwarder/expose", Some("{not json")),
        (400, "invalid character 'n' looking for beginning of object key string\n".to_string())
    );
    assert_eq!(
        api(&world, &sock, "POST", "/services/forwarder/expose", Some(r#"{"local":1}"#)),
        (400, "json: cannot unmarshal number into Go struct field ExposeRequest.local of type string\n".to_string())
    );
    assert_eq!(api(&world, &sock, "GET", "/services/forwarder/expose", None), (400, "post only\n".to_string()));
    assert_eq!(api(&world, &sock, "GET", "/nothing", None), (404, "404 page not found\n".to_string()));

    // The static forward was not disturbed.
    let (_, body) = api(&world, &sock, "GET", "/services/forwarder/all", None);
    assert_eq!(body, "[{\"local\":\"127.0.0.1:16443\",\"remote\":\"192.168.127.2:9001\",\"protocol\":\"tcp\"}]\n");
}

#[test]
fn udp_and_unix_forwards_round_trip() {
    if !privileged() {
        return;
    }
    let api_dir = TempDir::new("api");
    let (world, sock) = world(&api_dir, &[]);
    let guest = &world.guest(0).ns;
    let _echo = spawn_python(
        &world,
        guest,
        r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
while True:
    data, peer = s.recvfrom(65535)
    s.sendto(b"echo:" + data, peer)
"#,
        &["9053"],
    );
    assert!(
        wait_until(Duration::from_secs(10), || {
            let out = guest.exec("ss", &["-Hlun", "sport = :9053"]);
            !out.stdout.is_empty()
        }),
        "guest UDP echo did not start"
    );
    let expose = r#"{"local":"127.0.0.1:15353","remote":"192.168.127.2:9053","protocol":"udp"}"#;
    assert_eq!(api(&world, &sock, "POST", "/services/forwarder/expose", Some(expose)), (200, String::new()));

    // Two host clients, each its own flow; each gets its own answers.
    let out = run_python(&world, &world.host, HOST_ASK_UDP, &["127.0.0.1", "15353"]);
    assert_eq!(out, "echo:one | echo:two | 1405 echo:x", "{}", world.logs());

    // unix: a socket file on the host, a TCP server in the guest. The reply
    // stays small (see the slow-reader test for why).
    let _sink = spawn_python(&world, guest, GUEST_SINK, &[&GUEST_PORT.to_string(), "65536"]);
    assert!(wait_until(Duration::from_secs(10), || tcp_ready_in(guest, GUEST_PORT)), "guest server did not start");
    let path = world.dir.join("fwd.sock");
    std::fs::write(&path, b"").ok(); // not a socket: must not be replaced
    let expose_unix =
        format!(r#"{{"local":"{}","remote":"tcp://192.168.127.2:{GUEST_PORT}","protocol":"unix"}}"#, path.display());
    let (code, body) = api(&world, &sock, "POST", "/services/forwarder/expose", Some(&expose_unix));
    assert_eq!(code, 500, "{body}");
    assert!(body.ends_with(": bind: address already in use\n"), "{body}");
    std::fs::remove_file(&path).ok();
    assert_eq!(api(&world, &sock, "POST", "/services/forwarder/expose", Some(&expose_unix)), (200, String::new()));
    let out = run_python(
        &world,
        &world.host,
        r#"
import socket, sys, hashlib
c = socket.socket(socket.AF_UNIX); c.settimeout(60); c.connect(sys.argv[1])
c.sendall(b"hello"); c.shutdown(socket.SHUT_WR)
parts = []
while True:
    b = c.recv(1 << 20)
    if not b: break
    parts.append(b)
line, _, rest = b"".join(parts).partition(b"\n")
print(line.decode(), len(rest))
"#,
        &[&path.display().to_string()],
    );
    let want = format!("5 {} 65536", sha256_hex(b"hello"));
    assert_eq!(out, want, "{}", world.logs());

    let (_, all) = api(&world, &sock, "GET", "/services/forwarder/all", None);
    assert_eq!(
        all,
        format!(
            "[{{\"local\":\"{}\",\"remote\":\"tcp://192.168.127.2:9001\",\"protocol\":\"unix\"}},\
             {{\"local\":\"127.0.0.1:15353\",\"remote\":\"192.168.127.2:9053\",\"protocol\":\"udp\"}}]\n",
            path.display()
        )
    );
    let unexpose = format!(r#"{{"local":"{}","protocol":"unix"}}"#, path.display());
    assert_eq!(api(&world, &sock, "POST", "/services/forwarder/unexpose", Some(&unexpose)), (200, String::new()));
    assert!(!path.exists(), "the unix socket file stays after unexpose");
}

#[test]
fn expose_from_inside_the_guest_with_the_callers_address() {
    if !privileged() {
        return;
    }
    let api_dir = TempDir::new("api");
    let (world, sock) = world(&api_dir, &[]);
    let guest = &world.guest(0).ns;
    let _sink = spawn_python(&world, guest, GUEST_SINK, &["8080"]);
    assert!(wait_until(Duration::from_secs(10), || tcp_ready_in(guest, 8080)), "guest server did not start");

    let url = "http://192.168.127.1:80/services/forwarder/expose";
    let body = r#"{"local":"127.0.0.1:18081","remote":":8080"}"#;
    let got = curl(&world, guest, &["-sS", "-m", "20", "-w", "\n@@%{http_code}", "--data-binary", body, url]);
    assert_eq!(got, (200, String::new()), "{}", world.logs());
    let got = curl(
        &world,
        guest,
        &["-sS", "-m", "20", "-w", "\n@@%{http_code}", "http://192.168.127.1/services/forwarder/all"],
    );
    assert_eq!(
        got,
        (200, "[{\"local\":\"127.0.0.1:18081\",\"remote\":\"192.168.127.2:8080\",\"protocol\":\"tcp\"}]\n".to_string())
    );
    // The forward works from the host.
    assert_eq!(run_python(&world, &world.host, HOST_CLIENT, &["18081"]), "ok", "{}", world.logs());
    // The API is the gateway's only: the host alias does not serve it.
    let out = guest.exec("curl", &["-sS", "-m", "5", "http://192.168.127.254/services/forwarder/all"]);
    assert!(!out.status.success(), "the host alias answered the API");
    // The host API sees the same table.
    let (_, all) = api(&world, &sock, "GET", "/services/forwarder/all", None);
    assert_eq!(all, "[{\"local\":\"127.0.0.1:18081\",\"remote\":\"192.168.127.2:8080\",\"protocol\":\"tcp\"}]\n");
}

#[test]
fn leases_cam_stats_and_dns_zones() {
    if !privileged() {
        return;
    }
    let api_dir = TempDir::new("api");
    let (world, sock) = world(&api_dir, &[]);
    // IPv4 leases, then IPv6 addresses: the gateway's, and the guest's once
    // its kernel has used them (SLAAC takes a DAD round).
    let expected = concat!(
        "{\"192.168.127.1\":\"5a:94:ef:e4:0c:dd\",\"192.168.127.2\":\"5a:94:ef:e4:0c:ee\",",
        "\"fd5a:94ef:e40c:0:5894:efff:fee4:cee\":\"5a:94:ef:e4:0c:ee\",\"fd5a:94ef:e40c::1\":\"5a:94:ef:e4:0c:dd\",",
        "\"fe80::5894:efff:fee4:cdd\":\"5a:94:ef:e4:0c:dd\",\"fe80::5894:efff:fee4:cee\":\"5a:94:ef:e4:0c:ee\"}\n"
    );
    let mut body = String::new();
    let listed = wait_until(Duration::from_secs(15), || {
        let (code, b) = api(&world, &sock, "GET", "/services/dhcp/leases", None);
        body = b;
        if body != expected {
            // Make the guest use its global address.
            world.guest(0).ns.exec("ping", &["-6", "-c", "1", "-W", "1", "fd5a:94ef:e40c::1"]);
        }
        code == 200 && body == expected
    });
    assert!(listed, "{body}\n{}", world.logs());
    let (code, body) = api(&world, &sock, "GET", "/cam", None);
    assert_eq!(code, 200);
    assert!(body.starts_with("{\"5a:94:ef:e4:0c:ee\":") && body.ends_with("}\n"), "{body}");

    let (code, body) = api(&world, &sock, "GET", "/stats", None);
    assert_eq!(code, 200);
    for key in ["\"BytesSent\":", "\"frames_in\":", "\"flows\":{", "\"drops\":{", "\"dhcp_leases\":1", "\"dns\":{"] {
        assert!(body.contains(key), "{key} missing from {body}");
    }

    let zone = r#"{"Name":"example.internal.","Records":[{"Name":"db","IP":"192.168.127.9"}]}"#;
    assert_eq!(api(&world, &sock, "POST", "/services/dns/add", Some(zone)), (200, String::new()));
    let (_, zones) = api(&world, &sock, "GET", "/services/dns/all", None);
    assert!(
        zones.ends_with(
            ",{\"Name\":\"example.internal.\",\"Records\":[{\"Name\":\"db\",\"IP\":\"192.168.127.9\"}],\"DefaultIP\":\"\"}]\n"
        ),
        "{zones}"
    );
    let out =
        world.guest(0).ns.stdout("dig", &["+short", "+time=3", "+tries=1", "@192.168.127.1", "db.example.internal"]);
    assert_eq!(out.trim(), "192.168.127.9", "{}", world.logs());
}

#[test]
fn oversized_bodies_and_busy_ports_leave_nothing_behind() {
    if !privileged() {
        return;
    }
    let api_dir = TempDir::new("api");
    let (world, sock) = world(&api_dir, &[]);

    // 4 MiB of body: refused, and the API goes on answering.
    let big = api_dir.join("big.json");
    let mut data = br#"{"local":"127.0.0.1:19000","remote":"192.168.127.2:1","pad":""#.to_vec();
    data.resize(4 * 1024 * 1024 - 2, b'a');
    data.extend_from_slice(b"\"}");
    std::fs::write(&big, &data).expect("write body");
    let arg = format!("@{}", big.display());
    let (code, _) = api(&world, &sock, "POST", "/services/forwarder/expose", Some(&arg));
    assert!(code == 413 || code == 400, "4 MiB body got {code}");
    assert_eq!(api(&world, &sock, "GET", "/services/forwarder/all", None), (200, "[]\n".to_string()));

    // A port another program holds: 500 with the OS's reason, nothing added.
    let _holder = spawn_python(
        &world,
        &world.host,
        r#"
import socket, time
s = socket.socket(); s.bind(("127.0.0.1", 19001)); s.listen(1)
time.sleep(600)
"#,
        &[],
    );
    assert!(wait_until(Duration::from_secs(10), || tcp_ready_in(&world.host, 19001)), "holder did not start");
    let expose = r#"{"local":"127.0.0.1:19001","remote":"192.168.127.2:9001"}"#;
    assert_eq!(
        api(&world, &sock, "POST", "/services/forwarder/expose", Some(expose)),
        (500, "listen tcp 127.0.0.1:19001: bind: address already in use\n".to_string())
    );
    assert_eq!(api(&world, &sock, "GET", "/services/forwarder/all", None), (200, "[]\n".to_string()));
    // And the same forward works once the port is free elsewhere.
    let expose = r#"{"local":"127.0.0.1:19002","remote":"192.168.127.2:9001"}"#;
    assert_eq!(api(&world, &sock, "POST", "/services/forwarder/expose", Some(expose)), (200, String::new()));
}

/// The host half-closes at once and then reads slowly through a unix
/// forward (small socket buffers), so the guest's FIN arrives while the last
/// of its data still waits in the gateway's TCP buffer: every byte must
/// still reach the host.
#[test]
fn a_slow_host_reader_gets_every_byte_after_the_guest_closes() {
    if !privileged() {
        return;
    }
    let api_dir = TempDir::new("api");
    let (world, sock) = world(&api_dir, &[]);
    let guest = &world.guest(0).ns;
    let _sink = spawn_python(&world, guest, GUEST_SINK, &[&GUEST_PORT.to_string(), "4194304"]);
    assert!(wait_until(Duration::from_secs(10), || tcp_ready_in(guest, GUEST_PORT)), "guest server did not start");
    let path = api_dir.join("slow.sock");
    let expose =
        format!(r#"{{"local":"{}","remote":"tcp://192.168.127.2:{GUEST_PORT}","protocol":"unix"}}"#, path.display());
    assert_eq!(api(&world, &sock, "POST", "/services/forwarder/expose", Some(&expose)), (200, String::new()));
    let out = run_python(
        &world,
        &world.host,
        r#"
import socket, sys, time
c = socket.socket(socket.AF_UNIX); c.settimeout(60); c.connect(sys.argv[1])
c.shutdown(socket.SHUT_WR)
n = 0
while True:
    b = c.recv(16384)
    if not b: break
    n += len(b)
    time.sleep(0.001)
print(n)
"#,
        &[&path.display().to_string()],
    );
    // "0 <sha256 of nothing>\n" and then 4 MiB.
    assert_eq!(out, (4 * 1024 * 1024 + 67).to_string(), "{}", world.logs());
}

/// What SLAAC gives the default device MAC, and the gateway's IPv6 address.
const GUEST6: &str = "fd5a:94ef:e40c:0:5894:efff:fee4:cee";
const GATEWAY6: &str = "fd5a:94ef:e40c::1";

/// `world`, with the guest's SLAAC address usable (past duplicate address
/// detection). The gateway has not heard from that address: it finds the
/// guest by neighbour solicitation when a forward first sends to it.
fn dual_stack_world(api_dir: &TempDir) -> (World, PathBuf) {
    let (world, sock) = world(api_dir, &[]);
    let ns = &world.guest(0).ns;
    let ready = wait_until(Duration::from_secs(20), || {
        let text = ns.stdout("ip", &["-6", "-o", "addr", "show", "dev", "eth0", "scope", "global"]);
        text.lines().any(|l| l.contains(GUEST6) && !l.contains("tentative"))
    });
    assert!(ready, "no SLAAC address\n{}", world.logs());
    (world, sock)
}

/// In the guest, IPv6 only: per TCP connection, read to EOF and answer the
/// data upper-cased and who sent it; per UDP datagram, echo it with who
/// sent it.
const GUEST_SERVER6: &str = r#"
import socket, sys, threading
port = int(sys.argv[1])
def udp():
    u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    u.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    u.bind(("::", port))
    while True:
        data, peer = u.recvfrom(65535)
        u.sendto(b"echo:" + data + b" from " + peer[0].encode(), peer)
threading.Thread(target=udp, daemon=True).start()
t = socket.socket(socket.AF_INET6); t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
t.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
t.bind(("::", port)); t.listen(8)
while True:
    c, peer = t.accept()
    data = b""
    while True:
        b = c.recv(65536)
        if not b: break
        data += b
    c.sendall(data.upper() + b" from " + peer[0].encode())
    c.close()
"#;

/// On the host: one TCP exchange with argv[1]:argv[2] (a host and port, or
/// a unix socket path and "unix"); prints the answer.
const HOST_ASK_TCP: &str = r#"
import socket, sys
if sys.argv[2] == "unix":
    c = socket.socket(socket.AF_UNIX); c.settimeout(20); c.connect(sys.argv[1])
else:
    c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=20)
c.sendall(b"hello v6"); c.shutdown(socket.SHUT_WR)
data = b""
while True:
    b = c.recv(65536)
    if not b: break
    data += b
print(data.decode())
"#;

/// On the host: two UDP clients (each its own flow) ask argv[1]:argv[2]
/// ("one" from the first, "two" from the second, 1400 bytes from the first
/// again, each retried until answered); prints the answers.
const HOST_ASK_UDP: &str = r#"
import socket, sys
family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
a = socket.socket(family, socket.SOCK_DGRAM); a.settimeout(0.5)
b = socket.socket(family, socket.SOCK_DGRAM); b.settimeout(0.5)
def ask(s, msg):
    for _ in range(20):
        s.sendto(msg, (sys.argv[1], int(sys.argv[2])))
        try:
            data, _ = s.recvfrom(65535)
            return data
        except socket.timeout:
            pass
    return b"timeout"
r1 = ask(a, b"one"); r2 = ask(b, b"two"); r3 = ask(a, b"x" * 1400)
print(r1.decode(), "|", r2.decode(), "|", len(r3), r3[:6].decode())
"#;

#[test]
fn tcp_udp_and_unix_forwards_reach_an_ipv6_guest() {
    if !privileged() {
        return;
    }
    let api_dir = TempDir::new("api");
    let (world, sock) = dual_stack_world(&api_dir);
    let guest = &world.guest(0).ns;
    let _server = spawn_python(&world, guest, GUEST_SERVER6, &[&GUEST_PORT.to_string()]);
    assert!(
        wait_until(Duration::from_secs(10), || tcp_ready_in(guest, GUEST_PORT)
            && rdnet_e2e::udp_ready_in(guest, GUEST_PORT)),
        "guest server did not start"
    );
    let unix_path = api_dir.join("fwd6.sock");
    let exposes = [
        format!(r#"{{"local":"[::1]:17200","remote":"[{GUEST6}]:{GUEST_PORT}","protocol":"tcp"}}"#),
        format!(r#"{{"local":"[::1]:17201","remote":"[{GUEST6}]:{GUEST_PORT}","protocol":"udp"}}"#),
        format!(r#"{{"local":"{}","remote":"tcp://[{GUEST6}]:{GUEST_PORT}","protocol":"unix"}}"#, unix_path.display()),
    ];
    for e in &exposes {
        assert_eq!(api(&world, &sock, "POST", "/services/forwarder/expose", Some(e)), (200, String::new()), "{e}");
    }
    let (code, body) = api(&world, &sock, "GET", "/services/forwarder/all", None);
    assert_eq!(code, 200);
    assert_eq!(
        body,
        format!(
            "[{{\"local\":\"{}\",\"remote\":\"tcp://[{GUEST6}]:9001\",\"protocol\":\"unix\"}},\
             {{\"local\":\"[::1]:17200\",\"remote\":\"[{GUEST6}]:9001\",\"protocol\":\"tcp\"}},\
             {{\"local\":\"[::1]:17201\",\"remote\":\"[{GUEST6}]:9001\",\"protocol\":\"udp\"}}]\n",
            unix_path.display()
        )
    );

    // TCP and unix: the guest sees the connection come from the gateway's
    // IPv6 address.
    let want = format!("HELLO V6 from {GATEWAY6}");
    assert_eq!(run_python(&world, &world.host, HOST_ASK_TCP, &["::1", "17200"]), want, "{}", world.logs());
    let path = unix_path.display().to_string();
    assert_eq!(run_python(&world, &world.host, HOST_ASK_TCP, &[&path, "unix"]), want, "{}", world.logs());

    // UDP: two host clients, each its own flow and its own answers.
    let out = run_python(&world, &world.host, HOST_ASK_UDP, &["::1", "17201"]);
    let gw_len = GATEWAY6.len() + " from ".len();
    assert_eq!(
        out,
        format!("echo:one from {GATEWAY6} | echo:two from {GATEWAY6} | {} echo:x", 1405 + gw_len),
        "{}",
        world.logs()
    );
    let (_, stats) = api(&world, &sock, "GET", "/stats", None);
    assert!(stats.contains("\"udp_flows_opened\":2,"), "{stats}");
    assert!(stats.contains("\"udp_dropped\":0"), "{stats}");
}

fn sha256_hex(data: &[u8]) -> String {
    let out = std::process::Command::new("python3")
        .args(["-c", "import hashlib,sys; print(hashlib.sha256(sys.argv[1].encode()).hexdigest())"])
        .arg(String::from_utf8_lossy(data).as_ref())
        .output()
        .expect("python3");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}
