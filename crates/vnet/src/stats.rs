//! Counters for `/stats`: traffic each way, drops by reason.

use serde::Serialize;

#[derive(Debug, Default, Clone, Serialize)]
pub struct Stats {
    /// Frames and bytes received from VM connections.
    pub frames_in: u64,
    pub bytes_in: u64,
    /// Frames and bytes sent to VM connections.
    pub frames_out: u64,
    pub bytes_out: u64,
    pub drops: Drops,
    pub dhcp_replies: u64,
    pub arp_replies: u64,
    pub icmp_replies: u64,
    /// IPv6: neighbour advertisements for the gateway's addresses, router
    /// advertisements (solicited and periodic), and "no route" errors.
    pub ndp_replies: u64,
    pub router_adverts: u64,
    pub icmp_unreachable: u64,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct Drops {
    pub malformed: u64,
    pub unknown_unicast: u64,
    pub unsupported_protocol: u64,
    pub mac_table_full: u64,
    pub dhcp_invalid: u64,
    pub link_errors: u64,
    pub not_for_us: u64,
    /// Frames above the MTU for a port that did not offer to take them.
    pub too_big: u64,
    /// Frames whose source a guest may not use: an IP address leased to,
    /// or first used by, another connected guest; one outside the subnet
    /// or the gateway's; a MAC another connected port owns.
    pub spoofed_source: u64,
}
