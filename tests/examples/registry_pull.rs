//! Benchmark for BENCHMARKS.md (issue 13): a 3-replica service from a
//! registry image against `docker pull` of the same image three times (one
//! per machine), same box, same run, same registry.
//!
//! One Debian `docker-registry` in the root namespace (reached by the
//! namespace machines over the testbed bridge, by dockerd on 127.0.0.1);
//! an image of `MB` MiB of incompressible data pushed with `skopeo`. Per run:
//! `deploy service --replicas 3 --wait-secs 0` from a fresh repository (the
//! same blobs, but a new archive, so nothing is cached on the machines),
//! timed until `service ls` shows 3 running instances (polled every 50 ms,
//! so without deploy's 6 s stay-up check); then three `docker pull`s, each
//! after `docker rmi`. Registry egress is the sum of `http.response.written` in
//! the registry's log over each phase.
//!
//! As root, after building the binaries:
//! `PLOYZ_BIN_DIR=target/x86_64-unknown-linux-musl/release cargo run -p ployz-tests --example registry_pull -- [MB] [RUNS]`

use ployz_tests::images::noisy_busybox_image;
use ployz_tests::netns::Testbed;
use ployz_tests::{cluster_on_with_env, eventually, eventually_every, stdout};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const HTTPD: &[&str] = &["httpd", "-f", "-p", "8080", "-h", "/www"];

fn egress(log: &Path, from: usize) -> u64 {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.get(from..)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let v = l.split("http.response.written=").nth(1)?;
            v.split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

fn log_len(log: &Path) -> usize {
    std::fs::metadata(log).map_or(0, |m| m.len() as usize)
}

fn run(cmd: &mut Command) -> String {
    let o = cmd.stdin(Stdio::null()).output().expect("spawn");
    assert!(
        o.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    stdout(&o)
}

/// CPU time (ms, user + system) used so far by each process whose name is
/// in `names`, summed per name (for BENCH_TRACE: CPU spent per phase).
fn cpu_ms(names: &[&str]) -> Vec<(String, u64)> {
    let tick = 100u64; // USER_HZ on Linux
    let mut out: Vec<(String, u64)> = names.iter().map(|n| (n.to_string(), 0)).collect();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = &stat[open + 1..close];
        let f: Vec<&str> = stat[close + 2..].split(' ').collect();
        let (Some(u), Some(s)) = (f.get(11), f.get(12)) else {
            continue;
        };
        let ms = (u.parse::<u64>().unwrap_or(0) + s.parse::<u64>().unwrap_or(0)) * 1000 / tick;
        if let Some(slot) = out.iter_mut().find(|(n, _)| comm.starts_with(n.as_str())) {
            slot.1 += ms;
        }
    }
    out
}

fn cpu_delta(before: &[(String, u64)], after: &[(String, u64)]) -> String {
    before
        .iter()
        .zip(after)
        .map(|((n, b), (_, a))| format!("{n} {} ms", a.saturating_sub(*b)))
        .collect::<Vec<_>>()
        .join(", ")
}

const CPU_OF: &[&str] = &["ployzd", "docker-registry", "dockerd", "containerd"];

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mb: usize = args.get(1).map_or(60, |a| a.parse().expect("MB"));
    let runs: usize = args.get(2).map_or(3, |a| a.parse().expect("RUNS"));
    // REPLICAS=1|2 to see one machine's pull or one peer transfer alone.
    let replicas: usize = std::env::var("REPLICAS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);

    let tb = Testbed::new(3);
    // BENCH_LOG=<filter>: the machines' RUST_LOG (e.g. `info,ployzd=debug`).
    let filter = std::env::var("BENCH_LOG").unwrap_or_else(|_| "info".into());
    let env: &[(&str, &str)] = &[("RUST_LOG", &filter)];
    let ms = cluster_on_with_env(&tb, "regbench", &[env, env, env]);
    let tmp = tempfile::tempdir().unwrap();
    let port = 20000 + (std::process::id() % 20000) as u16;
    let root = tmp.path().join("registry");
    std::fs::create_dir_all(&root).unwrap();
    let cfg = tmp.path().join("registry.yml");
    std::fs::write(
        &cfg,
        format!(
            "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 0.0.0.0:{port}\n",
            root.display()
        ),
    )
    .unwrap();
    let log = tmp.path().join("registry.log");
    let out = std::fs::File::create(&log).unwrap();
    let mut registry = Command::new("docker-registry")
        .arg("serve")
        .arg(&cfg)
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .expect("docker-registry");
    let local = format!("127.0.0.1:{port}");
    let up = eventually(Duration::from_secs(20), || {
        let o = Command::new("curl")
            .args(["-sf", &format!("http://{local}/v2/")])
            .output()
            .ok()?;
        o.status.success().then_some(())
    });
    assert!(up.is_some(), "registry did not come up");

    let image = noisy_busybox_image(tmp.path(), "bench", HTTPD, mb << 20);
    let size = std::fs::metadata(&image).unwrap().len();
    let remote = format!("{}:{port}", tb.gateway());
    ms[0].ctl_json(&["registry", "add", &remote, "--insecure"]);
    println!("image: {mb} MiB of noise, archive {size} bytes; registry {local} / {remote}");
    println!(
        "run  ployz_s  ployz_egress  docker_pull_s(median of 3)  docker_3_pulls_s  docker_egress"
    );
    let mut ratios_t = Vec::new();
    let mut ratios_b = Vec::new();
    for r in 0..runs {
        let repo = format!("bench/big{r}-{}:1", std::process::id());
        run(Command::new("skopeo")
            .args(["copy", "--dest-tls-verify=false"])
            .arg(format!("docker-archive:{}", image.display()))
            .arg(format!("docker://{local}/{repo}")));
        // ployz: 3 replicas on 3 machines.
        let off = log_len(&log);
        let cpu0 = cpu_ms(CPU_OF);
        let t = Instant::now();
        let name = format!("big{r}");
        // With --wait-secs 0 the deploy returns once the record is written
        // (exit 9: not all running yet); the polling below times the rest.
        let (code, v) = ms[0].try_deploy(&[
            &name,
            "--image",
            &format!("{remote}/{repo}"),
            "--replicas",
            &replicas.to_string(),
            "--wait-secs",
            "0",
        ]);
        assert!(matches!(code, Some(0 | 9)), "{v:#}");
        // Every 50 ms (each poll is a `ployzctl` call, ~10 ms): the time
        // measured overshoots the last instance's start by 25 ms on average.
        let running = eventually_every(Duration::from_millis(50), Duration::from_secs(300), || {
            let ls = ms[0].ctl_json(&["service", "ls"]);
            let svc = ls["services"]
                .as_array()?
                .iter()
                .find(|s| s["name"] == name.as_str())?
                .clone();
            let inst = svc["instances"].as_array()?;
            (inst.len() == replicas && inst.iter().all(|i| i["state"] == "running")).then_some(())
        });
        let ployz_s = t.elapsed().as_secs_f64();
        assert!(
            running.is_some(),
            "{name} did not reach 3 running instances"
        );
        if std::env::var_os("BENCH_TRACE").is_some() {
            println!("  cpu: {}", cpu_delta(&cpu0, &cpu_ms(CPU_OF)));
            for m in &ms {
                for l in m.log().lines().filter(|l| {
                    l.contains("image fetched")
                        || l.contains("image pulled")
                        || l.contains("root filesystem ready")
                        || l.contains("instance started")
                        || l.contains("operation started")
                        || l.contains("prefetch")
                }) {
                    println!("  {l}");
                }
            }
        }
        std::thread::sleep(Duration::from_millis(500));
        let ployz_b = egress(&log, off);
        ms[0].ctl_json(&["service", "rm", &format!("big{r}")]);
        // docker: the same image pulled three times, as by three machines.
        let reference = format!("{local}/{repo}");
        let off = log_len(&log);
        let mut pulls = Vec::new();
        let cpu0 = cpu_ms(CPU_OF);
        for _ in 0..3 {
            let _ = Command::new("docker")
                .args(["rmi", "-f", &reference])
                .output();
            let t = Instant::now();
            run(Command::new("docker").args(["pull", "-q", &reference]));
            pulls.push(t.elapsed().as_secs_f64());
        }
        if std::env::var_os("BENCH_TRACE").is_some() {
            println!(
                "  cpu of 3 docker pulls: {}",
                cpu_delta(&cpu0, &cpu_ms(CPU_OF))
            );
        }
        let _ = Command::new("docker")
            .args(["rmi", "-f", &reference])
            .output();
        std::thread::sleep(Duration::from_millis(500));
        let docker_b = egress(&log, off);
        let total: f64 = pulls.iter().sum();
        let one = median(pulls);
        println!("{r}    {ployz_s:.2}    {ployz_b}    {one:.2}    {total:.2}    {docker_b}");
        ratios_t.push(ployz_s / one);
        ratios_b.push(ployz_b as f64 / size as f64);
    }
    println!(
        "median ployz time / one docker pull: {:.2}x; ployz egress / image archive: {:.2}x",
        median(ratios_t),
        median(ratios_b)
    );
    let _ = registry.kill();
    let _ = registry.wait();
}
