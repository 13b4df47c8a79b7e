//! Reproducibility, blob reuse and bad destinations.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use common::*;
use kiln_cache::Store;
use kiln_exporter::compression::CompressionKind;
use kiln_exporter::{LayerOptions, LayerWriter, Output, export, read_blob};
use oci_spec::image::ImageConfiguration;

fn is_root() -> bool {
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        println!("skipped: this test because it needs root (device nodes, trusted xattrs)");
    }
    root
}

/// Names in `dir` other than `keep`.
fn leftovers(dir: &Path, keep: &[&str]) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !keep.contains(&n.as_str()))
        .collect()
}

#[test]
fn source_date_epoch_gives_the_same_manifest_on_two_empty_roots() {
    if !is_root() {
        return;
    }
    let epoch = 1_700_000_000;
    for compression in ["gzip", "zstd", "uncompressed"] {
        let mut digests = Vec::new();
        let mut files = Vec::new();
        for round in 0..2 {
            let tmp = tempfile::tempdir().unwrap();
            let store = Store::open(&tmp.path().join("store")).unwrap();
            let spec = spec(chain(&store));
            if round == 1 {
                // Different file times on the second root: clamped away.
                std::thread::sleep(std::time::Duration::from_millis(1100));
                let hello = store.snapshots.path("upper").join("etc/hello");
                std::fs::write(&hello, b"hello v2\n").unwrap();
            }
            let dest = tmp.path().join("out.tar");
            let out = Output::parse(&format!("type=oci,dest={},name=r:1,compression={compression}", dest.display())).unwrap();
            let built = export(&store, &spec, &out, Some(epoch)).unwrap().unwrap();
            let config = ImageConfiguration::from_reader(&read_blob(&store.content, built.config.digest().as_ref()).unwrap()[..]).unwrap();
            assert_eq!(config.created().as_deref(), Some("2023-11-14T22:13:20Z"));
            assert!(config.history().as_ref().unwrap().iter().all(|h| h.created().as_deref() == Some("2023-11-14T22:13:20Z")));
            digests.push(built.manifest.digest().to_string());
            files.push(std::fs::read(&dest).unwrap());
        }
        assert_eq!(digests[0], digests[1], "manifest digests differ with {compression}");
        assert!(files[0] == files[1], "the OCI tar files differ with {compression}");
    }
}

#[test]
fn without_epoch_times_are_now_and_layers_keep_mtimes() {
    if !is_root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(tmp.path()).unwrap();
    let spec = spec(chain(&store));
    let built = export(&store, &spec, &Output::parse("type=image").unwrap(), None).unwrap().unwrap();
    // type=image: the store can name it, and resolves the name back.
    kiln_exporter::tag_image(&store, &built, &["kiln-test/tagged:1".to_string()]).unwrap();
    let record = store.images.resolve("kiln-test/tagged:1").unwrap();
    assert_eq!(record.target.digest, built.manifest.digest().to_string());
    assert_eq!(record.config_digest, built.config.digest().to_string());
    let config = ImageConfiguration::from_reader(&read_blob(&store.content, built.config.digest().as_ref()).unwrap()[..]).unwrap();
    let created = config.created().clone().unwrap();
    assert!(created.starts_with("20") && created != "2023-11-14T22:13:20Z", "{created}");
}

#[test]
fn existing_blobs_are_reused_not_retarred() {
    if !is_root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(tmp.path()).unwrap();
    let layers = chain(&store);
    let writer = LayerWriter::new(&store, LayerOptions::default());
    let first = writer.write_chain(&layers).unwrap();
    assert!(first.iter().all(|l| !l.reused));
    let meta = store.snapshots.meta("base").unwrap();
    assert_eq!(meta.diff_id.as_deref(), Some(first[0].diff_id.as_str()));
    assert_eq!(meta.blobs.len(), 1);
    let blob = store.content.blob_path(&first[0].digest);
    let before = std::fs::metadata(&blob).unwrap();

    let second = writer.write_chain(&layers).unwrap();
    assert!(second.iter().all(|l| l.reused), "{second:?}");
    assert_eq!(first.iter().map(|l| &l.digest).collect::<Vec<_>>(), second.iter().map(|l| &l.digest).collect::<Vec<_>>());
    let after = std::fs::metadata(&blob).unwrap();
    assert_eq!((before.ino(), before.mtime(), before.mtime_nsec()), (after.ino(), after.mtime(), after.mtime_nsec()));

    // Another compression reuses the gzip blob unless forced.
    let zstd = |force| LayerOptions {
        compression: kiln_exporter::Compression { kind: CompressionKind::Zstd, level: None },
        force_compression: force,
        clamp_mtime: None,
    };
    let unforced = LayerWriter::new(&store, zstd(false)).write("base").unwrap();
    assert!(unforced.reused && unforced.compression == CompressionKind::Gzip);
    let forced = LayerWriter::new(&store, zstd(true)).write("base").unwrap();
    assert!(!forced.reused && forced.compression == CompressionKind::Zstd);
    assert_eq!(forced.diff_id, first[0].diff_id, "same tar, other compression");
    assert_eq!(store.snapshots.meta("base").unwrap().blobs.len(), 2);
    assert!(LayerWriter::new(&store, zstd(true)).write("base").unwrap().reused);

    // A recorded blob that vanished from the store is not used: the zstd
    // one is, or, with gzip forced, the gzip one is made again (same bytes).
    std::fs::remove_file(&blob).unwrap();
    let any = writer.write("base").unwrap();
    assert!(any.reused && any.compression == CompressionKind::Zstd);
    let gzip_forced = LayerOptions { force_compression: true, ..LayerOptions::default() };
    let again = LayerWriter::new(&store, gzip_forced).write("base").unwrap();
    assert!(!again.reused && again.digest == first[0].digest && blob.is_file());
}

#[test]
fn bad_destinations_fail_clearly_and_leave_nothing() {
    if !is_root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(&tmp.path().join("store")).unwrap();
    let spec = spec(chain(&store));
    let out_dir = tmp.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();

    // Parent missing.
    let missing = out_dir.join("no/such/dir/image.tar");
    let err = export(&store, &spec, &Output::parse(&format!("type=oci,dest={}", missing.display())).unwrap(), None).unwrap_err();
    assert!(format!("{err:#}").contains("does not exist"), "{err:#}");

    // Dest exists: untouched.
    let existing = out_dir.join("existing.tar");
    std::fs::write(&existing, b"precious").unwrap();
    for kind in ["oci", "docker", "tar"] {
        let err = export(&store, &spec, &Output::parse(&format!("type={kind},dest={}", existing.display())).unwrap(), None).unwrap_err();
        assert!(format!("{err:#}").contains("already exists"), "{err:#}");
    }
    assert_eq!(std::fs::read(&existing).unwrap(), b"precious");

    // Non-empty dir for type=local.
    let full = out_dir.join("full");
    std::fs::create_dir(&full).unwrap();
    std::fs::write(full.join("f"), b"x").unwrap();
    assert!(export(&store, &spec, &Output::parse(&format!("type=local,dest={}", full.display())).unwrap(), None).is_err());

    // Unwritable parent (read-only bind would need a mount; /proc is never writable).
    let err = export(&store, &spec, &Output::parse("type=tar,dest=/proc/kiln-out.tar").unwrap(), None).unwrap_err();
    assert!(format!("{err:#}").contains("cannot write /proc/kiln-out.tar"), "{err:#}");

    // An error half-way (a snapshot missing) leaves no partial file or temp.
    let mut broken = spec.clone();
    broken.layers.push("no-such-snapshot".into());
    for (kind, name) in [("oci", "a.tar"), ("docker", "b.tar"), ("tar", "c.tar"), ("local", "d"), ("oci", "e-dir")] {
        let dest = out_dir.join(name);
        let err = export(&store, &broken, &Output::parse(&format!("type={kind},dest={}", dest.display())).unwrap(), None).unwrap_err();
        assert!(format!("{err:#}").contains("no-such-snapshot"), "{err:#}");
        assert!(!dest.exists(), "{kind}: partial output left at {}", dest.display());
    }
    assert_eq!(leftovers(&out_dir, &["existing.tar", "full"]), Vec::<String>::new(), "temp files left behind");

    // Bad options never get as far as the store.
    for bad in ["type=oci,dest=x.tar,compression=brotli", "type=nope", "type=docker,dest=x.tar,colour=blue"] {
        assert!(Output::parse(bad).is_err(), "{bad}");
    }
    assert_eq!(leftovers(&out_dir, &["existing.tar", "full"]), Vec::<String>::new());
}

#[test]
fn an_empty_dir_dest_is_filled() {
    if !is_root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(&tmp.path().join("store")).unwrap();
    let spec = spec(chain(&store));
    let dest = tmp.path().join("empty");
    std::fs::create_dir(&dest).unwrap();
    export(&store, &spec, &Output::parse(&format!("type=local,dest={}", dest.display())).unwrap(), None).unwrap();
    assert_eq!(std::fs::read(dest.join("etc/hello")).unwrap(), b"hello v2\n");
}
