//! Incremental, split-safe parsers for both directions of the NATS client
//! protocol, and encoders for every operation.
//!
//! The framing follows nats-server's `parser.go` byte for byte where it
//! matters for interoperability:
//!
//! * verbs are matched case-insensitively, one byte at a time, so a bad verb
//!   is rejected as soon as its first wrong byte arrives
//!   (`-ERR 'Unknown Protocol Operation'`), without waiting for a newline;
//! * `PUB`, `HPUB`, `SUB`, `UNSUB`, `MSG`, `HMSG` and `-ERR` need a space or
//!   tab after the verb; `CONNECT` and `INFO` take optional whitespace;
//! * `PING`, `PONG` and `+OK` ignore everything up to the next `\n`;
//! * lines end in `\n`; one `\r` right before it is dropped;
//! * the argument of a control line may be at most `max_control_line` bytes
//!   (`-ERR 'maximum control line exceeded'`), checked exactly at the newline
//!   and conservatively while a line is still incomplete, so memory stays
//!   bounded whatever the split points;
//! * sizes are parsed like nats-server's `parseSize` (1 to 9 ASCII digits);
//! * a payload larger than `max_payload` is rejected from the control line,
//!   before any payload byte is read (`-ERR 'Maximum Payload Violation'`);
//! * the payload must be followed by exactly `\r\n`, otherwise
//!   `-ERR 'Unknown Protocol Operation'`.
//!
//! The parsers are pull-style: [`Parser::next`] returns how many bytes of
//! the given buffer it consumed and at most one operation. Operations borrow
//! from the input buffer when the whole operation is inside it (zero-copy),
//! and from the parser's internal buffers otherwise.

use crate::error::ProtoError;

/// nats-server's `MAX_CONTROL_LINE_SIZE`.
pub const DEFAULT_MAX_CONTROL_LINE: usize = 4096;
/// nats-server's `MAX_PAYLOAD_SIZE` (1 MiB).
pub const DEFAULT_MAX_PAYLOAD: usize = 1024 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verb {
    Connect,
    Pub,
    HPub,
    Sub,
    Unsub,
    Ping,
    Pong,
    Info,
    Ok,
    Err,
    Msg,
    HMsg,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Shape {
    /// No argument; everything up to `\n` is ignored.
    Bare,
    /// A space or tab must follow the verb, then the argument.
    SepArg,
    /// Optional whitespace, then the argument (possibly empty).
    OptArg,
}

impl Verb {
    fn name(self) -> &'static [u8] {
        match self {
            Verb::Connect => b"CONNECT",
            Verb::Pub => b"PUB",
            Verb::HPub => b"HPUB",
            Verb::Sub => b"SUB",
            Verb::Unsub => b"UNSUB",
            Verb::Ping => b"PING",
            Verb::Pong => b"PONG",
            Verb::Info => b"INFO",
            Verb::Ok => b"+OK",
            Verb::Err => b"-ERR",
            Verb::Msg => b"MSG",
            Verb::HMsg => b"HMSG",
        }
    }

    fn shape(self) -> Shape {
        match self {
            Verb::Ping | Verb::Pong | Verb::Ok => Shape::Bare,
            Verb::Connect | Verb::Info => Shape::OptArg,
            _ => Shape::SepArg,
        }
    }
}

/// What a client may send to a server. `HMSG`/`MSG` from a client are not
/// accepted (nats-server only accepts them on route/leaf connections).
const CLIENT_VERBS: &[Verb] = &[
    Verb::Connect,
    Verb::Pub,
    Verb::HPub,
    Verb::Sub,
    Verb::Unsub,
    Verb::Ping,
    Verb::Pong,
    Verb::Info,
    Verb::Ok,
    Verb::Err,
];

/// What a server may send to a client.
const SERVER_VERBS: &[Verb] = &[
    Verb::Info,
    Verb::Msg,
    Verb::HMsg,
    Verb::Ping,
    Verb::Pong,
    Verb::Ok,
    Verb::Err,
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Start,
    Verb,
    AfterVerb,
    SkipWs,
    Arg,
    SkipLine,
    Payload,
    EndR,
    EndN,
    Failed,
}

const MAX_TOKENS: usize = 5;

/// Payload buffers larger than this are released after use, so an idle
/// connection does not keep a `max_payload`-sized allocation.
const KEEP_MSG_BUF: usize = 64 * 1024;

/// Token positions inside an argument line, plus the numbers parsed from it.
#[derive(Clone, Copy, Debug, Default)]
struct Layout {
    toks: [(usize, usize); MAX_TOKENS],
    n: usize,
    hdr: usize,
    total: usize,
    num: Option<u64>,
}

impl Layout {
    fn tok<'a>(&self, arg: &'a [u8], i: usize) -> &'a [u8] {
        match self.toks.get(i) {
            Some(&(s, e)) => arg.get(s..e).unwrap_or_default(),
            None => &[],
        }
    }
}

struct Frame<'a> {
    verb: Verb,
    arg: &'a [u8],
    payload: &'a [u8],
    layout: Layout,
}

fn is_pub_sep(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

fn is_arg_sep(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\n')
}

/// Splits like nats-server's `processPub` (space/tab) or `splitArg`
/// (space/tab/CR/LF). Returns `None` when there are more than
/// [`MAX_TOKENS`] tokens.
fn split(arg: &[u8], sep: fn(u8) -> bool, layout: &mut Layout) -> Option<()> {
    let mut start: Option<usize> = None;
    layout.n = 0;
    for (i, &b) in arg.iter().enumerate() {
        if sep(b) {
            if let Some(s) = start.take() {
                *layout.toks.get_mut(layout.n)? = (s, i);
                layout.n += 1;
            }
        } else if start.is_none() {
            start = Some(i);
        }
    }
    if let Some(s) = start {
        *layout.toks.get_mut(layout.n)? = (s, arg.len());
        layout.n += 1;
    }
    Some(())
}

/// nats-server's `parseSize`: 1..=9 ASCII digits, anything else is invalid.
pub fn parse_size(d: &[u8]) -> Option<usize> {
    if d.is_empty() || d.len() > 9 {
        return None;
    }
    let mut n = 0usize;
    for &c in d {
        if !c.is_ascii_digit() {
            return None;
        }
        n = n * 10 + usize::from(c - b'0');
    }
    Some(n)
}

#[derive(Clone, Copy, Debug)]
struct Limits {
    max_control_line: usize,
    max_payload: usize,
    require_connect: bool,
    headers: bool,
}

/// Validates the argument line of `verb`; returns its layout and whether a
/// payload follows.
fn parse_args(verb: Verb, arg: &[u8], lim: &Limits) -> Result<(Layout, bool), ProtoError> {
    let mut l = Layout::default();
    let bad = |op: &'static str, reason: &'static str| ProtoError::BadArgs { op, reason };
    match verb {
        Verb::Pub => {
            split(arg, is_pub_sep, &mut l).ok_or(bad("PUB", "parse error"))?;
            if l.n != 2 && l.n != 3 {
                return Err(bad("PUB", "parse error"));
            }
            let size = parse_size(l.tok(arg, l.n - 1)).ok_or(bad("PUB", "bad or missing size"))?;
            if size > lim.max_payload {
                return Err(ProtoError::MaxPayload {
                    size,
                    max: lim.max_payload,
                });
            }
            l.total = size;
            Ok((l, true))
        }
        Verb::HPub => {
            if !lim.headers {
                return Err(ProtoError::HeadersNotSupported);
            }
            split(arg, is_pub_sep, &mut l).ok_or(bad("HPUB", "parse error"))?;
            if l.n != 3 && l.n != 4 {
                return Err(bad("HPUB", "parse error"));
            }
            size_pair(&mut l, arg, "HPUB", lim)?;
            Ok((l, true))
        }
        Verb::Sub => {
            split(arg, is_arg_sep, &mut l).ok_or(bad("SUB", "parse error"))?;
            if l.n != 2 && l.n != 3 {
                return Err(bad("SUB", "parse error"));
            }
            Ok((l, false))
        }
        Verb::Unsub => {
            split(arg, is_arg_sep, &mut l).ok_or(bad("UNSUB", "parse error"))?;
            match l.n {
                1 => l.num = None,
                2 => l.num = parse_size(l.tok(arg, 1)).map(|n| n as u64),
                _ => return Err(bad("UNSUB", "parse error")),
            }
            Ok((l, false))
        }
        Verb::Msg => {
            split(arg, is_arg_sep, &mut l).ok_or(bad("MSG", "parse error"))?;
            if l.n != 3 && l.n != 4 {
                return Err(bad("MSG", "parse error"));
            }
            let size = parse_size(l.tok(arg, l.n - 1)).ok_or(bad("MSG", "bad or missing size"))?;
            if size > lim.max_payload {
                return Err(ProtoError::MaxPayload {
                    size,
                    max: lim.max_payload,
                });
            }
            l.total = size;
            Ok((l, true))
        }
        Verb::HMsg => {
            split(arg, is_arg_sep, &mut l).ok_or(bad("HMSG", "parse error"))?;
            if l.n != 4 && l.n != 5 {
                return Err(bad("HMSG", "parse error"));
            }
            size_pair(&mut l, arg, "HMSG", lim)?;
            Ok((l, true))
        }
        Verb::Connect | Verb::Info | Verb::Err | Verb::Ping | Verb::Pong | Verb::Ok => {
            Ok((l, false))
        }
    }
}

fn size_pair(l: &mut Layout, arg: &[u8], op: &'static str, lim: &Limits) -> Result<(), ProtoError> {
    let hdr = parse_size(l.tok(arg, l.n - 2)).ok_or(ProtoError::BadArgs {
        op,
        reason: "bad or missing header size",
    })?;
    let total = parse_size(l.tok(arg, l.n - 1)).ok_or(ProtoError::BadArgs {
        op,
        reason: "bad or missing total size",
    })?;
    if hdr > total {
        return Err(ProtoError::BadArgs {
            op,
            reason: "header size larger than total size",
        });
    }
    if total > lim.max_payload {
        return Err(ProtoError::MaxPayload {
            size: total,
            max: lim.max_payload,
        });
    }
    l.hdr = hdr;
    l.total = total;
    Ok(())
}

/// The direction-independent framing state machine.
#[derive(Debug)]
struct Engine {
    verbs: &'static [Verb],
    state: State,
    verb: Verb,
    verb_buf: [u8; 8],
    verb_len: usize,
    arg_buf: Vec<u8>,
    msg_buf: Vec<u8>,
    layout: Layout,
    recycle: bool,
    error: Option<ProtoError>,
    limits: Limits,
}

impl Engine {
    fn new(verbs: &'static [Verb], limits: Limits) -> Self {
        Engine {
            verbs,
            state: State::Start,
            verb: Verb::Ping,
            verb_buf: [0; 8],
            verb_len: 0,
            arg_buf: Vec::new(),
            msg_buf: Vec::new(),
            layout: Layout::default(),
            recycle: false,
            error: None,
            limits,
        }
    }

    fn fail<'a>(
        &mut self,
        at: usize,
        e: ProtoError,
    ) -> (usize, Option<Result<Frame<'a>, ProtoError>>) {
        self.state = State::Failed;
        self.error = Some(e.clone());
        self.arg_buf = Vec::new();
        self.msg_buf = Vec::new();
        (at, Some(Err(e)))
    }

    /// Hands out a completed frame. `arg_here` locates the argument in `buf`
    /// when it was not copied; `payload_here` likewise for the payload.
    fn finish<'a>(
        &'a mut self,
        buf: &'a [u8],
        consumed: usize,
        arg_here: Option<(usize, usize)>,
        payload_here: Option<(usize, usize)>,
    ) -> (usize, Option<Result<Frame<'a>, ProtoError>>) {
        self.state = State::Start;
        self.recycle = true;
        let this: &'a Engine = self;
        let arg = match arg_here {
            Some((s, e)) => buf.get(s..e).unwrap_or_default(),
            None => &this.arg_buf[..],
        };
        let payload = match payload_here {
            Some((s, e)) => buf.get(s..e).unwrap_or_default(),
            None => &this.msg_buf[..],
        };
        let frame = Frame {
            verb: this.verb,
            arg,
            payload,
            layout: this.layout,
        };
        (consumed, Some(Ok(frame)))
    }

    fn next<'a>(&'a mut self, buf: &'a [u8]) -> (usize, Option<Result<Frame<'a>, ProtoError>>) {
        if self.recycle {
            self.arg_buf.clear();
            self.msg_buf.clear();
            if self.msg_buf.capacity() > KEEP_MSG_BUF {
                self.msg_buf = Vec::new();
            }
            self.layout = Layout::default();
            self.recycle = false;
        }
        if self.state == State::Failed {
            return (buf.len(), None);
        }
        let mut i = 0usize;
        // Where the argument bytes of the current line start in `buf`
        // (only meaningful in `State::Arg`; a line continued from a previous
        // call starts at 0, its head being in `arg_buf`).
        let mut arg_start = 0usize;
        // The argument of the current op when it lies entirely in `buf`.
        let mut arg_here: Option<(usize, usize)> = None;
        while i < buf.len() {
            let b = buf[i];
            match self.state {
                State::Start => {
                    if self.limits.require_connect && b != b'C' && b != b'c' {
                        return self.fail(i, ProtoError::AuthViolation);
                    }
                    self.verb_len = 0;
                    self.state = State::Verb;
                }
                State::Verb => {
                    if self.verb_len >= self.verb_buf.len() {
                        return self.fail(i, ProtoError::UnknownOp);
                    }
                    self.verb_buf[self.verb_len] = b.to_ascii_uppercase();
                    self.verb_len += 1;
                    let prefix = &self.verb_buf[..self.verb_len];
                    let mut any = false;
                    let mut complete = None;
                    for &v in self.verbs {
                        let name = v.name();
                        if name.starts_with(prefix) {
                            any = true;
                            if name.len() == prefix.len() {
                                complete = Some(v);
                            }
                        }
                    }
                    if !any {
                        return self.fail(i, ProtoError::UnknownOp);
                    }
                    if let Some(v) = complete {
                        self.verb = v;
                        self.state = match v.shape() {
                            Shape::Bare => State::SkipLine,
                            Shape::SepArg => State::AfterVerb,
                            Shape::OptArg => State::SkipWs,
                        };
                    }
                    i += 1;
                }
                State::AfterVerb => {
                    if b == b' ' || b == b'\t' {
                        self.state = State::SkipWs;
                        i += 1;
                    } else {
                        return self.fail(i, ProtoError::UnknownOp);
                    }
                }
                State::SkipWs => {
                    if b == b' ' || b == b'\t' {
                        i += 1;
                    } else {
                        self.state = State::Arg;
                        arg_start = i;
                    }
                }
                State::Arg => {
                    let rest = &buf[i..];
                    match rest.iter().position(|&c| c == b'\n') {
                        Some(p) => {
                            let nl = i + p;
                            let tail = &buf[arg_start..nl];
                            let seen = self.arg_buf.len() + tail.len();
                            let last = tail.last().or(self.arg_buf.last()).copied();
                            let arg_len = seen - usize::from(last == Some(b'\r'));
                            if arg_len > self.limits.max_control_line {
                                let max = self.limits.max_control_line;
                                return self
                                    .fail(nl, ProtoError::MaxControlLine { len: arg_len, max });
                            }
                            if self.arg_buf.is_empty() {
                                arg_here = Some((arg_start, arg_start + arg_len));
                            } else {
                                self.arg_buf.extend_from_slice(tail);
                                self.arg_buf.truncate(arg_len);
                            }
                            i = nl + 1;
                            let arg: &[u8] = match arg_here {
                                Some((s, e)) => &buf[s..e],
                                None => &self.arg_buf,
                            };
                            match parse_args(self.verb, arg, &self.limits) {
                                Err(e) => return self.fail(nl, e),
                                Ok((layout, has_payload)) => {
                                    self.layout = layout;
                                    if !has_payload {
                                        return self.finish(buf, i, arg_here, None);
                                    }
                                    self.state = State::Payload;
                                }
                            }
                        }
                        None => {
                            let seen = self.arg_buf.len() + (buf.len() - arg_start);
                            let max = self.limits.max_control_line;
                            let last = buf[buf.len() - 1];
                            if seen > max.saturating_add(1) || (seen == max + 1 && last != b'\r') {
                                return self.fail(
                                    buf.len(),
                                    ProtoError::MaxControlLine { len: seen, max },
                                );
                            }
                            self.arg_buf.extend_from_slice(&buf[arg_start..]);
                            return (buf.len(), None);
                        }
                    }
                }
                State::SkipLine => match buf[i..].iter().position(|&c| c == b'\n') {
                    Some(p) => return self.finish(buf, i + p + 1, Some((0, 0)), Some((0, 0))),
                    None => return (buf.len(), None),
                },
                State::Payload => {
                    let total = self.layout.total;
                    let avail = buf.len() - i;
                    if self.msg_buf.is_empty() && avail >= total + 2 {
                        if buf[i + total] != b'\r' {
                            return self.fail(i + total, ProtoError::UnknownOp);
                        }
                        if buf[i + total + 1] != b'\n' {
                            return self.fail(i + total + 1, ProtoError::UnknownOp);
                        }
                        return self.finish(buf, i + total + 2, arg_here, Some((i, i + total)));
                    }
                    if self.msg_buf.capacity() < total {
                        self.msg_buf.reserve_exact(total - self.msg_buf.len());
                    }
                    let take = (total - self.msg_buf.len()).min(avail);
                    self.msg_buf.extend_from_slice(&buf[i..i + take]);
                    i += take;
                    if self.msg_buf.len() == total {
                        self.state = State::EndR;
                    }
                }
                State::EndR => {
                    if b != b'\r' {
                        return self.fail(i, ProtoError::UnknownOp);
                    }
                    self.state = State::EndN;
                    i += 1;
                }
                State::EndN => {
                    if b != b'\n' {
                        return self.fail(i, ProtoError::UnknownOp);
                    }
                    return self.finish(buf, i + 1, arg_here, None);
                }
                State::Failed => return (buf.len(), None),
            }
        }
        // Out of input in the middle of an op: keep what still lives in `buf`.
        if let Some((s, e)) = arg_here {
            self.arg_buf.extend_from_slice(&buf[s..e]);
        }
        (buf.len(), None)
    }
}

/// An operation sent by a client, borrowed from the input or the parser.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientOp<'a> {
    /// `CONNECT <json>`: the raw JSON (possibly empty or invalid).
    Connect(&'a [u8]),
    /// `PUB <subject> [reply] <size>` and its payload.
    Pub {
        /// Subject as sent (not validated).
        subject: &'a [u8],
        /// Optional reply subject.
        reply: Option<&'a [u8]>,
        /// Payload, exactly `size` bytes.
        payload: &'a [u8],
    },
    /// `HPUB <subject> [reply] <hdr size> <total size>` and its body.
    HPub {
        /// Subject as sent (not validated).
        subject: &'a [u8],
        /// Optional reply subject.
        reply: Option<&'a [u8]>,
        /// Header block (starts with `NATS/1.0`, ends with an empty line).
        headers: &'a [u8],
        /// Payload after the header block.
        payload: &'a [u8],
    },
    /// `SUB <subject> [queue] <sid>`.
    Sub {
        /// Subject filter as sent (not validated).
        subject: &'a [u8],
        /// Optional queue group.
        queue: Option<&'a [u8]>,
        /// Subscription id chosen by the client.
        sid: &'a [u8],
    },
    /// `UNSUB <sid> [max]`. `max` is `None` when absent or not a valid size
    /// (nats-server then unsubscribes immediately).
    Unsub {
        /// Subscription id.
        sid: &'a [u8],
        /// Auto-unsubscribe after this many messages in total.
        max: Option<u64>,
    },
    /// `PING`.
    Ping,
    /// `PONG`.
    Pong,
    /// `INFO <json>` (clients may send it; nats-server ignores it).
    Info(&'a [u8]),
    /// `+OK`.
    Ok,
    /// `-ERR <text>` (raw text, quotes included).
    Err(&'a [u8]),
}

fn opt_tok<'a>(l: &Layout, arg: &'a [u8], i: usize) -> Option<&'a [u8]> {
    Some(l.tok(arg, i))
}

impl<'a> ClientOp<'a> {
    fn from_frame(f: Frame<'a>) -> Self {
        let (l, a) = (&f.layout, f.arg);
        match f.verb {
            Verb::Connect => ClientOp::Connect(a),
            Verb::Pub => ClientOp::Pub {
                subject: l.tok(a, 0),
                reply: if l.n == 3 { opt_tok(l, a, 1) } else { None },
                payload: f.payload,
            },
            Verb::HPub => {
                let hdr = l.hdr.min(f.payload.len());
                let (headers, payload) = f.payload.split_at(hdr);
                ClientOp::HPub {
                    subject: l.tok(a, 0),
                    reply: if l.n == 4 { opt_tok(l, a, 1) } else { None },
                    headers,
                    payload,
                }
            }
            Verb::Sub => ClientOp::Sub {
                subject: l.tok(a, 0),
                queue: if l.n == 3 { opt_tok(l, a, 1) } else { None },
                sid: l.tok(a, l.n.saturating_sub(1)),
            },
            Verb::Unsub => ClientOp::Unsub {
                sid: l.tok(a, 0),
                max: l.num,
            },
            Verb::Ping => ClientOp::Ping,
            Verb::Pong => ClientOp::Pong,
            Verb::Info => ClientOp::Info(a),
            Verb::Ok => ClientOp::Ok,
            Verb::Err | Verb::Msg | Verb::HMsg => ClientOp::Err(a),
        }
    }

    /// Appends the wire form of this operation to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match *self {
            ClientOp::Connect(json) => {
                out.extend_from_slice(b"CONNECT ");
                out.extend_from_slice(json);
                out.extend_from_slice(b"\r\n");
            }
            ClientOp::Pub {
                subject,
                reply,
                payload,
            } => {
                out.extend_from_slice(b"PUB ");
                push_subject_reply(out, subject, None, reply);
                push_usize(out, payload.len());
                out.extend_from_slice(b"\r\n");
                out.extend_from_slice(payload);
                out.extend_from_slice(b"\r\n");
            }
            ClientOp::HPub {
                subject,
                reply,
                headers,
                payload,
            } => {
                out.extend_from_slice(b"HPUB ");
                push_subject_reply(out, subject, None, reply);
                push_usize(out, headers.len());
                out.push(b' ');
                push_usize(out, headers.len() + payload.len());
                out.extend_from_slice(b"\r\n");
                out.extend_from_slice(headers);
                out.extend_from_slice(payload);
                out.extend_from_slice(b"\r\n");
            }
            ClientOp::Sub {
                subject,
                queue,
                sid,
            } => {
                out.extend_from_slice(b"SUB ");
                out.extend_from_slice(subject);
                out.push(b' ');
                if let Some(q) = queue {
                    out.extend_from_slice(q);
                    out.push(b' ');
                }
                out.extend_from_slice(sid);
                out.extend_from_slice(b"\r\n");
            }
            ClientOp::Unsub { sid, max } => {
                out.extend_from_slice(b"UNSUB ");
                out.extend_from_slice(sid);
                if let Some(m) = max {
                    out.push(b' ');
                    push_u64(out, m);
                }
                out.extend_from_slice(b"\r\n");
            }
            ClientOp::Ping => out.extend_from_slice(b"PING\r\n"),
            ClientOp::Pong => out.extend_from_slice(b"PONG\r\n"),
            ClientOp::Info(json) => {
                out.extend_from_slice(b"INFO ");
                out.extend_from_slice(json);
                out.extend_from_slice(b"\r\n");
            }
            ClientOp::Ok => out.extend_from_slice(b"+OK\r\n"),
            ClientOp::Err(text) => {
                out.extend_from_slice(b"-ERR ");
                out.extend_from_slice(text);
                out.extend_from_slice(b"\r\n");
            }
        }
    }
}

/// An operation sent by a server, borrowed from the input or the parser.
/// Also used to encode what a server sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerOp<'a> {
    /// `INFO <json>`: the raw JSON (the trailing space nats-server puts
    /// before the CRLF is part of it when parsed).
    Info(&'a [u8]),
    /// `MSG <subject> <sid> [reply] <size>` and its payload.
    Msg {
        /// Subject the message was published to.
        subject: &'a [u8],
        /// Subscription id it is delivered for.
        sid: &'a [u8],
        /// Optional reply subject.
        reply: Option<&'a [u8]>,
        /// Payload.
        payload: &'a [u8],
    },
    /// `HMSG <subject> <sid> [reply] <hdr size> <total size>` and its body.
    HMsg {
        /// Subject the message was published to.
        subject: &'a [u8],
        /// Subscription id it is delivered for.
        sid: &'a [u8],
        /// Optional reply subject.
        reply: Option<&'a [u8]>,
        /// Header block.
        headers: &'a [u8],
        /// Payload after the header block.
        payload: &'a [u8],
    },
    /// `PING`.
    Ping,
    /// `PONG`.
    Pong,
    /// `+OK`.
    Ok,
    /// `-ERR <text>`: the raw text, quotes included (e.g. `'Stale Connection'`).
    Err(&'a [u8]),
}

impl<'a> ServerOp<'a> {
    fn from_frame(f: Frame<'a>) -> Self {
        let (l, a) = (&f.layout, f.arg);
        match f.verb {
            Verb::Info => ServerOp::Info(a),
            Verb::Msg => ServerOp::Msg {
                subject: l.tok(a, 0),
                sid: l.tok(a, 1),
                reply: if l.n == 4 { opt_tok(l, a, 2) } else { None },
                payload: f.payload,
            },
            Verb::HMsg => {
                let hdr = l.hdr.min(f.payload.len());
                let (headers, payload) = f.payload.split_at(hdr);
                ServerOp::HMsg {
                    subject: l.tok(a, 0),
                    sid: l.tok(a, 1),
                    reply: if l.n == 5 { opt_tok(l, a, 2) } else { None },
                    headers,
                    payload,
                }
            }
            Verb::Ping => ServerOp::Ping,
            Verb::Pong => ServerOp::Pong,
            Verb::Ok => ServerOp::Ok,
            Verb::Err | Verb::Connect | Verb::Pub | Verb::HPub | Verb::Sub | Verb::Unsub => {
                ServerOp::Err(a)
            }
        }
    }

    /// For `-ERR`, the message without the surrounding single quotes.
    pub fn err_text(&self) -> Option<&'a [u8]> {
        match *self {
            ServerOp::Err(t) => {
                let t = t.strip_prefix(b"'").unwrap_or(t);
                Some(t.strip_suffix(b"'").unwrap_or(t))
            }
            _ => None,
        }
    }

    /// Appends the wire form of this operation to `out`, exactly as
    /// nats-server formats it (including the space before the CRLF of
    /// `INFO`).
    pub fn encode(&self, out: &mut Vec<u8>) {
        match *self {
            ServerOp::Info(json) => {
                out.extend_from_slice(b"INFO ");
                out.extend_from_slice(json);
                out.extend_from_slice(b" \r\n");
            }
            ServerOp::Msg {
                subject,
                sid,
                reply,
                payload,
            } => {
                out.extend_from_slice(b"MSG ");
                push_subject_reply(out, subject, Some(sid), reply);
                push_usize(out, payload.len());
                out.extend_from_slice(b"\r\n");
                out.extend_from_slice(payload);
                out.extend_from_slice(b"\r\n");
            }
            ServerOp::HMsg {
                subject,
                sid,
                reply,
                headers,
                payload,
            } => {
                out.extend_from_slice(b"HMSG ");
                push_subject_reply(out, subject, Some(sid), reply);
                push_usize(out, headers.len());
                out.push(b' ');
                push_usize(out, headers.len() + payload.len());
                out.extend_from_slice(b"\r\n");
                out.extend_from_slice(headers);
                out.extend_from_slice(payload);
                out.extend_from_slice(b"\r\n");
            }
            ServerOp::Ping => out.extend_from_slice(b"PING\r\n"),
            ServerOp::Pong => out.extend_from_slice(b"PONG\r\n"),
            ServerOp::Ok => out.extend_from_slice(b"+OK\r\n"),
            ServerOp::Err(text) => {
                out.extend_from_slice(b"-ERR ");
                out.extend_from_slice(text);
                out.extend_from_slice(b"\r\n");
            }
        }
    }
}

/// Appends `-ERR '<text>'\r\n` (nats-server's `errProto`).
pub fn encode_err(out: &mut Vec<u8>, text: &str) {
    out.extend_from_slice(b"-ERR '");
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(b"'\r\n");
}

fn push_subject_reply(out: &mut Vec<u8>, subject: &[u8], sid: Option<&[u8]>, reply: Option<&[u8]>) {
    out.extend_from_slice(subject);
    out.push(b' ');
    if let Some(sid) = sid {
        out.extend_from_slice(sid);
        out.push(b' ');
    }
    if let Some(r) = reply {
        out.extend_from_slice(r);
        out.push(b' ');
    }
}

pub(crate) fn push_usize(out: &mut Vec<u8>, n: usize) {
    push_u64(out, n as u64);
}

pub(crate) fn push_u64(out: &mut Vec<u8>, mut n: u64) {
    let mut tmp = [0u8; 20];
    let mut i = tmp.len();
    loop {
        i -= 1;
        tmp[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&tmp[i..]);
}

/// Incremental parser for what a **client** sends (used on the server side
/// of a connection).
///
/// ```
/// use ployz_nats_proto::parser::{ClientOp, Parser};
/// let mut p = Parser::new(4096, 1024 * 1024);
/// let input = b"PUB foo 5\r\nhello\r\nPING\r\n";
/// let mut ops = Vec::new();
/// let mut off = 0;
/// while off < input.len() {
///     let (n, op) = p.next(&input[off..]);
///     off += n;
///     match op {
///         Some(Ok(op)) => {
///             let mut v = Vec::new();
///             op.encode(&mut v);
///             ops.push(v);
///         }
///         Some(Err(e)) => panic!("{e}"),
///         None => break,
///     }
/// }
/// assert_eq!(ops, vec![b"PUB foo 5\r\nhello\r\n".to_vec(), b"PING\r\n".to_vec()]);
/// ```
#[derive(Debug)]
pub struct Parser {
    engine: Engine,
}

impl Parser {
    /// A parser with the given limits. Headers are refused (`HPUB` is a
    /// protocol violation) until [`Parser::set_headers`] enables them, like
    /// a nats-server connection before its `CONNECT`.
    pub fn new(max_control_line: usize, max_payload: usize) -> Self {
        let limits = Limits {
            max_control_line,
            max_payload,
            require_connect: false,
            headers: false,
        };
        Parser {
            engine: Engine::new(CLIENT_VERBS, limits),
        }
    }

    /// When set, any operation other than `CONNECT` fails with
    /// [`ProtoError::AuthViolation`] as soon as its first byte arrives.
    pub fn set_require_connect(&mut self, on: bool) {
        self.engine.limits.require_connect = on;
    }

    /// Whether `HPUB` is accepted (negotiated headers support).
    pub fn set_headers(&mut self, on: bool) {
        self.engine.limits.headers = on;
    }

    /// Changes the maximum payload for the following operations.
    pub fn set_max_payload(&mut self, max: usize) {
        self.engine.limits.max_payload = max;
    }

    /// The error that stopped this parser, if any. A failed parser ignores
    /// all further input.
    pub fn error(&self) -> Option<&ProtoError> {
        self.engine.error.as_ref()
    }

    /// Bytes currently buffered for an incomplete operation.
    pub fn buffered(&self) -> usize {
        self.engine.arg_buf.len() + self.engine.msg_buf.len()
    }

    /// Parses at most one operation from `buf`.
    ///
    /// Returns the number of bytes consumed and:
    /// * `Some(Ok(op))`: an operation; call again with the rest of `buf`;
    /// * `Some(Err(e))`: a fatal protocol error; the parser is now failed;
    /// * `None`: all of `buf` was consumed (buffered internally), more
    ///   input is needed.
    pub fn next<'a>(
        &'a mut self,
        buf: &'a [u8],
    ) -> (usize, Option<Result<ClientOp<'a>, ProtoError>>) {
        let (n, r) = self.engine.next(buf);
        (n, r.map(|r| r.map(ClientOp::from_frame)))
    }
}

/// Incremental parser for what a **server** sends (used by a client, e.g.
/// when one ployzd connects to another, and by tests).
#[derive(Debug)]
pub struct ServerOpParser {
    engine: Engine,
}

impl ServerOpParser {
    /// A parser with the given limits.
    pub fn new(max_control_line: usize, max_payload: usize) -> Self {
        let limits = Limits {
            max_control_line,
            max_payload,
            require_connect: false,
            headers: true,
        };
        ServerOpParser {
            engine: Engine::new(SERVER_VERBS, limits),
        }
    }

    /// The error that stopped this parser, if any.
    pub fn error(&self) -> Option<&ProtoError> {
        self.engine.error.as_ref()
    }

    /// Parses at most one operation from `buf`; see [`Parser::next`].
    pub fn next<'a>(
        &'a mut self,
        buf: &'a [u8],
    ) -> (usize, Option<Result<ServerOp<'a>, ProtoError>>) {
        let (n, r) = self.engine.next(buf);
        (n, r.map(|r| r.map(ServerOp::from_frame)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `chunks` one after the other and returns every op re-encoded,
    /// plus the error if one occurred.
    fn run(p: &mut Parser, chunks: &[&[u8]]) -> (Vec<Vec<u8>>, Option<ProtoError>) {
        let mut out = Vec::new();
        for chunk in chunks {
            let mut off = 0;
            loop {
                let (n, r) = p.next(&chunk[off..]);
                off += n;
                match r {
                    Some(Ok(op)) => {
                        let mut v = Vec::new();
                        op.encode(&mut v);
                        out.push(v);
                    }
                    Some(Err(e)) => return (out, Some(e)),
                    None => break,
                }
                assert!(off <= chunk.len());
            }
            assert_eq!(off, chunk.len());
        }
        (out, None)
    }

    fn parser() -> Parser {
        let mut p = Parser::new(DEFAULT_MAX_CONTROL_LINE, DEFAULT_MAX_PAYLOAD);
        p.set_headers(true);
        p
    }

    fn one(input: &[u8]) -> (Vec<Vec<u8>>, Option<ProtoError>) {
        run(&mut parser(), &[input])
    }

    fn first_op(input: &[u8], check: impl FnOnce(ClientOp<'_>)) {
        let mut p = parser();
        let (_, r) = p.next(input);
        match r {
            Some(Ok(op)) => check(op),
            other => panic!("expected op, got {other:?}"),
        }
    }

    #[test]
    fn every_client_op() {
        first_op(b"CONNECT {\"verbose\":false}\r\n", |op| {
            assert_eq!(op, ClientOp::Connect(b"{\"verbose\":false}"));
        });
        first_op(b"PUB foo 5\r\nhello\r\n", |op| {
            assert_eq!(
                op,
                ClientOp::Pub {
                    subject: b"foo",
                    reply: None,
                    payload: b"hello"
                }
            );
        });
        first_op(b"PUB foo bar 0\r\n\r\n", |op| {
            assert_eq!(
                op,
                ClientOp::Pub {
                    subject: b"foo",
                    reply: Some(b"bar"),
                    payload: b""
                }
            );
        });
        first_op(b"HPUB foo rep 12 14\r\nNATS/1.0\r\n\r\nhi\r\n", |op| {
            assert_eq!(
                op,
                ClientOp::HPub {
                    subject: b"foo",
                    reply: Some(b"rep"),
                    headers: b"NATS/1.0\r\n\r\n",
                    payload: b"hi"
                }
            );
        });
        first_op(b"SUB foo.* 1\r\n", |op| {
            assert_eq!(
                op,
                ClientOp::Sub {
                    subject: b"foo.*",
                    queue: None,
                    sid: b"1"
                }
            );
        });
        first_op(b"SUB foo q 22\r\n", |op| {
            assert_eq!(
                op,
                ClientOp::Sub {
                    subject: b"foo",
                    queue: Some(b"q"),
                    sid: b"22"
                }
            );
        });
        first_op(b"UNSUB 22\r\n", |op| {
            assert_eq!(
                op,
                ClientOp::Unsub {
                    sid: b"22",
                    max: None
                }
            )
        });
        first_op(b"UNSUB 22 5\r\n", |op| {
            assert_eq!(
                op,
                ClientOp::Unsub {
                    sid: b"22",
                    max: Some(5)
                }
            )
        });
        first_op(b"UNSUB 22 x\r\n", |op| {
            assert_eq!(
                op,
                ClientOp::Unsub {
                    sid: b"22",
                    max: None
                }
            )
        });
        first_op(b"PING\r\n", |op| assert_eq!(op, ClientOp::Ping));
        first_op(b"PONG\r\n", |op| assert_eq!(op, ClientOp::Pong));
        first_op(b"+OK\r\n", |op| assert_eq!(op, ClientOp::Ok));
        first_op(b"INFO {}\r\n", |op| assert_eq!(op, ClientOp::Info(b"{}")));
        first_op(b"-ERR 'boom'\r\n", |op| {
            assert_eq!(op, ClientOp::Err(b"'boom'"))
        });
    }

    #[test]
    fn case_insensitive_tabs_and_bare_lf() {
        first_op(b"pub\tfoo \t 3\nabc\r\n", |op| {
            assert_eq!(
                op,
                ClientOp::Pub {
                    subject: b"foo",
                    reply: None,
                    payload: b"abc"
                }
            );
        });
        first_op(b"sUb foo 1\n", |op| {
            assert_eq!(
                op,
                ClientOp::Sub {
                    subject: b"foo",
                    queue: None,
                    sid: b"1"
                }
            );
        });
        first_op(b"connect{}\r\n", |op| {
            assert_eq!(op, ClientOp::Connect(b"{}"))
        });
        // PING ignores anything up to the newline, like nats-server.
        first_op(b"ping whatever\r\n", |op| assert_eq!(op, ClientOp::Ping));
        first_op(b"PiNg\n", |op| assert_eq!(op, ClientOp::Ping));
    }

    #[test]
    fn unknown_ops() {
        for input in [
            &b"FOO\r\n"[..],
            b"PUX foo 1\r\n",
            b"MSG foo 1 1\r\nx\r\n",
            b"HMSG foo 1 2 2\r\n",
            b"\r\nPING\r\n",
            b" PING\r\n",
            b"PUBX foo 1\r\n",
            b"SUB\r\n",
            b"-ERRx\r\n",
        ] {
            let (ops, err) = one(input);
            assert!(ops.is_empty(), "{input:?}");
            assert_eq!(err, Some(ProtoError::UnknownOp), "{input:?}");
            assert_eq!(
                err.as_ref().and_then(|e| e.err_text()),
                Some("Unknown Protocol Operation")
            );
        }
    }

    #[test]
    fn unknown_op_detected_without_newline() {
        let mut p = parser();
        let (n, r) = p.next(b"X");
        assert_eq!(n, 0);
        assert_eq!(r.map(|r| r.map(|_| ())), Some(Err(ProtoError::UnknownOp)));
        // A failed parser swallows everything afterwards.
        let (n, r) = p.next(b"PING\r\n");
        assert_eq!((n, r.is_none()), (6, true));
        assert_eq!(p.error(), Some(&ProtoError::UnknownOp));
    }

    #[test]
    fn bad_args_are_silent_errors() {
        for input in [
            &b"PUB foo\r\n"[..],
            b"PUB foo bar baz 1\r\n",
            b"PUB foo -1\r\n",
            b"PUB foo 1234567890\r\n",
            b"PUB foo abc\r\n",
            b"PUB \r\n",
            b"HPUB foo 1\r\n",
            b"HPUB foo 5 4\r\n",
            b"HPUB foo x 4\r\n",
            b"SUB foo\r\n",
            b"SUB a b c d\r\n",
            b"UNSUB\t\r\n",
            b"UNSUB 1 2 3\r\n",
        ] {
            let (ops, err) = one(input);
            assert!(ops.is_empty(), "{input:?}");
            match err {
                Some(e @ ProtoError::BadArgs { .. }) => assert_eq!(e.err_text(), None),
                other => panic!("{input:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn missing_crlf_after_payload() {
        assert_eq!(one(b"PUB foo 3\r\nabcd\r\n").1, Some(ProtoError::UnknownOp));
        assert_eq!(one(b"PUB foo 3\r\nabc\rX").1, Some(ProtoError::UnknownOp));
        assert_eq!(
            one(b"PUB foo 3\r\nab\r\n\r\n").1,
            Some(ProtoError::UnknownOp)
        );
        // Split variants fail the same way.
        assert_eq!(
            run(&mut parser(), &[b"PUB foo 3\r\nab", b"cd"]).1,
            Some(ProtoError::UnknownOp)
        );
        assert_eq!(
            run(&mut parser(), &[b"PUB foo 3\r\nabc\r", b"X"]).1,
            Some(ProtoError::UnknownOp)
        );
    }

    #[test]
    fn max_payload() {
        let mut p = Parser::new(4096, 10);
        p.set_headers(true);
        let (ops, err) = run(&mut p, &[b"PUB foo 10\r\n0123456789\r\nPUB foo 11\r\n"]);
        assert_eq!(ops.len(), 1);
        assert_eq!(err, Some(ProtoError::MaxPayload { size: 11, max: 10 }));
        assert_eq!(
            err.and_then(|e| e.err_text()),
            Some("Maximum Payload Violation")
        );
        // HPUB compares the total size.
        let mut p = Parser::new(4096, 10);
        p.set_headers(true);
        let (_, err) = run(&mut p, &[b"HPUB foo 4 11\r\n"]);
        assert_eq!(err, Some(ProtoError::MaxPayload { size: 11, max: 10 }));
    }

    #[test]
    fn max_control_line_exact_and_split() {
        let mcl = 16;
        let exact = b"SUB aaaaaaaaaa 1\r\n"; // arg "aaaaaaaaaa 1" = 12
        let line16 = b"SUB aaaaaaaaaaaaaa 1\r\n"; // arg = 16
        let line17 = b"SUB aaaaaaaaaaaaaaa 1\r\n"; // arg = 17
        for input in [&exact[..], &line16[..]] {
            for split in 0..=input.len() {
                let mut p = Parser::new(mcl, 100);
                let (ops, err) = run(&mut p, &[&input[..split], &input[split..]]);
                assert_eq!((ops.len(), err), (1, None), "split {split}");
            }
        }
        for split in 0..=line17.len() {
            let mut p = Parser::new(mcl, 100);
            let (ops, err) = run(&mut p, &[&line17[..split], &line17[split..]]);
            assert!(ops.is_empty());
            match err {
                Some(e @ ProtoError::MaxControlLine { .. }) => {
                    assert_eq!(e.err_text(), Some("maximum control line exceeded"))
                }
                other => panic!("split {split}: {other:?}"),
            }
        }
        // An endless line is cut off without buffering more than mcl+1 bytes.
        let mut p = Parser::new(mcl, 100);
        let mut failed = false;
        for _ in 0..100 {
            let (_, r) = p.next(b"SUB aaaa");
            let err = matches!(r, Some(Err(_)));
            assert!(p.buffered() <= mcl + 1);
            if err {
                failed = true;
                break;
            }
        }
        assert!(failed);
    }

    #[test]
    fn auth_required_first_byte() {
        let mut p = parser();
        p.set_require_connect(true);
        let (_, err) = run(&mut p, &[b"PING\r\n"]);
        assert_eq!(err, Some(ProtoError::AuthViolation));
        assert_eq!(
            err.and_then(|e| e.err_text()),
            Some("Authorization Violation")
        );
        let mut p = parser();
        p.set_require_connect(true);
        let (ops, err) = run(&mut p, &[b"connect {}\r\n"]);
        assert_eq!((ops.len(), err), (1, None));
    }

    #[test]
    fn headers_must_be_negotiated() {
        let mut p = Parser::new(4096, 1024);
        let (_, err) = run(&mut p, &[b"HPUB foo 12 12\r\nNATS/1.0\r\n\r\n\r\n"]);
        assert_eq!(err, Some(ProtoError::HeadersNotSupported));
        assert_eq!(err.and_then(|e| e.err_text()), None);
    }

    #[test]
    fn zero_copy_when_whole_op_in_buffer() {
        let input = b"PUB foo 5\r\nhello\r\n";
        let mut p = parser();
        let (n, r) = p.next(input);
        assert_eq!(n, input.len());
        match r {
            Some(Ok(ClientOp::Pub {
                payload, subject, ..
            })) => {
                let range = input.as_ptr_range();
                assert!(range.contains(&payload.as_ptr()));
                assert!(range.contains(&subject.as_ptr()));
            }
            other => panic!("{other:?}"),
        }
    }

    const MIX: &[u8] = b"CONNECT {\"verbose\":false,\"headers\":true}\r\n\
        PING\r\n\
        SUB foo.* q 1\r\n\
        sub > 2\r\n\
        PUB foo.bar 5\r\nhello\r\n\
        PUB foo.bar reply.x 0\r\n\r\n\
        HPUB h 24 29\r\nNATS/1.0\r\nA: B\r\nC: D\r\n\r\nworld\r\n\
        HPUB h r 12 12\r\nNATS/1.0\r\n\r\n\r\n\
        PUB big 12\r\n\r\n\r\n\r\n\r\n\r\n\r\n\r\n\
        UNSUB 1 10\r\n\
        UNSUB 2\r\n\
        PONG\r\n\
        +OK\r\n\
        INFO {}\r\n\
        -ERR 'x'\r\n";

    #[test]
    fn split_at_every_position_gives_same_ops() {
        let (whole, err) = one(MIX);
        assert_eq!(err, None);
        assert_eq!(whole.len(), 15);
        for a in 0..=MIX.len() {
            let (ops, err) = run(&mut parser(), &[&MIX[..a], &MIX[a..]]);
            assert_eq!(err, None, "split {a}");
            assert_eq!(ops, whole, "split {a}");
        }
        // And byte by byte.
        let chunks: Vec<&[u8]> = MIX.chunks(1).collect();
        let (ops, err) = run(&mut parser(), &chunks);
        assert_eq!((ops, err), (whole.clone(), None));
        // And at every pair of split points over a shorter stretch.
        let short = &MIX[..120];
        let (short_ops, _) = one(short);
        for a in 0..=short.len() {
            for b in a..=short.len() {
                let (ops, err) = run(&mut parser(), &[&short[..a], &short[a..b], &short[b..]]);
                assert_eq!(err, None);
                assert_eq!(ops, short_ops, "splits {a} {b}");
            }
        }
    }

    #[test]
    fn encode_roundtrip_client_ops() {
        let (whole, _) = one(MIX);
        let joined: Vec<u8> = whole.concat();
        let (again, err) = one(&joined);
        assert_eq!(err, None);
        assert_eq!(again, whole);
    }

    #[test]
    fn server_ops_parse_encode_and_split() {
        let mut wire = Vec::new();
        ServerOp::Info(b"{\"server_id\":\"x\"}").encode(&mut wire);
        ServerOp::Msg {
            subject: b"foo",
            sid: b"1",
            reply: None,
            payload: b"hi",
        }
        .encode(&mut wire);
        ServerOp::Msg {
            subject: b"foo",
            sid: b"1",
            reply: Some(b"r"),
            payload: b"",
        }
        .encode(&mut wire);
        ServerOp::HMsg {
            subject: b"foo",
            sid: b"9",
            reply: Some(b"_INBOX.1"),
            headers: b"NATS/1.0 503\r\n\r\n",
            payload: b"xyz",
        }
        .encode(&mut wire);
        ServerOp::Ping.encode(&mut wire);
        ServerOp::Pong.encode(&mut wire);
        ServerOp::Ok.encode(&mut wire);
        encode_err(&mut wire, "Stale Connection");
        assert!(wire.starts_with(b"INFO {\"server_id\":\"x\"} \r\nMSG foo 1 2\r\nhi\r\n"));
        assert!(wire.ends_with(b"PING\r\nPONG\r\n+OK\r\n-ERR 'Stale Connection'\r\n"));

        let collect = |chunks: &[&[u8]]| {
            let mut p = ServerOpParser::new(4096, 1 << 20);
            let mut out = Vec::new();
            for c in chunks {
                let mut off = 0;
                loop {
                    let (n, r) = p.next(&c[off..]);
                    off += n;
                    match r {
                        Some(Ok(op)) => {
                            let text = op.err_text().map(<[u8]>::to_vec);
                            let mut v = Vec::new();
                            op.encode(&mut v);
                            out.push((v, text));
                        }
                        Some(Err(e)) => panic!("{e}"),
                        None => break,
                    }
                }
            }
            out
        };
        let whole = collect(&[&wire]);
        assert_eq!(whole.len(), 8);
        assert_eq!(whole[7].1.as_deref(), Some(&b"Stale Connection"[..]));
        // INFO keeps its trailing space inside the JSON argument, so
        // re-encoding adds one more; compare the rest byte for byte.
        let rest: Vec<u8> = whole[1..].iter().flat_map(|(v, _)| v.clone()).collect();
        let info_len = b"INFO {\"server_id\":\"x\"} \r\n".len();
        assert_eq!(rest, wire[info_len..].to_vec());
        for a in 0..=wire.len() {
            assert_eq!(collect(&[&wire[..a], &wire[a..]]), whole, "split {a}");
        }
        // Client verbs are unknown to the server-op parser.
        let mut p = ServerOpParser::new(4096, 1024);
        let (_, r) = p.next(b"PUB foo 1\r\nx\r\n");
        assert_eq!(r.map(|r| r.map(|_| ())), Some(Err(ProtoError::UnknownOp)));
    }

    #[test]
    fn parse_size_like_nats() {
        assert_eq!(parse_size(b"0"), Some(0));
        assert_eq!(parse_size(b"999999999"), Some(999_999_999));
        assert_eq!(parse_size(b"1000000000"), None);
        assert_eq!(parse_size(b""), None);
        assert_eq!(parse_size(b"+1"), None);
        assert_eq!(parse_size(b"1a"), None);
    }
}
