//! The WireGuard UAPI `set=1` parser, as the userspace device reads
//! requests from `wg` and wireguard-tools: `key=value` lines. Nothing
//! panics, and every refusal maps to the errno the protocol answers with.
#![no_main]

#[allow(dead_code)]
#[path = "../../../mesh/src/overlay.rs"]
mod overlay;

mod wg;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match wg::uapi::parse_set(text.lines()) {
        Ok(req) => {
            // Every peer section starts with a public key line.
            let keys = text
                .lines()
                .filter(|l| l.starts_with("public_key="))
                .count();
            assert_eq!(req.peers.len(), keys);
        }
        Err(e) => {
            let errno = e.errno();
            assert!(errno == libc::EINVAL || errno == libc::EPROTO);
            let _ = e.to_string();
        }
    }
});
