//! Writing files from disk as tar entries, the way containerd/BuildKit's
//! differ writes them (Go `archive/tar`, PAX format): USTAR headers, a PAX
//! extended header only when a field does not fit (long path or link
//! name) or for xattrs (`SCHILY.xattr.<name>`), directory names ending in
//! `/`, mode = permission and setuid/setgid/sticky bits, mtime truncated
//! to the second, no atime/ctime, no user or group names, and a second
//! path to an inode already written in this tar becomes a hardlink.

use std::collections::HashMap;
use std::ffi::{CString, OsStr};
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use tar::{EntryType, Header};

/// Writes filesystem entries into a tar stream.
pub struct TarFsWriter<W: Write> {
    builder: tar::Builder<W>,
    /// `(dev, ino)` of multiply-linked files already written → their name.
    links: HashMap<(u64, u64), String>,
    /// mtimes later than this are written as this (`SOURCE_DATE_EPOCH`).
    clamp_mtime: Option<i64>,
}

/// xattrs of `path` (not followed), except overlayfs' own, sorted by name.
pub fn read_xattrs(path: &Path) -> io::Result<Vec<(String, Vec<u8>)>> {
    let c = CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: `c` is a valid NUL-terminated string; a null buffer asks for the size.
    let len = unsafe { libc::llistxattr(c.as_ptr(), std::ptr::null_mut(), 0) };
    if len < 0 {
        let e = io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::ENOTSUP) { Ok(Vec::new()) } else { Err(e) };
    }
    let mut names = vec![0u8; len as usize];
    // SAFETY: the buffer is `names.len()` bytes long.
    let len = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    if len < 0 {
        return Err(io::Error::last_os_error());
    }
    names.truncate(len as usize);
    let mut out = Vec::new();
    for name in names.split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let name_str = String::from_utf8_lossy(name).into_owned();
        if is_overlay_xattr(&name_str) {
            continue;
        }
        let cname = CString::new(name)?;
        // SAFETY: valid C strings; null buffer asks for the size.
        let vlen = unsafe { libc::lgetxattr(c.as_ptr(), cname.as_ptr(), std::ptr::null_mut(), 0) };
        if vlen < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut value = vec![0u8; vlen as usize];
        // SAFETY: the buffer is `value.len()` bytes long.
        let vlen = unsafe { libc::lgetxattr(c.as_ptr(), cname.as_ptr(), value.as_mut_ptr().cast(), value.len()) };
        if vlen < 0 {
            return Err(io::Error::last_os_error());
        }
        value.truncate(vlen as usize);
        out.push((name_str, value));
    }
    out.sort();
    Ok(out)
}

/// overlayfs bookkeeping (`trusted.overlay.*`, `user.overlay.*`) never
/// belongs in a layer.
pub fn is_overlay_xattr(name: &str) -> bool {
    name.starts_with("trusted.overlay.") || name.starts_with("user.overlay.")
}

/// Whether `meta` is an overlay whiteout: a 0/0 character device.
pub fn is_whiteout(meta: &std::fs::Metadata) -> bool {
    meta.file_type().is_char_device() && meta.rdev() == 0
}

/// Whether directory `path` is marked opaque by overlayfs.
pub fn is_opaque_dir(path: &Path) -> io::Result<bool> {
    let c = CString::new(path.as_os_str().as_bytes())?;
    let mut buf = [0u8; 4];
    for name in [c"trusted.overlay.opaque", c"user.overlay.opaque"] {
        // SAFETY: valid C strings and a 4-byte buffer.
        let n = unsafe { libc::lgetxattr(c.as_ptr(), name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if n == 1 && buf[0] == b'y' {
            return Ok(true);
        }
    }
    Ok(false)
}

/// One PAX record: `"<len> <key>=<value>\n"`, `len` counting itself.
fn pax_record(out: &mut Vec<u8>, key: &str, value: &[u8]) {
    let rest = key.len() + value.len() + 3; // ' ', '=', '\n'
    let mut len = rest + 1;
    while len != rest + len.to_string().len() {
        len = rest + len.to_string().len();
    }
    out.extend_from_slice(format!("{len} {key}=").as_bytes());
    out.extend_from_slice(value);
    out.push(b'\n');
}

impl<W: Write> TarFsWriter<W> {
    /// Write into `out`; mtimes after `clamp_mtime` are clamped to it.
    pub fn new(out: W, clamp_mtime: Option<i64>) -> Self {
        let mut builder = tar::Builder::new(out);
        builder.mode(tar::HeaderMode::Complete);
        TarFsWriter { builder, links: HashMap::new(), clamp_mtime }
    }

    fn mtime(&self, secs: i64) -> u64 {
        let t = match self.clamp_mtime {
            Some(epoch) if secs > epoch => epoch,
            _ => secs,
        };
        t.max(0) as u64
    }

    /// Append the file at `src` (not followed) as `name` (relative, `/`
    /// separated, no trailing slash). Sockets are skipped, as containerd
    /// does. Returns whether an entry was written.
    pub fn append_path(&mut self, name: &str, src: &Path) -> io::Result<bool> {
        let meta = std::fs::symlink_metadata(src)?;
        let ft = meta.file_type();
        let mut header = Header::new_ustar();
        let mut pax = Vec::new();
        let mut name = name.to_string();
        let mut link_target: Option<Vec<u8>> = None;
        let mut body: Option<std::fs::File> = None;
        let mut size = 0;
        if meta.nlink() > 1 && !ft.is_dir() {
            if let Some(first) = self.links.get(&(meta.dev(), meta.ino())) {
                header.set_entry_type(EntryType::Link);
                link_target = Some(first.clone().into_bytes());
            } else {
                self.links.insert((meta.dev(), meta.ino()), name.clone());
            }
        }
        if link_target.is_none() {
            if ft.is_dir() {
                header.set_entry_type(EntryType::Directory);
                name.push('/');
            } else if ft.is_file() {
                header.set_entry_type(EntryType::Regular);
                size = meta.len();
                body = Some(std::fs::File::open(src)?);
            } else if ft.is_symlink() {
                header.set_entry_type(EntryType::Symlink);
                link_target = Some(std::fs::read_link(src)?.as_os_str().as_bytes().to_vec());
            } else if ft.is_char_device() || ft.is_block_device() {
                header.set_entry_type(if ft.is_char_device() { EntryType::Char } else { EntryType::Block });
                let rdev = meta.rdev();
                header.set_device_major(libc::major(rdev))?;
                header.set_device_minor(libc::minor(rdev))?;
            } else if ft.is_fifo() {
                header.set_entry_type(EntryType::Fifo);
            } else {
                return Ok(false);
            }
        }
        header.set_mode(meta.mode() & 0o7777);
        header.set_uid(meta.uid() as u64);
        header.set_gid(meta.gid() as u64);
        header.set_mtime(self.mtime(meta.mtime()));
        header.set_size(size);
        // Numbers too large for USTAR's octal fields go in PAX, as Go does.
        const MAX_OCTAL_7: u64 = 0o7777777;
        const MAX_OCTAL_11: u64 = 0o77777777777;
        if size > MAX_OCTAL_11 {
            pax_record(&mut pax, "size", size.to_string().as_bytes());
        }
        for (key, id) in [("uid", meta.uid()), ("gid", meta.gid())] {
            if u64::from(id) > MAX_OCTAL_7 {
                pax_record(&mut pax, key, id.to_string().as_bytes());
            }
        }
        if !set_ustar_path(&mut header, &name) {
            pax_record(&mut pax, "path", name.as_bytes());
            set_ustar_path(&mut header, truncate_name(&name));
        }
        if let Some(target) = &link_target {
            let ustar = header.as_ustar_mut().expect("ustar header");
            if target.len() <= ustar.linkname.len() && target.is_ascii() {
                ustar.linkname[..target.len()].copy_from_slice(target);
            } else {
                pax_record(&mut pax, "linkpath", target);
            }
        }
        if header.entry_type() != EntryType::Link {
            for (key, value) in read_xattrs(src)? {
                pax_record(&mut pax, &format!("SCHILY.xattr.{key}"), &value);
            }
        }
        if !pax.is_empty() {
            self.append_pax(&name, &pax)?;
        }
        header.set_cksum();
        match body {
            Some(file) => {
                // A file that changes size under us would corrupt the tar:
                // take exactly the size in the header.
                let mut limited = io::Read::take(file, size);
                self.builder.append(&header, &mut limited)?;
            }
            None => self.builder.append(&header, io::empty())?,
        }
        Ok(true)
    }

    /// Append an empty regular file `name` with mode 0 owned by 0:0 (a
    /// whiteout or opaque marker).
    pub fn append_marker(&mut self, name: &str, mtime: i64) -> io::Result<()> {
        let mut header = Header::new_ustar();
        header.set_entry_type(EntryType::Regular);
        header.set_mode(0);
        header.set_uid(0);
        header.set_gid(0);
        header.set_size(0);
        header.set_mtime(self.mtime(mtime));
        if !set_ustar_path(&mut header, name) {
            let mut pax = Vec::new();
            pax_record(&mut pax, "path", name.as_bytes());
            self.append_pax(name, &pax)?;
            set_ustar_path(&mut header, truncate_name(name));
        }
        header.set_cksum();
        self.builder.append(&header, io::empty())
    }

    fn append_pax(&mut self, name: &str, records: &[u8]) -> io::Result<()> {
        let mut h = Header::new_ustar();
        h.set_entry_type(EntryType::XHeader);
        // Go names it "<dir>/PaxHeaders.0/<base>", cut to 100 bytes.
        let trimmed = name.trim_end_matches('/');
        let (dir, base) = trimmed.rsplit_once('/').unwrap_or(("", trimmed));
        let pax_name = if dir.is_empty() { format!("PaxHeaders.0/{base}") } else { format!("{dir}/PaxHeaders.0/{base}") };
        set_ustar_path(&mut h, truncate_name(&pax_name));
        h.set_mode(0o644);
        h.set_size(records.len() as u64);
        h.set_mtime(0);
        h.set_cksum();
        self.builder.append(&h, records)
    }

    /// Write the end-of-archive blocks and return the stream.
    pub fn finish(self) -> io::Result<W> {
        self.builder.into_inner()
    }
}

/// Put `name` in the USTAR name (and prefix) fields as Go's
/// `splitUSTARPath` does; false if it does not fit (then it goes in PAX).
fn set_ustar_path(header: &mut Header, name: &str) -> bool {
    let ustar = header.as_ustar_mut().expect("ustar header");
    let bytes = name.as_bytes();
    ustar.name = [0; 100];
    ustar.prefix = [0; 155];
    if !name.is_ascii() {
        return false;
    }
    if bytes.len() <= 100 {
        ustar.name[..bytes.len()].copy_from_slice(bytes);
        return true;
    }
    let mut length = bytes.len();
    if length > 156 {
        length = 156;
    } else if bytes[length - 1] == b'/' {
        length -= 1;
    }
    let Some(i) = name[..length].rfind('/') else { return false };
    let suffix = &bytes[i + 1..];
    if i == 0 || suffix.is_empty() || suffix.len() > 100 || i > 155 {
        return false;
    }
    ustar.prefix[..i].copy_from_slice(&bytes[..i]);
    ustar.name[..suffix.len()].copy_from_slice(suffix);
    true
}

/// A name that fits a USTAR name field, for entries whose real name is in
/// a PAX record.
fn truncate_name(name: &str) -> &str {
    let mut end = name.len().min(100);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    &name[..end]
}

/// `name` as a tar path component string (lossless for UTF-8 names).
pub fn os_name(name: &OsStr) -> io::Result<&str> {
    name.to_str()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("file name {name:?} is not UTF-8")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_record_length_counts_itself() {
        for n in 0..200 {
            let mut out = Vec::new();
            pax_record(&mut out, "path", "x".repeat(n).as_bytes());
            let text = String::from_utf8(out.clone()).unwrap();
            let (len, _) = text.split_once(' ').unwrap();
            assert_eq!(len.parse::<usize>().unwrap(), out.len(), "{text:?}");
        }
    }

    #[test]
    fn ustar_path_splits_like_go() {
        let mut h = Header::new_ustar();
        assert!(set_ustar_path(&mut h, "dir/"));
        assert_eq!(&h.as_ustar().unwrap().name[..4], b"dir/");
        let long = format!("{}/{}", "p".repeat(120), "n".repeat(50));
        assert!(set_ustar_path(&mut h, &long));
        assert_eq!(h.path_bytes().as_ref(), long.as_bytes());
        assert!(!set_ustar_path(&mut h, &"x".repeat(101)), "no separator to split at");
        assert!(!set_ustar_path(&mut h, "caf\u{e9}"), "non-ASCII goes to PAX");
    }
}
