//! ICMP echo to the gateway itself, answered from the parsed frame (pings
//! to any other address go to the NAT, `crate::nat::icmp`).

use std::time::Instant;

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{EthernetAddress, Icmpv4Packet, Icmpv4Repr, IpProtocol, Ipv4Repr};

use super::{FrameSink, Network};
use rdnet_wire::frame;

impl Network {
    pub(super) fn answer_ping(
        &mut self,
        dst_mac: EthernetAddress,
        req: &Ipv4Repr,
        icmp: &[u8],
        now: Instant,
        out: &mut impl FrameSink,
    ) {
        let Ok(pkt) = Icmpv4Packet::new_checked(icmp) else {
            self.stats.drops.malformed += 1;
            return;
        };
        let Ok(Icmpv4Repr::EchoRequest { ident, seq_no, data }) =
            Icmpv4Repr::parse(&pkt, &ChecksumCapabilities::default())
        else {
            return;
        };
        let reply = Icmpv4Repr::EchoReply { ident, seq_no, data };
        let ip = Ipv4Repr {
            src_addr: req.dst_addr,
            dst_addr: req.src_addr,
            next_header: IpProtocol::Icmp,
            payload_len: reply.buffer_len(),
            hop_limit: 64,
        };
        let mut buf = std::mem::take(&mut self.scratch);
        frame::ipv4(&mut buf, self.cfg.gateway_mac, dst_mac, &ip, |b| {
            reply.emit(&mut Icmpv4Packet::new_unchecked(b), &ChecksumCapabilities::default())
        });
        self.stats.icmp_replies += 1;
        self.deliver(&buf, now, out);
        self.scratch = buf;
    }
}
