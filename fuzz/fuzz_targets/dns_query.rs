//! The DNS server's sans-I/O query handling: `classify` against the default
//! zones plus one with a default address and a regexp record, then what the
//! server does with the result (UDP size limit, truncation), and the
//! helpers it uses on raw bytes. Must never panic; a reply must fit.
#![no_main]

use std::net::{IpAddr, Ipv4Addr};

use libfuzzer_sys::fuzz_target;
use rdnet_vnet::gateway::dns::message::{self, Decision};
use rdnet_vnet::gateway::dns::zone::{Pattern, Record, Zone, ZoneTable};

fuzz_target!(|data: &[u8]| {
    let mut zones = ZoneTable::new(Zone::defaults(Ipv4Addr::new(192, 168, 127, 1), Ipv4Addr::new(192, 168, 127, 254)));
    let _ = zones.merge(Zone {
        name: "example.internal.".into(),
        records: vec![Record {
            name: String::new(),
            ip: Some(IpAddr::V4(Ipv4Addr::new(192, 168, 127, 9))),
            regexp: Pattern::new("^db[0-9]+$").ok(),
        }],
        default_ip: Some(IpAddr::V4(Ipv4Addr::new(192, 168, 127, 10))),
    });
    let _ = message::id_and_qr(data);
    let _ = message::is_truncated(data);
    let _ = message::rcode(data);
    match message::classify(&zones, data) {
        Decision::Reply(bytes) => {
            assert!(bytes.len() >= message::HEADER_LEN);
            let cut = message::fit_udp(bytes, message::CLASSIC_UDP);
            assert!(cut.len() <= message::CLASSIC_UDP);
        }
        Decision::Forward(query) => {
            let limit = message::udp_limit(&query, 1472);
            assert!((message::HEADER_LEN..=1472).contains(&limit));
            let _ = message::servfail(&query);
            // An upstream answer of any shape is cut to the guest's limit.
            let cut = message::fit_udp(data.to_vec(), limit);
            assert!(cut.len() <= limit);
        }
        Decision::Drop => {}
    }
});
