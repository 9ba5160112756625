//! The virtual Ethernet switch (COMPAT §6).
//!
//! How this works: every VM connection is a port. The switch learns which
//! port each source MAC arrives on; a frame for a learned MAC goes to that
//! port only, broadcast and multicast go to every other port (and to the
//! gateway, which the caller handles), and unicast to an unknown MAC is
//! dropped, as gvproxy does. A port may teach at most
//! [`MAX_MACS_PER_PORT`] addresses, so one hostile guest cannot fill the
//! table for everybody; a port's entries leave with it.

use crate::FastMap;

use smoltcp::wire::EthernetAddress;

pub type PortId = u32;

pub const MAX_MACS_PER_PORT: usize = 1024;

#[derive(Debug, Default)]
pub struct Switch {
    table: FastMap<EthernetAddress, PortId>,
    ports: Vec<Port>,
    next_id: PortId,
}

#[derive(Debug)]
struct Port {
    id: PortId,
    macs: usize,
    /// Said it takes frames above the MTU (`rdnet_wire::offload`).
    large_frames: bool,
}

/// Outcome of learning a source address.
#[derive(Debug, PartialEq, Eq)]
pub enum Learn {
    Known,
    Learned,
    /// The address belongs to another port that is still connected: not
    /// moved (a guest may not take over another's MAC). Once that port is
    /// gone (a VM that reconnects), the address is learned afresh.
    Conflict(PortId),
    /// The port already taught its share of addresses.
    Refused,
    /// Not a unicast address: never learned.
    Ignored,
}

impl Switch {
    pub fn new() -> Self {
        Switch::default()
    }

    pub fn add_port(&mut self) -> PortId {
        self.next_id = self.next_id.wrapping_add(1);
        let id = self.next_id;
        self.ports.push(Port { id, macs: 0, large_frames: false });
        id
    }

    pub fn remove_port(&mut self, id: PortId) {
        self.ports.retain(|p| p.id != id);
        self.table.retain(|_, p| *p != id);
    }

    /// Records that `id`'s peer takes large TCP frames.
    pub fn set_large_frames(&mut self, id: PortId) {
        if let Some(p) = self.ports.iter_mut().find(|p| p.id == id) {
            p.large_frames = true;
        }
    }

    pub fn takes_large_frames(&self, id: PortId) -> bool {
        self.ports.iter().any(|p| p.id == id && p.large_frames)
    }

    pub fn ports(&self) -> impl Iterator<Item = PortId> + '_ {
        self.ports.iter().map(|p| p.id)
    }

    pub fn port_count(&self) -> usize {
        self.ports.len()
    }

    pub fn learn(&mut self, mac: EthernetAddress, port: PortId) -> Learn {
        if !mac.is_unicast() {
            return Learn::Ignored;
        }
        match self.table.get(&mac).copied() {
            Some(p) if p == port => Learn::Known,
            Some(other) => Learn::Conflict(other),
            None => {
                let Some(entry) = self.ports.iter_mut().find(|p| p.id == port) else {
                    return Learn::Ignored;
                };
                if entry.macs >= MAX_MACS_PER_PORT {
                    return Learn::Refused;
                }
                entry.macs += 1;
                self.table.insert(mac, port);
                Learn::Learned
            }
        }
    }

    pub fn lookup(&self, mac: &EthernetAddress) -> Option<PortId> {
        self.table.get(mac).copied()
    }

    /// The learned table (for `/cam`).
    pub fn entries(&self) -> impl Iterator<Item = (&EthernetAddress, &PortId)> {
        self.table.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: EthernetAddress = EthernetAddress([2, 0, 0, 0, 0, 1]);
    const B: EthernetAddress = EthernetAddress([2, 0, 0, 0, 0, 2]);

    #[test]
    fn learns_moves_and_forgets() {
        let mut s = Switch::new();
        let p1 = s.add_port();
        let p2 = s.add_port();
        assert_eq!(s.learn(A, p1), Learn::Learned);
        assert_eq!(s.learn(A, p1), Learn::Known);
        assert_eq!(s.learn(B, p2), Learn::Learned);
        assert_eq!(s.lookup(&A), Some(p1));
        // Another connected port may not take A over; once p1 is gone, p2
        // learns it.
        assert_eq!(s.learn(A, p2), Learn::Conflict(p1));
        assert_eq!(s.lookup(&A), Some(p1));
        s.remove_port(p1);
        assert_eq!(s.learn(A, p2), Learn::Learned);
        assert_eq!(s.lookup(&A), Some(p2));
        let p3 = s.add_port();
        s.remove_port(p2);
        assert_eq!(s.lookup(&A), None);
        assert_eq!(s.lookup(&B), None);
        assert_eq!(s.ports().collect::<Vec<_>>(), vec![p3]);
    }

    #[test]
    fn broadcast_is_never_learned_and_ports_are_bounded() {
        let mut s = Switch::new();
        let p = s.add_port();
        assert_eq!(s.learn(EthernetAddress::BROADCAST, p), Learn::Ignored);
        for i in 0..MAX_MACS_PER_PORT as u32 {
            let b = i.to_be_bytes();
            assert_eq!(s.learn(EthernetAddress([2, 1, b[0], b[1], b[2], b[3]]), p), Learn::Learned);
        }
        assert_eq!(s.learn(A, p), Learn::Refused);
        let q = s.add_port();
        assert_eq!(s.learn(B, q), Learn::Learned);
    }
}
