//! wsl-proxy end to end: two fresh namespaces joined by a veth stand for
//! WSL's default namespace (where wsl-proxy runs and clients connect to
//! localhost) and the distro's namespace (where the published services
//! listen). Port mappings are written to wsl-proxy's unix socket as the guest
//! agent does; real clients (curl, python3) and servers (busybox httpd,
//! python3) check what gets through. Traffic stays on loopback and on the
//! test's own veth.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::sleep;
use std::time::Duration;

use rdnet_e2e::{Netns, Proc, TempDir, bin, privileged, socket_exists, unique, veth, wait_until};

static SUBNET: AtomicU32 = AtomicU32::new(0);

/// Reads until EOF, answers `got:<byte count>`, closes: proves half-close.
const TCP_COUNT_SERVER: &str = r#"
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(16)
while True:
    c, _ = s.accept()
    n = 0
    while True:
        b = c.recv(65536)
        if not b:
            break
        n += len(b)
    c.sendall(b"got:%d" % n)
    c.close()
"#;

/// Sends N bytes (pausing halfway for the optional argv[4] seconds), shuts
/// down its write side, prints what comes back.
const TCP_COUNT_CLIENT: &str = r#"
import socket, sys, time
n = int(sys.argv[3])
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
c.sendall(b"x" * (n // 2))
time.sleep(float(sys.argv[4]) if len(sys.argv) > 4 else 0)
c.sendall(b"x" * (n - n // 2))
c.shutdown(socket.SHUT_WR)
d = b""
while True:
    b = c.recv(65536)
    if not b:
        break
    d += b
sys.stdout.write(d.decode())
"#;

const UDP_ECHO_SERVER: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
while True:
    d, a = s.recvfrom(65535)
    s.sendto(b"echo:" + d, a)
"#;

/// Two clients on connected sockets (which accept replies only from the
/// address they sent to), each expecting its own echo; argv[3], if given,
/// is the clients' own address.
const UDP_CLIENT: &str = r#"
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
socks = [socket.socket(fam, socket.SOCK_DGRAM) for _ in range(2)]
for s in socks:
    s.settimeout(1)
    if len(sys.argv) > 3:
        s.bind((sys.argv[3], 0))
    s.connect((host, port))
for i, s in enumerate(socks):
    s.send(b"hello%d" % i)
print(" ".join(s.recv(65535).decode() for s in socks))
"#;

/// Answers each datagram with its length.
const UDP_LEN_SERVER: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
while True:
    d, a = s.recvfrom(65535)
    s.sendto(b"%d" % len(d), a)
"#;

/// Sends one datagram of argv[3] bytes, prints the answer.
const UDP_SIZE_CLIENT: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(1)
s.connect((sys.argv[1], int(sys.argv[2])))
s.send(b"x" * int(sys.argv[3]))
print(s.recv(65535).decode())
"#;

/// Rancher Desktop's veth layout (COMPAT §5): the distro end, which is
/// wsl-proxy's default upstream, and WSL's end.
const RD_DISTRO_ADDR: &str = "192.168.143.1";
const RD_WSL_ADDR: &str = "192.168.143.2";

/// Starts wsl-proxy exactly as Rancher Desktop does (COMPAT §8), socket and
/// upstream at their defaults, in a private mount namespace whose /run is
/// its own tmpfs, so the default /run/wsl-proxy.sock is never the
/// machine's. `$0` is the binary, `$1` the log directory.
const RD_START: &str =
    r#"mount -t tmpfs -o mode=0755 rdnet-run /run && exec "$0" -debug=false -logfile="$1/wsl-proxy.log""#;

/// The default namespace, the distro's namespace, and wsl-proxy.
struct World {
    proxy: Proc,
    servers: Vec<Proc>,
    /// WSL's default namespace: wsl-proxy and the clients.
    def: Netns,
    /// The distro's namespace: the published services.
    distro: Netns,
    /// The distro side of the veth, wsl-proxy's upstream.
    upstream: String,
    sock: PathBuf,
    log: PathBuf,
    dir: TempDir,
}

impl World {
    /// A veth of the test's own subnet, and wsl-proxy told its upstream
    /// (every Go spelling of the flags): the Go original ignored
    /// `-upstreamAddress`.
    fn new(name: &str, extra: &[&str]) -> World {
        let n = SUBNET.fetch_add(1, Ordering::Relaxed) % 200 + 10;
        let prefix = format!("10.{}.{n}", 90 + std::process::id() % 50);
        World::with_upstream(name, &format!("{prefix}.1"), &format!("{prefix}.2"), extra)
    }

    fn with_upstream(name: &str, wsl_addr: &str, distro_addr: &str, extra: &[&str]) -> World {
        let dir = TempDir::new(name);
        let (def, distro) = namespaces(wsl_addr, distro_addr);
        let sock = dir.join("wsl-proxy.sock");
        let log = dir.join("wsl-proxy.log");
        let mut args = vec![
            "-debug".to_string(),
            format!("--socketFile={}", sock.display()),
            "-upstreamAddress".to_string(),
            distro_addr.to_string(),
            "--logfile".to_string(),
            log.display().to_string(),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        let proxy = def.spawn(&dir, bin("wsl-proxy"), &args);
        let upstream = distro_addr.to_string();
        let mut w = World { proxy, servers: Vec::new(), def, distro, upstream, sock, log, dir };
        w.wait_ready();
        w
    }

    /// Rancher Desktop's layout and argv; the test reaches the socket
    /// through wsl-proxy's own root (`/proc/PID/root`).
    fn rancher_desktop(name: &str) -> World {
        let dir = TempDir::new(name);
        let (def, distro) = namespaces(RD_WSL_ADDR, RD_DISTRO_ADDR);
        let binary = bin("wsl-proxy").display().to_string();
        let log_dir = dir.path.display().to_string();
        let args = ["--mount", "--propagation", "private", "sh", "-c", RD_START, &binary, &log_dir];
        let proxy = def.spawn(&dir, "unshare", &args);
        // `ip netns exec`, unshare and sh each exec the next: one PID.
        let sock = PathBuf::from(format!("/proc/{}/root/run/wsl-proxy.sock", proxy.pid()));
        let log = dir.join("wsl-proxy.log");
        let upstream = RD_DISTRO_ADDR.to_string();
        let mut w = World { proxy, servers: Vec::new(), def, distro, upstream, sock, log, dir };
        w.wait_ready();
        w
    }

    fn wait_ready(&mut self) {
        assert!(wait_until(Duration::from_secs(10), || socket_exists(&self.sock)), "no socket: {}", self.logs());
        assert!(self.proxy.try_wait().is_none(), "wsl-proxy exited: {}", self.logs());
    }

    fn logs(&self) -> String {
        format!("{}\n{}", self.proxy.logs(), std::fs::read_to_string(&self.log).unwrap_or_default())
    }

    /// A web server in the distro on `upstream:port` serving `/hello.txt`.
    fn http_server(&mut self, port: u16, body: &str) {
        let www = self.dir.join(format!("www{port}"));
        std::fs::create_dir_all(&www).unwrap();
        std::fs::write(www.join("hello.txt"), body).unwrap();
        let addr = format!("{}:{port}", self.upstream);
        let p = self.distro.spawn(&self.dir, "busybox", &["httpd", "-f", "-p", &addr, "-h", www.to_str().unwrap()]);
        self.servers.push(p);
        let url = format!("http://{addr}/hello.txt");
        assert!(wait_until(Duration::from_secs(10), || curl(&self.distro, &url).as_deref() == Some(body)));
    }

    fn python_server(&mut self, script: &str, port: u16) {
        let p = self.distro.spawn(&self.dir, "python3", &["-c", script, &self.upstream, &port.to_string()]);
        self.servers.push(p);
    }

    /// Writes one message to the control socket, as the guest agent does
    /// (Go's `json.Encoder`: the object and a newline, then close).
    fn send(&self, body: &str) {
        let mut c = UnixStream::connect(&self.sock).unwrap_or_else(|e| panic!("connect {:?}: {e}", self.sock));
        c.write_all(format!("{body}\n").as_bytes()).unwrap();
    }

    fn publish(&self, remove: bool, proto: &str, ip: &str, port: u16) {
        let binding = format!(r#"{{"HostIp":"{ip}","HostPort":"{port}"}}"#);
        self.send(&format!(r#"{{"remove":{remove},"ports":{{"{port}/{proto}":[{binding}]}},"connectAddrs":null}}"#));
    }

    fn log_count(&self, text: &str) -> usize {
        std::fs::read_to_string(&self.log).unwrap_or_default().matches(text).count()
    }

    /// Waits until the log shows `n` lines containing `text`.
    fn wait_log(&self, text: &str, n: usize) {
        let ok = wait_until(Duration::from_secs(10), || self.log_count(text) >= n);
        assert!(ok, "log never showed {n}× {text:?}:\n{}", self.logs());
    }

    /// The UDP echo through wsl-proxy at `host:port` (from `bind`, if
    /// given), retried until it answers or 10 s pass.
    fn udp_echo(&self, host: &str, port: u16, bind: Option<&str>) -> String {
        let port = port.to_string();
        let mut args = vec!["-c", UDP_CLIENT, host, &port];
        args.extend(bind);
        let mut answer = String::new();
        wait_until(Duration::from_secs(10), || {
            let out = self.def.exec("python3", &args);
            answer = String::from_utf8_lossy(&out.stdout).trim().to_string();
            answer == "echo:hello0 echo:hello1"
        });
        answer
    }
}

/// WSL's default namespace and the distro's, joined by a veth.
fn namespaces(wsl_addr: &str, distro_addr: &str) -> (Netns, Netns) {
    let def = Netns::new("wpd");
    let distro = Netns::new("wpn");
    veth(&def, &unique("wpa"), &format!("{wsl_addr}/24"), &distro, &unique("wpb"), &format!("{distro_addr}/24"));
    (def, distro)
}

/// `curl` in `ns`; the body on success.
fn curl(ns: &Netns, url: &str) -> Option<String> {
    let out = ns.exec("curl", &["-sS", "-g", "--max-time", "3", url]);
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn tcp_reaches_the_distro_through_upstream_address() {
    if !privileged() {
        return;
    }
    // The seed's layout: its upstream, 192.168.1.2, is a flag away.
    let mut w = World::with_upstream("wsl-tcp", "192.168.1.1", "192.168.1.2", &[]);
    w.http_server(8080, "hello from the distro\n");
    w.python_server(TCP_COUNT_SERVER, 9000);

    // Nothing is published yet.
    assert_eq!(curl(&w.def, "http://127.0.0.1:8080/hello.txt"), None);

    w.publish(false, "tcp", "127.0.0.1", 8080);
    let ok = wait_until(Duration::from_secs(10), || {
        curl(&w.def, "http://127.0.0.1:8080/hello.txt").as_deref() == Some("hello from the distro\n")
    });
    assert!(ok, "curl through wsl-proxy failed:\n{}", w.logs());

    // Half-close: the server answers only after our EOF reached it, and its
    // answer still comes back; 1 MB so the copy loops run many times.
    w.publish(false, "TCP", "127.0.0.1", 9000);
    let mut answer = String::new();
    let ok = wait_until(Duration::from_secs(10), || {
        let out = w.def.exec("python3", &["-c", TCP_COUNT_CLIENT, "127.0.0.1", "9000", "1000000"]);
        answer = String::from_utf8_lossy(&out.stdout).into_owned();
        answer == "got:1000000"
    });
    assert!(ok, "half-close round trip: {answer:?}\n{}", w.logs());

    // Removing the listener lets a live connection finish, but takes no new
    // ones.
    let before = w.log_count(": connected");
    let live = w.def.spawn(&w.dir, "python3", &["-c", TCP_COUNT_CLIENT, "127.0.0.1", "9000", "200000", "2"]);
    w.wait_log(": connected", before + 1);
    w.publish(true, "tcp", "127.0.0.1", 9000);
    w.wait_log("removed 127.0.0.1:9000/tcp", 1);
    let refused = w.def.exec("python3", &["-c", TCP_COUNT_CLIENT, "127.0.0.1", "9000", "10"]);
    assert!(!refused.status.success(), "a new connection after removal was accepted");
    let ok = wait_until(Duration::from_secs(10), || live.logs().contains("got:200000"));
    assert!(ok, "live connection after removal: {}\n{}", live.logs(), w.logs());
    assert!(std::fs::read_to_string(&w.log).unwrap().contains("published"), "{}", w.logs());
}

#[test]
fn udp_round_trip() {
    if !privileged() {
        return;
    }
    let mut w = World::new("wsl-udp", &["-udpBuffer", "4096"]);
    w.python_server(UDP_ECHO_SERVER, 5353);
    w.publish(false, "udp", "127.0.0.1", 5353);
    w.wait_log("published", 1);
    let answer = w.udp_echo("127.0.0.1", 5353, None);
    assert_eq!(answer, "echo:hello0 echo:hello1", "udp echo through wsl-proxy:\n{}", w.logs());
    // The same port over TCP is another listener and is not published.
    assert_eq!(curl(&w.def, "http://127.0.0.1:5353/"), None);

    // -udpBuffer 4096: a datagram that fits goes through whole; a longer one
    // is cut to 4096 bytes, as Go's wsl-proxy does, and the log says so
    // once. (The server answers with the length it got.)
    w.python_server(UDP_LEN_SERVER, 5354);
    w.publish(false, "udp", "127.0.0.1", 5354);
    w.wait_log("published", 2);
    let size = |n: &str| {
        let mut got = String::new();
        wait_until(Duration::from_secs(10), || {
            let out = w.def.exec("python3", &["-c", UDP_SIZE_CLIENT, "127.0.0.1", "5354", n]);
            got = String::from_utf8_lossy(&out.stdout).trim().to_string();
            !got.is_empty()
        });
        got
    };
    assert_eq!(size("100"), "100", "{}", w.logs());
    assert_eq!(size("4096"), "4096", "{}", w.logs());
    assert_eq!(w.log_count("longer than -udpBuffer"), 0, "{}", w.logs());
    assert_eq!(size("6000"), "4096", "{}", w.logs());
    assert_eq!(size("6000"), "4096", "{}", w.logs());
    w.wait_log("cut to 4096 bytes", 1);
    assert_eq!(w.log_count("longer than -udpBuffer"), 1, "{}", w.logs());
}

#[test]
fn ipv6_binding_survives_removing_the_ipv4_one() {
    if !privileged() {
        return;
    }
    let mut w = World::new("wsl-v6", &[]);
    w.http_server(8080, "v6 ok\n");
    let v4 = "http://127.0.0.1:8080/hello.txt";
    let v6 = "http://[::1]:8080/hello.txt";

    w.send(concat!(
        r#"{"remove":false,"ports":{"8080/tcp":["#,
        r#"{"HostIp":"127.0.0.1","HostPort":"8080"},{"HostIp":"::1","HostPort":"8080"}"#,
        r#"]},"connectAddrs":null}"#
    ));
    let ok = wait_until(Duration::from_secs(10), || {
        curl(&w.def, v4).as_deref() == Some("v6 ok\n") && curl(&w.def, v6).as_deref() == Some("v6 ok\n")
    });
    assert!(ok, "both bindings:\n{}", w.logs());

    // A duplicate publish (bracketed spelling of the same address) is a no-op.
    w.publish(false, "tcp", "[::1]", 8080);
    w.wait_log("already published", 1);
    assert_eq!(curl(&w.def, v6).as_deref(), Some("v6 ok\n"));

    // Removing 127.0.0.1:8080 leaves [::1]:8080 alone.
    w.publish(true, "tcp", "127.0.0.1", 8080);
    assert!(wait_until(Duration::from_secs(10), || curl(&w.def, v4).is_none()), "v4 still open:\n{}", w.logs());
    assert_eq!(curl(&w.def, v6).as_deref(), Some("v6 ok\n"), "{}", w.logs());

    // And it can be published again.
    w.publish(false, "tcp", "127.0.0.1", 8080);
    let ok = wait_until(Duration::from_secs(10), || curl(&w.def, v4).as_deref() == Some("v6 ok\n"));
    assert!(ok, "re-published v4:\n{}", w.logs());
}

#[test]
fn invalid_json_changes_nothing() {
    if !privileged() {
        return;
    }
    let mut w = World::new("wsl-bad", &[]);
    w.http_server(8080, "still here\n");
    let url = "http://127.0.0.1:8080/hello.txt";
    w.publish(false, "tcp", "127.0.0.1", 8080);
    assert!(wait_until(Duration::from_secs(10), || curl(&w.def, url).is_some()), "{}", w.logs());

    w.send("this is not json");
    w.send(r#"{"remove":true,"ports":{"8080/tcp":[{"HostIp":"127.0.0.1","HostPort":"8080"}]"#); // truncated
    w.send(r#"{"remove":"yes","ports":{"8080/tcp":[{"HostIp":"127.0.0.1","HostPort":"8080"}]}}"#);
    // A bad entry costs only itself: nothing else in this message to apply.
    w.send(r#"{"remove":true,"ports":{"8080/tcp":[{"HostIp":"127.0.0.1","HostPort":"80x"}]}}"#);
    w.wait_log("ignoring port mapping", 3);
    w.wait_log(r#"skipping port mapping entry "8080/tcp": HostPort "80x""#, 1);
    assert!(w.proxy.try_wait().is_none(), "wsl-proxy exited:\n{}", w.logs());
    assert_eq!(curl(&w.def, url).as_deref(), Some("still here\n"), "{}", w.logs());
}

#[test]
fn socket_is_private_and_sigterm_cleans_up() {
    if !privileged() {
        return;
    }
    let dir = TempDir::new("wsl-sig");
    let def = Netns::new("wps");
    let sock = dir.join("proxy.sock");
    // A stale socket file from an earlier run is replaced.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(socket_exists(&sock));
    let mut proxy = def.spawn(
        &dir,
        bin("wsl-proxy"),
        &["-socketFile", sock.to_str().unwrap(), "-upstreamAddress=10.1.2.3", "-logfile=/dev/stdout", "-debug=false"],
    );
    assert!(
        wait_until(Duration::from_secs(10), || proxy.logs().contains("listening")),
        "never listened:\n{}",
        proxy.logs()
    );
    assert!(socket_exists(&sock));
    assert_eq!(mode(&sock), 0o600, "socket mode");
    assert!(UnixStream::connect(&sock).is_ok());
    sleep(Duration::from_millis(100));

    let status = proxy.terminate(Duration::from_secs(10)).expect("wsl-proxy did not exit on SIGTERM");
    assert_eq!(status.code(), Some(0), "exit status {status:?}:\n{}", proxy.logs());
    assert!(!sock.exists(), "socket file left behind");
}

/// Rancher Desktop's own command line, socket and upstream by default: an
/// empty HostIp is reachable on every address of both families, TCP and
/// UDP; one unusable key is skipped (and logged once) while the rest of its
/// message applies, also for a removal.
#[test]
fn rancher_desktop_argv_and_layout() {
    if !privileged() {
        return;
    }
    // The machine's own socket file, which this test must never create.
    let machine_sock = Path::new("/run/wsl-proxy.sock");
    let machine_had_it = machine_sock.exists();
    let mut w = World::rancher_desktop("wsl-rd");
    assert_eq!(mode(&w.sock), 0o600, "socket mode");
    assert_eq!(machine_sock.exists(), machine_had_it, "the machine's /run was touched");
    let lo = w.def.stdout("ip", &["-6", "addr", "show", "dev", "lo"]);
    assert!(lo.contains("::1/128"), "no ::1 in the WSL namespace:\n{lo}");
    // Two more loopback addresses, for a client that must get its UDP reply
    // from the address it wrote to.
    w.def.exec_ok("ip", &["-6", "addr", "add", "fd00:143::2/128", "dev", "lo", "nodad"]);
    w.def.exec_ok("ip", &["-6", "addr", "add", "fd00:143::3/128", "dev", "lo", "nodad"]);

    w.http_server(8080, "from the distro\n");
    w.python_server(UDP_ECHO_SERVER, 5353);
    w.send(concat!(
        r#"{"remove":false,"ports":{"#,
        r#""7000/sctp":[{"HostIp":"","HostPort":"7000"}],"#,
        r#""8080/tcp":[{"HostIp":"","HostPort":"8080"}],"#,
        r#""5353/udp":[{"HostPort":"5353"}]"#,
        r#"},"connectAddrs":null}"#
    ));
    w.wait_log("published", 2);
    assert!(w.logs().contains("on [::]:8080 (IPv4 and IPv6)"), "{}", w.logs());

    for url in ["http://127.0.0.1:8080/hello.txt", "http://[::1]:8080/hello.txt", "http://192.168.143.2:8080/hello.txt"]
    {
        assert_eq!(curl(&w.def, url).as_deref(), Some("from the distro\n"), "{url}:\n{}", w.logs());
    }
    for host in ["127.0.0.1", "::1"] {
        assert_eq!(w.udp_echo(host, 5353, None), "echo:hello0 echo:hello1", "udp {host}:\n{}", w.logs());
    }
    // Replies come from the address the client wrote to, not the kernel's
    // pick for the way back (127.0.0.1, fd00:143::2), which a connected
    // client would drop.
    assert_eq!(w.udp_echo("127.0.0.2", 5353, None), "echo:hello0 echo:hello1", "{}", w.logs());
    assert_eq!(w.udp_echo("fd00:143::3", 5353, Some("fd00:143::2")), "echo:hello0 echo:hello1", "{}", w.logs());
    assert_eq!(w.log_count(r#""7000/sctp""#), 1, "the bad key is logged once:\n{}", w.logs());
    assert_eq!(w.log_count("ignoring port mapping"), 0, "{}", w.logs());

    // A removal with bad entries removes the good ones.
    w.send(concat!(
        r#"{"remove":true,"ports":{"#,
        r#""7000/sctp":[{"HostIp":"","HostPort":"7000"}],"#,
        r#""8080/tcp":[{"HostIp":"","HostPort":"8080"},{"HostIp":"not-an-ip","HostPort":"8080"}]"#,
        r#"},"connectAddrs":null}"#
    ));
    w.wait_log("removed *:8080/tcp", 1);
    assert_eq!(curl(&w.def, "http://127.0.0.1:8080/hello.txt"), None, "{}", w.logs());
    assert_eq!(curl(&w.def, "http://[::1]:8080/hello.txt"), None, "{}", w.logs());
    assert_eq!(w.log_count(r#""7000/sctp""#), 2, "{}", w.logs());
    assert_eq!(w.log_count(r#"HostIp "not-an-ip""#), 1, "{}", w.logs());
    // The UDP port, not named in the removal, stays.
    assert_eq!(w.udp_echo("::1", 5353, None), "echo:hello0 echo:hello1", "{}", w.logs());

    let status = w.proxy.terminate(Duration::from_secs(10)).expect("wsl-proxy did not exit on SIGTERM");
    assert_eq!(status.code(), Some(0), "exit status {status:?}:\n{}", w.logs());
    assert_eq!(machine_sock.exists(), machine_had_it, "the machine's /run was touched");
}

/// A bad flag value is a usage error (exit 2, Go's wording) found before
/// anything is opened: no socket, no log file.
#[test]
fn bad_flag_values_exit_2_before_opening_anything() {
    if !privileged() {
        return;
    }
    let dir = TempDir::new("wsl-flags");
    let sock = dir.join("s.sock");
    let log = dir.join("l.log");
    let cases = [
        ("-udpBuffer=0", r#"invalid value "0" for flag -udpBuffer: must be between 1 and 1073741824"#),
        ("-udpBuffer=8MB", r#"invalid value "8MB" for flag -udpBuffer: parse error"#),
        ("-upstreamAddress=nowhere", r#"invalid value "nowhere" for flag -upstreamAddress: not an IP address"#),
    ];
    for (flag, message) in cases {
        let out = Command::new(bin("wsl-proxy"))
            .args([flag, &format!("-socketFile={}", sock.display()), &format!("-logfile={}", log.display())])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flag}: {stderr}");
        assert!(stderr.starts_with(&format!("wsl-proxy: {message}\n")), "{flag}: {stderr}");
        assert!(!sock.exists() && !log.exists(), "{flag}: something was opened");
    }
    // And a good value is taken.
    let mut ok = Proc::spawn(
        &dir,
        Command::new(bin("wsl-proxy")).args([
            "-udpBuffer=65536".to_string(),
            format!("-socketFile={}", sock.display()),
            format!("-logfile={}", log.display()),
        ]),
    );
    assert!(wait_until(Duration::from_secs(10), || socket_exists(&sock)), "{}", ok.logs());
    // The log line may land a moment after the socket.
    let mut text = String::new();
    let logged = wait_until(Duration::from_secs(5), || {
        text = std::fs::read_to_string(&log).unwrap_or_default();
        text.contains("UDP buffer 65536 bytes")
    });
    assert!(logged, "{text}");
    assert_eq!(ok.terminate(Duration::from_secs(10)).and_then(|s| s.code()), Some(0), "{}", ok.logs());
}
