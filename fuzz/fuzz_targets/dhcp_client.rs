//! vm-switch's DHCP client fed arbitrary server replies. The client starts
//! (DISCOVER), then each input frame (u16-LE framed) is offered to
//! `handle_frame`, with time moving on between frames so renewals,
//! rebinding and expiry are reached. Control bit 0 patches each frame's
//! BOOTP `xid` to the one the client is waiting for and clears the UDP
//! checksum, so the fuzzer reaches the state machine past the filters.
#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use rdnet_guest::dhcp_client::{ClientConfig, DhcpClient, Output};
use rdnet_guest::dhcp_script::ScriptEvent;
use rdnet_link::codec::{Decoder, Framing};

const MAC: [u8; 6] = [0x5a, 0x94, 0xef, 0xe4, 0x0c, 0xee];
/// Ethernet (14) + IPv4 without options (20) + UDP (8) + op/htype/hlen/hops.
const XID_AT: usize = 14 + 20 + 8 + 4;
const UDP_CSUM_AT: usize = 14 + 20 + 6;

/// Drains the client's outputs; returns the xid of the last frame it sent.
fn drain(c: &mut DhcpClient, xid: &mut [u8; 4]) {
    while let Some(out) = c.poll_output() {
        match out {
            Output::Transmit(f) => {
                assert!(f.len() >= XID_AT + 4);
                xid.copy_from_slice(&f[XID_AT..XID_AT + 4]);
            }
            Output::Configure(lease) | Output::Renew(lease) | Output::Deconfigure(lease) => {
                let _ = lease.to_string();
                let _ = ScriptEvent::Bound(&lease).environment("eth0");
            }
            Output::Nak(nak) => {
                let _ = ScriptEvent::Nak(&nak).environment("eth0");
            }
            Output::LeaseFail => {}
        }
    }
}

fuzz_target!(|input: &[u8]| {
    let Some((&ctl, mut data)) = input.split_first() else { return };
    let mut cfg = ClientConfig::new(MAC);
    cfg.seed = 7;
    cfg.hostname = Some("fuzz".into());
    let mut now = Instant::now();
    let mut client = DhcpClient::new(cfg, now);
    let mut xid = [0u8; 4];
    client.handle_timeout(now);
    drain(&mut client, &mut xid);
    let decoder = Decoder::new(Framing::U16Le, 65535);
    while let Ok(Some((frame, used))) = decoder.decode(data) {
        data = &data[used..];
        let mut frame = frame.to_vec();
        if ctl & 1 == 1 && frame.len() >= XID_AT + 4 {
            frame[XID_AT..XID_AT + 4].copy_from_slice(&xid);
            frame[UDP_CSUM_AT..UDP_CSUM_AT + 2].fill(0);
        }
        client.handle_frame(now, &frame);
        drain(&mut client, &mut xid);
        // Jump to the next timer now and then (T1, T2, expiry, retries).
        if ctl & 2 == 2
            && let Some(t) = client.poll_timeout()
        {
            now = now.max(t);
            client.handle_timeout(now);
            drain(&mut client, &mut xid);
        }
        now += Duration::from_millis(u64::from(ctl >> 2) * 100);
    }
    let _ = client.state();
    let _ = client.lease();
});
