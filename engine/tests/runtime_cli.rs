//! `kiln run` end to end, and the executor the solver uses (needs root and
//! busybox-static).

mod runtime_common;

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use kiln_engine::executor::ContainerExecutor;
use kiln_engine::runtime::NetworkMode;
use kiln_solver::{ExecRequest, Executor, HostMount, HostMountSource};
use runtime_common::{
    Capture, Scratch, assert_nothing_left, is_dead, mounts_below, tree, wait_for,
};

fn kiln() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
}

#[test]
fn kiln_run_rootfs_streams_output_and_exit_code() {
    require_containers!();
    let s = Scratch::new();
    let base = s.busybox_layer("base");
    let out = kiln()
        .args(["--root"])
        .arg(s.path().join("root"))
        .args([
            "run",
            "--rm",
            "-e",
            "A=1",
            "-w",
            "/srv",
            "-u",
            "alice",
            "--network",
            "none",
            "--memory",
            "64m",
            "--cpus",
            "0.5",
            "--rootfs",
        ])
        .arg(&base)
        .args([
            "/bin/sh",
            "-c",
            "echo $A $(pwd) $(id -u); echo err >&2; exit 5",
        ])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "1 /srv 1000\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "err\n");
    assert!(mounts_below(s.path()).is_empty());
    // The rootfs directory itself was never written to.
    assert!(!base.join("srv").exists());
}

#[test]
fn kiln_run_with_output_to_dev_null_can_write() {
    require_containers!();
    let s = Scratch::new();
    let base = s.busybox_layer("base");
    let vol = s.layer("vol");
    // Output to /dev/null must not turn the container's writes into EBADF
    // (libcontainer reopens such an fd read-only); what it wrote is gone,
    // the exit code and the rest of its work are not.
    let status = kiln()
        .args(["--root"])
        .arg(s.path().join("root"))
        .args(["run", "--rm", "--network", "none", "-v"])
        .arg(format!("{}:/vol", vol.display()))
        .args(["--rootfs"])
        .arg(&base)
        .args([
            "/bin/sh",
            "-c",
            "echo out || exit 7; echo err >&2 || exit 8; echo done > /vol/done",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(0));
    assert_eq!(std::fs::read_to_string(vol.join("done")).unwrap(), "done\n");
}

#[test]
fn kiln_run_volume_and_stdin() {
    require_containers!();
    let s = Scratch::new();
    let base = s.busybox_layer("base");
    let vol = s.layer("vol");
    let mut child = kiln()
        .args(["--root"])
        .arg(s.path().join("root"))
        .args(["run", "-i", "-v"])
        .arg(format!("{}:/vol", vol.display()))
        .args(["--rootfs"])
        .arg(&base)
        .args(["/bin/sh", "-c", "cat > /vol/in.txt; echo saved"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"piped input\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "saved\n");
    assert_eq!(
        std::fs::read_to_string(vol.join("in.txt")).unwrap(),
        "piped input\n"
    );
}

#[test]
fn kiln_run_bad_input_is_a_clear_error() {
    require_containers!();
    let s = Scratch::new();
    let base = s.busybox_layer("base");
    for (args, want) in [
        (vec!["--network", "bridge2"], "--network"),
        (vec!["--memory", "lots"], "--memory"),
        (vec!["-v", "relative-nowhere:/x"], "-v"),
    ] {
        let out = kiln()
            .args(["--root"])
            .arg(s.path().join("root"))
            .arg("run")
            .args(&args)
            .arg("--rootfs")
            .arg(&base)
            .arg("true")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{args:?}: {err}");
    }
    let out = kiln()
        .args(["--root"])
        .arg(s.path().join("root"))
        .args(["run", "nosuchimage", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("nosuchimage") && err.contains("kiln pull"),
        "{err}"
    );
}

#[test]
fn kiln_run_image_from_the_store() {
    require_containers!();
    let s = Scratch::new();
    let base = s.busybox_layer("base");
    let root = s.path().join("root");
    let tarball = s.path().join("rootfs.tar");
    let st = Command::new("tar")
        .arg("-C")
        .arg(&base)
        .arg("-cf")
        .arg(&tarball)
        .arg(".")
        .status()
        .unwrap();
    assert!(st.success());
    let out = kiln()
        .arg("--root")
        .arg(&root)
        .arg("import")
        .arg(&tarball)
        .arg("bb:1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "import: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = kiln()
        .arg("--root")
        .arg(&root)
        .args([
            "run",
            "--rm",
            "bb:1",
            "/bin/sh",
            "-c",
            "echo $((6*7)); id -un",
        ])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "42\nroot\n");
    assert!(mounts_below(s.path()).is_empty());
}

#[test]
fn sigterm_to_kiln_is_forwarded_to_the_container() {
    require_containers!();
    let s = Scratch::new();
    let base = s.busybox_layer("base");
    let marker = s.layer("marker");
    let child = kiln()
        .args(["--root"])
        .arg(s.path().join("root"))
        .args(["run", "-v"])
        .arg(format!("{}:/m", marker.display()))
        .args(["--rootfs"])
        .arg(&base)
        .args([
            "/bin/sh",
            "-c",
            "trap 'echo term; exit 42' TERM; touch /m/ready; while :; do sleep 0.05; done",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("container start", || marker.join("ready").exists());
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(42));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "term\n");
    assert!(mounts_below(s.path()).is_empty());
}

#[test]
fn kill_9_of_kiln_takes_the_container_along_and_the_next_start_sweeps() {
    require_containers!();
    let s = Scratch::new();
    let base = s.busybox_layer("base");
    let marker = s.layer("marker");
    let root = s.path().join("root");
    std::fs::create_dir_all(&root).unwrap();
    let state_root = kiln_engine::runtime::Runtime::state_root_of_store(&root).unwrap();
    let mut child = kiln()
        .arg("--root")
        .arg(&root)
        .args(["run", "--name", "victim", "-v"])
        .arg(format!("{}:/m", marker.display()))
        .args(["--rootfs"])
        .arg(&base)
        .args(["/bin/sh", "-c", "echo $$ > /m/ready; sleep 600"])
        .spawn()
        .unwrap();
    wait_for("container start", || marker.join("ready").exists());
    let state = state_root.join("containers/victim");
    assert!(state.exists());
    let init = container_pids(child.id() as i32);
    assert!(!init.is_empty(), "the container runs in its own pid namespace");
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(state.exists(), "expected kill -9 to leave state behind");
    // PR_SET_PDEATHSIG: the container dies with kiln (its pid namespace too).
    wait_for("the container to die with kiln", || {
        init.iter().all(|p| is_dead(*p))
    });
    // The next kiln start sweeps the rest.
    assert_nothing_left(s.path(), &state_root);
    assert!(!state.exists());
}

/// SIGKILL of `kiln run` at every moment of a container's start (before the
/// clone, between libcontainer's create and start, while it runs): each
/// later kiln start cleans up after the dead one, and in the end nothing is
/// left: no state, mounts, processes (libcontainer's intermediate children
/// included) or cgroups.
#[test]
fn kill_9_of_kiln_mid_start_leaves_nothing() {
    require_containers!();
    let s = Scratch::new();
    let base = s.busybox_layer("base");
    let root = s.path().join("root");
    for i in 0..16u64 {
        let mut child = kiln()
            .arg("--root")
            .arg(&root)
            .args(["run", "--rootfs"])
            .arg(&base)
            .args(["sleep", "600"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // 0..150 ms in steps: covers start-up, create, start and running.
        std::thread::sleep(Duration::from_millis(i * 10));
        child.kill().unwrap();
        child.wait().unwrap();
    }
    assert_nothing_left(s.path(), &kiln_engine::runtime::Runtime::state_root_of_store(&root).unwrap());
}

/// `kiln run -it` on a real pty (opened here, made kiln's controlling
/// terminal): the container gets a pty of its own from its devpts, sized
/// like ours, resized when ours is (SIGWINCH), our input reaches it, and
/// its exit code is kiln's.
#[test]
fn kiln_run_tty_gets_a_pty_with_our_size_and_resizes() {
    use std::os::fd::{AsRawFd, OwnedFd};
    use std::os::unix::process::CommandExt;
    require_containers!();
    let s = Scratch::new();
    let base = s.busybox_layer("base");
    let size = |rows, cols| nix::pty::Winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let pty = nix::pty::openpty(Some(&size(33, 101)), None).unwrap();
    let slave = pty.slave;
    let mut cmd = kiln();
    cmd.arg("--root")
        .arg(s.path().join("root"))
        .args(["run", "-it", "--rootfs"])
        .arg(&base)
        .args([
            "/bin/sh",
            "-c",
            "tty; stty size; read line; stty size; echo \"got $line\"; exit 3",
        ])
        .stdin(Stdio::from(OwnedFd::from(slave.try_clone().unwrap())))
        .stdout(Stdio::from(OwnedFd::from(slave.try_clone().unwrap())))
        .stderr(Stdio::from(slave));
    // SAFETY: setsid and ioctl are async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            // Our pty becomes kiln's controlling terminal, as in a shell.
            if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    drop(cmd);
    let master = std::fs::File::from(pty.master);
    let screen = Arc::new(std::sync::Mutex::new(String::new()));
    let reader = {
        let screen = screen.clone();
        let mut master = master.try_clone().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            // Ends with EIO once kiln (the last holder of the slave) exits.
            while let Ok(n) = std::io::Read::read(&mut master, &mut buf) {
                if n == 0 {
                    break;
                }
                screen
                    .lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        })
    };
    let seen = |text: &str| screen.lock().unwrap().contains(text);
    wait_for("the container's first stty size", || seen("33 101"));
    // Resize our terminal: the kernel sends SIGWINCH to kiln.
    let ws = size(40, 120);
    // SAFETY: TIOCSWINSZ with a valid winsize on our pty master.
    assert_eq!(
        unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) },
        0
    );
    std::thread::sleep(Duration::from_millis(300));
    std::io::Write::write_all(&mut &master, b"hello\r").unwrap();
    let status = child.wait().unwrap();
    drop(master);
    reader.join().unwrap();
    let screen = screen.lock().unwrap().clone();
    assert_eq!(status.code(), Some(3), "{screen}");
    assert!(screen.contains("/dev/pts/"), "tty inside: {screen}");
    assert!(screen.contains("40 120"), "resize not passed on: {screen}");
    assert!(
        screen.contains("got hello"),
        "input not passed on: {screen}"
    );
    assert_nothing_left(s.path(), &s.path().join("root/run"));
}

/// Host pids of the container processes started by `kiln_pid`: its
/// descendants in another pid namespace.
fn container_pids(kiln_pid: i32) -> Vec<i32> {
    let ppid = |pid: i32| -> Option<i32> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        stat.rsplit_once(") ")?.1.split(' ').nth(1)?.parse().ok()
    };
    let pid_ns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok();
    let ours = pid_ns("self");
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let theirs = pid_ns(&pid.to_string());
        if theirs.is_none() || theirs == ours {
            continue;
        }
        // A descendant of kiln's.
        let mut p = pid;
        while let Some(parent) = ppid(p).filter(|&q| q > 1) {
            if parent == kiln_pid {
                out.push(pid);
                break;
            }
            p = parent;
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn container_executor_runs_solver_requests_in_parallel() {
    require_containers!();
    let s = Scratch::new();
    let base = s.busybox_layer("base");
    let cache = s.layer("cache");
    std::fs::write(cache.join("c"), "cached\n").unwrap();
    let exec = Arc::new(ContainerExecutor::new(s.path().join("run")).unwrap());
    let mut tasks = Vec::new();
    for i in 0..4 {
        let rootfs = s.rootfs(vec![base.clone()], &format!("step{i}"));
        let req = ExecRequest {
            lower: rootfs.lower.clone(),
            upper: rootfs.upper.clone(),
            work: rootfs.work.clone(),
            args: vec![
                "/bin/sh".into(),
                "-c".into(),
                format!("cat /cache/c; echo $STEP > /out; exit {i}"),
            ],
            env: vec![format!("STEP={i}")],
            cwd: "/".into(),
            user: String::new(),
            network: NetworkMode::None,
            mounts: vec![HostMount {
                target: "/cache".into(),
                source: HostMountSource::Layers(vec![cache.clone()]),
                readonly: true,
            }],
            hostname: "step".into(),
        };
        let exec = exec.clone();
        tasks.push(tokio::spawn(async move {
            let cap = Capture::default();
            let code = exec.exec(req, cap.sink()).await.unwrap();
            (code, cap.out(), rootfs.upper)
        }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        let (code, out, upper) = t.await.unwrap();
        assert_eq!(code, i as i32);
        assert_eq!(out, "cached\n");
        assert_eq!(tree(&upper), vec!["out"]);
        assert_eq!(
            std::fs::read_to_string(upper.join("out")).unwrap(),
            format!("{i}\n")
        );
    }
    assert!(mounts_below(s.path()).is_empty());
}

/// A relative `--root` (resolved against kiln's working directory): a
/// build with a RUN step and a `kiln run` of its result both work, and the
/// store is where the user meant.
#[test]
fn a_relative_root_builds_and_runs() {
    require_containers!();
    let s = Scratch::new();
    let base = s.busybox_layer("base");
    let tar = s.path().join("base.tar");
    assert!(Command::new("tar").arg("-C").arg(&base).arg("-cf").arg(&tar).arg(".").status().unwrap().success());
    let ctx = s.layer("ctx");
    std::fs::write(ctx.join("Dockerfile"), "FROM rel:base\nRUN echo built > /x\n").unwrap();
    let in_scratch = |args: &[&str]| {
        let out = kiln().current_dir(s.path()).args(["--root", "rel-root"]).args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    in_scratch(&["import", "base.tar", "rel:base"]);
    in_scratch(&["build", "--progress", "plain", "-t", "rel:built", "ctx"]);
    assert_eq!(in_scratch(&["run", "--rm", "rel:built", "cat", "/x"]), "built\n");
    assert!(s.path().join("rel-root/images").exists(), "the store is not under the working directory");
}
