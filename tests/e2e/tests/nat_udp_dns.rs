//! Issue 3's end-to-end checks: UDP and ICMP through the NAT to the host
//! namespace's loopback, the gateway's DNS server (local zones, forwarding
//! to the test's own dnsmasq on the host namespace's 127.0.0.1, SERVFAIL for
//! a dead upstream). No query ever leaves the test's namespaces.

use std::time::{Duration, Instant};

use rdnet_e2e::{DEVICE_MAC, GATEWAY, HOST_ALIAS, Proc, World, privileged, wait_until};

const LEASE_WAIT: Duration = Duration::from_secs(20);

/// A world with one guest that has its lease.
fn world_with_guest(host_switch_flags: &[&str]) -> World {
    let mut world = World::new(host_switch_flags);
    let g = world.add_guest(DEVICE_MAC, &[]);
    let addr = world.guest(g).wait_for_address(LEASE_WAIT);
    assert_eq!(addr.as_deref(), Some("192.168.127.2/24"), "{}", world.logs());
    world
}

/// A UDP echo server on the host namespace's 127.0.0.1:`port`.
fn udp_echo_server(world: &World, port: u16) -> Proc {
    let script = format!(
        "import socket\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         s.bind(('127.0.0.1', {port}))\n\
         while True:\n\
         \x20   data, peer = s.recvfrom(65535)\n\
         \x20   s.sendto(data, peer)\n"
    );
    world.host.spawn(&world.dir, "python3", &["-c", &script])
}

/// Runs a python3 script in the guest namespace; returns its stdout.
fn guest_python(world: &World, script: &str) -> String {
    let out = world.guest(0).ns.exec("python3", &["-c", script]);
    assert!(
        out.status.success(),
        "guest script failed: {}\nstdout: {}\nstderr: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        world.logs()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn udp_round_trip_to_host_loopback() {
    if !privileged() {
        return;
    }
    let world = world_with_guest(&["--dns-upstream", "127.0.0.1:53"]);
    let _server = udp_echo_server(&world, 7007);
    // Retries cover the echo server's start-up; sizes up to what a 1500-byte
    // MTU carries in one datagram.
    let script = format!(
        "import socket\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         s.settimeout(1.0)\n\
         for size in (5, 1000, 1472):\n\
         \x20   msg = bytes((i * 7 + size) % 256 for i in range(size))\n\
         \x20   for attempt in range(10):\n\
         \x20       s.sendto(msg, ('{HOST_ALIAS}', 7007))\n\
         \x20       try:\n\
         \x20           data, peer = s.recvfrom(65535)\n\
         \x20           break\n\
         \x20       except socket.timeout:\n\
         \x20           continue\n\
         \x20   else:\n\
         \x20       raise SystemExit('no echo for %d bytes' % size)\n\
         \x20   assert data == msg, 'echo differs'\n\
         \x20   print(size, peer[0], peer[1])\n"
    );
    let out = guest_python(&world, &script);
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        vec!["5 192.168.127.254 7007", "1000 192.168.127.254 7007", "1472 192.168.127.254 7007"],
        "{}",
        world.logs()
    );
    // socat as a second, independent client: one datagram, its echo.
    let out = world
        .guest(0)
        .ns
        .exec("sh", &["-c", &format!("echo socat-hello | timeout 5 socat -T 2 - UDP:{HOST_ALIAS}:7007")]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "socat-hello", "{}", world.logs());
}

#[test]
fn udp_jumbo_datagrams_at_mtu_9000() {
    if !privileged() {
        return;
    }
    let mut world = World::new(&["--mtu", "9000", "--dns-upstream", "127.0.0.1:53"]);
    let g = world.add_guest(DEVICE_MAC, &["--mtu", "9000"]);
    assert!(world.guest(g).wait_for_address(LEASE_WAIT).is_some(), "{}", world.logs());
    assert!(
        wait_until(Duration::from_secs(5), || world
            .guest(g)
            .ns
            .stdout("ip", &["-o", "link", "show", "dev", "eth0"])
            .contains("mtu 9000")),
        "{}",
        world.logs()
    );
    let _server = udp_echo_server(&world, 7009);
    // The largest datagram one 9000-byte packet carries, unfragmented.
    let script = format!(
        "import socket\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         s.setsockopt(socket.IPPROTO_IP, 10, 2)  # IP_MTU_DISCOVER = IP_PMTUDISC_DO\n\
         s.settimeout(1.0)\n\
         msg = bytes(i % 251 for i in range(8972))\n\
         for attempt in range(10):\n\
         \x20   s.sendto(msg, ('{HOST_ALIAS}', 7009))\n\
         \x20   try:\n\
         \x20       data = s.recv(65535)\n\
         \x20       break\n\
         \x20   except socket.timeout:\n\
         \x20       continue\n\
         else:\n\
         \x20   raise SystemExit('no echo')\n\
         print(len(data), data == msg)\n"
    );
    assert_eq!(guest_python(&world, &script).trim(), "8972 True");
}

#[test]
fn udp_to_closed_port_is_refused() {
    if !privileged() {
        return;
    }
    let world = world_with_guest(&["--dns-upstream", "127.0.0.1:53"]);
    // Nothing listens on 7008: the host's ICMP port-unreachable comes back
    // to the guest as one of its own, so its connected socket is refused.
    let script = format!(
        "import socket\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         s.settimeout(1.0)\n\
         s.connect(('{HOST_ALIAS}', 7008))\n\
         for attempt in range(5):\n\
         \x20   try:\n\
         \x20       s.send(b'anyone?')\n\
         \x20       s.recv(100)\n\
         \x20   except ConnectionRefusedError:\n\
         \x20       print('refused')\n\
         \x20       break\n\
         \x20   except socket.timeout:\n\
         \x20       continue\n\
         else:\n\
         \x20   raise SystemExit('never refused')\n"
    );
    assert_eq!(guest_python(&world, &script).trim(), "refused");
}

#[test]
fn ping_host_alias_through_raw_socket() {
    if !privileged() {
        return;
    }
    let mut world = world_with_guest(&["--dns-upstream", "127.0.0.1:53"]);
    // A fresh namespace allows no ping sockets (ping_group_range "1 0"):
    // host-switch, as root, falls back to a raw socket.
    let range = world.host.stdout("sysctl", &["-n", "net.ipv4.ping_group_range"]);
    assert_eq!(range.split_whitespace().collect::<Vec<_>>(), ["1", "0"], "unexpected default");
    let out = world.guest(0).ns.exec("ping", &["-c", "3", "-i", "0.2", "-W", "2", "-s", "1000", HOST_ALIAS]);
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stdout), world.logs());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("1008 bytes from 192.168.127.254: icmp_seq=3"), "{text}");
    assert!(world.logs().contains("ICMP echo NAT uses raw sockets"), "{}", world.logs());
    assert!(world.host_switch().try_wait().is_none(), "host-switch exited");
}

#[test]
fn ping_host_alias_through_ping_socket() {
    if !privileged() {
        return;
    }
    let world = world_with_guest(&["--dns-upstream", "127.0.0.1:53"]);
    // Allow unprivileged ping sockets in the host namespace before the
    // first ping: host-switch learns the socket kind then.
    world.host.exec_ok("sysctl", &["-w", "net.ipv4.ping_group_range=0 2147483647"]);
    assert!(world.guest(0).ping(HOST_ALIAS), "{}", world.logs());
    let out = world.guest(0).ns.exec("ping", &["-c", "2", "-i", "0.2", "-W", "2", "-p", "c0ffee", HOST_ALIAS]);
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stdout), world.logs());
    assert!(world.logs().contains("ICMP echo NAT uses ping sockets"), "{}", world.logs());
}

/// `dig @gateway ARGS +time=… +tries=1` in the guest; its full output.
fn dig(world: &World, args: &[&str]) -> String {
    let mut all = vec![format!("@{GATEWAY}"), "+time=3".to_string(), "+tries=1".to_string()];
    all.extend(args.iter().map(|s| s.to_string()));
    let out = world.guest(0).ns.exec("dig", &all);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The answer section's records, as `dig +noall +answer` prints them
/// (whitespace collapsed).
fn answers(world: &World, args: &[&str]) -> Vec<String> {
    let mut all = vec!["+noall", "+answer"];
    all.extend_from_slice(args);
    dig(world, &all).lines().map(|l| l.split_whitespace().collect::<Vec<_>>().join(" ")).collect()
}

#[test]
fn dns_local_zones() {
    if !privileged() {
        return;
    }
    let world = world_with_guest(&["--dns-upstream", "127.0.0.1:53"]);
    assert_eq!(
        answers(&world, &["gateway.rancher-desktop.internal"]),
        ["gateway.rancher-desktop.internal. 0 IN A 192.168.127.1"],
        "{}",
        world.logs()
    );
    assert_eq!(answers(&world, &["host.docker.internal"]), ["host.docker.internal. 0 IN A 192.168.127.254"]);
    assert_eq!(
        answers(&world, &["HOST.Rancher-Desktop.Internal"]),
        ["HOST.Rancher-Desktop.Internal. 0 IN A 192.168.127.254"]
    );
    assert_eq!(answers(&world, &["gateway.docker.internal"]), ["gateway.docker.internal. 0 IN A 192.168.127.1"]);
    // Without EDNS too.
    assert_eq!(answers(&world, &["+noedns", "host.docker.internal"]), ["host.docker.internal. 0 IN A 192.168.127.254"]);
    // With IPv6 (the default), the host alias's IPv6 twin.
    assert_eq!(
        answers(&world, &["host.docker.internal", "AAAA"]),
        ["host.docker.internal. 0 IN AAAA fd5a:94ef:e40c::fe"]
    );
    let nx = dig(&world, &["nothing.docker.internal"]);
    assert!(nx.contains("status: NXDOMAIN"), "{nx}");
    drop(world);
    // IPv4 only: a name with an A record but no AAAA is NOERROR with no
    // answers, never NXDOMAIN (musl resolvers fail otherwise).
    let world = world_with_guest(&["--dns-upstream", "127.0.0.1:53", "--subnet6="]);
    let aaaa = dig(&world, &["host.docker.internal", "AAAA"]);
    assert!(aaaa.contains("status: NOERROR") && aaaa.contains("ANSWER: 0"), "{aaaa}");
    assert!(aaaa.contains("flags: qr aa rd ra"), "{aaaa}");
}

/// dnsmasq in the host namespace on 127.0.0.1:53, with the test's records.
fn dnsmasq(world: &World) -> Proc {
    // No shell in between: commas separate the strings, no quotes needed.
    let txt = format!("--txt-record=txt.example.test,{},{}", "a".repeat(150), "b".repeat(150));
    let chunk = "c".repeat(250);
    let big = format!("--txt-record=big.example.test,{chunk},{chunk},{chunk},{chunk}");
    let pid = format!("--pid-file={}", world.dir.join("dnsmasq.pid").display());
    let p = world.host.spawn(
        &world.dir,
        "dnsmasq",
        &[
            "--no-daemon",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--listen-address=127.0.0.1",
            "--bind-interfaces",
            "--port=53",
            "--log-queries",
            "--log-facility=-",
            &pid,
            "--address=/example.test/10.1.2.3",
            &txt,
            &big,
            "--mx-host=example.test,mail.example.test,10",
            // More record types, under a domain --address does not cover.
            "--host-record=h.more.test,10.9.9.9,fd00::9",
            "--cname=alias.more.test,h.more.test",
            "--srv-host=_http._tcp.more.test,h.more.test,8080,1,5",
            "--ptr-record=7.0.0.10.in-addr.arpa,seven.more.test",
        ],
    );
    // Ready once it answers through the gateway.
    assert!(
        wait_until(Duration::from_secs(10), || answers(world, &["example.test"])
            .iter()
            .any(|l| l.ends_with("10.1.2.3"))),
        "dnsmasq never answered\n{}\n--- dnsmasq ---\n{}",
        world.logs(),
        p.logs()
    );
    p
}

/// The TXT strings of an answer line, concatenated.
fn txt_text(line: &str) -> String {
    line.split('"').skip(1).step_by(2).collect()
}

#[test]
fn dns_forwarded_to_own_upstream_over_udp() {
    if !privileged() {
        return;
    }
    let world = world_with_guest(&["--dns-upstream", "127.0.0.1:53"]);
    let upstream = dnsmasq(&world);
    let a = answers(&world, &["www.example.test", "A"]);
    assert_eq!(a.len(), 1, "{a:?}");
    assert!(a[0].starts_with("www.example.test.") && a[0].ends_with("IN A 10.1.2.3"), "{a:?}");

    let txt = answers(&world, &["txt.example.test", "TXT"]);
    assert_eq!(txt.len(), 1, "{txt:?}\n{}", upstream.logs());
    assert_eq!(txt_text(&txt[0]), format!("{}{}", "a".repeat(150), "b".repeat(150)), "{txt:?}");

    let mx = answers(&world, &["example.test", "MX"]);
    assert_eq!(mx.len(), 1, "{mx:?}");
    assert!(mx[0].ends_with("IN MX 10 mail.example.test."), "{mx:?}");

    for (args, want) in [
        (["h.more.test", "AAAA"], "h.more.test. 0 IN AAAA fd00::9"),
        (["_http._tcp.more.test", "SRV"], "_http._tcp.more.test. 0 IN SRV 1 5 8080 h.more.test."),
        (["-x", "10.0.0.7"], "7.0.0.10.in-addr.arpa. 0 IN PTR seven.more.test."),
    ] {
        assert_eq!(answers(&world, &args), [want], "{}", upstream.logs());
    }
    let cname = answers(&world, &["alias.more.test", "A"]);
    assert_eq!(cname, ["alias.more.test. 0 IN CNAME h.more.test.", "h.more.test. 0 IN A 10.9.9.9"]);

    // The guest's ID comes back, and the answer is the upstream's.
    let full = dig(&world, &["+qid=4321", "example.test", "A"]);
    assert!(full.contains("id: 4321") && full.contains("status: NOERROR"), "{full}");

    // An answer larger than a classic 512-byte datagram: cut, with TC set,
    // for a guest without EDNS; whole for one that advertises room.
    let cut = dig(&world, &["+noedns", "+ignore", "big.example.test", "TXT"]);
    assert!(cut.contains(" tc ") || cut.contains(" tc;"), "{cut}");
    assert!(cut.contains("ANSWER: 0"), "{cut}");
    let whole = answers(&world, &["+bufsize=4096", "big.example.test", "TXT"]);
    assert_eq!(whole.len(), 1, "{whole:?}");
    assert_eq!(txt_text(&whole[0]).len(), 1000);

    // Every upstream query came from host-switch, inside the host namespace.
    assert!(upstream.logs().contains("query[TXT] txt.example.test from 127.0.0.1"), "{}", upstream.logs());
}

#[test]
fn dns_dead_upstream_gives_servfail_quickly() {
    if !privileged() {
        return;
    }
    // Nothing listens on 127.0.0.1:5999 in the host namespace.
    let world = world_with_guest(&["--dns-upstream", "127.0.0.1:5999"]);
    let started = Instant::now();
    let out = dig(&world, &["+time=5", "example.test", "A"]);
    let took = started.elapsed();
    assert!(out.contains("status: SERVFAIL"), "{out}\n{}", world.logs());
    assert!(took < Duration::from_secs(5), "SERVFAIL took {took:?}");
    // Local names do not depend on the upstream.
    assert_eq!(answers(&world, &["host.docker.internal"]), ["host.docker.internal. 0 IN A 192.168.127.254"]);
}

#[test]
fn dns_over_tcp() {
    if !privileged() {
        return;
    }
    let world = world_with_guest(&["--dns-upstream", "127.0.0.1:53"]);
    let upstream = dnsmasq(&world);
    assert_eq!(
        answers(&world, &["+tcp", "gateway.rancher-desktop.internal"]),
        ["gateway.rancher-desktop.internal. 0 IN A 192.168.127.1"],
        "{}",
        world.logs()
    );
    assert_eq!(answers(&world, &["+tcp", "host.docker.internal"]), ["host.docker.internal. 0 IN A 192.168.127.254"]);
    let nx = dig(&world, &["+tcp", "nothing.docker.internal"]);
    assert!(nx.contains("status: NXDOMAIN"), "{nx}");

    let a = answers(&world, &["+tcp", "www.example.test", "A"]);
    assert!(a.len() == 1 && a[0].ends_with("IN A 10.1.2.3"), "{a:?}\n{}", world.logs());
    let txt = answers(&world, &["+tcp", "txt.example.test", "TXT"]);
    assert_eq!(txt.len(), 1, "{txt:?}");
    assert_eq!(txt_text(&txt[0]), format!("{}{}", "a".repeat(150), "b".repeat(150)));
    let mx = answers(&world, &["+tcp", "example.test", "MX"]);
    assert!(mx.len() == 1 && mx[0].ends_with("IN MX 10 mail.example.test."), "{mx:?}");

    // Several queries on one connection.
    let two = answers(&world, &["+tcp", "+keepopen", "host.docker.internal", "www.example.test", "A"]);
    assert_eq!(two.len(), 2, "{two:?}");
    assert!(two[0].ends_with("IN A 192.168.127.254") && two[1].ends_with("IN A 10.1.2.3"), "{two:?}");

    // A guest without EDNS gets a truncated UDP answer and retries over TCP
    // by itself; over TCP host-switch fetches the upstream's truncated UDP
    // answer again over TCP, so the guest sees all 1000 characters.
    let whole = answers(&world, &["+noedns", "big.example.test", "TXT"]);
    assert_eq!(whole.len(), 1, "{whole:?}\n{}", world.logs());
    assert_eq!(txt_text(&whole[0]).len(), 1000);
    let logs = upstream.logs();
    assert!(logs.contains("query[TXT] big.example.test from 127.0.0.1"), "{logs}");
}
