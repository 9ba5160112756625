//! wsl-proxy's port-mapping messages (COMPAT §7): the stream framing that
//! finds where one JSON message ends, and the all-or-nothing parser.
//! wsl-proxy is a binary crate, so its module is compiled here by path.
#![no_main]

#[allow(dead_code)]
#[path = "../../bins/wsl-proxy/src/mapping.rs"]
mod mapping;

use libfuzzer_sys::fuzz_target;
use mapping::Framing;

fuzz_target!(|data: &[u8]| {
    // As the control socket reads: grow the buffer until a message is
    // complete (or can never be), then parse exactly that message.
    let mut end = None;
    for n in 0..=data.len() {
        match mapping::framing(&data[..n]) {
            Framing::Complete(k) => {
                assert!(k <= n);
                end = Some(k);
                break;
            }
            Framing::Invalid => break,
            Framing::Incomplete => {}
        }
    }
    if let Some(k) = end
        && let Ok(req) = mapping::parse(&data[..k])
    {
        for b in &req.bindings {
            assert_eq!(b.listen.port(), b.upstream_port);
        }
    }
    let _ = mapping::parse(data);
});
