//! Crash consistency: `kiln build`, `kiln pull` and `kiln save` are
//! SIGKILLed at random moments (seeded; `KILN_CRASH_SEED` overrides), and
//! after every kill `kiln check` must find the store consistent once it has
//! removed the leftovers of the dead process. At the end a normal build
//! must succeed, reuse the steps that finished before, and leave no mount
//! under the store root (the runtime's startup sweep removes what the dead
//! builds left).

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{BuildDirs, kiln};

/// xorshift64*: a tiny seeded generator, so a failing run can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

/// The store root and the directory of its containers' state (on a tmpfs
/// elsewhere when there is one: `Runtime::for_store`), as path strings.
fn store_dirs(root: &Path) -> Vec<String> {
    let mut dirs = vec![root.to_string_lossy().into_owned()];
    if let Ok(state) = kiln_engine::runtime::Runtime::state_root_of_store(root) {
        dirs.push(state.to_string_lossy().into_owned());
    }
    dirs
}

/// Mount points at or under `root` or its state dir, from our mountinfo.
fn mounts_under(root: &Path) -> Vec<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let dirs = store_dirs(root);
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| dirs.iter().any(|d| m.starts_with(d.as_str())))
        .map(str::to_string)
        .collect()
}

/// SIGKILL processes still running with `root` on their command line: the
/// forks libcontainer made of a killed kiln (they outlive it, holding the
/// container's state lock, so the runtime's sweep thinks it is alive).
/// Returns how many there were.
fn kill_orphans(root: &Path) -> usize {
    let needles = store_dirs(root);
    kill_where(|proc_dir| {
        std::fs::read(proc_dir.join("cmdline"))
            .is_ok_and(|c| needles.iter().any(|n| String::from_utf8_lossy(&c).contains(n.as_str())))
    })
}

/// SIGKILL every other process whose `/proc/<pid>` dir satisfies `matches`;
/// returns how many.
fn kill_where(matches: impl Fn(&Path) -> bool) -> usize {
    let me = std::process::id();
    let mut killed = 0;
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        if pid as u32 != me && matches(&entry.path()) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            killed += 1;
        }
    }
    killed
}

fn unmount_all(mounts: &[String]) {
    for m in mounts.iter().rev() {
        let _ = nix::mount::umount2(m.as_str(), nix::mount::MntFlags::MNT_DETACH);
    }
}

/// Run `kiln --root ROOT ARGS` and SIGKILL it after `after`; returns whether
/// it was still running (and so really killed). A run that ends by itself
/// must succeed.
fn run_and_kill(root: &Path, args: &[String], after: Duration) -> bool {
    let log = root.with_extension("log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("--root")
        .arg(root)
        .args(args)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + after;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            let stderr = std::fs::read_to_string(&log).unwrap_or_default();
            // `save` before any pull finished has nothing to save yet.
            let nothing_to_save = args[0] == "save" && stderr.contains("no such image");
            assert!(status.success() || nothing_to_save, "kiln {args:?} failed by itself ({status}):\n{stderr}");
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let killed = child.try_wait().unwrap().is_none();
    let _ = child.kill(); // SIGKILL
    let _ = child.wait();
    killed
}

fn check_is_consistent(root: &Path, what: &str) {
    let out = kiln(root, &["check"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "kiln check after {what}: exit {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("store is consistent"), "{stdout}");
}

/// Whether this machine can run `test` (root, a registry, skopeo); prints
/// the skip line when not.
fn can_run(test: &str) -> bool {
    common::can_run_containers(test, &["docker-registry", "skopeo"])
}

#[test]
fn sigkill_at_random_moments_leaves_a_consistent_store() {
    if !can_run("crash consistency") {
        return;
    }
    let seed: u64 = std::env::var("KILN_CRASH_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x6b69_6c6e);
    println!("seed {seed} (set KILN_CRASH_SEED to replay)");
    let mut rng = Rng(seed | 1);
    let BuildDirs { registry: _registry, mirror, tmp, root, ctx } = BuildDirs::new();
    std::fs::write(ctx.join("a.txt"), "alpha\n").unwrap();
    std::fs::write(ctx.join("b.txt"), "bravo\n".repeat(1000)).unwrap();
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM busybox\nCOPY a.txt /a.txt\nRUN echo one > /one\nCOPY b.txt /b.txt\n\
         RUN cat /a.txt /b.txt > /ab && head -c 300000 /dev/urandom > /noise\nARG N=0\nRUN echo $N > /n\n",
    )
    .unwrap();
    let ctx_s = ctx.to_string_lossy().into_owned();
    let build_args = |n: u64| -> Vec<String> {
        ["--registry-mirror", &mirror, "build", "--progress", "plain", "-t", "crash:latest", "--build-arg"]
            .iter()
            .map(|s| s.to_string())
            .chain([format!("N={n}"), ctx_s.clone()])
            .collect()
    };
    // One uninterrupted build first, so there are finished steps that the
    // kills must not lose (killed runs may finish more of them).
    let first = kiln(&root, &build_args(1).iter().map(String::as_str).collect::<Vec<_>>());
    assert!(first.status.success(), "first build failed:\n{}", String::from_utf8_lossy(&first.stderr));
    // How long a build of the loop below takes here (its last step runs
    // again): the kills are spread over twice that, so about half of them
    // land mid-way however fast the machine and kiln are.
    let timed = Instant::now();
    let warm = kiln(&root, &build_args(2).iter().map(String::as_str).collect::<Vec<_>>());
    assert!(warm.status.success(), "second build failed:\n{}", String::from_utf8_lossy(&warm.stderr));
    let build_ms = (timed.elapsed().as_millis() as u64).max(20);
    let started = Instant::now();
    let (mut kills, mut finished, mut leftover_mounts, mut orphans) = (0, 0, 0, 0);
    // Builds (each with a fresh N, so the last step always has work),
    // pulls and saves, interleaved, until 50 runs were killed mid-way.
    // Runs that finish before their kill are fine: their steps are what the
    // final build must reuse.
    let mut i = 0u64;
    while kills < 50 {
        assert!(i < 400, "only {kills} of {i} runs could be killed mid-way");
        let (what, args) = match i % 6 {
            0..=3 => ("build", build_args(rng.between(1, 1_000_000))),
            4 => ("pull", vec!["--registry-mirror".into(), mirror.clone(), "pull".into(), "busybox".into()]),
            _ => {
                let out = tmp.path().join(format!("save-{i}.tar"));
                ("save", vec!["save".into(), "-o".into(), out.to_string_lossy().into_owned(), "busybox".into()])
            }
        };
        i += 1;
        // Builds get a longer window so that some of them finish steps.
        let after = Duration::from_millis(if what == "build" { rng.between(5, 2 * build_ms) } else { rng.between(5, 120) });
        if run_and_kill(&root, &args, after) {
            kills += 1;
        } else {
            finished += 1;
        }
        orphans += kill_orphans(&root);
        let mounts = mounts_under(&root);
        if !mounts.is_empty() {
            leftover_mounts += 1;
        }
        check_is_consistent(&root, &format!("{what} killed after {after:?} (iteration {i}, seed {seed})"));
    }
    println!(
        "{kills} kills, {finished} runs finished before their kill, {leftover_mounts} kills left mounts behind, \
         {orphans} orphaned kiln forks killed"
    );

    // A normal build: succeeds, reuses what finished, and its runtime sweep
    // leaves no mount of the dead builds behind.
    let out = kiln(&root, &build_args(0).iter().map(String::as_str).collect::<Vec<_>>());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "final build failed:\n{stderr}");
    let cached = stderr.lines().filter(|l| l.ends_with(" CACHED")).count();
    println!("final build: {cached} steps CACHED; total {:?}", started.elapsed());
    assert!(cached >= 2, "the final build reused no finished step:\n{stderr}");
    check_is_consistent(&root, "the final build");
    kill_orphans(&root);
    let mounts = mounts_under(&root);
    unmount_all(&mounts);
    assert!(mounts.is_empty(), "mounts left under the store root after a full build's sweep: {mounts:?}");
}

/// Files under `dir` (recursively, not following symlinks, staying on its
/// filesystem) whose bytes contain `needle`.
fn files_holding(dir: &Path, needle: &[u8]) -> Vec<String> {
    use std::os::unix::fs::MetadataExt;
    let mut found = Vec::new();
    let Ok(top) = std::fs::symlink_metadata(dir) else { return found };
    let mut todo = vec![dir.to_path_buf()];
    while let Some(path) = todo.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&path) else { continue };
        if meta.dev() != top.dev() {
            continue;
        }
        if meta.is_dir() {
            todo.extend(std::fs::read_dir(&path).into_iter().flatten().flatten().map(|e| e.path()));
        } else if meta.is_file()
            && let Ok(bytes) = std::fs::read(&path)
            && bytes.windows(needle.len()).any(|w| w == needle)
        {
            found.push(path.display().to_string());
        }
    }
    found
}

/// `kiln-secret-*` directories directly under the places secrets may be.
fn secret_dirs() -> Vec<std::path::PathBuf> {
    ["/dev/shm".into(), std::env::temp_dir()]
        .iter()
        .flat_map(|base: &std::path::PathBuf| std::fs::read_dir(base).into_iter().flatten().flatten())
        .map(|e| e.path())
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("kiln-secret-")) && p.is_dir())
        .collect()
}

#[test]
fn sigkill_mid_run_leaves_no_secret_after_the_next_start() {
    if !can_run("the secret crash test") {
        return;
    }
    let BuildDirs { registry: _registry, mirror, tmp, root, ctx } = BuildDirs::new();
    // The value reaches kiln through its environment only, so any file
    // holding it afterwards is a leak.
    let secret = format!("kiln-crash-secret-{}-{}", std::process::id(), std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos());
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM busybox\nRUN --mount=type=secret,id=tok test -s /run/secrets/tok && sleep 120\n",
    )
    .unwrap();
    let log = tmp.path().join("build.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("--root")
        .arg(&root)
        .args(["--registry-mirror", &mirror, "build", "--progress", "plain", "--secret", "id=tok,env=KILN_CRASH_TOK"])
        .arg(&ctx)
        .env("KILN_CRASH_TOK", &secret)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    // Wait until the RUN holds the secret in a file, then SIGKILL kiln.
    let owner = format!("kiln-secret-{}-", child.id());
    let deadline = Instant::now() + Duration::from_secs(120);
    let dir = loop {
        if let Some(dir) = secret_dirs().into_iter().find(|d| d.file_name().unwrap().to_string_lossy().starts_with(&owner)) {
            if dir.join("secret").is_file() {
                break dir;
            }
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the build ended ({status}) before its RUN started:\n{}", std::fs::read_to_string(&log).unwrap_or_default());
        }
        assert!(Instant::now() < deadline, "no secret file appeared:\n{}", std::fs::read_to_string(&log).unwrap_or_default());
        std::thread::sleep(Duration::from_millis(20));
    };
    std::thread::sleep(Duration::from_millis(300)); // well inside the RUN
    let leases = || std::fs::read_dir(root.join("leases")).map(|d| d.count()).unwrap_or(0);
    assert!(leases() >= 1, "a running build holds a lease");
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(dir.join("secret").is_file(), "the kill must leave the secret behind for this test to mean anything");
    kill_orphans(&root);
    // The container's `sleep` outlives kiln; it runs on the root's layers.
    let containers = kill_processes_using(&root);

    // The next kiln start (any command opening the store) sweeps it.
    let out = kiln(&root, &["check"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && stdout.contains("store is consistent"), "{stdout}");
    assert!(!dir.exists(), "{} is still there after the next start:\n{stdout}", dir.display());
    assert_eq!(leases(), 0, "the killed build's leases died with it (and check removed their files)");
    let mut leaks = files_holding(Path::new("/dev/shm"), secret.as_bytes());
    leaks.extend(files_holding(&root, secret.as_bytes()));
    for d in secret_dirs() {
        leaks.extend(files_holding(&d, secret.as_bytes()));
    }
    assert!(leaks.is_empty(), "the secret survived in {leaks:?}");
    let mounts = mounts_under(&root);
    unmount_all(&mounts);
    println!("secret dir {} swept; {containers} orphaned container processes killed", dir.display());
}

/// SIGKILL processes whose mounts (their container rootfs) name `root`.
fn kill_processes_using(root: &Path) -> usize {
    let needle = root.to_string_lossy().into_owned();
    kill_where(|proc_dir| {
        std::fs::read_to_string(proc_dir.join("mountinfo"))
            .is_ok_and(|m| m.lines().next().is_some_and(|first| first.contains(&needle)))
    })
}
