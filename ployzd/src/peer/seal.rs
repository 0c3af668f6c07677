//! Cryptography of the peer channel, free of IO.
//!
//! * **Join** (before a machine has any cluster secret): the joiner encrypts
//!   its request to the issuer's WireGuard (X25519) public key, pinned by the
//!   signed invite token, with a fresh ephemeral key; the issuer answers
//!   under the same shared secret. Only the machine holding that private key
//!   can read the token or produce an answer the joiner accepts.
//! * **Cluster sessions** (raft, rpc): both sides hold the network's 32-byte
//!   cluster key. Each connection derives fresh directional keys from it and
//!   two random nonces (one per side), and numbers its frames; a recorded
//!   frame cannot be replayed into another connection or out of order.
//!
//! ChaCha20-Poly1305 with HKDF-SHA256 throughout.

use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use hkdf::Hkdf;
use sha2::Sha256;
use x25519_dalek::{PublicKey, StaticSecret};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SealError {
    #[error("decryption failed: the peer does not hold the expected key, or the data was altered")]
    Open,
    #[error("frame counter exhausted; reconnect")]
    Exhausted,
    #[error("malformed sealed message")]
    Malformed,
}

fn derive(ikm: &[u8], salt: &[u8], info: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    Hkdf::<Sha256>::new(Some(salt), ikm)
        .expand(info, &mut out)
        .expect("32 bytes is a valid HKDF length");
    out
}

/// One direction of an encrypted, numbered frame stream.
pub struct Sealer {
    aead: ChaCha20Poly1305,
    counter: u64,
}

impl Sealer {
    pub fn new(key: [u8; 32]) -> Sealer {
        Sealer {
            aead: ChaCha20Poly1305::new(Key::from_slice(&key)),
            counter: 0,
        }
    }

    fn nonce(&mut self) -> Result<Nonce, SealError> {
        if self.counter == u64::MAX {
            return Err(SealError::Exhausted);
        }
        let mut n = [0u8; 12];
        n[4..].copy_from_slice(&self.counter.to_be_bytes());
        self.counter += 1;
        Ok(*Nonce::from_slice(&n))
    }

    pub fn seal(&mut self, plaintext: &[u8]) -> Result<Vec<u8>, SealError> {
        let nonce = self.nonce()?;
        self.aead
            .encrypt(&nonce, plaintext)
            .map_err(|_| SealError::Malformed)
    }

    /// Open the next frame; frames must arrive in order.
    pub fn open(&mut self, ciphertext: &[u8]) -> Result<Vec<u8>, SealError> {
        let nonce = self.nonce()?;
        self.aead
            .decrypt(&nonce, ciphertext)
            .map_err(|_| SealError::Open)
    }
}

/// Directional keys of a cluster session.
pub fn session_keys(
    cluster_key: &[u8; 32],
    client_nonce: &[u8],
    server_nonce: &[u8],
    service: &str,
) -> ([u8; 32], [u8; 32]) {
    let mut salt = Vec::with_capacity(client_nonce.len() + server_nonce.len());
    salt.extend_from_slice(client_nonce);
    salt.extend_from_slice(server_nonce);
    let c2s = derive(
        cluster_key,
        &salt,
        format!("ployz peer v1 {service} c2s").as_bytes(),
    );
    let s2c = derive(
        cluster_key,
        &salt,
        format!("ployz peer v1 {service} s2c").as_bytes(),
    );
    (c2s, s2c)
}

/// Sealed-box keys for a join: (request key, response key).
fn join_keys(shared: &[u8; 32], eph_pub: &[u8; 32], recipient: &[u8; 32]) -> ([u8; 32], [u8; 32]) {
    let mut salt = [0u8; 64];
    salt[..32].copy_from_slice(eph_pub);
    salt[32..].copy_from_slice(recipient);
    (
        derive(shared, &salt, b"ployz join v1 request"),
        derive(shared, &salt, b"ployz join v1 response"),
    )
}

/// The joiner's side of a join exchange.
pub struct JoinClient {
    pub eph_pub: [u8; 32],
    request: Sealer,
    response: Sealer,
}

impl JoinClient {
    /// Start a join to the machine whose WireGuard public key is `recipient`.
    pub fn new(recipient: [u8; 32]) -> JoinClient {
        let eph = StaticSecret::random_from_rng(rand::rngs::OsRng);
        let eph_pub = PublicKey::from(&eph).to_bytes();
        let shared = eph.diffie_hellman(&PublicKey::from(recipient)).to_bytes();
        let (req, resp) = join_keys(&shared, &eph_pub, &recipient);
        JoinClient {
            eph_pub,
            request: Sealer::new(req),
            response: Sealer::new(resp),
        }
    }

    pub fn seal_request(&mut self, plaintext: &[u8]) -> Result<Vec<u8>, SealError> {
        self.request.seal(plaintext)
    }

    pub fn open_response(&mut self, ciphertext: &[u8]) -> Result<Vec<u8>, SealError> {
        self.response.open(ciphertext)
    }
}

/// The issuer's side of a join exchange.
pub struct JoinServer {
    request: Sealer,
    response: Sealer,
}

impl JoinServer {
    pub fn new(our_secret: &StaticSecret, eph_pub: [u8; 32]) -> JoinServer {
        let ours = PublicKey::from(our_secret).to_bytes();
        let shared = our_secret
            .diffie_hellman(&PublicKey::from(eph_pub))
            .to_bytes();
        let (req, resp) = join_keys(&shared, &eph_pub, &ours);
        JoinServer {
            request: Sealer::new(req),
            response: Sealer::new(resp),
        }
    }

    pub fn open_request(&mut self, ciphertext: &[u8]) -> Result<Vec<u8>, SealError> {
        self.request.open(ciphertext)
    }

    pub fn seal_response(&mut self, plaintext: &[u8]) -> Result<Vec<u8>, SealError> {
        self.response.seal(plaintext)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_round_trip_and_order() {
        let key = [7u8; 32];
        let (c2s, _) = session_keys(&key, b"client", b"server", "rpc");
        let mut tx = Sealer::new(c2s);
        let mut rx = Sealer::new(c2s);
        let a = tx.seal(b"one").unwrap();
        let b = tx.seal(b"two").unwrap();
        // Out of order (a replayed or dropped frame) fails.
        assert_eq!(rx.open(&b), Err(SealError::Open));
        let mut rx = Sealer::new(c2s);
        assert_eq!(rx.open(&a).unwrap(), b"one");
        assert_eq!(rx.open(&b).unwrap(), b"two");
        // Replaying a frame fails.
        assert_eq!(rx.open(&a), Err(SealError::Open));
    }

    #[test]
    fn sessions_differ_per_nonce_service_and_key() {
        let k = [1u8; 32];
        let base = session_keys(&k, b"a", b"b", "rpc");
        assert_ne!(base, session_keys(&k, b"a", b"c", "rpc"));
        assert_ne!(base, session_keys(&k, b"a", b"b", "raft"));
        assert_ne!(base, session_keys(&[2u8; 32], b"a", b"b", "rpc"));
        assert_ne!(base.0, base.1);
    }

    #[test]
    fn join_only_the_recipient_can_open() {
        let issuer = StaticSecret::from([9u8; 32]);
        let issuer_pub = PublicKey::from(&issuer).to_bytes();
        let mut client = JoinClient::new(issuer_pub);
        let sealed = client.seal_request(b"token").unwrap();

        let impostor = StaticSecret::from([8u8; 32]);
        let mut wrong = JoinServer::new(&impostor, client.eph_pub);
        assert_eq!(wrong.open_request(&sealed), Err(SealError::Open));

        let mut server = JoinServer::new(&issuer, client.eph_pub);
        assert_eq!(server.open_request(&sealed).unwrap(), b"token");
        let reply = server.seal_response(b"welcome").unwrap();
        assert_eq!(client.open_response(&reply).unwrap(), b"welcome");
        // An impostor's answer is refused by the client.
        let mut fake = JoinServer::new(&impostor, client.eph_pub);
        let forged = fake.seal_response(b"welcome").unwrap();
        let mut client2 = JoinClient::new(issuer_pub);
        assert!(client2.open_response(&forged).is_err());
    }
}
