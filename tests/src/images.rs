//! Image fixtures: a busybox image as a `docker save` archive, built from
//! Debian's static busybox (no registry, no dockerd needed).

use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

pub const BUSYBOX: &str = "/bin/busybox";

const TOOLS: &[&str] = &[
    "sh",
    "true",
    "sleep",
    "cat",
    "echo",
    "httpd",
    "ls",
    "wget",
    "mkdir",
    "head",
    "hostname",
    "ip",
    "ifconfig",
    "ps",
    "env",
    "sha256sum",
    "nc",
];

fn sha256_hex(b: &[u8]) -> String {
    format!("{:x}", Sha256::digest(b))
}

/// A tar header owned by root, dated 0: the archive's bytes depend only on its content.
fn header(size: u64, mode: u32, kind: tar::EntryType) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_size(size);
    h.set_mode(mode);
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    h.set_entry_type(kind);
    h
}

fn append(b: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8], mode: u32) {
    let mut h = header(data.len() as u64, mode, tar::EntryType::Regular);
    b.append_data(&mut h, path, data).expect("tar append");
}

fn append_dir(b: &mut tar::Builder<Vec<u8>>, path: &str) {
    let mut h = header(0, 0o755, tar::EntryType::Directory);
    b.append_data(&mut h, path, &[][..]).expect("tar append");
}

fn append_symlink(b: &mut tar::Builder<Vec<u8>>, path: &str, target: &str) {
    let mut h = header(0, 0o777, tar::EntryType::Symlink);
    b.append_link(&mut h, path, target).expect("tar append");
}

/// Writes `dir/<name>.tar`: a `docker save` archive of a busybox image
/// tagged `name:latest`, whose default command is `cmd`.
pub fn busybox_image(dir: &Path, name: &str, cmd: &[&str]) -> PathBuf {
    padded_busybox_image(dir, name, cmd, 0)
}

/// [`busybox_image`] with a file of `pad` bytes in its layer (`/pad`), for
/// an image whose import takes a while.
pub fn padded_busybox_image(dir: &Path, name: &str, cmd: &[&str], pad: usize) -> PathBuf {
    let data: Vec<u8> = (0..pad).map(|i| (i % 251) as u8).collect();
    busybox_image_with(dir, name, cmd, data, &[])
}

/// [`busybox_image`] with extra executables: `(path in the image, bytes)`.
pub fn busybox_image_plus(
    dir: &Path,
    name: &str,
    cmd: &[&str],
    files: &[(&str, &[u8])],
) -> PathBuf {
    busybox_image_with(dir, name, cmd, Vec::new(), files)
}

/// [`busybox_image`] with `pad` bytes that do not compress (xorshift
/// noise) in `/pad`: an image whose registry size is its real size.
pub fn noisy_busybox_image(dir: &Path, name: &str, cmd: &[&str], pad: usize) -> PathBuf {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut data = Vec::with_capacity(pad + 8);
    while data.len() < pad {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        data.extend_from_slice(&x.to_le_bytes());
    }
    data.truncate(pad);
    busybox_image_with(dir, name, cmd, data, &[])
}

fn busybox_image_with(
    dir: &Path,
    name: &str,
    cmd: &[&str],
    pad: Vec<u8>,
    files: &[(&str, &[u8])],
) -> PathBuf {
    assert!(
        Path::new(BUSYBOX).exists(),
        "{BUSYBOX} is missing: install Debian's busybox-static (apt-get install -y busybox-static)"
    );
    let busybox = std::fs::read(BUSYBOX).expect("read busybox");
    let mut layer = tar::Builder::new(Vec::new());
    for d in ["bin", "proc", "dev", "sys", "tmp", "etc", "www", "data"] {
        append_dir(&mut layer, d);
    }
    append(&mut layer, "bin/busybox", &busybox, 0o755);
    for t in TOOLS {
        append_symlink(&mut layer, &format!("bin/{t}"), "busybox");
    }
    append(
        &mut layer,
        "etc/passwd",
        b"root:x:0:0:root:/:/bin/sh\n",
        0o644,
    );
    append(
        &mut layer,
        "www/index.html",
        b"hello from a ployz workload\n",
        0o644,
    );
    for (path, bytes) in files {
        append(&mut layer, path.trim_start_matches('/'), bytes, 0o755);
    }
    if !pad.is_empty() {
        // Not all zeros, so that nothing on the way can shortcut it.
        append(&mut layer, "pad", &pad, 0o644);
    }
    let layer = layer.into_inner().expect("layer");
    let layer_hex = sha256_hex(&layer);
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": ["PATH=/bin", "FIXTURE=busybox"],
            "Cmd": cmd,
        },
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{layer_hex}")]},
    });
    let config = serde_json::to_vec(&config).unwrap();
    let config_hex = sha256_hex(&config);
    let manifest = serde_json::json!([{
        "Config": format!("{config_hex}.json"),
        "RepoTags": [format!("{name}:latest")],
        "Layers": [format!("{layer_hex}/layer.tar")],
    }]);
    let mut out = tar::Builder::new(Vec::new());
    append_dir(&mut out, &layer_hex);
    append(&mut out, &format!("{layer_hex}/layer.tar"), &layer, 0o644);
    append(&mut out, &format!("{config_hex}.json"), &config, 0o644);
    append(
        &mut out,
        "manifest.json",
        &serde_json::to_vec(&manifest).unwrap(),
        0o644,
    );
    let bytes = out.into_inner().expect("archive");
    let path = dir.join(format!("{name}.tar"));
    std::fs::write(&path, bytes).expect("write image");
    path
}
