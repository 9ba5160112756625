//! The flow state of the UDP port forwards, sans-I/O: which gateway port
//! carries which host client's datagrams into the guest, and whether a
//! datagram the guest sends back belongs to one of them.
//!
//! How this works: every UDP forward is registered with its target in the
//! guest and gets a [`ForwardId`]. A host client's first datagram opens a
//! flow: a gateway source port from the configured range, unique across all
//! forwards so that the guest's reply, addressed to `gateway:port`, names
//! the flow on its own. Ports are handed out round the range from where the
//! last one was, skipping those in use, so a port just freed is not reused
//! at once (a late reply of the old flow would reach the new client). Each
//! forward keeps at most `max_flows` flows in a [`FlowTable`]: idle ones
//! ([`UdpForwards::expire`], or on the way when a new flow opens) are
//! counted as expired, the least recently used pushed out for a new one as
//! evicted; either way their ports are free again. A reply is accepted only
//! from the forward's target (address, port and family), since the gateway
//! port alone is easy for any guest process to guess.
//!
//! No sockets, no tasks and no clock: the caller passes `now` and does the
//! sending (`forward/mod.rs`); `H` is whatever it needs to find the
//! forward's host socket again.

use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::time::{Duration, Instant};

use crate::FastMap;
use crate::nat::udp::FlowTable;

/// A UDP forward's number in [`UdpForwards`]. Never reused.
pub type ForwardId = u64;

/// Flows opened and closed so far (for `/stats`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FlowCounts {
    pub opened: u64,
    /// Closed after the idle timeout.
    pub expired: u64,
    /// Closed to make room for a new flow of the same forward.
    pub evicted: u64,
}

/// Why a flow was closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    Expired,
    Evicted,
}

/// A flow that is gone, with the port it freed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClosedFlow {
    pub client: SocketAddr,
    pub port: u16,
    pub why: CloseReason,
}

/// Where a host client's datagram goes: from `gateway:port` to `target`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToGuest {
    pub port: u16,
    pub target: SocketAddr,
    /// The flow is new.
    pub opened: bool,
    /// Flows of the same forward closed on the way.
    pub closed: Vec<ClosedFlow>,
}

/// Why a host client's datagram cannot go into the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// No such forward (it was removed).
    NoForward,
    /// Every gateway port in the range carries a flow.
    NoFreePort,
}

/// What to do with a UDP datagram from the guest to a gateway port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FromGuest<H> {
    /// No flow uses the port: not a forward's reply.
    NoFlow,
    /// A flow uses the port, but the datagram does not come from its
    /// forward's target: drop it.
    WrongSource,
    /// Send the payload to `client` from the forward's host socket.
    ToClient { handle: H, client: SocketAddr },
}

struct Forward<H> {
    target: SocketAddr,
    handle: H,
    /// Host client → gateway port.
    flows: FlowTable<SocketAddr, u16>,
}

/// The flows of every UDP forward of one engine.
pub struct UdpForwards<H> {
    forwards: FastMap<ForwardId, Forward<H>>,
    /// Gateway port → (forward, host client): the inverse of the forwards'
    /// flow tables, entry for entry.
    routes: FastMap<u16, (ForwardId, SocketAddr)>,
    ports: RangeInclusive<u16>,
    /// The port handed out last (outside the range before the first).
    last_port: u16,
    next_id: ForwardId,
    max_flows: usize,
    idle: Duration,
    counts: FlowCounts,
}

impl<H: Clone> UdpForwards<H> {
    /// Gateway ports come from `ports`; each forward holds at most
    /// `max_flows` flows, each forgotten after `idle` without a datagram.
    pub fn new(ports: RangeInclusive<u16>, max_flows: usize, idle: Duration) -> Self {
        UdpForwards {
            forwards: FastMap::default(),
            routes: FastMap::default(),
            last_port: ports.start().wrapping_sub(1),
            ports,
            next_id: 0,
            max_flows,
            idle,
            counts: FlowCounts::default(),
        }
    }

    /// Registers a forward to `target`; `handle` comes back with each reply.
    pub fn add(&mut self, target: SocketAddr, handle: H) -> ForwardId {
        let id = self.next_id;
        self.next_id += 1;
        self.forwards.insert(id, Forward { target, handle, flows: FlowTable::new(self.max_flows, self.idle) });
        id
    }

    /// Forgets a forward and frees its ports (not counted as closed flows:
    /// the forward itself went).
    pub fn remove(&mut self, id: ForwardId) -> Option<H> {
        let fwd = self.forwards.remove(&id)?;
        self.routes.retain(|_, (owner, _)| *owner != id);
        Some(fwd.handle)
    }

    /// Open flows, across all forwards.
    pub fn flows(&self) -> usize {
        self.routes.len()
    }

    pub fn counts(&self) -> FlowCounts {
        self.counts
    }

    /// A datagram from host client `client` on forward `id` at `now`: the
    /// gateway port to send it from, opening a flow if the client has none.
    pub fn to_guest(&mut self, id: ForwardId, client: SocketAddr, now: Instant) -> Result<ToGuest, Refused> {
        let Some(fwd) = self.forwards.get_mut(&id) else { return Err(Refused::NoForward) };
        let target = fwd.target;
        if let Some(&mut port) = fwd.flows.get(&client, now) {
            return Ok(ToGuest { port, target, opened: false, closed: Vec::new() });
        }
        // Idle flows go first: their ports may be the only free ones.
        let mut closed = Vec::new();
        for (c, p) in fwd.flows.expire(now) {
            self.routes.remove(&p);
            closed.push(ClosedFlow { client: c, port: p, why: CloseReason::Expired });
        }
        self.counts.expired += closed.len() as u64;
        let Some(port) = self.free_port() else { return Err(Refused::NoFreePort) };
        // `self.forwards` again: `free_port` needed all of `self`.
        let Some(fwd) = self.forwards.get_mut(&id) else { return Err(Refused::NoForward) };
        // Nothing idle is left and the client had no flow, so what the
        // table gives up now is the least recently used.
        for (c, p) in fwd.flows.insert(client, port, now) {
            self.routes.remove(&p);
            self.counts.evicted += 1;
            closed.push(ClosedFlow { client: c, port: p, why: CloseReason::Evicted });
        }
        self.routes.insert(port, (id, client));
        self.counts.opened += 1;
        Ok(ToGuest { port, target, opened: true, closed })
    }

    /// A UDP datagram from the guest's `src` to gateway port `port` at `now`.
    pub fn from_guest(&mut self, port: u16, src: SocketAddr, now: Instant) -> FromGuest<H> {
        let Some(&(id, client)) = self.routes.get(&port) else { return FromGuest::NoFlow };
        let Some(fwd) = self.forwards.get_mut(&id) else {
            // Cannot happen (`remove` clears the routes); heal rather than trust.
            self.routes.remove(&port);
            return FromGuest::NoFlow;
        };
        if src != fwd.target {
            return FromGuest::WrongSource;
        }
        fwd.flows.touch(&client, now);
        FromGuest::ToClient { handle: fwd.handle.clone(), client }
    }

    /// Closes forward `id`'s flows idle at `now`.
    pub fn expire(&mut self, id: ForwardId, now: Instant) -> Vec<ClosedFlow> {
        let Some(fwd) = self.forwards.get_mut(&id) else { return Vec::new() };
        let gone: Vec<ClosedFlow> = fwd
            .flows
            .expire(now)
            .into_iter()
            .map(|(client, port)| ClosedFlow { client, port, why: CloseReason::Expired })
            .collect();
        for c in &gone {
            self.routes.remove(&c.port);
        }
        self.counts.expired += gone.len() as u64;
        gone
    }

    /// The next port after the last one handed out that no flow uses,
    /// wrapping round the range.
    fn free_port(&mut self) -> Option<u16> {
        let (start, end) = (*self.ports.start(), *self.ports.end());
        if start > end {
            return None;
        }
        let span = usize::from(end - start) + 1;
        let mut p = self.last_port;
        for _ in 0..span {
            p = if self.ports.contains(&p) && p != end { p + 1 } else { start };
            if !self.routes.contains_key(&p) {
                self.last_port = p;
                return Some(p);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IDLE: Duration = Duration::from_secs(90);

    fn target() -> SocketAddr {
        "192.168.127.2:53".parse().unwrap()
    }

    fn target6() -> SocketAddr {
        "[fd5a:94ef:e40c:0:5894:efff:fee4:cee]:53".parse().unwrap()
    }

    fn client(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn opened(f: &mut UdpForwards<u32>, id: ForwardId, c: SocketAddr, now: Instant) -> u16 {
        let out = f.to_guest(id, c, now).unwrap();
        assert!(out.opened, "{out:?}");
        out.port
    }

    /// The routes and the flow tables describe the same flows.
    fn consistent(f: &UdpForwards<u32>) {
        let in_tables: usize = f.forwards.values().map(|fwd| fwd.flows.len()).sum();
        assert_eq!(in_tables, f.routes.len());
        for (port, (id, c)) in &f.routes {
            assert!(f.ports.contains(port));
            assert_eq!(f.forwards[id].flows.peek(c), Some(port));
        }
    }

    #[test]
    fn a_client_keeps_its_port_and_replies_find_it() {
        let t = Instant::now();
        let mut f = UdpForwards::new(49152..=65535, 8, IDLE);
        let id = f.add(target(), 7);
        let p = opened(&mut f, id, client(1000), t);
        assert_eq!(p, 49152);
        let again = f.to_guest(id, client(1000), t + Duration::from_secs(1)).unwrap();
        assert_eq!(again, ToGuest { port: p, target: target(), opened: false, closed: vec![] });
        assert_eq!(f.from_guest(p, target(), t), FromGuest::ToClient { handle: 7, client: client(1000) });
        assert_eq!(f.from_guest(p + 1, target(), t), FromGuest::NoFlow);
        assert_eq!(f.counts(), FlowCounts { opened: 1, expired: 0, evicted: 0 });
        consistent(&f);
    }

    #[test]
    fn a_reply_from_anywhere_but_the_target_is_refused() {
        let t = Instant::now();
        let mut f = UdpForwards::new(49152..=65535, 8, IDLE);
        let v4 = f.add(target(), 4);
        let v6 = f.add(target6(), 6);
        let p4 = opened(&mut f, v4, client(1000), t);
        let p6 = opened(&mut f, v6, client(1000), t);
        assert_ne!(p4, p6);
        let other_port: SocketAddr = "192.168.127.2:54".parse().unwrap();
        let other_guest: SocketAddr = "192.168.127.3:53".parse().unwrap();
        for wrong in [other_port, other_guest, target6()] {
            assert_eq!(f.from_guest(p4, wrong, t), FromGuest::WrongSource, "{wrong}");
        }
        assert_eq!(f.from_guest(p6, target(), t), FromGuest::WrongSource);
        let other6: SocketAddr = "[fd5a:94ef:e40c::2]:53".parse().unwrap();
        assert_eq!(f.from_guest(p6, other6, t), FromGuest::WrongSource);
        assert_eq!(f.from_guest(p6, target6(), t), FromGuest::ToClient { handle: 6, client: client(1000) });
    }

    #[test]
    fn ports_wrap_round_the_range_and_skip_those_in_use() {
        let t = Instant::now();
        let mut f = UdpForwards::new(100..=103, 8, IDLE);
        let id = f.add(target(), 0);
        let ports: Vec<u16> = (0..3).map(|i| opened(&mut f, id, client(i), t)).collect();
        assert_eq!(ports, [100, 101, 102]);
        // 100 frees up; the next one is still 103, then round to 100.
        let late = t + Duration::from_secs(30);
        f.to_guest(id, client(1), late).unwrap();
        f.to_guest(id, client(2), late).unwrap();
        let closed = f.expire(id, t + IDLE);
        assert_eq!(closed, vec![ClosedFlow { client: client(0), port: 100, why: CloseReason::Expired }]);
        assert_eq!(opened(&mut f, id, client(10), late), 103);
        assert_eq!(opened(&mut f, id, client(11), late), 100);
        consistent(&f);
        // Full now: 101 and 102 are skipped, nothing is left.
        assert_eq!(f.to_guest(id, client(12), late), Err(Refused::NoFreePort));
        consistent(&f);
    }

    #[test]
    fn a_full_range_refuses_until_a_flow_goes() {
        let t = Instant::now();
        let mut f = UdpForwards::new(200..=201, 8, IDLE);
        let a = f.add(target(), 1);
        let b = f.add(target6(), 2);
        opened(&mut f, a, client(1), t);
        let pb = opened(&mut f, b, client(1), t + Duration::from_secs(50));
        assert_eq!(f.to_guest(b, client(2), t + Duration::from_secs(60)), Err(Refused::NoFreePort));
        assert_eq!(f.counts().opened, 2);
        // Forward a's flow idles out; its sweep frees the port for b.
        assert_eq!(f.expire(a, t + IDLE).len(), 1);
        assert_eq!(opened(&mut f, b, client(2), t + IDLE), 200);
        assert_eq!(f.from_guest(200, target(), t + IDLE), FromGuest::WrongSource);
        assert_eq!(f.from_guest(pb, target6(), t + IDLE), FromGuest::ToClient { handle: 2, client: client(1) });
        consistent(&f);
    }

    #[test]
    fn a_new_flow_reaps_idle_ones_of_its_forward_first() {
        let t = Instant::now();
        let mut f = UdpForwards::new(300..=300, 8, IDLE);
        let id = f.add(target(), 0);
        opened(&mut f, id, client(1), t);
        // No sweep ran, but the one port's flow is idle: it goes, and its
        // port serves the new client.
        let out = f.to_guest(id, client(2), t + IDLE).unwrap();
        assert_eq!(out.port, 300);
        assert_eq!(out.closed, vec![ClosedFlow { client: client(1), port: 300, why: CloseReason::Expired }]);
        assert_eq!(f.counts(), FlowCounts { opened: 2, expired: 1, evicted: 0 });
        assert_eq!(f.from_guest(300, target(), t + IDLE), FromGuest::ToClient { handle: 0, client: client(2) });
        consistent(&f);
    }

    #[test]
    fn the_least_recently_used_flow_makes_room_and_frees_its_port() {
        let t = Instant::now();
        let mut f = UdpForwards::new(400..=499, 2, IDLE);
        let id = f.add(target(), 0);
        let p1 = opened(&mut f, id, client(1), t);
        let p2 = opened(&mut f, id, client(2), t + Duration::from_secs(1));
        // A reply keeps client 1 in use: client 2 is the one to go.
        assert!(matches!(f.from_guest(p1, target(), t + Duration::from_secs(2)), FromGuest::ToClient { .. }));
        let out = f.to_guest(id, client(3), t + Duration::from_secs(3)).unwrap();
        assert_eq!(out.closed, vec![ClosedFlow { client: client(2), port: p2, why: CloseReason::Evicted }]);
        assert_eq!(f.from_guest(p2, target(), t + Duration::from_secs(3)), FromGuest::NoFlow);
        assert_eq!(f.counts(), FlowCounts { opened: 3, expired: 0, evicted: 1 });
        assert_eq!(f.flows(), 2);
        consistent(&f);
    }

    #[test]
    fn removing_a_forward_frees_its_ports_only() {
        let t = Instant::now();
        let mut f = UdpForwards::new(500..=599, 8, IDLE);
        let a = f.add(target(), 1);
        let b = f.add(target(), 2);
        let pa = opened(&mut f, a, client(1), t);
        let pb = opened(&mut f, b, client(1), t);
        assert_eq!(f.remove(a), Some(1));
        assert_eq!(f.remove(a), None);
        assert_eq!(f.from_guest(pa, target(), t), FromGuest::NoFlow);
        assert_eq!(f.to_guest(a, client(1), t), Err(Refused::NoForward));
        assert_eq!(f.from_guest(pb, target(), t), FromGuest::ToClient { handle: 2, client: client(1) });
        assert_eq!(f.flows(), 1);
        assert!(f.expire(a, t + IDLE).is_empty());
        // Removal is not expiry or eviction.
        assert_eq!(f.counts(), FlowCounts { opened: 2, expired: 0, evicted: 0 });
        consistent(&f);
    }

    #[test]
    fn an_empty_or_one_port_range_does_not_loop_or_panic() {
        let t = Instant::now();
        #[allow(clippy::reversed_empty_ranges)]
        let mut f = UdpForwards::new(10..=9, 8, IDLE);
        let id = f.add(target(), 0);
        assert_eq!(f.to_guest(id, client(1), t), Err(Refused::NoFreePort));
        let mut f = UdpForwards::new(65535..=65535, 8, IDLE);
        let id = f.add(target(), 0);
        assert_eq!(opened(&mut f, id, client(1), t), 65535);
        assert_eq!(f.to_guest(id, client(2), t), Err(Refused::NoFreePort));
        let mut f = UdpForwards::new(0..=1, 8, IDLE);
        let id = f.add(target(), 0);
        assert_eq!(opened(&mut f, id, client(1), t), 0);
        assert_eq!(opened(&mut f, id, client(2), t), 1);
    }
}
