//! Which new TCP flows the NAT takes, and the gateway's source ports for
//! connections into guests. Sans-I/O: plain counters, no clock.
//!
//! How this works: at most `max_flows` flows in all. A guest's SYN is also
//! counted as half-open against the guest it came from, keyed by the switch
//! port its frames arrive on (not the source address it claims: one VM may
//! hold many addresses, and an address is the guest's to choose), from the
//! SYN until the handshake completes or the flow goes ([`Admission::settle`]);
//! beyond `max_half_open_per_guest` its SYNs are refused, so a SYN flood
//! from one guest holds bounded state and leaves room for the others.
//! Connections the gateway opens into a guest (port forwards) are bounded
//! by `max_flows` only, and take their source ports from the ephemeral
//! range in turn, skipping ports a live flow to that guest still uses.

use crate::FastMap;
use crate::switch::PortId;

/// First and last of the gateway's ephemeral source ports.
pub const EPHEMERAL: std::ops::RangeInclusive<u16> = 49152..=u16::MAX;

/// Why a new flow is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// `max_flows` flows are open.
    TooManyFlows,
    /// This guest has `max_half_open_per_guest` handshakes pending.
    TooManyHalfOpen,
    /// Every gateway source port is in use towards this guest.
    NoPort,
}

#[derive(Debug)]
pub struct Admission {
    /// Half-open flows per guest (switch port); no entry when 0.
    half_open: FastMap<PortId, usize>,
    half_open_total: usize,
    pub max_flows: usize,
    pub max_half_open_per_guest: usize,
    /// The gateway source port handed out last.
    last_port: u16,
}

impl Admission {
    /// Bounds for `max_flows` flows; each guest may have that many
    /// half-open, up to 1024.
    pub fn new(max_flows: usize) -> Self {
        Admission {
            half_open: FastMap::default(),
            half_open_total: 0,
            max_flows,
            max_half_open_per_guest: max_flows.clamp(1, 1024),
            last_port: 0,
        }
    }

    /// A guest's SYN arrived on `port` while `flows` flows are open: on
    /// `Ok` it counts as half-open until [`Admission::settle`].
    pub fn admit_guest(&mut self, port: PortId, flows: usize) -> Result<(), Refused> {
        if flows >= self.max_flows {
            return Err(Refused::TooManyFlows);
        }
        let n = self.half_open.entry(port).or_default();
        // `max_half_open_per_guest` is at least 1, so a refused port
        // already has an entry: nothing is left behind at 0.
        if *n >= self.max_half_open_per_guest {
            return Err(Refused::TooManyHalfOpen);
        }
        *n += 1;
        self.half_open_total += 1;
        Ok(())
    }

    /// A flow admitted by [`Admission::admit_guest`] on `port` completed its
    /// handshake or went away. Call once per admitted flow.
    pub fn settle(&mut self, port: PortId) {
        if let Some(n) = self.half_open.get_mut(&port) {
            *n -= 1;
            if *n == 0 {
                self.half_open.remove(&port);
            }
            self.half_open_total -= 1;
        }
    }

    /// Flows whose handshake with the guest is not complete yet.
    pub fn half_open(&self) -> usize {
        self.half_open_total
    }

    /// A connection from the gateway into a guest while `flows` are open:
    /// its source port, the next in the ephemeral range for which `in_use`
    /// is false.
    pub fn admit_to_guest(&mut self, flows: usize, in_use: impl Fn(u16) -> bool) -> Result<u16, Refused> {
        if flows >= self.max_flows {
            return Err(Refused::TooManyFlows);
        }
        for _ in EPHEMERAL {
            self.last_port = if EPHEMERAL.contains(&self.last_port) && self.last_port < *EPHEMERAL.end() {
                self.last_port + 1
            } else {
                *EPHEMERAL.start()
            };
            if !in_use(self.last_port) {
                return Ok(self.last_port);
            }
        }
        Err(Refused::NoPort)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_flows_bounds_every_new_flow() {
        let mut a = Admission::new(3);
        assert_eq!(a.admit_guest(1, 2), Ok(()));
        assert_eq!(a.admit_guest(1, 3), Err(Refused::TooManyFlows));
        assert_eq!(a.admit_to_guest(3, |_| false), Err(Refused::TooManyFlows));
        assert_eq!(a.admit_to_guest(2, |_| false), Ok(49152));
        // A refusal counts nothing.
        assert_eq!(a.half_open(), 1);
    }

    #[test]
    fn the_half_open_bound_is_per_switch_port() {
        let mut a = Admission::new(10_000);
        assert_eq!(a.max_half_open_per_guest, 1024);
        for _ in 0..1024 {
            assert_eq!(a.admit_guest(7, 0), Ok(()));
        }
        // Whatever address the flood claims, it comes in on port 7.
        assert_eq!(a.admit_guest(7, 0), Err(Refused::TooManyHalfOpen));
        // Another guest is not starved.
        assert_eq!(a.admit_guest(8, 0), Ok(()));
        assert_eq!(a.half_open(), 1025);
        // A completed handshake makes room for one more.
        a.settle(7);
        assert_eq!(a.admit_guest(7, 0), Ok(()));
        assert_eq!(a.admit_guest(7, 0), Err(Refused::TooManyHalfOpen));
        for _ in 0..1024 {
            a.settle(7);
        }
        a.settle(8);
        assert_eq!(a.half_open(), 0);
        assert!(a.half_open.is_empty(), "no entry left behind: {:?}", a.half_open);
        // Settling what was never admitted changes nothing.
        a.settle(9);
        assert_eq!(a.half_open(), 0);
        // A small --max-flows bounds half-open flows per guest too.
        let mut small = Admission::new(2);
        assert_eq!(small.max_half_open_per_guest, 2);
        assert_eq!(small.admit_guest(1, 0), Ok(()));
        assert_eq!(small.admit_guest(1, 1), Ok(()));
        assert_eq!(small.admit_guest(2, 1), Ok(()));
        assert_eq!(small.admit_guest(1, 1), Err(Refused::TooManyHalfOpen));
    }

    #[test]
    fn gateway_ports_go_round_the_ephemeral_range_skipping_ports_in_use() {
        let mut a = Admission::new(100);
        assert_eq!(a.admit_to_guest(0, |p| p == 49152), Ok(49153));
        assert_eq!(a.admit_to_guest(0, |_| false), Ok(49154));
        a.last_port = u16::MAX - 1;
        assert_eq!(a.admit_to_guest(0, |_| false), Ok(u16::MAX));
        assert_eq!(a.admit_to_guest(0, |_| false), Ok(49152), "wraps to the start");
        assert_eq!(a.admit_to_guest(0, |p| p != 50000), Ok(50000));
        assert_eq!(a.admit_to_guest(0, |_| true), Err(Refused::NoPort), "every port in use");
    }
}
