//! wsl-proxy's port-mapping messages (COMPAT §7): the stream framing that
//! finds where one JSON message ends, and the parser that skips unusable
//! entries (keeping only a bounded, loggable description of them).
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
            assert_ne!(b.port, 0);
        }
        assert!(req.skipped.len() <= mapping::SKIP_DETAILS.min(req.skipped_count));
        for s in &req.skipped {
            // Quoted strings are cut, so a log line stays short whatever
            // the body holds.
            assert!(s.to_string().chars().count() < 400);
        }
    }
    let _ = mapping::parse(data);
});
