//! Invite tokens: `base64url(json claims) "." base64url(ed25519 signature)`.
//!
//! The issuing machine signs the claims with its identity key. A joiner
//! learns from the token where to reach the issuer and which key to expect
//! there; the issuer accepts a token only if the signature verifies with the
//! key of a machine of its network and the invite record in the replicated
//! store is still active. Tokens carry a random nonce whose hash is stored, so
//! a token cannot be forged from the store's contents.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};

/// Current claims format version.
pub const TOKEN_VERSION: u8 = 1;
/// Tokens longer than this are refused before any decoding.
pub const MAX_TOKEN_LEN: usize = 8192;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct InviteClaims {
    pub v: u8,
    pub invite_id: String,
    pub network_id: String,
    pub network_name: String,
    pub issuer_id: String,
    /// The issuer's Ed25519 identity key, base64url.
    pub issuer_key: String,
    pub expires_at_ms: u64,
    /// Random, base64url; the store keeps only its SHA-256.
    pub nonce: String,
    /// Underlay `ip:port` candidates of the issuer, best first.
    pub issuer_endpoints: Vec<String>,
    pub issuer_overlay_ip: String,
    pub issuer_wg_public_key: String,
    /// Where the joiner reaches the issuer's ployzd for the join handshake.
    pub issuer_peer_addrs: Vec<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("the invite token is truncated or corrupt ({0}): copy the whole token printed by `ployzctl machine invite create`, on one line")]
    Malformed(String),
    #[error("the invite token's signature does not verify: it was altered or not issued by this network")]
    BadSignature,
    #[error(
        "the invite token uses format version {0}, this ployzd understands version {TOKEN_VERSION}"
    )]
    UnsupportedVersion(u8),
}

pub fn b64url(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

pub fn b64url_decode(s: &str) -> Result<Vec<u8>, base64::DecodeError> {
    URL_SAFE_NO_PAD.decode(s)
}

/// Sign `claims` with `key` and return the token.
pub fn encode(claims: &InviteClaims, key: &SigningKey) -> String {
    let body = b64url(&serde_json::to_vec(claims).expect("claims serialise"));
    let sig = key.sign(body.as_bytes());
    format!("{body}.{}", b64url(&sig.to_bytes()))
}

/// Parse a token and check its signature against the key it names.
/// Expiry, network and issuer pinning are the caller's checks.
pub fn decode(token: &str) -> Result<InviteClaims, TokenError> {
    let token = token.trim();
    if token.len() > MAX_TOKEN_LEN {
        return Err(TokenError::Malformed(format!(
            "{} bytes, longer than any token",
            token.len()
        )));
    }
    let (body, sig) = token
        .split_once('.')
        .ok_or_else(|| TokenError::Malformed("it has no '.' between its two parts".into()))?;
    let claims_bytes = b64url_decode(body)
        .map_err(|_| TokenError::Malformed("its first part is not base64url".into()))?;
    let claims: InviteClaims = serde_json::from_slice(&claims_bytes)
        .map_err(|_| TokenError::Malformed("its first part does not hold invite claims".into()))?;
    if claims.v != TOKEN_VERSION {
        return Err(TokenError::UnsupportedVersion(claims.v));
    }
    // A whole signature is 64 bytes: 86 base64url characters.
    let sig = b64url_decode(sig)
        .ok()
        .and_then(|b| Signature::from_slice(&b).ok())
        .ok_or_else(|| {
            TokenError::Malformed(format!(
                "its signature is {} characters long, a whole one has 86",
                sig.len()
            ))
        })?;
    let key = verifying_key(&claims.issuer_key).ok_or(TokenError::BadSignature)?;
    key.verify(body.as_bytes(), &sig)
        .map_err(|_| TokenError::BadSignature)?;
    Ok(claims)
}

/// Parse a base64url Ed25519 public key.
pub fn verifying_key(s: &str) -> Option<VerifyingKey> {
    let bytes: [u8; 32] = b64url_decode(s).ok()?.try_into().ok()?;
    VerifyingKey::from_bytes(&bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(key: &SigningKey) -> InviteClaims {
        InviteClaims {
            v: TOKEN_VERSION,
            invite_id: "inv-1".into(),
            network_id: "net-1".into(),
            network_name: "demo".into(),
            issuer_id: "m1".into(),
            issuer_key: b64url(key.verifying_key().as_bytes()),
            expires_at_ms: 1234,
            nonce: "n".into(),
            issuer_endpoints: vec!["192.0.2.1:51820".into()],
            issuer_overlay_ip: "10.101.1.1".into(),
            issuer_wg_public_key: "wg".into(),
            issuer_peer_addrs: vec!["192.0.2.1:7101".into()],
        }
    }

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    #[test]
    fn round_trip() {
        let k = key(1);
        let c = claims(&k);
        assert_eq!(decode(&encode(&c, &k)).unwrap(), c);
    }

    #[test]
    fn tampered_claims_fail() {
        let k = key(1);
        let token = encode(&claims(&k), &k);
        let (body, sig) = token.split_once('.').unwrap();
        let mut c: InviteClaims = serde_json::from_slice(&b64url_decode(body).unwrap()).unwrap();
        c.expires_at_ms = u64::MAX;
        let forged = format!("{}.{sig}", b64url(&serde_json::to_vec(&c).unwrap()));
        assert_eq!(decode(&forged), Err(TokenError::BadSignature));
    }

    #[test]
    fn signed_by_other_key_fails() {
        let k = key(1);
        let c = claims(&k);
        // Claims name key 1 but key 2 signs.
        assert_eq!(decode(&encode(&c, &key(2))), Err(TokenError::BadSignature));
    }

    #[test]
    fn truncated_tokens_say_so() {
        let k = key(1);
        let token = encode(&claims(&k), &k);
        for cut in [1, 2, 40, token.len() - token.find('.').unwrap()] {
            let e = decode(&token[..token.len() - cut]).unwrap_err().to_string();
            assert!(e.contains("truncated or corrupt"), "{cut}: {e}");
            assert!(e.contains("copy the whole token"), "{cut}: {e}");
            assert!(!e.contains("Invalid"), "no library wording: {e}");
        }
        let e = decode(&token[..token.len() - 1]).unwrap_err().to_string();
        assert!(e.contains("85 characters long, a whole one has 86"), "{e}");
        let e = decode(&token[..20]).unwrap_err().to_string();
        assert!(e.contains("no '.'"), "{e}");
    }

    #[test]
    fn garbage_is_malformed() {
        assert!(matches!(decode("nodot"), Err(TokenError::Malformed(_))));
        assert!(matches!(decode("!!.!!"), Err(TokenError::Malformed(_))));
        assert!(matches!(
            decode(&"a".repeat(MAX_TOKEN_LEN + 1)),
            Err(TokenError::Malformed(_))
        ));
    }
}
