//! Two in-process servers joined by a route over TCP loopback.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{connect_to, eventually, our_config, start_ours, WAIT};
use futures::StreamExt;
use ployz_natsd::{RouteHandle, Server};
use tokio::net::{TcpListener, TcpStream};

struct Cluster {
    a: Server,
    a_addr: SocketAddr,
    b: Server,
    b_addr: SocketAddr,
    /// Routes A accepted (so a test can cut them).
    accepted: Arc<Mutex<Vec<RouteHandle>>>,
}

impl Cluster {
    /// A accepts routes on a loopback port; B dials it and keeps redialing.
    async fn start() -> Cluster {
        let (a, a_addr) = start_ours("a", our_config("a", None), None).await;
        let (b, b_addr) = start_ours("b", our_config("b", None), None).await;
        let route_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let route_addr = route_listener.local_addr().unwrap();
        let accepted = Arc::new(Mutex::new(Vec::new()));
        let (a2, acc) = (a.clone(), accepted.clone());
        tokio::spawn(async move {
            while let Ok((s, _)) = route_listener.accept().await {
                let h = a2.attach_route(s, "b");
                acc.lock().unwrap().push(h);
            }
        });
        b.maintain_route("a", move || TcpStream::connect(route_addr));
        let (a3, b3) = (a.clone(), b.clone());
        eventually("route up", move || {
            a3.stats().routes == 1 && b3.stats().routes == 1
        })
        .await;
        Cluster {
            a,
            a_addr,
            b,
            b_addr,
            accepted,
        }
    }

    async fn stop(self) {
        self.a.shutdown().await;
        self.b.shutdown().await;
    }
}

async fn wait_remote(s: &Server, n: usize) {
    let s = s.clone();
    eventually("remote interest", move || {
        s.stats().remote_subscriptions >= n
    })
    .await;
}

async fn next_msg(sub: &mut async_nats::Subscriber) -> async_nats::Message {
    tokio::time::timeout(WAIT, sub.next())
        .await
        .expect("message timeout")
        .expect("subscription ended")
}

async fn no_msg(sub: &mut async_nats::Subscriber) {
    if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(150), sub.next()).await {
        panic!("unexpected message {:?}", m.payload);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_cross_the_route_once() {
    let c = Cluster::start().await;
    let on_a = connect_to(c.a_addr).await;
    let on_b = connect_to(c.b_addr).await;
    let mut sub_a = on_a.subscribe("x.>").await.unwrap();
    let mut sub_b = on_b.subscribe("x.*").await.unwrap();
    on_a.flush().await.unwrap();
    on_b.flush().await.unwrap();
    wait_remote(&c.a, 1).await;
    wait_remote(&c.b, 1).await;
    for i in 0..10 {
        on_b.publish("x.b", format!("b{i}").into()).await.unwrap();
        on_a.publish("x.a", format!("a{i}").into()).await.unwrap();
    }
    on_a.flush().await.unwrap();
    on_b.flush().await.unwrap();
    for sub in [&mut sub_a, &mut sub_b] {
        let mut got = BTreeSet::new();
        for _ in 0..20 {
            let m = next_msg(sub).await;
            assert!(got.insert(m.payload.to_vec()), "duplicate");
        }
        no_msg(sub).await;
    }
    // Interest withdrawn on unsubscribe.
    drop(sub_a);
    on_a.flush().await.unwrap();
    let b = c.b.clone();
    eventually("RS- applied", move || b.stats().remote_subscriptions == 0).await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_group_spans_servers() {
    let c = Cluster::start().await;
    let mut subs = Vec::new();
    let mut clients = Vec::new();
    for addr in [c.a_addr, c.a_addr, c.b_addr, c.b_addr] {
        let cl = connect_to(addr).await;
        subs.push(cl.queue_subscribe("jobs", "g".into()).await.unwrap());
        cl.flush().await.unwrap();
        clients.push(cl);
    }
    wait_remote(&c.a, 1).await;
    wait_remote(&c.b, 1).await;
    let pa = connect_to(c.a_addr).await;
    let pb = connect_to(c.b_addr).await;
    const N: usize = 100;
    for i in 0..N {
        pa.publish("jobs", format!("a{i}").into()).await.unwrap();
        pb.publish("jobs", format!("b{i}").into()).await.unwrap();
    }
    pa.flush().await.unwrap();
    pb.flush().await.unwrap();
    let mut got = Vec::new();
    let mut per_sub = vec![0usize; subs.len()];
    let deadline = tokio::time::Instant::now() + WAIT;
    while got.len() < 2 * N {
        assert!(tokio::time::Instant::now() < deadline, "got {}", got.len());
        for (i, s) in subs.iter_mut().enumerate() {
            while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(5), s.next()).await {
                got.push(m.payload.to_vec());
                per_sub[i] += 1;
            }
        }
    }
    for s in subs.iter_mut() {
        no_msg(s).await;
    }
    let unique: BTreeSet<_> = got.iter().collect();
    assert_eq!(
        unique.len(),
        2 * N,
        "each message exactly once cluster-wide"
    );
    assert!(
        per_sub[..2].iter().sum::<usize>() > 0 && per_sub[2..].iter().sum::<usize>() > 0,
        "both servers' members get work: {per_sub:?}"
    );
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_on_a_answered_on_b() {
    let c = Cluster::start().await;
    let responder = connect_to(c.b_addr).await;
    let mut sub = responder.subscribe("svc").await.unwrap();
    responder.flush().await.unwrap();
    let r2 = responder.clone();
    let task = tokio::spawn(async move {
        while let Some(m) = sub.next().await {
            if let Some(reply) = m.reply {
                r2.publish(reply, m.payload).await.unwrap();
            }
        }
    });
    wait_remote(&c.a, 1).await;
    let requester = connect_to(c.a_addr).await;
    for i in 0..5 {
        let resp = requester
            .request("svc", format!("q{i}").into())
            .await
            .unwrap();
        assert_eq!(resp.payload, format!("q{i}"));
    }
    // No interest anywhere in the cluster: no responders.
    let err = requester.request("nobody", "".into()).await.unwrap_err();
    assert_eq!(err.kind(), async_nats::RequestErrorKind::NoResponders);
    task.abort();
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_route_is_redialed() {
    let c = Cluster::start().await;
    let on_a = connect_to(c.a_addr).await;
    let mut sub = on_a.subscribe("r").await.unwrap();
    on_a.flush().await.unwrap();
    wait_remote(&c.b, 1).await;
    for h in c.accepted.lock().unwrap().iter() {
        h.close();
    }
    // B notices, withdraws A's interest, redials, and learns it again.
    let (a, b) = (c.a.clone(), c.b.clone());
    eventually("second route accepted", {
        let acc = c.accepted.clone();
        move || acc.lock().unwrap().len() == 2
    })
    .await;
    eventually("route back", move || {
        a.stats().routes == 1 && b.stats().routes == 1 && b.stats().remote_subscriptions == 1
    })
    .await;
    let on_b = connect_to(c.b_addr).await;
    on_b.publish("r", "again".into()).await.unwrap();
    on_b.flush().await.unwrap();
    assert_eq!(&next_msg(&mut sub).await.payload[..], b"again");
    c.stop().await;
}
