//! The shim zygote (needs root and busybox-static): container shims forked
//! by one `kiln __shim-zygote` per process instead of exec'd per container.

mod runtime_common;

use std::io::Write;
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::sync::Arc;

use kiln_engine::executor::{Shim, ShimOptions, StartTimedOut};
use kiln_engine::runtime::{ContainerSpec, Mount, MountSource};
use runtime_common::{Capture, Scratch, assert_nothing_left, is_dead, wait_for};

fn sh(script: &str) -> Vec<String> {
    vec!["/bin/sh".into(), "-c".into(), script.into()]
}

fn parent_of(pid: u32) -> u32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = stat.rsplit_once(") ").unwrap().1;
    rest.split(' ').nth(1).unwrap().parse().unwrap()
}

/// The live children of `pid`.
fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let list = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        out.extend(
            list.split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok()),
        );
    }
    out.retain(|&p| !is_dead(p as i32));
    out
}

fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|c| c.trim_end().to_string())
        .unwrap_or_default()
}

fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

/// A shim (zygote on, whatever the environment says) for this scratch dir.
fn shim(s: &Scratch) -> Shim {
    Shim::new(env!("CARGO_BIN_EXE_kiln"), s.path().join("run")).with_zygote(true)
}

/// Many containers from several threads at once through one zygote: each
/// shim is the zygote's child, gets its own stdin, and the exit codes and
/// outputs are each container's own.
#[test]
fn many_containers_at_once_through_one_zygote() {
    require_containers!();
    let s = Arc::new(Scratch::new());
    let base = s.busybox_layer("base");
    let shim = shim(&s);
    const THREADS: usize = 6;
    const EACH: usize = 5;
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            let (s, base, shim) = (s.clone(), base.clone(), shim.clone());
            std::thread::spawn(move || {
                let mut zygotes = Vec::new();
                for k in 0..EACH {
                    let i = t * EACH + k;
                    let spec = ContainerSpec::new(
                        s.rootfs(vec![base.clone()], &format!("c{i}")),
                        sh(&format!(
                            "read line; echo \"got $line\"; echo err{i} >&2; exit {}",
                            i % 7
                        )),
                    );
                    let cap = Capture::default();
                    let opts = ShimOptions {
                        stdin: true,
                        ..Default::default()
                    };
                    let mut p = shim.start(&spec, opts, cap.sink()).unwrap();
                    // Still running (it waits for its input): its shim is
                    // the zygote's child.
                    zygotes.push(parent_of(p.shim_pid().unwrap()));
                    let mut stdin = p.take_stdin().unwrap();
                    writeln!(stdin, "hello {i}").unwrap();
                    drop(stdin);
                    assert_eq!(p.wait().unwrap(), (i % 7) as i32);
                    assert_eq!(cap.out(), format!("got hello {i}\n"));
                    assert_eq!(cap.err(), format!("err{i}\n"));
                }
                zygotes
            })
        })
        .collect();
    let mut parents: Vec<u32> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    parents.dedup();
    let zygote = shim.zygote_pid().expect("a zygote runs");
    assert_eq!(
        parents,
        vec![zygote],
        "every shim was forked by the one zygote"
    );
    assert!(
        cmdline(zygote).contains("__shim-zygote"),
        "{}",
        cmdline(zygote)
    );
    assert_nothing_left(s.path(), &s.path().join("run"));
}

/// SIGKILL of the zygote between two starts: the next start gets a new
/// zygote, and a container whose shim the dead zygote had forked still
/// runs to its end with the right exit code and output.
#[test]
fn a_killed_zygote_is_replaced_and_its_shims_carry_on() {
    require_containers!();
    let s = Scratch::new();
    let base = s.busybox_layer("base");
    let marker = s.layer("marker");
    let shim = shim(&s);
    let mut spec = ContainerSpec::new(
        s.rootfs(vec![base.clone()], "long"),
        sh("touch /m/ready; while [ ! -e /m/go ]; do sleep 0.05; done; echo done; exit 5"),
    );
    spec.mounts.push(Mount {
        target: "/m".into(),
        source: MountSource::Bind(marker.clone()),
        readonly: false,
    });
    let cap = Capture::default();
    let long = shim
        .start(&spec, ShimOptions::default(), cap.sink())
        .unwrap();
    wait_for("the container to run", || marker.join("ready").exists());
    let first = shim.zygote_pid().expect("a zygote runs");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(first as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_for("the zygote to die", || is_dead(first as i32));
    let spec = ContainerSpec::new(s.rootfs(vec![base], "next"), sh("echo next; exit 3"));
    let cap2 = Capture::default();
    let code = shim
        .start(&spec, ShimOptions::default(), cap2.sink())
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!((code, cap2.out()), (3, "next\n".to_string()));
    let second = shim.zygote_pid().expect("a new zygote runs");
    assert_ne!(first, second);
    std::fs::write(marker.join("go"), "").unwrap();
    assert_eq!(long.wait().unwrap(), 5);
    assert_eq!(cap.out(), "done\n");
    assert_nothing_left(s.path(), &s.path().join("run"));
}

/// SIGKILL of a kiln process (`kiln run -t`, which runs its container
/// through a shim): its zygote, the shim and the container all go away.
#[test]
fn kill_9_of_kiln_takes_its_zygote_shims_and_containers_along() {
    require_containers!();
    let s = Scratch::new();
    let base = s.busybox_layer("base");
    let marker = s.layer("marker");
    let root = s.path().join("root");
    let mut kiln = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .env_remove("KILN_SHIM_ZYGOTE")
        .arg("--root")
        .arg(&root)
        .args(["run", "-t", "-v"])
        .arg(format!("{}:/m", marker.display()))
        .arg("--rootfs")
        .arg(&base)
        .args(sh(
            "trap 'exit 0' TERM; touch /m/ready; while :; do sleep 0.05; done",
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    wait_for("the container to run", || marker.join("ready").exists());
    let kiln_pid = kiln.id();
    let zygote = children(kiln_pid)
        .into_iter()
        .find(|&p| cmdline(p).contains("__shim-zygote"))
        .expect("kiln run -t started a zygote");
    // The shim of the container, and the spare forked for the next one.
    let forked = children(zygote);
    let shim = forked
        .iter()
        .copied()
        .find(|&p| !children(p).is_empty())
        .expect("a shim with its container");
    assert!(forked.len() <= 2, "one shim and at most one spare: {forked:?}");
    let containers = children(shim);
    kiln.kill().unwrap();
    kiln.wait().unwrap();
    let killed = std::time::Instant::now();
    for (what, pid) in [("zygote", zygote)]
        .into_iter()
        .chain(forked.iter().map(|&p| (if p == shim { "shim" } else { "spare shim" }, p)))
        .chain(containers.iter().map(|&c| ("container", c)))
    {
        wait_for(&format!("the {what} to die with kiln"), || {
            is_dead(pid as i32)
        });
    }
    // The shim saw kiln die and SIGTERMed the container, which exits on
    // it: well within `kiln run`'s 10 s stop grace (after which the
    // container would be SIGKILLed anyway).
    assert!(
        killed.elapsed() < std::time::Duration::from_secs(5),
        "the container was not stopped when kiln died, only killed after the grace: {:?}",
        killed.elapsed()
    );
    assert_nothing_left(s.path(), &root.join("run"));
}

/// A forked shim killed by SIGALRM before its container started (what its
/// start watchdog does) is a [`StartTimedOut`], told by the zygote that
/// reaped it; `Shim::start` tries once more, then gives up with it. The
/// shims are held before their start by the runtime's sweep lock, taken
/// here, and sent SIGALRM by hand.
#[test]
fn a_forked_shim_ended_by_sigalrm_before_starting_is_a_start_timeout() {
    require_containers!();
    let s = Scratch::new();
    let base = s.busybox_layer("base");
    let state = s.path().join("run");
    std::fs::create_dir_all(&state).unwrap();
    let lock = std::fs::File::create(state.join("sweep.lock")).unwrap();
    // SAFETY: flock(2) on a file we own.
    assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0);
    let shim = shim(&s);
    let spec = ContainerSpec::new(s.rootfs(vec![base], "never"), sh("echo ran"));
    let cap = Capture::default();
    let starter = {
        let (shim, sink) = (shim.clone(), cap.sink());
        std::thread::spawn(move || shim.start(&spec, ShimOptions::default(), sink).map(|_| ()))
    };
    let mut alarmed = Vec::new();
    for attempt in 0..2 {
        let mut waiting = None;
        wait_for(
            &format!("shim {attempt} to wait for the sweep lock"),
            || {
                let zygote = shim.zygote_pid();
                // A shim, not the spare waiting for the next request.
                waiting = zygote
                    .into_iter()
                    .flat_map(children)
                    .find(|p| !alarmed.contains(p) && comm(*p) == "kiln-shim");
                waiting.is_some()
            },
        );
        let pid = waiting.unwrap();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGALRM,
        )
        .unwrap();
        alarmed.push(pid);
    }
    let err = starter.join().unwrap().unwrap_err();
    drop(lock);
    assert!(err.is::<StartTimedOut>(), "{err:#}");
    assert_eq!(cap.out(), "", "the container never ran");
    assert_nothing_left(s.path(), &state);
}

/// The zygote keeps one shim forked ahead: the next container runs in that
/// spare (forked before it was asked for), and a spare killed while it
/// waits is replaced by a fork at the next request.
#[test]
fn the_next_container_runs_in_the_spare_forked_ahead() {
    require_containers!();
    let s = Scratch::new();
    let base = s.busybox_layer("base");
    let shim = shim(&s);
    let run = |name: &str, script: &str| -> (u32, i32, String) {
        let spec = ContainerSpec::new(s.rootfs(vec![base.clone()], name), sh(script));
        let cap = Capture::default();
        let p = shim.start(&spec, ShimOptions::default(), cap.sink()).unwrap();
        let pid = p.shim_pid().unwrap();
        let code = p.wait().unwrap();
        (pid, code, cap.out())
    };
    let (first, code, out) = run("a", "echo a");
    assert_eq!((code, out.as_str()), (0, "a\n"));
    let zygote = shim.zygote_pid().expect("a zygote runs");
    let idle_spare = |not: u32| {
        let c = children(zygote);
        (c.len() == 1 && c[0] != not && children(c[0]).is_empty()).then(|| c[0])
    };
    wait_for("the spare alone", || idle_spare(first).is_some());
    let spare = idle_spare(first).unwrap();
    assert_eq!(comm(spare), "kiln-spare");
    let (pid, code, out) = run("b", "echo b; exit 4");
    assert_eq!((pid, code, out.as_str()), (spare, 4, "b\n"), "ran in the spare");
    wait_for("a new spare", || idle_spare(spare).is_some());
    let dead = idle_spare(spare).unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(dead as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_for("the killed spare to be reaped", || !children(zygote).contains(&dead));
    let (pid, code, out) = run("c", "echo c; exit 6");
    assert_ne!(pid, dead);
    assert_eq!((code, out.as_str()), (6, "c\n"));
    assert_nothing_left(s.path(), &s.path().join("run"));
}
