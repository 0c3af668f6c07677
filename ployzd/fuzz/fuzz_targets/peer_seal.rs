//! Sealed peer frames, as the peer port reads them: a join frame
//! (32-byte ephemeral key, then ciphertext) opened by the issuer, and
//! session frames opened in order. Nothing panics, no forged frame opens,
//! and sealed frames open to what was sealed, in order only.
#![no_main]

#[allow(dead_code)]
#[path = "../../src/peer/seal.rs"]
mod seal;

use libfuzzer_sys::fuzz_target;
use seal::{session_keys, JoinClient, JoinServer, SealError, Sealer};
use x25519_dalek::{PublicKey, StaticSecret};

fuzz_target!(|data: &[u8]| {
    let issuer = StaticSecret::from([9u8; 32]);
    // 1. A join frame from the network: only sealed-to-us frames open, and
    //    the fuzzer cannot seal to us without the ephemeral secret.
    if data.len() >= 32 {
        let eph: [u8; 32] = data[..32].try_into().unwrap();
        let mut server = JoinServer::new(&issuer, eph);
        assert!(server.open_request(&data[32..]).is_err());
    }
    // 2. Session frames: fuzzer bytes as plaintexts, split by 0xff.
    let (c2s, _) = session_keys(&[3u8; 32], b"client-nonce", b"server-nonce", "rpc");
    let mut tx = Sealer::new(c2s);
    let mut rx = Sealer::new(c2s);
    let frames: Vec<&[u8]> = data.split(|b| *b == 0xff).collect();
    let sealed: Vec<Vec<u8>> = frames.iter().map(|f| tx.seal(f).unwrap()).collect();
    for (plain, ct) in frames.iter().zip(&sealed) {
        assert_eq!(&rx.open(ct).unwrap(), plain);
    }
    // Replaying the first frame into the same connection never opens.
    if let Some(first) = sealed.first() {
        assert_eq!(rx.open(first), Err(SealError::Open));
    }
    // A bit flipped anywhere in a frame never opens.
    if let Some(ct) = sealed.first() {
        let mut bad = ct.clone();
        let i = usize::from(data.first().copied().unwrap_or(0)) % bad.len();
        bad[i] ^= 0x80;
        let mut fresh = Sealer::new(c2s);
        assert_eq!(fresh.open(&bad), Err(SealError::Open));
    }
    // 3. A real join round trip carries the fuzzer's bytes both ways.
    let mut client = JoinClient::new(PublicKey::from(&issuer).to_bytes());
    let req = client.seal_request(data).unwrap();
    let mut server = JoinServer::new(&issuer, client.eph_pub);
    assert_eq!(server.open_request(&req).unwrap(), data);
    let resp = server.seal_response(data).unwrap();
    assert_eq!(client.open_response(&resp).unwrap(), data);
});
