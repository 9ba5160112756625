//! Segmentation offload between vm-switch and host-switch.
//!
//! The wire format is plain Ethernet frames, normally no larger than the
//! MTU. Moving bulk TCP data one MTU-sized frame at a time costs a tap read,
//! a link hand-off and a TCP stack pass per 1.5 KiB; the kernel's own paths
//! move 64 KiB segments instead (TSO/GRO). This lets our two programs do the
//! same without changing anything for peers that do not know about it.
//!
//! How this works: at the start of every link session vm-switch sends one
//! hello frame (EtherType 0x88B5, IEEE "local experimental", a magic, a role
//! and capability flags) saying it takes large TCP segments. host-switch
//! marks that port and answers with a hello of its own (role gateway).
//! Only on that answer does vm-switch turn on TSO for its tap, so from then
//! on the guest kernel hands it up to 64 KiB TCP segments, which travel as
//! one frame each; host-switch sends that port large segments too, and
//! vm-switch hands them to the tap as one GSO packet. gvproxy and the Go
//! vm-switch drop the unknown EtherType, never answer, and so never see a
//! frame above the MTU. host-switch never forwards a hello to another port.
//!
//! Large frames carry IPv4 TCP only and are at most [`MAX_LARGE_FRAME`]
//! bytes (the u16 prefix's limit). Their TCP checksum field means nothing,
//! as on a NIC with TSO: the memory between the two programs does not
//! corrupt data, summing 64 KiB was a fifth of the CPU time, and the
//! receiving vm-switch hands the segment to its kernel as "checksum
//! partial" with the pseudo header's sum in that field anyway. For the same
//! reasons a VM's TCP frames to the gateway's MAC may carry the partial
//! checksum its kernel left: host-switch terminates that TCP and does not
//! check. Every other frame up to the MTU has complete checksums.

/// IEEE 802 "local experimental" EtherType 1.
pub const ETHERTYPE: u16 = 0x88B5;
const MAGIC: &[u8; 14] = b"rdnet-offload\0";
/// The sender takes IPv4 TCP frames up to [`MAX_LARGE_FRAME`] bytes.
pub const LARGE_TCP: u32 = 1;
/// The largest frame a u16 length prefix allows, headers included.
pub const MAX_LARGE_FRAME: usize = u16::MAX as usize;

/// Who sent a hello. vm-switch acts only on the gateway's, so a hello
/// from another VM (flooded by a switch that does not know the frame)
/// turns nothing on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Vm = 1,
    Gateway = 2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    pub role: Role,
    pub flags: u32,
}

const BODY: usize = 14 + MAGIC.len() + 1 + 4;

/// A hello frame from `src` to `dst` (vm-switch sends to the broadcast
/// address: it does not know the gateway's MAC yet; host-switch answers
/// unicast).
pub fn hello_frame(src: [u8; 6], dst: [u8; 6], hello: Hello) -> Vec<u8> {
    let mut f = Vec::with_capacity(BODY.max(60));
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ETHERTYPE.to_be_bytes());
    f.extend_from_slice(MAGIC);
    f.push(hello.role as u8);
    f.extend_from_slice(&hello.flags.to_be_bytes());
    // Ethernet's minimum frame, as a NIC would pad it.
    f.resize(BODY.max(60), 0);
    f
}

/// Whether `frame` is of the offload EtherType at all (hello or not, it
/// belongs to no one else).
pub fn is_offload_frame(frame: &[u8]) -> bool {
    frame.get(12..14) == Some(&ETHERTYPE.to_be_bytes())
}

/// The hello in `frame`, if it is a well-formed one.
pub fn parse_hello(frame: &[u8]) -> Option<Hello> {
    if !is_offload_frame(frame) || frame.len() < BODY || &frame[14..14 + MAGIC.len()] != MAGIC {
        return None;
    }
    let at = 14 + MAGIC.len();
    let role = match frame[at] {
        1 => Role::Vm,
        2 => Role::Gateway,
        _ => return None,
    };
    let flags = u32::from_be_bytes([frame[at + 1], frame[at + 2], frame[at + 3], frame[at + 4]]);
    Some(Hello { role, flags })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_round_trips_and_junk_is_refused() {
        let h = Hello { role: Role::Gateway, flags: LARGE_TCP };
        let f = hello_frame([2, 0, 0, 0, 0, 1], [0xff; 6], h);
        assert_eq!(f.len(), 60);
        assert!(is_offload_frame(&f));
        assert_eq!(parse_hello(&f), Some(h));
        assert_eq!(&f[0..6], &[0xff; 6]);
        assert_eq!(&f[6..12], &[2, 0, 0, 0, 0, 1]);

        let mut bad_role = f.clone();
        bad_role[14 + MAGIC.len()] = 7;
        assert_eq!(parse_hello(&bad_role), None);
        let mut bad_magic = f.clone();
        bad_magic[15] ^= 1;
        assert_eq!(parse_hello(&bad_magic), None);
        assert_eq!(parse_hello(&f[..BODY - 1]), None);
        assert_eq!(parse_hello(&[]), None);
        let mut arp = f.clone();
        arp[12..14].copy_from_slice(&[8, 6]);
        assert!(!is_offload_frame(&arp));
        assert_eq!(parse_hello(&arp), None);
    }
}
