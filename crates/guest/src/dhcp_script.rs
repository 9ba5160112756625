//! busybox udhcpc's script interface (`udhcpc -s SCRIPT`), which Rancher
//! Desktop's `-dhcp-script` names: the script is run with one argument,
//! the event, and the lease in its environment, and does the addressing
//! itself.
//!
//! The events and variables are udhcpc's (busybox `networking/udhcp/dhcpc.c`):
//! `deconfig` (at start and when a lease is lost; only `interface`),
//! `bound` (a new lease), `renew` (the lease renewed or rebound; udhcpc
//! names the event by the state the ACK arrived in, so changed settings
//! are still `renew`), `leasefail` (no lease came of the attempts; only
//! `interface`) and `nak` (`interface`, `ip` = the NAK's `yiaddr`,
//! `serverid`, `message`). A lease gives `ip`, `subnet` (dotted mask) and
//! `mask` (its prefix length), and, when the lease has them, `router`,
//! `dns` (space separated), `domain` (option 15), `search` (option 119,
//! space separated), `broadcast` (option 28, only when the server sent
//! it), `mtu`, `serverid`, `lease` (seconds; 4294967295 for an infinite
//! lease) and `siaddr` (the ACK's next-server field, when set). udhcpc's
//! other variables (`optNN` for options it has no name for, `boot_file`,
//! `sname`, …) are not given.

use std::net::Ipv4Addr;

use crate::dhcp_client::{Lease, Nak};

/// Every variable an event may set. A script's environment is cleared of
/// all of them first, so one set in the caller's own environment never
/// reaches an event that does not set it.
pub const VARIABLES: &[&str] = &[
    "interface",
    "ip",
    "mask",
    "subnet",
    "broadcast",
    "router",
    "dns",
    "domain",
    "search",
    "lease",
    "serverid",
    "mtu",
    "message",
    "siaddr",
];

/// What the script is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScriptEvent<'a> {
    Deconfig,
    Bound(&'a Lease),
    Renew(&'a Lease),
    LeaseFail,
    Nak(&'a Nak),
}

impl ScriptEvent<'_> {
    /// The script's only argument.
    pub fn name(&self) -> &'static str {
        match self {
            ScriptEvent::Deconfig => "deconfig",
            ScriptEvent::Bound(_) => "bound",
            ScriptEvent::Renew(_) => "renew",
            ScriptEvent::LeaseFail => "leasefail",
            ScriptEvent::Nak(_) => "nak",
        }
    }

    /// The variables this event sets, for the interface `ifname`.
    pub fn environment(&self, ifname: &str) -> Vec<(&'static str, String)> {
        let mut env = vec![("interface", ifname.to_string())];
        match self {
            ScriptEvent::Deconfig | ScriptEvent::LeaseFail => {}
            ScriptEvent::Bound(lease) | ScriptEvent::Renew(lease) => lease_environment(lease, &mut env),
            ScriptEvent::Nak(nak) => {
                env.push(("ip", nak.address.to_string()));
                if let Some(s) = nak.server_id {
                    env.push(("serverid", s.to_string()));
                }
                if let Some(m) = &nak.message {
                    env.push(("message", m.clone()));
                }
            }
        }
        env
    }
}

fn lease_environment(lease: &Lease, env: &mut Vec<(&'static str, String)>) {
    env.push(("ip", lease.address.to_string()));
    env.push(("subnet", prefix_to_mask(lease.prefix_len).to_string()));
    env.push(("mask", lease.prefix_len.to_string()));
    if let Some(r) = lease.router {
        env.push(("router", r.to_string()));
    }
    if !lease.dns.is_empty() {
        env.push(("dns", join(&lease.dns)));
    }
    if let Some(d) = &lease.domain {
        env.push(("domain", d.clone()));
    }
    if !lease.domain_search.is_empty() {
        env.push(("search", lease.domain_search.join(" ")));
    }
    if let Some(b) = lease.broadcast {
        env.push(("broadcast", b.to_string()));
    }
    if let Some(m) = lease.mtu {
        env.push(("mtu", m.to_string()));
    }
    env.push(("serverid", lease.server_id.to_string()));
    let secs = lease.lease_time.map_or(u64::from(u32::MAX), |t| t.as_secs());
    env.push(("lease", secs.to_string()));
    if let Some(s) = lease.next_server {
        env.push(("siaddr", s.to_string()));
    }
}

fn join(ips: &[Ipv4Addr]) -> String {
    ips.iter().map(ToString::to_string).collect::<Vec<_>>().join(" ")
}

/// `24` → `255.255.255.0` (prefixes above 32 are taken as 32).
pub fn prefix_to_mask(prefix: u8) -> Ipv4Addr {
    let p = u32::from(prefix.min(32));
    Ipv4Addr::from(u32::MAX.checked_shl(32 - p).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::time::Duration;

    fn lease() -> Lease {
        Lease {
            address: Ipv4Addr::new(192, 168, 127, 2),
            prefix_len: 24,
            router: Some(Ipv4Addr::new(192, 168, 127, 1)),
            dns: vec![Ipv4Addr::new(192, 168, 127, 1), Ipv4Addr::new(10, 0, 0, 53)],
            search: vec!["a.example".into(), "b.example".into()],
            domain: Some("corp.example".into()),
            domain_search: vec!["a.example".into(), "b.example".into()],
            broadcast: None,
            next_server: Some(Ipv4Addr::new(192, 168, 127, 1)),
            mtu: Some(1500),
            server_id: Ipv4Addr::new(192, 168, 127, 1),
            server_mac: [0x5a, 0x94, 0xef, 0xe4, 0x0c, 0xdd],
            lease_time: Some(Duration::from_secs(3600)),
            renew_after: Duration::from_secs(1800),
            rebind_after: Duration::from_secs(3150),
        }
    }

    fn env_map(e: ScriptEvent<'_>) -> BTreeMap<&'static str, String> {
        let env = e.environment("eth0");
        let map: BTreeMap<_, _> = env.iter().cloned().collect();
        assert_eq!(map.len(), env.len(), "no variable twice");
        assert!(map.keys().all(|k| VARIABLES.contains(k)), "{map:?}");
        map
    }

    #[test]
    fn bound_and_renew_carry_the_lease_as_udhcpc_does() {
        let l = lease();
        let want: BTreeMap<&str, String> = [
            ("interface", "eth0"),
            ("ip", "192.168.127.2"),
            ("subnet", "255.255.255.0"),
            ("mask", "24"),
            ("router", "192.168.127.1"),
            ("dns", "192.168.127.1 10.0.0.53"),
            ("domain", "corp.example"),
            ("search", "a.example b.example"),
            ("mtu", "1500"),
            ("serverid", "192.168.127.1"),
            ("lease", "3600"),
            ("siaddr", "192.168.127.1"),
        ]
        .into_iter()
        .map(|(k, v)| (k, v.to_string()))
        .collect();
        assert_eq!(env_map(ScriptEvent::Bound(&l)), want);
        assert_eq!(env_map(ScriptEvent::Renew(&l)), want);
        assert_eq!(ScriptEvent::Bound(&l).name(), "bound");
        assert_eq!(ScriptEvent::Renew(&l).name(), "renew");
    }

    #[test]
    fn only_what_the_lease_has() {
        let mut l = lease();
        l.router = None;
        l.dns.clear();
        l.domain = None;
        l.domain_search.clear();
        l.mtu = None;
        l.broadcast = Some(Ipv4Addr::new(192, 168, 127, 255));
        l.lease_time = None;
        l.prefix_len = 20;
        l.next_server = None;
        let env = env_map(ScriptEvent::Bound(&l));
        for absent in ["router", "dns", "domain", "search", "mtu", "siaddr"] {
            assert!(!env.contains_key(absent), "{absent}: {env:?}");
        }
        assert_eq!(env["broadcast"], "192.168.127.255");
        assert_eq!(env["lease"], "4294967295");
        assert_eq!(env["subnet"], "255.255.240.0");
        assert_eq!(env["mask"], "20");
    }

    #[test]
    fn events_without_a_lease() {
        for e in [ScriptEvent::Deconfig, ScriptEvent::LeaseFail] {
            let env = env_map(e);
            assert_eq!(env.len(), 1);
            assert_eq!(env["interface"], "eth0");
        }
        assert_eq!(ScriptEvent::Deconfig.name(), "deconfig");
        assert_eq!(ScriptEvent::LeaseFail.name(), "leasefail");
        let nak = Nak {
            address: Ipv4Addr::UNSPECIFIED,
            server_id: Some(Ipv4Addr::new(192, 168, 127, 1)),
            message: Some("wrong network".into()),
        };
        let env = env_map(ScriptEvent::Nak(&nak));
        assert_eq!(ScriptEvent::Nak(&nak).name(), "nak");
        assert_eq!(env["ip"], "0.0.0.0");
        assert_eq!(env["serverid"], "192.168.127.1");
        assert_eq!(env["message"], "wrong network");
        let bare = Nak { address: Ipv4Addr::UNSPECIFIED, server_id: None, message: None };
        assert_eq!(env_map(ScriptEvent::Nak(&bare)).len(), 2);
    }

    #[test]
    fn masks() {
        assert_eq!(prefix_to_mask(0), Ipv4Addr::UNSPECIFIED);
        assert_eq!(prefix_to_mask(8), Ipv4Addr::new(255, 0, 0, 0));
        assert_eq!(prefix_to_mask(29), Ipv4Addr::new(255, 255, 255, 248));
        assert_eq!(prefix_to_mask(32), Ipv4Addr::BROADCAST);
        assert_eq!(prefix_to_mask(40), Ipv4Addr::BROADCAST);
    }
}
