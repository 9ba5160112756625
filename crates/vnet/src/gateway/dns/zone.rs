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
//!
//! The zones are guest-reachable (`POST /services/dns/add` at gateway:80),
//! so [`ZoneTable`] bounds them ([`MAX_ZONES`], [`MAX_RECORDS`] in all,
//! [`MAX_PATTERNS`] regular expressions, names and patterns in length) and
//! indexes exact names: a query costs one hash lookup per zone it falls in
//! plus the (bounded) patterns listed before that name's record. A record
//! that an added one shadows (same name, or same pattern: the new one comes
//! first and always wins) is dropped on merge, so adding the same names
//! again and again never grows the table.

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

/// Zones at most, records in all zones, and regular-expression records in
/// all zones (each costs a match per query of its zone).
pub const MAX_ZONES: usize = 64;
pub const MAX_RECORDS: usize = 16_384;
pub const MAX_PATTERNS: usize = 256;
/// Longest zone or record name (a DNS name's limit) and pattern source.
pub const MAX_NAME: usize = 253;
pub const MAX_PATTERN: usize = 256;

/// Why a zone was not added.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ZoneError {
    #[error("the zone name is empty")]
    EmptyName,
    #[error("the name {0:?} is longer than {MAX_NAME} bytes")]
    NameTooLong(String),
    #[error("a pattern is longer than {MAX_PATTERN} bytes")]
    PatternTooLong,
    #[error("too many DNS zones: at most {MAX_ZONES}")]
    TooManyZones,
    #[error("too many DNS records: at most {MAX_RECORDS} in all zones")]
    TooManyRecords,
    #[error("too many DNS records with a Regexp: at most {MAX_PATTERNS} in all zones")]
    TooManyPatterns,
}

/// The local zones, bounded and indexed for exact names.
#[derive(Debug, Clone, Default)]
pub struct ZoneTable {
    zones: Vec<Indexed>,
    /// Every zone's records, and those with a pattern, counted for the bounds.
    records: usize,
    patterns: usize,
    /// Increases with every merge: newer records sort first.
    generation: u64,
    /// The gateway's own IPv4 addresses and their IPv6 twins: a name that
    /// resolves to one also has the other, so `host.rancher-desktop.internal`
    /// answers AAAA when the network has IPv6 (records hold one address
    /// each, as gvproxy's JSON does).
    twins: Vec<(Ipv4Addr, std::net::Ipv6Addr)>,
}

/// A record's place in its zone's order: newer merges first, then the
/// order in which one merge listed them.
type Place = (std::cmp::Reverse<u64>, usize);

#[derive(Debug, Clone)]
struct Indexed {
    name: String,
    default_ip: Option<IpAddr>,
    /// Lower-case, with its final dot.
    apex: String,
    records: std::collections::BTreeMap<Place, Record>,
    /// Lower-case record name (no final dot) → the records with that name.
    exact: std::collections::HashMap<String, std::collections::BTreeSet<Place>>,
    /// The records with a pattern, in order.
    patterns: std::collections::BTreeSet<Place>,
}

/// What makes a record unreachable once a newer one has it: a plain
/// record is answered by any newer record of its name; a pattern record
/// only by a newer one with the same pattern and name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Identity {
    Name(String),
    Pattern(String, String),
}

fn identity(r: &Record) -> Identity {
    match &r.regexp {
        Some(p) => Identity::Pattern(p.as_str().to_string(), record_key(&r.name)),
        None => Identity::Name(record_key(&r.name)),
    }
}

fn record_key(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

impl Indexed {
    fn new(name: String, apex: String) -> Self {
        Indexed {
            name,
            default_ip: None,
            apex,
            records: Default::default(),
            exact: Default::default(),
            patterns: Default::default(),
        }
    }

    /// The places of the records a newer record `r` makes unreachable.
    fn shadowed_by(&self, r: &Record) -> Vec<Place> {
        let mine = identity(r);
        let mut out = Vec::new();
        let key = record_key(&r.name);
        if !key.is_empty()
            && let Some(places) = self.exact.get(&key)
        {
            // Every plain record of that name, and a pattern record only
            // if it is `r`'s twin (it still matches other names).
            out.extend(
                places
                    .iter()
                    .copied()
                    .filter(|p| self.records.get(p).is_some_and(|old| old.regexp.is_none() || identity(old) == mine)),
            );
        }
        out.extend(self.pattern_twins(r));
        out
    }

    fn pattern_twins(&self, r: &Record) -> Vec<Place> {
        if r.regexp.is_none() {
            return Vec::new();
        }
        let mine = identity(r);
        self.patterns.iter().copied().filter(|p| self.records.get(p).is_some_and(|old| identity(old) == mine)).collect()
    }

    fn insert(&mut self, place: Place, r: Record) {
        let key = record_key(&r.name);
        if !key.is_empty() {
            self.exact.entry(key).or_default().insert(place);
        }
        if r.regexp.is_some() {
            self.patterns.insert(place);
        }
        self.records.insert(place, r);
    }

    fn remove(&mut self, place: Place) -> Option<Record> {
        let r = self.records.remove(&place)?;
        let key = record_key(&r.name);
        if let Some(set) = self.exact.get_mut(&key) {
            set.remove(&place);
            if set.is_empty() {
                self.exact.remove(&key);
            }
        }
        self.patterns.remove(&place);
        Some(r)
    }

    /// The first record (in order) whose name is `relative` or whose
    /// pattern matches it.
    fn hit(&self, relative: &str) -> Option<&Record> {
        let by_name = self.exact.get(relative).and_then(|set| set.first().copied());
        let by_pattern = self
            .patterns
            .iter()
            .copied()
            .take_while(|p| by_name.is_none_or(|n| *p < n))
            .find(|p| self.records.get(p).and_then(|r| r.regexp.as_ref()).is_some_and(|re| re.is_match(relative)));
        by_pattern.or(by_name).and_then(|p| self.records.get(&p))
    }

    fn zone(&self) -> Zone {
        Zone { name: self.name.clone(), records: self.records.values().cloned().collect(), default_ip: self.default_ip }
    }
}

impl ZoneTable {
    /// A table of `zones` (trusted: the defaults); zones without a name
    /// are left out, as they could never answer.
    pub fn new(zones: Vec<Zone>) -> Self {
        let mut table = ZoneTable::default();
        for z in zones {
            let _ = table.merge(z);
        }
        table
    }

    /// The zones, as `/services/dns/all` lists them.
    pub fn zones(&self) -> Vec<Zone> {
        self.zones.iter().map(Indexed::zone).collect()
    }

    /// Adds `zone` as gvproxy's `/services/dns/add` does: a zone of the
    /// same name takes the new `DefaultIP` and the new records, which come
    /// first, before its old ones; otherwise the zone is appended. Old
    /// records the new ones make unreachable are dropped. Nothing changes
    /// when the result would break a bound. Costs O(k log n) for k new
    /// records, whatever the table holds.
    pub fn merge(&mut self, zone: Zone) -> Result<(), ZoneError> {
        let apex = zone.canonical_name().ok_or(ZoneError::EmptyName)?;
        if apex.len() > MAX_NAME + 1 {
            return Err(ZoneError::NameTooLong(zone.name.clone()));
        }
        for r in &zone.records {
            if r.name.len() > MAX_NAME {
                return Err(ZoneError::NameTooLong(r.name.clone()));
            }
            if r.regexp.as_ref().is_some_and(|p| p.as_str().len() > MAX_PATTERN) {
                return Err(ZoneError::PatternTooLong);
            }
        }
        let existing = self.zones.iter().position(|z| z.name == zone.name);
        if existing.is_none() && self.zones.len() >= MAX_ZONES {
            return Err(ZoneError::TooManyZones);
        }
        // Within one merge, the first of twins answers: keep only it.
        let mut seen = std::collections::HashSet::new();
        let fresh: Vec<Record> = zone.records.into_iter().filter(|r| seen.insert(identity(r))).collect();
        // What the new records make unreachable, to check the bounds first.
        let mut gone: Vec<Place> = Vec::new();
        if let Some(i) = existing {
            for r in &fresh {
                gone.extend(self.zones[i].shadowed_by(r));
            }
            gone.sort();
            gone.dedup();
        }
        let gone_patterns = existing.map_or(0, |i| {
            gone.iter().filter(|p| self.zones[i].records.get(p).is_some_and(|r| r.regexp.is_some())).count()
        });
        let new_patterns = fresh.iter().filter(|r| r.regexp.is_some()).count();
        if self.records - gone.len() + fresh.len() > MAX_RECORDS {
            return Err(ZoneError::TooManyRecords);
        }
        if self.patterns - gone_patterns + new_patterns > MAX_PATTERNS {
            return Err(ZoneError::TooManyPatterns);
        }
        let i = match existing {
            Some(i) => i,
            None => {
                self.zones.push(Indexed::new(zone.name.clone(), apex));
                self.zones.len() - 1
            }
        };
        self.generation += 1;
        let z = &mut self.zones[i];
        z.default_ip = zone.default_ip;
        for place in gone {
            z.remove(place);
        }
        for (n, r) in fresh.into_iter().enumerate() {
            z.insert((std::cmp::Reverse(self.generation), n), r);
        }
        self.recount();
        Ok(())
    }

    /// The bounds' counts (a sum over at most [`MAX_ZONES`] zones).
    fn recount(&mut self) {
        self.records = self.zones.iter().map(|z| z.records.len()).sum();
        self.patterns = self.zones.iter().map(|z| z.patterns.len()).sum();
    }

    /// Looks `qname` (fully qualified, any case, with or without the final
    /// dot) up.
    /// Gives each of `pairs`' IPv4 addresses its IPv6 twin in answers.
    pub fn set_ipv6_twins(&mut self, pairs: Vec<(Ipv4Addr, std::net::Ipv6Addr)>) {
        self.twins = pairs;
    }

    fn with_twins(&self, ip: Option<IpAddr>) -> Vec<IpAddr> {
        let twin = self.twins.iter().find(|(v4, _)| ip == Some(IpAddr::V4(*v4))).map(|(_, v6)| IpAddr::V6(*v6));
        ip.into_iter().chain(twin).collect()
    }

    pub fn lookup(&self, qname: &str) -> Lookup {
        let q = qname.trim_end_matches('.').to_ascii_lowercase();
        let q = format!("{q}.");
        for z in &self.zones {
            if q == z.apex {
                return Lookup::Found(Vec::new());
            }
            let Some(relative) = q.strip_suffix(&z.apex).and_then(|r| r.strip_suffix('.')) else { continue };
            if relative.is_empty() {
                continue;
            }
            return match (z.hit(relative), z.default_ip) {
                (Some(r), _) => Lookup::Found(self.with_twins(r.ip)),
                (None, Some(ip)) => Lookup::Found(self.with_twins(Some(ip))),
                (None, None) => Lookup::NxDomain,
            };
        }
        Lookup::NotLocal
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

    fn zones() -> ZoneTable {
        ZoneTable::new(Zone::defaults(Ipv4Addr::new(192, 168, 127, 1), Ipv4Addr::new(192, 168, 127, 254)))
    }

    fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(a, b, c, d))
    }

    fn record(name: &str, ip: IpAddr) -> Record {
        Record::new(name, ip)
    }

    #[test]
    fn default_zones_answer() {
        let z = zones();
        assert_eq!(z.lookup("gateway.rancher-desktop.internal."), Lookup::Found(vec![v4(192, 168, 127, 1)]));
        // With IPv6, the gateway's names have their IPv6 twins too; other
        // names do not.
        let mut z6 = zones();
        let gw6: std::net::Ipv6Addr = "fd5a:94ef:e40c::1".parse().unwrap();
        z6.set_ipv6_twins(vec![(Ipv4Addr::new(192, 168, 127, 1), gw6)]);
        assert_eq!(z6.lookup("gateway.docker.internal."), Lookup::Found(vec![v4(192, 168, 127, 1), IpAddr::V6(gw6)]));
        assert_eq!(z6.lookup("host.docker.internal."), Lookup::Found(vec![v4(192, 168, 127, 254)]));
        assert_eq!(z.lookup("HOST.Docker.Internal"), Lookup::Found(vec![v4(192, 168, 127, 254)]));
        assert_eq!(z.lookup("nope.docker.internal."), Lookup::NxDomain);
        assert_eq!(z.lookup("docker.internal."), Lookup::Found(vec![]));
        assert_eq!(z.lookup("example.com."), Lookup::NotLocal);
        // A suffix that is not on a label boundary is not inside the zone.
        assert_eq!(z.lookup("hostdocker.internal."), Lookup::NotLocal);
        assert_eq!(z.lookup("."), Lookup::NotLocal);
        assert_eq!(z.lookup(""), Lookup::NotLocal);
    }

    #[test]
    fn default_ip_regexp_and_merge() {
        let mut z = zones();
        z.merge(Zone {
            name: "docker.internal.".into(),
            records: vec![Record {
                name: String::new(),
                ip: Some(v4(10, 0, 0, 9)),
                regexp: Some(Pattern::new("^k8s-[0-9]+$").unwrap()),
            }],
            default_ip: Some(v4(10, 0, 0, 1)),
        })
        .unwrap();
        let all = z.zones();
        assert_eq!(all.len(), 2);
        // New records first, then the old ones.
        assert_eq!(all[1].records.len(), 3);
        assert_eq!(all[1].records[1].name, "gateway");
        assert_eq!(z.lookup("k8s-12.docker.internal."), Lookup::Found(vec![v4(10, 0, 0, 9)]));
        assert_eq!(z.lookup("host.docker.internal."), Lookup::Found(vec![v4(192, 168, 127, 254)]));
        assert_eq!(z.lookup("other.docker.internal."), Lookup::Found(vec![v4(10, 0, 0, 1)]));
        z.merge(Zone { name: "test.".into(), records: vec![], default_ip: None }).unwrap();
        assert_eq!(z.zones().len(), 3);
        assert_eq!(z.lookup("a.test."), Lookup::NxDomain);
    }

    #[test]
    fn the_first_record_in_order_answers_pattern_or_name() {
        let mut z = ZoneTable::new(vec![]);
        let pat = |p: &str, ip| Record { name: String::new(), ip: Some(ip), regexp: Some(Pattern::new(p).unwrap()) };
        z.merge(Zone {
            name: "t.".into(),
            records: vec![pat("^a", v4(1, 1, 1, 1)), record("abc", v4(2, 2, 2, 2)), pat("c$", v4(3, 3, 3, 3))],
            default_ip: None,
        })
        .unwrap();
        // The pattern listed before the name wins; the one after does not.
        assert_eq!(z.lookup("abc.t."), Lookup::Found(vec![v4(1, 1, 1, 1)]));
        assert_eq!(z.lookup("xc.t."), Lookup::Found(vec![v4(3, 3, 3, 3)]));
        assert_eq!(z.lookup("ABC.T"), Lookup::Found(vec![v4(1, 1, 1, 1)]));
        z.merge(Zone { name: "u.".into(), records: vec![record("b", v4(4, 4, 4, 4))], default_ip: None }).unwrap();
        assert_eq!(z.lookup("b.u."), Lookup::Found(vec![v4(4, 4, 4, 4)]));
    }

    #[test]
    fn adding_the_same_names_again_never_grows_the_table() {
        let mut z = zones();
        for i in 0..10_000u32 {
            let ip = IpAddr::V4(Ipv4Addr::from(i));
            z.merge(Zone { name: "docker.internal.".into(), records: vec![record("db", ip)], default_ip: None })
                .unwrap();
        }
        assert_eq!(z.zones()[1].records.len(), 3, "db, gateway, host");
        assert_eq!(z.lookup("db.docker.internal."), Lookup::Found(vec![IpAddr::V4(Ipv4Addr::from(9_999))]));
    }

    #[test]
    fn a_record_is_dropped_only_when_nothing_can_reach_it() {
        let mut z = ZoneTable::new(vec![]);
        let pat = |p: &str, name: &str, ip| Record {
            name: name.into(),
            ip: Some(ip),
            regexp: Some(Pattern::new(p).unwrap()),
        };
        let t = |records| Zone { name: "t.".into(), records, default_ip: None };
        z.merge(t(vec![pat("^x", "a", v4(1, 1, 1, 1)), record("b", v4(2, 2, 2, 2))])).unwrap();
        // A newer plain "a" answers "a", but the old pattern still answers "x…".
        z.merge(t(vec![record("a", v4(3, 3, 3, 3))])).unwrap();
        assert_eq!(z.zones()[0].records.len(), 3);
        assert_eq!(z.lookup("a.t."), Lookup::Found(vec![v4(3, 3, 3, 3)]));
        assert_eq!(z.lookup("xy.t."), Lookup::Found(vec![v4(1, 1, 1, 1)]));
        // A newer pattern record named "b" answers "b" first: the plain "b" goes.
        z.merge(t(vec![pat("^zzz$", "b", v4(4, 4, 4, 4))])).unwrap();
        assert_eq!(z.zones()[0].records.len(), 3);
        assert_eq!(z.lookup("b.t."), Lookup::Found(vec![v4(4, 4, 4, 4)]));
        // Its twin replaces the old pattern record, and, being named "a",
        // the plain "a" too; twins within one merge keep the first.
        z.merge(t(vec![pat("^x", "a", v4(5, 5, 5, 5)), pat("^x", "a", v4(6, 6, 6, 6))])).unwrap();
        assert_eq!(z.zones()[0].records.len(), 2);
        assert_eq!(z.lookup("xy.t."), Lookup::Found(vec![v4(5, 5, 5, 5)]));
        assert_eq!(z.lookup("a.t."), Lookup::Found(vec![v4(5, 5, 5, 5)]));
    }

    #[test]
    fn bounds_refuse_and_change_nothing() {
        let mut z = zones();
        for i in 0..MAX_ZONES - 2 {
            z.merge(Zone { name: format!("z{i}."), records: vec![], default_ip: None }).unwrap();
        }
        let e = z.merge(Zone { name: "one-too-many.".into(), records: vec![], default_ip: None });
        assert_eq!(e, Err(ZoneError::TooManyZones));
        // Many distinct names: refused once they would pass the bound.
        let many: Vec<Record> = (0..MAX_RECORDS).map(|i| record(&format!("n{i}"), v4(10, 0, 0, 1))).collect();
        let e = z.merge(Zone { name: "z0.".into(), records: many, default_ip: None });
        assert_eq!(e, Err(ZoneError::TooManyRecords));
        assert!(z.zones()[2].records.is_empty(), "a refused merge changes nothing");
        let pats: Vec<Record> = (0..=MAX_PATTERNS)
            .map(|i| Record { name: String::new(), ip: None, regexp: Some(Pattern::new(&format!("^p{i}$")).unwrap()) })
            .collect();
        let e = z.merge(Zone { name: "z1.".into(), records: pats, default_ip: None });
        assert_eq!(e, Err(ZoneError::TooManyPatterns));
        let long = "a".repeat(MAX_NAME + 1);
        let e = z.merge(Zone { name: "z1.".into(), records: vec![record(&long, v4(1, 2, 3, 4))], default_ip: None });
        assert!(matches!(e, Err(ZoneError::NameTooLong(_))));
        assert_eq!(z.merge(Zone { name: " . ".into(), records: vec![], default_ip: None }), Err(ZoneError::EmptyName));
    }

    #[test]
    fn json_is_gvproxys() {
        let z = &zones().zones()[0];
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
