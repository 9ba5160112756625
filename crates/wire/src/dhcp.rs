//! Decoding DHCP messages from untrusted peers.
//!
//! dhcproto asserts or unwraps on some malformed options (rapid commit
//! with a length, SLAAC and classless-route options of odd lengths), and
//! its `chaddr()` slices by a length taken from the message. So a message is
//! first rebuilt with only the options the caller reads, each with a
//! plausible length, and only then handed to dhcproto.

use dhcproto::Decodable;
use dhcproto::v4::Message;

/// The DHCP magic cookie after the 236-byte BOOTP header.
pub const MAGIC: [u8; 4] = [99, 130, 83, 99];
pub const OPTIONS_START: usize = 240;

/// Decodes `payload`, keeping only options for which `keep(code, len)`
/// holds. `None` for anything that is not a DHCP message. A message whose
/// hardware address length exceeds 16 is refused, so `chaddr()` is safe.
pub fn decode_filtered(payload: &[u8], keep: impl Fn(u8, u8) -> bool) -> Option<Message> {
    let header = payload.get(..OPTIONS_START)?;
    if header[236..240] != MAGIC || header[2] > 16 {
        return None;
    }
    let mut clean = Vec::with_capacity(payload.len() + 1);
    clean.extend_from_slice(header);
    let mut rest = &payload[OPTIONS_START..];
    while let Some((&code, tail)) = rest.split_first() {
        match code {
            0 => {
                rest = tail;
                continue;
            }
            255 => break,
            _ => {}
        }
        let Some((&len, tail)) = tail.split_first() else { break };
        let Some(data) = tail.get(..usize::from(len)) else { break };
        rest = &tail[usize::from(len)..];
        if keep(code, len) {
            clean.push(code);
            clean.push(len);
            clean.extend_from_slice(data);
        }
    }
    clean.push(255);
    Message::from_bytes(&clean).ok()
}

/// DHCPv6's [`decode_filtered`]: a message type, a transaction ID, then
/// options as (u16 code, u16 length, data); only options for which
/// `keep(code, len)` holds reach dhcproto, whose v6 decoder subtracts from
/// option lengths without checking them. `None` when the framing is broken.
pub fn decode6_filtered(payload: &[u8], keep: impl Fn(u16, u16) -> bool) -> Option<dhcproto::v6::Message> {
    use dhcproto::Decodable;
    let header = payload.get(..4)?;
    let mut clean = Vec::with_capacity(payload.len());
    clean.extend_from_slice(header);
    let mut rest = &payload[4..];
    while !rest.is_empty() {
        let head = rest.get(..4)?;
        let code = u16::from_be_bytes([head[0], head[1]]);
        let len = u16::from_be_bytes([head[2], head[3]]);
        let data = rest.get(4..4 + usize::from(len))?;
        rest = &rest[4 + usize::from(len)..];
        if keep(code, len) {
            clean.extend_from_slice(head);
            clean.extend_from_slice(data);
        }
    }
    dhcproto::v6::Message::from_bytes(&clean).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use dhcproto::Encodable;
    use dhcproto::v4::{DhcpOption, MessageType};

    fn keep_basic(code: u8, len: u8) -> bool {
        matches!((code, len), (53, 1) | (50, 4) | (54, 4))
    }

    #[test]
    fn keeps_wanted_options_and_drops_dangerous_ones() {
        let mut m = Message::default();
        m.set_chaddr(&[2, 0, 0, 0, 0, 1]);
        m.opts_mut().insert(DhcpOption::MessageType(MessageType::Discover));
        let bytes = m.to_vec().unwrap();
        let evil: &[&[u8]] = &[&[80, 1, 0], &[116, 2, 1, 1], &[121, 5, 40, 1, 2, 3, 4], &[118, 1, 9], &[52, 1, 3]];
        for opt in evil {
            let mut p = bytes[..OPTIONS_START].to_vec();
            p.extend_from_slice(opt);
            p.extend_from_slice(&bytes[OPTIONS_START..]);
            let d = decode_filtered(&p, keep_basic).unwrap();
            assert_eq!(d.opts().msg_type(), Some(MessageType::Discover));
        }
        let mut big_hlen = bytes.clone();
        big_hlen[2] = 200;
        assert!(decode_filtered(&big_hlen, keep_basic).is_none());
        assert!(decode_filtered(&bytes[..239], keep_basic).is_none());
    }

    #[test]
    fn random_options_never_panic() {
        let mut seed = 7u64;
        for _ in 0..20_000 {
            let mut p = vec![0u8; OPTIONS_START];
            p[2] = 6;
            p[236..240].copy_from_slice(&MAGIC);
            for _ in 0..(seed % 6) {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let code = (seed >> 33) as u8;
                let len = ((seed >> 45) % 12) as u8;
                p.push(code);
                p.push(len);
                p.extend((0..len).map(|i| (seed >> (i % 56)) as u8));
            }
            let _ = decode_filtered(&p, keep_basic);
        }
    }

    #[test]
    fn dhcpv6_options_are_filtered_before_dhcproto_sees_them() {
        // Found by the fuzzer: a VendorClass option shorter than its 4-byte
        // number makes dhcproto subtract past zero.
        let mut m = vec![11, 1, 2, 3];
        m.extend_from_slice(&[0, 16, 0, 2, 9, 9]); // VendorClass, length 2
        m.extend_from_slice(&[0, 1, 0, 4, 0, 3, 0, 1]); // ClientId
        let keep_client_id = |code: u16, len: u16| code == 1 && (1..=130).contains(&len);
        let d = decode6_filtered(&m, keep_client_id).unwrap();
        assert_eq!(d.msg_type(), dhcproto::v6::MessageType::InformationRequest);
        assert_eq!(d.xid(), [1, 2, 3]);
        assert_eq!(
            d.opts().get(dhcproto::v6::OptionCode::ClientId),
            Some(&dhcproto::v6::DhcpOption::ClientId(vec![0, 3, 0, 1]))
        );
        // Broken framing: an option running past the end, a short header.
        assert!(decode6_filtered(&[11, 1, 2, 3, 0, 1, 0, 9, 1], keep_client_id).is_none());
        assert!(decode6_filtered(&[11, 1], keep_client_id).is_none());
        let mut seed = 11u64;
        for _ in 0..20_000 {
            let mut p = vec![11, 0, 0, 1];
            for _ in 0..(seed % 6) {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let code = ((seed >> 33) % 70) as u16;
                let len = ((seed >> 45) % 12) as u16;
                p.extend_from_slice(&code.to_be_bytes());
                p.extend_from_slice(&len.to_be_bytes());
                p.extend((0..len).map(|i| (seed >> (i % 56)) as u8));
            }
            let _ = decode6_filtered(&p, |code, len| code == 1 && (1..=130).contains(&len));
        }
    }
}
