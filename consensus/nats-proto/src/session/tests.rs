use super::*;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn config() -> ServerConfig {
    ServerConfig {
        server_id: "NTEST".into(),
        server_name: "ployz-test".into(),
        ..ServerConfig::default()
    }
}

fn session_with(cfg: ServerConfig) -> Session {
    let meta = ConnectionMeta {
        client_id: 7,
        client_ip: Some("10.0.0.1".into()),
        ..ConnectionMeta::default()
    };
    let mut s = Session::new(Arc::new(cfg), meta, ms(0));
    // Drop the INFO greeting and mark it written.
    let (out, _) = drain(&mut s);
    assert!(out.starts_with(b"INFO {"));
    s.bytes_flushed(out.len());
    s
}

fn session() -> Session {
    session_with(config())
}

/// All bytes to send (concatenated) and the other actions, in order.
fn drain(s: &mut Session) -> (Vec<u8>, Vec<Action>) {
    let mut out = Vec::new();
    let mut actions = Vec::new();
    while let Some(a) = s.poll_action() {
        match a {
            Action::Send(b) => out.extend_from_slice(&b),
            other => actions.push(other),
        }
    }
    (out, actions)
}

fn feed(s: &mut Session, input: &[u8], now: Duration) -> (String, Vec<Action>) {
    s.handle_input(input, now);
    let (out, actions) = drain(s);
    (String::from_utf8_lossy(&out).into_owned(), actions)
}

const QUIET: &[u8] = b"CONNECT {\"verbose\":false,\"pedantic\":false,\"headers\":true,\"no_responders\":true,\"protocol\":1}\r\n";

fn quiet() -> Session {
    let mut s = session();
    let (out, actions) = feed(&mut s, QUIET, ms(1));
    assert_eq!(out, "");
    assert_eq!(actions, vec![Action::Connected]);
    s
}

fn close_of(actions: &[Action]) -> Option<CloseReason> {
    actions.iter().find_map(|a| match a {
        Action::Close { reason } => Some(*reason),
        _ => None,
    })
}

#[test]
fn info_greeting_like_nats_server() {
    let cfg = ServerConfig {
        max_payload: 1000,
        jetstream: true,
        ..config()
    };
    let meta = ConnectionMeta {
        client_id: 42,
        client_ip: Some("127.0.0.1".into()),
        ..ConnectionMeta::default()
    };
    let mut s = Session::new(Arc::new(cfg), meta, ms(0));
    let (out, actions) = drain(&mut s);
    assert!(actions.is_empty());
    assert!(out.starts_with(b"INFO {"));
    assert!(
        out.ends_with(b"} \r\n"),
        "nats-server puts a space before the CRLF"
    );
    assert_eq!(s.pending_bytes(), out.len());
    let json = &out[5..out.len() - 2];
    let info = ServerInfo::from_json(json).unwrap_or_default();
    assert_eq!(info.server_id, "NTEST");
    assert_eq!(info.proto, 1);
    assert_eq!(info.client_id, 42);
    assert_eq!(info.client_ip.as_deref(), Some("127.0.0.1"));
    assert_eq!(info.max_payload, 1000);
    assert!(info.headers && info.jetstream && !info.auth_required);
    let text = String::from_utf8_lossy(json);
    assert!(
        !text.contains("auth_required"),
        "omitempty like nats-server"
    );
}

#[test]
fn verbose_by_default_before_connect() {
    // nats-server's defaultOpts are verbose: telnet users see +OK.
    let mut s = session();
    let (out, actions) = feed(&mut s, b"sub foo 1\r\npub foo 2\r\nhi\r\nping\r\n", ms(1));
    assert_eq!(out, "+OK\r\n+OK\r\nPONG\r\n");
    assert_eq!(actions.len(), 2);
    assert_eq!(
        actions[0],
        Action::Subscribe {
            sid: "1".into(),
            subject: "foo".into(),
            queue: None
        }
    );
    assert_eq!(
        actions[1],
        Action::Publish {
            subject: "foo".into(),
            reply: None,
            headers: None,
            payload: b"hi".to_vec()
        }
    );
}

#[test]
fn verbose_ok_after_each_op_but_not_ping_pong() {
    let mut s = session();
    let (out, actions) = feed(
        &mut s,
        b"CONNECT {\"verbose\":true}\r\nSUB a 1\r\nPUB a 1\r\nx\r\nUNSUB 1\r\nUNSUB 99\r\nPING\r\nPONG\r\n+OK\r\n",
        ms(1),
    );
    assert_eq!(out, "+OK\r\n+OK\r\n+OK\r\n+OK\r\n+OK\r\nPONG\r\n");
    assert_eq!(actions.first(), Some(&Action::Connected));
    assert!(actions.contains(&Action::Unsubscribe { sid: "1".into() }));
    assert!(s.verbose());
}

#[test]
fn quiet_client_ping_pong_and_publish() {
    let mut s = quiet();
    let (out, actions) = feed(
        &mut s,
        b"PING\r\nPUB foo.bar _INBOX.1 5\r\nhello\r\nHPUB h 12 14\r\nNATS/1.0\r\n\r\nhi\r\n",
        ms(2),
    );
    assert_eq!(out, "PONG\r\n");
    assert_eq!(
        actions,
        vec![
            Action::Publish {
                subject: "foo.bar".into(),
                reply: Some("_INBOX.1".into()),
                headers: None,
                payload: b"hello".to_vec()
            },
            Action::Publish {
                subject: "h".into(),
                reply: None,
                headers: Some(b"NATS/1.0\r\n\r\n".to_vec()),
                payload: b"hi".to_vec()
            },
        ]
    );
    assert_eq!(s.stats().in_msgs, 2);
    assert_eq!(s.stats().in_bytes, 5 + 14);
}

#[test]
fn hpub_without_headers_closes_silently() {
    let mut s = session();
    feed(&mut s, b"CONNECT {\"verbose\":false}\r\n", ms(1));
    let (out, actions) = feed(&mut s, b"HPUB foo 12 12\r\nNATS/1.0\r\n\r\n\r\n", ms(2));
    assert_eq!(out, "");
    assert_eq!(close_of(&actions), Some(CloseReason::ProtocolViolation));
    // Also before any CONNECT (headers are off until negotiated).
    let mut s = session();
    let (out, actions) = feed(&mut s, b"HPUB foo 12 12\r\n", ms(1));
    assert_eq!(
        (out.as_str(), close_of(&actions)),
        ("", Some(CloseReason::ProtocolViolation))
    );
}

#[test]
fn server_without_headers_refuses_hpub_even_if_client_asks() {
    let mut s = session_with(ServerConfig {
        headers: false,
        ..config()
    });
    let (_, actions) = feed(
        &mut s,
        b"CONNECT {\"verbose\":false,\"headers\":true}\r\n",
        ms(1),
    );
    assert_eq!(actions, vec![Action::Connected]);
    assert!(!s.headers());
    let (_, actions) = feed(&mut s, b"HPUB foo 12 12\r\nNATS/1.0\r\n\r\n\r\n", ms(2));
    assert_eq!(close_of(&actions), Some(CloseReason::ProtocolViolation));
}

#[test]
fn connect_errors() {
    let cases: &[(&[u8], &str, CloseReason)] = &[
        (
            b"CONNECT {\"no_responders\":true}\r\n",
            "-ERR 'no responders requires headers support'\r\n",
            CloseReason::NoRespondersRequiresHeaders,
        ),
        (
            b"CONNECT {\"protocol\":2}\r\n",
            "-ERR 'invalid client protocol'\r\n",
            CloseReason::BadClientProtocolVersion,
        ),
        (
            b"CONNECT {\"protocol\":-1}\r\n",
            "-ERR 'invalid client protocol'\r\n",
            CloseReason::BadClientProtocolVersion,
        ),
        (
            b"CONNECT {\"account\":\"A\"}\r\n",
            "-ERR 'Authorization Violation'\r\n",
            CloseReason::AuthenticationViolation,
        ),
        (
            b"CONNECT {\"new_account\":true}\r\n",
            "-ERR 'Authorization Violation'\r\n",
            CloseReason::AuthenticationViolation,
        ),
        (b"CONNECT {bad json\r\n", "", CloseReason::ProtocolViolation),
        (b"CONNECT\r\n", "", CloseReason::ProtocolViolation),
        (
            b"CONNECT {\"verbose\":1}\r\n",
            "",
            CloseReason::ProtocolViolation,
        ),
        (b"INFO {\r\n", "", CloseReason::ProtocolViolation),
        (b"-ERR 'oops'\r\n", "", CloseReason::ParseError),
    ];
    for (input, want_out, want_reason) in cases {
        let mut s = session();
        let (out, actions) = feed(&mut s, input, ms(1));
        assert_eq!(&out, want_out, "{}", String::from_utf8_lossy(input));
        assert_eq!(
            close_of(&actions),
            Some(*want_reason),
            "{}",
            String::from_utf8_lossy(input)
        );
        assert!(!actions.contains(&Action::Connected));
        assert!(s.is_closed());
        // Closed sessions ignore everything.
        let (out, actions) = feed(&mut s, b"PING\r\n", ms(2));
        assert_eq!((out.as_str(), actions.len()), ("", 0));
    }
}

#[test]
fn client_info_and_ok_are_ignored() {
    let mut s = quiet();
    let (out, actions) = feed(
        &mut s,
        b"INFO {\"server_id\":\"x\"}\r\n+OK\r\nPING\r\n",
        ms(2),
    );
    assert_eq!((out.as_str(), actions.len()), ("PONG\r\n", 0));
}

#[test]
fn every_fatal_error_text() {
    let cfg = ServerConfig {
        max_payload: 8,
        max_control_line: 32,
        ..config()
    };
    let cases: &[(&[u8], &str, CloseReason)] = &[
        (
            b"FOO\r\n",
            "-ERR 'Unknown Protocol Operation'\r\n",
            CloseReason::ProtocolViolation,
        ),
        (
            b"PUB foo 3\r\nabcX\r\n",
            "-ERR 'Unknown Protocol Operation'\r\n",
            CloseReason::ProtocolViolation,
        ),
        (
            b"PUB foo 9\r\n",
            "-ERR 'Maximum Payload Violation'\r\n",
            CloseReason::MaxPayloadExceeded,
        ),
        (
            b"SUB aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa 1\r\n",
            "-ERR 'maximum control line exceeded'\r\n",
            CloseReason::MaxControlLineExceeded,
        ),
        (b"PUB foo\r\n", "", CloseReason::ProtocolViolation),
        (b"UNSUB\t\r\n", "", CloseReason::ProtocolViolation),
    ];
    for (input, want_out, want_reason) in cases {
        let mut s = session_with(cfg.clone());
        let (out, actions) = feed(&mut s, input, ms(1));
        assert_eq!(&out, want_out, "{}", String::from_utf8_lossy(input));
        assert_eq!(close_of(&actions), Some(*want_reason));
        assert!(!want_reason.skip_flush(), "the -ERR must be flushed");
    }
}

#[test]
fn invalid_subject_is_not_fatal() {
    let mut s = quiet();
    let (out, actions) = feed(
        &mut s,
        b"SUB foo. 1\r\nSUB foo.>.bar 2\r\nSUB a..b 3\r\nPING\r\n",
        ms(2),
    );
    assert_eq!(
        out,
        "-ERR 'Invalid Subject'\r\n-ERR 'Invalid Subject'\r\n-ERR 'Invalid Subject'\r\nPONG\r\n"
    );
    assert!(actions.is_empty());
    assert!(!s.is_closed());
    // Verbose: the error replaces the +OK.
    let mut s = session();
    let (out, _) = feed(&mut s, b"SUB foo. 1\r\nSUB foo 2\r\n", ms(1));
    assert_eq!(out, "-ERR 'Invalid Subject'\r\n+OK\r\n");
}

#[test]
fn pedantic_publish_to_wildcard_is_reported_but_routed() {
    let mut s = session();
    let (out, actions) = feed(
        &mut s,
        b"CONNECT {\"verbose\":false,\"pedantic\":true}\r\nPUB foo.* 0\r\n\r\n",
        ms(1),
    );
    assert_eq!(out, "-ERR 'Invalid Publish Subject'\r\n");
    assert!(matches!(&actions[1], Action::Publish { subject, .. } if subject == "foo.*"));
    assert!(!s.is_closed());
    // Not pedantic: no complaint.
    let mut s = quiet();
    let (out, actions) = feed(&mut s, b"PUB foo.> 0\r\n\r\n", ms(2));
    assert_eq!(out, "");
    assert_eq!(actions.len(), 1);
}

#[test]
fn duplicate_sid_and_max_subs() {
    let mut s = session_with(ServerConfig {
        max_subs: 2,
        ..config()
    });
    feed(&mut s, QUIET, ms(1));
    let (out, actions) = feed(
        &mut s,
        b"SUB a 1\r\nSUB b 1\r\nSUB c 2\r\nSUB d 3\r\n",
        ms(2),
    );
    assert_eq!(out, "-ERR 'maximum subscriptions exceeded'\r\n");
    assert_eq!(actions.len(), 2);
    let subs: Vec<_> = s.subscriptions().collect();
    assert_eq!(subs, vec![("1", "a", None), ("2", "c", None)]);
}

#[test]
fn queue_subscription() {
    let mut s = quiet();
    let (_, actions) = feed(&mut s, b"SUB work.* workers 5\r\n", ms(2));
    assert_eq!(
        actions,
        vec![Action::Subscribe {
            sid: "5".into(),
            subject: "work.*".into(),
            queue: Some("workers".into())
        }]
    );
}

#[test]
fn token_auth() {
    let cfg = ServerConfig {
        auth: Auth::Token("s3cret".into()),
        ..config()
    };
    let mut s = session_with(cfg.clone());
    assert_eq!(
        s.poll_timeout(),
        Some(ms(2000)),
        "auth timeout = first ping = 2s"
    );
    let (out, actions) = feed(
        &mut s,
        b"CONNECT {\"verbose\":false,\"auth_token\":\"s3cret\"}\r\nPING\r\n",
        ms(5),
    );
    assert_eq!(
        (out.as_str(), actions),
        ("PONG\r\n", vec![Action::Connected])
    );

    for bad in [
        &b"CONNECT {\"auth_token\":\"nope\"}\r\n"[..],
        b"CONNECT {}\r\n",
        b"CONNECT {\"user\":\"s3cret\"}\r\n",
    ] {
        let mut s = session_with(cfg.clone());
        let (out, actions) = feed(&mut s, bad, ms(5));
        assert_eq!(out, "-ERR 'Authorization Violation'\r\n");
        assert_eq!(
            close_of(&actions),
            Some(CloseReason::AuthenticationViolation)
        );
    }
}

#[test]
fn user_pass_auth() {
    let cfg = ServerConfig {
        auth: Auth::UserPass {
            user: "u".into(),
            pass: "p".into(),
        },
        ..config()
    };
    let mut s = session_with(cfg.clone());
    let (out, actions) = feed(
        &mut s,
        b"CONNECT {\"user\":\"u\",\"pass\":\"p\"}\r\n",
        ms(5),
    );
    assert_eq!(
        (out.as_str(), actions),
        ("+OK\r\n", vec![Action::Connected])
    );
    assert_eq!(s.connect_info().and_then(|c| c.user.as_deref()), Some("u"));
    for bad in [
        &b"CONNECT {\"user\":\"u\",\"pass\":\"x\"}\r\n"[..],
        b"CONNECT {\"user\":\"x\",\"pass\":\"p\"}\r\n",
        b"CONNECT {\"pass\":\"p\"}\r\n",
        b"CONNECT {\"auth_token\":\"p\"}\r\n",
    ] {
        let mut s = session_with(cfg.clone());
        let (out, actions) = feed(&mut s, bad, ms(5));
        assert_eq!(out, "-ERR 'Authorization Violation'\r\n");
        assert_eq!(
            close_of(&actions),
            Some(CloseReason::AuthenticationViolation)
        );
    }
}

#[test]
fn auth_requires_connect_first() {
    let cfg = ServerConfig {
        auth: Auth::Token("t".into()),
        ..config()
    };
    for first in [&b"PING\r\n"[..], b"SUB foo 1\r\n", b"P", b"x"] {
        let mut s = session_with(cfg.clone());
        let (out, actions) = feed(&mut s, first, ms(1));
        assert_eq!(out, "-ERR 'Authorization Violation'\r\n");
        assert_eq!(
            close_of(&actions),
            Some(CloseReason::AuthenticationViolation)
        );
    }
    // Without auth, operations before CONNECT are fine.
    let mut s = session();
    assert_eq!(feed(&mut s, b"PING\r\n", ms(1)).0, "PONG\r\n");
}

#[test]
fn auth_timeout() {
    let cfg = ServerConfig {
        auth: Auth::Token("t".into()),
        auth_timeout: ms(500),
        ..config()
    };
    let mut s = session_with(cfg);
    assert_eq!(s.poll_timeout(), Some(ms(500)));
    s.handle_timeout(ms(499));
    assert!(!s.is_closed());
    s.handle_timeout(ms(500));
    let (out, actions) = drain(&mut s);
    assert_eq!(out, b"-ERR 'Authentication Timeout'\r\n");
    assert_eq!(close_of(&actions), Some(CloseReason::AuthenticationTimeout));
    assert_eq!(s.poll_timeout(), None);
}

#[test]
fn echo_flag() {
    let mut s = quiet();
    feed(&mut s, b"SUB foo 1\r\n", ms(2));
    let msg = Message {
        subject: "foo",
        reply: None,
        headers: None,
        payload: b"x",
    };
    assert!(s.echo());
    assert_eq!(s.deliver("1", &msg, true), Delivery::Delivered);
    let mut s = session();
    feed(
        &mut s,
        b"CONNECT {\"verbose\":false,\"echo\":false}\r\nSUB foo 1\r\n",
        ms(1),
    );
    drain(&mut s);
    assert_eq!(s.deliver("1", &msg, true), Delivery::EchoSuppressed);
    assert_eq!(s.deliver("1", &msg, false), Delivery::Delivered);
    assert_eq!(drain(&mut s).0, b"MSG foo 1 1\r\nx\r\n");
}

#[test]
fn deliver_encodes_msg_and_hmsg() {
    let mut s = quiet();
    feed(&mut s, b"SUB foo.* 9\r\n", ms(2));
    let plain = Message {
        subject: "foo.a",
        reply: Some("_INBOX.x"),
        headers: None,
        payload: b"hello",
    };
    let with_hdr = Message {
        subject: "foo.b",
        reply: None,
        headers: Some(b"NATS/1.0\r\nA: B\r\n\r\n"),
        payload: b"yo",
    };
    assert_eq!(s.deliver("9", &plain, false), Delivery::Delivered);
    assert_eq!(s.deliver("9", &with_hdr, false), Delivery::Delivered);
    assert_eq!(
        s.deliver("nope", &plain, false),
        Delivery::NoSuchSubscription
    );
    let (out, _) = drain(&mut s);
    assert_eq!(
        String::from_utf8_lossy(&out),
        "MSG foo.a 9 _INBOX.x 5\r\nhello\r\nHMSG foo.b 9 18 20\r\nNATS/1.0\r\nA: B\r\n\r\nyo\r\n"
    );
    assert_eq!(s.stats().out_msgs, 2);

    // A client without headers gets the payload only, as MSG.
    let mut s = session();
    feed(
        &mut s,
        b"CONNECT {\"verbose\":false}\r\nSUB foo.* 9\r\n",
        ms(1),
    );
    drain(&mut s);
    s.deliver("9", &with_hdr, false);
    assert_eq!(drain(&mut s).0, b"MSG foo.b 9 2\r\nyo\r\n");
}

#[test]
fn unsub_max_counts_deliveries() {
    let mut s = quiet();
    let (_, actions) = feed(&mut s, b"SUB foo 1\r\nUNSUB 1 2\r\n", ms(2));
    assert_eq!(
        actions,
        vec![
            Action::Subscribe {
                sid: "1".into(),
                subject: "foo".into(),
                queue: None
            },
            Action::AutoUnsubscribe {
                sid: "1".into(),
                max: 2
            },
        ]
    );
    let msg = Message {
        subject: "foo",
        reply: None,
        headers: None,
        payload: b"",
    };
    assert_eq!(s.deliver("1", &msg, false), Delivery::Delivered);
    assert_eq!(s.deliver("1", &msg, false), Delivery::DeliveredLast);
    assert_eq!(s.deliver("1", &msg, false), Delivery::NoSuchSubscription);
    let (out, actions) = drain(&mut s);
    assert_eq!(out, b"MSG foo 1 0\r\n\r\nMSG foo 1 0\r\n\r\n");
    assert_eq!(actions, vec![Action::Unsubscribe { sid: "1".into() }]);
    assert_eq!(s.subscriptions().count(), 0);
}

#[test]
fn unsub_max_already_reached_or_zero_unsubscribes_now() {
    let mut s = quiet();
    feed(&mut s, b"SUB foo 1\r\nSUB bar 2\r\n", ms(2));
    let msg = Message {
        subject: "foo",
        reply: None,
        headers: None,
        payload: b"",
    };
    s.deliver("1", &msg, false);
    s.deliver("1", &msg, false);
    drain(&mut s);
    let (_, actions) = feed(&mut s, b"UNSUB 1 2\r\nUNSUB 2 0\r\n", ms(3));
    assert_eq!(
        actions,
        vec![
            Action::Unsubscribe { sid: "1".into() },
            Action::Unsubscribe { sid: "2".into() }
        ]
    );
}

#[test]
fn no_responders_status() {
    let mut s = quiet();
    assert!(s.no_responders());
    assert!(s.deliver_no_responders("3", "_INBOX.abc", "svc.echo"));
    let (out, _) = drain(&mut s);
    assert_eq!(
        String::from_utf8_lossy(&out),
        "HMSG _INBOX.abc 3 40 40\r\nNATS/1.0 503\r\nNats-Subject: svc.echo\r\n\r\n\r\n"
    );
    let mut p = crate::parser::ServerOpParser::new(4096, 1024);
    let (n, op) = p.next(&out);
    assert_eq!(n, out.len());
    assert!(matches!(
        op,
        Some(Ok(crate::ServerOp::HMsg { payload: b"", .. }))
    ));
    // Not asked for: nothing.
    let mut s = session();
    assert!(!s.deliver_no_responders("3", "_INBOX.abc", "svc.echo"));
}

fn keepalive_cfg() -> ServerConfig {
    ServerConfig {
        ping_interval: ms(10_000),
        first_ping_interval: ms(2_000),
        max_pings_out: 2,
        ..config()
    }
}

#[test]
fn keepalive_pings_then_stale_connection() {
    let mut s = session_with(keepalive_cfg());
    feed(&mut s, QUIET, ms(100));
    // CONNECT re-arms the first ping timer.
    assert_eq!(s.poll_timeout(), Some(ms(2_100)));
    s.handle_timeout(ms(2_099));
    assert_eq!(drain(&mut s).0, b"");
    s.handle_timeout(ms(2_100));
    assert_eq!(drain(&mut s).0, b"PING\r\n");
    assert_eq!(s.pings_out(), 1);
    assert_eq!(s.poll_timeout(), Some(ms(12_100)));
    s.handle_timeout(ms(12_100));
    assert_eq!(drain(&mut s).0, b"PING\r\n");
    assert_eq!(s.pings_out(), 2);
    s.handle_timeout(ms(22_100));
    let (out, actions) = drain(&mut s);
    assert_eq!(out, b"-ERR 'Stale Connection'\r\n");
    assert_eq!(
        actions,
        vec![Action::Close {
            reason: CloseReason::StaleConnection
        }]
    );
    assert_eq!(s.poll_timeout(), None);
}

#[test]
fn keepalive_pong_resets_and_traffic_delays_pings() {
    let mut s = session_with(keepalive_cfg());
    feed(&mut s, QUIET, ms(0));
    s.handle_timeout(ms(2_000));
    assert_eq!(drain(&mut s).0, b"PING\r\n");
    feed(&mut s, b"PONG\r\n", ms(2_050));
    assert_eq!(s.pings_out(), 0);
    assert_eq!(s.rtt(), Some(ms(50)));
    // Client traffic within the interval stands in for a PONG: no PING.
    feed(&mut s, b"PUB x 0\r\n\r\n", ms(11_000));
    s.handle_timeout(ms(12_000));
    assert_eq!(drain(&mut s).0, b"");
    assert_eq!(s.poll_timeout(), Some(ms(22_000)));
    // Silence for a whole interval: PING again, and it is answered.
    s.handle_timeout(ms(22_000));
    assert_eq!(drain(&mut s).0, b"PING\r\n");
    feed(&mut s, b"PONG\r\n", ms(22_010));
    for t in [32_000, 42_000, 52_000] {
        s.handle_timeout(ms(t));
        let (out, _) = drain(&mut s);
        assert_eq!(out, b"PING\r\n");
        feed(&mut s, b"PONG\r\n", ms(t + 5));
    }
    assert!(!s.is_closed());
}

#[test]
fn first_ping_even_before_connect_and_disabled_keepalive() {
    let mut s = session_with(keepalive_cfg());
    assert_eq!(s.poll_timeout(), Some(ms(2_000)));
    s.handle_timeout(ms(2_000));
    assert_eq!(drain(&mut s).0, b"PING\r\n");
    let mut s = session_with(ServerConfig {
        ping_interval: Duration::ZERO,
        ..config()
    });
    assert_eq!(s.poll_timeout(), None);
    s.handle_timeout(ms(1_000_000));
    assert_eq!(drain(&mut s).0, b"");
}

#[test]
fn slow_consumer_closes_without_err_and_bounds_memory() {
    let cfg = ServerConfig {
        max_pending: 400,
        ..config()
    };
    let mut s = session_with(cfg);
    feed(&mut s, QUIET, ms(1));
    feed(&mut s, b"SUB foo 1\r\n", ms(2));
    let msg = Message {
        subject: "foo",
        reply: None,
        headers: None,
        payload: &[b'x'; 150],
    };
    // Each MSG is 15 + 150 + 2 = 167 bytes: two fit in 400, the third does not.
    assert_eq!(s.deliver("1", &msg, false), Delivery::Delivered);
    assert_eq!(s.deliver("1", &msg, false), Delivery::Delivered);
    assert_eq!(s.pending_bytes(), 334);
    assert_eq!(s.deliver("1", &msg, false), Delivery::Closed);
    assert!(s.pending_bytes() <= 400);
    let (out, actions) = drain(&mut s);
    assert_eq!(out.len(), 334, "no -ERR is queued for a slow consumer");
    assert_eq!(
        actions,
        vec![Action::Close {
            reason: CloseReason::SlowConsumerPendingBytes
        }]
    );
    assert!(CloseReason::SlowConsumerPendingBytes.skip_flush());
    assert_eq!(s.deliver("1", &msg, false), Delivery::Closed);
    assert_eq!(drain(&mut s).1, vec![]);
}

#[test]
fn flushing_keeps_a_fast_consumer_alive() {
    let cfg = ServerConfig {
        max_pending: 400,
        ..config()
    };
    let mut s = session_with(cfg);
    feed(&mut s, QUIET, ms(1));
    feed(&mut s, b"SUB foo 1\r\n", ms(2));
    let msg = Message {
        subject: "foo",
        reply: None,
        headers: None,
        payload: &[b'x'; 150],
    };
    for _ in 0..1000 {
        assert_eq!(s.deliver("1", &msg, false), Delivery::Delivered);
        while let Some(a) = s.poll_action() {
            if let Action::Send(b) = a {
                s.bytes_flushed(b.len());
            }
        }
    }
    assert_eq!(s.pending_bytes(), 0);
    assert_eq!(s.stats().out_msgs, 1000);
}

#[test]
fn io_close_is_idempotent() {
    let mut s = quiet();
    s.close(CloseReason::ClientClosed);
    s.close(CloseReason::ReadError);
    assert_eq!(s.close_reason(), Some(CloseReason::ClientClosed));
    assert_eq!(
        drain(&mut s).1,
        vec![Action::Close {
            reason: CloseReason::ClientClosed
        }]
    );
}

#[test]
fn session_output_independent_of_split_points() {
    let input: &[u8] = b"CONNECT {\"verbose\":true,\"headers\":true}\r\nSUB foo 1\r\nSUB bar q 2\r\n\
        PUB foo r 3\r\nabc\r\nHPUB foo 12 15\r\nNATS/1.0\r\n\r\nxyz\r\nPING\r\nUNSUB 1 3\r\nSUB x. 3\r\nPONG\r\n";
    let run = |chunks: &[&[u8]]| {
        let mut s = session();
        let mut out = Vec::new();
        let mut actions = Vec::new();
        for (i, c) in chunks.iter().enumerate() {
            s.handle_input(c, ms(i as u64));
            let (o, a) = drain(&mut s);
            out.extend(o);
            actions.extend(a);
        }
        (out, actions)
    };
    let whole = run(&[input]);
    assert_eq!(
        String::from_utf8_lossy(&whole.0),
        "+OK\r\n+OK\r\n+OK\r\n+OK\r\n+OK\r\nPONG\r\n+OK\r\n-ERR 'Invalid Subject'\r\n"
    );
    assert_eq!(whole.1.len(), 6);
    for a in 0..=input.len() {
        assert_eq!(run(&[&input[..a], &input[a..]]), whole, "split {a}");
    }
    let bytes: Vec<&[u8]> = input.chunks(1).collect();
    assert_eq!(run(&bytes), whole);
}

/// Malformed arguments close the connection without an `-ERR`, exactly as nats-server 2.9.10
/// does on the wire (it only logs "processPub Bad or Missing Size", "processHeaderPub Header
/// Size larger then TotalSize", ...); the same inputs are checked against the real server in
/// `natsd/tests/compat.rs` (`malformed_protocol`). A bare verb is an unknown operation.
#[test]
fn malformed_arguments_close_silently_like_nats_server() {
    let silent: &[&[u8]] = &[
        b"PUB foo -1\r\n",
        b"PUB foo 99999999999999999999999\r\n",
        b"PUB foo 9223372036854775808\r\n",
        b"PUB foo abc\r\n",
        b"PUB foo bar baz 3\r\n",
        b"HPUB foo 10 5\r\n",
        b"HPUB foo x 5\r\n",
        b"HPUB foo 5 x\r\n",
        b"HPUB foo -1 5\r\n",
        b"HPUB foo 2 99999999999999999999\r\n",
        b"HPUB foo 5\r\n",
        b"HPUB foo\r\n",
        b"SUB foo\r\n",
        b"UNSUB 1 2 3\r\n",
    ];
    for input in silent {
        let mut s = quiet();
        let (out, actions) = feed(&mut s, input, ms(2));
        let shown = String::from_utf8_lossy(input);
        assert_eq!(out, "", "{shown}");
        assert_eq!(
            actions,
            vec![Action::Close {
                reason: CloseReason::ProtocolViolation
            }],
            "{shown}"
        );
    }
    for verb in [&b"PUB\r\n"[..], b"HPUB\r\n", b"SUB\r\n", b"UNSUB\r\n"] {
        let mut s = quiet();
        let (out, actions) = feed(&mut s, verb, ms(2));
        assert_eq!(out, "-ERR 'Unknown Protocol Operation'\r\n");
        assert_eq!(close_of(&actions), Some(CloseReason::ProtocolViolation));
    }
    // A malformed CONNECT closes silently too (JSON error, nothing sent).
    for input in [&b"CONNECT {bad\r\n"[..], b"CONNECT {bad}\r\n"] {
        let mut s = session();
        let (out, actions) = feed(&mut s, input, ms(2));
        assert_eq!(out, "");
        assert_eq!(close_of(&actions), Some(CloseReason::ProtocolViolation));
    }
    // A header block not starting with `NATS/1.0` is not checked: published as is.
    let mut s = quiet();
    let (out, actions) = feed(&mut s, b"HPUB foo 2 4\r\nXYab\r\nPING\r\n", ms(2));
    assert_eq!(out, "PONG\r\n");
    assert_eq!(
        actions,
        vec![Action::Publish {
            subject: "foo".into(),
            reply: None,
            headers: Some(b"XY".to_vec()),
            payload: b"ab".to_vec(),
        }]
    );
}

fn users_config() -> ServerConfig {
    let perms = Permissions {
        publish: SubjectPermission {
            allow: vec!["app.>".into(), "$JS.API.>".into()],
            deny: vec!["app.secret".into()],
        },
        subscribe: SubjectPermission {
            allow: vec!["app.>".into(), "_INBOX.>".into()],
            deny: vec!["app.private.>".into()],
        },
        responses: Some(ResponsePermission::default()),
    };
    ServerConfig {
        auth: Auth::Users(vec![
            User {
                user: "app".into(),
                pass: "app-pass".into(),
                permissions: Some(Arc::new(perms)),
            },
            User {
                user: "admin".into(),
                pass: "admin-pass".into(),
                permissions: None,
            },
        ]),
        ..config()
    }
}

fn login(cfg: &ServerConfig, user: &str, pass: &str) -> (Session, String, Vec<Action>) {
    let mut s = session_with(cfg.clone());
    let connect =
        format!("CONNECT {{\"user\":\"{user}\",\"pass\":\"{pass}\",\"verbose\":false}}\r\n");
    let (out, actions) = feed(&mut s, connect.as_bytes(), ms(5));
    (s, out, actions)
}

#[test]
fn users_authenticate_by_name_and_password() {
    let cfg = users_config();
    let (_, out, actions) = login(&cfg, "app", "app-pass");
    assert_eq!((out.as_str(), actions), ("", vec![Action::Connected]));
    let (_, out, actions) = login(&cfg, "admin", "admin-pass");
    assert_eq!((out.as_str(), actions), ("", vec![Action::Connected]));
    for (u, p) in [
        ("app", "admin-pass"),
        ("admin", "app-pass"),
        ("nobody", "app-pass"),
    ] {
        let (_, out, actions) = login(&cfg, u, p);
        assert_eq!(out, "-ERR 'Authorization Violation'\r\n", "{u}/{p}");
        assert_eq!(
            close_of(&actions),
            Some(CloseReason::AuthenticationViolation)
        );
    }
    // No password ever shows in Debug.
    let dbg = format!("{:?}", cfg.auth);
    assert!(
        dbg.contains("\"app\"") && !dbg.contains("app-pass"),
        "{dbg}"
    );
}

#[test]
fn publish_permissions_answer_like_nats_server_and_keep_the_connection() {
    let (mut s, _, _) = login(&users_config(), "app", "app-pass");
    let (out, actions) = feed(&mut s, b"PUB app.echo 2\r\nhi\r\n", ms(6));
    assert_eq!(out, "");
    assert!(matches!(&actions[..], [Action::Publish { subject, .. }] if subject == "app.echo"));
    for (subject, text) in [
        (
            "ployz.machine.x",
            "-ERR 'Permissions Violation for Publish to \"ployz.machine.x\"'\r\n",
        ),
        (
            "app.secret",
            "-ERR 'Permissions Violation for Publish to \"app.secret\"'\r\n",
        ),
        (
            "$KV.machines.abc",
            "-ERR 'Permissions Violation for Publish to \"$KV.machines.abc\"'\r\n",
        ),
    ] {
        let line = format!("PUB {subject} 2\r\nhi\r\n");
        let (out, actions) = feed(&mut s, line.as_bytes(), ms(7));
        assert_eq!(out, text);
        assert!(actions.is_empty(), "{actions:?}");
    }
    assert!(!s.is_closed());
    // The unrestricted user publishes anywhere.
    let (mut admin, _, _) = login(&users_config(), "admin", "admin-pass");
    let (out, actions) = feed(&mut admin, b"PUB ployz.machine.x 0\r\n\r\n", ms(6));
    assert_eq!(out, "");
    assert_eq!(actions.len(), 1);
}

#[test]
fn subscribe_permissions_take_wildcards_as_tokens() {
    let (mut s, _, _) = login(&users_config(), "app", "app-pass");
    for ok in ["app.echo", "app.*", "app.>", "_INBOX.abc.*"] {
        let line = format!("SUB {ok} s-{ok}\r\n");
        let (out, actions) = feed(&mut s, line.as_bytes(), ms(6));
        assert_eq!(out, "", "{ok}");
        assert!(matches!(&actions[..], [Action::Subscribe { .. }]), "{ok}");
    }
    for (bad, sid) in [
        (">", "1"),
        ("ployz.>", "2"),
        ("app.private.x", "3"),
        ("*.echo", "4"),
    ] {
        let line = format!("SUB {bad} {sid}\r\n");
        let (out, actions) = feed(&mut s, line.as_bytes(), ms(7));
        assert_eq!(
            out,
            format!("-ERR 'Permissions Violation for Subscription to \"{bad}\"'\r\n")
        );
        assert!(actions.is_empty());
    }
    let (out, _) = feed(&mut s, b"SUB ployz.x workers 9\r\n", ms(8));
    assert_eq!(
        out,
        "-ERR 'Permissions Violation for Subscription to \"ployz.x\" using queue \"workers\"'\r\n"
    );
    assert!(!s.is_closed());
}

#[test]
fn denied_subjects_never_reach_a_wildcard_subscription() {
    let (mut s, _, _) = login(&users_config(), "app", "app-pass");
    feed(&mut s, b"SUB app.> 1\r\n", ms(6));
    let msg = |subject| Message {
        subject,
        reply: None,
        headers: None,
        payload: b"x",
    };
    assert_eq!(
        s.deliver("1", &msg("app.private.k"), false),
        Delivery::Denied
    );
    assert_eq!(
        s.deliver("1", &msg("app.public"), false),
        Delivery::Delivered
    );
    let (out, _) = drain(&mut s);
    assert_eq!(String::from_utf8_lossy(&out), "MSG app.public 1 1\r\nx\r\n");
}

#[test]
fn allow_responses_permits_one_reply_per_request_received() {
    let (mut s, _, _) = login(&users_config(), "app", "app-pass");
    feed(&mut s, b"SUB app.echo 1\r\n", ms(6));
    // A reply subject it has not received: refused.
    let (out, _) = feed(&mut s, b"PUB _INBOX.req.1 2\r\nno\r\n", ms(7));
    assert_eq!(
        out,
        "-ERR 'Permissions Violation for Publish to \"_INBOX.req.1\"'\r\n"
    );
    let req = Message {
        subject: "app.echo",
        reply: Some("_INBOX.req.1"),
        headers: None,
        payload: b"ping",
    };
    assert_eq!(s.deliver("1", &req, false), Delivery::Delivered);
    drain(&mut s);
    let (out, actions) = feed(&mut s, b"PUB _INBOX.req.1 4\r\npong\r\n", ms(8));
    assert_eq!(out, "");
    assert!(matches!(&actions[..], [Action::Publish { subject, .. }] if subject == "_INBOX.req.1"));
    // One response each (nats-server's default max of 1).
    let (out, _) = feed(&mut s, b"PUB _INBOX.req.1 4\r\npong\r\n", ms(9));
    assert_eq!(
        out,
        "-ERR 'Permissions Violation for Publish to \"_INBOX.req.1\"'\r\n"
    );
}

#[test]
fn tracked_replies_stay_bounded() {
    let (mut s, _, _) = login(&users_config(), "app", "app-pass");
    feed(&mut s, b"SUB app.echo 1\r\n", ms(6));
    for i in 0..(MAX_TRACKED_REPLIES + 50) {
        let reply = format!("_INBOX.r.{i}");
        let req = Message {
            subject: "app.echo",
            reply: Some(&reply),
            headers: None,
            payload: b"",
        };
        s.deliver("1", &req, false);
        let (out, _) = drain(&mut s);
        s.bytes_flushed(out.len());
    }
    assert!(s.core.replies.len() <= MAX_TRACKED_REPLIES);
    assert!(s.core.reply_order.len() <= 2 * MAX_TRACKED_REPLIES + 64);
    // The oldest were forgotten, the newest still answerable.
    let (out, _) = feed(&mut s, b"PUB _INBOX.r.0 0\r\n\r\n", ms(9));
    assert!(out.starts_with("-ERR 'Permissions Violation"), "{out}");
    let newest = format!("PUB _INBOX.r.{} 0\r\n\r\n", MAX_TRACKED_REPLIES + 49);
    let (out, _) = feed(&mut s, newest.as_bytes(), ms(9));
    assert_eq!(out, "");
}

#[test]
fn go_quote_escapes_like_percent_q() {
    assert_eq!(go_quote("a.b"), "\"a.b\"");
    assert_eq!(go_quote("a\"b\\c"), "\"a\\\"b\\\\c\"");
    assert_eq!(go_quote("a\u{1}"), "\"a\\x01\"");
}

#[test]
fn revoked_users_get_an_authorization_violation_and_are_closed() {
    let cfg = users_config();
    let (mut s, _, _) = login(&cfg, "app", "app-pass");
    assert_eq!(s.user(), Some("app"));
    s.revoke();
    let (out, actions) = drain(&mut s);
    assert_eq!(out, b"-ERR 'Authorization Violation'\r\n");
    assert_eq!(
        close_of(&actions),
        Some(CloseReason::AuthenticationViolation)
    );
    // Without required credentials there is no user to speak of.
    let mut open = session_with(config());
    let _ = feed(&mut open, b"CONNECT {\"user\":\"x\"}\r\n", ms(1));
    assert_eq!(open.user(), None);
}

#[test]
fn tls_required_is_announced_in_info() {
    let meta = ConnectionMeta {
        tls_required: true,
        ..ConnectionMeta::default()
    };
    let mut s = Session::new(Arc::new(config()), meta, ms(0));
    let (out, _) = drain(&mut s);
    let out = String::from_utf8(out).unwrap();
    assert!(out.contains("\"tls_required\":true"), "{out}");
}
