//! `--cache-to` / `--cache-from` end to end, against a real registry
//! (`docker-registry`) and real containers: a cache exported by one store
//! root is used by another, EMPTY root, which then executes only the steps
//! whose inputs changed. Steps are counted from `--progress json` events:
//! `started` = executed, `cached` = taken from a cache.

mod common;
mod daemon_support;

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use common::{TestRegistry, have, kiln};

fn skip_reason() -> Option<String> {
    if !nix::unistd::Uid::effective().is_root() {
        return Some("containers need root".into());
    }
    for tool in ["docker-registry", "skopeo"] {
        if !have(tool, "remote cache tests") {
            return Some(format!("{tool} is not installed"));
        }
    }
    None
}

/// Two stages: `builder` makes an artifact, the final stage copies it and
/// a context file, then a RUN whose output differs on every execution (a
/// nanosecond stamp), so its content shows whether it ran or came from A.
const DOCKERFILE: &str = r#"FROM busybox AS builder
COPY gen.sh /gen.sh
RUN sh /gen.sh > /artifact.txt

FROM busybox
COPY --from=builder /artifact.txt /artifact.txt
COPY app.txt /app/app.txt
RUN cat /app/app.txt /artifact.txt > /app/combined.txt && date +%s%N > /app/stamp
CMD ["cat", "/app/combined.txt", "/app/stamp"]
"#;

fn write_context(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("Dockerfile"), DOCKERFILE).unwrap();
    std::fs::write(dir.join("gen.sh"), "echo artifact; date +%s%N\n").unwrap();
    std::fs::write(dir.join("app.txt"), "app v1\n").unwrap();
}

/// What one `kiln build --progress json` did.
#[derive(Debug)]
struct Run {
    ok: bool,
    stderr: String,
    /// Names of RUN/COPY steps that executed.
    executed: BTreeSet<String>,
    /// Names of RUN/COPY steps taken from a cache.
    cached: BTreeSet<String>,
}

fn is_step(name: &str) -> bool {
    name.contains("RUN ") || name.contains("COPY ")
}

fn build(root: &Path, reg: &TestRegistry, args: &[&str], env: &[(&str, &str)]) -> Run {
    let mirror = format!("docker.io=http://{}", reg.addr);
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"));
    cmd.arg("--root").arg(root).args(["--registry-mirror", &mirror, "--insecure-registry", "127.0.0.1"]);
    cmd.args(["build", "--progress", "json"]).args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    parse_run(cmd.output().unwrap())
}

fn parse_run(out: std::process::Output) -> Run {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let (mut executed, mut cached) = (BTreeSet::new(), BTreeSet::new());
    for line in stderr.lines().filter(|l| l.starts_with('{')) {
        let event: serde_json::Value = serde_json::from_str(line).unwrap();
        let name = event["name"].as_str().unwrap_or_default().to_string();
        if !is_step(&name) {
            continue;
        }
        match event["type"].as_str() {
            Some("started") => executed.insert(name),
            Some("cached") => cached.insert(name),
            _ => false,
        };
    }
    Run { ok: out.status.success(), stderr, executed, cached }
}

fn build_ok(root: &Path, reg: &TestRegistry, args: &[&str], env: &[(&str, &str)]) -> Run {
    let run = build(root, reg, args, env);
    assert!(run.ok, "kiln build {args:?} failed:\n{}", run.stderr);
    run
}

/// The "N layer blobs fetched from the imported cache" count.
fn blobs_fetched(run: &Run) -> usize {
    let line = run.stderr.lines().find(|l| l.contains("layer blobs fetched")).unwrap_or_else(|| panic!("no fetch count:\n{}", run.stderr));
    let event: serde_json::Value = serde_json::from_str(line).unwrap();
    event["line"].as_str().unwrap().split_whitespace().next().unwrap().parse().unwrap()
}

/// Names of executed steps containing `part`.
fn names(set: &BTreeSet<String>, part: &str) -> usize {
    set.iter().filter(|n| n.contains(part)).count()
}

/// The manifest and config (JSON) of image `name` in `root`.
fn image(root: &Path, name: &str) -> (String, serde_json::Value, serde_json::Value) {
    let store = kiln_cache::Store::open(root).unwrap();
    let record = store.images.get(name).unwrap().unwrap_or_else(|| panic!("no image {name}"));
    let manifest: serde_json::Value = serde_json::from_slice(&store.content.read(&record.target.digest).unwrap()).unwrap();
    let config_digest = manifest["config"]["digest"].as_str().unwrap().to_string();
    let config: serde_json::Value = serde_json::from_slice(&store.content.read(&config_digest).unwrap()).unwrap();
    (record.target.digest, manifest, config)
}

fn layer_digests(manifest: &serde_json::Value) -> Vec<String> {
    manifest["layers"].as_array().unwrap().iter().map(|l| l["digest"].as_str().unwrap().to_string()).collect()
}

/// `kiln run --rm IMAGE` stdout.
fn run_image(root: &Path, name: &str) -> String {
    let out = kiln(root, &["run", "--rm", name]);
    assert!(out.status.success(), "kiln run {name}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

struct Setup {
    reg: TestRegistry,
    tmp: tempfile::TempDir,
    ctx: PathBuf,
}

impl Setup {
    fn new() -> Setup {
        let reg = TestRegistry::with_busybox();
        let tmp = tempfile::tempdir().unwrap();
        let ctx = tmp.path().join("ctx");
        write_context(&ctx);
        Setup { reg, tmp, ctx }
    }
    fn root(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }
    fn ctx(&self) -> &str {
        self.ctx.to_str().unwrap()
    }
}

const ALL_STEPS: usize = 5;

#[test]
fn registry_cache_is_used_by_an_empty_root() {
    if let Some(why) = skip_reason() {
        println!("skipped: registry cache because {why}");
        return;
    }
    let s = Setup::new();
    let cache_ref = format!("{}/cache/app:max", s.reg.addr);
    // No SOURCE_DATE_EPOCH: B's image must still be A's, byte for byte
    // (layer creation times travel with the cache).
    let epoch = [];
    let (a, b) = (s.root("a"), s.root("b"));

    let first = build_ok(&a, &s.reg, &["-t", "app:1", "--cache-to", &format!("type=registry,ref={cache_ref},mode=max"), s.ctx()], &epoch);
    assert_eq!(first.executed.len(), ALL_STEPS, "{:?}", first.executed);
    assert!(first.stderr.contains("exporting cache to"), "{}", first.stderr);

    // The cache index is a real OCI index in the registry.
    let raw = std::process::Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false", &format!("docker://{cache_ref}")])
        .output()
        .unwrap();
    assert!(raw.status.success(), "skopeo inspect: {}", String::from_utf8_lossy(&raw.stderr));
    let index: serde_json::Value = serde_json::from_slice(&raw.stdout).unwrap();
    assert_eq!(index["mediaType"], "application/vnd.oci.image.index.v1+json");
    assert!(
        index["manifests"].as_array().unwrap().iter().any(|m| m["mediaType"] == "application/vnd.kiln.cache.config.v1+json"),
        "{index}"
    );

    // An empty root: nothing executes, the image is the same, and runs.
    let second = build_ok(&b, &s.reg, &["-t", "app:1", "--cache-from", &format!("type=registry,ref={cache_ref}"), s.ctx()], &epoch);
    assert!(second.executed.is_empty(), "executed on an empty root with --cache-from: {:?}\n{}", second.executed, second.stderr);
    assert_eq!(second.cached.len(), ALL_STEPS, "{:?}", second.cached);
    // At most one blob per step's own layer (busybox's came with FROM; the
    // COPY --from layer has the builder RUN's diff ID, so one snapshot).
    let fetched = blobs_fetched(&second);
    assert!((1..=ALL_STEPS).contains(&fetched), "{fetched} blobs fetched");
    let (digest_a, manifest_a, config_a) = image(&a, "app:1");
    let (digest_b, manifest_b, config_b) = image(&b, "app:1");
    assert_eq!(layer_digests(&manifest_a), layer_digests(&manifest_b));
    assert_eq!(config_a, config_b);
    assert_eq!(digest_a, digest_b, "same manifest digest");
    // What the import wrote is a consistent store (blobs, snapshots, records).
    let check = kiln(&b, &["check"]);
    assert!(check.status.success(), "kiln check: {}", String::from_utf8_lossy(&check.stdout));
    let out_a = run_image(&a, "app:1");
    assert_eq!(run_image(&b, "app:1"), out_a, "B's image must hold A's RUN output (stamp), not a new one");
    assert!(out_a.starts_with("app v1\nartifact\n"), "{out_a}");

    // One source file changes: its COPY and the RUN after it execute; the
    // other stage and the COPY --from still come from the cache.
    std::fs::write(s.ctx.join("app.txt"), "app v2\n").unwrap();
    let third = build_ok(&b, &s.reg, &["-t", "app:2", "--cache-from", &cache_ref, s.ctx()], &epoch);
    assert_eq!(third.executed.len(), 2, "{:?}", third.executed);
    assert_eq!(names(&third.executed, "COPY app.txt"), 1, "{:?}", third.executed);
    assert_eq!(names(&third.executed, "RUN cat"), 1, "{:?}", third.executed);
    assert_eq!(third.cached.len(), ALL_STEPS - 2, "{:?}", third.cached);
    assert_eq!(blobs_fetched(&third), 0, "every layer of the hits is local by now");
    let out = run_image(&b, "app:2");
    assert!(out.starts_with("app v2\nartifact\n"), "{out}");
    // The artifact line (with its stamp) is still A's.
    assert_eq!(out.lines().nth(2), out_a.lines().nth(2));
}

#[test]
fn local_cache_min_and_max() {
    if let Some(why) = skip_reason() {
        println!("skipped: local cache because {why}");
        return;
    }
    let s = Setup::new();
    let (min_dir, max_dir) = (s.root("cache-min"), s.root("cache-max"));
    let to_min = format!("type=local,dest={}", min_dir.display());
    let to_max = format!("type=local,dest={},mode=max", max_dir.display());
    let a = s.root("a");
    let first = build_ok(&a, &s.reg, &["-t", "app:1", "--cache-to", &to_min, "--cache-to", &to_max, s.ctx()], &[]);
    assert_eq!(first.executed.len(), ALL_STEPS);
    for dir in [&min_dir, &max_dir] {
        assert!(dir.join("oci-layout").is_file() && dir.join("index.json").is_file(), "{}", dir.display());
        let inspect = std::process::Command::new("skopeo")
            .args(["inspect", "--raw", &format!("oci:{}:latest", dir.display())])
            .output()
            .unwrap();
        assert!(inspect.status.success(), "skopeo inspect {}: {}", dir.display(), String::from_utf8_lossy(&inspect.stderr));
    }
    // max also holds the builder stage's layers.
    let blobs = |d: &Path| std::fs::read_dir(d.join("blobs/sha256")).unwrap().count();
    assert!(blobs(&max_dir) > blobs(&min_dir), "max {} vs min {} blobs", blobs(&max_dir), blobs(&min_dir));

    // min: the final stage hits; the builder stage (not in the image) runs.
    let b_min = s.root("b-min");
    let from_min = format!("type=local,src={}", min_dir.display());
    let run = build_ok(&b_min, &s.reg, &["-t", "app:1", "--cache-from", &from_min, s.ctx()], &[]);
    assert_eq!(run.executed.len(), 2, "{:?}", run.executed);
    assert_eq!(names(&run.executed, "COPY gen.sh") + names(&run.executed, "RUN sh /gen.sh"), 2, "{:?}", run.executed);
    assert_eq!(run.cached.len(), 3, "{:?}", run.cached);
    assert_eq!(run_image(&b_min, "app:1"), run_image(&a, "app:1"));

    // max: nothing runs; same layers (blobs reused byte for byte).
    let b_max = s.root("b-max");
    let from_max = format!("type=local,src={}", max_dir.display());
    let run = build_ok(&b_max, &s.reg, &["-t", "app:1", "--cache-from", &from_max, s.ctx()], &[]);
    assert!(run.executed.is_empty(), "{:?}", run.executed);
    assert_eq!(layer_digests(&image(&a, "app:1").1), layer_digests(&image(&b_max, "app:1").1));

    // Exporting again over an existing cache replaces it.
    std::fs::write(s.ctx.join("app.txt"), "app v2\n").unwrap();
    let again = build_ok(&a, &s.reg, &["-t", "app:2", "--cache-to", &to_max, s.ctx()], &[]);
    assert_eq!(again.executed.len(), 2, "{:?}", again.executed);
    let b2 = s.root("b2");
    let run = build_ok(&b2, &s.reg, &["-t", "app:2", "--cache-from", &from_max, s.ctx()], &[]);
    assert!(run.executed.is_empty(), "{:?}", run.executed);
    assert!(run_image(&b2, "app:2").starts_with("app v2\n"));

    // A corrupt layer blob in the cache: a warning, the step runs instead.
    let b3 = s.root("b3");
    let index = std::fs::read_to_string(max_dir.join("index.json")).unwrap();
    assert!(index.contains("latest"));
    let mut corrupted = 0;
    for entry in std::fs::read_dir(max_dir.join("blobs/sha256")).unwrap() {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        // Layers are gzip; leave index and config alone.
        if bytes.starts_with(&[0x1f, 0x8b]) {
            std::fs::write(&path, b"not the layer").unwrap();
            corrupted += 1;
        }
    }
    assert!(corrupted > 0);
    let run = build_ok(&b3, &s.reg, &["-t", "app:2", "--cache-from", &from_max, s.ctx()], &[]);
    assert!(run.stderr.contains("cannot use the imported cache"), "{}", run.stderr);
    assert!(run.stderr.contains("digest mismatch"), "{}", run.stderr);
    assert_eq!(run.executed.len(), ALL_STEPS, "{:?}", run.executed);
}

#[test]
fn inline_cache_from_a_pushed_image() {
    if let Some(why) = skip_reason() {
        println!("skipped: inline cache because {why}");
        return;
    }
    let s = Setup::new();
    let name = format!("{}/app/inline:1", s.reg.addr);
    let a = s.root("a");
    build_ok(&a, &s.reg, &["-t", &name, "--cache-to", "type=inline", s.ctx()], &[]);
    let (_, _, config) = image(&a, &name);
    assert!(config["kiln.cache.v1"]["records"].as_array().is_some_and(|r| r.len() == 3), "{config}");
    let pushed = kiln(&a, &["--insecure-registry", "127.0.0.1", "push", &name]);
    assert!(pushed.status.success(), "push: {}", String::from_utf8_lossy(&pushed.stderr));

    // Inline is mode=min: the final stage hits, the builder stage runs.
    let b = s.root("b");
    let run = build_ok(&b, &s.reg, &["-t", "app:1", "--cache-from", &name, s.ctx()], &[]);
    assert_eq!(run.executed.len(), 2, "{:?}", run.executed);
    assert_eq!(run.cached.len(), 3, "{:?}", run.cached);
    assert_eq!(names(&run.cached, "RUN cat"), 1, "{:?}", run.cached);
    assert_eq!(run_image(&b, "app:1"), run_image(&a, &name));
}

/// Issue 9: keys ignore mtimes and the host owner, and with `--chmod` the
/// source mode; another root hits every step after a touch + chmod.
#[test]
fn cache_keys_travel() {
    if let Some(why) = skip_reason() {
        println!("skipped: cache keys that travel because {why}");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let reg = TestRegistry::with_busybox();
    let ctx = tmp.path().join("ctx");
    std::fs::create_dir_all(ctx.join("tree/sub")).unwrap();
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM busybox\nCOPY --chmod=0755 tool.sh /usr/bin/tool\nCOPY --chmod=640 tree /tree\nCOPY plain.txt /plain.txt\nRUN tool > /out.txt\n",
    )
    .unwrap();
    std::fs::write(ctx.join("tool.sh"), "#!/bin/sh\necho tool ran\n").unwrap();
    std::fs::write(ctx.join("tree/a.txt"), "a\n").unwrap();
    std::fs::write(ctx.join("tree/sub/b.txt"), "b\n").unwrap();
    std::fs::write(ctx.join("plain.txt"), "plain\n").unwrap();
    let cache = tmp.path().join("cache");
    let a = tmp.path().join("a");
    let first = build_ok(&a, &reg, &["-t", "t:1", "--cache-to", &format!("type=local,dest={},mode=max", cache.display()), ctx.to_str().unwrap()], &[]);
    assert_eq!(first.executed.len(), 4, "{:?}", first.executed);

    // Same content; new times everywhere; new modes where --chmod rules;
    // another owner on the plain COPY's file (context files are copied as root).
    let chmod = |p: &Path, m: u32| std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
    chmod(&ctx.join("tool.sh"), 0o600);
    chmod(&ctx.join("tree/a.txt"), 0o604);
    chmod(&ctx.join("tree/sub"), 0o700);
    chmod(&ctx.join("tree/sub/b.txt"), 0o600);
    nix::unistd::chown(&ctx.join("plain.txt"), Some(nix::unistd::Uid::from_raw(1234)), Some(nix::unistd::Gid::from_raw(1234)))
        .unwrap();
    let later = filetime_now_plus(3600);
    for p in ["tool.sh", "tree", "tree/a.txt", "tree/sub", "tree/sub/b.txt", "plain.txt", "Dockerfile"] {
        touch(&ctx.join(p), later);
    }

    let b = tmp.path().join("b");
    let run = build_ok(&b, &reg, &["-t", "t:1", "--cache-from", &format!("type=local,src={}", cache.display()), ctx.to_str().unwrap()], &[]);
    assert!(run.executed.is_empty(), "keys did not travel: executed {:?}\n{}", run.executed, run.stderr);
    assert_eq!(run.cached.len(), 4, "{:?}", run.cached);
    assert_eq!(run_image(&b, "t:1"), run_image(&a, "t:1"));
    let out = kiln(&b, &["run", "--rm", "t:1", "cat", "/out.txt"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "tool ran\n");
}

fn filetime_now_plus(secs: i64) -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64 + secs
}

/// Set atime and mtime of `path` (not following symlinks).
fn touch(path: &Path, secs: i64) {
    let t = nix::sys::time::TimeSpec::new(secs, 0);
    nix::sys::stat::utimensat(None, path, &t, &t, nix::sys::stat::UtimensatFlags::NoFollowSymlink).unwrap();
}

#[test]
fn bad_cache_flags_and_unreachable_registries() {
    if let Some(why) = skip_reason() {
        println!("skipped: bad cache input because {why}");
        return;
    }
    let s = Setup::new();
    let root = s.root("r");
    let err = |args: &[&str]| {
        let run = build(&root, &s.reg, args, &[]);
        assert!(!run.ok, "kiln build {args:?} should fail");
        run.stderr
    };
    let e = err(&["--cache-to", "type=gha,scope=x", s.ctx()]);
    assert!(e.contains("--cache-to \"type=gha,scope=x\": unknown cache type \"gha\""), "{e}");
    assert!(err(&["--cache-to", "type=registry", s.ctx()]).contains("type=registry needs ref="));
    assert!(err(&["--cache-to", "type=local,mode=max", s.ctx()]).contains("type=local needs dest="));
    assert!(err(&["--cache-from", "type=local", s.ctx()]).contains("type=local needs src="));
    assert!(err(&["--cache-to", "type=inline,mode=max", s.ctx()]).contains("mode=min only"));
    // Nothing was built for bad flags.
    assert!(!root.join("snapshots").exists() || std::fs::read_dir(root.join("snapshots")).unwrap().count() == 0);

    // A registry that is down: a clear error naming it.
    let down = "127.0.0.1:9/cache/app:1";
    let e = err(&["--cache-from", &format!("type=registry,ref={down}"), s.ctx()]);
    assert!(e.contains("--cache-from 127.0.0.1:9/cache/app:1") && e.contains("unreachable"), "{e}");
    let e = err(&["--cache-to", &format!("type=registry,ref={down}"), s.ctx()]);
    assert!(e.contains("--cache-to 127.0.0.1:9/cache/app:1") && e.contains("unreachable"), "{e}");
    // ignore-error=true only warns.
    let run = build(&root, &s.reg, &["--cache-to", &format!("type=registry,ref={down},ignore-error=true"), s.ctx()], &[]);
    assert!(run.ok && run.stderr.contains("ignored: ignore-error=true"), "{}", run.stderr);
    // A cache that does not exist yet (a first CI build) only warns.
    let missing = format!("{}/cache/none:1", s.reg.addr);
    let run = build(&root, &s.reg, &["--cache-from", &missing, s.ctx()], &[]);
    assert!(run.ok && run.stderr.contains("no cache at"), "{}", run.stderr);

    // Local dest: not a layout and not empty, or a file: refused, left as it was.
    let busy = s.root("busy");
    std::fs::create_dir_all(&busy).unwrap();
    std::fs::write(busy.join("keep.txt"), "mine").unwrap();
    let e = err(&["--cache-to", &format!("type=local,dest={}", busy.display()), s.ctx()]);
    assert!(e.contains("neither empty nor an OCI layout"), "{e}");
    assert_eq!(common::tree(&busy), vec!["keep.txt"]);
    let file = s.root("file");
    std::fs::write(&file, "x").unwrap();
    assert!(err(&["--cache-to", &format!("type=local,dest={}", file.display()), s.ctx()]).contains("not a directory"));
    let nowhere = s.root("no/such/dir");
    assert!(err(&["--cache-to", &format!("type=local,dest={}", nowhere.display()), s.ctx()]).contains("does not exist"));
    // No staging leftovers beside the destinations.
    let leftovers: Vec<String> = std::fs::read_dir(s.tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("kiln"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// The flags travel through `--host`: a daemon exports, another daemon on
/// an empty root imports and executes nothing.
#[test]
fn cache_flags_work_through_the_daemon() {
    if let Some(why) = skip_reason() {
        println!("skipped: remote cache through the daemon because {why}");
        return;
    }
    let s = Setup::new();
    let mirror = format!("docker.io=http://{}", s.reg.addr);
    let flags = ["--registry-mirror", mirror.as_str(), "--insecure-registry", "127.0.0.1"];
    let cache_ref = format!("{}/cache/daemon:1", s.reg.addr);
    let build = |d: &daemon_support::Daemon, cache_flag: &str, spec: &str| {
        let run = parse_run(d.client(&["build", "--progress", "json", "-t", "app:1", cache_flag, spec, s.ctx()]));
        assert!(run.ok, "build through the daemon failed:\n{}", run.stderr);
        run
    };
    let mut first = daemon_support::Daemon::start(false, &flags);
    let run = build(&first, "--cache-to", &format!("type=registry,ref={cache_ref},mode=max"));
    assert_eq!(run.executed.len(), ALL_STEPS, "{:?}", run.executed);
    first.stop();

    let mut second = daemon_support::Daemon::start(false, &flags);
    let run = build(&second, "--cache-from", &cache_ref);
    assert!(run.executed.is_empty(), "{:?}\n{}", run.executed, run.stderr);
    assert_eq!(run.cached.len(), ALL_STEPS);
    // A bad spec fails in the client, before anything is sent.
    let out = second.client(&["build", "--cache-to", "type=nope", s.ctx()]);
    assert!(!out.status.success() && daemon_support::stderr(&out).contains("unknown cache type \"nope\""));
    second.stop();
}

/// A step whose layer is empty (dropped from the image, so its blob is not
/// pushed) still hits from an inline cache: the importer makes the empty
/// layer itself.
#[test]
fn empty_layers_travel_without_blobs() {
    if let Some(why) = skip_reason() {
        println!("skipped: empty layers in an inline cache because {why}");
        return;
    }
    let s = Setup::new();
    let ctx = s.root("ctx-empty");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(ctx.join("Dockerfile"), "FROM busybox\nRUN true\nRUN echo hi > /x\n").unwrap();
    let name = format!("{}/app/empty:1", s.reg.addr);
    let a = s.root("a");
    build_ok(&a, &s.reg, &["-t", &name, "--cache-to", "type=inline", ctx.to_str().unwrap()], &[]);
    let (_, manifest, config) = image(&a, &name);
    let cache = &config["kiln.cache.v1"];
    assert_eq!(cache["records"].as_array().unwrap().len(), 2, "{cache}");
    let empty = "sha256:5f70bf18a086007016e948b04aed3b82103a36bea41755b6cddfaf10ace3c6ef";
    assert!(cache["layers"].as_array().unwrap().iter().any(|l| l["diff_id"] == empty), "RUN true should be an empty layer: {cache}");
    assert!(!config["rootfs"]["diff_ids"].as_array().unwrap().iter().any(|d| d == empty), "empty layers are dropped from images");
    assert_eq!(layer_digests(&manifest).len(), 2);
    let pushed = kiln(&a, &["--insecure-registry", "127.0.0.1", "push", &name]);
    assert!(pushed.status.success(), "push: {}", String::from_utf8_lossy(&pushed.stderr));

    let b = s.root("b");
    let run = build_ok(&b, &s.reg, &["-t", "e:1", "--cache-from", &name, ctx.to_str().unwrap()], &[]);
    assert!(run.executed.is_empty(), "{:?}\n{}", run.executed, run.stderr);
    assert_eq!(run.cached.len(), 2, "{:?}", run.cached);
    let out = kiln(&b, &["run", "--rm", "e:1", "cat", "/x"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hi\n");
}

/// Builds importing the same cache at once on one empty root (separate
/// processes) share its layers safely: all succeed, nothing executes, and
/// the store checks out.
#[test]
fn concurrent_imports_on_one_root() {
    if let Some(why) = skip_reason() {
        println!("skipped: concurrent cache imports because {why}");
        return;
    }
    let s = Setup::new();
    let cache = s.root("cache");
    let a = s.root("a");
    build_ok(&a, &s.reg, &["-t", "app:1", "--cache-to", &format!("type=local,dest={},mode=max", cache.display()), s.ctx()], &[]);
    // Pull busybox first, so the builds race on the cache's layers only.
    let b = s.root("b");
    let pulled = kiln(&b, &["--registry-mirror", &format!("docker.io=http://{}", s.reg.addr), "pull", "busybox"]);
    assert!(pulled.status.success(), "{}", String::from_utf8_lossy(&pulled.stderr));
    let from = format!("type=local,src={}", cache.display());
    let runs: Vec<Run> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..4)
            .map(|i| {
                let (b, from, reg, ctx) = (&b, &from, &s.reg, s.ctx());
                scope.spawn(move || build(b, reg, &["-t", &format!("app:{i}"), "--cache-from", from, ctx], &[]))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for run in &runs {
        assert!(run.ok, "{}", run.stderr);
        assert!(run.executed.is_empty(), "{:?}", run.executed);
    }
    let check = kiln(&b, &["check"]);
    assert!(check.status.success(), "kiln check: {}", String::from_utf8_lossy(&check.stdout));
    assert_eq!(run_image(&b, "app:3"), run_image(&a, "app:1"));
}
