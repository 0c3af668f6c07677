//! A WebSocket echo server for the gateway test: `ws-echo PORT` accepts
//! WebSocket handshakes (tungstenite) and sends every text or binary
//! message back. Built static (musl) with the tests and copied into a
//! busybox image.

use std::net::TcpListener;
use tungstenite::Message;

fn main() {
    let port = std::env::args().nth(1).unwrap_or_else(|| "7000".into());
    let listener = TcpListener::bind(format!("0.0.0.0:{port}")).expect("bind the port");
    for stream in listener.incoming().flatten() {
        std::thread::spawn(move || {
            let Ok(mut ws) = tungstenite::accept(stream) else {
                return;
            };
            while let Ok(m) = ws.read() {
                let echo = match m {
                    Message::Text(_) | Message::Binary(_) => m,
                    Message::Close(_) => break,
                    _ => continue,
                };
                if ws.send(echo).is_err() {
                    break;
                }
            }
        });
    }
}
