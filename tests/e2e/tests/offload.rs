//! Segmentation offload between vm-switch and host-switch
//! (`rdnet_wire::offload`): after the hello exchange, bulk TCP through the
//! NAT crosses the link in frames above the MTU both ways, the guest's tap
//! has TSO on, and a peer that never said hello gets neither a large frame
//! nor anybody's hello.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rdnet_e2e::{DEVICE_MAC, GATEWAY_MAC, Netns, RawLink, TempDir, World, bin, pcap_records, privileged, wait_until};

const LEASE_WAIT: Duration = Duration::from_secs(20);
/// The largest frame at the default MTU of 1500.
const MAX_FRAME: usize = 1514;
const OFFLOAD_ETHERTYPE: [u8; 2] = [0x88, 0xb5];

fn world(host_flags: &[&str]) -> World {
    let mut w = World::new(host_flags);
    let g = w.add_guest(DEVICE_MAC, &[]);
    assert!(w.guest(g).wait_for_address(LEASE_WAIT).is_some(), "{}", w.logs());
    w
}

/// Serves `random.Random(seed).randbytes(size)` to each connection, then
/// closes it (argv: port, seed, size).
const SENDER: &str = r#"
import random, socket, sys
port, seed, size = (int(a) for a in sys.argv[1:4])
data = random.Random(seed).randbytes(size)
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", port)); s.listen(8)
while True:
    c, _ = s.accept()
    c.sendall(data)
    c.close()
"#;

/// In the guest: sends `random.Random(seed).randbytes(size)` to the host
/// alias's `port`, half-closes, and prints the server's "LEN SHA256", a
/// bar, and its own.
const UPLOAD: &str = r#"
import hashlib, random, socket, sys
port, seed, size = (int(a) for a in sys.argv[1:4])
data = random.Random(seed).randbytes(size)
c = socket.create_connection(("192.168.127.254", port), timeout=30)
c.sendall(data)
c.shutdown(socket.SHUT_WR)
reply = b""
while True:
    b = c.recv(4096)
    if not b: break
    reply += b
print(reply.decode(), "|", size, hashlib.sha256(data).hexdigest())
"#;

/// "LEN SHA256" of `random.Random(seed).randbytes(size)`, computed here
/// by the same python3 (no network, no namespace).
fn expected_digest(seed: u32, size: usize) -> String {
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import hashlib, random, sys; s, n = int(sys.argv[1]), int(sys.argv[2]); \
             print(n, hashlib.sha256(random.Random(s).randbytes(n)).hexdigest())",
            &seed.to_string(),
            &size.to_string(),
        ])
        .output()
        .expect("python3");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Downloads `size` bytes (seeded with `seed`) from a [`SENDER`] on the
/// host's `port` into guest `g` and checks every byte arrived in order.
fn checked_download(world: &World, g: usize, port: u16, seed: u32, size: usize) {
    let got = world.guest_python(g, 60, rdnet_e2e::HASH_DOWNLOAD, &[&port.to_string()]);
    assert_eq!(got, expected_digest(seed, size), "download corrupted\n{}", world.logs());
}

/// Whether `ethtool` can be run. In CI (where `scripts/setup` installs
/// it) its absence fails the test.
fn have_ethtool() -> bool {
    if std::process::Command::new("ethtool").arg("--version").output().is_ok() {
        return true;
    }
    assert!(std::env::var("CI").as_deref() != Ok("true"), "ethtool is missing (scripts/setup installs it)");
    eprintln!("ethtool is missing: not checking the tap's offload features");
    false
}

/// The value `ethtool -k eth0` shows for `feature` in `ns`.
fn eth0_feature(ns: &Netns, feature: &str) -> Option<String> {
    let text = ns.stdout("ethtool", &["-k", "eth0"]);
    let prefix = format!("{feature}:");
    text.lines()
        .find_map(|l| l.trim().strip_prefix(&prefix))
        .and_then(|v| v.split_whitespace().next())
        .map(str::to_string)
}

#[test]
fn bulk_tcp_crosses_the_link_in_large_frames_both_ways() {
    if !privileged() {
        return;
    }
    const SIZE: usize = 32 * 1024 * 1024;
    let dir = TempDir::new("offload");
    let pcap = dir.join("offload.pcap");
    let world = world(&["--capture", &pcap.display().to_string()]);

    // The gateway answered vm-switch's hello: the tap hands over TSO
    // segments.
    if have_ethtool() {
        let mut tso = None;
        let on = wait_until(Duration::from_secs(5), || {
            tso = eth0_feature(&world.guest(0).ns, "tcp-segmentation-offload");
            tso.as_deref() == Some("on")
        });
        assert!(on, "TSO on the guest's eth0: {tso:?}\n{}", world.logs());
        assert_eq!(eth0_feature(&world.guest(0).ns, "tx-checksumming").as_deref(), Some("on"));
    }

    let (down_port, up_port) = (18110u16, 18111u16);
    let _sender = world.host_server(down_port, SENDER, &["1", &SIZE.to_string()]);
    let _hasher = world.host_server(up_port, rdnet_e2e::HASH_SERVER, &[]);

    checked_download(&world, 0, down_port, 1, SIZE);
    let out = world.guest_python(0, 60, UPLOAD, &[&up_port.to_string(), "2", &SIZE.to_string()]);
    let (got, sent) = out.split_once(" | ").unwrap_or((&out, ""));
    assert_eq!(got, sent, "the host received something else than was sent\n{}", world.logs());
    assert_eq!(sent, expected_digest(2, SIZE));

    // The capture (flushed per frame) shows large frames each way.
    let bytes = std::fs::read(&pcap).expect("read the capture");
    let records = pcap_records(&bytes);
    let (mut down, mut up) = ((0usize, 0usize), (0usize, 0usize));
    let mut largest = 0;
    for r in &records {
        largest = largest.max(r.orig_len);
        if r.orig_len <= MAX_FRAME || r.data.len() < 14 {
            continue;
        }
        assert_eq!(r.data.len(), r.orig_len, "the capture cut a {}-byte frame short", r.orig_len);
        assert_eq!(&r.data[12..14], &[0x08, 0x00], "a large frame that is not IPv4");
        assert_eq!(r.data[14 + 9], 6, "a large frame that is not TCP");
        let from_gateway = r.data[6..12] == GATEWAY_MAC;
        let to_gateway = r.data[..6] == GATEWAY_MAC;
        assert!(from_gateway != to_gateway, "a large frame between guests");
        let side = if from_gateway { &mut down } else { &mut up };
        side.0 += 1;
        side.1 += r.orig_len;
    }
    let summary = format!(
        "{} records, largest {largest}; above {MAX_FRAME}: {} from the gateway ({} bytes), {} to it ({} bytes)",
        records.len(),
        down.0,
        down.1,
        up.0,
        up.1
    );
    eprintln!("{summary}");
    assert!(down.0 > 0, "no large frame host→guest: {summary}\n{}", world.logs());
    assert!(up.0 > 0, "no large frame guest→host: {summary}\n{}", world.logs());
    // Not a stray one: most of each transfer went in them.
    assert!(down.1 > SIZE / 2 && up.1 > SIZE / 2, "{summary}");
}

/// A frame from `src` to `dst` of EtherType 0x88B6 (IEEE local
/// experimental 2, which nobody handles), `len` bytes long, filled with
/// `fill`.
fn test_frame(src: [u8; 6], dst: [u8; 6], len: usize, fill: u8) -> Vec<u8> {
    let mut f = vec![fill; len];
    f[..6].copy_from_slice(&dst);
    f[6..12].copy_from_slice(&src);
    f[12..14].copy_from_slice(&[0x88, 0xb6]);
    f
}

/// A hello as `rdnet_wire::offload` lays it out: EtherType, magic, role
/// (1 VM, 2 gateway), flags (1: LARGE_TCP), padded to 60 bytes.
fn hello(src: [u8; 6], dst: [u8; 6], role: u8, flags: u32) -> Vec<u8> {
    let mut f = dst.to_vec();
    f.extend_from_slice(&src);
    f.extend_from_slice(&OFFLOAD_ETHERTYPE);
    f.extend_from_slice(b"rdnet-offload\0");
    f.push(role);
    f.extend_from_slice(&flags.to_be_bytes());
    f.resize(60, 0);
    f
}

/// vm-switch's hello: role VM, LARGE_TCP, broadcast.
fn vm_hello(src: [u8; 6]) -> Vec<u8> {
    hello(src, [0xff; 6], 1, 1)
}

fn is_gateway_hello_to(f: &[u8], mac: [u8; 6]) -> bool {
    f.len() >= 33
        && f[..6] == mac
        && f[6..12] == GATEWAY_MAC
        && f[12..14] == OFFLOAD_ETHERTYPE
        && &f[14..28] == b"rdnet-offload\0"
        && f[28] == 2
        && u32::from_be_bytes([f[29], f[30], f[31], f[32]]) & 1 != 0
}

/// Receives on `link` until a frame satisfies `want` (true) or `timeout`
/// passes (false); every frame seen is appended to `seen`.
fn recv_until(link: &mut RawLink, seen: &mut Vec<Vec<u8>>, timeout: Duration, want: impl Fn(&[u8]) -> bool) -> bool {
    let end = Instant::now() + timeout;
    while let Some(left) = end.checked_duration_since(Instant::now()) {
        match link.recv(left) {
            Ok(Some(f)) => {
                let hit = want(&f);
                seen.push(f);
                if hit {
                    return true;
                }
            }
            Ok(None) | Err(_) => return false,
        }
    }
    false
}

fn ipv4_checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An Ethernet/IPv4/TCP frame from the rogue (`mac`, `ip`:`sport`) to the
/// host alias's `dport` through the gateway. The TCP checksum is left 0:
/// the gateway does not verify it (the IPv4 one it does).
#[allow(clippy::too_many_arguments)]
fn rogue_tcp(
    mac: [u8; 6],
    ip: [u8; 4],
    sport: u16,
    dport: u16,
    seq: u32,
    ack: u32,
    flags: u8,
    options: &[u8],
) -> Vec<u8> {
    let tcp_len = 20 + options.len();
    let total = 20 + tcp_len;
    let mut f = GATEWAY_MAC.to_vec();
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0x08, 0x00]);
    let mut ip_hdr = vec![0x45, 0, (total >> 8) as u8, total as u8, 0, 1, 0x40, 0, 64, 6, 0, 0];
    ip_hdr.extend_from_slice(&ip);
    ip_hdr.extend_from_slice(&[192, 168, 127, 254]);
    let sum = ipv4_checksum(&ip_hdr);
    ip_hdr[10..12].copy_from_slice(&sum.to_be_bytes());
    f.extend_from_slice(&ip_hdr);
    f.extend_from_slice(&sport.to_be_bytes());
    f.extend_from_slice(&dport.to_be_bytes());
    f.extend_from_slice(&seq.to_be_bytes());
    f.extend_from_slice(&ack.to_be_bytes());
    f.push(((tcp_len / 4) as u8) << 4);
    f.push(flags);
    f.extend_from_slice(&[0xff, 0xff, 0, 0, 0, 0]); // window 65535, checksum, urgent
    f.extend_from_slice(options);
    f
}

#[test]
fn a_peer_without_hello_never_gets_large_frames_or_hellos() {
    if !privileged() {
        return;
    }
    const SIZE: usize = 16 * 1024 * 1024;
    let mut world = world(&[]);
    let (down_port, rogue_port) = (18112u16, 18113u16);
    let _sender = world.host_server(down_port, SENDER, &["3", &SIZE.to_string()]);
    let _rogue_sender = world.host_server(rogue_port, SENDER, &["4", "1048576"]);

    // The peer that never says hello: everything it receives is kept.
    const PLAIN_MAC: [u8; 6] = [0x02, 0, 0, 0x0b, 0xad, 0x0a];
    const PLAIN_IP: [u8; 4] = [192, 168, 127, 50];
    let plain = RawLink::connect(&world.socket);
    let mut plain_tx = plain.try_clone();
    let stop = AtomicBool::new(false);
    let plain_seen = Mutex::new(Vec::<Vec<u8>>::new());
    // Two peers that do say hello, played by the test.
    const B_MAC: [u8; 6] = [0x02, 0, 0, 0x0b, 0xad, 0x0b];
    const C_MAC: [u8; 6] = [0x02, 0, 0, 0x0b, 0xad, 0x0c];
    let marker = test_frame(B_MAC, [0xff; 6], 60, 0x11);

    std::thread::scope(|s| {
        let collector = s.spawn(|| {
            let mut plain = plain;
            loop {
                match plain.recv(Duration::from_millis(100)) {
                    Ok(Some(f)) => plain_seen.lock().unwrap().push(f),
                    Ok(None) if stop.load(Ordering::Relaxed) => break,
                    Ok(None) => {}
                    Err(_) => break,
                }
            }
        });
        // The real guest's bulk download runs meanwhile (large frames to
        // its port, which said hello when its vm-switch connected).
        let download = s.spawn(|| checked_download(&world, 0, down_port, 3, SIZE));

        // The plain peer makes itself known: its MAC on its port, its
        // address in the gateway's neighbour table (an ARP request).
        let mut arp = vec![0xff; 6];
        arp.extend_from_slice(&PLAIN_MAC);
        arp.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
        arp.extend_from_slice(&PLAIN_MAC);
        arp.extend_from_slice(&PLAIN_IP);
        arp.extend_from_slice(&[0; 6]);
        arp.extend_from_slice(&[192, 168, 127, 1]);
        plain_tx.send(&arp).expect("plain peer's ARP");

        // B and C say hello and each get the gateway's answer.
        let (mut b, mut c) = (RawLink::connect(&world.socket), RawLink::connect(&world.socket));
        let (mut b_seen, mut c_seen) = (Vec::new(), Vec::new());
        b.send(&vm_hello(B_MAC)).unwrap();
        assert!(
            recv_until(&mut b, &mut b_seen, Duration::from_secs(5), |f| is_gateway_hello_to(f, B_MAC)),
            "B: no hello back"
        );
        c.send(&vm_hello(C_MAC)).unwrap();
        assert!(
            recv_until(&mut c, &mut c_seen, Duration::from_secs(5), |f| is_gateway_hello_to(f, C_MAC)),
            "C: no hello back"
        );
        // C makes its MAC known (B sees this broadcast; so does the plain peer).
        c.send(&test_frame(C_MAC, [0xff; 6], 60, 0x22)).unwrap();

        // B sends large frames: broadcast, and unicast to C and to the
        // plain peer; then a small broadcast marker. Frames of one port
        // are handled in order, so once the marker reaches a peer, so
        // has every large frame that was going to.
        let sizes = [MAX_FRAME + 1, 9014, 65535];
        for round in 0..3u8 {
            for &len in &sizes {
                b.send(&test_frame(B_MAC, [0xff; 6], len, 0x30 + round)).unwrap();
                b.send(&test_frame(B_MAC, C_MAC, len, 0x40 + round)).unwrap();
                b.send(&test_frame(B_MAC, PLAIN_MAC, len, 0x50 + round)).unwrap();
            }
            b.send(&marker).unwrap();
            assert!(recv_until(&mut c, &mut c_seen, Duration::from_secs(5), |f| f == marker), "C: no marker {round}");
            std::thread::sleep(Duration::from_millis(100));
        }

        // The plain peer opens a TCP connection through the NAT announcing
        // an MSS far above its MTU: the gateway's segments to it must
        // still never exceed the MTU on its link.
        let sport = 40_000;
        let isn = 1_000u32;
        let mss = [2, 4, 0xea, 0x60]; // 60 000
        plain_tx.send(&rogue_tcp(PLAIN_MAC, PLAIN_IP, sport, rogue_port, isn, 0, 0x02, &mss)).unwrap();
        let syn_ack = |f: &[u8]| {
            f.len() >= 54 && f[..6] == PLAIN_MAC && f[23] == 6 && f[34..36] == rogue_port.to_be_bytes() && f[47] == 0x12
        };
        let mut got_syn_ack = None;
        assert!(
            wait_until(Duration::from_secs(5), || {
                got_syn_ack = plain_seen.lock().unwrap().iter().find(|f| syn_ack(f)).cloned();
                got_syn_ack.is_some()
            }),
            "the plain peer got no SYN-ACK\n{}",
            world.logs()
        );
        let their_isn = u32::from_be_bytes(got_syn_ack.unwrap()[38..42].try_into().unwrap());
        plain_tx
            .send(&rogue_tcp(PLAIN_MAC, PLAIN_IP, sport, rogue_port, isn + 1, their_isn.wrapping_add(1), 0x10, &[]))
            .unwrap();

        download.join().expect("download thread");
        // Give the NAT's segments (and their retransmissions) time to come.
        std::thread::sleep(Duration::from_millis(1500));
        // The plain peer still hears broadcasts: the marker, once more.
        b.send(&marker).unwrap();
        let marker_count = || plain_seen.lock().unwrap().iter().filter(|f| **f == marker).count();
        assert!(wait_until(Duration::from_secs(5), || marker_count() == 4), "{}", world.logs());
        // End the connection (a RST) and the raw links.
        plain_tx.send(&rogue_tcp(PLAIN_MAC, PLAIN_IP, sport, rogue_port, isn + 1, 0, 0x04, &[])).unwrap();
        stop.store(true, Ordering::Relaxed);
        collector.join().expect("collector thread");
        plain_tx.shutdown();

        // C got every large frame B sent it, broadcast or unicast, whole.
        for round in 0..3u8 {
            for &len in &sizes {
                for fill in [0x30 + round, 0x40 + round] {
                    assert!(
                        c_seen.iter().any(|f| f.len() == len && f[20] == fill),
                        "C is missing a {len}-byte frame (fill {fill:#x})"
                    );
                }
            }
        }
        // B and C each heard their own hello back, once, and no other.
        for (seen, mac, name) in [(&b_seen, B_MAC, "B"), (&c_seen, C_MAC, "C")] {
            let hellos: Vec<_> = seen.iter().filter(|f| f.get(12..14) == Some(&OFFLOAD_ETHERTYPE)).collect();
            assert_eq!(hellos.len(), 1, "{name} saw {} offload frames", hellos.len());
            assert!(is_gateway_hello_to(hellos[0], mac), "{name} got someone else's hello");
        }
    });

    let seen = plain_seen.into_inner().unwrap();
    let largest = seen.iter().map(Vec::len).max().unwrap_or(0);
    assert!(largest <= MAX_FRAME, "the plain peer got a {largest}-byte frame");
    let hellos = seen.iter().filter(|f| f.get(12..14) == Some(&OFFLOAD_ETHERTYPE)).count();
    assert_eq!(hellos, 0, "the plain peer got {hellos} offload frames");
    // It did hear the small broadcasts around the large ones: not a test
    // that passes because nothing reached it.
    assert_eq!(seen.iter().filter(|f| **f == marker).count(), 4);
    assert!(seen.iter().any(|f| f[6..12] == C_MAC));
    let tcp_payload = |f: &[u8]| {
        let total = usize::from(u16::from_be_bytes([f[16], f[17]]));
        total.saturating_sub(usize::from(f[14] & 0x0f) * 4 + usize::from(f[46] >> 4) * 4)
    };
    let data: Vec<usize> = seen
        .iter()
        .filter(|f| f.len() >= 54 && f[..6] == PLAIN_MAC && f[23] == 6 && f[34..36] == rogue_port.to_be_bytes())
        .map(|f| tcp_payload(f))
        .collect();
    eprintln!(
        "the plain peer got {} frames, the largest {largest} bytes; TCP segments with payloads {data:?}",
        seen.len()
    );
    // Its announced MSS was capped at what its MTU carries, so the sender's
    // data does flow, in full-sized segments (the connection hung before).
    assert!(data.contains(&1460), "no 1460-byte segment reached the plain peer: {data:?}");
    assert!(world.host_switch().try_wait().is_none(), "host-switch exited\n{}", world.logs());
}

#[test]
fn vm_switch_turns_tso_on_only_while_a_gateway_that_answered_is_connected() {
    if !privileged() || !have_ethtool() {
        return;
    }
    const TAP_MAC: [u8; 6] = [0x5a, 0x94, 0xef, 0xe4, 0x0c, 0xee];
    // vm-switch dials a link the test owns and plays the host on.
    let dir = TempDir::new("offvs");
    let ns = Netns::new("rdo");
    let sock = dir.join("link.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    listener.set_nonblocking(true).unwrap();
    let url = format!("unix://{}", sock.display());
    // The test is a raw-framed host: no gvproxy-style POST /connect.
    let vm = ns.spawn(
        &dir,
        bin("vm-switch"),
        &["--connect", &url, "-connect-http=false", "-dhcp=false", "-logfile", "/dev/stdout", "-debug"],
    );
    let accept = || {
        let mut conn = None;
        let ok = wait_until(Duration::from_secs(10), || match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).unwrap();
                conn = Some(RawLink::from_stream(s));
                true
            }
            Err(_) => false,
        });
        assert!(ok, "vm-switch did not connect:\n{}", vm.logs());
        conn.unwrap()
    };
    let tso = || eth0_feature(&ns, "tcp-segmentation-offload");
    let tap_ready = || ns.exec("ip", &["link", "show", "eth0"]).status.success();

    for session in 0..2 {
        let mut link = accept();
        // The session's first frame is its hello: VM, LARGE_TCP, broadcast.
        let first = link.recv(Duration::from_secs(5)).expect("link").expect("a first frame");
        assert_eq!(first, vm_hello(TAP_MAC), "session {session}: the first frame is not the hello");
        assert!(wait_until(Duration::from_secs(5), tap_ready), "no eth0:\n{}", vm.logs());
        // Until a gateway answers, the kernel cuts its own segments: a
        // host that ignores the hello (gvproxy) never gets a large frame.
        // In the second session this also shows the first one's TSO was
        // turned off when its link ended.
        assert_eq!(tso().as_deref(), Some("off"), "session {session}\n{}", vm.logs());
        // Hellos that are not a gateway's offer change nothing: another
        // VM's (as a switch that floods unknown EtherTypes would pass on),
        // and a gateway's without LARGE_TCP.
        link.send(&vm_hello([0x02, 0, 0, 0, 0, 0x99])).unwrap();
        link.send(&hello(GATEWAY_MAC, TAP_MAC, 2, 0)).unwrap();
        link.send(&hello(GATEWAY_MAC, TAP_MAC, 2, 0)[..40]).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(tso().as_deref(), Some("off"), "session {session}\n{}", vm.logs());
        // The gateway's answer turns TSO on.
        link.send(&hello(GATEWAY_MAC, TAP_MAC, 2, 1)).unwrap();
        assert!(
            wait_until(Duration::from_secs(5), || tso().as_deref() == Some("on")),
            "session {session}: TSO stayed {:?}\n{}",
            tso(),
            vm.logs()
        );
        // None of this reached the tap's other side or came back.
        while let Ok(Some(f)) = link.recv(Duration::from_millis(200)) {
            assert!(f.get(12..14) != Some(&OFFLOAD_ETHERTYPE[..]), "vm-switch sent {f:?}");
        }
        // The host goes away; vm-switch redials.
        link.shutdown();
    }
}
