//! MAC addresses as people read them (`5a:94:ef:e4:0c:ee`, as Go and
//! iproute2 print them; smoltcp's `Display` uses dashes).

use std::fmt;

/// A MAC address.
pub type Mac = [u8; 6];

/// Parses `5a:94:ef:e4:0c:ee` (also `-` separated, any case).
pub fn parse_mac(s: &str) -> Option<Mac> {
    let mut mac = [0u8; 6];
    let mut parts = s.split([':', '-']);
    for byte in mac.iter_mut() {
        let part = parts.next()?;
        if part.is_empty() || part.len() > 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    if parts.next().is_some() {
        return None;
    }
    Some(mac)
}

/// Displays six bytes as a colon-separated MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MacDisplay(pub [u8; 6]);

impl fmt::Display for MacDisplay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: Mac = [0x5a, 0x94, 0xef, 0xe4, 0x0c, 0xee];

    #[test]
    fn mac_parse_and_display() {
        assert_eq!(parse_mac("5a:94:ef:e4:0c:ee"), Some(MAC));
        assert_eq!(parse_mac("5A-94-EF-E4-0C-EE"), Some(MAC));
        assert_eq!(MacDisplay(MAC).to_string(), "5a:94:ef:e4:0c:ee");
        for bad in ["", "5a:94:ef:e4:0c", "5a:94:ef:e4:0c:ee:00", "5a:94:ef:e4:0c:zz", "5a:94:ef:e4:0c:eee", "::::"] {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
    }

    #[test]
    fn colons_and_lower_case() {
        assert_eq!(MacDisplay([0x5a, 0x94, 0xef, 0xe4, 0x0c, 0xee]).to_string(), "5a:94:ef:e4:0c:ee");
    }
}
