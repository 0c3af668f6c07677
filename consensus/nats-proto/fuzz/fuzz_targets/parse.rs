//! Arbitrary bytes through both parsers and a `Session`, split at points
//! chosen by the input itself. Nothing may panic, the parsers must consume
//! every byte they are given, and their buffering must stay bounded.
#![no_main]

use std::sync::Arc;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use ployz_nats_proto::{
    Action, Auth, ConnectionMeta, Message, Parser, ServerConfig, ServerOpParser, Session,
};

const MCL: usize = 64;
const MAX_PAYLOAD: usize = 256;

/// Splits `data` into chunks whose lengths come from the first byte.
fn chunks(data: &[u8]) -> Vec<&[u8]> {
    let (step, rest) = match data.split_first() {
        Some((s, rest)) => (usize::from(*s % 17) + 1, rest),
        None => return Vec::new(),
    };
    rest.chunks(step).collect()
}

fn drive_parsers(parts: &[&[u8]]) {
    let mut p = Parser::new(MCL, MAX_PAYLOAD);
    p.set_headers(true);
    let mut s = ServerOpParser::new(MCL, MAX_PAYLOAD);
    for part in parts {
        let mut off = 0;
        while off < part.len() {
            let (n, r) = p.next(&part[off..]);
            assert!(n <= part.len() - off);
            off += n;
            match r {
                Some(Ok(op)) => {
                    let mut v = Vec::new();
                    op.encode(&mut v);
                }
                Some(Err(_)) | None => break,
            }
        }
        assert!(p.buffered() <= MCL + 1 + MAX_PAYLOAD);
        let mut off = 0;
        while off < part.len() {
            let (n, r) = s.next(&part[off..]);
            off += n;
            if !matches!(r, Some(Ok(_))) {
                break;
            }
        }
    }
}

fn drive_session(parts: &[&[u8]], auth: Auth) {
    let cfg = ServerConfig {
        max_control_line: MCL,
        max_payload: MAX_PAYLOAD,
        max_pending: 4096,
        ping_interval: Duration::from_millis(50),
        first_ping_interval: Duration::from_millis(10),
        auth,
        ..ServerConfig::default()
    };
    let mut s = Session::new(Arc::new(cfg), ConnectionMeta::default(), Duration::ZERO);
    let mut sids: Vec<String> = Vec::new();
    for (i, part) in parts.iter().enumerate() {
        let now = Duration::from_millis(7 * i as u64);
        s.handle_input(part, now);
        if let Some(t) = s.poll_timeout() {
            if t <= now {
                s.handle_timeout(now);
            }
        }
        while let Some(a) = s.poll_action() {
            match a {
                Action::Send(b) => {
                    if i % 3 != 0 {
                        s.bytes_flushed(b.len());
                    }
                }
                Action::Subscribe { sid, .. } => sids.push(sid),
                Action::Publish { subject, reply, headers, payload } => {
                    let msg = Message {
                        subject: &subject,
                        reply: reply.as_deref(),
                        headers: headers.as_deref(),
                        payload: &payload,
                    };
                    for sid in &sids {
                        s.deliver(sid, &msg, i % 2 == 0);
                    }
                    s.deliver_no_responders("1", "_INBOX.x", &subject);
                }
                _ => {}
            }
        }
        assert!(s.pending_bytes() <= 4096);
    }
}

fuzz_target!(|data: &[u8]| {
    let parts = chunks(data);
    drive_parsers(&parts);
    drive_session(&parts, Auth::None);
    drive_session(&parts, Auth::Token("t".into()));
});
