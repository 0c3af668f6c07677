//! The embedded NATS control plane as a standard client sees it: async-nats
//! against real ployzd processes.

use futures::StreamExt;
use ployz_tests::netns::Testbed;
use ployz_tests::{eventually, Machine};
use serde_json::Value;
use std::time::Duration;

/// `ployzctl nats url --json`, once the server is up.
fn nats_info(m: &Machine) -> Value {
    eventually(Duration::from_secs(15), || {
        let o = m.ctl(&["--json", "nats", "url"]);
        o.status
            .success()
            .then(|| serde_json::from_slice(&o.stdout).unwrap())
    })
    .expect("NATS server did not come up")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_state_is_readable_as_jetstream_kv() {
    let m = Machine::start_with(&["--nats-port", "0"]);
    m.ctl_json(&["mesh", "init", "kvdemo"]);
    let info = nats_info(&m);
    let url = info["url"].as_str().unwrap();
    assert!(
        url.starts_with("nats://operator:") && url.contains("@127.0.0.1:"),
        "{url}"
    );
    let server = info["servers"][0].as_str().unwrap().to_string();
    let client = ployz_tests::nats_connect(&info, &server).await;
    let js = async_nats::jetstream::new(client.clone());
    let machines = js.get_key_value("machines").await.expect("machines bucket");
    let id = m.id();
    let rec = machines.get(&id).await.unwrap().expect("own record");
    let rec: Value = serde_json::from_slice(&rec).unwrap();
    assert_eq!(rec["lifecycle"], "active");
    // Changes made with ployzctl show up in a watch.
    let mut watch = machines.watch(&id).await.unwrap();
    m.ctl_json(&["machine", "drain", &id]);
    let entry = tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .expect("watch delivered the change")
        .unwrap()
        .unwrap();
    let rec: Value = serde_json::from_slice(&entry.value).unwrap();
    assert_eq!(rec["lifecycle"], "draining");
    // A bucket of the user's own, through the same store.
    let kv = js
        .create_key_value(async_nats::jetstream::kv::Config {
            bucket: "app".into(),
            history: 3,
            ..Default::default()
        })
        .await
        .unwrap();
    let r1 = kv.put("k", "v1".into()).await.unwrap();
    assert!(
        kv.update("k", "v2".into(), r1 + 100).await.is_err(),
        "stale revision refused"
    );
    kv.update("k", "v2".into(), r1).await.unwrap();
    assert_eq!(kv.get("k").await.unwrap().unwrap(), "v2");

    // Wrong credentials are refused.
    let bad = async_nats::ConnectOptions::with_user_and_password("ployz".into(), "nope".into())
        .connect(&server);
    let bad = tokio::time::timeout(Duration::from_secs(3), bad).await;
    assert!(!matches!(bad, Ok(Ok(_))), "a wrong password connected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_cross_machines() {
    let tb = Testbed::new(2);
    // The test process is outside the namespaces: let it reach the NATS
    // servers on the hosts' own addresses (by default: loopback + overlay).
    let (ipa, ipb) = (tb.hosts[0].ip.to_string(), tb.hosts[1].ip.to_string());
    let a = Machine::start_in(&tb.hosts[0], &["--nats-listen", &ipa]);
    a.ctl_json(&["mesh", "init", "natsdemo"]);
    let token = a.ctl_json(&["machine", "invite", "create"])["token"]
        .as_str()
        .unwrap()
        .to_string();
    let b = Machine::start_in(&tb.hosts[1], &["--nats-listen", &ipb]);
    b.ctl_json(&["machine", "invite", "import", "--token", &token]);
    let ia = nats_info(&a);
    let ib = nats_info(&b);
    assert_eq!(ia["password"], ib["password"], "one credential per network");
    let ca = ployz_tests::nats_connect(&ia, &format!("{}:4222", tb.hosts[0].ip)).await;
    let cb = ployz_tests::nats_connect(&ib, &format!("{}:4222", tb.hosts[1].ip)).await;
    let mut sub = ca.subscribe("demo.>").await.unwrap();
    ca.flush().await.unwrap();
    // Interest reaches B over the route; publish until it does.
    let got = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            cb.publish("demo.hello", "from b".into()).await.unwrap();
            cb.flush().await.unwrap();
            if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(300), sub.next()).await
            {
                return m;
            }
        }
    })
    .await
    .expect("a client on A received what a client on B published");
    assert_eq!(got.subject.as_str(), "demo.hello");
    assert_eq!(&got.payload[..], b"from b");
    // Request on B answered by a responder on A.
    let mut svc = ca.subscribe("svc.echo").await.unwrap();
    let ca2 = ca.clone();
    tokio::spawn(async move {
        while let Some(m) = svc.next().await {
            if let Some(r) = m.reply {
                ca2.publish(r, m.payload).await.unwrap();
            }
        }
    });
    ca.flush().await.unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if let Ok(r) = cb.request("svc.echo", "ping".into()).await {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .expect("request answered across machines");
    assert_eq!(&resp.payload[..], b"ping");

    // B holds no replica (compute): its JetStream forwards to the storage
    // machine, and its watches follow the events relayed from there.
    let js_b = async_nats::jetstream::new(cb.clone());
    let machines = js_b.get_key_value("machines").await.unwrap();
    let a_id = a.id();
    assert!(machines.get(&a_id).await.unwrap().is_some());
    let mut watch = machines.watch(&a_id).await.unwrap();
    a.ctl_json(&["machine", "drain", &a_id]);
    let seen = tokio::time::timeout(Duration::from_secs(15), async {
        while let Some(Ok(e)) = watch.next().await {
            let v: Value = serde_json::from_slice(&e.value).unwrap();
            if v["lifecycle"] == "draining" {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(seen, Ok(true), "watch on a compute machine saw the change");
    let kv = js_b
        .create_key_value(async_nats::jetstream::kv::Config {
            bucket: "shared".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    kv.put("x", "from b".into()).await.unwrap();
    let js_a = async_nats::jetstream::new(ca.clone());
    let on_a = js_a.get_key_value("shared").await.unwrap();
    assert_eq!(on_a.get("x").await.unwrap().unwrap(), "from b");

    // An app user added on A logs in on B within a second, and `nats user
    // rm` on A closes its connection on B within a second (issue 17).
    let user = a.ctl_json(&["nats", "user", "add", "crossapp", "--allow-pub", "demo.>"]);
    let mut creds = user.clone();
    creds["ca_pem"] = ib["ca_pem"].clone();
    let at_b = format!("{}:4222", tb.hosts[1].ip);
    let started = std::time::Instant::now();
    let app = loop {
        match tokio::time::timeout(
            Duration::from_millis(500),
            ployz_tests::nats_options(&creds).connect(&at_b),
        )
        .await
        {
            Ok(Ok(c)) => break c,
            _ if started.elapsed() < Duration::from_secs(1) => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            other => panic!(
                "the new user could not log in on B within a second: {:?}",
                other.map(|r| r.map(|_| ()))
            ),
        }
    };
    app.flush().await.unwrap();
    let removed = std::time::Instant::now();
    a.ctl_json(&["nats", "user", "rm", "crossapp"]);
    let gone = tokio::time::timeout(Duration::from_secs(1), async {
        while app.connection_state() == async_nats::connection::State::Connected {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        gone.is_ok(),
        "B kept the removed user's connection for {:?}",
        removed.elapsed()
    );
}
