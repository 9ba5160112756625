//! gvisor-tap-vsock's transport on host-switch's stream listeners
//! (COMPAT §3): a peer that opens with `POST /connect` (gvisor-tap-vsock's
//! guest forwarder, as Podman and Lima run it) gets a frame link, any other
//! HTTP request gets the API, raw-framed peers keep working, and a frame
//! longer than the link allows closes that connection only.

use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use rdnet_e2e::{DEVICE_MAC, GATEWAY, RawLink, World, privileged, wait_until};

const LEASE_WAIT: Duration = Duration::from_secs(30);
/// What gvisor-tap-vsock's `cmd/vm` writes first (Go's `Request.Write`).
const GO_CONNECT: &[u8] =
    b"POST /connect HTTP/1.1\r\nHost: \r\nUser-Agent: Go-http-client/1.1\r\nContent-Length: 0\r\n\r\n";
const PEER_MAC: [u8; 6] = [0x5a, 0x94, 0xef, 0xe4, 0x0c, 0xee];

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A DHCPDISCOVER from `mac`, broadcast, as a fresh client sends it.
fn dhcp_discover(mac: [u8; 6], xid: [u8; 4]) -> Vec<u8> {
    let mut bootp = vec![0u8; 240];
    bootp[0] = 1; // BOOTREQUEST
    bootp[1] = 1; // Ethernet
    bootp[2] = 6;
    bootp[4..8].copy_from_slice(&xid);
    bootp[10] = 0x80; // broadcast flag
    bootp[28..34].copy_from_slice(&mac);
    bootp[236..240].copy_from_slice(&[99, 130, 83, 99]);
    bootp.extend_from_slice(&[53, 1, 1, 255]);
    let udp_len = 8 + bootp.len();
    let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, 17, 0, 0, 0, 0, 0, 0, 255, 255, 255, 255];
    let total = (20 + udp_len) as u16;
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    let c = checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0x08, 0x00]);
    f.extend_from_slice(&ip);
    f.extend_from_slice(&68u16.to_be_bytes());
    f.extend_from_slice(&67u16.to_be_bytes());
    f.extend_from_slice(&(udp_len as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(&bootp);
    f
}

/// The offered address if `f` is a DHCPOFFER for `xid`.
fn dhcp_offer(f: &[u8], xid: [u8; 4]) -> Option<Ipv4Addr> {
    let ip = f.get(14..)?;
    if f.get(12..14)? != [0x08, 0x00] || ip.get(9)? != &17 {
        return None;
    }
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let udp = ip.get(ihl..)?;
    if udp.get(0..4)? != [0, 67, 0, 68] {
        return None;
    }
    let bootp = udp.get(8..)?;
    if bootp.first()? != &2 || bootp.get(4..8)? != xid {
        return None;
    }
    let mut opts = bootp.get(240..)?;
    while let [code, len, rest @ ..] = opts {
        if *code == 53 && *len == 1 && rest.first() == Some(&2) {
            let y = bootp.get(16..20)?;
            return Some(Ipv4Addr::new(y[0], y[1], y[2], y[3]));
        }
        opts = rest.get(usize::from(*len)..)?;
    }
    None
}

#[test]
fn post_connect_peer_gets_a_lease_and_raw_peers_still_do() {
    if !privileged() {
        return;
    }
    let mut world = World::new(&[]);
    // A gvisor-tap-vsock guest: POST /connect, then frames on the same
    // connection, with no HTTP answer in between.
    let mut s = UnixStream::connect(&world.socket).expect("connect");
    s.write_all(GO_CONNECT).unwrap();
    let mut link = RawLink::from_stream(s);
    let xid = [1, 2, 3, 4];
    link.send(&dhcp_discover(PEER_MAC, xid)).unwrap();
    let mut offered = None;
    assert!(
        wait_until(Duration::from_secs(10), || {
            while let Ok(Some(f)) = link.recv(Duration::from_millis(200)) {
                assert!(!f.starts_with(b"HTTP/"), "host-switch answered the POST");
                offered = offered.or(dhcp_offer(&f, xid));
            }
            offered.is_some()
        }),
        "no DHCPOFFER after POST /connect\n{}",
        world.logs()
    );
    assert_eq!(offered, Some(Ipv4Addr::new(192, 168, 127, 2)));
    assert!(world.host_switch().logs().contains("VM connected (POST /connect)"), "{}", world.logs());
    link.shutdown();

    // A raw-framed peer on the same listener, as before.
    let mut raw = RawLink::connect(&world.socket);
    let xid = [5, 6, 7, 8];
    raw.send(&dhcp_discover(PEER_MAC, xid)).unwrap();
    let mut offered = None;
    wait_until(Duration::from_secs(10), || {
        while let Ok(Some(f)) = raw.recv(Duration::from_millis(200)) {
            offered = offered.or(dhcp_offer(&f, xid));
        }
        offered.is_some()
    });
    assert_eq!(offered, Some(Ipv4Addr::new(192, 168, 127, 2)), "{}", world.logs());
}

#[test]
fn other_http_requests_on_the_vm_listener_get_the_api() {
    if !privileged() {
        return;
    }
    let mut world = World::new(&["-port-forward", "127.0.0.1:18443=192.168.127.2:443"]);
    let mut s = UnixStream::connect(&world.socket).expect("connect");
    s.write_all(b"GET /services/forwarder/all HTTP/1.1\r\nHost: gvproxy\r\nConnection: close\r\n\r\n").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).expect("read the answer");
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}\n{}", world.logs());
    assert!(
        answer.ends_with("[{\"local\":\"127.0.0.1:18443\",\"remote\":\"192.168.127.2:443\",\"protocol\":\"tcp\"}]\n"),
        "{answer}"
    );
    // gvproxy's own answer for an unknown path on its listener.
    let mut s = UnixStream::connect(&world.socket).expect("connect");
    s.write_all(b"GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 404 Not Found\r\n") && answer.ends_with("404 page not found\n"), "{answer}");
    assert!(world.host_switch().try_wait().is_none(), "{}", world.logs());
}

#[test]
fn an_over_long_frame_closes_only_its_connection() {
    if !privileged() {
        return;
    }
    let mut world = World::new(&[]);
    let g = world.add_guest(DEVICE_MAC, &[]);
    assert!(world.guest(g).wait_for_address(LEASE_WAIT).is_some(), "{}", world.logs());

    // 1515 bytes: one more than MTU 1500 + 14, from a peer that never sent
    // the offload hello.
    let mut rogue = UnixStream::connect(&world.socket).expect("connect");
    let mut framed = 1515u16.to_le_bytes().to_vec();
    framed.extend_from_slice(&[0xff; 6]);
    framed.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x99, 0x08, 0x00]);
    framed.resize(2 + 1515, 0);
    rogue.write_all(&framed).unwrap();
    rogue.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 4096];
    let closed = loop {
        match rogue.read(&mut buf) {
            Ok(0) => break true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break true,
            Err(_) => break false,
        }
    };
    assert!(closed, "host-switch kept a connection that sent an over-long frame\n{}", world.logs());
    let logs = world.host_switch().logs();
    let lines: Vec<&str> = logs.lines().filter(|l| l.contains("a 1515-byte frame")).collect();
    assert_eq!(lines.len(), 1, "{logs}");
    assert!(lines[0].contains("(1514 bytes"), "{}", lines[0]);
    // The real guest carries on.
    assert!(world.guest(g).ping(GATEWAY), "{}", world.logs());
    assert!(world.host_switch().try_wait().is_none(), "{}", world.logs());
}

/// A stand-in for gvproxy's `-listen unix://…`: every connection must open
/// with `POST /connect` (anything else gets gvproxy's 400 and is closed),
/// then it is relayed, raw, to host-switch's socket. Logs each request
/// line. argv: LISTEN_PATH UPSTREAM_PATH MODE (`relay` or `refuse`: 400 to
/// everything).
const GVPROXY_STANDIN: &str = r#"
import socket, sys, threading
listen, upstream, mode = sys.argv[1:4]
s = socket.socket(socket.AF_UNIX); s.bind(listen); s.listen(8)
def pump(a, b):
    try:
        while True:
            d = a.recv(65536)
            if not d: break
            b.sendall(d)
    except OSError:
        pass
    try: b.shutdown(socket.SHUT_WR)
    except OSError: pass
while True:
    c, _ = s.accept()
    head = b""
    # Byte by byte: nothing after the head may be consumed.
    while b"\r\n\r\n" not in head and len(head) < 4096:
        d = c.recv(1)
        if not d: break
        head += d
    line = head.split(b"\r\n")[0]
    print("request:", line.decode(errors="replace"), flush=True)
    if mode == "refuse" or line != b"POST /connect HTTP/1.1" or not head.endswith(b"\r\n\r\n"):
        c.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\n\r\nbad request\n")
        c.close()
        continue
    u = socket.socket(socket.AF_UNIX); u.connect(upstream)
    threading.Thread(target=pump, args=(c, u), daemon=True).start()
    threading.Thread(target=pump, args=(u, c), daemon=True).start()
"#;

#[test]
fn vm_switch_attaches_to_a_listener_that_requires_post_connect() {
    if !privileged() {
        return;
    }
    let mut world = World::new(&[]);
    let standin_sock = world.dir.join("gvproxy.sock");
    let upstream = world.socket.display().to_string();
    let standin = world.host.spawn(
        &world.dir,
        "python3",
        &["-c", GVPROXY_STANDIN, &standin_sock.display().to_string(), &upstream, "relay"],
    );
    assert!(wait_until(Duration::from_secs(10), || rdnet_e2e::socket_exists(&standin_sock)), "{}", standin.logs());
    let url = format!("unix://{}", standin_sock.display());
    let g = world.add_guest(DEVICE_MAC, &["--connect", &url]);
    assert!(
        world.guest(g).wait_for_address(LEASE_WAIT).is_some(),
        "no lease through the stand-in\n{}\n--- stand-in ---\n{}",
        world.logs(),
        standin.logs()
    );
    assert!(world.guest(g).ping(GATEWAY), "{}", world.logs());
    assert!(standin.logs().contains("request: POST /connect HTTP/1.1"), "{}", standin.logs());

    // A peer that answers the POST with HTTP: the error says so.
    let refusing_sock = world.dir.join("refusing.sock");
    let refusing = world.host.spawn(
        &world.dir,
        "python3",
        &["-c", GVPROXY_STANDIN, &refusing_sock.display().to_string(), &upstream, "refuse"],
    );
    assert!(wait_until(Duration::from_secs(10), || rdnet_e2e::socket_exists(&refusing_sock)), "{}", refusing.logs());
    let url = format!("unix://{}", refusing_sock.display());
    let r = world.add_guest("02:00:00:00:00:42", &["--connect", &url]);
    let said = || {
        world.guests[r].vm_switch.as_ref().map(|p| p.logs()).unwrap_or_default().contains(
            r#"the host answered POST /connect with "HTTP/1.1 400 Bad Request" (bad request) instead of frames"#,
        )
    };
    assert!(wait_until(Duration::from_secs(10), said), "{}", world.logs());
    assert!(world.guest(r).address().is_none());
    drop((standin, refusing));
}
