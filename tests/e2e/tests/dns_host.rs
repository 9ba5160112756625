//! Issue 14's Linux end-to-end checks of DNS forwarding as the host does it:
//! failover between upstreams (the first one silent: queries are still
//! answered, none with SERVFAIL, and the silent one is soon skipped), and
//! host-switch following the host namespace's own resolv.conf (servers and
//! search list) when it changes, without a restart. Every DNS server is the
//! test's own, on 127.0.0.x inside the test's host namespace.

use std::fs;
use std::path::Path;
use std::time::Duration;

use rdnet_e2e::{DEVICE_MAC, GATEWAY, Netns, Proc, TempDir, World, privileged, wait_until};

const LEASE_WAIT: Duration = Duration::from_secs(20);

/// A world whose host namespace's resolv.conf says `resolv_conf` before
/// host-switch (with `flags`) starts, and one guest with its lease.
fn world_with(resolv_conf: &str, flags: &[&str]) -> World {
    let dir = TempDir::new("dnshost");
    let host = Netns::new("rdh");
    fs::write(resolv_conf_of(&host), resolv_conf).unwrap();
    let socket = dir.join("host-switch.sock");
    let mut world = World { guests: Vec::new(), host_switch: None, host, socket, dir };
    world.start_host_switch(flags);
    let g = world.add_guest(DEVICE_MAC, &[]);
    let addr = world.guest(g).wait_for_address(LEASE_WAIT);
    assert_eq!(addr.as_deref(), Some("192.168.127.2/24"), "{}", world.logs());
    world
}

/// The file `ip netns exec` shows as /etc/resolv.conf in `ns` (rewritten
/// in place, it changes what running processes there read).
fn resolv_conf_of(ns: &Netns) -> std::path::PathBuf {
    Path::new("/etc/netns").join(&ns.name).join("resolv.conf")
}

/// dnsmasq answering `example.test` and below with `ip`, on `listen`:53 in
/// the host namespace.
fn dnsmasq(world: &World, listen: &str, ip: &str) -> Proc {
    let pid = format!("--pid-file={}", world.dir.join(format!("dnsmasq-{listen}.pid")).display());
    let p = world.host.spawn(
        &world.dir,
        "dnsmasq",
        &[
            "--no-daemon",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            &format!("--listen-address={listen}"),
            "--bind-interfaces",
            "--port=53",
            "--log-queries",
            "--log-facility=-",
            &pid,
            &format!("--address=/example.test/{ip}"),
        ],
    );
    let ready = wait_until(Duration::from_secs(10), || {
        world.host.exec("dig", &[&format!("@{listen}"), "+time=1", "+tries=1", "+short", "example.test"]).stdout
            == format!("{ip}\n").into_bytes()
    });
    assert!(ready, "dnsmasq on {listen} never answered: {}", p.logs());
    p
}

/// A UDP socket on `listen`:53 in the host namespace that takes queries and
/// never answers (no ICMP error either: the port is open).
fn silent_server(world: &World, listen: &str) -> Proc {
    let script = format!(
        "import socket, time\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         s.bind(('{listen}', 53))\n\
         time.sleep(3600)\n"
    );
    let p = world.host.spawn(&world.dir, "python3", &["-c", &script]);
    let bound = wait_until(Duration::from_secs(10), || {
        !world.host.exec("ss", &["-Hlun", &format!("src {listen}:53")]).stdout.is_empty()
    });
    assert!(bound, "silent server did not bind: {}", p.logs());
    p
}

/// `dig @gateway +time=5 +tries=1 NAME A` in the guest: (status, answer
/// address, query time in ms).
fn lookup(world: &World, name: &str) -> (String, String, u64) {
    let out = world.guest(0).ns.exec("dig", &[&format!("@{GATEWAY}"), "+time=5", "+tries=1", name, "A"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let status = text.split("status: ").nth(1).and_then(|s| s.split(',').next()).unwrap_or("none").to_string();
    let answer = text
        .lines()
        .skip_while(|l| !l.starts_with(";; ANSWER SECTION"))
        .nth(1)
        .and_then(|l| l.split_whitespace().last())
        .unwrap_or("")
        .to_string();
    let ms = text
        .split(";; Query time: ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(u64::MAX);
    (status, answer, ms)
}

/// A counter from the gateway's /stats, asked from the guest.
fn dns_stat(world: &World, key: &str) -> u64 {
    let json = world.guest(0).ns.stdout("curl", &["-sS", "-m", "5", &format!("http://{GATEWAY}/stats")]);
    json.split(&format!("\"{key}\":"))
        .nth(1)
        .and_then(|s| s.split([',', '}']).next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {key} in /stats: {json}"))
}

#[test]
fn dns_fails_over_from_a_silent_upstream() {
    if !privileged() {
        return;
    }
    let world =
        world_with("nameserver 127.0.0.1\n", &["--dns-upstream", "127.0.0.2:53", "--dns-upstream", "127.0.0.1:53"]);
    let _silent = silent_server(&world, "127.0.0.2");
    let good = dnsmasq(&world, "127.0.0.1", "10.1.2.3");
    let mut times = Vec::new();
    for i in 0..8 {
        let (status, answer, ms) = lookup(&world, &format!("q{i}.example.test"));
        assert_eq!((status.as_str(), answer.as_str()), ("NOERROR", "10.1.2.3"), "query {i}\n{}", world.logs());
        times.push(ms);
    }
    // Each query was answered well within a guest's 5-second timeout: the
    // next upstream is asked after half a second, not after the silent
    // one's 2-second attempt; after two such failures the silent one is
    // asked last and the answers come at once.
    assert!(times.iter().all(|ms| *ms < 1500), "query times {times:?}");
    assert!(times[2..].iter().all(|ms| *ms < 400), "the silent upstream was not skipped: {times:?}");
    assert_eq!(dns_stat(&world, "upstream_failures"), 0);
    assert_eq!(dns_stat(&world, "upstream_failovers"), 2, "{}", world.logs());
    assert!(world.logs().contains("DNS upstream keeps failing"), "{}", world.logs());
    assert!(good.logs().contains("query[A] q7.example.test from 127.0.0.1"), "{}", good.logs());
}

#[test]
fn dns_follows_the_host_resolv_conf_without_a_restart() {
    if !privileged() {
        return;
    }
    // No --dns-upstream: the host namespace's resolv.conf, whose first
    // server is silent.
    let mut world = world_with("search one.test\nnameserver 127.0.0.2\nnameserver 127.0.0.1\n", &[]);
    let _silent = silent_server(&world, "127.0.0.2");
    let _first = dnsmasq(&world, "127.0.0.1", "10.1.1.1");
    for i in 0..4 {
        let (status, answer, _) = lookup(&world, &format!("a{i}.example.test"));
        assert_eq!((status.as_str(), answer.as_str()), ("NOERROR", "10.1.1.1"), "{}", world.logs());
    }
    // The search list reached the guest by DHCP (vm-switch's resolv.conf).
    let guest_resolv = world.guest(0).resolv_conf.clone();
    let text = fs::read_to_string(&guest_resolv).unwrap();
    assert!(text.contains("search one.test\n"), "{text}");

    // "A VPN connects": other servers, another search list.
    let _second = dnsmasq(&world, "127.0.0.3", "10.3.3.3");
    fs::write(resolv_conf_of(&world.host), "search two.test corp.two.test\nnameserver 127.0.0.3\n").unwrap();
    let switched = wait_until(Duration::from_secs(15), || lookup(&world, "b.example.test").1 == "10.3.3.3");
    assert!(switched, "queries never went to the new server\n{}", world.logs());
    assert!(world.logs().contains("search=two.test corp.two.test"), "{}", world.logs());
    // A new DHCP exchange carries the new list: restart vm-switch.
    fs::remove_file(&guest_resolv).unwrap();
    let mut guest = world.guests.remove(0);
    guest.vm_switch = None;
    world.start_vm_switch(&mut guest, &[]);
    world.guests.push(guest);
    let renewed = wait_until(Duration::from_secs(20), || {
        fs::read_to_string(&guest_resolv).is_ok_and(|t| t.contains("search two.test corp.two.test\n"))
    });
    assert!(renewed, "{:?}\n{}", fs::read_to_string(&guest_resolv), world.logs());
}
