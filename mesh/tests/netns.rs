//! Mesh behaviour between namespace hosts (root needed; see common/mod.rs
//! and the `ployz-testbed` crate).

mod common;

use std::time::Duration;

use common::*;

fn peers_of(tb: &MeshBed, i: usize) -> Vec<String> {
    (0..tb.nodes.len())
        .filter(|j| *j != i)
        .flat_map(|j| ["--peer".to_owned(), tb.nodes[j].peer_spec()])
        .collect()
}

fn tcp_check(tb: &MeshBed, from: usize, to: usize) -> bool {
    tcp_bulk(tb, from, to, 0)
}

/// Echo `bytes` over TCP: large transfers go through TSO segmentation on
/// the sender's device and GRO coalescing on the receiver's.
fn tcp_bulk(tb: &MeshBed, from: usize, to: usize, bytes: usize) -> bool {
    let bin = meshnode_bin();
    let out = tb.sh(
        from,
        &format!(
            "{} tcp-check {}:7200 --bytes {bytes}",
            bin.display(),
            tb.nodes[to].overlay
        ),
    );
    if !out.status.success() {
        eprintln!("tcp-check {from}→{to}: {out:?}");
    }
    out.status.success()
}

/// (a) three meshnodes: ping and TCP (a line, then 8 MiB) between every
/// pair over the overlay; `wg show plz0` lists two peers with a recent
/// handshake on each host. Host 2 runs without offloads, so offloading and
/// plain data paths meet.
#[test]
fn three_nodes_full_mesh() {
    let mut tb = MeshBed::new(3);
    let mut pids = Vec::new();
    for i in 0..3 {
        let mut args = peers_of(&tb, i);
        args.extend(["--tcp-echo-port".to_owned(), "7200".to_owned()]);
        let env: &[(&str, &str)] = if i == 2 {
            &[("PLOYZ_MESH_OFFLOAD", "0")]
        } else {
            &[]
        };
        pids.push(tb.spawn_meshnode_env(i, &args, env));
    }
    for i in 0..3 {
        for j in 0..3 {
            if i == j {
                continue;
            }
            let to = tb.nodes[j].overlay;
            wait_for(&format!("ping {i}→{j}"), Duration::from_secs(15), || {
                tb.ping(i, to).then_some(())
            });
            assert!(tcp_check(&tb, i, j), "tcp {i}→{j}");
            assert!(tcp_bulk(&tb, i, j, 8 << 20), "8 MiB tcp echo {i}→{j}");
        }
    }
    for (i, pid) in pids.iter().enumerate() {
        let out = tb.wg(*pid, &["show", "plz0", "dump"]);
        assert!(out.status.success(), "wg show on host {i}: {out:?}");
        let dump = String::from_utf8_lossy(&out.stdout);
        let peers = dump_peers(&dump);
        assert_eq!(peers.len(), 2, "host {i}:\n{dump}");
        for (key, endpoint, hs) in &peers {
            assert!(
                now_secs().abs_diff(*hs) < 60,
                "host {i} peer {key}: handshake {hs} not recent\n{dump}"
            );
            assert!(endpoint.ends_with(":51820"), "{endpoint}");
        }
        // The human form works too.
        let out = tb.wg(*pid, &["show", "plz0"]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("latest handshake"), "{text}");
        assert!(text.contains(&tb.nodes[i].public_b64()), "{text}");
    }
}

/// (b) a stock wireguard-go configured with `wg setconf` talks to a meshnode.
#[test]
fn interop_with_wireguard_go() {
    let mut tb = MeshBed::new(2);
    tb.spawn_meshnode(
        0,
        &[
            "--peer".to_owned(),
            tb.nodes[1].peer_spec(),
            "--tcp-echo-port".to_owned(),
            "7200".to_owned(),
        ],
    );

    let wgo = std::path::Path::new("/usr/bin/wireguard-go");
    let pid = tb.spawn(
        1,
        "wireguard-go",
        wgo,
        &["-f".to_owned(), "wg0".to_owned()],
        &[("WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD", "1")],
    );
    wait_for("wireguard-go socket", Duration::from_secs(10), || {
        tb.wg(pid, &["show", "wg0"]).status.success().then_some(())
    });
    let conf = tb.dir().join("wg0.conf");
    let h0 = &tb.nodes[0];
    std::fs::write(
        &conf,
        format!(
            "[Interface]\nPrivateKey = {}\nListenPort = 51820\n\n[Peer]\nPublicKey = {}\n\
             Endpoint = {}:51820\nAllowedIPs = 10.234.1.0/24\n",
            tb.nodes[1].private_b64(),
            h0.public_b64(),
            h0.underlay
        ),
    )
    .expect("conf");
    let out = tb.wg(pid, &["setconf", "wg0", &conf.display().to_string()]);
    assert!(out.status.success(), "wg setconf: {out:?}");
    let ns = tb.hosts[1].netns.clone();
    must(&[
        "ip",
        "-n",
        &ns,
        "addr",
        "add",
        "10.234.2.1/32",
        "dev",
        "wg0",
    ]);
    must(&["ip", "-n", &ns, "link", "set", "wg0", "mtu", "1420", "up"]);
    must(&["ip", "-n", &ns, "route", "add", OVERLAY, "dev", "wg0"]);

    let (a, b) = (tb.nodes[0].overlay, tb.nodes[1].overlay);
    wait_for(
        "ping wireguard-go → meshnode",
        Duration::from_secs(15),
        || tb.ping(1, a).then_some(()),
    );
    wait_for(
        "ping meshnode → wireguard-go",
        Duration::from_secs(15),
        || tb.ping(0, b).then_some(()),
    );
    // Bulk TCP both ways between the stacks: wireguard-go's kernel checks
    // the checksums of the segments we cut; ours takes what it sends.
    assert!(
        tcp_bulk(&tb, 1, 0, 8 << 20),
        "8 MiB tcp echo wireguard-go → meshnode"
    );
    let out = tb.wg(pid, &["show", "wg0", "dump"]);
    let dump = String::from_utf8_lossy(&out.stdout);
    let peers = dump_peers(&dump);
    assert_eq!(peers.len(), 1, "{dump}");
    assert!(now_secs().abs_diff(peers[0].2) < 60, "{dump}");
}

/// (c) removing a peer through set_peers (meshnode re-reads its peers
/// file) makes it vanish from `wg show` within 5 s; the others stay up.
#[test]
fn removed_peer_vanishes_from_wg_show() {
    let mut tb = MeshBed::new(3);
    let file = tb.dir().join("peers0");
    std::fs::write(
        &file,
        format!("{}\n{}\n", tb.nodes[1].peer_spec(), tb.nodes[2].peer_spec()),
    )
    .expect("peers file");
    let pid = tb.spawn_meshnode(0, &["--peers-file".to_owned(), file.display().to_string()]);
    for i in 1..3 {
        let args = peers_of(&tb, i);
        tb.spawn_meshnode(i, &args);
    }
    let (o1, o2) = (tb.nodes[1].overlay, tb.nodes[2].overlay);
    wait_for("ping 0→1", Duration::from_secs(15), || {
        tb.ping(0, o1).then_some(())
    });
    wait_for("ping 0→2", Duration::from_secs(15), || {
        tb.ping(0, o2).then_some(())
    });
    let gone = tb.nodes[2].public_b64();
    let peers = |tb: &MeshBed| {
        String::from_utf8_lossy(&tb.wg(pid, &["show", "plz0", "peers"]).stdout).into_owned()
    };
    assert!(peers(&tb).contains(&gone));

    std::fs::write(&file, format!("{}\n", tb.nodes[1].peer_spec())).expect("peers file");
    let started = std::time::Instant::now();
    wait_for("peer removal in wg show", Duration::from_secs(5), || {
        (!peers(&tb).contains(&gone)).then_some(())
    });
    eprintln!("peer gone from wg show after {:?}", started.elapsed());
    let listed = peers(&tb);
    assert_eq!(listed.lines().count(), 1, "{listed}");
    assert!(tb.ping(0, o1), "remaining peer still reachable");
    assert!(!tb.ping(0, o2), "removed peer no longer reachable");
}

fn rtt_row<'a>(status: &'a str, peer: &str) -> Option<&'a str> {
    status
        .lines()
        .find(|l| l.starts_with(&format!("rtt {peer} ")))
}

fn field<'a>(row: &'a str, key: &str) -> &'a str {
    row.split(' ')
        .find_map(|f| f.strip_prefix(&format!("{key}=")))
        .unwrap_or("")
}

/// (d) the prober: rows for reachable peers, an error row for a peer cut
/// off with iptables, rows again after the cut heals.
#[test]
fn prober_reports_cut_and_heal() {
    let mut tb = MeshBed::new(3);
    for i in 0..3 {
        let mut args = peers_of(&tb, i);
        args.extend(["--probe-port".to_owned(), "7102".to_owned()]);
        for j in (0..3).filter(|j| *j != i) {
            args.extend([
                "--probe".to_owned(),
                format!("n{j}={}:7102", tb.nodes[j].overlay),
            ]);
        }
        tb.spawn_meshnode(i, &args);
    }
    let healthy = |tb: &MeshBed, peer: &str| {
        let s = tb.status(0);
        rtt_row(&s, peer).is_some_and(|r| {
            field(r, "error") == "-" && field(r, "samples").parse::<usize>().unwrap_or(0) >= 2
        })
    };
    wait_for("rtt rows for n1 and n2", Duration::from_secs(20), || {
        (healthy(&tb, "n1") && healthy(&tb, "n2")).then_some(())
    });
    let s = tb.status(0);
    let median: f64 = field(rtt_row(&s, "n1").unwrap(), "median_ms")
        .parse()
        .unwrap();
    assert!(median > 0.0 && median < 50.0, "{s}");

    // Cut n2 off.
    tb.hosts[2].cut();
    wait_for("error row for n2", Duration::from_secs(10), || {
        let s = tb.status(0);
        rtt_row(&s, "n2")
            .is_some_and(|r| field(r, "error") != "-")
            .then_some(())
    });
    assert!(healthy(&tb, "n1"), "n1 unaffected:\n{}", tb.status(0));

    // Heal.
    tb.hosts[2].heal();
    wait_for("n2 row healthy again", Duration::from_secs(20), || {
        healthy(&tb, "n2").then_some(())
    });
}
