//! A hard cap on disk (issue 9): 50 different images built under a small
//! `--keep-storage` cap while a thread samples the root's size with `du`;
//! the root never exceeds the cap by more than the working set of the
//! builds running, the last image still runs, `kiln check --deep` is
//! clean, and `kiln du` reports the same total as `du -sb`. Also: a
//! snapshot whose files changed on disk is found by `kiln check --deep`,
//! repaired, and rebuilt.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{BuildDirs, TestRegistry, kiln, kiln_ok};

/// Bytes each image's RUN step writes: compressible, so image blobs stay
/// tiny while the build cache (snapshots) grows fast.
const LAYER_BYTES: u64 = 2_000_000;
/// The cap the stress test builds under.
const CAP: u64 = 16_000_000;

fn can_run(test: &str) -> bool {
    common::can_run_containers(test, &["docker-registry", "skopeo", "du"])
}

/// `du -sb` (with `-x`: a running container's rootfs mounted under the
/// root is not disk usage) of `root`; du's total even when files vanish
/// during the walk.
fn du_bytes(root: &Path, one_fs: bool) -> u64 {
    let flags = if one_fs { "-sbx" } else { "-sb" };
    let out = Command::new("du").arg(flags).arg(root).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace().next().and_then(|n| n.parse().ok()).unwrap_or(0)
}

/// Build `ctx` as `tag`; panics with kiln's output if it fails.
fn build(root: &Path, mirror: &str, ctx: &Path, tag: &str, extra: &[&str]) -> String {
    let ctx = ctx.to_string_lossy().into_owned();
    let mut args = vec!["--registry-mirror", mirror, "build", "--progress", "plain", "-t", tag];
    args.extend_from_slice(extra);
    args.push(&ctx);
    let out = kiln(root, &args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "kiln build {tag} failed:\n{stderr}");
    stderr
}

fn context(dir: &Path, dockerfile: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("Dockerfile"), dockerfile).unwrap();
    dir.to_path_buf()
}

#[test]
fn fifty_images_under_a_small_cap() {
    if !can_run("the disk cap stress test") {
        return;
    }
    let BuildDirs { registry: _registry, mirror, tmp, root, ctx: _ctx } = BuildDirs::new();
    std::fs::create_dir_all(&root).unwrap();
    // Half the builds get the cap from the root's config, half from the flag.
    std::fs::write(root.join("config.json"), format!(r#"{{"gc": {{"keep_storage": "{CAP}"}}}}"#)).unwrap();

    // Pull the base and bound the working set: per builder, the unpacked
    // base (re-unpacked if collected) plus its new layer with room for one
    // more copy; two builders run at once.
    let warm = context(&tmp.path().join("warm"), "FROM busybox\nRUN true\n");
    build(&root, &mirror, &warm, "warm:1", &[]);
    let base = snapshots_bytes(&root);
    let working_set = 2 * (base + 2 * LAYER_BYTES);
    println!("base snapshot {base} bytes; working set of two builders {working_set} bytes; cap {CAP}");

    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (root, sampling) = (root.clone(), sampling.clone());
        std::thread::spawn(move || {
            let mut samples = Vec::new();
            while sampling.load(Ordering::SeqCst) {
                samples.push(du_bytes(&root, true));
                std::thread::sleep(Duration::from_millis(100));
            }
            samples
        })
    };

    // Two builders at once (leases must keep each other's work), 25 each.
    let started = Instant::now();
    let workers: Vec<_> = (0..2)
        .map(|w| {
            let (root, mirror, dir) = (root.clone(), mirror.clone(), tmp.path().to_path_buf());
            std::thread::spawn(move || {
                for i in (w..50).step_by(2) {
                    let ctx = context(
                        &dir.join(format!("ctx{i}")),
                        &format!("FROM busybox\nRUN head -c {LAYER_BYTES} /dev/zero > /data && echo image-{i} > /n\n"),
                    );
                    let cap = CAP.to_string();
                    let extra: &[&str] = if i % 4 < 2 { &["--keep-storage", &cap] } else { &[] };
                    build(&root, &mirror, &ctx, &format!("gc{i}:latest"), extra);
                }
            })
        })
        .collect();
    for w in workers {
        w.join().expect("a builder failed");
    }
    sampling.store(false, Ordering::SeqCst);
    let samples = sampler.join().unwrap();
    let max = samples.iter().copied().max().unwrap_or(0);
    let after = du_bytes(&root, false);
    println!(
        "50 builds in {:?}; {} du samples; max {max} bytes (cap {CAP} + working set {working_set}); after {after}",
        started.elapsed(),
        samples.len()
    );
    assert!(samples.len() >= 10, "the sampler hardly ran: {samples:?}");
    assert!(max <= CAP + working_set, "root reached {max} bytes, over cap {CAP} + working set {working_set}");
    assert!(after <= CAP, "after the last build the root holds {after} bytes, over the cap {CAP}");
    // Without collection it would hold 50 layers.
    assert!(max > CAP / 2, "the builds never came near the cap ({max}); the test proves nothing");
    let snapshots = std::fs::read_dir(root.join("snapshots")).unwrap().count();
    assert!(snapshots < 10, "{snapshots} snapshots kept under a cap that fits a few");

    // Every image is still named (image blobs are never collected) and the
    // last one runs, its layers unpacked again from their blobs if needed.
    let images = kiln_ok(&root, &["images"]);
    assert!(images.contains("gc0") && images.contains("gc49"), "{images}");
    assert_eq!(kiln_ok(&root, &["run", "gc49:latest", "cat", "/n"]).trim(), "image-49");
    assert_eq!(kiln_ok(&root, &["run", "gc0:latest", "cat", "/n"]).trim(), "image-0");

    let check = kiln_ok(&root, &["check", "--deep"]);
    assert!(check.contains("store is consistent"), "{check}");

    // `kiln du` reports exactly what du reports (nothing runs now).
    let du_out = kiln_ok(&root, &["du"]);
    let kiln_total: u64 = du_out
        .lines()
        .find_map(|l| l.strip_prefix("Root total: "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no root total in:\n{du_out}"));
    assert_eq!(kiln_total, du_bytes(&root, false), "kiln du vs du -sb:\n{du_out}");
}

/// Bytes of the snapshots under `root` (after one build: the base image's).
fn snapshots_bytes(root: &Path) -> u64 {
    du_bytes(&root.join("snapshots"), true)
}

#[test]
fn a_changed_snapshot_is_found_repaired_and_rebuilt() {
    if !can_run("the deep check test") {
        return;
    }
    let BuildDirs { registry: _registry, mirror, tmp: _tmp, root, ctx } = BuildDirs::new();
    let ctx = context(&ctx, "FROM busybox\nRUN echo original > /f && mkdir -p /d && echo x > /d/y\n");
    build(&root, &mirror, &ctx, "deep:1", &[]);
    let clean = kiln_ok(&root, &["check", "--deep"]);
    assert!(clean.contains("re-hashed 1 snapshots") && clean.contains("store is consistent"), "{clean}");

    // Flip the content of a file inside the RUN step's snapshot.
    let built: Vec<PathBuf> = std::fs::read_dir(root.join("snapshots"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("fs/f").is_file())
        .collect();
    assert_eq!(built.len(), 1, "{built:?}");
    let id = built[0].file_name().unwrap().to_string_lossy().into_owned();
    std::fs::write(built[0].join("fs/f"), "tampered\n").unwrap();

    let out = kiln(&root, &["check", "--deep"]);
    let report = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{report}");
    assert!(report.contains(&format!("PROBLEM: snapshot {id}: its files hash to")), "{report}");
    assert!(report.contains("PROBLEM: cache record"), "the record naming it is reported too:\n{report}");

    let repaired = kiln_ok(&root, &["check", "--deep", "--repair"]);
    assert!(repaired.contains(&format!("repaired: snapshot {id}")) && repaired.contains("store is consistent"), "{repaired}");
    assert!(!root.join("snapshots").join(&id).exists());

    // The next build computes the step again and gets the original file.
    let stderr = build(&root, &mirror, &ctx, "deep:1", &[]);
    assert!(!stderr.lines().any(|l| l.contains("RUN echo original") && l.ends_with("CACHED")), "{stderr}");
    assert_eq!(kiln_ok(&root, &["run", "deep:1", "cat", "/f"]).trim(), "original");
    assert!(kiln_ok(&root, &["check", "--deep"]).contains("store is consistent"));
}

/// Wait until a live lease for `purpose` shows up under `root`.
fn wait_for_lease(root: &Path, purpose: &str, child: &mut std::process::Child) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let found = std::fs::read_dir(root.join("leases")).into_iter().flatten().flatten().any(|e| {
            std::fs::read_to_string(e.path()).is_ok_and(|t| t.contains(&format!("\"purpose\":\"{purpose}\"")))
        });
        if found {
            return;
        }
        assert!(child.try_wait().unwrap().is_none(), "kiln ended before taking its {purpose} lease");
        assert!(Instant::now() < deadline, "no {purpose} lease appeared");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn snapshot_ids(root: &Path) -> Vec<String> {
    let mut ids: Vec<String> = std::fs::read_dir(root.join("snapshots"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    ids.sort();
    ids
}

#[test]
fn prune_all_spares_what_running_builds_and_containers_use() {
    if !can_run("the lease test") {
        return;
    }
    let BuildDirs { registry: _registry, mirror, tmp, root, ctx: _ctx } = BuildDirs::new();
    let first = context(&tmp.path().join("first"), "FROM busybox\nRUN echo a > /a\n");
    build(&root, &mirror, &first, "first:1", &[]);
    let cached = snapshot_ids(&root);
    assert_eq!(cached.len(), 2, "base layer and one RUN: {cached:?}");
    let kiln_cmd = |args: &[&str]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
        c.arg("--root").arg(&root).arg("--registry-mirror").arg(&mirror).args(args);
        c.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
        c
    };

    // A running container: its image's layers stay.
    let mut run = kiln_cmd(&["run", "first:1", "sh", "-c", "sleep 3; cat /a"]).spawn().unwrap();
    wait_for_lease(&root, "run", &mut run);
    std::thread::sleep(Duration::from_millis(500));
    // (`kiln run` unpacks the built layer again under its diff ID.)
    let in_use = snapshot_ids(&root);
    kiln_ok(&root, &["prune", "--all"]);
    assert_eq!(snapshot_ids(&root), in_use, "prune --all removed a running container's layers");
    let out = run.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "a");

    // A running build: the cache hit it reuses and the base stay.
    let second = context(&tmp.path().join("second"), "FROM busybox\nRUN echo a > /a\nRUN sleep 3 && echo b > /b\n");
    let mut b = kiln_cmd(&["build", "--progress", "plain", "-t", "second:1", second.to_str().unwrap()]).spawn().unwrap();
    wait_for_lease(&root, "solve", &mut b);
    // Until the sleeping RUN runs (its upper dir is being written).
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::fs::read_dir(root.join("tmp/snapshots")).unwrap().count() == 0 {
        assert!(Instant::now() < deadline && b.try_wait().unwrap().is_none(), "the sleeping RUN never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    let before = snapshot_ids(&root);
    kiln_ok(&root, &["prune", "--all"]);
    let after = snapshot_ids(&root);
    for id in &cached {
        assert!(after.contains(id), "prune --all removed {id}, which a running build uses ({before:?} -> {after:?})");
    }
    let out = b.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.lines().any(|l| l.ends_with("CACHED")), "the first RUN was reused:\n{stderr}");

    // Nothing runs: prune --all takes all snapshots; the images still run
    // (layers unpacked again from their blobs) and the store is consistent.
    kiln_ok(&root, &["prune", "--all"]);
    assert!(snapshot_ids(&root).is_empty(), "{:?}", snapshot_ids(&root));
    assert!(std::fs::read_dir(root.join("leases")).unwrap().next().is_none(), "leases outlived their owners");
    assert_eq!(kiln_ok(&root, &["run", "second:1", "cat", "/a", "/b"]).split_whitespace().collect::<Vec<_>>(), ["a", "b"]);
    assert!(kiln_ok(&root, &["check", "--deep"]).contains("store is consistent"));
}

/// A tmpfs mounted for the test, unmounted on drop.
struct TmpfsMount(PathBuf);

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// With no cap configured anywhere, the default one (10% of the root's
/// file system, as BuildKit) still keeps the root small: the root lives on
/// a 100 MB tmpfs, so the default cap is 10 MB, and eight 3 MB layers do
/// not fit under it without collection.
#[test]
fn the_default_cap_applies_without_configuration() {
    if !can_run("the default disk cap test") {
        return;
    }
    if std::env::var_os("KILN_GC_KEEP_STORAGE").is_some() {
        println!("skipped: the default disk cap test because KILN_GC_KEEP_STORAGE is set and wins");
        return;
    }
    let reg = TestRegistry::with_busybox();
    let mirror = format!("docker.io=http://{}", reg.addr);
    let tmp = tempfile::tempdir().unwrap();
    let fs = tmp.path().join("fs");
    std::fs::create_dir_all(&fs).unwrap();
    let mounted = Command::new("mount").args(["-t", "tmpfs", "-o", "size=100m", "kiln-gc-test"]).arg(&fs).status().unwrap();
    assert!(mounted.success(), "mounting a tmpfs for the root");
    let _mount = TmpfsMount(fs.clone());
    let root = fs.join("root");
    let cap = 100 * 1024 * 1024 / 10;
    const LAYER: u64 = 3_000_000;
    let mut max = 0;
    for i in 0..8 {
        let ctx = context(
            &tmp.path().join(format!("ctx{i}")),
            &format!("FROM busybox\nRUN head -c {LAYER} /dev/zero > /data && echo default-{i} > /n\n"),
        );
        build(&root, &mirror, &ctx, &format!("default{i}:latest"), &[]);
        max = max.max(du_bytes(&root, true));
    }
    let after = du_bytes(&root, false);
    println!("default cap {cap} bytes; largest root after a build {max}; at the end {after}");
    assert!(after <= cap, "the root holds {after} bytes, over the default cap {cap}");
    assert!(max <= cap, "after a build the root held {max} bytes, over the default cap {cap}");
    // Eight layers of 3 MB were made: without collection they alone exceed the cap.
    assert!(8 * LAYER > cap);
    let snapshots = std::fs::read_dir(root.join("snapshots")).unwrap().count();
    assert!(snapshots < 8, "{snapshots} snapshots kept: nothing was collected");
    assert_eq!(kiln_ok(&root, &["run", "default7:latest", "cat", "/n"]).trim(), "default-7");
    assert_eq!(kiln_ok(&root, &["run", "default0:latest", "cat", "/n"]).trim(), "default-0");
}
