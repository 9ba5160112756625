//! Issue 3's TCP checks: bulk both ways with checksums and half-close,
//! refusal, many connections at once, DNS over TCP reaching the gateway.

use std::time::{Duration, Instant};

use rdnet_e2e::{DEVICE_MAC, World, privileged};

const LEASE_WAIT: Duration = Duration::from_secs(20);

fn world() -> World {
    let mut w = World::new(&[]);
    let g = w.add_guest(DEVICE_MAC, &[]);
    assert!(w.guest(g).wait_for_address(LEASE_WAIT).is_some(), "{}", w.logs());
    w
}

/// Runs python3 in the guest namespace and returns its stdout.
fn guest_python(world: &World, script: &str, args: &[&str]) -> String {
    let mut cmd_args = vec!["-c", script];
    cmd_args.extend_from_slice(args);
    let out = world.guest(0).ns.exec("python3", &cmd_args);
    assert!(out.status.success(), "guest python failed: {}\n{}", String::from_utf8_lossy(&out.stderr), world.logs());
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

const SIZE: usize = 64 * 1024 * 1024;

#[test]
fn download_64mib_checksum_verified() {
    if !privileged() {
        return;
    }
    let world = world();
    // Serves SIZE deterministic bytes, then closes; prints nothing.
    let _server = world.host_server(
        18080,
        r#"
import socket, sys, hashlib
port = int(sys.argv[1])
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", port)); s.listen(8)
block = hashlib.sha256(b"seed").digest() * 2048
while True:
    c, _ = s.accept()
    left = 64 * 1024 * 1024
    while left:
        n = c.send(block[:min(left, len(block))]); left -= n
    c.close()
"#,
        &[],
    );
    let out = guest_python(&world, rdnet_e2e::HASH_DOWNLOAD, &["18080"]);
    let block: Vec<u8> = {
        use std::io::Write;
        let seed = sha256(b"seed");
        let mut v = Vec::new();
        for _ in 0..2048 {
            v.write_all(&seed).unwrap();
        }
        v
    };
    let mut expected = Vec::with_capacity(SIZE);
    while expected.len() < SIZE {
        let take = (SIZE - expected.len()).min(block.len());
        expected.extend_from_slice(&block[..take]);
    }
    assert_eq!(out, format!("{SIZE} {}", hex(&sha256(&expected))), "{}", world.logs());
    // -debug is about host-switch's own decisions: 64 MiB of segments leave
    // no per-segment library chatter (smoltcp logged "sending sACK option"
    // for most of them) and no Rust debug structs in its lines.
    let mut world = world;
    let logs = world.host_switch().logs();
    assert!(logs.contains(" DEBUG "), "host-switch runs with -debug here");
    for chatter in ["sACK", "smoltcp", "FlowKey {", "SocketAddrV4 {", "Some("] {
        assert!(!logs.contains(chatter), "{chatter:?} in host-switch's -debug log:\n{logs}");
    }
}

#[test]
fn upload_64mib_with_half_close() {
    if !privileged() {
        return;
    }
    let world = world();
    // Hashes until EOF, then answers with the digest over the still-open
    // other direction: only works if the guest's FIN became a half-close.
    let _server = world.host_server(18081, rdnet_e2e::HASH_SERVER, &[]);
    let out = guest_python(
        &world,
        r#"
import socket, hashlib, os
data = (hashlib.sha256(b"upload").digest() * 4096)
c = socket.create_connection(("192.168.127.254", 18081), timeout=30)
h = hashlib.sha256(); left = 64 * 1024 * 1024
while left:
    chunk = data[:min(left, len(data))]
    c.sendall(chunk); h.update(chunk); left -= len(chunk)
c.shutdown(socket.SHUT_WR)
reply = b""
while True:
    b = c.recv(4096)
    if not b: break
    reply += b
print(reply.decode(), "|", 64 * 1024 * 1024, h.hexdigest())
"#,
        &[],
    );
    let (got, want) = out.split_once(" | ").unwrap_or((&out, ""));
    assert_eq!(got, want, "server saw something else than was sent\n{}", world.logs());
}

#[test]
fn closed_port_refuses_at_once() {
    if !privileged() {
        return;
    }
    let world = world();
    let start = Instant::now();
    let out = world.guest(0).ns.exec("curl", &["-s", "-m", "5", "http://192.168.127.254:18099/"]);
    let took = start.elapsed();
    assert_eq!(out.status.code(), Some(7), "curl should fail to connect\n{}", world.logs());
    assert!(took < Duration::from_secs(1), "refusal took {took:?}");
}

#[test]
fn link_local_is_refused_by_default() {
    if !privileged() {
        return;
    }
    let world = world();
    // A link-local destination gets a RST from the gateway, not a host connect.
    let out = world.guest(0).ns.exec("curl", &["-s", "-m", "5", "http://169.254.169.254/"]);
    assert_eq!(out.status.code(), Some(7), "{}", world.logs());
}

#[test]
fn a_thousand_connections_at_once() {
    if !privileged() {
        return;
    }
    let world = world();
    let _server = world.host_server(
        18082,
        r#"
import asyncio, sys
async def handle(r, w):
    data = await r.read(100)
    w.write(data[::-1]); await w.drain(); w.close()
async def main():
    srv = await asyncio.start_server(handle, "127.0.0.1", int(sys.argv[1]), backlog=4096)
    async with srv: await srv.serve_forever()
asyncio.run(main())
"#,
        &[],
    );
    let out = guest_python(
        &world,
        r#"
import asyncio
async def one(i):
    r, w = await asyncio.wait_for(asyncio.open_connection("192.168.127.254", 18082), 30)
    msg = ("conn-%d" % i).encode()
    w.write(msg); await w.drain()
    got = await asyncio.wait_for(r.read(100), 30)
    w.close()
    return got == msg[::-1]
async def main():
    # All connections are open before any is answered: the server only
    # answers after reading, and every client connects first.
    res = await asyncio.gather(*(one(i) for i in range(1000)), return_exceptions=True)
    ok = sum(1 for x in res if x is True)
    bad = [repr(x) for x in res if x is not True][:3]
    print(ok, bad)
asyncio.run(main())
"#,
        &[],
    );
    assert!(out.starts_with("1000 "), "{out}\n{}", world.logs());
}

#[test]
fn dns_over_tcp_to_the_gateway() {
    if !privileged() {
        return;
    }
    let world = world();
    let out = world
        .guest(0)
        .ns
        .stdout("dig", &["+tcp", "+short", "+time=3", "+tries=1", "@192.168.127.1", "host.rancher-desktop.internal"]);
    assert_eq!(out.trim(), "192.168.127.254", "{}", world.logs());
}

fn sha256(data: &[u8]) -> Vec<u8> {
    let out = std::process::Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child.stdin.take().expect("stdin").write_all(data)?;
            child.wait_with_output()
        })
        .expect("sha256sum");
    let text = String::from_utf8_lossy(&out.stdout);
    let hexstr = text.split_whitespace().next().unwrap_or_default();
    (0..hexstr.len() / 2).map(|i| u8::from_str_radix(&hexstr[2 * i..2 * i + 2], 16).unwrap_or(0)).collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Flows that moved data and then idle give their buffers' memory back
/// (`tcp::IDLE_RELEASE`): host-switch's RSS falls back after a burst on
/// connections that stay open.
#[test]
fn idle_flows_give_their_buffer_memory_back() {
    if !privileged() {
        return;
    }
    let mut world = world();
    // Reads everything, never closes.
    let _sink = world.host_server(
        18083,
        r#"
import socket, sys, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(16)
def drain(c):
    while c.recv(1 << 20): pass
while True:
    c, _ = s.accept()
    threading.Thread(target=drain, args=(c,), daemon=True).start()
"#,
        &[],
    );
    let pid = world.host_switch().pid().to_string();
    let out = world.guest_python(
        0,
        60,
        r#"
import socket, sys, time
pid = sys.argv[1]
assert open(f"/proc/{pid}/comm").read().strip() == "host-switch"
def rss():
    return int(next(l for l in open(f"/proc/{pid}/status") if l.startswith("VmRSS")).split()[1])
base = rss()
data = b"x" * (1 << 20)
socks = []
for i in range(8):
    c = socket.create_connection(("192.168.127.254", 18083), timeout=30)
    socks.append(c)
    for _ in range(16):
        c.sendall(data)
time.sleep(0.3)
peak = rss()
time.sleep(3)
print(base, peak, rss())
"#,
        &[&pid],
    );
    let v: Vec<i64> = out.split_whitespace().filter_map(|x| x.parse().ok()).collect();
    assert_eq!(v.len(), 3, "{out}");
    let (base, peak, after) = (v[0], v[1], v[2]);
    eprintln!("host-switch VmRSS: {base} KiB before, {peak} KiB after 8 × 16 MiB, {after} KiB idle");
    assert!(peak - base >= 8 * 1024, "the transfers committed too little to tell: {out}");
    assert!(after - base <= (peak - base) / 4, "idle flows kept their buffers: {out}");
}

/// Issue 15's cause of the falling connection rate: SYN-ACKs without TCP
/// timestamps keep a guest from reusing its own TIME-WAIT ports. With
/// them, a guest that closed first connects again from the same port (the
/// same 4-tuple) at once, and host-switch gives it a new flow.
#[test]
fn syn_acks_carry_timestamps_so_a_guest_reuses_its_time_wait_port() {
    if !privileged() {
        return;
    }
    let world = world();
    let _server = world.host_server(
        18084,
        r#"
import socket, sys, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(16)
def echo_once(c):
    c.sendall(c.recv(1))
    while c.recv(100): pass
    c.close()
while True:
    c, _ = s.accept()
    threading.Thread(target=echo_once, args=(c,), daemon=True).start()
"#,
        &[],
    );
    let out = world.guest_python(
        0,
        30,
        r#"
import errno, socket, time
TCPI_OPT_TIMESTAMPS = 1
def once():
    c = socket.socket(); c.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    c.bind(("0.0.0.0", 41234)); c.settimeout(10)
    try:
        c.connect(("192.168.127.254", 18084))
    except OSError as e:
        return "connect: " + errno.errorcode.get(e.errno, str(e.errno))
    ts = c.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)[5] & TCPI_OPT_TIMESTAMPS
    c.sendall(b"x"); assert c.recv(1) == b"x"
    # The guest closes first, so it is the side left in TIME-WAIT.
    c.shutdown(socket.SHUT_WR); c.recv(1); c.close()
    return "ts" if ts else "no-ts"
results = [once()]
time.sleep(0.2)
results.append(once())
print(" ".join(results))
"#,
        &[],
    );
    assert_eq!(out, "ts ts", "{}", world.logs());
}
