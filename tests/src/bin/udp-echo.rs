//! A UDP echo server for the published-port tests (busybox has none):
//! `udp-echo PORT` answers every datagram with `echo: ` and its bytes.
//! Built static (musl) with the tests and copied into a busybox image.

fn main() {
    let port = std::env::args().nth(1).unwrap_or_else(|| "5000".into());
    let sock = std::net::UdpSocket::bind(format!("0.0.0.0:{port}")).expect("bind the UDP port");
    let mut buf = [0u8; 2048];
    loop {
        let Ok((n, peer)) = sock.recv_from(&mut buf) else {
            continue;
        };
        let mut reply = b"echo: ".to_vec();
        reply.extend_from_slice(&buf[..n]);
        let _ = sock.send_to(&reply, peer);
    }
}
