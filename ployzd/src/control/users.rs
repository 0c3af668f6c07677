//! Who may do what on the NATS control plane (issue 17), as pure functions:
//! the users a machine's NATS server knows and their nats-server
//! permissions.
//!
//! * `ployz` ([`ADMIN_USER`]): ployzd's own connections (the bus), full
//!   rights. Handed out only by `nats url --admin` through the root socket.
//! * `operator` ([`OPERATOR_USER`]): `nats url`. Reads and watches every
//!   bucket NATS serves and uses every other subject, but never writes the
//!   cluster's buckets ([`ployz_api::CLUSTER_BUCKETS`]) nor touches
//!   `ployz.machine.>` or ployzd's own inbox.
//! * app users (`nats user add`): only what they were granted, plus
//!   `_INBOX.>` subscriptions and one response per request received.
//!
//! Passwords are derived from the network secret together with the NATS
//! credential key (`pki` bucket, [`ployz_api::NatsCredentialsRecord`]):
//! every machine computes the same ones, the store alone does not reveal
//! them, and `machine rm` rotating the credential key changes them all.

use ployz_api::{NatsUserRecord, CLUSTER_BUCKETS};
use ployz_nats_proto::{Permissions, ResponsePermission, SubjectPermission, User};
use std::sync::Arc;

pub const ADMIN_USER: &str = "ployz";
pub const OPERATOR_USER: &str = "operator";
/// Prefix of ployzd's own reply subjects: nobody else subscribes or
/// publishes there (replies to machine requests stay private).
pub const INTERNAL_INBOX: &str = "_PLOYZ_INBOX";
/// Machine-to-machine request subjects.
pub const MACHINE_SUBJECTS: &str = "ployz.machine.>";

/// What every NATS password derives from: the network secret and the
/// current NATS credential key (both base64url) and its generation.
#[derive(Clone, PartialEq, Eq)]
pub struct Keys {
    pub network_id: String,
    pub network_key: String,
    pub generation: u64,
    pub credential_key: String,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keys")
            .field("network_id", &self.network_id)
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

/// A password for `purpose`, derived from `keys`.
pub fn derive_password(keys: &Keys, purpose: &str) -> Option<String> {
    use hkdf::Hkdf;
    let mut ikm = ployz_api::invite::b64url_decode(&keys.network_key).ok()?;
    ikm.extend(ployz_api::invite::b64url_decode(&keys.credential_key).ok()?);
    let info = format!("{purpose}\0generation {}", keys.generation);
    let mut out = [0u8; 24];
    Hkdf::<sha2::Sha256>::new(Some(keys.network_id.as_bytes()), &ikm)
        .expand(info.as_bytes(), &mut out)
        .ok()?;
    Some(ployz_api::invite::b64url(&out))
}

/// The derivation purpose of each user's password.
pub fn purpose_admin() -> String {
    "ployz nats password v2".into()
}

pub fn purpose_operator() -> String {
    "ployz nats operator password v1".into()
}

pub fn purpose_app(rec: &NatsUserRecord) -> String {
    format!("ployz nats user v1\0{}\0{}", rec.name, rec.salt)
}

/// Publishes no user but ployzd's own may make.
fn protected_publish() -> Vec<String> {
    let mut deny = Vec::new();
    for b in CLUSTER_BUCKETS {
        deny.push(format!("$KV.{b}.>"));
        for verb in [
            "STREAM.CREATE",
            "STREAM.UPDATE",
            "STREAM.DELETE",
            "STREAM.PURGE",
            "STREAM.MSG.DELETE",
        ] {
            deny.push(format!("$JS.API.{verb}.KV_{b}"));
        }
    }
    deny.push(MACHINE_SUBJECTS.into());
    deny.push(format!("{INTERNAL_INBOX}.>"));
    deny
}

/// Subscriptions no user but ployzd's own may make.
fn protected_subscribe() -> Vec<String> {
    vec![MACHINE_SUBJECTS.into(), format!("{INTERNAL_INBOX}.>")]
}

/// The operator's permissions: everything but the protected subjects.
pub fn operator_permissions() -> Permissions {
    Permissions {
        publish: SubjectPermission {
            allow: Vec::new(),
            deny: protected_publish(),
        },
        subscribe: SubjectPermission {
            allow: Vec::new(),
            deny: protected_subscribe(),
        },
        responses: None,
    }
}

/// What a JetStream KV client (async-nats: get, put, create, update,
/// delete, keys, watch, history) publishes to for bucket `b`.
pub fn kv_publish_subjects(b: &str) -> Vec<String> {
    vec![
        format!("$KV.{b}.>"),
        format!("$JS.API.STREAM.INFO.KV_{b}"),
        format!("$JS.API.DIRECT.GET.KV_{b}"),
        format!("$JS.API.DIRECT.GET.KV_{b}.>"),
        format!("$JS.API.STREAM.MSG.GET.KV_{b}"),
        format!("$JS.API.CONSUMER.CREATE.KV_{b}"),
        format!("$JS.API.CONSUMER.CREATE.KV_{b}.>"),
        format!("$JS.API.CONSUMER.INFO.KV_{b}.>"),
        format!("$JS.API.CONSUMER.DELETE.KV_{b}.>"),
        format!("$JS.FC.KV_{b}.>"),
        format!("$JS.ACK.KV_{b}.>"),
    ]
}

/// An app user's permissions: its grants and nothing else (an empty grant
/// list allows nothing, unlike nats-server's missing block); replies come
/// on `_INBOX.>` and it may answer each request it received once.
pub fn app_permissions(rec: &NatsUserRecord) -> Permissions {
    let mut publish = rec.allow_pub.clone();
    for b in &rec.kv_buckets {
        publish.extend(kv_publish_subjects(b));
    }
    let mut pub_deny = protected_publish();
    if publish.is_empty() {
        pub_deny.push(">".into());
    }
    let mut subscribe = rec.allow_sub.clone();
    subscribe.push("_INBOX.>".into());
    Permissions {
        publish: SubjectPermission {
            allow: publish,
            deny: pub_deny,
        },
        subscribe: SubjectPermission {
            allow: subscribe,
            deny: protected_subscribe(),
        },
        responses: Some(ResponsePermission::default()),
    }
}

/// Every user of the network's NATS servers, given the keys and the app
/// user records.
pub fn all_users(keys: &Keys, apps: &[NatsUserRecord]) -> Vec<User> {
    let mut users = Vec::new();
    if let Some(pass) = derive_password(keys, &purpose_admin()) {
        users.push(User {
            user: ADMIN_USER.into(),
            pass,
            permissions: None,
        });
    }
    if let Some(pass) = derive_password(keys, &purpose_operator()) {
        users.push(User {
            user: OPERATOR_USER.into(),
            pass,
            permissions: Some(Arc::new(operator_permissions())),
        });
    }
    for rec in apps {
        if let Some(pass) = derive_password(keys, &purpose_app(rec)) {
            users.push(User {
                user: rec.name.clone(),
                pass,
                permissions: Some(Arc::new(app_permissions(rec))),
            });
        }
    }
    users
}

/// Checks a `nats user add` request: names, subjects, buckets.
pub fn check_user(rec: &NatsUserRecord) -> Result<(), String> {
    let n = &rec.name;
    if n.is_empty()
        || n.len() > 64
        || !n
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(format!(
            "`{n}` is not a NATS user name: use 1-64 letters, digits, `-` or `_`"
        ));
    }
    if n == ADMIN_USER || n == OPERATOR_USER {
        return Err(format!("`{n}` is ployzd's own user: choose another name"));
    }
    for s in rec.allow_pub.iter().chain(&rec.allow_sub) {
        if !ployz_nats_proto::subject::is_valid_filter(s) {
            return Err(format!(
                "`{s}` is not a NATS subject: use dot-separated tokens, `*` for one token, `>` at the end for the rest"
            ));
        }
    }
    for b in &rec.kv_buckets {
        if b.is_empty()
            || !b
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
        {
            return Err(format!(
                "`{b}` is not a KV bucket name: use letters, digits, `-` or `_`"
            ));
        }
        if CLUSTER_BUCKETS.contains(&b.as_str()) {
            return Err(format!(
                "`{b}` is one of the cluster's own buckets, which only ployzd writes: choose a bucket of the app's own"
            ));
        }
    }
    if rec.allow_pub.is_empty() && rec.allow_sub.is_empty() && rec.kv_buckets.is_empty() {
        return Err(
            "the user would be allowed nothing: give --allow-pub, --allow-sub or --kv-bucket"
                .into(),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(pubs: &[&str], subs: &[&str], kv: &[&str]) -> NatsUserRecord {
        NatsUserRecord {
            name: "app".into(),
            salt: "s".into(),
            allow_pub: pubs.iter().map(|s| s.to_string()).collect(),
            allow_sub: subs.iter().map(|s| s.to_string()).collect(),
            kv_buckets: kv.iter().map(|s| s.to_string()).collect(),
            created_at_ms: 0,
        }
    }

    #[test]
    fn the_operator_reads_everything_and_writes_no_cluster_bucket() {
        let p = operator_permissions();
        for b in CLUSTER_BUCKETS {
            assert!(!p.may_publish(&format!("$KV.{b}.key")), "{b}");
            assert!(!p.may_publish(&format!("$JS.API.STREAM.DELETE.KV_{b}")));
            assert!(!p.may_publish(&format!("$JS.API.STREAM.PURGE.KV_{b}")));
            assert!(p.may_publish(&format!("$JS.API.STREAM.INFO.KV_{b}")));
            assert!(p.may_publish(&format!("$JS.API.DIRECT.GET.KV_{b}.$KV.{b}.x")));
            assert!(p.may_publish(&format!("$JS.API.CONSUMER.CREATE.KV_{b}.c.$KV.{b}.>")));
        }
        assert!(p.may_publish("$KV.app.key"));
        assert!(p.may_publish("$JS.API.STREAM.CREATE.KV_app"));
        assert!(p.may_publish("anything.else"));
        assert!(!p.may_publish("ployz.machine.abc.rpc"));
        assert!(!p.may_subscribe("ployz.machine.abc.rpc"));
        assert!(!p.may_subscribe("_PLOYZ_INBOX.x.y"));
        assert!(!p.may_publish("_PLOYZ_INBOX.x.y"));
        // `>` is allowed, and filtered on delivery.
        assert!(p.may_subscribe(">"));
        assert!(!p.may_receive("ployz.machine.abc.rpc"));
        assert!(p.may_receive("_INBOX.abc"));
    }

    #[test]
    fn app_users_get_their_grants_and_nothing_more() {
        let p = app_permissions(&rec(&["app.>"], &["app.>"], &[]));
        assert!(p.may_publish("app.echo"));
        assert!(!p.may_publish("ployz.x"));
        assert!(!p.may_publish("$KV.cache.k"));
        assert!(p.may_subscribe("app.echo"));
        assert!(p.may_subscribe("_INBOX.abc.*"));
        assert!(!p.may_subscribe("ployz.>"));
        assert!(!p.may_subscribe(">"));
        // Even a `>` grant never reaches the protected subjects.
        let p = app_permissions(&rec(&[">"], &[">"], &[]));
        assert!(p.may_publish("app.x"));
        assert!(!p.may_publish("$KV.machines.m1"));
        assert!(!p.may_publish("ployz.machine.m1.rpc"));
        assert!(!p.may_subscribe("_PLOYZ_INBOX.>"));
        // Only a KV bucket: its API, no other bucket, no plain subjects.
        let p = app_permissions(&rec(&[], &[], &["cache"]));
        assert!(p.may_publish("$KV.cache.k"));
        assert!(p.may_publish("$JS.API.STREAM.INFO.KV_cache"));
        assert!(p.may_publish("$JS.API.DIRECT.GET.KV_cache.$KV.cache.k"));
        assert!(p.may_publish("$JS.API.CONSUMER.CREATE.KV_cache.c1.$KV.cache.>"));
        assert!(!p.may_publish("$JS.API.STREAM.DELETE.KV_cache"));
        assert!(!p.may_publish("$JS.API.STREAM.INFO.KV_machines"));
        assert!(!p.may_publish("$KV.other.k"));
        assert!(!p.may_publish("app.x"));
        assert!(!p.may_subscribe("app.x"));
        // No grant: nothing.
        let p = app_permissions(&rec(&[], &["app.>"], &[]));
        assert!(!p.may_publish("app.x"));
    }

    #[test]
    fn bad_users_are_refused_with_what_to_do() {
        assert!(check_user(&rec(&["app.>"], &[], &[])).is_ok());
        let mut r = rec(&["app.>"], &[], &[]);
        r.name = "operator".into();
        assert!(check_user(&r).unwrap_err().contains("choose another"));
        r.name = "bad name".into();
        assert!(check_user(&r).unwrap_err().contains("not a NATS user name"));
        let e = check_user(&rec(&[], &[], &["machines"])).unwrap_err();
        assert!(e.contains("cluster's own"), "{e}");
        let e = check_user(&rec(&["a..b"], &[], &[])).unwrap_err();
        assert!(e.contains("not a NATS subject"), "{e}");
        let e = check_user(&rec(&[], &[], &[])).unwrap_err();
        assert!(e.contains("allowed nothing"), "{e}");
    }

    #[test]
    fn passwords_differ_per_user_salt_and_credential_generation() {
        let keys = Keys {
            network_id: "net".into(),
            network_key: ployz_api::invite::b64url(&[7u8; 32]),
            generation: 1,
            credential_key: ployz_api::invite::b64url(&[9u8; 32]),
        };
        let rotated = Keys {
            generation: 2,
            credential_key: ployz_api::invite::b64url(&[5u8; 32]),
            ..keys.clone()
        };
        let a = derive_password(&keys, &purpose_admin()).unwrap();
        let o = derive_password(&keys, &purpose_operator()).unwrap();
        let r1 = rec(&["x"], &[], &[]);
        let mut r2 = r1.clone();
        r2.salt = "t".into();
        let p1 = derive_password(&keys, &purpose_app(&r1)).unwrap();
        let p2 = derive_password(&keys, &purpose_app(&r2)).unwrap();
        let a2 = derive_password(&rotated, &purpose_admin()).unwrap();
        let o2 = derive_password(&rotated, &purpose_operator()).unwrap();
        let p12 = derive_password(&rotated, &purpose_app(&r1)).unwrap();
        let all = [&a, &o, &p1, &p2, &a2, &o2, &p12];
        for (i, x) in all.iter().enumerate() {
            for y in &all[i + 1..] {
                assert_ne!(x, y);
            }
        }
    }
}
