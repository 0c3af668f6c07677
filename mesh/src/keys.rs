//! WireGuard key pairs (Curve25519), in the standard base64 form `wg` uses.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use x25519_dalek::{PublicKey, StaticSecret};

/// Decode a standard-base64 WireGuard public key.
pub fn decode_public(s: &str) -> Option<[u8; 32]> {
    STANDARD.decode(s).ok()?.try_into().ok()
}

/// Standard-base64 form of a public key, as `wg` prints it.
pub fn encode_public(key: &[u8; 32]) -> String {
    STANDARD.encode(key)
}

/// Decode a standard-base64 WireGuard private key.
pub fn decode_private(s: &str) -> Option<[u8; 32]> {
    decode_public(s)
}

pub struct WgKeyPair {
    secret: StaticSecret,
}

impl WgKeyPair {
    pub fn generate() -> Self {
        WgKeyPair {
            secret: StaticSecret::random_from_rng(rand::rngs::OsRng),
        }
    }

    pub fn from_secret_bytes(bytes: [u8; 32]) -> Self {
        WgKeyPair {
            secret: StaticSecret::from(bytes),
        }
    }

    pub fn secret_bytes(&self) -> [u8; 32] {
        self.secret.to_bytes()
    }

    pub fn static_secret(&self) -> &StaticSecret {
        &self.secret
    }

    pub fn public_bytes(&self) -> [u8; 32] {
        PublicKey::from(&self.secret).to_bytes()
    }

    pub fn public_base64(&self) -> String {
        STANDARD.encode(PublicKey::from(&self.secret).as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_key_matches_rfc7748_vector() {
        // RFC 7748 §6.1, Alice.
        let sk: [u8; 32] = [
            0x77, 0x07, 0x6d, 0x0a, 0x73, 0x18, 0xa5, 0x7d, 0x3c, 0x16, 0xc1, 0x72, 0x51, 0xb2,
            0x66, 0x45, 0xdf, 0x4c, 0x2f, 0x87, 0xeb, 0xc0, 0x99, 0x2a, 0xb1, 0x77, 0xfb, 0xa5,
            0x1d, 0xb9, 0x2c, 0x2a,
        ];
        let k = WgKeyPair::from_secret_bytes(sk);
        let pk = STANDARD.decode(k.public_base64()).unwrap();
        assert_eq!(
            pk[..4],
            [0x85, 0x20, 0xf0, 0x09],
            "first bytes of Alice's public key"
        );
    }
}
