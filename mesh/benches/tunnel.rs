//! Data-path cost of the WireGuard protocol core we use (boringtun `Tunn`):
//! encapsulate + decapsulate of a 1420-byte IPv4 packet between a
//! handshaken pair, and a full round trip through two UDP sockets on
//! loopback (encrypt, send, receive, decrypt, and back); and of our TUN
//! offload arithmetic: cutting a 64 KB TCP super-packet into MSS-size
//! segments (checksums included) and coalescing them back (GRO).
//!
//! `cargo bench -p ployz-mesh --bench tunnel`

use std::hint::black_box;
use std::net::UdpSocket;

use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ployz_mesh::wg::offload::{tcp_segment, Gro, VnetHdr, GSO_TCPV4};

const MTU: usize = 1420;
const BUF: usize = 2048;

fn ipv4_packet(len: usize) -> Vec<u8> {
    let mut p = vec![0u8; len];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&[10, 234, 1, 1]);
    p[16..20].copy_from_slice(&[10, 234, 2, 1]);
    p
}

/// Two tunnels with a completed handshake.
fn pair() -> (Tunn, Tunn) {
    let ka = StaticSecret::random_from_rng(rand::rngs::OsRng);
    let kb = StaticSecret::random_from_rng(rand::rngs::OsRng);
    let (pa, pb) = (PublicKey::from(&ka), PublicKey::from(&kb));
    let mut a = Tunn::new(ka, pb, None, None, 1, None);
    let mut b = Tunn::new(kb, pa, None, None, 2, None);
    let (mut x, mut y) = (vec![0u8; BUF], vec![0u8; BUF]);
    let init = match a.format_handshake_initiation(&mut x, false) {
        TunnResult::WriteToNetwork(p) => p.to_vec(),
        other => panic!("handshake init: {other:?}"),
    };
    let resp = match b.decapsulate(None, &init, &mut y) {
        TunnResult::WriteToNetwork(p) => p.to_vec(),
        other => panic!("handshake response: {other:?}"),
    };
    let keepalive = match a.decapsulate(None, &resp, &mut x) {
        TunnResult::WriteToNetwork(p) => p.to_vec(),
        other => panic!("keepalive: {other:?}"),
    };
    assert!(matches!(
        b.decapsulate(None, &keepalive, &mut y),
        TunnResult::Done
    ));
    (a, b)
}

fn seal(t: &mut Tunn, pkt: &[u8], buf: &mut [u8]) -> usize {
    match t.encapsulate(pkt, buf) {
        TunnResult::WriteToNetwork(p) => p.len(),
        other => panic!("encapsulate: {other:?}"),
    }
}

fn open(t: &mut Tunn, wire: &[u8], buf: &mut [u8]) -> usize {
    match t.decapsulate(None, wire, buf) {
        TunnResult::WriteToTunnelV4(p, _) => p.len(),
        other => panic!("decapsulate: {other:?}"),
    }
}

fn encap_decap(c: &mut Criterion) {
    let (mut a, mut b) = pair();
    let pkt = ipv4_packet(MTU);
    let (mut wire, mut plain) = (vec![0u8; BUF], vec![0u8; BUF]);
    let mut g = c.benchmark_group("tunn");
    g.throughput(Throughput::Bytes(MTU as u64));
    g.bench_function("encapsulate+decapsulate 1420B", |bench| {
        bench.iter(|| {
            let n = seal(&mut a, black_box(&pkt), &mut wire);
            black_box(open(&mut b, &wire[..n], &mut plain))
        })
    });
    g.finish();
}

fn udp_round_trip(c: &mut Criterion) {
    let (mut a, mut b) = pair();
    let sa = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let sb = UdpSocket::bind("127.0.0.1:0").expect("bind");
    sa.connect(sb.local_addr().expect("addr")).expect("connect");
    sb.connect(sa.local_addr().expect("addr")).expect("connect");
    let pkt = ipv4_packet(MTU);
    let (mut wire, mut plain, mut rx) = (vec![0u8; BUF], vec![0u8; BUF], vec![0u8; BUF]);
    let mut g = c.benchmark_group("tunnel");
    g.bench_function("round trip 1420B over loopback UDP", |bench| {
        bench.iter(|| {
            let n = seal(&mut a, &pkt, &mut wire);
            sa.send(&wire[..n]).expect("send");
            let n = sb.recv(&mut rx).expect("recv");
            let m = open(&mut b, &rx[..n], &mut plain);
            let n = seal(&mut b, &plain[..m], &mut wire);
            sb.send(&wire[..n]).expect("send");
            let n = sa.recv(&mut rx).expect("recv");
            black_box(open(&mut a, &rx[..n], &mut plain))
        })
    });
    g.finish();
}

/// A 64 000-byte-payload IPv4 TCP super-packet as the TUN hands it over.
fn super_packet() -> Vec<u8> {
    let payload = 64_000;
    let mut p = ipv4_packet(20 + 32 + payload);
    p[9] = 6;
    p[20 + 12] = 8 << 4; // 32-byte TCP header (timestamps)
    p[20 + 13] = 0x18; // ACK | PSH
    for (i, b) in p[52..].iter_mut().enumerate() {
        *b = i as u8;
    }
    p
}

fn offload(c: &mut Criterion) {
    const MSS: usize = 1368;
    let sup = super_packet();
    let hdr = VnetHdr {
        gso_type: GSO_TCPV4,
        gso_size: MSS as u16,
        ..VnetHdr::default()
    };
    let mut scratch = vec![0u8; 65_536];
    let mut g = c.benchmark_group("offload");
    g.throughput(Throughput::Bytes(sup.len() as u64));
    g.bench_function("segment 64KB TCP super-packet", |bench| {
        bench.iter(|| {
            let mut n = 0;
            tcp_segment(&hdr, black_box(&sup), &mut scratch, |s| n += s.len()).expect("segment");
            black_box(n)
        })
    });
    // The segments back to back, as decrypted into the receive arena.
    let mut arena = Vec::new();
    let mut at = Vec::new();
    tcp_segment(&hdr, &sup, &mut scratch, |s| {
        at.push((arena.len(), s.len()));
        arena.extend_from_slice(s);
    })
    .expect("segment");
    let pristine = arena.clone();
    let mut gro = Gro::default();
    g.bench_function("coalesce 47 segments (GRO)", |bench| {
        bench.iter(|| {
            arena.copy_from_slice(&pristine);
            for &(s, l) in &at {
                gro.push(&arena, s, l);
            }
            let mut n = 0;
            gro.flush(&mut arena, |iov| n += iov.len());
            black_box(n)
        })
    });
    g.finish();
}

criterion_group!(benches, encap_decap, udp_round_trip, offload);
criterion_main!(benches);
