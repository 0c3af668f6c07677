//! Who may do what on the NATS control plane (issue 17), as standard
//! clients (async-nats) see it against a real ployzd: the operator user of
//! `nats url` reads the cluster's buckets but cannot write them; app users
//! of `nats user add` get exactly their grants, lose their connections on
//! `nats user rm`; a workload deployed with `--nats-user` reaches NATS with
//! its `NATS_URL`, one without credentials is refused.

use futures::StreamExt;
use ployz_tests::images::busybox_image;
use ployz_tests::netns::Testbed;
use ployz_tests::{eventually, stdout, Machine};
use serde_json::Value;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Server errors and events an async-nats client saw.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<String>>>);

impl Seen {
    fn has(&self, needle: &str) -> bool {
        self.0.lock().unwrap().iter().any(|e| e.contains(needle))
    }

    async fn wait_for(&self, needle: &str, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        while tokio::time::Instant::now() < deadline {
            if self.has(needle) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    fn all(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
}

/// Connects as `user` to a TLS listener (`--nats-listen`), trusting `ca`.
async fn connect(user: &str, password: &str, server: &str, ca: &str) -> (async_nats::Client, Seen) {
    let seen = Seen::default();
    let s = seen.clone();
    let client = async_nats::ConnectOptions::with_user_and_password(user.into(), password.into())
        .tls_client_config(ployz_tests::tls_trusting(ca))
        .request_timeout(Some(Duration::from_secs(2)))
        .max_reconnects(Some(3))
        .event_callback(move |e| {
            let s = s.clone();
            async move {
                let text = match e {
                    async_nats::Event::ServerError(async_nats::ServerError::Other(t)) => t,
                    other => other.to_string(),
                };
                s.0.lock().unwrap().push(text);
            }
        })
        .connect(server)
        .await
        .unwrap_or_else(|e| panic!("{user} connects to {server}: {e}"));
    (client, seen)
}

fn user_add(m: &Machine, args: &[&str]) -> Value {
    let mut all = vec!["nats", "user", "add"];
    all.extend_from_slice(args);
    m.ctl_json(&all)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_and_app_users_get_only_their_permissions() {
    let tb = Testbed::new(1);
    let ip = tb.hosts[0].ip.to_string();
    let m = Machine::start_in(&tb.hosts[0], &["--nats-listen", &ip]);
    m.ctl_json(&["mesh", "init", "natsperms"]);
    let server = format!("{ip}:4222");
    let id = m.id();

    // --- TLS on the --nats-listen address, verified with the network CA ---
    let op = m.nats_info();
    assert_eq!(op["user"], "operator", "{op}");
    let url = op["url"].as_str().unwrap();
    assert!(
        url.starts_with("tls://operator:") && url.ends_with(&format!("@{server}")),
        "{url}"
    );
    let ca = op["ca_pem"].as_str().expect("ca_pem").to_string();
    assert!(ca.starts_with("-----BEGIN CERTIFICATE-----"), "{ca}");
    // A plaintext client is refused there: INFO asks for TLS, a CONNECT in
    // clear gets no PONG and the connection is dropped.
    {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
        let tcp = tokio::net::TcpStream::connect(&server).await.unwrap();
        let mut rd = tokio::io::BufReader::new(tcp);
        let mut info = String::new();
        rd.read_line(&mut info).await.unwrap();
        assert!(info.contains("\"tls_required\":true"), "{info}");
        let connect = format!(
            "CONNECT {{\"user\":\"operator\",\"pass\":\"{}\",\"verbose\":false}}\r\nPING\r\n",
            op["password"].as_str().unwrap()
        );
        rd.get_mut().write_all(connect.as_bytes()).await.unwrap();
        let mut rest = Vec::new();
        let read = tokio::time::timeout(
            Duration::from_secs(8),
            tokio::io::AsyncReadExt::read_to_end(&mut rd, &mut rest),
        )
        .await;
        assert!(read.is_ok(), "the plaintext connection stayed open");
        let rest = String::from_utf8_lossy(&rest);
        assert!(
            !rest.contains("PONG"),
            "a plaintext client was served: {rest}"
        );
    }
    // A client that does not trust the network CA cannot connect.
    let untrusted = async_nats::ConnectOptions::with_user_and_password(
        "operator".into(),
        op["password"].as_str().unwrap().into(),
    )
    .connect(&server);
    let untrusted = tokio::time::timeout(Duration::from_secs(5), untrusted).await;
    assert!(!matches!(untrusted, Ok(Ok(_))), "connected without the CA");

    // --- the operator: reads and watches `machines`, cannot write it ---
    let (oc, oseen) = connect(
        op["user"].as_str().unwrap(),
        op["password"].as_str().unwrap(),
        &server,
        &ca,
    )
    .await;
    let js = async_nats::jetstream::new(oc.clone());
    let machines = js.get_key_value("machines").await.expect("machines bucket");
    let before = machines.entry(&id).await.unwrap().expect("own record");
    let mut watch = machines.watch(&id).await.expect("the operator may watch");
    let put = machines.put(&id, "{\"forged\":true}".into()).await;
    assert!(put.is_err(), "the operator wrote a machine record");
    let violation = format!("Permissions Violation for Publish to \"$KV.machines.{id}\"");
    assert!(
        oseen.wait_for(&violation, Duration::from_secs(5)).await,
        "no permissions error; the client saw {:?}",
        oseen.all()
    );
    let after = machines.entry(&id).await.unwrap().expect("own record");
    assert_eq!(
        (after.revision, &after.value),
        (before.revision, &before.value),
        "the record is unchanged"
    );
    assert!(
        js.delete_key_value("machines").await.is_err(),
        "the operator deleted the machines bucket"
    );
    assert!(js.get_key_value("machines").await.is_ok());
    // Changes through the API still reach the operator's watch.
    m.ctl_json(&["machine", "drain", &id]);
    let seen = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(Ok(e)) = watch.next().await {
            if String::from_utf8_lossy(&e.value).contains("draining") {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(seen, Ok(true), "the operator's watch saw the drain");
    // Machine request subjects are ployzd's alone.
    let _sub = oc.subscribe("ployz.machine.>").await.unwrap();
    oc.flush().await.unwrap();
    assert!(
        oseen
            .wait_for(
                "Permissions Violation for Subscription to \"ployz.machine.>\"",
                Duration::from_secs(5)
            )
            .await,
        "{:?}",
        oseen.all()
    );
    // Hidden buckets stay hidden from the operator too.
    assert!(js.get_key_value("nats_users").await.is_err());
    // The operator's own buckets are writable.
    let own = js
        .create_key_value(async_nats::jetstream::kv::Config {
            bucket: "opsnotes".into(),
            ..Default::default()
        })
        .await
        .expect("the operator creates a bucket of its own");
    own.put("k", "v".into()).await.unwrap();

    // --- an app user with subjects: request/reply on app.>, nothing else ---
    let app = user_add(
        &m,
        &["echoapp", "--allow-pub", "app.>", "--allow-sub", "app.>"],
    );
    assert_eq!(app["user"], "echoapp", "{app}");
    let url = app["url"].as_str().unwrap();
    assert!(url.starts_with("nats://echoapp:"), "{url}");
    let pass = app["password"].as_str().unwrap().to_string();
    assert!(url.contains(&pass), "{url}");
    let (responder, rseen) = connect("echoapp", &pass, &server, &ca).await;
    let mut svc = responder.subscribe("app.echo").await.unwrap();
    responder.flush().await.unwrap();
    let r2 = responder.clone();
    tokio::spawn(async move {
        while let Some(msg) = svc.next().await {
            if let Some(reply) = msg.reply {
                let _ = r2.publish(reply, msg.payload).await;
                let _ = r2.flush().await;
            }
        }
    });
    let (requester, qseen) = connect("echoapp", &pass, &server, &ca).await;
    let answer = requester
        .request("app.echo", "ping".into())
        .await
        .expect("request/reply on app.echo");
    assert_eq!(&answer.payload[..], b"ping");
    assert!(
        rseen.all().iter().all(|e| !e.contains("Violation")),
        "{:?}",
        rseen.all()
    );
    requester
        .publish("ployz.machine.x.rpc", "hi".into())
        .await
        .unwrap();
    let _s = requester.subscribe("ployz.>").await.unwrap();
    requester.flush().await.unwrap();
    assert!(
        qseen
            .wait_for(
                "Permissions Violation for Publish to \"ployz.machine.x.rpc\"",
                Duration::from_secs(5)
            )
            .await
            && qseen
                .wait_for(
                    "Permissions Violation for Subscription to \"ployz.>\"",
                    Duration::from_secs(5)
                )
                .await,
        "{:?}",
        qseen.all()
    );
    // No KV for this user.
    let ajs = async_nats::jetstream::new(requester.clone());
    assert!(ajs.get_key_value("machines").await.is_err());

    // --- an app user with a KV bucket: that bucket, nothing else ---
    let kvu = user_add(&m, &["cacheapp", "--kv-bucket", "cache"]);
    let kpass = kvu["password"].as_str().unwrap().to_string();
    let (kc, kseen) = connect("cacheapp", &kpass, &server, &ca).await;
    let kjs = async_nats::jetstream::new(kc.clone());
    let cache = kjs.get_key_value("cache").await.expect("its bucket");
    let mut cwatch = cache.watch("k1").await.expect("watch its bucket");
    let rev = cache.put("k1", "v1".into()).await.expect("put");
    assert_eq!(cache.get("k1").await.unwrap().unwrap(), "v1");
    cache
        .update("k1", "v2".into(), rev)
        .await
        .expect("update at its revision");
    assert!(cache.create("k1", "x".into()).await.is_err(), "exists");
    cache.create("k2", "new".into()).await.expect("create");
    let w = tokio::time::timeout(Duration::from_secs(5), cwatch.next())
        .await
        .expect("watch delivered")
        .unwrap()
        .unwrap();
    assert_eq!(&w.value[..], b"v1");
    for other in ["machines", "opsnotes"] {
        assert!(
            kjs.get_key_value(other).await.is_err(),
            "cacheapp opened {other}"
        );
    }
    assert!(kc.publish("app.echo", "x".into()).await.is_ok());
    kc.flush().await.unwrap();
    assert!(
        kseen
            .wait_for(
                "Permissions Violation for Publish to \"app.echo\"",
                Duration::from_secs(5)
            )
            .await,
        "{:?}",
        kseen.all()
    );
    assert!(
        kjs.delete_key_value("cache").await.is_err(),
        "cacheapp deleted its bucket"
    );

    // --- ls shows grants, never passwords; a cluster bucket is refused ---
    let ls = m.ctl(&["--json", "nats", "user", "ls"]);
    let text = stdout(&ls);
    assert!(
        text.contains("echoapp") && text.contains("cacheapp"),
        "{text}"
    );
    assert!(!text.contains(&pass) && !text.contains(&kpass), "{text}");
    let bad = m.ctl(&["nats", "user", "add", "evil", "--kv-bucket", "machines"]);
    assert_eq!(bad.status.code(), Some(6), "{}", ployz_tests::stderr(&bad));
    assert!(ployz_tests::stderr(&bad).contains("cluster's own buckets"));

    // --- rm closes the user's connections, and it cannot log in again ---
    m.ctl_json(&["nats", "user", "rm", "echoapp"]);
    assert!(
        qseen
            .wait_for("authorization violation", Duration::from_secs(3))
            .await
            || qseen.wait_for("disconnected", Duration::from_secs(1)).await,
        "{:?}",
        qseen.all()
    );
    let again = async_nats::ConnectOptions::with_user_and_password("echoapp".into(), pass.clone())
        .tls_client_config(ployz_tests::tls_trusting(&ca))
        .connect(&server)
        .await;
    assert!(
        matches!(&again, Err(e) if e.kind() == async_nats::ConnectErrorKind::AuthorizationViolation),
        "a removed user logged in: {:?}",
        again.map(|_| ())
    );
    // cacheapp is untouched.
    assert_eq!(cache.get("k2").await.unwrap().unwrap(), "new");
}

const NATS_PROBE: &str = r#"u=${NATS_URL#nats://}; cred=${u%@*}; hp=${u#*@};
user=${cred%%:*}; pass=${cred#*:}; host=${hp%:*}; port=${hp##*:};
[ -n "$NATS_URL" ] || { user=; pass=; host=$TARGET_HOST; port=4222; };
echo "probing $host:$port as '$user'";
(printf 'CONNECT {"user":"%s","pass":"%s","verbose":false}\r\nPING\r\n' "$user" "$pass"; sleep 2) | nc -w 3 "$host" "$port" | tr -d '\r' | grep -v '^INFO' | sed 's/^/GOT /';
echo DONE; sleep 3600"#;

#[test]
fn workloads_reach_nats_only_with_their_user() {
    let tb = Testbed::new(1);
    let ms = ployz_tests::cluster_on(&tb, "natswork");
    let m = &ms[0];
    let tmp = tempfile::tempdir().unwrap();
    let image = busybox_image(tmp.path(), "ployz-busybox", &["sleep", "3600"]);
    let image = image.to_str().unwrap();
    let overlay = m.ctl_json(&["mesh", "status"])["machine"]["overlay_ip"]
        .as_str()
        .unwrap()
        .to_string();
    // An unknown user is refused before anything is deployed.
    let (code, v) = m.try_deploy(&["withuser", "--image", image, "--nats-user", "nobody"]);
    assert_ne!(code, Some(0), "{v}");
    assert!(v.to_string().contains("no NATS user `nobody`"), "{v}");
    user_add(m, &["workapp", "--allow-pub", "work.>"]);
    let target = format!("TARGET_HOST={overlay}");
    for (name, user) in [("withuser", Some("workapp")), ("nouser", None)] {
        let mut args = vec![
            "deploy", "service", name, "--image", image, "--env", &target,
        ];
        if let Some(u) = user {
            args.extend(["--nats-user", u]);
        }
        args.extend(["--", "sh", "-c", NATS_PROBE]);
        m.ctl_json(&args);
    }
    let logs = |name: &str| {
        eventually(Duration::from_secs(60), || {
            let s = stdout(&m.ctl(&["service", "logs", name]));
            s.contains("DONE").then_some(s)
        })
        .unwrap_or_else(|| {
            panic!(
                "{name} did not report: {}",
                stdout(&m.ctl(&["service", "logs", name]))
            )
        })
    };
    let with = logs("withuser");
    assert!(
        with.contains(&format!("probing {overlay}:4222 as 'workapp'")),
        "{with}"
    );
    assert!(with.contains("GOT PONG"), "{with}");
    let without = logs("nouser");
    assert!(
        without.contains("GOT -ERR 'Authorization Violation'") && !without.contains("GOT PONG"),
        "{without}"
    );
}
