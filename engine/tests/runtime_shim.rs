//! Containers started from a busy multi-threaded process (needs root and
//! busybox-static): each runs in a `kiln __container-shim` process, so
//! thread churn and stdout traffic in this process cannot hang the clone.

mod runtime_common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use kiln_engine::executor::{Shim, ShimOptions, ShimProcess};
use kiln_engine::runtime::{ContainerSpec, Mount, MountSource, Runtime, Stdio};
use runtime_common::{
    Capture, Scratch, assert_nothing_left, cgroups_with_prefix, is_dead, mounts_below,
    processes_using, wait_for,
};

const RUNS: usize = 60;
const PARALLEL: usize = 4;

fn sh(script: &str) -> Vec<String> {
    vec!["/bin/sh".into(), "-c".into(), script.into()]
}

/// Threads that keep starting and exiting threads and printing to stdout
/// (the std-internal locks a cloned child could inherit held).
fn churn(stop: Arc<AtomicBool>) -> Vec<std::thread::JoinHandle<()>> {
    (0..3)
        .map(|i| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::spawn(move || println!("churn {i}"))
                        .join()
                        .unwrap();
                }
            })
        })
        .collect()
}

/// Runs `RUNS` containers, `PARALLEL` at a time, with `run_one`, under
/// thread churn; fails (instead of hanging) after `limit`.
fn stress<F, Fut>(limit: Duration, run_one: F)
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let stop = Arc::new(AtomicBool::new(false));
    let churners = churn(stop.clone());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(
            futures::stream::iter(0..RUNS)
                .map(&run_one)
                .buffer_unordered(PARALLEL)
                .collect::<Vec<()>>(),
        );
        let _ = tx.send(());
    });
    let result = rx.recv_timeout(limit);
    stop.store(true, Ordering::Relaxed);
    for c in churners {
        c.join().unwrap();
    }
    assert!(
        result.is_ok(),
        "{RUNS} containers did not finish within {limit:?}: a container start hung"
    );
}

#[test]
fn many_containers_from_a_busy_process_never_hang() {
    require_containers!();
    let s = Arc::new(Scratch::new());
    let base = s.busybox_layer("base");
    let shim = Arc::new(Shim::new(env!("CARGO_BIN_EXE_kiln"), s.path().join("run")));
    let started = Instant::now();
    let s2 = s.clone();
    stress(Duration::from_secs(240), move |i| {
        let shim = shim.clone();
        let spec = ContainerSpec::new(
            s2.rootfs(vec![base.clone()], &format!("c{i}")),
            sh(&format!("echo out{i}; echo err{i} >&2; exit {}", i % 7)),
        );
        async move {
            let cap = Capture::default();
            let code = shim.run(&spec, cap.sink()).await.unwrap();
            assert_eq!(code, (i % 7) as i32);
            assert_eq!(cap.out(), format!("out{i}\n"));
            assert_eq!(cap.err(), format!("err{i}\n"));
        }
    });
    eprintln!(
        "{RUNS} containers through the shim in {:?}",
        started.elapsed()
    );
    assert!(
        mounts_below(s.path()).is_empty(),
        "mounts left: {:?}",
        mounts_below(s.path())
    );
}

/// The bug this shim fixes: the same load with libcontainer cloning from
/// this multi-threaded process. Ignored: it hangs (run it by hand with
/// `--ignored` to see the failure).
#[test]
#[ignore]
fn in_process_runtime_hangs_under_thread_churn() {
    require_containers!();
    let _serial = runtime_common::serial();
    let s = Arc::new(Scratch::new());
    let base = s.busybox_layer("base");
    let runtime: Runtime = s.runtime();
    let s2 = s.clone();
    stress(Duration::from_secs(120), move |i| {
        let runtime = runtime.clone();
        let spec = ContainerSpec::new(s2.rootfs(vec![base.clone()], &format!("c{i}")), sh("true"));
        async move {
            let cap = Capture::default();
            tokio::task::spawn_blocking(move || runtime.run(&spec, Stdio::stream(cap.sink())))
                .await
                .unwrap()
                .unwrap();
        }
    });
}

#[test]
fn bad_spec_is_an_error_not_an_exit_code() {
    require_containers!();
    let s = Scratch::new();
    let base = s.busybox_layer("base");
    let shim = Shim::new(env!("CARGO_BIN_EXE_kiln"), s.path().join("run"));
    let spec = ContainerSpec::new(s.rootfs(vec![base], "x"), Vec::new());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let err = rt
        .block_on(shim.run(&spec, Capture::default().sink()))
        .unwrap_err();
    assert!(format!("{err:#}").contains("no command to run"), "{err:#}");
}

/// Cost of the shim: 20 sequential `true` containers in process and
/// through the shim (`--ignored --nocapture` to see the numbers).
#[test]
#[ignore]
fn shim_cost() {
    require_containers!();
    let _serial = runtime_common::serial();
    let s = Scratch::new();
    let base = s.busybox_layer("base");
    let runtime = s.runtime();
    let shim = Shim::new(env!("CARGO_BIN_EXE_kiln"), s.path().join("run"));
    let tokio = tokio::runtime::Runtime::new().unwrap();
    for round in 0..2 {
        let t = Instant::now();
        for i in 0..20 {
            let spec = ContainerSpec::new(
                s.rootfs(vec![base.clone()], &format!("a{round}-{i}")),
                sh("true"),
            );
            assert_eq!(
                runtime
                    .run(&spec, Stdio::stream(Capture::default().sink()))
                    .unwrap(),
                0
            );
        }
        let direct = t.elapsed() / 20;
        let t = Instant::now();
        for i in 0..20 {
            let spec = ContainerSpec::new(
                s.rootfs(vec![base.clone()], &format!("b{round}-{i}")),
                sh("true"),
            );
            assert_eq!(
                tokio
                    .block_on(shim.run(&spec, Capture::default().sink()))
                    .unwrap(),
                0
            );
        }
        let shimmed = t.elapsed() / 20;
        eprintln!(
            "round {round}: per container: in-process {direct:?}, through the shim {shimmed:?}"
        );
    }
}

/// The shim of a running container (its parent).
fn parent_of(pid: i32) -> i32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = stat.rsplit_once(") ").unwrap().1;
    rest.split(' ').nth(1).unwrap().parse().unwrap()
}

/// Start `script` as the container's shell through the shim.
fn start(s: &Scratch, shim: &Shim, name: &str, script: &str, opts: ShimOptions) -> ShimProcess {
    let base = s.path().join("base");
    if !base.exists() {
        s.busybox_layer("base");
    }
    let mut spec = ContainerSpec::new(s.rootfs(vec![base], name), sh(script));
    spec.name = Some(name.into());
    shim.start(&spec, opts, Capture::default().sink()).unwrap()
}

#[test]
fn stop_kills_a_container_that_ignores_sigterm_after_the_grace() {
    require_containers!();
    let s = Scratch::new();
    let shim = Shim::new(env!("CARGO_BIN_EXE_kiln"), s.path().join("run"));
    // `exec sleep` as pid 1 of its namespace: SIGTERM has no effect on it.
    let opts = ShimOptions {
        grace: Duration::from_millis(700),
        ..Default::default()
    };
    let p = start(&s, &shim, "stubborn", "exec sleep 600", opts);
    let pid = p.container_pid();
    assert!(pid > 0 && !is_dead(pid));
    let t = Instant::now();
    p.stopper().stop();
    let code = p.wait().unwrap();
    let took = t.elapsed();
    assert_eq!(code, 128 + 9, "killed by SIGKILL");
    assert!(
        took >= Duration::from_millis(600),
        "killed before the grace ended: {took:?}"
    );
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert!(is_dead(pid));
    assert_nothing_left(s.path(), &s.path().join("run"));
}

#[test]
fn stop_forwards_sigterm_to_a_container_that_handles_it() {
    require_containers!();
    let s = Scratch::new();
    let shim = Shim::new(env!("CARGO_BIN_EXE_kiln"), s.path().join("run"));
    let opts = ShimOptions::default();
    let stopper = opts.stopper.clone();
    let p = start(
        &s,
        &shim,
        "polite",
        "trap 'exit 42' TERM; touch /tmp/ready; while :; do sleep 0.05; done",
        opts,
    );
    // The trap must be set before SIGTERM comes (pid 1 ignores it otherwise).
    let ready = s.path().join("polite.upper/tmp/ready");
    wait_for("the trap to be set", || ready.exists());
    let t = Instant::now();
    stopper.stop();
    assert_eq!(p.wait().unwrap(), 42);
    assert!(
        t.elapsed() < Duration::from_secs(8),
        "took {:?}",
        t.elapsed()
    );
    assert_nothing_left(s.path(), &s.path().join("run"));
}

#[test]
fn stop_before_the_start_finishes_still_stops_the_container() {
    require_containers!();
    let s = Scratch::new();
    let shim = Shim::new(env!("CARGO_BIN_EXE_kiln"), s.path().join("run"));
    let opts = ShimOptions {
        grace: Duration::from_millis(300),
        ..Default::default()
    };
    opts.stopper.stop();
    let t = Instant::now();
    // Either it never starts (an error) or it is stopped at once.
    let mut spec = ContainerSpec::new(
        s.rootfs(vec![s.busybox_layer("base")], "early"),
        sh("exec sleep 600"),
    );
    spec.name = Some("early".into());
    if let Ok(p) = shim.start(&spec, opts, Capture::default().sink()) {
        assert_eq!(p.wait().unwrap(), 128 + 9);
    }
    assert!(
        t.elapsed() < Duration::from_secs(12),
        "took {:?}",
        t.elapsed()
    );
    assert_nothing_left(s.path(), &s.path().join("run"));
}

#[test]
fn sigkill_of_the_shim_takes_its_container_along() {
    require_containers!();
    let s = Scratch::new();
    let shim = Shim::new(env!("CARGO_BIN_EXE_kiln"), s.path().join("run"));
    let p = start(
        &s,
        &shim,
        "orphan",
        "exec sleep 600",
        ShimOptions::default(),
    );
    let pid = p.container_pid();
    let shim_pid = parent_of(pid);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(shim_pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // Checked first: `wait` also waits for the end of the container's
    // output, which a surviving container would hold open.
    wait_for("the container to die with its shim", || is_dead(pid));
    let err = p.wait().unwrap_err();
    assert!(format!("{err:#}").contains("signal 9"), "{err:#}");
    // Its state, mounts and cgroup are the next start's to sweep.
    assert_nothing_left(s.path(), &s.path().join("run"));
}

#[test]
fn dropping_the_run_future_stops_the_container() {
    require_containers!();
    let s = Scratch::new();
    let base = s.busybox_layer("base");
    let shim = Shim::new(env!("CARGO_BIN_EXE_kiln"), s.path().join("run"));
    let marker = s.layer("marker");
    let mut spec = ContainerSpec::new(
        s.rootfs(vec![base], "dropped"),
        sh("touch /m/ready; exec sleep 600"),
    );
    spec.mounts.push(Mount {
        target: "/m".into(),
        source: MountSource::Bind(marker.clone()),
        readonly: false,
    });
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let run = shim.run(&spec, Capture::default().sink());
        let ready = async {
            while !marker.join("ready").exists() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::select! {
            r = run => panic!("the container ended by itself: {r:?}"),
            () = ready => {}
        }
    });
    // The future is dropped: SIGTERM (ignored by `sleep` as pid 1), then
    // SIGKILL after the default grace.
    wait_for("the container to be stopped", || {
        processes_using(s.path()).is_empty()
    });
    drop(rt);
    assert_nothing_left(s.path(), &s.path().join("run"));
}

/// Two store roots run a container of the same name at the same time: each
/// gets its own cgroup.
#[test]
fn same_container_name_in_two_roots_at_once() {
    require_containers!();
    let s = Scratch::new();
    let marker = s.layer("marker");
    let mut running = Vec::new();
    for root in ["root1", "root2"] {
        let shim = Shim::new(env!("CARGO_BIN_EXE_kiln"), s.path().join(root).join("run"));
        let mut spec = ContainerSpec::new(
            s.rootfs(vec![s.path().join("base")], root),
            sh(&format!(
                "touch /m/{root}; while [ ! -e /m/go ]; do sleep 0.05; done; cat /proc/self/cgroup"
            )),
        );
        if !s.path().join("base").exists() {
            s.busybox_layer("base");
        }
        spec.rootfs.lower = vec![s.path().join("base")];
        spec.name = Some("same".into());
        spec.limits.memory_bytes = Some(64 << 20);
        spec.mounts.push(Mount {
            target: "/m".into(),
            source: MountSource::Bind(marker.clone()),
            readonly: false,
        });
        let cap = Capture::default();
        let p = shim
            .start(&spec, ShimOptions::default(), cap.sink())
            .unwrap();
        running.push((
            p,
            cap,
            Runtime::new(s.path().join(root).join("run")).unwrap(),
        ));
    }
    wait_for("both containers", || {
        marker.join("root1").exists() && marker.join("root2").exists()
    });
    let names: Vec<String> = running
        .iter()
        .map(|(_, _, rt)| rt.cgroup_name("same"))
        .collect();
    assert_ne!(names[0], names[1]);
    for name in &names {
        assert!(!cgroups_with_prefix(name).is_empty(), "no cgroup {name}");
    }
    std::fs::write(marker.join("go"), "").unwrap();
    for ((p, cap, _), name) in running.into_iter().zip(&names) {
        assert_eq!(p.wait().unwrap(), 0, "{}", cap.err());
        // Every hierarchy the container was put in (v1 controllers and/or
        // v2, depending on the host) names its own root's cgroup.
        let out = cap.out();
        let placed: Vec<&str> = out.lines().filter(|l| l.contains("/kiln/")).collect();
        assert!(!placed.is_empty(), "{out}");
        assert!(
            placed.iter().all(|l| l.ends_with(&format!("/{name}"))),
            "{out}"
        );
        assert!(cgroups_with_prefix(name).is_empty(), "cgroup {name} left");
    }
}

/// A shim ended by its start watchdog (SIGALRM, before the container ran)
/// is a [`StartTimedOut`]; `Shim::start` tries such a start once more and
/// then gives up with that error. The "shim" here is a script that ends
/// itself the way the watchdog would, counting its starts; it cannot be a
/// zygote, so this also covers the fallback to an exec'd shim.
#[test]
fn a_start_that_timed_out_is_tried_once_more() {
    use std::os::unix::fs::PermissionsExt;
    let s = Scratch::new();
    let count = s.path().join("starts");
    let fake = s.path().join("kiln");
    // Not a zygote either: kiln falls back to exec'ing it per container.
    std::fs::write(
        &fake,
        format!(
            "#!/bin/sh\n[ \"$1\" = __shim-zygote ] && exit 1\necho start >> {}\nkill -ALRM $$\n",
            count.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let rootfs = s.rootfs(vec![s.layer("empty")], "a");
    let spec = ContainerSpec::new(rootfs, sh("true"));
    let cap = Capture::default();
    let err = match Shim::new(&fake, s.path().join("run")).start(&spec, ShimOptions::default(), cap.sink()) {
        Ok(_) => panic!("a shim that never starts cannot start a container"),
        Err(e) => e,
    };
    assert!(err.is::<kiln_engine::executor::StartTimedOut>(), "{err:#}");
    assert!(format!("{err}").contains("did not start within"), "{err:#}");
    assert_eq!(std::fs::read_to_string(&count).unwrap(), "start\nstart\n", "tried exactly twice");
}

/// With `report_exit_early` (what build steps use), `wait` returns once the
/// container has exited, with all of its output and an upperdir that holds
/// exactly its diff (no mount-point stubs such as /proc, /dev, /sys or
/// /etc/hosts, even on a base layer that lacks them all); the shim's
/// teardown finishes on its own afterwards and leaves nothing behind.
#[test]
fn early_exit_report_gives_the_exact_diff_and_the_teardown_still_completes() {
    require_containers!();
    let s = Scratch::new();
    let base = s.busybox_layer("base");
    for i in 0..5 {
        let rootfs = s.rootfs(vec![base.clone()], &format!("e{i}"));
        let upper = rootfs.upper.clone();
        let spec = ContainerSpec::new(
            rootfs,
            sh(&format!("echo out{i}; echo err{i} >&2; echo {i} > /made; exit {}", i + 3)),
        );
        let cap = Capture::default();
        let opts = ShimOptions {
            report_exit_early: true,
            ..Default::default()
        };
        let code = s.start(&spec, cap.sink(), opts).wait().unwrap();
        assert_eq!(code, (i + 3) as i32);
        assert_eq!(cap.out(), format!("out{i}\n"));
        assert_eq!(cap.err(), format!("err{i}\n"));
        assert_eq!(runtime_common::tree(&upper), vec!["made".to_string()]);
        assert_eq!(std::fs::read_to_string(upper.join("made")).unwrap(), format!("{i}\n"));
    }
    assert_nothing_left(s.path(), &s.path().join("run"));
}
