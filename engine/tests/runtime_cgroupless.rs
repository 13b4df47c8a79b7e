//! Containers without limits join no cgroup of their own (needs root and
//! busybox-static): what replaces the devices cgroup for them, and that
//! the private mount namespace they are created in leaves nothing behind.

mod runtime_common;

use kiln_engine::executor::ShimOptions;
use kiln_engine::runtime::{ContainerSpec, Mount, MountSource};
use runtime_common::{Capture, Scratch, cgroups_with_prefix, mounts_below};

fn sh(script: &str) -> Vec<String> {
    vec!["/bin/sh".into(), "-c".into(), script.into()]
}

/// The cgroup hierarchies mounted in this (the host's) mount namespace.
fn cgroup_mount_lines() -> Vec<String> {
    let mut lines: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.split(' ').nth(4).is_some_and(|p| p.starts_with("/sys/fs/cgroup")))
        .map(str::to_string)
        .collect();
    lines.sort();
    lines
}

#[test]
fn a_container_without_limits_stays_in_the_shims_cgroups() {
    require_containers!();
    let s = Scratch::new();
    let base = s.busybox_layer("base");
    let before = cgroup_mount_lines();
    let mut spec = ContainerSpec::new(s.rootfs(vec![base], "a"), sh("sleep 30"));
    spec.name = Some("free".into());
    let running = s.start(&spec, Capture::default().sink(), ShimOptions::default());
    let pid = running.container_pid();
    let shim = running.shim_pid().expect("runs in a shim");
    let container_cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let shim_cgroups = std::fs::read_to_string(format!("/proc/{shim}/cgroup")).unwrap();
    assert_eq!(container_cgroups, shim_cgroups);
    // No directory for it in any hierarchy.
    let name = s.runtime().cgroup_name("free");
    assert_eq!(cgroups_with_prefix(&name), Vec::<std::path::PathBuf>::new());
    // The empty tmpfs it was created under never showed on the host.
    assert_eq!(cgroup_mount_lines(), before);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert_eq!(running.wait().unwrap(), 137);
    assert_eq!(cgroup_mount_lines(), before);
    assert!(mounts_below(s.path()).is_empty(), "{:?}", mounts_below(s.path()));
}

#[test]
fn a_container_without_limits_can_neither_make_nor_open_devices() {
    require_containers!();
    let s = Scratch::new();
    let base = s.busybox_layer("base");
    // A device node in an image layer and one in a bind-mounted host dir.
    // (Char 0:0 is made in /dev: overlayfs itself refuses it.)
    let dev = nix::sys::stat::makedev(1, 3);
    let kind = nix::sys::stat::SFlag::S_IFCHR;
    let perm = nix::sys::stat::Mode::from_bits_truncate(0o666);
    nix::sys::stat::mknod(&base.join("null-in-layer"), kind, perm, dev).unwrap();
    let host_dir = s.path().join("host");
    std::fs::create_dir(&host_dir).unwrap();
    nix::sys::stat::mknod(&host_dir.join("null"), kind, perm, dev).unwrap();
    let mut spec = ContainerSpec::new(
        s.rootfs(vec![base], "a"),
        sh("for c in 'mknod /tmp/blk b 8 0' 'mknod /tmp/chr c 1 3' \
            'mknod /dev/whiteout c 0 0' 'mkfifo /tmp/fifo' \
            'echo x > /null-in-layer' 'echo x > /host/null' 'echo x > /dev/null'; do \
              if sh -c \"$c\" 2>/dev/null; then echo \"ok: $c\"; else echo \"refused: $c\"; fi; \
            done"),
    );
    spec.mounts.push(Mount {
        target: "/host".into(),
        source: MountSource::Bind(host_dir),
        readonly: false,
    });
    let cap = Capture::default();
    let code = s.run(&spec, cap.sink()).unwrap();
    assert_eq!(code, 0, "stderr: {}", cap.err());
    assert_eq!(
        cap.out(),
        "refused: mknod /tmp/blk b 8 0\n\
         refused: mknod /tmp/chr c 1 3\n\
         ok: mknod /dev/whiteout c 0 0\n\
         ok: mkfifo /tmp/fifo\n\
         refused: echo x > /null-in-layer\n\
         refused: echo x > /host/null\n\
         ok: echo x > /dev/null\n"
    );
}

#[test]
fn many_containers_leave_no_mount_on_the_host() {
    require_containers!();
    let s = Scratch::new();
    let base = s.busybox_layer("base");
    let before = cgroup_mount_lines();
    for i in 0..5 {
        let spec = ContainerSpec::new(s.rootfs(vec![base.clone()], &format!("r{i}")), sh("true"));
        assert_eq!(s.run(&spec, Capture::default().sink()).unwrap(), 0);
    }
    assert_eq!(cgroup_mount_lines(), before);
    assert!(mounts_below(s.path()).is_empty(), "{:?}", mounts_below(s.path()));
    // No mount namespace of kiln's outlives its containers: none of this
    // test's shims (all gone) nor a namespace held by an fd.
    let prefix = s.path().to_string_lossy().into_owned();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let mountinfo = std::fs::read_to_string(e.path().join("mountinfo")).unwrap_or_default();
        assert!(
            !mountinfo.contains(&prefix),
            "process {:?} still sees a mount of this test",
            e.file_name()
        );
    }
}
