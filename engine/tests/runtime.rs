//! The container runtime on real containers (needs root and busybox-static).
//! Every container runs in a `kiln __container-shim` process, as the
//! builder runs them, so these tests can run in parallel.

mod runtime_common;

use std::time::Duration;

use kiln_engine::executor::ShimOptions;
use kiln_engine::runtime::{ContainerSpec, Limits, Mount, MountSource, NetworkMode};
use runtime_common::{
    Capture, Scratch, assert_nothing_left, is_dead, mounts_below, tree, wait_for,
};

fn sh(script: &str) -> Vec<String> {
    vec!["/bin/sh".into(), "-c".into(), script.into()]
}

#[test]
fn echo_goes_to_stdout_and_exit_code_propagates() {
    require_containers!();
    let s = Scratch::new();
    let base = s.busybox_layer("base");
    let cap = Capture::default();
    let spec = ContainerSpec::new(
        s.rootfs(vec![base.clone()], "a"),
        sh("echo hello; echo oops >&2; exit 3"),
    );
    let code = s.run(&spec, cap.sink()).unwrap();
    assert_eq!(code, 3);
    assert_eq!(cap.out(), "hello\n");
    assert_eq!(cap.err(), "oops\n");
    assert!(
        mounts_below(s.path()).is_empty(),
        "mounts left: {:?}",
        mounts_below(s.path())
    );
}

#[test]
fn run_like_exec_leaves_exact_diff() {
    require_containers!();
    let s = Scratch::new();
    let base = s.busybox_layer("base");
    let cap = Capture::default();
    let rootfs = s.rootfs(vec![base], "a");
    let upper = rootfs.upper.clone();
    let spec = ContainerSpec::new(rootfs, sh("echo hi > /hello"));
    let code = s.run(&spec, cap.sink()).unwrap();
    assert_eq!(code, 0, "stderr: {}", cap.err());
    assert_eq!(tree(&upper), vec!["hello".to_string()]);
}

fn run_capture(s: &Scratch, spec: &ContainerSpec) -> (i32, String, String) {
    let cap = Capture::default();
    let code = s.run(spec, cap.sink()).unwrap();
    (code, cap.out(), cap.err())
}

#[test]
fn env_cwd_and_hostname() {
    require_containers!();
    let s = Scratch::new();
    let base = s.busybox_layer("base");
    let mut spec = ContainerSpec::new(
        s.rootfs(vec![base], "a"),
        sh("echo $FOO; pwd; hostname; echo $PATH"),
    );
    spec.env = vec!["FOO=bar baz".into()];
    spec.cwd = "/work/deep/dir".into();
    spec.hostname = "builder".into();
    let (code, out, err) = run_capture(&s, &spec);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out,
        "bar baz\n/work/deep/dir\nbuilder\n/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n"
    );
    // The created working directory is part of the diff (as with BuildKit).
    assert!(spec.rootfs.upper.join("work/deep/dir").is_dir());
}

#[test]
fn user_resolved_from_rootfs_passwd_and_group() {
    require_containers!();
    let s = Scratch::new();
    let base = s.busybox_layer("base");
    for (user, want) in [
        ("alice", "1000 1000 1000 50\n"),
        ("alice:staff", "1000 50 50\n"),
        ("1234", "1234 1234 1234\n"),
        ("nobody:0", "65534 0 0\n"),
        ("", "0 0 0\n"),
    ] {
        let mut spec = ContainerSpec::new(
            s.rootfs(vec![base.clone()], &format!("u{}", user.replace(':', "_"))),
            sh("echo $(id -u) $(id -g) $(id -G)"),
        );
        spec.user = user.into();
        let (code, out, err) = run_capture(&s, &spec);
        assert_eq!(code, 0, "user {user:?}: {err}");
        assert_eq!(out, want, "user {user:?}");
    }
    let mut spec = ContainerSpec::new(s.rootfs(vec![base], "bad"), sh("true"));
    spec.user = "mallory".into();
    let err = s.run(&spec, Capture::default().sink()).unwrap_err();
    assert!(format!("{err:#}").contains("mallory"), "{err:#}");
}

#[test]
fn bind_mounts_ro_and_rw() {
    require_containers!();
    let s = Scratch::new();
    let base = s.busybox_layer("base");
    let host_dir = s.layer("hostdir");
    std::fs::write(host_dir.join("in.txt"), "from host\n").unwrap();
    let host_file = s.path().join("single.txt");
    std::fs::write(&host_file, "one file\n").unwrap();
    let mut spec = ContainerSpec::new(
        s.rootfs(vec![base], "a"),
        sh(
            "cat /data/in.txt /etc/single.txt; echo written > /data/out.txt; echo x > /ro/x 2>/dev/null && echo BAD; echo done",
        ),
    );
    spec.mounts = vec![
        Mount {
            target: "/data".into(),
            source: MountSource::Bind(host_dir.clone()),
            readonly: false,
        },
        Mount {
            target: "/ro".into(),
            source: MountSource::Bind(host_dir.clone()),
            readonly: true,
        },
        Mount {
            target: "/etc/single.txt".into(),
            source: MountSource::Bind(host_file),
            readonly: true,
        },
    ];
    let (code, out, err) = run_capture(&s, &spec);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "from host\none file\ndone\n");
    assert_eq!(
        std::fs::read_to_string(host_dir.join("out.txt")).unwrap(),
        "written\n"
    );
    assert!(!host_dir.join("x").exists());
    // Bind targets kiln created are gone from the diff.
    assert_eq!(tree(&spec.rootfs.upper), Vec::<String>::new());
}

#[test]
fn layer_and_tmpfs_mounts() {
    require_containers!();
    let s = Scratch::new();
    let base = s.busybox_layer("base");
    let l1 = s.layer("m1");
    let l2 = s.layer("m2");
    std::fs::write(l1.join("a"), "A1\n").unwrap();
    std::fs::write(l2.join("a"), "A2\n").unwrap();
    std::fs::write(l1.join("b"), "B1\n").unwrap();
    let mut spec = ContainerSpec::new(
        s.rootfs(vec![base], "a"),
        sh(
            "cat /cache/a /cache/b; echo new > /cache/c; cat /cache/c; touch /ro/z 2>/dev/null && echo BAD; echo t > /scratch/t && cat /scratch/t",
        ),
    );
    spec.mounts = vec![
        Mount {
            target: "/cache".into(),
            source: MountSource::Layers(vec![l1.clone(), l2.clone()]),
            readonly: false,
        },
        Mount {
            target: "/ro".into(),
            source: MountSource::Layers(vec![l1.clone(), l2.clone()]),
            readonly: true,
        },
        Mount {
            target: "/scratch".into(),
            source: MountSource::Tmpfs { size: 1 << 20 },
            readonly: false,
        },
    ];
    let (code, out, err) = run_capture(&s, &spec);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "A2\nB1\nnew\nt\n");
    // Writes went to a throw-away upper: the layers are untouched.
    assert!(!l1.join("c").exists() && !l2.join("c").exists());
    assert_eq!(tree(&spec.rootfs.upper), Vec::<String>::new());
}

#[test]
fn network_none_has_only_loopback_and_it_is_up() {
    require_containers!();
    let s = Scratch::new();
    let base = s.busybox_layer("base");
    for mode in [NetworkMode::None, NetworkMode::Default] {
        let mut spec = ContainerSpec::new(
            s.rootfs(vec![base.clone()], &format!("{mode:?}")),
            sh(
                "tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '; cat /sys/class/net/lo/flags; ping -c1 -W1 127.0.0.1 >/dev/null && echo ping-ok",
            ),
        );
        spec.network = mode;
        let (code, out, err) = run_capture(&s, &spec);
        assert_eq!(code, 0, "{mode:?}: {err}");
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "lo", "{mode:?}: {out}");
        let flags = u32::from_str_radix(lines[1].trim_start_matches("0x"), 16).unwrap();
        assert_eq!(flags & 1, 1, "lo is not up: {out}");
        assert_eq!(lines[2], "ping-ok", "{mode:?}: {out}");
        assert_eq!(lines.len(), 3, "{mode:?}: {out}");
    }
    // Host mode sees the host's interfaces.
    let mut spec = ContainerSpec::new(
        s.rootfs(vec![base], "host"),
        sh("tail -n +3 /proc/net/dev | wc -l"),
    );
    spec.network = NetworkMode::Host;
    let host_count = std::fs::read_to_string("/proc/net/dev")
        .unwrap()
        .lines()
        .count()
        - 2;
    let (code, out, _) = run_capture(&s, &spec);
    assert_eq!(code, 0);
    assert_eq!(out.trim(), host_count.to_string());
}

#[test]
fn pid_namespace_and_standard_files() {
    require_containers!();
    let s = Scratch::new();
    let base = s.busybox_layer("base");
    let spec = ContainerSpec::new(
        s.rootfs(vec![base], "a"),
        sh(
            "echo $$; ls /proc | grep -c '^[0-9]'; test -c /dev/null && test -c /dev/urandom && test -d /dev/pts && test -d /dev/shm && echo devs; grep -q localhost /etc/hosts && echo hosts; test -f /etc/resolv.conf && echo resolv; test -d /sys/kernel && echo sys",
        ),
    );
    let (code, out, err) = run_capture(&s, &spec);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "1");
    // sh, ls, grep (maybe), at most a handful of processes: not the host's.
    assert!(lines[1].parse::<u32>().unwrap() < 10, "{out}");
    assert_eq!(&lines[2..], ["devs", "hosts", "resolv", "sys"]);
}

#[test]
fn seccomp_and_capabilities_are_docker_like() {
    require_containers!();
    let s = Scratch::new();
    let base = s.busybox_layer("base");
    let spec = ContainerSpec::new(
        s.rootfs(vec![base], "a"),
        sh(
            "grep -E '^(CapEff|Seccomp):' /proc/self/status; mkdir /m; mount -t tmpfs none /m 2>/dev/null && echo MOUNTED; unshare -n true 2>/dev/null && echo UNSHARED; echo end",
        ),
    );
    let (code, out, err) = run_capture(&s, &spec);
    assert_eq!(code, 0, "{err}");
    // docker's default set: 0x00000000a80425fb.
    assert!(out.contains("CapEff:\t00000000a80425fb"), "{out}");
    assert!(out.contains("Seccomp:\t2"), "{out}");
    assert!(
        !out.contains("MOUNTED") && !out.contains("UNSHARED"),
        "{out}"
    );
}

#[test]
fn memory_and_cpu_limits_land_in_the_cgroup() {
    require_containers!();
    let s = Scratch::new();
    let base = s.busybox_layer("base");
    let mut spec = ContainerSpec::new(s.rootfs(vec![base], "a"), sh("sleep 30"));
    spec.limits = Limits {
        memory_bytes: Some(64 << 20),
        cpus: Some(0.5),
    };
    spec.name = Some("limited".into());
    let running = s.start(&spec, Capture::default().sink(), ShimOptions::default());
    let pid = running.container_pid();
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let mem_path = cgroups.lines().find_map(|l| {
        let parts: Vec<&str> = l.splitn(3, ':').collect();
        (parts[1].split(',').any(|c| c == "memory")).then(|| parts[2].to_string())
    });
    let limit_file = match &mem_path {
        Some(p) => format!("/sys/fs/cgroup/memory{p}/memory.limit_in_bytes"),
        None => {
            let p = cgroups
                .lines()
                .find_map(|l| l.strip_prefix("0::"))
                .unwrap()
                .to_string();
            format!("/sys/fs/cgroup{p}/memory.max")
        }
    };
    let limit = std::fs::read_to_string(&limit_file).unwrap();
    assert_eq!(limit.trim(), (64u64 << 20).to_string(), "{limit_file}");
    assert!(limit_file.contains("-limited/"), "{limit_file}");
    if let Some(p) = &mem_path {
        let quota_file = format!("/sys/fs/cgroup/cpu{p}/cpu.cfs_quota_us");
        if std::path::Path::new(&quota_file).exists() {
            assert_eq!(
                std::fs::read_to_string(&quota_file).unwrap().trim(),
                "50000"
            );
        }
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert_eq!(running.wait().unwrap(), 137);
    // The container's cgroup is gone.
    assert!(
        !std::path::Path::new(&limit_file).exists(),
        "{limit_file} still there"
    );
}

#[test]
fn memory_limit_is_enforced() {
    require_containers!();
    let s = Scratch::new();
    let base = s.busybox_layer("base");
    // Try to hold 200 MiB in a shell variable under a 32 MiB limit.
    let mut spec = ContainerSpec::new(
        s.rootfs(vec![base], "a"),
        sh("x=$(head -c 200000000 /dev/zero | tr '\\0' a); echo survived"),
    );
    spec.limits.memory_bytes = Some(32 << 20);
    let (code, out, _) = run_capture(&s, &spec);
    assert!(
        !out.contains("survived") || code != 0,
        "code {code}, out {out}"
    );
}

#[test]
fn upperdir_is_exact_diff_with_whiteout() {
    require_containers!();
    let s = Scratch::new();
    let base = s.busybox_layer("base");
    let top = s.layer("top");
    std::fs::create_dir_all(top.join("etc")).unwrap();
    std::fs::write(top.join("etc/motd"), "hi\n").unwrap();
    std::fs::write(top.join("keep"), "k\n").unwrap();
    let rootfs = s.rootfs(vec![base, top], "a");
    let upper = rootfs.upper.clone();
    let spec = ContainerSpec::new(rootfs, sh("rm /etc/motd && echo new > /new && cat /keep"));
    let (code, out, err) = run_capture(&s, &spec);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "k\n");
    assert_eq!(tree(&upper), vec!["etc", "etc/motd", "new"]);
    let meta = std::fs::symlink_metadata(upper.join("etc/motd")).unwrap();
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    assert!(
        meta.file_type().is_char_device(),
        "whiteout must be a 0/0 char device"
    );
    assert_eq!(meta.rdev(), 0);
}

#[test]
fn stubs_the_process_touched_are_kept() {
    require_containers!();
    let s = Scratch::new();
    let base = s.busybox_layer("base");
    let host_dir = s.layer("hostdir");
    let rootfs = s.rootfs(vec![base], "a");
    let upper = rootfs.upper.clone();
    // /mnt/data is a bind target kiln creates (with its parent /mnt); the
    // process writes into /mnt, so /mnt stays and only the stub goes.
    let mut spec = ContainerSpec::new(rootfs, sh("echo k > /mnt/keep"));
    spec.mounts = vec![Mount {
        target: "/mnt/data".into(),
        source: MountSource::Bind(host_dir),
        readonly: true,
    }];
    let (code, _, err) = run_capture(&s, &spec);
    assert_eq!(code, 0, "{err}");
    assert_eq!(tree(&upper), vec!["mnt", "mnt/keep"]);
}

#[test]
fn many_layers_overflowing_the_option_page() {
    require_containers!();
    let s = Scratch::new();
    let mut lower = vec![s.busybox_layer("base")];
    for i in 0..120 {
        // Long names so the lowerdir list is far beyond one 4 KiB page.
        let l = s.layer(&format!(
            "layer-with-a-deliberately-long-directory-name-to-overflow-{i:03}"
        ));
        std::fs::write(l.join(format!("f{i:03}")), format!("{i}\n")).unwrap();
        std::fs::write(l.join("top"), format!("{i}\n")).unwrap();
        lower.push(l);
    }
    let total: usize = lower.iter().map(|p| p.as_os_str().len() + 1).sum();
    assert!(total > 8192, "{total}");
    let rootfs = s.rootfs(lower, "a");
    let upper = rootfs.upper.clone();
    let spec = ContainerSpec::new(rootfs, sh("ls / | grep -c '^f'; cat /top /f000 /f119"));
    let (code, out, err) = run_capture(&s, &spec);
    assert_eq!(code, 0, "{err}");
    // All 120 layers visible, the last one on top.
    assert_eq!(out, "120\n119\n0\n119\n");
    assert_eq!(tree(&upper), Vec::<String>::new());
}

#[test]
fn missing_layer_is_a_clear_error_and_cleans_up() {
    require_containers!();
    let s = Scratch::new();
    let base = s.busybox_layer("base");
    let spec = ContainerSpec::new(s.rootfs(vec![base, s.path().join("nope")], "a"), sh("true"));
    let err = s.run(&spec, Capture::default().sink()).unwrap_err();
    assert!(format!("{err:#}").contains("nope"), "{err:#}");
    assert_clean(&s);
}

#[test]
fn cleanup_after_failed_exec() {
    require_containers!();
    let s = Scratch::new();
    let base = s.busybox_layer("base");
    let rootfs = s.rootfs(vec![base], "a");
    let upper = rootfs.upper.clone();
    let spec = ContainerSpec::new(rootfs, vec!["/no/such/binary".into()]);
    let err = s.run(&spec, Capture::default().sink()).unwrap_err();
    assert!(format!("{err:#}").contains("/no/such/binary"), "{err:#}");
    assert_clean(&s);
    assert_eq!(
        tree(&upper),
        Vec::<String>::new(),
        "stubs left in the upperdir"
    );
}

/// No mounts, no container state, no processes, no cgroup left.
fn assert_clean(s: &Scratch) {
    assert_nothing_left(s.path(), &s.path().join("run"));
}

#[test]
fn sigterm_reaches_the_container() {
    require_containers!();
    let s = Scratch::new();
    let base = s.busybox_layer("base");
    let cap = Capture::default();
    let spec = ContainerSpec::new(
        s.rootfs(vec![base], "a"),
        sh("trap 'echo got-term; exit 42' TERM; echo ready; while :; do sleep 0.05; done"),
    );
    let running = s.start(&spec, cap.sink(), ShimOptions::default());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !cap.out().contains("ready") {
        assert!(
            std::time::Instant::now() < deadline,
            "container never got ready"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    // Stopping the shim sends the container SIGTERM.
    running.stopper().stop();
    assert_eq!(running.wait().unwrap(), 42);
    assert_eq!(cap.out(), "ready\ngot-term\n");
    assert_clean(&s);
}

#[test]
fn dropping_a_running_container_kills_and_cleans() {
    require_containers!();
    let s = Scratch::new();
    let base = s.busybox_layer("base");
    // `sleep` as pid 1 ignores SIGTERM: it is SIGKILLed after the grace.
    let spec = ContainerSpec::new(s.rootfs(vec![base], "a"), sh("exec sleep 60"));
    let opts = ShimOptions {
        grace: Duration::from_millis(300),
        ..Default::default()
    };
    let running = s.start(&spec, Capture::default().sink(), opts);
    let pid = running.container_pid();
    drop(running);
    wait_for("the container to be killed", || is_dead(pid));
    assert_clean(&s);
}

#[test]
fn concurrent_containers_from_threads() {
    require_containers!();
    let s = Scratch::new();
    let base = s.busybox_layer("base");
    let results: Vec<(i32, String)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..6)
            .map(|i| {
                let spec = ContainerSpec::new(
                    s.rootfs(vec![base.clone()], &format!("c{i}")),
                    sh(&format!("echo {i}; exit {i}")),
                );
                let s = &s;
                scope.spawn(move || {
                    let cap = Capture::default();
                    let code = s.run(&spec, cap.sink()).unwrap();
                    (code, cap.out())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, r) in results.into_iter().enumerate() {
        assert_eq!(r, (i as i32, format!("{i}\n")));
    }
    assert_clean(&s);
}

/// A state root reached through a symlink (e.g. `--root` on a linked
/// path): the container's mounts are still found and detached, so its
/// state is removed and a second container runs too.
#[test]
fn state_root_behind_a_symlink_is_cleaned_up() {
    require_containers!();
    let s = Scratch::new();
    let base = s.busybox_layer("base");
    let real = s.path().join("real-state");
    std::fs::create_dir_all(&real).unwrap();
    let link = s.path().join("linked-state");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let shim = kiln_engine::executor::Shim::new(env!("CARGO_BIN_EXE_kiln"), &link);
    for i in 0..2 {
        let spec = ContainerSpec::new(s.rootfs(vec![base.clone()], &format!("l{i}")), sh("echo hi > /x"));
        let code = shim
            .start(&spec, ShimOptions::default(), Capture::default().sink())
            .unwrap()
            .wait()
            .unwrap();
        assert_eq!(code, 0);
    }
    assert_nothing_left(s.path(), &real);
}

/// `Runtime::for_store`: the state goes to a tmpfs when there is one (here
/// `/run` or `/dev/shm`), named after the store; throw-away changes go to
/// the store's own disk and are removed with the container.
#[test]
fn store_runtime_keeps_state_on_a_tmpfs_and_changes_on_disk() {
    require_containers!();
    let s = Scratch::new();
    let store = s.path().join("store");
    let rt = kiln_engine::runtime::Runtime::for_store(&store).unwrap();
    let tmpfs = ["/run", "/dev/shm"].iter().any(|m| {
        nix::sys::statfs::statfs(*m).is_ok_and(|fs| fs.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC)
    });
    let state = rt.state_root().to_path_buf();
    if tmpfs {
        let fs = nix::sys::statfs::statfs(&state).unwrap();
        assert_eq!(fs.filesystem_type(), nix::sys::statfs::TMPFS_MAGIC, "{}", state.display());
        assert!(!state.starts_with(s.path()), "{}", state.display());
    } else {
        println!("no tmpfs at /run or /dev/shm: state stays at {}", state.display());
        assert_eq!(state, std::fs::canonicalize(&store).unwrap().join("run"));
    }
    // The same store always gets the same state dir; another store another.
    assert_eq!(kiln_engine::runtime::Runtime::for_store(&store).unwrap().state_root(), state);
    let other = kiln_engine::runtime::Runtime::for_store(&s.path().join("other")).unwrap();
    assert_ne!(other.state_root(), state);

    // A throw-away container (as `kiln run`): its changes are written under
    // <store>/run/scratch while it runs, and gone afterwards.
    let base = s.busybox_layer("base");
    let shim = kiln_engine::executor::Shim::new(env!("CARGO_BIN_EXE_kiln"), &state);
    let scratch = std::fs::canonicalize(&store).unwrap().join("run/scratch");
    let spec = ContainerSpec::new(
        kiln_engine::runtime::Rootfs::throwaway(vec![base.clone()]),
        sh("echo data > /written; ls /written; sleep 0.3"),
    );
    let cap = Capture::default();
    let probe = scratch.clone();
    let seen = std::thread::spawn(move || {
        // The upper exists, on disk, while the container runs.
        for _ in 0..500 {
            if let Ok(d) = std::fs::read_dir(&probe) {
                if d.count() > 0 {
                    return true;
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        false
    });
    let code = shim.start(&spec, ShimOptions::default(), cap.sink()).unwrap().wait().unwrap();
    assert_eq!((code, cap.out().as_str()), (0, "/written\n"));
    assert!(seen.join().unwrap(), "no scratch dir appeared under {}", scratch.display());
    assert_eq!(std::fs::read_dir(&scratch).unwrap().count(), 0, "scratch left behind");
    assert_nothing_left(s.path(), &state);
    assert!(mounts_below(&state).is_empty(), "{:?}", mounts_below(&state));
    // A deleted store's state dir goes when another store first runs here.
    let other_state = other.state_root().to_path_buf();
    std::fs::remove_dir_all(s.path().join("other")).unwrap();
    let third = kiln_engine::runtime::Runtime::for_store(&s.path().join("third")).unwrap();
    if tmpfs {
        assert!(!other_state.exists(), "{} outlived its store", other_state.display());
        assert!(state.exists(), "the state of a store still there went too");
    }
    for dir in [&state, &other_state, &third.state_root().to_path_buf()] {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// The standard mount points come from a layer of their own (docker's
/// init layer): a RUN that writes into the image's `/etc` copies up an
/// `/etc` with the image's owner and mode, and the upperdir holds exactly
/// the step's diff; the image's own `/etc/hosts` is covered by kiln's.
#[test]
fn mount_point_layer_keeps_the_images_etc() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    require_containers!();
    let s = Scratch::new();
    let base = s.busybox_layer("base");
    std::fs::write(base.join("etc/hosts"), "10.9.9.9 from-the-image\n").unwrap();
    std::os::unix::fs::chown(base.join("etc"), Some(0), Some(4)).unwrap();
    std::fs::set_permissions(base.join("etc"), std::fs::Permissions::from_mode(0o750)).unwrap();
    let rootfs = s.rootfs(vec![base.clone()], "m");
    let upper = rootfs.upper.clone();
    let spec = ContainerSpec::new(rootfs, sh("echo x > /etc/new; grep -c from-the-image /etc/hosts; ls -d /proc/1 /dev/null /sys/kernel"));
    let cap = Capture::default();
    let code = s.run(&spec, cap.sink()).unwrap();
    assert_eq!(code, 0, "{}", cap.err());
    assert_eq!(cap.out(), "0\n/dev/null\n/proc/1\n/sys/kernel\n", "{}", cap.err());
    assert_eq!(tree(&upper), vec!["etc", "etc/new"]);
    let etc = std::fs::metadata(upper.join("etc")).unwrap();
    assert_eq!((etc.mode() & 0o7777, etc.uid(), etc.gid()), (0o750, 0, 4));
}
