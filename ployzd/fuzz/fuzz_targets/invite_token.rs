//! Invite tokens, as `invite import` and the issuer's join handler read them.
//! Arbitrary text never panics; a token signed over arbitrary claims bytes
//! decodes to exactly what was signed, and any change to a valid token's
//! signature part is refused.
#![no_main]

use ed25519_dalek::{Signer, SigningKey};
use libfuzzer_sys::fuzz_target;
use ployz_api::invite::{b64url, decode, TokenError};

fuzz_target!(|data: &[u8]| {
    // 1. Whatever a user pastes.
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = decode(s);
    }
    // 2. Claims bytes chosen by the fuzzer, signed by the key they name.
    let key = SigningKey::from_bytes(&[7u8; 32]);
    let issuer_key = b64url(key.verifying_key().as_bytes());
    let mut claims: serde_json::Value = match serde_json::from_slice(data) {
        Ok(v) => v,
        Err(_) => return,
    };
    if let Some(obj) = claims.as_object_mut() {
        obj.insert("issuer_key".into(), serde_json::Value::String(issuer_key));
    }
    let body = b64url(&serde_json::to_vec(&claims).unwrap());
    let sig = key.sign(body.as_bytes());
    let token = format!("{body}.{}", b64url(&sig.to_bytes()));
    match decode(&token) {
        Ok(c) => {
            // What decodes is what was signed.
            let back = serde_json::to_value(&c).unwrap();
            assert_eq!(
                serde_json::from_value::<ployz_api::invite::InviteClaims>(claims).ok(),
                serde_json::from_value(back).ok()
            );
            // Flipping a bit of the signature is always refused.
            let mut bad = sig.to_bytes();
            bad[usize::from(data[0]) % 64] ^= 1;
            let forged = format!("{body}.{}", b64url(&bad));
            assert_eq!(decode(&forged), Err(TokenError::BadSignature));
        }
        Err(TokenError::BadSignature) => panic!("a correctly signed token was refused"),
        Err(_) => {}
    }
});
