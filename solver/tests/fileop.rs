//! COPY/ADD/mkdir/rm/symlink semantics, applied natively to layer dirs.

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kiln_cache::layered::LayeredView;
use kiln_frontend::graph::{CopyAction, FileAction, Owner};
use kiln_solver::fileop::apply;
use kiln_solver::tree::{LocalContext, SourceTree};

struct Fixture {
    _tmp: tempfile::TempDir,
    base: PathBuf,
    upper: PathBuf,
    ctx: PathBuf,
    root: PathBuf,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let (base, upper, ctx) = (tmp.path().join("base"), tmp.path().join("upper"), tmp.path().join("ctx"));
    for d in [&base, &upper, &ctx] {
        std::fs::create_dir_all(d).unwrap();
    }
    // A base image with users, an existing dir and an escaping symlink.
    std::fs::create_dir_all(base.join("etc")).unwrap();
    std::fs::write(base.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1001::/home/app:/bin/sh\n").unwrap();
    std::fs::write(base.join("etc/group"), "root:x:0:\nstaff:x:50:\napp:x:1001:\n").unwrap();
    std::fs::create_dir_all(base.join("usr/local")).unwrap();
    std::fs::set_permissions(base.join("usr/local"), std::fs::Permissions::from_mode(0o775)).unwrap();
    std::fs::write(base.join("usr/local/keep"), "keep").unwrap();
    std::os::unix::fs::symlink("../../../../../tmp", base.join("escape")).unwrap();
    std::os::unix::fs::symlink("/usr/local", base.join("loc")).unwrap();
    // A context.
    std::fs::write(ctx.join("a.txt"), "A").unwrap();
    std::fs::write(ctx.join("b.txt"), "B").unwrap();
    std::fs::write(ctx.join("run.sh"), "#!/bin/sh").unwrap();
    std::fs::set_permissions(ctx.join("run.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::create_dir_all(ctx.join("src/sub")).unwrap();
    std::fs::write(ctx.join("src/main.c"), "main").unwrap();
    std::fs::write(ctx.join("src/sub/x.h"), "x").unwrap();
    std::fs::write(ctx.join("src/notes.md"), "md").unwrap();
    std::os::unix::fs::symlink("main.c", ctx.join("src/link")).unwrap();
    let root = tmp.path().join("store-root");
    Fixture { _tmp: tmp, base, upper, ctx, root }
}

impl Fixture {
    fn tree(&self, exclude: &[&str]) -> SourceTree {
        let ex: Vec<String> = exclude.iter().map(|s| s.to_string()).collect();
        SourceTree::Context(Arc::new(LocalContext::open("context", &self.ctx, &ex, self.root.join("sums.json")).unwrap()))
    }
    fn copy(&self, action: CopyAction) -> anyhow::Result<()> {
        let base = SourceTree::Layers(LayeredView::new(vec![self.base.clone()]));
        apply(&[self.base.clone()], &self.upper, &[base, self.tree(&[])], &[FileAction::Copy(action)])
    }
    fn actions(&self, actions: Vec<FileAction>) -> anyhow::Result<()> {
        let base = SourceTree::Layers(LayeredView::new(vec![self.base.clone()]));
        apply(&[self.base.clone()], &self.upper, &[base, self.tree(&[])], &actions)
    }
    /// Every path in the upper (the new layer), sorted, dirs with `/`.
    fn layer(&self) -> Vec<String> {
        let mut out = Vec::new();
        walk(&self.upper, &self.upper, &mut out);
        out.sort();
        out
    }
    fn read(&self, p: &str) -> String {
        std::fs::read_to_string(self.upper.join(p)).unwrap()
    }
    fn meta(&self, p: &str) -> std::fs::Metadata {
        std::fs::symlink_metadata(self.upper.join(p)).unwrap()
    }
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
        if p.symlink_metadata().unwrap().is_dir() {
            out.push(format!("{rel}/"));
            walk(root, &p, out);
        } else {
            out.push(rel);
        }
    }
}

fn cp(sources: &[&str], dest: &str) -> CopyAction {
    CopyAction::new(1, sources.iter().map(|s| s.to_string()).collect(), dest)
}

/// (sources, dest, exact content of the new layer)
#[test]
fn copy_destination_rules() {
    let table: &[(&[&str], &str, &[&str])] = &[
        (&["a.txt"], "/dst/", &["dst/", "dst/a.txt"]),
        (&["a.txt"], "/dst", &["dst"]),
        (&["a.txt"], "/usr/local", &["usr/", "usr/local/", "usr/local/a.txt"]),
        (&["a.txt", "b.txt"], "/d/", &["d/", "d/a.txt", "d/b.txt"]),
        (&["*.txt"], "/g/", &["g/", "g/a.txt", "g/b.txt"]),
        (&["src"], "/app", &["app/", "app/link", "app/main.c", "app/notes.md", "app/sub/", "app/sub/x.h"]),
        (&["src/sub/"], "/", &["x.h"]),
        (&["src/*.c"], "/c/", &["c/", "c/main.c"]),
        (&["src/link"], "/l", &["l"]),
        (&["a.txt"], "/loc/", &["usr/", "usr/local/", "usr/local/a.txt"]),
        (&["a.txt"], "/escape/x", &["tmp/", "tmp/x"]),
    ];
    for (sources, dest, want) in table {
        let f = fixture();
        f.copy(cp(sources, dest)).unwrap_or_else(|e| panic!("COPY {sources:?} {dest}: {e:#}"));
        assert_eq!(f.layer(), *want, "COPY {sources:?} {dest}");
    }
}

#[test]
fn copied_files_keep_content_and_mode_and_belong_to_root() {
    let f = fixture();
    f.copy(cp(&["run.sh", "src/link"], "/bin/")).unwrap();
    assert_eq!(f.read("bin/run.sh"), "#!/bin/sh");
    assert_eq!(f.meta("bin/run.sh").mode() & 0o7777, 0o755);
    assert_eq!((f.meta("bin/run.sh").uid(), f.meta("bin/run.sh").gid()), (0, 0));
    // A symlink named directly is followed; one inside a directory is kept.
    assert!(f.meta("bin/link").is_file());
    let g = fixture();
    g.copy(cp(&["src"], "/s/")).unwrap();
    assert!(g.meta("s/link").file_type().is_symlink());
    assert_eq!(std::fs::read_link(g.upper.join("s/link")).unwrap(), PathBuf::from("main.c"));
    // Parent dirs are copied up with the lower's metadata.
    let h = fixture();
    h.copy(cp(&["a.txt"], "/usr/local/")).unwrap();
    assert_eq!(h.meta("usr/local").mode() & 0o7777, 0o775);
    assert!(!h.upper.join("usr/local/keep").exists(), "layer holds only what was written");
}

#[test]
fn chown_resolves_names_in_the_base_and_chmod_overrides() {
    let f = fixture();
    let mut a = cp(&["src"], "/home/app/src/");
    a.owner = Some(Owner { user: "app".into(), group: None });
    a.mode = Some(0o640);
    f.copy(a).unwrap();
    let m = f.meta("home/app/src/main.c");
    assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (1000, 1001, 0o640));
    assert_eq!(f.meta("home/app/src/sub").uid(), 1000);
    let m = f.meta("home");
    assert_eq!((m.uid(), m.gid()), (1000, 1001), "created dest parents belong to the --chown user");

    let g = fixture();
    let mut a = cp(&["a.txt"], "/x");
    a.owner = Some(Owner { user: "7".into(), group: Some("staff".into()) });
    g.copy(a).unwrap();
    assert_eq!((g.meta("x").uid(), g.meta("x").gid()), (7, 50));

    let h = fixture();
    let mut a = cp(&["a.txt"], "/x");
    a.owner = Some(Owner { user: "nobody".into(), group: None });
    let err = h.copy(a).unwrap_err().to_string();
    assert!(err.contains("unable to find user nobody"), "{err}");
}

#[test]
fn parents_exclude_and_missing_sources() {
    let f = fixture();
    let mut a = cp(&["src/sub/x.h", "src/main.c"], "/out/");
    a.parents = true;
    f.copy(a).unwrap();
    assert_eq!(f.layer(), ["out/", "out/src/", "out/src/main.c", "out/src/sub/", "out/src/sub/x.h"]);

    let f = fixture();
    let mut a = cp(&["./src/./sub/x.h"], "/out/");
    a.parents = true;
    f.copy(a).unwrap();
    assert_eq!(f.layer(), ["out/", "out/sub/", "out/sub/x.h"]);

    let f = fixture();
    let mut a = cp(&["src"], "/o/");
    a.exclude = vec!["*.md".into(), "sub".into()];
    f.copy(a).unwrap();
    assert_eq!(f.layer(), ["o/", "o/link", "o/main.c"]);

    let f = fixture();
    let err = f.copy(cp(&["nope.txt"], "/")).unwrap_err().to_string();
    assert!(err.contains("\"nope.txt\" not found"), "{err}");
    let mut a = cp(&["*.none"], "/");
    assert!(f.copy(a.clone()).is_err());
    a.allow_empty_wildcard = true;
    f.copy(a).unwrap();
}

#[test]
fn dockerignored_files_are_invisible() {
    let f = fixture();
    let base = SourceTree::Layers(LayeredView::new(vec![f.base.clone()]));
    let ctx = f.tree(&["src/sub", "*.txt", "!b.txt"]);
    apply(&[f.base.clone()], &f.upper, &[base, ctx], &[FileAction::Copy(cp(&["."], "/c/"))]).unwrap();
    assert_eq!(f.layer(), ["c/", "c/b.txt", "c/run.sh", "c/src/", "c/src/link", "c/src/main.c", "c/src/notes.md"]);
    let base = SourceTree::Layers(LayeredView::new(vec![f.base.clone()]));
    let err = apply(&[f.base.clone()], &f.upper, &[base, f.tree(&["a.txt"])], &[FileAction::Copy(cp(&["a.txt"], "/"))]);
    assert!(err.unwrap_err().to_string().contains(".dockerignore"));
}

fn tar_bytes() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(5);
    h.set_mode(0o600);
    h.set_uid(33);
    h.set_gid(33);
    b.append_data(&mut h, "pkg/data.txt", &b"hello"[..]).unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_size(0);
    b.append_link(&mut h, "pkg/link", "data.txt").unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_size(3);
    h.set_mode(0o644);
    // An entry trying to climb out lands inside the destination.
    b.append_data(&mut h, "../../evil", &b"bad"[..]).unwrap_or_else(|_| {
        let mut h = tar::Header::new_gnu();
        h.set_size(3);
        b.append_data(&mut h, "evil", &b"bad"[..]).unwrap()
    });
    b.into_inner().unwrap()
}

#[test]
fn add_extracts_local_archives() {
    use std::io::Write;
    let plain = tar_bytes();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&plain).unwrap();
    let gz = gz.finish().unwrap();
    let zst = zstd::encode_all(&plain[..], 1).unwrap();
    for (name, bytes) in [("a.tar", plain.clone()), ("a.tar.gz", gz), ("a.tar.zst", zst)] {
        let f = fixture();
        std::fs::write(f.ctx.join(name), &bytes).unwrap();
        let mut a = cp(&[name], "/opt/");
        a.extract_archives = true;
        f.copy(a).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        assert_eq!(f.read("opt/pkg/data.txt"), "hello", "{name}");
        let m = f.meta("opt/pkg/data.txt");
        assert_eq!((m.uid(), m.mode() & 0o7777), (33, 0o600), "{name}: tar owner and mode kept");
        assert!(f.meta("opt/pkg/link").file_type().is_symlink());
        assert!(f.layer().iter().all(|p| p.starts_with("opt/")), "{name}: {:?}", f.layer());
    }
    // Not an archive: copied as a file.
    let f = fixture();
    let mut a = cp(&["a.txt"], "/opt/");
    a.extract_archives = true;
    f.copy(a).unwrap();
    assert_eq!(f.read("opt/a.txt"), "A");
}

#[test]
fn mkdir_mkfile_symlink_and_rm_whiteouts() {
    let f = fixture();
    f.actions(vec![
        FileAction::Mkdir { path: "/app/data".into(), mode: 0o750, make_parents: true, owner: Some(Owner { user: "app".into(), group: None }) },
        FileAction::Mkfile { path: "/app/data/f".into(), data: b"x".to_vec(), mode: 0o600, owner: None },
        FileAction::Symlink { target: "/app/data/f".into(), path: "/app/l".into() },
        FileAction::Rm { path: "/usr/local/keep".into(), allow_not_found: false },
        FileAction::Mkfile { path: "/tmpfile".into(), data: b"t".to_vec(), mode: 0o644, owner: None },
        FileAction::Rm { path: "/tmpfile".into(), allow_not_found: false },
        FileAction::Rm { path: "/nothing".into(), allow_not_found: true },
    ])
    .unwrap();
    assert_eq!(f.layer(), ["app/", "app/data/", "app/data/f", "app/l", "usr/", "usr/local/", "usr/local/keep"]);
    let m = f.meta("app/data");
    assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (1000, 1001, 0o750));
    let wh = f.meta("usr/local/keep");
    assert!(wh.file_type().is_char_device() && wh.rdev() == 0, "rm of a lower file writes a 0/0 whiteout");
    let merged = LayeredView::new(vec![f.base.clone(), f.upper.clone()]);
    assert!(merged.lookup(Path::new("usr/local/keep")).unwrap().is_none());
    let err = f.actions(vec![FileAction::Rm { path: "/nothing".into(), allow_not_found: false }]).unwrap_err();
    assert!(err.to_string().contains("no such file"), "{err}");
    // Mkdir on an existing dir is a no-op, mkdir without parents needs one.
    let g = fixture();
    g.actions(vec![FileAction::Mkdir { path: "/usr/local".into(), mode: 0o700, make_parents: false, owner: None }]).unwrap();
    assert!(g.layer().is_empty());
    assert!(g.actions(vec![FileAction::Mkdir { path: "/a/b".into(), mode: 0o755, make_parents: false, owner: None }]).is_err());
}

#[test]
fn context_checksums_are_cached_and_ignore_times() {
    use kiln_solver::cachekey::copy_checksum;
    let f = fixture();
    let sums = f.root.join("sums.json");
    let open = || Arc::new(LocalContext::open("context", &f.ctx, &[], sums.clone()).unwrap());
    let ctx = open();
    let action = cp(&["src", "*.txt"], "/");
    let first = copy_checksum(&SourceTree::Context(ctx.clone()), &action).unwrap();
    assert_eq!(ctx.files_hashed(), 5, "src/main.c, src/notes.md, src/sub/x.h, a.txt, b.txt");
    ctx.save_checksums().unwrap();
    // A new process: nothing re-read.
    let ctx = open();
    assert_eq!(copy_checksum(&SourceTree::Context(ctx.clone()), &action).unwrap(), first);
    assert_eq!(ctx.files_hashed(), 0);
    // Touch: re-read once, same checksum.
    std::thread::sleep(std::time::Duration::from_millis(10));
    std::fs::write(f.ctx.join("a.txt"), "A").unwrap();
    let ctx = open();
    assert_eq!(copy_checksum(&SourceTree::Context(ctx.clone()), &action).unwrap(), first);
    assert_eq!(ctx.files_hashed(), 1);
    // Files the copy does not read do not matter; the ones it reads do.
    std::fs::write(f.ctx.join("run.sh"), "changed").unwrap();
    assert_eq!(copy_checksum(&SourceTree::Context(open()), &action).unwrap(), first);
    std::fs::write(f.ctx.join("src/sub/x.h"), "changed").unwrap();
    assert_ne!(copy_checksum(&SourceTree::Context(open()), &action).unwrap(), first);
}
