//! DNS messages the gateway builds itself: local answers, FORMERR and
//! SERVFAIL, and truncation of answers too large for a guest's UDP.
//!
//! How this works: a query is decoded with `hickory-proto` once; from it
//! [`classify`] decides whether the local zones answer it (the reply is
//! built here) or it goes upstream (the guest's bytes are forwarded as they
//! are, and the upstream's answer comes back verbatim unless it exceeds the
//! guest's UDP limit, when [`fit_udp`] cuts it down to header + question
//! with TC set so the guest retries over TCP). Bytes that do not decode get
//! FORMERR when their header is readable as a query, else nothing. Pure
//! functions; no I/O.

use std::net::IpAddr;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{DNSClass, RData, Record, RecordType};

use super::zone::{Lookup, ZoneTable};

pub const HEADER_LEN: usize = 12;
/// Largest UDP answer without EDNS (RFC 1035).
pub const CLASSIC_UDP: usize = 512;
/// Flag bits in the third header byte.
const QR: u8 = 0x80;
const TC: u8 = 0x02;

/// What to do with one message from a guest.
#[derive(Debug)]
pub enum Decision {
    /// Answer with these bytes.
    Reply(Vec<u8>),
    /// Send the guest's bytes to the upstream resolvers.
    Forward(Box<Message>),
    /// Not a query we can answer in any way (a response, garbage).
    Drop,
}

/// Decides how to handle `bytes`, a message a guest sent to port 53.
pub fn classify(zones: &ZoneTable, bytes: &[u8]) -> Decision {
    let query = match Message::from_vec(bytes) {
        Ok(m) => m,
        Err(_) => return formerr(bytes).map_or(Decision::Drop, Decision::Reply),
    };
    if query.metadata.message_type != MessageType::Query {
        return Decision::Drop;
    }
    if query.metadata.op_code != OpCode::Query || query.queries.len() != 1 {
        // Not ours to judge: the upstream resolver answers (or refuses).
        return Decision::Forward(Box::new(query));
    }
    let q = &query.queries[0];
    if !matches!(q.query_class(), DNSClass::IN | DNSClass::ANY) {
        return Decision::Forward(Box::new(query));
    }
    let name = q.name().to_ascii();
    match zones.lookup(&name) {
        Lookup::NotLocal => Decision::Forward(Box::new(query)),
        found => match local_answer(&query, &found) {
            Some(bytes) => Decision::Reply(bytes),
            None => Decision::Drop,
        },
    }
}

/// The answer the local zones give to `query` (one question): A records for
/// A (and ANY) queries, AAAA for AAAA when a record has an IPv6 address,
/// otherwise NOERROR without answers; NXDOMAIN for unknown names. TTL 0, as
/// gvproxy, so nothing caches a host-switch's private names.
pub fn local_answer(query: &Message, found: &Lookup) -> Option<Vec<u8>> {
    let q = query.queries.first()?;
    let mut reply = response_to(query, ResponseCode::NoError);
    reply.metadata.authoritative = true;
    match found {
        Lookup::Found(ips) => {
            for ip in ips {
                let rdata = match (q.query_type(), ip) {
                    (RecordType::A | RecordType::ANY, IpAddr::V4(v4)) => RData::A(A(*v4)),
                    (RecordType::AAAA | RecordType::ANY, IpAddr::V6(v6)) => RData::AAAA(AAAA(*v6)),
                    _ => continue,
                };
                reply.add_answer(Record::from_rdata(q.name().clone(), 0, rdata));
            }
        }
        Lookup::NxDomain => reply.metadata.response_code = ResponseCode::NXDomain,
        Lookup::NotLocal => return None,
    }
    reply.to_vec().ok()
}

/// SERVFAIL for `query`: its ID, opcode, RD/CD and question, and an OPT
/// record when it had one.
pub fn servfail(query: &Message) -> Vec<u8> {
    let reply = response_to(query, ResponseCode::ServFail);
    reply.to_vec().unwrap_or_else(|_| header_only(query.metadata.id, 0, ResponseCode::ServFail.low()))
}

/// A response skeleton for `query` with `rcode`: its ID, opcode, RD and CD,
/// RA set, its question, and an OPT record when it had one.
pub fn response_to(query: &Message, rcode: ResponseCode) -> Message {
    let mut reply = Message::response(query.metadata.id, query.metadata.op_code);
    reply.metadata.recursion_desired = query.metadata.recursion_desired;
    reply.metadata.checking_disabled = query.metadata.checking_disabled;
    reply.metadata.recursion_available = true;
    reply.metadata.response_code = rcode;
    reply.add_queries(query.queries.iter().cloned());
    if let Some(edns) = &query.edns {
        // The query's OPT record, minus its options (cookies, padding: not
        // ours to echo), advertising the same payload size.
        let mut opt = Edns::new();
        opt.set_max_payload(edns.max_payload().max(CLASSIC_UDP as u16));
        opt.set_dnssec_ok(edns.flags().dnssec_ok);
        reply.set_edns(opt);
    }
    reply
}

/// FORMERR for a message hickory could not decode, when its header still
/// reads as a query (QR clear): same ID and opcode, RD copied, no sections.
pub fn formerr(bytes: &[u8]) -> Option<Vec<u8>> {
    let header = bytes.get(..HEADER_LEN)?;
    if header[2] & QR != 0 {
        return None;
    }
    let id = u16::from_be_bytes([header[0], header[1]]);
    // Opcode (bits 3..6) and RD (bit 0) of the third byte.
    Some(header_only(id, header[2] & 0x79, ResponseCode::FormErr.low()))
}

/// A 12-byte response header with no sections.
fn header_only(id: u16, flags: u8, rcode: u8) -> Vec<u8> {
    let mut out = vec![0u8; HEADER_LEN];
    out[..2].copy_from_slice(&id.to_be_bytes());
    out[2] = QR | flags;
    out[3] = 0x80 | (rcode & 0x0f); // RA
    out
}

/// The most a guest accepts over UDP for `query`: 512 bytes without EDNS,
/// else its advertised size (never below 512), and never more than one
/// datagram on the virtual link (`link_max`: MTU - IP - UDP headers).
pub fn udp_limit(query: &Message, link_max: usize) -> usize {
    let asked = query.edns.as_ref().map_or(CLASSIC_UDP, |e| (e.max_payload() as usize).max(CLASSIC_UDP));
    asked.min(link_max).max(HEADER_LEN)
}

/// `response` as it may go to a guest limited to `limit` bytes: unchanged
/// when it fits, else header and question with TC set (and the OPT record),
/// so the guest asks again over TCP.
pub fn fit_udp(response: Vec<u8>, limit: usize) -> Vec<u8> {
    if response.len() <= limit {
        return response;
    }
    if let Ok(msg) = Message::from_vec(&response)
        && let Ok(cut) = msg.truncate().to_vec()
        && cut.len() <= limit
    {
        return cut;
    }
    // Not decodable (or a question too large to keep): the header alone.
    match response.get(..HEADER_LEN) {
        Some(h) => {
            let mut out = h.to_vec();
            out[2] |= TC;
            out[4..].fill(0);
            out
        }
        None => response,
    }
}

/// The ID and the response bit of a message, when it has a header.
pub fn id_and_qr(bytes: &[u8]) -> Option<(u16, bool)> {
    let h = bytes.get(..HEADER_LEN)?;
    Some((u16::from_be_bytes([h[0], h[1]]), h[2] & QR != 0))
}

/// `response` with its ID set to `id`; `None` if it has no header.
pub fn with_id(mut response: Vec<u8>, id: u16) -> Option<Vec<u8>> {
    response.get_mut(..2)?.copy_from_slice(&id.to_be_bytes());
    (response.len() >= HEADER_LEN).then_some(response)
}

/// Whether a response has TC set.
pub fn is_truncated(bytes: &[u8]) -> bool {
    bytes.get(2).is_some_and(|b| b & TC != 0)
}

/// The response code in a response's header (low four bits).
pub fn rcode(bytes: &[u8]) -> Option<u8> {
    bytes.get(3).map(|b| b & 0x0f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::dns::zone::Zone;
    use hickory_proto::op::Query;
    use hickory_proto::rr::Name;
    use hickory_proto::rr::rdata::TXT;
    use std::net::Ipv4Addr;
    use std::str::FromStr;

    fn zones() -> ZoneTable {
        ZoneTable::new(Zone::defaults(Ipv4Addr::new(192, 168, 127, 1), Ipv4Addr::new(192, 168, 127, 254)))
    }

    fn query(name: &str, qtype: RecordType, edns: Option<u16>) -> Message {
        let mut m = Message::new(0x1234, MessageType::Query, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_str(name).unwrap(), qtype));
        if let Some(size) = edns {
            let mut e = Edns::new();
            e.set_max_payload(size);
            m.set_edns(e);
        }
        m
    }

    fn answer(zs: &ZoneTable, q: &Message) -> Message {
        match classify(zs, &q.to_vec().unwrap()) {
            Decision::Reply(r) => Message::from_vec(&r).unwrap(),
            other => panic!("expected a local reply, got {other:?}"),
        }
    }

    #[test]
    fn local_a_aaaa_nxdomain() {
        let zs = zones();
        let r = answer(&zs, &query("gateway.rancher-desktop.internal.", RecordType::A, None));
        assert_eq!(r.metadata.id, 0x1234);
        assert!(r.metadata.authoritative && r.metadata.recursion_desired && r.metadata.recursion_available);
        assert_eq!(r.metadata.response_code, ResponseCode::NoError);
        assert_eq!(r.answers.len(), 1);
        assert_eq!(r.answers[0].ttl, 0);
        assert_eq!(r.answers[0].data, RData::A(A(Ipv4Addr::new(192, 168, 127, 1))));
        assert_eq!(r.queries.len(), 1);
        assert!(r.edns.is_none());

        let r = answer(&zs, &query("host.docker.internal.", RecordType::AAAA, Some(1232)));
        assert_eq!(r.metadata.response_code, ResponseCode::NoError);
        assert!(r.answers.is_empty());
        assert_eq!(r.edns.as_ref().map(|e| e.max_payload()), Some(1232));

        let r = answer(&zs, &query("nothing.docker.internal.", RecordType::A, None));
        assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
        let r = answer(&zs, &query("host.docker.internal.", RecordType::MX, None));
        assert_eq!((r.metadata.response_code, r.answers.len()), (ResponseCode::NoError, 0));
    }

    #[test]
    fn everything_else_is_forwarded() {
        let zs = zones();
        assert!(matches!(
            classify(&zs, &query("example.test.", RecordType::TXT, None).to_vec().unwrap()),
            Decision::Forward(_)
        ));
        // A response is never answered.
        let mut resp = query("example.test.", RecordType::A, None);
        resp.metadata.message_type = MessageType::Response;
        assert!(matches!(classify(&zs, &resp.to_vec().unwrap()), Decision::Drop));
    }

    #[test]
    fn malformed_gets_formerr_or_nothing() {
        let zs = zones();
        let mut bytes = query("example.test.", RecordType::A, None).to_vec().unwrap();
        bytes.truncate(bytes.len() - 3);
        let Decision::Reply(r) = classify(&zs, &bytes) else { panic!("expected FORMERR") };
        assert_eq!(id_and_qr(&r), Some((0x1234, true)));
        assert_eq!(rcode(&r), Some(1));
        assert!(matches!(classify(&zs, &[1, 2, 3]), Decision::Drop));
        // Every prefix and some garbage: never a panic.
        let full = query("gateway.rancher-desktop.internal.", RecordType::A, Some(4096)).to_vec().unwrap();
        for cut in 0..full.len() {
            let _ = classify(&zs, &full[..cut]);
        }
        let mut junk = full.clone();
        for i in 0..junk.len() {
            junk[i] = junk[i].wrapping_mul(31).wrapping_add(7);
            let _ = classify(&zs, &junk);
        }
    }

    #[test]
    fn servfail_keeps_id_question_and_opt() {
        let q = query("example.test.", RecordType::A, Some(4096));
        let r = Message::from_vec(&servfail(&q)).unwrap();
        assert_eq!(r.metadata.id, 0x1234);
        assert_eq!(r.metadata.response_code, ResponseCode::ServFail);
        assert_eq!(r.queries, q.queries);
        assert!(r.edns.is_some());
    }

    #[test]
    fn udp_limits_and_truncation() {
        let plain = query("big.example.test.", RecordType::TXT, None);
        let edns = query("big.example.test.", RecordType::TXT, Some(4096));
        assert_eq!(udp_limit(&plain, 1472), 512);
        assert_eq!(udp_limit(&edns, 1472), 1472);
        assert_eq!(udp_limit(&edns, 65507), 4096);

        let mut resp = plain.clone();
        resp.metadata.message_type = MessageType::Response;
        for i in 0..10 {
            let txt = TXT::new(vec!["x".repeat(200), format!("{i}")]);
            resp.add_answer(Record::from_rdata(Name::from_str("big.example.test.").unwrap(), 60, RData::TXT(txt)));
        }
        let bytes = resp.to_vec().unwrap();
        assert!(bytes.len() > 2000);
        assert_eq!(fit_udp(bytes.clone(), 4096), bytes);
        let cut = fit_udp(bytes, 512);
        assert!(cut.len() <= 512 && is_truncated(&cut));
        let m = Message::from_vec(&cut).unwrap();
        assert_eq!((m.metadata.id, m.answers.len(), m.queries.len()), (0x1234, 0, 1));
        // Undecodable and oversized: header only.
        let mut junk = vec![0xab; 600];
        junk[2] = QR;
        let cut = fit_udp(junk, 512);
        assert_eq!(cut.len(), HEADER_LEN);
        assert!(is_truncated(&cut));
    }
}
