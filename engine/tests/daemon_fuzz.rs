//! Property tests (fuzzing) of the daemon's request parsing: query strings,
//! JSON bodies, versioned paths, and build-context tars. Nothing may panic,
//! every rejection is a 400, and no tar entry may land outside the context.
//!
//! Case counts are modest here; run longer with `KILN_FUZZ_CASES=20000`.
//! Inputs that once failed are kept below as regression tests.

use std::path::Path;

use kiln_engine::daemon::api::{MissingRequest, PullRequest, TagRequest};
use kiln_engine::daemon::containers::RunRequest;
use kiln_engine::daemon::context::{self, ContextEntry};
use kiln_engine::daemon::docker::{strip_version, unix_seconds};
use kiln_engine::daemon::web::{Query, parse_json};
use proptest::prelude::*;

fn cases() -> u32 {
    std::env::var("KILN_FUZZ_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(128)
}

/// A tar with one entry whose raw name bytes (and link name) we choose,
/// bypassing the tar crate's own path checks.
fn raw_tar(entries: &[(Vec<u8>, u8, Vec<u8>, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, kind, link, data) in entries {
        let mut header = tar::Header::new_old();
        {
            let old = header.as_old_mut();
            let n = name.len().min(99);
            old.name[..n].copy_from_slice(&name[..n]);
            let l = link.len().min(99);
            old.linkname[..l].copy_from_slice(&link[..l]);
        }
        header.set_mode(0o644);
        header.set_size(if *kind == b'0' { data.len() as u64 } else { 0 });
        header.set_entry_type(tar::EntryType::new(*kind));
        header.set_cksum();
        out.extend_from_slice(header.as_bytes());
        if *kind == b'0' {
            out.extend_from_slice(data);
            out.resize(out.len().div_ceil(512) * 512, 0);
        }
    }
    out.extend_from_slice(&[0u8; 1024]);
    out
}

/// Every file under `dir`, for "nothing landed outside" checks.
fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    fn walk(dir: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            out.push(p.display().to_string());
            if p.is_dir() && !p.is_symlink() {
                walk(&p, out);
            }
        }
    }
    walk(dir, &mut out);
    out
}

fn path_strategy() -> impl Strategy<Value = Vec<u8>> {
    let part = prop_oneof![
        Just("..".to_string()),
        Just(".".to_string()),
        Just("".to_string()),
        Just("link".to_string()),
        "[a-z]{1,6}",
    ];
    (any::<bool>(), prop::collection::vec(part, 1..5)).prop_map(|(abs, parts)| {
        let joined = parts.join("/");
        (if abs { format!("/{joined}") } else { joined }).into_bytes()
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn query_strings_never_panic(s in ".{0,200}") {
        let _ = Query::parse(Some(&s));
    }

    #[test]
    fn query_values_round_trip(k in "[a-z]{1,8}", v in ".{0,40}") {
        let encoded: String = v.bytes().map(|b| format!("%{b:02X}")).collect();
        let q = Query::parse(Some(&format!("{k}={encoded}"))).unwrap();
        prop_assert_eq!(q.get(&k), Some(v.as_str()));
    }

    #[test]
    fn json_bodies_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        for r in [
            parse_json::<RunRequest>(&bytes).err(),
            parse_json::<PullRequest>(&bytes).err(),
            parse_json::<TagRequest>(&bytes).err(),
            parse_json::<MissingRequest>(&bytes).err(),
            parse_json::<Vec<ContextEntry>>(&bytes).err(),
        ].into_iter().flatten() {
            prop_assert_eq!(r.status.as_u16(), 400);
        }
    }

    #[test]
    fn mutated_json_never_panics(cut in 0usize..120, flip in 0usize..120, byte in any::<u8>()) {
        let valid = br#"{"image":"busybox","cmd":["sh","-c","echo hi"],"env":["A=b"],"memory_bytes":1048576,"cpus":0.5}"#;
        let mut bytes = valid.to_vec();
        if flip < bytes.len() { bytes[flip] = byte; }
        bytes.truncate(cut.max(1));
        if let Err(e) = parse_json::<RunRequest>(&bytes) {
            prop_assert_eq!(e.status.as_u16(), 400);
            prop_assert!(e.message.contains("line"), "{}", e.message);
        }
    }

    #[test]
    fn versions_and_times_never_panic(s in ".{0,40}") {
        let (_, rest) = strip_version(&s);
        prop_assert!(s.ends_with(rest) || rest == "/");
        let _ = unix_seconds(&s);
    }

    #[test]
    fn safe_paths_stay_inside(p in path_strategy()) {
        let s = String::from_utf8(p).unwrap();
        if let Ok(rel) = context::safe_relative(&s) {
            prop_assert!(rel.is_relative());
            prop_assert!(rel.components().all(|c| matches!(c, std::path::Component::Normal(_))));
        }
    }

    #[test]
    fn context_tars_never_escape(
        entries in prop::collection::vec(
            (path_strategy(), prop_oneof![Just(b'0'), Just(b'5'), Just(b'2'), Just(b'1')], path_strategy(), prop::collection::vec(any::<u8>(), 0..64)),
            1..6,
        )
    ) {
        let top = tempfile::tempdir().unwrap();
        let dest = top.path().join("ctx");
        let outside = top.path().join("outside");
        std::fs::create_dir_all(&dest).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        let tar = raw_tar(&entries);
        match context::unpack_tar(&tar, &dest) {
            Ok(()) => {}
            Err(e) => prop_assert_eq!(e.status.as_u16(), 400),
        }
        prop_assert!(files_under(&outside).is_empty(), "something landed outside: {:?}", files_under(&outside));
        for f in files_under(top.path()) {
            prop_assert!(f.starts_with(&dest.display().to_string()) || f.starts_with(&outside.display().to_string()), "{f}");
        }
    }

    #[test]
    fn random_bytes_as_tar_are_a_clean_error(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        let dir = tempfile::tempdir().unwrap();
        if let Err(e) = context::unpack_tar(&bytes, dir.path()) {
            prop_assert_eq!(e.status.as_u16(), 400);
        }
    }
}

#[test]
fn escaping_tar_entries_are_refused_with_the_entry_named() {
    let top = tempfile::tempdir().unwrap();
    let dest = top.path().join("ctx");
    std::fs::create_dir(&dest).unwrap();
    for (name, kind, link) in [
        (&b"../evil"[..], b'0', &b""[..]),
        (b"/etc/evil", b'0', b""),
        (b"a/../../evil", b'0', b""),
        (b"hard", b'1', b"../../etc/passwd"),
    ] {
        let tar = raw_tar(&[(name.to_vec(), kind, link.to_vec(), b"x".to_vec())]);
        let e = context::unpack_tar(&tar, &dest).unwrap_err();
        assert_eq!(e.status.as_u16(), 400);
        assert!(e.message.contains("tar entry 0"), "{}", e.message);
    }
    // A symlink pointing out, then a file written "through" it.
    let tar = raw_tar(&[
        (b"link".to_vec(), b'2', top.path().join("outside").display().to_string().into_bytes(), vec![]),
        (b"link/file".to_vec(), b'0', vec![], b"x".to_vec()),
    ]);
    std::fs::create_dir(top.path().join("outside")).unwrap();
    let e = context::unpack_tar(&tar, &dest).unwrap_err();
    assert_eq!(e.status.as_u16(), 400, "{}", e.message);
    assert!(e.message.contains("tar entry 1"), "{}", e.message);
    assert!(std::fs::read_dir(top.path().join("outside")).unwrap().next().is_none());
}
