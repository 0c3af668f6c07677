//! A stock wireguard-go peer, configured with wireguard-tools' `wg`, talks to
//! a real ployzd machine over its userspace WireGuard interface.
//!
//! The wireguard-go host is not a ployz machine, so the test enrols it the
//! way an operator's tooling could, through the explicit admin path: it
//! writes a machine record (its public key, endpoint and /24) into the
//! `machines` bucket with the credentials of `ployzctl nats url --admin`
//! (the operator user of `nats url` cannot write the cluster's buckets) and
//! a standard client (async-nats, JetStream KV). ployzd follows the record
//! like any other and adds the peer.

use ployz_tests::netns::Testbed;
use ployz_tests::{eventually, stderr, stdout, Machine};
use serde_json::json;
use std::time::Duration;

fn sh(tb: &Testbed, host: usize, script: &str) -> std::process::Output {
    tb.hosts[host]
        .command("sh")
        .args(["-c", script])
        .output()
        .expect("run sh in the host namespace")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wireguard_go_peer_pings_a_ployz_machine() {
    assert!(
        std::path::Path::new("/usr/bin/wireguard-go").exists(),
        "wireguard-go is missing: apt-get install -y wireguard-go wireguard-tools"
    );
    let tb = Testbed::new(2);
    let underlay = tb.hosts[0].ip.to_string();
    let m = Machine::start_in(&tb.hosts[0], &["--nats-listen", &underlay]);
    m.ctl_json(&["mesh", "init", "wgointerop"]);
    let status = m.ctl_json(&["mesh", "status"]);
    let ployz_ip = status["machine"]["overlay_ip"]
        .as_str()
        .unwrap()
        .to_string();
    let ls = m.ctl_json(&["machine", "ls"]);
    let ployz_key = ls["machines"][0]["wg_public_key"]
        .as_str()
        .unwrap()
        .to_string();

    // wireguard-go on host 1 with a key from `wg genkey`.
    let ifname = format!("plzwgo{}", std::process::id() % 100_000);
    let wgo_ip = tb.hosts[1].ip.to_string();
    let keydir = tempfile::tempdir().unwrap();
    let keyfile = keydir.path().join("key");
    let o = sh(
        &tb,
        1,
        &format!("umask 077; wg genkey > {}", keyfile.display()),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let o = sh(&tb, 1, &format!("wg pubkey < {}", keyfile.display()));
    let wgo_key = stdout(&o).trim().to_string();
    let o = sh(
        &tb,
        1,
        &format!(
            "wireguard-go {ifname} && \
             wg set {ifname} private-key {key} listen-port 51820 \
                peer {ployz_key} endpoint {underlay}:51820 allowed-ips 10.101.0.0/16 persistent-keepalive 5 && \
             ip addr add 10.101.200.1/24 dev {ifname} && ip link set {ifname} mtu 1420 up && \
             ip route add 10.101.0.0/16 dev {ifname}",
            key = keyfile.display()
        ),
    );
    assert!(o.status.success(), "wireguard-go setup: {}", stderr(&o));

    // Enrol it through the control plane, as a standard NATS client with
    // the admin credentials (the operator's are refused: tests/tests/nats_perms.rs).
    let info = m.nats_admin_info();
    let client = ployz_tests::nats_connect(&info, &format!("{underlay}:4222")).await;
    let js = async_nats::jetstream::new(client);
    let machines = js.get_key_value("machines").await.unwrap();
    let record = json!({
        "id": "00000000c0de",
        "hostname": "wireguard-go",
        "lifecycle": "active",
        "authority": "compute",
        "region": "default",
        "region_role": "member",
        "overlay_ip": "10.101.200.1",
        "subnet": "10.101.200.0/24",
        "version": "wireguard-go",
        "runtime": "none",
        "identity_key": "",
        "wg_public_key": wgo_key,
        "endpoints": [format!("{wgo_ip}:51820")],
        "peer_addr": "",
        "created_at_ms": 0,
        "updated_at_ms": 0,
    });
    machines
        .put("00000000c0de", serde_json::to_vec(&record).unwrap().into())
        .await
        .unwrap();

    // Traffic both ways over the tunnel.
    let to_ployz = eventually(Duration::from_secs(20), || {
        sh(&tb, 1, &format!("ping -c1 -W1 {ployz_ip}"))
            .status
            .success()
            .then_some(())
    });
    assert!(
        to_ployz.is_some(),
        "wireguard-go cannot ping {ployz_ip}; wg show on its side:\n{}\nployzd log:\n{}",
        stdout(&sh(&tb, 1, &format!("wg show {ifname}"))),
        m.log()
    );
    let to_wgo = m.exec("ping", &["-c1", "-W1", "10.101.200.1"]);
    assert!(to_wgo.status.success(), "{}", stderr(&to_wgo));
    // TCP from the wireguard-go side to ployzd's peer port on the overlay.
    let tcp = sh(
        &tb,
        1,
        &format!("curl -s -m 3 -o /dev/null telnet://{ployz_ip}:7101 </dev/null; [ $? -ne 7 ]"),
    );
    assert!(
        tcp.status.success(),
        "TCP to {ployz_ip}:7101: {}",
        stderr(&tcp)
    );
    // Both sides show the handshake with `wg`.
    let theirs = stdout(&m.exec("wg", &["show", "plz0", "latest-handshakes"]));
    let line = theirs
        .lines()
        .find(|l| l.starts_with(&wgo_key))
        .unwrap_or_else(|| panic!("ployzd's wg show lacks the wireguard-go peer:\n{theirs}"));
    let t: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(t > 0, "a handshake happened: {line}");
    let ours = stdout(&sh(&tb, 1, &format!("wg show {ifname} latest-handshakes")));
    assert!(ours.contains(&ployz_key), "{ours}");

    // Deleting the record removes the peer again.
    machines.delete("00000000c0de").await.unwrap();
    let gone = eventually(Duration::from_secs(10), || {
        let peers = stdout(&m.exec("wg", &["show", "plz0", "peers"]));
        (!peers.contains(&wgo_key)).then_some(())
    });
    assert!(gone.is_some(), "peer removed from wg show");
}
