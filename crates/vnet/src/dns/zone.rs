//! Local DNS zones, in gvproxy's shape (`pkg/types` `Zone` / `Record`), so
//! `/services/dns/all` and `/services/dns/add` speak the same JSON.
//!
//! How this works: a query name belongs to the first zone whose name is a
//! suffix of it (case-insensitively, on a label boundary). Inside a zone, the
//! part before the zone name is compared with each record's `Name`, or
//! matched by its `Regexp`; the first hit answers. No hit: the zone's
//! `DefaultIP` when it has one, else the name does not exist (NXDOMAIN).
//! The zone's own name (its apex) exists but has no addresses. Pure data and
//! functions: no I/O.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};

use regex_automata::meta::Regex;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A zone answered by the gateway itself (gvproxy `types.Zone`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Zone {
    /// Fully qualified, e.g. `rancher-desktop.internal.`.
    #[serde(rename = "Name", alias = "name", default)]
    pub name: String,
    #[serde(rename = "Records", alias = "records", default, deserialize_with = "null_as_empty")]
    pub records: Vec<Record>,
    /// Answer for names in the zone that no record matches. Go's `net.IP`
    /// marshals an unset address as `""`.
    #[serde(rename = "DefaultIP", alias = "defaultIP", alias = "defaultIp", default, with = "go_ip")]
    pub default_ip: Option<IpAddr>,
}

/// One name in a zone (gvproxy `types.Record`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Relative to the zone: `gateway` in `gateway.rancher-desktop.internal.`.
    #[serde(rename = "Name", alias = "name", default)]
    pub name: String,
    #[serde(rename = "IP", alias = "ip", default, with = "go_ip")]
    pub ip: Option<IpAddr>,
    /// Matches the relative name instead of `Name` (an unanchored search,
    /// as Go's `MatchString`).
    #[serde(rename = "Regexp", alias = "regexp", default, skip_serializing_if = "Option::is_none")]
    pub regexp: Option<Pattern>,
}

impl Record {
    pub fn new(name: &str, ip: IpAddr) -> Self {
        Record { name: name.to_string(), ip: Some(ip), regexp: None }
    }
}

impl Zone {
    /// The zones every host-switch serves (COMPAT §6): `gateway` and `host`
    /// in `rancher-desktop.internal.` and `docker.internal.`.
    pub fn defaults(gateway: Ipv4Addr, host: Ipv4Addr) -> Vec<Zone> {
        ["rancher-desktop.internal.", "docker.internal."]
            .into_iter()
            .map(|name| Zone {
                name: name.to_string(),
                records: vec![Record::new("gateway", IpAddr::V4(gateway)), Record::new("host", IpAddr::V4(host))],
                default_ip: None,
            })
            .collect()
    }

    /// The zone name, lower-case and with its final dot.
    fn canonical_name(&self) -> Option<String> {
        let name = self.name.trim().to_ascii_lowercase();
        let name = name.trim_end_matches('.');
        if name.is_empty() {
            // An empty zone would swallow every name; gvproxy's suffix test
            // never matches "." either.
            return None;
        }
        Some(format!("{name}."))
    }
}

/// Adds `zone` as gvproxy's `/services/dns/add` does: a zone of the same name
/// is replaced by the new one, whose records come first, followed by the old
/// zone's records; otherwise the zone is appended.
pub fn merge(zones: &mut Vec<Zone>, mut zone: Zone) {
    if let Some(existing) = zones.iter_mut().find(|z| z.name == zone.name) {
        zone.records.extend(std::mem::take(&mut existing.records));
        *existing = zone;
    } else {
        zones.push(zone);
    }
}

/// What the local zones say about a name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// Not inside any local zone: ask upstream.
    NotLocal,
    /// The name exists; these are its addresses (possibly none).
    Found(Vec<IpAddr>),
    /// Inside a local zone, but no such name.
    NxDomain,
}

/// Looks `qname` (fully qualified, any case, with or without the final dot)
/// up in `zones`.
pub fn lookup(zones: &[Zone], qname: &str) -> Lookup {
    let q = qname.trim_end_matches('.').to_ascii_lowercase();
    let q = format!("{q}.");
    for zone in zones {
        let Some(zname) = zone.canonical_name() else { continue };
        if q == zname {
            return Lookup::Found(Vec::new());
        }
        let Some(relative) = q.strip_suffix(&zname).and_then(|r| r.strip_suffix('.')) else { continue };
        if relative.is_empty() {
            continue;
        }
        let hit = zone.records.iter().find(|r| {
            (!r.name.is_empty() && r.name.trim_end_matches('.').eq_ignore_ascii_case(relative))
                || r.regexp.as_ref().is_some_and(|p| p.is_match(relative))
        });
        return match (hit, zone.default_ip) {
            (Some(r), _) => Lookup::Found(r.ip.into_iter().collect()),
            (None, Some(ip)) => Lookup::Found(vec![ip]),
            (None, None) => Lookup::NxDomain,
        };
    }
    Lookup::NotLocal
}

/// A compiled regular expression that serialises as its source text, as
/// Go's `*regexp.Regexp` does in JSON.
#[derive(Clone)]
pub struct Pattern {
    source: String,
    regex: Regex,
}

impl Pattern {
    pub fn new(source: &str) -> Result<Self, String> {
        let regex = Regex::new(source).map_err(|e| e.to_string())?;
        Ok(Pattern { source: source.to_string(), regex })
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }

    pub fn is_match(&self, text: &str) -> bool {
        self.regex.is_match(text)
    }
}

impl fmt::Debug for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pattern({:?})", self.source)
    }
}

impl PartialEq for Pattern {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

impl Serialize for Pattern {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.source)
    }
}

impl<'de> Deserialize<'de> for Pattern {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let source = String::deserialize(d)?;
        Pattern::new(&source).map_err(serde::de::Error::custom)
    }
}

fn null_as_empty<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Record>, D::Error> {
    Ok(Option::<Vec<Record>>::deserialize(d)?.unwrap_or_default())
}

/// Go's `net.IP` in JSON: a string, `""` for no address.
mod go_ip {
    use std::net::IpAddr;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(ip: &Option<IpAddr>, s: S) -> Result<S::Ok, S::Error> {
        match ip {
            Some(ip) => s.collect_str(ip),
            None => s.serialize_str(""),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<IpAddr>, D::Error> {
        match Option::<String>::deserialize(d)? {
            None => Ok(None),
            Some(s) if s.is_empty() => Ok(None),
            Some(s) => s.parse().map(Some).map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zones() -> Vec<Zone> {
        Zone::defaults(Ipv4Addr::new(192, 168, 127, 1), Ipv4Addr::new(192, 168, 127, 254))
    }

    fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(a, b, c, d))
    }

    #[test]
    fn default_zones_answer() {
        let z = zones();
        assert_eq!(lookup(&z, "gateway.rancher-desktop.internal."), Lookup::Found(vec![v4(192, 168, 127, 1)]));
        assert_eq!(lookup(&z, "HOST.Docker.Internal"), Lookup::Found(vec![v4(192, 168, 127, 254)]));
        assert_eq!(lookup(&z, "nope.docker.internal."), Lookup::NxDomain);
        assert_eq!(lookup(&z, "docker.internal."), Lookup::Found(vec![]));
        assert_eq!(lookup(&z, "example.com."), Lookup::NotLocal);
        // A suffix that is not on a label boundary is not inside the zone.
        assert_eq!(lookup(&z, "hostdocker.internal."), Lookup::NotLocal);
        assert_eq!(lookup(&z, "."), Lookup::NotLocal);
        assert_eq!(lookup(&z, ""), Lookup::NotLocal);
    }

    #[test]
    fn default_ip_regexp_and_merge() {
        let mut z = zones();
        merge(
            &mut z,
            Zone {
                name: "docker.internal.".into(),
                records: vec![Record {
                    name: String::new(),
                    ip: Some(v4(10, 0, 0, 9)),
                    regexp: Some(Pattern::new("^k8s-[0-9]+$").unwrap()),
                }],
                default_ip: Some(v4(10, 0, 0, 1)),
            },
        );
        assert_eq!(z.len(), 2);
        // New records first, then the old ones.
        assert_eq!(z[1].records.len(), 3);
        assert_eq!(z[1].records[1].name, "gateway");
        assert_eq!(lookup(&z, "k8s-12.docker.internal."), Lookup::Found(vec![v4(10, 0, 0, 9)]));
        assert_eq!(lookup(&z, "host.docker.internal."), Lookup::Found(vec![v4(192, 168, 127, 254)]));
        assert_eq!(lookup(&z, "other.docker.internal."), Lookup::Found(vec![v4(10, 0, 0, 1)]));
        merge(&mut z, Zone { name: "test.".into(), records: vec![], default_ip: None });
        assert_eq!(z.len(), 3);
        assert_eq!(lookup(&z, "a.test."), Lookup::NxDomain);
    }

    #[test]
    fn json_is_gvproxys() {
        let z = &zones()[0];
        let json = serde_json::to_string(z).unwrap();
        assert_eq!(
            json,
            r#"{"Name":"rancher-desktop.internal.","Records":[{"Name":"gateway","IP":"192.168.127.1"},{"Name":"host","IP":"192.168.127.254"}],"DefaultIP":""}"#
        );
        let back: Zone = serde_json::from_str(&json).unwrap();
        assert_eq!(&back, z);
        let added: Zone = serde_json::from_str(
            r#"{"Name":"x.internal.","Records":[{"Name":"","IP":"10.1.1.1","Regexp":"^a.*"}],"DefaultIP":"10.2.2.2"}"#,
        )
        .unwrap();
        assert_eq!(added.default_ip, Some(v4(10, 2, 2, 2)));
        assert_eq!(added.records[0].regexp.as_ref().map(Pattern::as_str), Some("^a.*"));
        let null: Zone = serde_json::from_str(r#"{"Name":"y.","Records":null,"DefaultIP":null}"#).unwrap();
        assert!(null.records.is_empty() && null.default_ip.is_none());
        assert!(serde_json::from_str::<Zone>(r#"{"Name":"y.","Records":[{"Regexp":"("}]}"#).is_err());
        assert!(serde_json::from_str::<Zone>(r#"{"Name":"y.","DefaultIP":"not-an-ip"}"#).is_err());
    }
}
