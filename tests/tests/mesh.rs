//! The WireGuard mesh between real ployzd machines on namespace hosts:
//! reachability over the overlay, `wg show` from wireguard-tools, `machine
//! rtt`, and peers following joins and removals.

use ployz_tests::netns::Testbed;
use ployz_tests::{eventually, stderr, stdout, Machine};
use serde_json::Value;
use std::time::Duration;

fn cluster(tb: &Testbed) -> Vec<Machine> {
    ployz_tests::cluster_on(tb, "meshtest")
}

fn overlay_ip(m: &Machine) -> String {
    m.ctl_json(&["mesh", "status"])["machine"]["overlay_ip"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Public keys of peers with a handshake in the last two minutes.
fn fresh_peers(m: &Machine) -> Vec<String> {
    let o = m.exec("wg", &["show", "plz0", "latest-handshakes"]);
    assert!(o.status.success(), "wg show: {}", stderr(&o));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    stdout(&o)
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let key = it.next()?;
            let t: u64 = it.next()?.parse().ok()?;
            (t > 0 && now.saturating_sub(t) < 120).then(|| key.to_string())
        })
        .collect()
}

fn all_peers(m: &Machine) -> Vec<String> {
    let o = m.exec("wg", &["show", "plz0", "peers"]);
    stdout(&o).lines().map(str::to_string).collect()
}

#[test]
fn three_machines_reach_each_other_over_the_overlay() {
    let tb = Testbed::new(3);
    let ms = cluster(&tb);
    let ips: Vec<String> = ms.iter().map(overlay_ip).collect();
    for (i, m) in ms.iter().enumerate() {
        for (j, ip) in ips.iter().enumerate() {
            if i == j {
                continue;
            }
            let ok = eventually(Duration::from_secs(15), || {
                m.exec("ping", &["-c1", "-W1", ip])
                    .status
                    .success()
                    .then_some(())
            });
            assert!(
                ok.is_some(),
                "machine {i} cannot ping {ip} over the overlay"
            );
            // TCP too: the peer port answers on the overlay address.
            let tcp = m.exec("bash", &["-c", &format!("exec 3<>/dev/tcp/{ip}/7101")]);
            assert!(tcp.status.success(), "TCP {i} -> {ip}: {}", stderr(&tcp));
        }
        let fresh = eventually(Duration::from_secs(15), || {
            let p = fresh_peers(m);
            (p.len() == 2).then_some(p)
        });
        assert!(
            fresh.is_some(),
            "machine {i}: wg show lacks 2 fresh peers: {:?}",
            all_peers(m)
        );
    }
}

fn rtt(m: &Machine) -> Value {
    m.ctl_json(&["machine", "rtt"])
}

#[test]
fn rtt_matrix_warns_for_a_cut_host_and_recovers() {
    let tb = Testbed::new(3);
    let ms = cluster(&tb);
    let full = eventually(Duration::from_secs(30), || {
        let r = rtt(&ms[0]);
        (r["rows"].as_array()?.len() == 6).then_some(r)
    });
    let full = full.unwrap_or_else(|| panic!("no 6-row matrix: {}", rtt(&ms[0])));
    for row in full["rows"].as_array().unwrap() {
        assert!(row["median_ms"].as_f64().unwrap() > 0.0, "{row}");
        assert!(row["stddev_ms"].as_f64().is_some());
        assert!(row["samples"].as_u64().unwrap() > 0);
    }
    // The table form.
    let t = stdout(&ms[0].ctl(&["machine", "rtt"]));
    assert!(t.starts_with("MACHINE") && t.contains("ms"), "{t}");

    let cut_id = ms[2].id();
    tb.hosts[2].cut();
    let warned = eventually(Duration::from_secs(40), || {
        let r = rtt(&ms[0]);
        let w: Vec<String> = r["warnings"]
            .as_array()?
            .iter()
            .map(|w| w.as_str().unwrap().to_string())
            .collect();
        let rows_with_cut = r["rows"]
            .as_array()?
            .iter()
            .filter(|x| x["machine"] == cut_id.as_str() || x["peer"] == cut_id.as_str())
            .count();
        (rows_with_cut == 0 && w.iter().filter(|w| w.contains(&cut_id)).count() >= 4).then_some(w)
    });
    assert!(
        warned.is_some(),
        "cut host's pairs not reported as warnings: {}",
        rtt(&ms[0])
    );
    tb.hosts[2].heal();
    let back = eventually(Duration::from_secs(40), || {
        let r = rtt(&ms[0]);
        (r["rows"].as_array()?.len() == 6).then_some(())
    });
    assert!(
        back.is_some(),
        "rows did not return after heal: {}",
        rtt(&ms[0])
    );
}

#[test]
fn removed_machine_leaves_every_wg_peer_list() {
    let tb = Testbed::new(3);
    let mut ms = cluster(&tb);
    let key = ms[2].ctl_json(&["mesh", "status"])["machine"]["wg_public_key"]
        .as_str()
        .unwrap()
        .to_string();
    for m in &ms[..2] {
        let seen = eventually(Duration::from_secs(10), || {
            all_peers(m).contains(&key).then_some(())
        });
        assert!(seen.is_some());
    }
    let id = ms[2].id();
    ms[0].ctl_json(&["machine", "rm", &id]);
    ms[2].wait_exit(Duration::from_secs(10));
    for m in &ms[..2] {
        let gone = eventually(Duration::from_secs(5), || {
            (!all_peers(m).contains(&key)).then_some(())
        });
        assert!(gone.is_some(), "peer still in wg show: {:?}", all_peers(m));
    }
}
