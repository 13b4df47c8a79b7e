//! The OCI runtime spec (`config.json`) for one container, docker-like:
//! namespaces, the standard mounts, docker's default capabilities, masked
//! and read-only paths, device rules, cgroup limits, and a seccomp profile
//! that refuses the syscalls docker's default profile refuses.

use std::path::Path;

use serde_json::{Value, json};

use super::user::ResolvedUser;
use super::{Limits, Mount, MountSource};

/// Docker's default capability set.
pub const DEFAULT_CAPABILITIES: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// Syscalls refused with EPERM: those docker's default profile leaves out
/// (kernel modules, kexec, reboot, mount and namespace games, keyrings,
/// tracing other processes, bpf, clock setting, swap, quotas, ...).
pub const BLOCKED_SYSCALLS: &[&str] = &[
    "acct",
    "add_key",
    "bpf",
    "clock_adjtime",
    "clock_settime",
    "create_module",
    "delete_module",
    "finit_module",
    "fsconfig",
    "fsmount",
    "fsopen",
    "fspick",
    "get_kernel_syms",
    "get_mempolicy",
    "init_module",
    "ioperm",
    "iopl",
    "kcmp",
    "kexec_file_load",
    "kexec_load",
    "keyctl",
    "lookup_dcookie",
    "mbind",
    "mount",
    "mount_setattr",
    "move_mount",
    "move_pages",
    "name_to_handle_at",
    "nfsservctl",
    "open_by_handle_at",
    "open_tree",
    "perf_event_open",
    "pivot_root",
    "process_vm_readv",
    "process_vm_writev",
    "ptrace",
    "query_module",
    "quotactl",
    "quotactl_fd",
    "reboot",
    "request_key",
    "set_mempolicy",
    "setns",
    "settimeofday",
    "swapoff",
    "swapon",
    "sysfs",
    "_sysctl",
    "umount2",
    "unshare",
    "uselib",
    "userfaultfd",
    "ustat",
];

/// Paths hidden from the container (as docker does).
const MASKED_PATHS: &[&str] = &[
    "/proc/asound",
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

/// Paths the container may read but not write (as docker does).
const READONLY_PATHS: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// Everything the spec needs that the caller decided.
pub struct SpecInput<'a> {
    /// cgroups path, e.g. `/kiln/<tag>-<id>`.
    pub cgroup: &'a str,
    /// The mounted rootfs.
    pub rootfs: &'a Path,
    /// argv.
    pub args: &'a [String],
    /// Environment, `K=V`.
    pub env: &'a [String],
    /// Working directory.
    pub cwd: &'a str,
    /// Resolved user.
    pub user: &'a ResolvedUser,
    /// Hostname.
    pub hostname: &'a str,
    /// Generated `/etc/hosts`.
    pub hosts_file: &'a Path,
    /// Generated `/etc/resolv.conf`.
    pub resolv_file: &'a Path,
    /// The user's mounts, with `Layers` already turned into host directories.
    pub mounts: &'a [(Mount, Option<std::path::PathBuf>)],
    /// Network namespace to join (`None` = share the host's).
    pub netns_path: Option<String>,
    /// Resource limits.
    pub limits: &'a Limits,
    /// Give the process a pseudo-terminal.
    pub terminal: bool,
}

/// Build the runtime spec as JSON.
pub fn build(input: &SpecInput<'_>) -> Value {
    let caps: Vec<&str> = DEFAULT_CAPABILITIES.to_vec();
    let mut mounts = vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
        json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]}),
        json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]}),
        json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]}),
        json!({"destination": "/etc/hosts", "type": "bind", "source": input.hosts_file, "options": ["rbind", "rprivate", "rw"]}),
        json!({"destination": "/etc/resolv.conf", "type": "bind", "source": input.resolv_file, "options": ["rbind", "rprivate", "rw"]}),
    ];
    for (m, host_dir) in input.mounts {
        let ro = if m.readonly { "ro" } else { "rw" };
        mounts.push(match (&m.source, host_dir) {
            (MountSource::Tmpfs { size }, _) => {
                let mut opts = vec!["nosuid".to_string(), "nodev".to_string(), "mode=1777".to_string(), ro.to_string()];
                if *size > 0 {
                    opts.push(format!("size={size}"));
                }
                json!({"destination": m.target, "type": "tmpfs", "source": "tmpfs", "options": opts})
            }
            (MountSource::Bind(src), None) => {
                // nodev: the host's device nodes stay closed to the container
                // (without limits it has no devices cgroup to refuse them).
                json!({"destination": m.target, "type": "bind", "source": src, "options": ["rbind", "rprivate", "nodev", ro]})
            }
            (_, Some(dir)) => {
                json!({"destination": m.target, "type": "bind", "source": dir, "options": ["rbind", "rprivate", ro]})
            }
            (MountSource::Layers(_), None) => unreachable!("layer mounts are prepared before the spec is built"),
        });
    }
    let mut namespaces = vec![
        json!({"type": "pid"}),
        json!({"type": "ipc"}),
        json!({"type": "uts"}),
        json!({"type": "mount"}),
    ];
    if let Some(path) = &input.netns_path {
        namespaces.push(json!({"type": "network", "path": path}));
    }
    // Device rules and limits need the container's own cgroup; a container
    // without limits has none (see `cgroupless`) and gets no resources.
    let mut resources = json!({"devices": [{"allow": false, "access": "rwm"}]});
    if let Some(mem) = input.limits.memory_bytes {
        resources["memory"] = json!({"limit": mem});
    }
    if let Some(cpus) = input.limits.cpus {
        let period: u64 = 100_000;
        resources["cpu"] =
            json!({"quota": (cpus * period as f64).round() as i64, "period": period});
    }
    let mut env = input.env.to_vec();
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.push("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    }
    if !env.iter().any(|e| e.starts_with("HOME=")) {
        env.push(format!("HOME={}", input.user.home));
    }
    if !env.iter().any(|e| e.starts_with("HOSTNAME=")) {
        env.push(format!("HOSTNAME={}", input.hostname));
    }
    // docker gives 1048576 open files; never more than kiln itself may have.
    let nofile = {
        // SAFETY: zeroed rlimit is a valid out-buffer for getrlimit.
        let mut lim: libc::rlimit = unsafe { std::mem::zeroed() };
        // SAFETY: valid resource and out pointer.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
            lim.rlim_max.min(1_048_576)
        } else {
            1024
        }
    };
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": input.terminal,
            "user": {"uid": input.user.uid, "gid": input.user.gid, "additionalGids": input.user.additional_gids},
            "args": input.args,
            "env": env,
            "cwd": input.cwd,
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": nofile, "soft": nofile}]
            // "noNewPrivileges" is left out (docker's default, false): with
            // the field present, even as false, libcontainer 0.7 loads the
            // seccomp filter after dropping CAP_SYS_ADMIN, which fails.
        },
        "root": {"path": input.rootfs, "readonly": false},
        "hostname": input.hostname,
        "mounts": mounts,
        "linux": {
            "namespaces": namespaces,
            // Mount events never cross between host and container (libcontainer
            // applies it recursively); kiln
            // detaches its host copies of the rootfs while the container runs.
            "rootfsPropagation": "private",
            "cgroupsPath": input.cgroup,
            "resources": if input.limits.is_empty() { Value::Null } else { resources },
            "maskedPaths": MASKED_PATHS,
            "readonlyPaths": READONLY_PATHS,
            "seccomp": seccomp(input.limits.is_empty())
        }
    })
}

/// The seccomp profile: [`BLOCKED_SYSCALLS`] fail with EPERM. Without a
/// devices cgroup (`cgroupless`: a container without limits), which is what
/// keeps a docker container from opening the host's devices, making block
/// and character devices fails too (`mknod`/`mknodat`; char 0:0, an overlay
/// whiteout, stays allowed); the only other way to a device node, one in
/// the rootfs or a bind mount, is closed by `nodev` on those mounts.
fn seccomp(no_devices_cgroup: bool) -> Value {
    let eperm = |names: &[&str], args: Value| {
        json!({"names": names, "action": "SCMP_ACT_ERRNO", "errnoRet": libc::EPERM, "args": args})
    };
    let mut rules = vec![json!({"names": BLOCKED_SYSCALLS, "action": "SCMP_ACT_ERRNO", "errnoRet": libc::EPERM})];
    if no_devices_cgroup {
        // (syscall, index of its mode argument); the device number follows it.
        for (name, mode) in [("mknod", 1), ("mknodat", 2)] {
            // libcontainer 0.7 compares `(arg & valueTwo) == value`.
            let kind = |k: libc::mode_t| {
                json!({"index": mode, "op": "SCMP_CMP_MASKED_EQ", "value": k, "valueTwo": libc::S_IFMT})
            };
            rules.push(eperm(&[name], json!([kind(libc::S_IFBLK)])));
            rules.push(eperm(
                &[name],
                json!([kind(libc::S_IFCHR), {"index": mode + 1, "op": "SCMP_CMP_NE", "value": 0}]),
            ));
        }
    }
    json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": seccomp_architectures(),
        "syscalls": rules,
    })
}

/// The architectures the filter covers: the native one plus its compat
/// ABIs, so 32-bit syscalls cannot bypass the profile.
fn seccomp_architectures() -> Vec<&'static str> {
    if cfg!(target_arch = "x86_64") {
        vec!["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]
    } else if cfg!(target_arch = "aarch64") {
        vec!["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"]
    } else {
        vec!["SCMP_ARCH_NATIVE"]
    }
}
