//! The host's own DNS settings: the servers plain forwarding uses and the
//! search suffixes DHCP hands to guests.
//!
//! How this works: [`read`] asks the operating system once. On Unix that is
//! `/etc/resolv.conf` (`nameserver` lines; the last `search` or `domain`
//! line). On Windows it is the adapters that are up, lowest interface metric
//! first (their DNS servers and connection-specific suffixes, from
//! `GetAdaptersAddresses`), the global search list or else the primary DNS
//! suffix (from the registry, policy first), and the resolver's own search
//! list (`DnsQueryConfig`, used only when it reads as a plain list of names,
//! which is what Wine returns). [`watch`] reads once at once and then again
//! every [`RECHECK`] (every [`RECHECK_WITHOUT_SERVERS`] while the settings
//! list no server) on a thread of its own, so neither the engine thread
//! nor a query ever waits for a file or the OS; whoever holds the returned
//! receiver sees the newest settings (a VPN that connects or drops shows
//! within [`RECHECK`]). The thread ends once every receiver is gone. Search
//! lists are cleaned ([`clean_search`]): valid names only, no duplicates,
//! and no more than fits one DHCP option beside the domain name option.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

/// How often the host's settings are read again.
pub const RECHECK: Duration = Duration::from_secs(5);
/// How often they are read again while they list no server: a host whose
/// network is still coming up (or Wine, whose first answer can lack the
/// servers) gets its resolver back within a second rather than five.
pub const RECHECK_WITHOUT_SERVERS: Duration = Duration::from_secs(1);
/// Most DNS servers kept (glibc uses three; Windows adapters may list more).
pub const MAX_SERVERS: usize = 8;
/// Most search domains handed to guests.
pub const MAX_SEARCH: usize = 16;
/// Most bytes the search list may take in wire form (DHCP option 119),
/// so that it and the domain name option (15) fit a 576-byte DHCP message
/// with everything else the server sends.
pub const MAX_SEARCH_WIRE: usize = 200;

const DNS_PORT: u16 = 53;

/// What the host resolves with.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostDnsConfig {
    /// Servers for plain forwarding, in the order to try them.
    pub servers: Vec<SocketAddr>,
    /// Search suffixes, without trailing dots, for DHCP options 119 and 15.
    pub search: Vec<String>,
}

/// Parses a resolv.conf: its `nameserver` lines (scoped IPv6 addresses such
/// as `fe80::1%eth0` skipped) and, as the resolver does, the last `search`
/// or `domain` line.
pub fn parse_resolv_conf(text: &str) -> HostDnsConfig {
    let mut servers = Vec::new();
    let mut search = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("nameserver") => {
                if let Some(ip) = words.next().and_then(|w| w.parse::<IpAddr>().ok()) {
                    servers.push(SocketAddr::new(ip, DNS_PORT));
                }
            }
            Some("search" | "domain") => search = words.map(str::to_string).collect(),
            _ => {}
        }
    }
    servers.dedup();
    servers.truncate(MAX_SERVERS);
    HostDnsConfig { servers, search: clean_search(search) }
}

/// A search list fit for DHCP: names without surrounding dots, each a valid
/// host name (letters, digits, `-`, `_`; labels of 1..=63 bytes; at most 253
/// bytes), duplicates (any case) dropped, at most [`MAX_SEARCH`] names and
/// [`MAX_SEARCH_WIRE`] bytes in wire form; names beyond that are left out.
pub fn clean_search<S: AsRef<str>>(list: impl IntoIterator<Item = S>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut wire = 0;
    for name in list {
        let name = name.as_ref().trim().trim_matches('.');
        if !valid_domain(name) || out.iter().any(|d| d.eq_ignore_ascii_case(name)) {
            continue;
        }
        // Each label costs its length plus one; the root label one more.
        let cost = name.len() + 2;
        if out.len() == MAX_SEARCH || wire + cost > MAX_SEARCH_WIRE {
            break;
        }
        wire += cost;
        out.push(name.to_string());
    }
    out
}

fn valid_domain(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// One network adapter's DNS settings (Windows).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AdapterDns {
    /// Operationally up.
    pub up: bool,
    /// The IPv4 interface metric: lower is preferred (VPNs usually are).
    pub metric: u32,
    pub servers: Vec<SocketAddr>,
    /// The connection-specific suffix.
    pub suffix: Option<String>,
    /// The adapter's own suffix search list.
    pub suffixes: Vec<String>,
}

/// The site-local addresses Windows lists as IPv6 DNS servers when none is
/// configured (fec0:0:0:ffff::1..3): nothing answers there.
fn is_windows_placeholder(addr: &SocketAddr) -> bool {
    match addr.ip() {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            s[..4] == [0xfec0, 0, 0, 0xffff] && s[4..7] == [0, 0, 0] && (1..=3).contains(&s[7])
        }
        IpAddr::V4(_) => false,
    }
}

/// Combines what Windows reports into one configuration: the up adapters'
/// servers, lowest metric first; the search list as `global` (the global
/// search list, or else the primary DNS suffix), then `queried` (the
/// resolver's own list), then each up adapter's suffix and suffix list.
pub fn combine_windows(global: &[String], queried: &[String], adapters: &[AdapterDns]) -> HostDnsConfig {
    let mut up: Vec<&AdapterDns> = adapters.iter().filter(|a| a.up).collect();
    // Stable: adapters of equal metric keep the OS's order.
    up.sort_by_key(|a| a.metric);
    let mut servers: Vec<SocketAddr> = Vec::new();
    for s in up.iter().flat_map(|a| &a.servers) {
        if !is_windows_placeholder(s) && !servers.contains(s) {
            servers.push(*s);
        }
    }
    servers.truncate(MAX_SERVERS);
    let adapter_suffixes = up.iter().flat_map(|a| a.suffix.iter().chain(&a.suffixes));
    let search = clean_search(global.iter().chain(queried).chain(adapter_suffixes));
    HostDnsConfig { servers, search }
}

/// Splits a registry search list ("a.example,b.example" or with spaces).
pub fn split_list(text: &str) -> Vec<String> {
    text.split([',', ' ', ';']).filter(|s| !s.is_empty()).map(str::to_string).collect()
}

/// A list of names as NUL-separated UTF-16 strings ending in an empty one
/// (what Wine's `DnsQueryConfig(DnsConfigSearchList)` returns). Anything
/// that does not read as exactly that, every string a domain name, is
/// refused whole (`None`): the layout is not documented.
pub fn parse_multi_sz(units: &[u16]) -> Option<Vec<String>> {
    if units == [0] {
        return Some(Vec::new());
    }
    let units = units.strip_suffix(&[0, 0])?;
    let mut names = Vec::new();
    if units.is_empty() {
        return Some(names);
    }
    for part in units.split(|u| *u == 0) {
        let name = String::from_utf16(part).ok()?;
        if !valid_domain(name.trim_end_matches('.')) {
            return None;
        }
        names.push(name);
    }
    Some(names)
}

/// Reads the host's settings now (blocking: a file or OS calls).
pub fn read() -> HostDnsConfig {
    #[cfg(unix)]
    {
        std::fs::read_to_string("/etc/resolv.conf").map(|t| parse_resolv_conf(&t)).unwrap_or_default()
    }
    #[cfg(windows)]
    {
        combine_windows(&windows_registry_search(), &super::sys::resolver_search_list(), &super::sys::adapters())
    }
    #[cfg(not(any(unix, windows)))]
    {
        HostDnsConfig::default()
    }
}

/// The global search list (policy first), or else the primary DNS suffix,
/// from the registry; empty when neither is set.
#[cfg(windows)]
fn windows_registry_search() -> Vec<String> {
    use windows_registry::LOCAL_MACHINE;
    const POLICY: &str = r"SOFTWARE\Policies\Microsoft\Windows NT\DNSClient";
    const TCPIP: &str = r"SYSTEM\CurrentControlSet\Services\Tcpip\Parameters";
    let value = |key: &str, name: &str| {
        LOCAL_MACHINE.open(key).and_then(|k| k.get_string(name)).ok().filter(|s| !s.trim().is_empty())
    };
    if let Some(list) = value(POLICY, "SearchList").or_else(|| value(TCPIP, "SearchList")) {
        return split_list(&list);
    }
    value(POLICY, "PrimaryDnsSuffix").or_else(|| value(TCPIP, "Domain")).map(|d| vec![d]).unwrap_or_default()
}

/// Reads the host's settings now and then every [`RECHECK`] on a thread of
/// its own, for as long as a receiver lives.
pub fn watch() -> watch::Receiver<Arc<HostDnsConfig>> {
    let first = read();
    log_config(&first);
    let mut pause = recheck_after(&first);
    let (tx, rx) = watch::channel(Arc::new(first));
    let spawned = std::thread::Builder::new().name("rdnet-host-dns".into()).spawn(move || {
        loop {
            std::thread::sleep(pause);
            if tx.is_closed() {
                return;
            }
            let next = read();
            pause = recheck_after(&next);
            tx.send_if_modified(|current| {
                if **current == next {
                    return false;
                }
                log_config(&next);
                *current = Arc::new(next);
                true
            });
        }
    });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the thread that follows the host's DNS settings: they are read only once");
    }
    rx
}

fn recheck_after(c: &HostDnsConfig) -> Duration {
    if c.servers.is_empty() { RECHECK_WITHOUT_SERVERS } else { RECHECK }
}

fn log_config(c: &HostDnsConfig) {
    let servers: Vec<String> = c.servers.iter().map(ToString::to_string).collect();
    tracing::info!(servers = %servers.join(" "), search = %c.search.join(" "), "host DNS settings");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn settings_without_a_server_are_read_again_sooner() {
        let none = HostDnsConfig { servers: vec![], search: vec!["corp.test".into()] };
        let one = HostDnsConfig { servers: vec![addr("127.0.0.1:53")], search: vec![] };
        assert_eq!(recheck_after(&none), RECHECK_WITHOUT_SERVERS);
        assert_eq!(recheck_after(&one), RECHECK);
        assert!(RECHECK_WITHOUT_SERVERS < RECHECK);
    }

    #[test]
    fn resolv_conf_lines() {
        let text = "# comment\nsearch example.com\nnameserver 10.0.0.53\nnameserver  ::1 \nnameserver fe80::1%eth0\n\
                    nameserverx 1.1.1.1\noptions ndots:2\nnameserver\ndomain corp.test\nsearch  a.test B.test. a.test\n";
        let c = parse_resolv_conf(text);
        assert_eq!(c.servers, vec![addr("10.0.0.53:53"), addr("[::1]:53")]);
        // The last search/domain line wins; duplicates go.
        assert_eq!(c.search, vec!["a.test", "B.test"]);
        assert_eq!(parse_resolv_conf("domain corp.test\n").search, vec!["corp.test"]);
        let many: String = (0..20).map(|i| format!("nameserver 10.0.0.{i}\n")).collect();
        assert_eq!(parse_resolv_conf(&many).servers.len(), MAX_SERVERS);
    }

    #[test]
    fn search_lists_are_cleaned_and_bounded() {
        let list = [" corp.example.test. ", "CORP.example.test", "bad name", "x\ny", "", ".", "a..b", "ok_1-x.test"];
        assert_eq!(clean_search(list), vec!["corp.example.test", "ok_1-x.test"]);
        assert!(clean_search([format!("{}.test", "a".repeat(64))]).is_empty());
        let long: Vec<String> = (0..40).map(|i| format!("domain-number-{i:02}.example.test")).collect();
        let kept = clean_search(&long);
        assert!(!kept.is_empty() && kept.len() < long.len());
        assert!(kept.iter().map(|d| d.len() + 2).sum::<usize>() <= MAX_SEARCH_WIRE);
        assert_eq!(kept[..], long[..kept.len()], "kept in order, cut at the end");
        let short: Vec<String> = (0..40).map(|i| format!("d{i}")).collect();
        assert_eq!(clean_search(&short).len(), MAX_SEARCH);
    }

    #[test]
    fn windows_settings_combine() {
        let adapters = [
            AdapterDns {
                up: true,
                metric: 25,
                servers: vec![addr("192.168.1.1:53"), addr("[fec0:0:0:ffff::1]:53")],
                suffix: Some("home.test".into()),
                suffixes: vec![],
            },
            AdapterDns {
                up: false,
                metric: 1,
                servers: vec![addr("10.9.9.9:53")],
                suffix: Some("down.test".into()),
                ..Default::default()
            },
            AdapterDns {
                up: true,
                metric: 5,
                servers: vec![addr("10.8.0.1:53"), addr("192.168.1.1:53")],
                suffix: Some("vpn.corp.test".into()),
                suffixes: vec!["corp.test".into(), "vpn.corp.test".into()],
            },
        ];
        let c = combine_windows(&["global.test".into()], &["queried.test".into(), "GLOBAL.test".into()], &adapters);
        // The VPN (metric 5) first; Windows' placeholder and down adapters out.
        assert_eq!(c.servers, vec![addr("10.8.0.1:53"), addr("192.168.1.1:53")]);
        assert_eq!(c.search, vec!["global.test", "queried.test", "vpn.corp.test", "corp.test", "home.test"]);
        assert_eq!(combine_windows(&[], &[], &[]), HostDnsConfig::default());
        assert_eq!(split_list("a.test,b.test  c.test;"), vec!["a.test", "b.test", "c.test"]);
    }

    #[test]
    fn multi_strings() {
        let wide = |s: &str| s.encode_utf16().collect::<Vec<u16>>();
        let mut list = wide("corp.example.test\0lab.example.test\0\0");
        assert_eq!(parse_multi_sz(&list), Some(vec!["corp.example.test".into(), "lab.example.test".into()]));
        assert_eq!(parse_multi_sz(&[0, 0]), Some(vec![]));
        list.pop();
        assert_eq!(parse_multi_sz(&list), None, "unterminated");
        // A structure read as text: a count and pointers are not names.
        assert_eq!(parse_multi_sz(&[2, 0, 0, 0, 0x1234, 0x7ff0, 0, 0]), None);
        assert_eq!(parse_multi_sz(&wide("a b\0\0")), None);
        assert_eq!(parse_multi_sz(&[]), None);
    }

    #[test]
    fn watch_reads_at_once() {
        let rx = watch();
        // Whatever the machine has, it was read before watch() returned.
        assert_eq!(**rx.borrow(), read());
    }
}
