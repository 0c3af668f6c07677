//! The image store against real archives built here from Debian's static
//! busybox (and, when a dockerd runs, a real `docker save`): no mocks.

use ployz_runtime::image::{
    layer_diff_id, layer_diff_id_unpacking, sha256_file, unpack_archive_stream, ImageError,
    ImageFormat, ImageInfo, ImageStore,
};
use sha2::{Digest, Sha256};
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, UNIX_EPOCH};

const BUSYBOX: &str = "/bin/busybox";
const MOTD_MTIME: u64 = 1_600_000_000;

fn busybox() -> Vec<u8> {
    assert!(
        Path::new(BUSYBOX).exists(),
        "{BUSYBOX} is missing: install Debian's static busybox (apt-get install busybox-static)"
    );
    let out = Command::new(BUSYBOX).arg("--help").output().unwrap();
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("dynamically"),
        "{BUSYBOX} is not static: apt-get install busybox-static"
    );
    fs::read(BUSYBOX).unwrap()
}

fn sha256(b: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(b))
}

fn hex(digest: &str) -> &str {
    digest.strip_prefix("sha256:").unwrap()
}

fn running_as_root() -> bool {
    fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// A tar built in memory; `raw` writes names the tar crate would refuse (`..`).
struct TarBuf(tar::Builder<Vec<u8>>);

impl TarBuf {
    fn new() -> Self {
        TarBuf(tar::Builder::new(Vec::new()))
    }
    fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_mtime(MOTD_MTIME - 1000);
        h
    }
    fn dir(&mut self, path: &str, mode: u32) -> &mut Self {
        let mut h = Self::header(tar::EntryType::Directory, mode, 0);
        self.0.append_data(&mut h, path, std::io::empty()).unwrap();
        self
    }
    fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> &mut Self {
        let mut h = Self::header(tar::EntryType::Regular, mode, data.len() as u64);
        self.0.append_data(&mut h, path, data).unwrap();
        self
    }
    fn file_with(
        &mut self,
        path: &str,
        data: &[u8],
        f: impl FnOnce(&mut tar::Header),
    ) -> &mut Self {
        let mut h = Self::header(tar::EntryType::Regular, 0o644, data.len() as u64);
        f(&mut h);
        self.0.append_data(&mut h, path, data).unwrap();
        self
    }
    fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
        let mut h = Self::header(tar::EntryType::Symlink, 0o777, 0);
        self.0.append_link(&mut h, path, target).unwrap();
        self
    }
    fn hardlink(&mut self, path: &str, target: &str) -> &mut Self {
        let mut h = Self::header(tar::EntryType::Link, 0o644, 0);
        self.0.append_link(&mut h, path, target).unwrap();
        self
    }
    /// An entry with its name and link name written byte for byte.
    fn raw(&mut self, kind: tar::EntryType, path: &str, link: &str, data: &[u8]) -> &mut Self {
        let mut h = Self::header(kind, 0o644, data.len() as u64);
        let old = h.as_old_mut();
        old.name[..path.len()].copy_from_slice(path.as_bytes());
        old.linkname[..link.len()].copy_from_slice(link.as_bytes());
        h.set_cksum();
        self.0.append(&h, data).unwrap();
        self
    }
    fn finish(self) -> Vec<u8> {
        self.0.into_inner().unwrap()
    }
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// `data` compressed by the `zstd` CLI (scripts/setup installs it), with a
/// content checksum: the reference encoder, not the decoder under test.
fn zstd(data: &[u8]) -> Vec<u8> {
    let mut child = Command::new("zstd")
        .args(["-q", "-c", "--check", "-3"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("the zstd CLI is needed by this test: apt-get install zstd (scripts/setup)");
    let mut stdin = child.stdin.take().unwrap();
    let data = data.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&data).unwrap());
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    assert!(out.status.success(), "zstd failed: {out:?}");
    assert_eq!(&out.stdout[..4], [0x28, 0xb5, 0x2f, 0xfd]);
    out.stdout
}

/// Layer 1: busybox with a shell symlink, a hard link, a file to be whited
/// out, a directory to be made opaque, a setuid file and a file owned by 1000.
fn layer1(bb: &[u8]) -> Vec<u8> {
    let mut t = TarBuf::new();
    t.dir("bin", 0o755)
        .file("bin/busybox", 0o755, bb)
        .symlink("bin/sh", "busybox")
        .hardlink("bin/cat", "bin/busybox")
        .file("bin/suid", 0o4755, b"#!/bin/sh\n")
        .dir("etc", 0o755)
        .file("etc/motd", 0o644, b"v1\n")
        .file("etc/remove-me", 0o644, b"x")
        .dir("tmp", 0o1777)
        .dir("data", 0o755)
        .dir("data/old", 0o755)
        .file("data/old/a", 0o644, b"a")
        .dir("home", 0o755)
        .file_with("home/user-file", b"mine", |h| {
            h.set_uid(1000);
            h.set_gid(1000);
        })
        .dir("usr", 0o755)
        .symlink("usr/bin", "../bin");
    t.finish()
}

/// Layer 2: whiteout, opaque directory, an absolute symlink, a changed file,
/// a file written through an in-root symlink, an absolute entry path.
fn layer2() -> Vec<u8> {
    let mut t = TarBuf::new();
    t.dir("etc", 0o755)
        .file("etc/.wh.remove-me", 0o644, b"")
        .file_with("etc/motd", b"v2\n", |h| h.set_mtime(MOTD_MTIME))
        .dir("data/old", 0o755)
        .file("data/old/.wh..wh..opq", 0o644, b"")
        .file("data/old/b", 0o644, b"b")
        .symlink("bin/ls", "/bin/busybox")
        .file("usr/bin/through-link", 0o755, b"via usr/bin")
        .raw(tar::EntryType::Regular, "/etc/absolute", "", b"abs");
    t.finish()
}

fn config_json(cmd: &[&str], diff_ids: &[String]) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "architecture": host_arch(),
        "os": "linux",
        "config": {
            "Cmd": cmd,
            "Entrypoint": null,
            "Env": ["PATH=/usr/bin:/bin", "GREETING=a=b"],
            "WorkingDir": "/data",
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))
    .unwrap()
}

/// The two-layer test image.
struct Fixture {
    layers: Vec<Vec<u8>>,
    config: Vec<u8>,
}

impl Fixture {
    fn new() -> Self {
        let layers = vec![layer1(&busybox()), layer2()];
        let diff_ids: Vec<String> = layers.iter().map(|l| sha256(l)).collect();
        Fixture {
            config: config_json(&["sh", "-c", "echo hello"], &diff_ids),
            layers,
        }
    }
}

/// A `docker save` archive, manifest last (docker's order), with the second
/// layer reached through a symlink between members as docker does for shared layers.
fn docker_archive(layers: &[Vec<u8>], config: &[u8], tags: &[&str]) -> Vec<u8> {
    let mut t = TarBuf::new();
    let mut layer_paths = Vec::new();
    for (i, layer) in layers.iter().enumerate() {
        let id = hex(&sha256(layer)).to_string();
        t.dir(&id, 0o755);
        if i == 1 {
            t.dir("shared", 0o755);
            t.file("shared/layer.tar", 0o644, layer);
            t.symlink(&format!("{id}/layer.tar"), "../shared/layer.tar");
        } else {
            t.file(&format!("{id}/layer.tar"), 0o644, layer);
        }
        layer_paths.push(format!("{id}/layer.tar"));
    }
    let config_name = format!("{}.json", hex(&sha256(config)));
    t.file(&config_name, 0o644, config);
    let manifest = serde_json::json!([{
        "Config": config_name,
        "RepoTags": tags,
        "Layers": layer_paths,
    }]);
    t.file("manifest.json", 0o644, manifest.to_string().as_bytes());
    t.finish()
}

fn descriptor(media_type: &str, blob: &[u8]) -> serde_json::Value {
    serde_json::json!({"mediaType": media_type, "digest": sha256(blob), "size": blob.len()})
}

fn manifest_json(config: &[u8], layers: &[(Vec<u8>, &str)]) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": descriptor("application/vnd.oci.image.config.v1+json", config),
        "layers": layers.iter().map(|(b, mt)| descriptor(mt, b)).collect::<Vec<_>>(),
    }))
    .unwrap()
}

const LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
const LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// The fixture as an OCI layout directory: index.json → manifest directly.
fn oci_dir(fx: &Fixture, dir: &Path) {
    let blobs = dir.join("blobs/sha256");
    fs::create_dir_all(&blobs).unwrap();
    let layers: Vec<(Vec<u8>, &str)> = fx.layers.iter().map(|l| (l.clone(), LAYER_TAR)).collect();
    let manifest = manifest_json(&fx.config, &layers);
    for blob in fx.layers.iter().chain([&fx.config, &manifest]) {
        fs::write(blobs.join(hex(&sha256(blob))), blob).unwrap();
    }
    let mut desc = descriptor(MANIFEST, &manifest);
    desc["annotations"] = serde_json::json!({
        "io.containerd.image.name": "docker.io/ployz/oci:v1",
        "org.opencontainers.image.ref.name": "v1",
    });
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [desc]});
    fs::write(dir.join("index.json"), index.to_string()).unwrap();
    fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
}

/// The fixture as an OCI tar: index.json → nested image index (a foreign
/// platform first, then this machine's) → manifest with a gzip first layer.
fn oci_tar(fx: &Fixture) -> Vec<u8> {
    let gz = gzip(&fx.layers[0]);
    let layers = vec![(gz.clone(), LAYER_GZIP), (fx.layers[1].clone(), LAYER_TAR)];
    let manifest = manifest_json(&fx.config, &layers);
    let diff_ids: Vec<String> = fx.layers.iter().map(|l| sha256(l)).collect();
    let wrong_config = config_json(&["wrong", "platform"], &diff_ids);
    let wrong_manifest = manifest_json(&wrong_config, &layers);
    let mut wrong = descriptor(MANIFEST, &wrong_manifest);
    wrong["platform"] = serde_json::json!({"os": "linux", "architecture": "no-such-arch"});
    let mut right = descriptor(MANIFEST, &manifest);
    right["platform"] = serde_json::json!({"os": "linux", "architecture": host_arch()});
    let nested = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [wrong, right],
    }))
    .unwrap();
    let mut top = descriptor("application/vnd.oci.image.index.v1+json", &nested);
    top["annotations"] =
        serde_json::json!({"org.opencontainers.image.ref.name": "ployz/oci-tar:v2"});
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [top]});

    let mut t = TarBuf::new();
    // index.json before the blobs it names: members may come in any order.
    t.file("index.json", 0o644, index.to_string().as_bytes());
    for blob in [
        &gz,
        &fx.layers[1],
        &fx.config,
        &manifest,
        &wrong_config,
        &wrong_manifest,
        &nested,
    ] {
        t.file(&format!("blobs/sha256/{}", hex(&sha256(blob))), 0o644, blob);
    }
    t.file("oci-layout", 0o644, br#"{"imageLayoutVersion":"1.0.0"}"#);
    t.finish()
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    fs::write(&p, bytes).unwrap();
    p
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// The store at `root` lists no image and holds no blob, root filesystem or
/// temp file (`case` names the case in a failure).
fn assert_nothing_stored(store: &ImageStore, root: &Path, case: &str) {
    assert!(store.list().unwrap().is_empty(), "{case}");
    for sub in ["blobs", "rootfs", "tmp"] {
        assert!(files_in(&root.join(sub)).is_empty(), "{case}: {sub}");
    }
}

fn assert_config(info: &ImageInfo, fx: &Fixture) {
    assert_eq!(info.image_id, sha256(&fx.config));
    assert_eq!(info.config.cmd, ["sh", "-c", "echo hello"]);
    assert!(info.config.entrypoint.is_empty());
    assert_eq!(
        info.config.env,
        [
            ("PATH".to_string(), "/usr/bin:/bin".to_string()),
            ("GREETING".to_string(), "a=b".to_string())
        ]
    );
    assert_eq!(info.config.working_dir.as_deref(), Some("/data"));
}

/// What both layers together must produce.
fn assert_rootfs(root: &Path) {
    let bb = busybox();
    assert_eq!(fs::read(root.join("bin/busybox")).unwrap(), bb);
    let out = Command::new(root.join("bin/busybox"))
        .args(["echo", "ok"])
        .output()
        .unwrap();
    assert_eq!(out.stdout, b"ok\n", "the unpacked busybox runs");
    assert_eq!(
        fs::read_link(root.join("bin/sh")).unwrap(),
        Path::new("busybox")
    );
    assert_eq!(
        fs::read_link(root.join("bin/ls")).unwrap(),
        Path::new("/bin/busybox")
    );
    let ino = |p: &str| fs::metadata(root.join(p)).unwrap().ino();
    assert_eq!(ino("bin/cat"), ino("bin/busybox"), "hard link");
    assert_eq!(fs::read(root.join("etc/motd")).unwrap(), b"v2\n");
    let motd_mtime = fs::metadata(root.join("etc/motd"))
        .unwrap()
        .modified()
        .unwrap();
    assert_eq!(motd_mtime, UNIX_EPOCH + Duration::from_secs(MOTD_MTIME));
    assert!(!root.join("etc/remove-me").exists(), "whiteout");
    assert!(!root.join("etc/.wh.remove-me").exists());
    assert!(!root.join("data/old/a").exists(), "opaque directory");
    assert_eq!(fs::read(root.join("data/old/b")).unwrap(), b"b");
    assert!(!root.join("data/old/.wh..wh..opq").exists());
    assert!(fs::symlink_metadata(root.join("usr/bin"))
        .unwrap()
        .is_symlink());
    assert_eq!(
        fs::read(root.join("bin/through-link")).unwrap(),
        b"via usr/bin",
        "written through the in-root symlink usr/bin -> ../bin"
    );
    assert_eq!(fs::read(root.join("etc/absolute")).unwrap(), b"abs");
    let mode = |p: &str| {
        fs::symlink_metadata(root.join(p))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    };
    assert_eq!(mode("tmp"), 0o1777);
    assert_eq!(mode("bin/busybox"), 0o755);
    if running_as_root() {
        assert_eq!(mode("bin/suid"), 0o4755);
        let m = fs::metadata(root.join("home/user-file")).unwrap();
        assert_eq!((m.uid(), m.gid()), (1000, 1000));
    }
}

#[test]
fn docker_save_archive_with_two_layers() {
    let fx = Fixture::new();
    let dir = tempfile::tempdir().unwrap();
    let archive = docker_archive(&fx.layers, &fx.config, &["busybox:latest", "ployz/test:v1"]);
    let path = write(dir.path(), "image.tar", &archive);
    let store = ImageStore::open(dir.path().join("store")).unwrap();
    for sub in ["blobs", "rootfs", "tmp"] {
        let m = fs::metadata(dir.path().join("store").join(sub)).unwrap();
        assert_eq!(m.permissions().mode() & 0o777, 0o700, "{sub}");
    }

    let info = store.import_path(&path).unwrap();
    assert_eq!(info.digest, sha256(&archive));
    assert_eq!(info.digest, sha256_file(&path).unwrap());
    assert_eq!(info.size, archive.len() as u64);
    assert_eq!(info.format, ImageFormat::DockerArchive);
    assert_eq!(info.names, ["busybox:latest", "ployz/test:v1"]);
    assert_config(&info, &fx);
    assert_eq!(
        fs::read(store.blob_path(&info.digest).unwrap()).unwrap(),
        archive
    );
    assert_eq!(store.info(&info.digest).unwrap(), Some(info.clone()));

    let root = store.rootfs(&info.digest).unwrap();
    assert_eq!(
        root,
        dir.path().join("store/rootfs").join(hex(&info.digest))
    );
    assert_rootfs(&root);
    // Cached: the second call returns the same tree without rebuilding it.
    fs::write(root.join("marker"), "x").unwrap();
    assert_eq!(store.rootfs(&info.digest).unwrap(), root);
    assert!(root.join("marker").exists());
    fs::remove_file(root.join("marker")).unwrap();
    assert!(files_in(&dir.path().join("store/tmp")).is_empty());

    // Concurrent callers on a fresh store all get the same complete tree.
    let store2 = ImageStore::open(dir.path().join("store2")).unwrap();
    let info2 = store2.import_path(&path).unwrap();
    let roots: Vec<PathBuf> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..3)
            .map(|_| s.spawn(|| store2.rootfs(&info2.digest).unwrap()))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(roots.iter().all(|r| r == &roots[0]));
    assert_rootfs(&roots[0]);
    assert!(files_in(&dir.path().join("store2/tmp")).is_empty());

    store.remove(&info.digest).unwrap();
    assert!(store.blob_path(&info.digest).is_none());
    assert_eq!(store.info(&info.digest).unwrap(), None);
    assert!(!root.exists());
    assert!(store.list().unwrap().is_empty());
    store.remove(&info.digest).unwrap(); // idempotent
    assert!(matches!(
        store.rootfs(&info.digest),
        Err(ImageError::UnknownImage { .. })
    ));
}

#[test]
fn oci_layout_directory_and_oci_tar_with_gzip_layer() {
    let fx = Fixture::new();
    let dir = tempfile::tempdir().unwrap();
    let store = ImageStore::open(dir.path().join("store")).unwrap();

    let layout = dir.path().join("layout");
    oci_dir(&fx, &layout);
    let from_dir = store.import_path(&layout).unwrap();
    assert_eq!(from_dir.format, ImageFormat::OciArchive);
    assert_eq!(from_dir.names, ["docker.io/ployz/oci:v1"]);
    assert_config(&from_dir, &fx);
    assert_rootfs(&store.rootfs(&from_dir.digest).unwrap());

    // The packed archive is deterministic: file times do not matter.
    let f = fs::File::options()
        .write(true)
        .open(layout.join("oci-layout"))
        .unwrap();
    f.set_modified(UNIX_EPOCH + Duration::from_secs(12345))
        .unwrap();
    let again = store.import_path(&layout).unwrap();
    assert_eq!(again, from_dir);
    // And it is a tar with the layout at its root.
    let blob = fs::File::open(store.blob_path(&from_dir.digest).unwrap()).unwrap();
    let mut names = Vec::new();
    for e in tar::Archive::new(blob).entries().unwrap() {
        let e = e.unwrap();
        assert_eq!(e.header().mtime().unwrap(), 0);
        assert_eq!(e.header().uid().unwrap(), 0);
        names.push(e.path().unwrap().to_string_lossy().into_owned());
    }
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted);
    assert!(names.contains(&"index.json".to_string()));
    assert!(names.contains(&"oci-layout".to_string()));

    let tar_path = write(dir.path(), "oci.tar", &oci_tar(&fx));
    let from_tar = store.import_path(&tar_path).unwrap();
    assert_eq!(from_tar.format, ImageFormat::OciArchive);
    assert_eq!(from_tar.names, ["ployz/oci-tar:v2"]);
    assert_config(&from_tar, &fx); // this machine's platform, not the first listed
    assert_rootfs(&store.rootfs(&from_tar.digest).unwrap());
    assert_eq!(store.list().unwrap().len(), 2);
}

const LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";

/// An OCI layout directory of `fx`'s config with `layers` (as blobs, with
/// their media types), tagged `name`.
fn oci_dir_with(fx: &Fixture, dir: &Path, layers: &[(Vec<u8>, &str)], name: &str) {
    let blobs = dir.join("blobs/sha256");
    fs::create_dir_all(&blobs).unwrap();
    let manifest = manifest_json(&fx.config, layers);
    for blob in layers.iter().map(|(b, _)| b).chain([&fx.config, &manifest]) {
        fs::write(blobs.join(hex(&sha256(blob))), blob).unwrap();
    }
    let mut desc = descriptor(MANIFEST, &manifest);
    desc["annotations"] = serde_json::json!({ "io.containerd.image.name": name });
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [desc]});
    fs::write(dir.join("index.json"), index.to_string()).unwrap();
    fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
}

#[test]
fn oci_layout_with_zstd_layers() {
    let fx = Fixture::new();
    let dir = tempfile::tempdir().unwrap();
    let store = ImageStore::open(dir.path().join("store")).unwrap();

    // Layer 1: one frame. Layer 2: two frames with a skippable frame between
    // them (a valid zstd stream, as `zstd -d` reads it).
    let z1 = zstd(&fx.layers[0]);
    let (a, b) = fx.layers[1].split_at(fx.layers[1].len() / 2);
    let mut z2 = zstd(a);
    z2.extend_from_slice(&0x184D_2A50u32.to_le_bytes());
    z2.extend_from_slice(&5u32.to_le_bytes());
    z2.extend_from_slice(b"skip!");
    z2.extend_from_slice(&zstd(b));
    let layout = dir.path().join("zstd");
    oci_dir_with(
        &fx,
        &layout,
        &[(z1.clone(), LAYER_ZSTD), (z2, LAYER_ZSTD)],
        "docker.io/ployz/zstd:v1",
    );
    let info = store.import_path(&layout).unwrap();
    assert_eq!(info.names, ["docker.io/ployz/zstd:v1"]);
    assert_config(&info, &fx);
    assert_rootfs(&store.rootfs(&info.digest).unwrap());

    // A damaged zstd layer (its own digest is right, its content is not) is
    // refused when unpacked (layers are checked then), and leaves no rootfs.
    let mut bad = z1.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0xff;
    let layout = dir.path().join("zstd-bad");
    oci_dir_with(
        &fx,
        &layout,
        &[(bad, LAYER_ZSTD), (zstd(&fx.layers[1]), LAYER_ZSTD)],
        "docker.io/ployz/zstd-bad:v1",
    );
    let bad = store.import_path(&layout).unwrap();
    let err = store.rootfs(&bad.digest).unwrap_err().to_string();
    assert!(err.contains("layer"), "{err}");
    eprintln!("damaged: {err}");
    // A cut-short one too.
    let layout = dir.path().join("zstd-short");
    oci_dir_with(
        &fx,
        &layout,
        &[
            (z1[..z1.len() - 100].to_vec(), LAYER_ZSTD),
            (zstd(&fx.layers[1]), LAYER_ZSTD),
        ],
        "docker.io/ployz/zstd-short:v1",
    );
    let short = store.import_path(&layout).unwrap();
    let err = store.rootfs(&short.digest).unwrap_err().to_string();
    assert!(err.contains("layer"), "{err}");
    eprintln!("cut short: {err}");
}

#[test]
fn import_is_idempotent_and_validates_first() {
    let fx = Fixture::new();
    let dir = tempfile::tempdir().unwrap();
    let store = ImageStore::open(dir.path().join("store")).unwrap();
    let archive = docker_archive(&fx.layers, &fx.config, &["ployz/test:v1"]);
    let a = write(dir.path(), "a.tar", &archive);
    let b = write(dir.path(), "b.tar", &archive);
    let first = store.import_path(&a).unwrap();
    assert_eq!(store.import_path(&a).unwrap(), first);
    assert_eq!(store.import_path(&b).unwrap(), first);
    let h = hex(&first.digest);
    assert_eq!(
        files_in(&dir.path().join("store/blobs")),
        [h.to_string(), format!("{h}.json")]
    );
    assert!(files_in(&dir.path().join("store/tmp")).is_empty());
    assert_eq!(store.list().unwrap(), std::slice::from_ref(&first));

    // Lost metadata is rebuilt from the archive.
    fs::remove_file(dir.path().join("store/blobs").join(format!("{h}.json"))).unwrap();
    assert_eq!(store.info(&first.digest).unwrap(), Some(first.clone()));

    // Broken archives are refused before anything is stored.
    let mut missing_layer = TarBuf::new();
    let cfg = format!("{}.json", hex(&sha256(&fx.config)));
    missing_layer.file(&cfg, 0o644, &fx.config).file(
        "manifest.json",
        0o644,
        serde_json::json!([{"Config": cfg, "RepoTags": null, "Layers": ["l1/layer.tar", "l2/layer.tar"]}])
            .to_string()
            .as_bytes(),
    );
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "missing-layer.tar",
            missing_layer.finish(),
            "l1/layer.tar` is missing",
        ),
        (
            "plain.tar",
            {
                let mut t = TarBuf::new();
                t.file("hello.txt", 0o644, b"hi");
                t.finish()
            },
            "neither manifest.json",
        ),
        (
            "text.txt",
            b"just some text, not a tar archive at all".repeat(20),
            "not",
        ),
        ("gzipped.tar.gz", gzip(&archive), "gunzip"),
    ];
    for (name, bytes, why) in cases {
        let p = write(dir.path(), name, &bytes);
        let err = store.import_path(&p).unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(err, ImageError::NotAnImage { .. }),
            "{name}: {msg}"
        );
        assert!(msg.contains(why), "{name}: {msg}");
        assert!(msg.contains("docker save"), "{name}: {msg}");
        assert!(msg.contains(name), "names the user's file: {msg}");
    }
    let empty_dir = dir.path().join("empty");
    fs::create_dir(&empty_dir).unwrap();
    assert!(matches!(
        store.import_path(&empty_dir),
        Err(ImageError::NotAnImage { .. })
    ));
    assert!(matches!(
        store.import_path(&dir.path().join("nope.tar")),
        Err(ImageError::NotFound(_))
    ));
    assert_eq!(store.list().unwrap(), [first]);
    assert_eq!(files_in(&dir.path().join("store/blobs")).len(), 2);
    assert!(files_in(&dir.path().join("store/tmp")).is_empty());
}

#[test]
fn insert_verified_checks_the_digest_and_the_content() {
    let fx = Fixture::new();
    let dir = tempfile::tempdir().unwrap();
    let store = ImageStore::open(dir.path().join("store")).unwrap();
    let archive = docker_archive(&fx.layers, &fx.config, &["ployz/test:v1"]);
    let digest = sha256(&archive);
    let nothing_stored =
        |store: &ImageStore| assert_nothing_stored(store, &dir.path().join("store"), "");

    let tmp = store.temp_path();
    assert!(tmp.starts_with(dir.path().join("store")));
    fs::write(&tmp, &archive).unwrap();
    let wrong = format!("sha256:{}", "0".repeat(64));
    match store.insert_verified(&tmp, &wrong) {
        Err(ImageError::DigestMismatch { expected, actual }) => {
            assert_eq!(expected, wrong);
            assert_eq!(actual, digest);
        }
        other => panic!("expected a digest mismatch, got {other:?}"),
    }
    assert!(!tmp.exists(), "the bad download is removed");
    nothing_stored(&store);

    // A truncated download.
    let tmp = store.temp_path();
    fs::write(&tmp, &archive[..archive.len() / 2]).unwrap();
    assert!(matches!(
        store.insert_verified(&tmp, &digest),
        Err(ImageError::DigestMismatch { .. })
    ));
    nothing_stored(&store);

    // Right digest, but not an image.
    let junk = b"not an image".to_vec();
    let tmp = store.temp_path();
    fs::write(&tmp, &junk).unwrap();
    assert!(matches!(
        store.insert_verified(&tmp, &sha256(&junk)),
        Err(ImageError::NotAnImage { .. })
    ));
    assert!(!tmp.exists());
    nothing_stored(&store);

    let tmp = store.temp_path();
    fs::write(&tmp, &archive).unwrap();
    assert!(matches!(
        store.insert_verified(&tmp, "sha256:abc"),
        Err(ImageError::InvalidDigest { .. })
    ));
    nothing_stored(&store);

    let tmp = store.temp_path();
    fs::write(&tmp, &archive).unwrap();
    let info = store.insert_verified(&tmp, &digest).unwrap();
    assert!(!tmp.exists());
    assert_eq!(info.digest, digest);
    assert_eq!(info.names, ["ployz/test:v1"]);
    // The same as importing the file on another machine.
    let other = ImageStore::open(dir.path().join("other")).unwrap();
    let path = write(dir.path(), "image.tar", &archive);
    assert_eq!(other.import_path(&path).unwrap(), info);
    assert_rootfs(&store.rootfs(&digest).unwrap());
}

/// An archive received from a peer, its sha256 checked in transfer: stored
/// and parsed without a second hash. A packed registry archive: its blobs
/// were checked on arrival, so only the diff_ids are, and a layer that does
/// not unpack to its diff_id is still refused with nothing stored.
#[test]
fn received_and_packed_archives_skip_what_was_checked_already() {
    let fx = Fixture::new();
    let dir = tempfile::tempdir().unwrap();
    let store = ImageStore::open(dir.path().join("store")).unwrap();
    let nothing_stored =
        |store: &ImageStore| assert_nothing_stored(store, &dir.path().join("store"), "");
    let archive = docker_archive(&fx.layers, &fx.config, &["ployz/test:v1"]);
    let digest = sha256(&archive);

    // Not an image, whatever digest the sender vouched for.
    let junk = b"not an image".to_vec();
    let tmp = store.temp_path();
    fs::write(&tmp, &junk).unwrap();
    assert!(matches!(
        store.insert_received(&tmp, &sha256(&junk)),
        Err(ImageError::NotAnImage { .. })
    ));
    assert!(!tmp.exists());
    nothing_stored(&store);
    let tmp = store.temp_path();
    fs::write(&tmp, &archive).unwrap();
    assert!(matches!(
        store.insert_received(&tmp, "sha256:abc"),
        Err(ImageError::InvalidDigest { .. })
    ));
    nothing_stored(&store);

    // A layer that does not unpack to the config's diff_id: a packed
    // archive is still checked for that.
    let layer0 = find(&archive, &fx.layers[0]);
    let mut flipped = archive.clone();
    flipped[layer0 + fx.layers[0].len() / 2] ^= 0x55;
    let tmp = store.temp_path();
    fs::write(&tmp, &flipped).unwrap();
    let err = store
        .insert_packed(&tmp, &sha256(&flipped), false)
        .unwrap_err();
    assert!(err.to_string().contains("diff_ids"), "{err}");
    assert!(!tmp.exists());
    nothing_stored(&store);

    // The good archive, received: the same image an import of the same
    // bytes gives, and a root filesystem from it.
    let tmp = store.temp_path();
    fs::write(&tmp, &archive).unwrap();
    let info = store.insert_received(&tmp, &digest).unwrap();
    assert!(!tmp.exists());
    assert_eq!(info.digest, digest);
    assert_eq!(info.names, ["ployz/test:v1"]);
    let other = ImageStore::open(dir.path().join("other")).unwrap();
    let path = write(dir.path(), "image.tar", &archive);
    assert_eq!(other.import_path(&path).unwrap(), info);
    assert_rootfs(&store.rootfs(&digest).unwrap());

    // The diff_id of each layer, from a stream, as a pull computes it
    // while the layer arrives: plain and gzip give the same.
    for layer in &fx.layers {
        assert_eq!(
            layer_diff_id(io::Cursor::new(layer.clone()), "l").unwrap(),
            sha256(layer)
        );
        assert_eq!(
            layer_diff_id(io::Cursor::new(gzip(layer)), "l").unwrap(),
            sha256(layer)
        );
        assert_eq!(
            layer_diff_id(io::Cursor::new(zstd(layer)), "l").unwrap(),
            sha256(layer)
        );
    }
    let cut = gzip(&fx.layers[0]);
    assert!(matches!(
        layer_diff_id(io::Cursor::new(cut[..cut.len() / 2].to_vec()), "l"),
        Err(ImageError::BadLayer { .. })
    ));

    // Packed, on a third machine: the same again.
    let third = ImageStore::open(dir.path().join("third")).unwrap();
    let tmp = third.temp_path();
    fs::write(&tmp, &archive).unwrap();
    assert_eq!(third.insert_packed(&tmp, &digest, false).unwrap(), info);
}

/// Builds an image from `layers`, imports it (which succeeds: layers are
/// checked when unpacked) and returns the store's answer to `rootfs`.
fn unpack(
    store: &ImageStore,
    dir: &Path,
    name: &str,
    layers: Vec<Vec<u8>>,
) -> Result<PathBuf, ImageError> {
    let diff_ids: Vec<String> = layers.iter().map(|l| sha256(l)).collect();
    let config = config_json(&["sh"], &diff_ids);
    let archive = docker_archive(&layers, &config, &[]);
    let info = store.import_path(&write(dir, name, &archive)).unwrap();
    store.rootfs(&info.digest)
}

/// Every path under `dir`, relative, sorted.
fn tree(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            out.push(p.strip_prefix(dir).unwrap().to_string_lossy().into_owned());
            if fs::symlink_metadata(&p).unwrap().is_dir() {
                stack.push(p);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn malicious_layers_are_refused_and_write_nothing_outside() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path();
    let store_root = base.join("store");
    let store = ImageStore::open(&store_root).unwrap();
    // What a naive extractor would reach from store/tmp/<build dir>/.
    let outside = base.join("outside");
    fs::create_dir(&outside).unwrap();
    fs::write(outside.join("secret"), "secret").unwrap();
    let before = tree(base);

    let refused: Vec<(&str, Vec<Vec<u8>>)> = vec![
        ("dotdot.tar", {
            let mut t = TarBuf::new();
            t.file("ok", 0o644, b"ok")
                .raw(tar::EntryType::Regular, "../../escape", "", b"pwned");
            vec![t.finish()]
        }),
        ("dotdot-inside.tar", {
            let mut t = TarBuf::new();
            t.dir("a", 0o755).raw(
                tar::EntryType::Regular,
                "a/../../../outside/pwned",
                "",
                b"pwned",
            );
            vec![t.finish()]
        }),
        ("symlink-then-file.tar", {
            // The symlink in one layer, the file through it in the next.
            let mut l1 = TarBuf::new();
            l1.symlink("evil", "../../../outside");
            let mut l2 = TarBuf::new();
            l2.file("evil/pwned", 0o644, b"pwned");
            vec![l1.finish(), l2.finish()]
        }),
        ("symlink-chain.tar", {
            let mut t = TarBuf::new();
            t.dir("d", 0o755)
                .symlink("d/up", "..")
                .symlink("hop", "d/up/d/up/..")
                .dir("hop/outside", 0o755);
            vec![t.finish()]
        }),
        ("hardlink-dotdot.tar", {
            let mut t = TarBuf::new();
            t.raw(
                tar::EntryType::Link,
                "stolen",
                "../../../outside/secret",
                b"",
            );
            vec![t.finish()]
        }),
        ("hardlink-via-symlink.tar", {
            let mut t = TarBuf::new();
            t.symlink("up", "../../..")
                .hardlink("stolen", "up/outside/secret");
            vec![t.finish()]
        }),
    ];
    for (name, layers) in refused {
        match unpack(&store, base, name, layers) {
            Err(ImageError::UnsafePath { entry, .. }) => {
                eprintln!("{name}: refused at {entry}");
            }
            other => panic!("{name}: expected UnsafePath, got {other:?}"),
        }
        fs::remove_file(base.join(name)).unwrap();
        assert!(files_in(&store_root.join("rootfs")).is_empty(), "{name}");
        assert!(
            files_in(&store_root.join("tmp")).is_empty(),
            "{name}: build dir left"
        );
        assert!(!store_root.join("escape").exists());
        assert!(!base.join("escape").exists());
        let now: Vec<String> = tree(base)
            .into_iter()
            .filter(|p| !p.starts_with("store"))
            .collect();
        let was: Vec<String> = before
            .iter()
            .filter(|p| !p.starts_with("store"))
            .cloned()
            .collect();
        assert_eq!(now, was, "{name}: something was written outside the store");
    }
    assert_eq!(fs::read(outside.join("secret")).unwrap(), b"secret");

    // Absolute paths and absolute symlinks are the container's view: they
    // land inside the root filesystem, never on the host.
    let outside_abs = outside.to_str().unwrap().to_string();
    let mut t = TarBuf::new();
    t.symlink("abs", &outside_abs)
        .file("abs/pwned", 0o644, b"contained")
        .raw(tar::EntryType::Regular, "/etc/abs-entry", "", b"abs")
        .hardlink("hl", "/etc/abs-entry")
        .raw(tar::EntryType::Char, "dev/null", "", b"");
    let root = unpack(&store, base, "absolute.tar", vec![t.finish()]).unwrap();
    assert!(!outside.join("pwned").exists());
    let inside = root.join(outside_abs.trim_start_matches('/')).join("pwned");
    assert_eq!(fs::read(inside).unwrap(), b"contained");
    assert_eq!(fs::read(root.join("etc/abs-entry")).unwrap(), b"abs");
    assert_eq!(fs::read(root.join("hl")).unwrap(), b"abs");
    assert!(!root.join("dev/null").exists(), "device nodes are skipped");
    assert_eq!(files_in(&outside), ["secret"]);
}

#[test]
fn resolve_by_name_digest_and_image_id() {
    let fx = Fixture::new();
    let dir = tempfile::tempdir().unwrap();
    let store = ImageStore::open(dir.path().join("store")).unwrap();
    let archive = docker_archive(&fx.layers, &fx.config, &["busybox:latest", "ployz/test:v1"]);
    let docker = store
        .import_path(&write(dir.path(), "d.tar", &archive))
        .unwrap();
    let layout = dir.path().join("layout");
    oci_dir(&fx, &layout);
    std::thread::sleep(Duration::from_millis(20));
    let oci = store.import_path(&layout).unwrap();

    let resolve = |q: &str| store.resolve(q).unwrap().map(|i| i.digest);
    for q in [
        "busybox",
        "busybox:latest",
        "docker.io/library/busybox:latest",
        "index.docker.io/library/busybox",
        "library/busybox",
        "ployz/test:v1",
        "docker.io/ployz/test:v1",
        docker.digest.as_str(),
        &docker.digest[..7 + 12],
        &docker.digest[7..7 + 12],
    ] {
        assert_eq!(resolve(q), Some(docker.digest.clone()), "{q}");
    }
    for q in [
        "ployz/oci:v1",
        "docker.io/ployz/oci:v1",
        &oci.digest[..7 + 16],
    ] {
        assert_eq!(resolve(q), Some(oci.digest.clone()), "{q}");
    }
    for q in [
        "busybox:1.36",
        "ployz/test",
        "alpine",
        "ghcr.io/library/busybox",
    ] {
        assert_eq!(resolve(q), None, "{q}");
    }
    assert_eq!(resolve(&format!("sha256:{}", "f".repeat(64))), None);
    // Both archives hold the same image (same config): its ID picks the newest import.
    assert_eq!(resolve(&docker.image_id), Some(oci.digest.clone()));
    assert_eq!(
        resolve(&docker.image_id[..7 + 12]),
        Some(oci.digest.clone())
    );
    for bad in ["sha256:abc", "sha256:XYZXYZXYZXYZXYZ", "", "a b"] {
        assert!(
            matches!(store.resolve(bad), Err(ImageError::InvalidReference { .. })),
            "{bad:?}"
        );
    }

    // A newer image under the same name wins; importing the old one again brings it back.
    let diff_ids: Vec<String> = fx.layers.iter().map(|l| sha256(l)).collect();
    let v2_config = config_json(&["sh", "-c", "echo v2"], &diff_ids);
    let v2 = store
        .import_path(&write(
            dir.path(),
            "v2.tar",
            &docker_archive(&fx.layers, &v2_config, &["busybox:latest"]),
        ))
        .unwrap();
    assert_eq!(resolve("busybox"), Some(v2.digest.clone()));
    assert_eq!(resolve("ployz/test:v1"), Some(docker.digest.clone()));
    std::thread::sleep(Duration::from_millis(20));
    store.import_path(&dir.path().join("d.tar")).unwrap();
    assert_eq!(resolve("busybox"), Some(docker.digest.clone()));
    assert_eq!(store.list().unwrap().len(), 3);
}

/// With a running dockerd: a real `docker save` of an image made with
/// `docker import` from a busybox rootfs, imported and unpacked.
#[test]
fn real_docker_save_when_dockerd_runs() {
    let docker_ok = Command::new("docker")
        .arg("info")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !docker_ok {
        println!("note: skipping the real `docker save` case: no docker CLI or dockerd is not running (`docker info` failed)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let rootfs_tar = write(dir.path(), "rootfs.tar", &layer1(&busybox()));
    let tag = format!("ployz-image-test:{}", std::process::id());
    let run = |args: &[&str]| {
        let out = Command::new("docker").args(args).output().unwrap();
        assert!(
            out.status.success(),
            "docker {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    struct Rmi(String);
    impl Drop for Rmi {
        fn drop(&mut self) {
            let _ = Command::new("docker").args(["rmi", "-f", &self.0]).output();
        }
    }
    run(&[
        "import",
        "--change",
        r#"CMD ["sh", "-c", "echo from-docker"]"#,
        "--change",
        "ENV GREETING=hi",
        rootfs_tar.to_str().unwrap(),
        &tag,
    ]);
    let _rmi = Rmi(tag.clone());
    let id = run(&["image", "inspect", "--format", "{{.Id}}", &tag]);
    let saved = dir.path().join("saved.tar");
    run(&["save", "-o", saved.to_str().unwrap(), &tag]);

    let store = ImageStore::open(dir.path().join("store")).unwrap();
    let info = store.import_path(&saved).unwrap();
    assert_eq!(info.format, ImageFormat::DockerArchive);
    assert_eq!(info.image_id, id);
    assert!(
        info.names
            .iter()
            .any(|n| n == &tag || n.ends_with(&format!("/{tag}"))),
        "{:?}",
        info.names
    );
    assert_eq!(info.config.cmd, ["sh", "-c", "echo from-docker"]);
    assert!(info.config.env.contains(&("GREETING".into(), "hi".into())));
    assert_eq!(store.resolve(&tag).unwrap(), Some(info.clone()));
    let root = store.rootfs(&info.digest).unwrap();
    assert_eq!(fs::read(root.join("bin/busybox")).unwrap(), busybox());
    assert_eq!(fs::read(root.join("etc/motd")).unwrap(), b"v1\n");
    assert!(fs::symlink_metadata(root.join("bin/sh"))
        .unwrap()
        .is_symlink());
}

/// Where `needle` first occurs in `hay`.
fn find(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len())
        .position(|w| w == needle)
        .expect("fixture bytes are in the archive")
}

#[test]
fn truncated_or_corrupt_archives_are_refused_and_store_nothing() {
    let fx = Fixture::new();
    let dir = tempfile::tempdir().unwrap();
    let store = ImageStore::open(dir.path().join("store")).unwrap();
    let nothing_stored = |store: &ImageStore, case: &str| {
        assert_nothing_stored(store, &dir.path().join("store"), case)
    };
    let docker = docker_archive(&fx.layers, &fx.config, &["ployz/test:v1"]);
    let layer0 = find(&docker, &fx.layers[0]);
    let manifest = find(&docker, b"[{\"Config\"");
    let oci = oci_tar(&fx);
    let gz0 = find(&oci, &gzip(&fx.layers[0]));
    let plain1 = find(&oci, &fx.layers[1]);
    let flip = |bytes: &[u8], at: usize| {
        let mut b = bytes.to_vec();
        b[at] ^= 0x55;
        b
    };
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "in-layer.tar",
            docker[..layer0 + fx.layers[0].len() / 2].to_vec(),
            "needs",
        ),
        (
            "in-manifest.tar",
            docker[..manifest + 10].to_vec(),
            "member `manifest.json` needs",
        ),
        (
            "in-manifest-header.tar",
            docker[..manifest - 100].to_vec(),
            "damaged",
        ),
        (
            "no-end-marker.tar",
            docker[..docker.len() - 1024].to_vec(),
            "end-of-archive marker",
        ),
        (
            "half-end-marker.tar",
            docker[..docker.len() - 512].to_vec(),
            "end-of-archive marker",
        ),
        (
            "last-byte.tar",
            docker[..docker.len() - 1].to_vec(),
            "end-of-archive marker",
        ),
        (
            "flipped-layer.tar",
            flip(&docker, layer0 + fx.layers[0].len() / 2),
            "diff_ids",
        ),
        ("oci-in-gzip-layer.tar", oci[..gz0 + 100].to_vec(), "needs"),
        (
            "oci-flipped-layer.tar",
            flip(&oci, plain1 + fx.layers[1].len() / 2),
            "but the manifest says",
        ),
        (
            "oci-no-end-marker.tar",
            oci[..oci.len() - 1024].to_vec(),
            "end-of-archive marker",
        ),
    ];
    for (name, bytes, why) in cases {
        let p = write(dir.path(), name, &bytes);
        let err = store.import_path(&p).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, ImageError::Corrupt { .. }), "{name}: {msg}");
        assert!(msg.contains(why), "{name}: {msg}");
        assert!(msg.contains("truncated or corrupt"), "{name}: {msg}");
        assert!(msg.contains(name), "names the user's file: {msg}");
        nothing_stored(&store, name);
    }

    // An OCI layout directory with a cut-off blob, and with a damaged one.
    for (case, damage) in [("cut", 0usize), ("damaged", 1)] {
        let layout = dir.path().join(format!("layout-{case}"));
        oci_dir(&fx, &layout);
        let blob = layout
            .join("blobs/sha256")
            .join(hex(&sha256(&fx.layers[1])));
        let bytes = fs::read(&blob).unwrap();
        let broken = if damage == 0 {
            bytes[..bytes.len() / 2].to_vec()
        } else {
            flip(&bytes, bytes.len() / 2)
        };
        fs::write(&blob, broken).unwrap();
        let err = store.import_path(&layout).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, ImageError::Corrupt { .. }), "{case}: {msg}");
        assert!(msg.contains(&format!("layout-{case}")), "{msg}");
        nothing_stored(&store, case);
    }

    // Neither a file nor a directory: refused without reading it.
    let fifo = dir.path().join("image.fifo");
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    let err = store.import_path(&fifo).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, ImageError::NotAnImage { .. }), "{msg}");
    assert!(msg.contains("not a regular file or a directory"), "{msg}");
    nothing_stored(&store, "fifo");

    // The intact archives still import.
    let ok = write(dir.path(), "whole.tar", &docker);
    assert_config(&store.import_path(&ok).unwrap(), &fx);
    let ok = write(dir.path(), "whole-oci.tar", &oci);
    assert_config(&store.import_path(&ok).unwrap(), &fx);
}

/// A pull builds the root filesystem while the layers arrive
/// (`layer_diff_id_unpacking`, layer after layer): the same diff_ids, the
/// same tree as `rootfs` unpacks from the stored archive; `adopt_rootfs`
/// makes it the image's, and a layer that is no tar still gets its diff_id
/// but says it was not applied.
#[test]
fn root_filesystem_built_while_layers_arrive_matches_the_unpacked_one() {
    let fx = Fixture::new();
    let dir = tempfile::tempdir().unwrap();
    let archive = docker_archive(&fx.layers, &fx.config, &["busybox:latest"]);
    let path = write(dir.path(), "image.tar", &archive);
    let reference = ImageStore::open(dir.path().join("reference")).unwrap();
    let info = reference.import_path(&path).unwrap();
    let unpacked = reference.rootfs(&info.digest).unwrap();

    let store = ImageStore::open(dir.path().join("store")).unwrap();
    let work = store.rootfs_work_dir().unwrap();
    let compressed = [gzip(&fx.layers[0]), zstd(&fx.layers[1])];
    for (i, layer) in compressed.into_iter().enumerate() {
        let (diff_id, applied) =
            layer_diff_id_unpacking(io::Cursor::new(layer), &format!("layer {i}"), &work).unwrap();
        assert_eq!(diff_id, sha256(&fx.layers[i]));
        assert!(applied, "layer {i}");
    }
    assert_eq!(tree(&work), tree(&unpacked));
    assert_rootfs(&work);

    // Adopted once the image is stored; refused for an image that is not.
    let stranger = store.rootfs_work_dir().unwrap();
    assert!(matches!(
        store.adopt_rootfs(&info.digest, &stranger),
        Err(ImageError::UnknownImage { .. })
    ));
    assert!(!stranger.exists());
    let stored = store.import_path(&path).unwrap();
    let root = store.adopt_rootfs(&stored.digest, &work).unwrap();
    assert!(!work.exists());
    assert_eq!(store.rootfs(&stored.digest).unwrap(), root);
    assert_rootfs(&root);
    assert!(files_in(&dir.path().join("store/tmp")).is_empty());

    // Not a tar stream: hashed all the same, not applied.
    let junk = b"this is no tar stream at all, just some bytes".repeat(40);
    let scratch = store.rootfs_work_dir().unwrap();
    let (diff_id, applied) =
        layer_diff_id_unpacking(io::Cursor::new(gzip(&junk)), "junk", &scratch).unwrap();
    assert_eq!(diff_id, sha256(&junk));
    assert!(!applied);
}

/// A machine receiving an archive as a pull writes it (config, layers in
/// order, `manifest.json` last) builds the same tree `rootfs` unpacks from
/// the stored archive; announced layers that do not match the archive's
/// manifest, or an archive laid out otherwise (docker's, with a layer
/// behind a symlink), give no tree.
#[test]
fn root_filesystem_built_from_an_archive_stream_matches_the_unpacked_one() {
    let fx = Fixture::new();
    let dir = tempfile::tempdir().unwrap();
    let layers = [gzip(&fx.layers[0]), zstd(&fx.layers[1])];
    let hexes: Vec<String> = layers.iter().map(|l| hex(&sha256(l)).to_string()).collect();
    let blob = |h: &str| format!("blobs/sha256/{h}");
    let config_hex = hex(&sha256(&fx.config)).to_string();
    let mut t = TarBuf::new();
    t.dir("blobs", 0o755).dir("blobs/sha256", 0o755);
    t.file(&blob(&config_hex), 0o644, &fx.config);
    for (h, l) in hexes.iter().zip(&layers) {
        t.file(&blob(h), 0o644, l);
    }
    let manifest = serde_json::json!([{
        "Config": blob(&config_hex),
        "RepoTags": ["reg.example/app:1"],
        "Layers": hexes.iter().map(|h| blob(h)).collect::<Vec<_>>(),
    }]);
    t.file("manifest.json", 0o644, manifest.to_string().as_bytes());
    let archive = t.finish();

    let store = ImageStore::open(dir.path().join("store")).unwrap();
    let info = store
        .import_path(&write(dir.path(), "image.tar", &archive))
        .unwrap();
    let unpacked = store.rootfs(&info.digest).unwrap();

    let work = store.rootfs_work_dir().unwrap();
    assert!(unpack_archive_stream(
        io::Cursor::new(&archive),
        &hexes,
        &work
    ));
    assert_eq!(tree(&work), tree(&unpacked));
    assert_rootfs(&work);

    let reversed: Vec<String> = hexes.iter().rev().cloned().collect();
    let scratch = store.rootfs_work_dir().unwrap();
    assert!(!unpack_archive_stream(
        io::Cursor::new(&archive),
        &reversed,
        &scratch
    ));
    let scratch = store.rootfs_work_dir().unwrap();
    assert!(!unpack_archive_stream(
        io::Cursor::new(&archive),
        &hexes[..1],
        &scratch
    ));
    let docker = docker_archive(&fx.layers, &fx.config, &[]);
    let plain: Vec<String> = fx
        .layers
        .iter()
        .map(|l| hex(&sha256(l)).to_string())
        .collect();
    let scratch = store.rootfs_work_dir().unwrap();
    assert!(!unpack_archive_stream(
        io::Cursor::new(&docker),
        &plain,
        &scratch
    ));
}
