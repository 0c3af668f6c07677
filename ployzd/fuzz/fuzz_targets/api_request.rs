//! The socket API's request decoder: one JSON line into `Request`, as
//! ployzd's `server::connection` does. Nothing panics, and a request that
//! decodes re-encodes to a line that decodes to the same request.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ployz_api::Request;

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = serde_json::from_slice::<Request>(data) {
        let line = serde_json::to_vec(&req).expect("requests serialise");
        let again: Request = serde_json::from_slice(&line).expect("a re-encoded request decodes");
        assert_eq!(
            serde_json::to_value(&req).unwrap(),
            serde_json::to_value(&again).unwrap()
        );
    }
});
