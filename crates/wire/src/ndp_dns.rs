//! DNS options of IPv6 Router Advertisements (RFC 8106): RDNSS (type 25,
//! recursive DNS servers) and DNSSL (type 31, the search list). smoltcp's
//! NDP parser leaves them as unknown options, so they are built and read
//! here, with checked lengths: an RA comes from the network and is hostile
//! until proven otherwise.

use std::net::Ipv6Addr;

/// Option types (RFC 8106 §5.1, §5.2).
pub const RDNSS: u8 = 25;
pub const DNSSL: u8 = 31;
/// ICMPv6 Router Advertisement, and the bytes before its options.
pub const ROUTER_ADVERT: u8 = 134;
pub const RA_HEADER: usize = 16;

/// The DNS settings an RA carries. A lifetime of 0 withdraws them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RaDns {
    pub servers: Vec<Ipv6Addr>,
    pub servers_lifetime: u32,
    pub search: Vec<String>,
    pub search_lifetime: u32,
}

/// An RDNSS option for `servers` (at least one), valid `lifetime` seconds.
pub fn rdnss_option(lifetime: u32, servers: &[Ipv6Addr]) -> Option<Vec<u8>> {
    if servers.is_empty() || servers.len() > 127 {
        return None;
    }
    let mut o = vec![RDNSS, (1 + 2 * servers.len()) as u8, 0, 0];
    o.extend_from_slice(&lifetime.to_be_bytes());
    for s in servers {
        o.extend_from_slice(&s.octets());
    }
    Some(o)
}

/// A DNSSL option for `domains`, valid `lifetime` seconds; names that are
/// not valid DNS names (an empty label, a label over 63 bytes, a name over
/// 253) are left out, and `None` when none is left.
pub fn dnssl_option(lifetime: u32, domains: &[String]) -> Option<Vec<u8>> {
    let mut names = Vec::new();
    for d in domains {
        let d = d.trim_end_matches('.');
        if d.is_empty() || d.len() > 253 || d.split('.').any(|l| l.is_empty() || l.len() > 63) {
            continue;
        }
        for label in d.split('.') {
            names.push(label.len() as u8);
            names.extend_from_slice(label.as_bytes());
        }
        names.push(0);
    }
    if names.is_empty() {
        return None;
    }
    // Header 8 bytes, names padded with zeros to a multiple of 8.
    let len = (8 + names.len()).div_ceil(8) * 8;
    if len / 8 > usize::from(u8::MAX) {
        return None;
    }
    let mut o = vec![DNSSL, (len / 8) as u8, 0, 0];
    o.extend_from_slice(&lifetime.to_be_bytes());
    o.extend_from_slice(&names);
    o.resize(len, 0);
    Some(o)
}

/// The DNS options of an RA, given the ICMPv6 message (type, code,
/// checksum, the RA's fields, then options). `None` if it is not an RA or
/// its options are malformed (a zero length, or one running past the end).
pub fn parse_ra_dns(icmpv6: &[u8]) -> Option<RaDns> {
    if icmpv6.first() != Some(&ROUTER_ADVERT) || icmpv6.len() < RA_HEADER {
        return None;
    }
    let mut dns = RaDns::default();
    let mut rest = &icmpv6[RA_HEADER..];
    while !rest.is_empty() {
        let kind = *rest.first()?;
        let len = usize::from(*rest.get(1)?) * 8;
        if len == 0 || len > rest.len() {
            return None;
        }
        let (opt, tail) = rest.split_at(len);
        rest = tail;
        match kind {
            RDNSS if len >= 24 => {
                dns.servers_lifetime = u32::from_be_bytes(opt[4..8].try_into().ok()?);
                for chunk in opt[8..].chunks_exact(16) {
                    dns.servers.push(Ipv6Addr::from(<[u8; 16]>::try_from(chunk).ok()?));
                }
            }
            DNSSL if len >= 16 => {
                dns.search_lifetime = u32::from_be_bytes(opt[4..8].try_into().ok()?);
                dns.search.extend(read_names(&opt[8..]));
            }
            _ => {}
        }
    }
    Some(dns)
}

/// Uncompressed DNS names, one after another, ending at the padding.
fn read_names(mut b: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    let mut labels: Vec<String> = Vec::new();
    while let Some((&n, tail)) = b.split_first() {
        let n = usize::from(n);
        if n == 0 {
            if labels.is_empty() {
                break; // padding
            }
            out.push(labels.join("."));
            labels.clear();
            b = tail;
            continue;
        }
        let Some(label) = tail.get(..n).filter(|_| n <= 63) else { break };
        let Ok(text) = std::str::from_utf8(label) else { break };
        if !text.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_') {
            break;
        }
        labels.push(text.to_ascii_lowercase());
        b = &tail[n..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ra(options: &[Vec<u8>]) -> Vec<u8> {
        let mut m = vec![ROUTER_ADVERT, 0, 0, 0, 64, 0, 0x07, 0x08, 0, 0, 0, 0, 0, 0, 0, 0];
        for o in options {
            m.extend_from_slice(o);
        }
        m
    }

    #[test]
    fn round_trip() {
        let servers = ["fd00::1".parse().unwrap(), "fd00::53".parse().unwrap()];
        let search = vec!["corp.example".to_string(), "lab.example.".to_string(), "bad..name".to_string()];
        let msg = ra(&[rdnss_option(600, &servers).unwrap(), dnssl_option(600, &search).unwrap()]);
        let dns = parse_ra_dns(&msg).unwrap();
        assert_eq!(dns.servers, servers);
        assert_eq!(dns.servers_lifetime, 600);
        assert_eq!(dns.search, ["corp.example", "lab.example"]);
        assert_eq!(dns.search_lifetime, 600);
        // RFC 8106's sizes: RDNSS 8 + 16 per server, DNSSL a multiple of 8.
        assert_eq!(rdnss_option(1, &servers).unwrap().len(), 40);
        assert_eq!(dnssl_option(1, &search).unwrap().len() % 8, 0);
    }

    #[test]
    fn hostile_options_are_refused_not_trusted() {
        assert!(parse_ra_dns(&[133, 0, 0, 0]).is_none(), "not an RA");
        assert!(parse_ra_dns(&ra(&[vec![RDNSS, 0, 0, 0]])).is_none(), "a zero length");
        assert!(parse_ra_dns(&ra(&[vec![RDNSS, 9, 0, 0, 0, 0, 0, 0]])).is_none(), "past the end");
        // A label longer than what is left, and bytes no name has: the names
        // read so far are kept, nothing panics.
        let mut o = vec![DNSSL, 2, 0, 0, 0, 0, 0, 10];
        o.extend_from_slice(&[3, b'a', b'b', b'c', 0, 60, b'x', 0]);
        assert_eq!(parse_ra_dns(&ra(&[o])).unwrap().search, ["abc"]);
        for n in 0..=255u8 {
            let _ = parse_ra_dns(&ra(&[vec![DNSSL, 1, 0, 0, 0, 0, 0, n]]));
            let _ = parse_ra_dns(&[ROUTER_ADVERT; 40].map(|b| b ^ n));
        }
        assert_eq!(rdnss_option(1, &[]), None);
        assert_eq!(dnssl_option(1, &["".to_string()]), None);
    }
}
