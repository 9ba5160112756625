//! The HTTP API's request bodies as the handlers parse them: Go-compatible
//! JSON (`gojson::first_value`, `decode_strings` with the expose/unexpose
//! request fields), the remote-address helpers the expose handler calls,
//! and `/services/dns/add`'s zone (deserialised, merged, looked up — its
//! Regexp records are compiled from the body). Only parsing: nothing binds.
#![no_main]

use std::net::Ipv4Addr;

use libfuzzer_sys::fuzz_target;
use rdnet_vnet::api::gojson::{self, Field};
use rdnet_vnet::forward as forwarder;
use rdnet_vnet::gateway::dns::zone::{Zone, ZoneTable};

const EXPOSE: &[Field] = &[
    Field { name: "local", go_type: "string" },
    Field { name: "remote", go_type: "string" },
    Field { name: "protocol", go_type: "types.TransportProtocol" },
];
const UNEXPOSE: &[Field] =
    &[Field { name: "local", go_type: "string" }, Field { name: "protocol", go_type: "types.TransportProtocol" }];

fuzz_target!(|body: &[u8]| {
    if let Ok(fields) = gojson::decode_strings(body, "ExposeRequest", "types.ExposeRequest", EXPOSE) {
        assert_eq!(fields.len(), 3);
        for peer in ["192.168.127.2:40000", "@", "[::1]:5"] {
            if let Ok(remote) = forwarder::fill_remote_host(&fields[1], peer) {
                let _ = forwarder::tcpip_address(&remote);
            }
        }
        let _ = forwarder::split_host_port(&fields[0]);
    }
    if let Ok(fields) = gojson::decode_strings(body, "UnexposeRequest", "types.UnexposeRequest", UNEXPOSE) {
        assert_eq!(fields.len(), 2);
    }
    if let Ok((value, range)) = gojson::first_value(body) {
        assert!(range.end <= body.len() && range.start <= range.end);
        let _ = gojson::encode(&format!("{value:?}"));
        if let Ok(z) = serde_json::from_slice::<Zone>(&body[range]) {
            let mut zones =
                ZoneTable::new(Zone::defaults(Ipv4Addr::new(192, 168, 127, 1), Ipv4Addr::new(192, 168, 127, 254)));
            let name = z.name.clone();
            let rel = z.records.first().map(|r| r.name.clone()).unwrap_or_default();
            let _ = zones.merge(z);
            let _ = zones.lookup(&format!("{rel}.{name}"));
            let _ = zones.lookup("db1.example.internal.");
            let _ = gojson::encode(&zones.zones());
        }
    }
});
