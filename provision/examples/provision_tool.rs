//! A thin driver over the library, for scripts (provision/bench/init-time.sh)
//! until `ployzctl machine init` / `ployzctl release pack` are wired:
//!
//! ```text
//! provision_tool pack --out DIR --version V NAME=PATH...
//! provision_tool init --target USER@HOST --token T --release-url URL
//!                     [--version V] [--identity FILE] [--known-hosts FILE]
//!                     [--service-mode system|user] [--runtime host|docker]
//! ```
//! `init` prints progress lines (`<elapsed ms> <step>`) on stderr and the
//! joined machine id on stdout.

use ployz_provision::provision::{provision_machine, InstallSource, ProvisionOptions};
use ployz_provision::release::{host_triple, pack_release, ReleaseLocation};
use ployz_provision::ssh::SshOptions;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

fn usage() -> ! {
    eprintln!("usage: provision_tool pack --out DIR --version V NAME=PATH... | init --target T --token T --release-url URL [--version V] [--identity F] [--known-hosts F] [--service-mode M] [--runtime R]");
    std::process::exit(2)
}

fn flags(args: &[String]) -> (HashMap<String, String>, Vec<String>) {
    let mut f = HashMap::new();
    let mut rest = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.strip_prefix("--") {
            Some(k) => {
                let v = it.next().cloned().unwrap_or_else(|| usage());
                f.insert(k.to_string(), v);
            }
            None => rest.push(a.clone()),
        }
    }
    (f, rest)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((cmd, args)) = args.split_first() else {
        usage()
    };
    let (f, rest) = flags(args);
    let code = match cmd.as_str() {
        "pack" => {
            let out = PathBuf::from(f.get("out").unwrap_or_else(|| usage()));
            let version = f.get("version").cloned().unwrap_or_else(|| usage());
            let bins: Vec<(String, PathBuf)> = rest
                .iter()
                .map(|b| {
                    let (n, p) = b.split_once('=').unwrap_or_else(|| usage());
                    (n.to_string(), PathBuf::from(p))
                })
                .collect();
            let refs: Vec<(&str, &Path)> = bins
                .iter()
                .map(|(n, p)| (n.as_str(), p.as_path()))
                .collect();
            match pack_release(&out, &version, &host_triple(), &refs) {
                Ok(p) => {
                    println!("{}", p.url);
                    0
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    1
                }
            }
        }
        "init" => {
            let target = f
                .get("target")
                .unwrap_or_else(|| usage())
                .parse()
                .unwrap_or_else(|e| {
                    eprintln!("error: {e}");
                    std::process::exit(2)
                });
            let token = f.get("token").cloned().unwrap_or_else(|| usage());
            let location: ReleaseLocation =
                match ReleaseLocation::from_flag_or_env(f.get("release-url").map(String::as_str)) {
                    Ok(l) => l,
                    Err(e) => {
                        eprintln!("error: {e}");
                        std::process::exit(2)
                    }
                };
            let kh = f.get("known-hosts").map(PathBuf::from).unwrap_or_else(|| {
                PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into()))
                    .join(".local/share/ployz/known_hosts")
            });
            let mut ssh = SshOptions::new(kh);
            ssh.identity = f.get("identity").map(PathBuf::from);
            let mut o = ProvisionOptions::new(
                target,
                ssh,
                InstallSource::Release {
                    location,
                    version: f.get("version").cloned().unwrap_or_else(|| "latest".into()),
                },
            );
            if let Some(m) = f.get("service-mode") {
                o.service_mode = m.parse().unwrap_or_else(|e| {
                    eprintln!("error: {e}");
                    std::process::exit(2)
                });
            }
            if let Some(r) = f.get("runtime") {
                o.runtime = r.clone();
            }
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("error: tokio runtime: {e}");
                    std::process::exit(1)
                }
            };
            let start = Instant::now();
            let r = rt.block_on(provision_machine(&o, &token, |s| {
                eprintln!("{:>6} {s}", start.elapsed().as_millis());
            }));
            match r {
                Ok(p) => {
                    println!("{}", p.machine_id);
                    0
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    1
                }
            }
        }
        _ => usage(),
    };
    std::process::exit(code);
}
