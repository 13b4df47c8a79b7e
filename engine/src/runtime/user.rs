//! `user[:group]` to numeric ids, looked up in the container's own
//! `/etc/passwd` and `/etc/group` (read inside the rootfs, symlinks resolved
//! as the container would see them, never onto the host).

use std::io::Read;
use std::os::fd::BorrowedFd;
use std::path::Path;

use anyhow::{Context, bail};

use super::fsat::{Resolve, open_beneath};

/// Numeric identity of the container process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedUser {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Supplementary groups: the primary group, then `/etc/group` memberships.
    pub additional_gids: Vec<u32>,
    /// Home directory from `/etc/passwd` (`/` if unknown), for `HOME`.
    pub home: String,
}

/// Resolve `spec` (`name|uid[:group|gid]`, empty = root) against the rootfs
/// open at `root`.
pub fn resolve_user(root: BorrowedFd<'_>, spec: &str) -> anyhow::Result<ResolvedUser> {
    let spec = spec.trim();
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let user = if user.is_empty() { "0" } else { user };
    let passwd = read_in_root(root, "/etc/passwd")?;
    let groups = read_in_root(root, "/etc/group")?;
    // passwd: name:x:uid:gid:gecos:home:shell
    let entries: Vec<Vec<&str>> = passwd
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| l.split(':').collect::<Vec<_>>())
        .filter(|f| f.len() >= 4)
        .collect();
    let found = match user.parse::<u32>() {
        Ok(uid) => entries
            .iter()
            .find(|f| f[2].parse::<u32>().ok() == Some(uid)),
        Err(_) => entries.iter().find(|f| f[0] == user),
    };
    let (uid, mut gid, name, home) = match (found, user.parse::<u32>()) {
        (Some(f), _) => (
            f[2].parse::<u32>()
                .with_context(|| format!("/etc/passwd: bad uid for user {:?}", f[0]))?,
            f[3].parse::<u32>()
                .with_context(|| format!("/etc/passwd: bad gid for user {:?}", f[0]))?,
            Some(f[0].to_string()),
            f.get(5)
                .filter(|h| !h.is_empty())
                .unwrap_or(&"/")
                .to_string(),
        ),
        (None, Ok(uid)) => (uid, uid, None, "/".to_string()),
        (None, Err(_)) => bail!("user {user:?}: no such user in the image's /etc/passwd"),
    };
    // group: name:x:gid:member,member
    let group_entries: Vec<Vec<&str>> = groups
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| l.split(':').collect::<Vec<_>>())
        .filter(|f| f.len() >= 3)
        .collect();
    if let Some(g) = group {
        gid =
            match g.parse::<u32>() {
                Ok(gid) => gid,
                Err(_) => group_entries.iter().find(|f| f[0] == g).with_context(|| {
                    format!("group {g:?}: no such group in the image's /etc/group")
                })?[2]
                    .parse::<u32>()
                    .with_context(|| format!("/etc/group: bad gid for group {g:?}"))?,
            };
    }
    // The primary group is always a supplementary group too, as in docker,
    // containerd and BuildKit since the fix for CVE-2023-25173 (`id` shows
    // `groups=GID`).
    let mut additional_gids = vec![gid];
    // Like docker: an explicit group replaces the other supplementary groups.
    if group.is_none() {
        if let Some(name) = &name {
            for f in &group_entries {
                let members = f.get(3).copied().unwrap_or("");
                if members.split(',').any(|m| m.trim() == name) {
                    if let Ok(g) = f[2].parse::<u32>() {
                        if g != gid && !additional_gids.contains(&g) {
                            additional_gids.push(g);
                        }
                    }
                }
            }
        }
    }
    Ok(ResolvedUser {
        uid,
        gid,
        additional_gids,
        home,
    })
}

/// A file's text as the container would read it; "" if it does not exist.
fn read_in_root(root: BorrowedFd<'_>, path: &str) -> anyhow::Result<String> {
    match open_beneath(root, Path::new(path), libc::O_RDONLY, Resolve::InRoot) {
        Ok(fd) => {
            let mut s = String::new();
            std::fs::File::from(fd)
                .read_to_string(&mut s)
                .with_context(|| format!("reading {path} in the rootfs"))?;
            Ok(s)
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(String::new()),
        Err(e) => Err(e).with_context(|| format!("opening {path} in the rootfs")),
    }
}
