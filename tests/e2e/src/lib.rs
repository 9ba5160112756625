//! End-to-end test worlds (TESTING.md).
//!
//! A test builds its own namespaces, links, files and processes through the
//! guards here; each guard undoes its part on drop, also when the test
//! panics. Processes are ended by PID (SIGTERM, then SIGKILL), namespaces are
//! emptied by PID before deletion, and names carry the test process's PID and
//! a counter so tests can run in parallel.

use std::ffi::OsStr;
use std::fs;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::sleep;
use std::time::{Duration, Instant};

/// The test VM with real AF_VSOCK (`tests/vm.rs`).
pub mod vm;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// True when the test may run. Outside CI a missing privilege skips with one
/// line; in CI (`CI=true`) it fails, so a broken runner cannot pass silently.
pub fn privileged() -> bool {
    // SAFETY-free check: effective uid via /proc avoids libc here.
    let root = unsafe_free_euid() == Some(0);
    let tun = Path::new("/dev/net/tun").exists();
    let ip = Command::new("ip").arg("-V").output().is_ok();
    if root && tun && ip {
        return true;
    }
    let why = format!("needs root, /dev/net/tun and iproute2 (root={root}, tun={tun}, ip={ip})");
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("end-to-end test cannot run in CI: {why}");
    }
    eprintln!("skipping end-to-end test: {why}");
    false
}

fn unsafe_free_euid() -> Option<u32> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// A name unique to this test process: `prefix` + pid + counter. Kept short
/// enough (≤ 15 bytes for short prefixes) to serve as an interface name.
pub fn unique(prefix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}{}x{n}", std::process::id() % 100_000)
}

/// Path of a workspace binary built by `cargo build --bins` next to the
/// test executable (`target/<profile>/NAME`).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let path = dir.join(name);
    assert!(path.exists(), "{} is missing: run `cargo build --bins` before the tests", path.display());
    path
}

/// Hashes each connection's bytes until EOF and answers "LEN SHA256" over
/// the still-open other direction.
pub const HASH_SERVER: &str = r#"
import hashlib, socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(8)
while True:
    c, _ = s.accept()
    h = hashlib.sha256(); n = 0
    while True:
        b = c.recv(1 << 20)
        if not b: break
        h.update(b); n += len(b)
    c.sendall(("%d %s" % (n, h.hexdigest())).encode())
    c.close()
"#;

/// In the guest: receives from the host alias's `port` until EOF and
/// prints "LEN SHA256".
pub const HASH_DOWNLOAD: &str = r#"
import hashlib, socket, sys
c = socket.create_connection(("192.168.127.254", int(sys.argv[1])), timeout=30)
h = hashlib.sha256(); n = 0
while True:
    b = c.recv(1 << 20)
    if not b: break
    h.update(b); n += len(b)
print(n, h.hexdigest())
"#;

/// Runs a command to completion and fails the test if it fails.
pub fn run<S: AsRef<OsStr>>(program: &str, args: &[S]) -> Output {
    let out = Command::new(program).args(args).output().unwrap_or_else(|e| panic!("{program}: {e}"));
    if !out.status.success() {
        panic!(
            "{program} {:?} failed: {}\n{}",
            args.iter().map(|a| a.as_ref().to_string_lossy().into_owned()).collect::<Vec<_>>(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

/// Polls `f` every 50 ms until it returns true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        sleep(Duration::from_millis(50));
    }
}

/// A temporary directory removed on drop.
pub struct TempDir {
    pub path: PathBuf,
}

impl TempDir {
    pub fn new(prefix: &str) -> Self {
        let path = std::env::temp_dir().join(unique(&format!("rdnet-{prefix}-")));
        fs::create_dir_all(&path).expect("create temp dir");
        TempDir { path }
    }
    pub fn join(&self, p: impl AsRef<Path>) -> PathBuf {
        self.path.join(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// A network namespace with only `lo` (up), its own resolv.conf, deleted on
/// drop after every process left in it has been ended by PID.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(prefix: &str) -> Self {
        let name = unique(prefix);
        // Its own resolv.conf, so `ip netns exec` never shows the machine's.
        let etc = Path::new("/etc/netns").join(&name);
        fs::create_dir_all(&etc).expect("create /etc/netns dir");
        fs::write(etc.join("resolv.conf"), "nameserver 127.0.0.1\n").expect("write netns resolv.conf");
        run("ip", &["netns", "add", &name]);
        let ns = Netns { name };
        ns.exec_ok("ip", &["link", "set", "lo", "up"]);
        ns
    }

    /// A command line prefixed with `ip netns exec NAME`.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    pub fn exec<S: AsRef<OsStr>>(&self, program: &str, args: &[S]) -> Output {
        self.command(program).args(args).output().unwrap_or_else(|e| panic!("{program}: {e}"))
    }

    /// Like [`exec`](Self::exec) but fails the test on a non-zero exit.
    pub fn exec_ok<S: AsRef<OsStr>>(&self, program: &str, args: &[S]) -> Output {
        let out = self.exec(program, args);
        assert!(
            out.status.success(),
            "in {}: {program} {:?} failed: {}\nstdout: {}\nstderr: {}",
            self.name,
            args.iter().map(|a| a.as_ref().to_string_lossy().into_owned()).collect::<Vec<_>>(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Standard output of a successful command, as text.
    pub fn stdout<S: AsRef<OsStr>>(&self, program: &str, args: &[S]) -> String {
        String::from_utf8_lossy(&self.exec_ok(program, args).stdout).into_owned()
    }

    /// Starts a long-running process in this namespace.
    pub fn spawn<S: AsRef<OsStr>>(&self, logs: &TempDir, program: impl AsRef<OsStr>, args: &[S]) -> Proc {
        Proc::spawn(logs, self.command(program).args(args))
    }

    fn pids(&self) -> Vec<i32> {
        Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).split_whitespace().filter_map(|p| p.parse().ok()).collect())
            .unwrap_or_default()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for pid in self.pids() {
            kill_pid(pid, "TERM");
        }
        wait_until(Duration::from_secs(3), || self.pids().is_empty());
        for pid in self.pids() {
            kill_pid(pid, "KILL");
        }
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
        let _ = fs::remove_dir_all(Path::new("/etc/netns").join(&self.name));
    }
}

fn kill_pid(pid: i32, signal: &str) {
    let _ = Command::new("kill").args([&format!("-{signal}"), &pid.to_string()]).status();
}

/// A child process ended (SIGTERM, then SIGKILL) by PID on drop. Its output
/// goes to files under the test's temp dir and is printed when a test fails
/// via [`Proc::logs`].
pub struct Proc {
    pub child: Child,
    pub name: String,
    out_path: PathBuf,
    err_path: PathBuf,
}

impl Proc {
    pub fn spawn(logs: &TempDir, cmd: &mut Command) -> Proc {
        let name = unique("proc");
        let out_path = logs.join(format!("{name}.out"));
        let err_path = logs.join(format!("{name}.err"));
        let out = fs::File::create(&out_path).expect("create log");
        let err = fs::File::create(&err_path).expect("create log");
        let child =
            cmd.stdin(Stdio::null()).stdout(out).stderr(err).spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        Proc { child, name: format!("{cmd:?}"), out_path, err_path }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Everything the process printed so far.
    pub fn logs(&self) -> String {
        let mut s = String::new();
        for p in [&self.out_path, &self.err_path] {
            if let Ok(mut f) = fs::File::open(p) {
                let _ = f.read_to_string(&mut s);
            }
        }
        s
    }

    /// What the process wrote to its standard output only.
    pub fn stdout(&self) -> String {
        fs::read_to_string(&self.out_path).unwrap_or_default()
    }

    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Sends SIGTERM and waits up to `timeout` for the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        kill_pid(self.pid(), "TERM");
        let mut status = None;
        wait_until(timeout, || {
            status = self.try_wait();
            status.is_some()
        });
        status
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.try_wait().is_none() && self.terminate(Duration::from_secs(3)).is_none() {
            kill_pid(self.pid(), "KILL");
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- output of {} ---\n{}", self.name, self.logs());
        }
    }
}

/// A veth pair `a` (in `ns_a`) ↔ `b` (in `ns_b`), addressed and up. Deleting
/// the namespaces deletes it; no separate guard is needed.
pub fn veth(ns_a: &Netns, a: &str, addr_a: &str, ns_b: &Netns, b: &str, addr_b: &str) {
    run("ip", &["link", "add", a, "netns", &ns_a.name, "type", "veth", "peer", "name", b, "netns", &ns_b.name]);
    ns_a.exec_ok("ip", &["addr", "add", addr_a, "dev", a]);
    ns_a.exec_ok("ip", &["link", "set", a, "up"]);
    ns_b.exec_ok("ip", &["addr", "add", addr_b, "dev", b]);
    ns_b.exec_ok("ip", &["link", "set", b, "up"]);
}

/// True once something accepts TCP connections on `addr` in the caller's
/// namespace.
pub fn tcp_ready(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

/// True once a unix socket file exists at `path`.
pub fn socket_exists(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket())
}

/// The standard test world (TESTING.md): host-switch in a "host" namespace
/// that has only `lo`, listening on a unix socket; guests are further
/// namespaces whose vm-switch connects to that socket.
// Fields drop in declaration order: processes before their namespaces,
// and the directory holding their logs last.
pub struct World {
    pub guests: Vec<Guest>,
    pub host_switch: Option<Proc>,
    pub host: Netns,
    pub socket: PathBuf,
    pub dir: TempDir,
}

pub struct Guest {
    pub vm_switch: Option<Proc>,
    pub ns: Netns,
    pub resolv_conf: PathBuf,
    pub mac: String,
}

pub const GATEWAY: &str = "192.168.127.1";
pub const HOST_ALIAS: &str = "192.168.127.254";
pub const DEVICE_MAC: &str = "5a:94:ef:e4:0c:ee";
/// host-switch's gateway MAC (gvproxy's).
pub const GATEWAY_MAC: [u8; 6] = [0x5a, 0x94, 0xef, 0xe4, 0x0c, 0xdd];

impl World {
    /// Starts host-switch with `extra` flags and waits for its socket.
    pub fn new(extra: &[&str]) -> World {
        let dir = TempDir::new("world");
        let host = Netns::new("rdh");
        let socket = dir.join("host-switch.sock");
        let mut world = World { dir, host, host_switch: None, socket, guests: Vec::new() };
        world.start_host_switch(extra);
        world
    }

    pub fn start_host_switch(&mut self, extra: &[&str]) {
        let listen = format!("unix://{}", self.socket.display());
        // Debug logs, but no pcap capture unless a test asks for one.
        let mut args = vec!["--listen", &listen, "-debug", "--capture="];
        args.extend_from_slice(extra);
        let p = self.host.spawn(&self.dir, bin("host-switch"), &args);
        let sock = self.socket.clone();
        assert!(
            wait_until(Duration::from_secs(10), || socket_exists(&sock)),
            "host-switch did not listen:\n{}",
            p.logs()
        );
        self.host_switch = Some(p);
    }

    pub fn host_switch(&mut self) -> &mut Proc {
        self.host_switch.as_mut().expect("host-switch running")
    }

    /// Adds a guest namespace whose vm-switch (with `extra` flags) dials
    /// host-switch; returns its index.
    pub fn add_guest(&mut self, mac: &str, extra: &[&str]) -> usize {
        let ns = Netns::new("rdg");
        let resolv_conf = self.dir.join(format!("{}.resolv.conf", ns.name));
        let mut guest = Guest { ns, vm_switch: None, resolv_conf, mac: mac.to_string() };
        self.start_vm_switch(&mut guest, extra);
        self.guests.push(guest);
        self.guests.len() - 1
    }

    pub fn start_vm_switch(&self, guest: &mut Guest, extra: &[&str]) {
        let connect = format!("unix://{}", self.socket.display());
        let resolv = guest.resolv_conf.display().to_string();
        let mut args = vec![
            "--connect",
            &connect,
            "-tap-mac-address",
            &guest.mac,
            "--resolv-conf",
            &resolv,
            "-logfile",
            "/dev/stdout",
            "-debug",
        ];
        args.extend_from_slice(extra);
        guest.vm_switch = Some(guest.ns.spawn(&self.dir, bin("vm-switch"), &args));
    }

    pub fn guest(&self, i: usize) -> &Guest {
        &self.guests[i]
    }

    /// A python3 `script` in the host namespace, given `port` and then
    /// `args` as its arguments; returns once something listens on
    /// 127.0.0.1:`port`.
    pub fn host_server(&self, port: u16, script: &str, args: &[&str]) -> Proc {
        let port_arg = port.to_string();
        let mut cmd_args = vec!["-c", script, &port_arg];
        cmd_args.extend_from_slice(args);
        let p = self.host.spawn(&self.dir, "python3", &cmd_args);
        assert!(
            wait_until(Duration::from_secs(10), || tcp_ready_in(&self.host, port)),
            "server on {port} did not start: {}",
            p.logs()
        );
        p
    }

    /// A python3 `script` in the host namespace, given `port`; returns once
    /// a UDP socket is bound to `port` there.
    pub fn host_server_udp(&self, port: u16, script: &str) -> Proc {
        let port_arg = port.to_string();
        let p = self.host.spawn(&self.dir, "python3", &["-c", script, &port_arg]);
        assert!(
            wait_until(Duration::from_secs(10), || udp_ready_in(&self.host, port)),
            "UDP server on {port} did not start: {}",
            p.logs()
        );
        p
    }

    /// Runs a python3 `script` with `args` in guest `g`, ended after `secs`
    /// seconds; fails the test unless it succeeds, else returns its stdout.
    pub fn guest_python(&self, g: usize, secs: u32, script: &str, args: &[&str]) -> String {
        let secs = secs.to_string();
        let mut cmd_args = vec![secs.as_str(), "python3", "-c", script];
        cmd_args.extend_from_slice(args);
        let out = self.guest(g).ns.exec("timeout", &cmd_args);
        assert!(
            out.status.success(),
            "guest python failed ({}): {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Everything the world's processes printed, for failure messages.
    pub fn logs(&self) -> String {
        let mut s = String::new();
        if let Some(p) = &self.host_switch {
            s += &format!("--- host-switch ---\n{}\n", p.logs());
        }
        for g in &self.guests {
            if let Some(p) = &g.vm_switch {
                s += &format!("--- vm-switch in {} ---\n{}\n", g.ns.name, p.logs());
            }
        }
        s
    }
}

impl Guest {
    /// The IPv4 address/prefix on `eth0`, once DHCP has set one.
    pub fn address(&self) -> Option<String> {
        let out = self.ns.exec("ip", &["-4", "-o", "addr", "show", "dev", "eth0"]);
        let text = String::from_utf8_lossy(&out.stdout);
        text.split_whitespace().skip_while(|w| *w != "inet").nth(1).map(str::to_string)
    }

    pub fn wait_for_address(&self, timeout: Duration) -> Option<String> {
        let mut addr = None;
        wait_until(timeout, || {
            addr = self.address();
            addr.is_some()
        });
        addr
    }

    pub fn ping(&self, ip: &str) -> bool {
        self.ns.exec("ping", &["-c", "2", "-i", "0.2", "-W", "2", ip]).status.success()
    }
}

/// True once something listens on TCP `port` inside `ns` (checked with `ss`,
/// without connecting, so one-shot servers are not disturbed).
pub fn tcp_ready_in(ns: &Netns, port: u16) -> bool {
    let out = ns.exec("ss", &["-Hltn", &format!("sport = :{port}")]);
    out.status.success() && !out.stdout.is_empty()
}

/// Whether a UDP socket is bound to `port` in `ns`.
pub fn udp_ready_in(ns: &Netns, port: u16) -> bool {
    let out = ns.exec("ss", &["-Huan", &format!("sport = :{port}")]);
    out.status.success() && !out.stdout.is_empty()
}

/// A raw VM link: a connection to host-switch's unix socket that speaks the
/// u16-LE framing itself, for tests that play a peer host-switch knows
/// nothing about (a rogue, or one that never offers offload).
pub struct RawLink {
    stream: UnixStream,
    buf: Vec<u8>,
}

impl RawLink {
    pub fn connect(socket: &Path) -> RawLink {
        let stream = UnixStream::connect(socket).unwrap_or_else(|e| panic!("connect {}: {e}", socket.display()));
        RawLink { stream, buf: Vec::new() }
    }

    /// A link over a connection made otherwise (one accepted from a
    /// vm-switch that dials the test, say).
    pub fn from_stream(stream: UnixStream) -> RawLink {
        RawLink { stream, buf: Vec::new() }
    }

    /// A second handle on the same connection (for sending while another
    /// thread receives).
    pub fn try_clone(&self) -> RawLink {
        RawLink { stream: self.stream.try_clone().expect("clone link"), buf: Vec::new() }
    }

    pub fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        let len = u16::try_from(frame.len()).expect("frame fits the u16 prefix");
        let mut framed = Vec::with_capacity(2 + frame.len());
        framed.extend_from_slice(&len.to_le_bytes());
        framed.extend_from_slice(frame);
        self.stream.write_all(&framed)
    }

    /// The next frame, waiting at most `timeout`: `Ok(None)` if none came
    /// in time, an error once the link is closed.
    pub fn recv(&mut self, timeout: Duration) -> io::Result<Option<Vec<u8>>> {
        let end = Instant::now() + timeout;
        let mut chunk = vec![0u8; 128 * 1024];
        loop {
            if self.buf.len() >= 2 {
                let len = usize::from(u16::from_le_bytes([self.buf[0], self.buf[1]]));
                if self.buf.len() >= 2 + len {
                    let frame = self.buf[2..2 + len].to_vec();
                    self.buf.drain(..2 + len);
                    return Ok(Some(frame));
                }
            }
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            self.stream.set_read_timeout(Some(left))?;
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Ends the connection both ways (a receiving clone sees the end).
    pub fn shutdown(&self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}

/// One record of a pcap file: the frame's length on the wire and the bytes
/// captured of it.
pub struct PcapRecord<'a> {
    pub orig_len: usize,
    pub data: &'a [u8],
}

/// The records of a classic little-endian pcap file (host-switch's
/// `--capture`): a 24-byte global header, then a 16-byte header (seconds,
/// microseconds, captured length, original length) before each frame. A
/// record cut short at the end (written while we read) is left out.
pub fn pcap_records(bytes: &[u8]) -> Vec<PcapRecord<'_>> {
    assert!(bytes.len() >= 24, "pcap shorter than its header");
    assert_eq!(&bytes[..4], &0xa1b2_c3d4u32.to_le_bytes(), "pcap magic");
    let u32_at = |at: usize| u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]) as usize;
    let mut records = Vec::new();
    let mut at = 24;
    while at + 16 <= bytes.len() {
        let (incl, orig) = (u32_at(at + 8), u32_at(at + 12));
        let Some(data) = bytes.get(at + 16..at + 16 + incl) else { break };
        records.push(PcapRecord { orig_len: orig, data });
        at += 16 + incl;
    }
    records
}
