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
/// address they sent to), each expecting its own echo.
const UDP_CLIENT: &str = r#"
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
socks = [socket.socket(fam, socket.SOCK_DGRAM) for _ in range(2)]
for s in socks:
    s.settimeout(1)
    s.connect((host, port))
for i, s in enumerate(socks):
    s.send(b"hello%d" % i)
print(" ".join(s.recv(65535).decode() for s in socks))
"#;

/// The default namespace, the distro's namespace, and wsl-proxy.
struct World {
    proxy: Proc,
    servers: Vec<Proc>,
    /// WSL's default namespace: wsl-proxy and the clients.
    def: Netns,
    /// The distro's namespace: the published services.
    distro: Netns,
    /// The distro side of the veth, given as `-upstreamAddress`.
    upstream: String,
    sock: PathBuf,
    log: PathBuf,
    dir: TempDir,
}

impl World {
    fn new(name: &str) -> World {
        let dir = TempDir::new(name);
        let def = Netns::new("wpd");
        let distro = Netns::new("wpn");
        let n = SUBNET.fetch_add(1, Ordering::Relaxed) % 200 + 10;
        let (a, b) = (
            format!("10.{}.{n}.1", 90 + std::process::id() % 50),
            format!("10.{}.{n}.2", 90 + std::process::id() % 50),
        );
        veth(&def, &unique("wpa"), &format!("{a}/24"), &distro, &unique("wpb"), &format!("{b}/24"));
        let sock = dir.join("wsl-proxy.sock");
        let log = dir.join("wsl-proxy.log");
        // Every Go spelling of the flags, and an upstream other than the
        // default 192.168.1.2: the Go original ignored this flag.
        let proxy = def.spawn(
            &dir,
            bin("wsl-proxy"),
            &[
                "-debug".to_string(),
                format!("--socketFile={}", sock.display()),
                "-upstreamAddress".to_string(),
                b.clone(),
                "--logfile".to_string(),
                log.display().to_string(),
            ],
        );
        let mut w = World { proxy, servers: Vec::new(), def, distro, upstream: b, sock, log, dir };
        assert!(wait_until(Duration::from_secs(10), || socket_exists(&w.sock)), "no socket: {}", w.logs());
        assert!(w.proxy.try_wait().is_none(), "wsl-proxy exited: {}", w.logs());
        w
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
    let mut w = World::new("wsl-tcp");
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
    let mut w = World::new("wsl-udp");
    w.python_server(UDP_ECHO_SERVER, 5353);
    w.publish(false, "udp", "127.0.0.1", 5353);
    w.wait_log("published", 1);
    let mut answer = String::new();
    let ok = wait_until(Duration::from_secs(15), || {
        let out = w.def.exec("python3", &["-c", UDP_CLIENT, "127.0.0.1", "5353"]);
        answer = String::from_utf8_lossy(&out.stdout).trim().to_string();
        answer == "echo:hello0 echo:hello1"
    });
    assert!(ok, "udp echo through wsl-proxy: {answer:?}\n{}", w.logs());
    // The same port over TCP is another listener and is not published.
    assert_eq!(curl(&w.def, "http://127.0.0.1:5353/"), None);
}

#[test]
fn ipv6_binding_survives_removing_the_ipv4_one() {
    if !privileged() {
        return;
    }
    let mut w = World::new("wsl-v6");
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
    let mut w = World::new("wsl-bad");
    w.http_server(8080, "still here\n");
    let url = "http://127.0.0.1:8080/hello.txt";
    w.publish(false, "tcp", "127.0.0.1", 8080);
    assert!(wait_until(Duration::from_secs(10), || curl(&w.def, url).is_some()), "{}", w.logs());

    w.send("this is not json");
    w.send(r#"{"remove":true,"ports":{"8080/tcp":[{"HostIp":"127.0.0.1","HostPort":"80x"}]}}"#);
    w.send(r#"{"remove":true,"ports":{"8080/tcp":[{"HostIp":"127.0.0.1","HostPort":"8080"}]"#); // truncated
    w.wait_log("ignoring port mapping", 3);
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
