//! An OCI layout written by the exporter goes to a real registry with
//! `skopeo copy`, and kiln pulls it back into an empty root unchanged.

mod common;

use std::process::Command;

use common::*;
use kiln_cache::Store;
use kiln_cache::snapshots::SnapshotMeta;
use kiln_exporter::{ImageSpec, Output, export};

fn inspect_id(root: &std::path::Path, name: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(&kiln_ok(root, &["inspect", name])).unwrap();
    v[0]["Id"].as_str().unwrap().to_string()
}

#[test]
fn skopeo_copies_the_oci_layout_to_a_registry_and_kiln_pulls_it() {
    if !have("skopeo", "registry round trip of an exported layout") || !have("docker-registry", "registry round trip") {
        return;
    }
    let reg = TestRegistry::start();
    let work = tempfile::tempdir().unwrap();
    let store = Store::open(&work.path().join("store")).unwrap();
    let mut layers = Vec::new();
    for (id, file, body) in [("one", "etc/one", "1\n"), ("two", "usr/share/two", "2\n")] {
        let active = store.snapshots.prepare().unwrap();
        let path = active.fs().join(file);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, body).unwrap();
        store.snapshots.commit(active, id, &SnapshotMeta::default()).unwrap();
        layers.push(id.to_string());
    }
    let spec = ImageSpec {
        layers,
        config: serde_json::json!({"Cmd": ["/bin/true"]}),
        history: Vec::new(),
        os: "linux".into(),
        architecture: "amd64".into(),
        variant: None,
        created: None,
    };
    for compression in ["gzip", "zstd"] {
        let layout = work.path().join(format!("layout-{compression}"));
        let out = Output::parse(&format!("type=oci,dest={},tar=false,name=exported:{compression},compression={compression}", layout.display()))
            .unwrap();
        let built = export(&store, &spec, &out, Some(1_700_000_000)).unwrap().unwrap();

        let remote = format!("{}/kiln/exported:{compression}", reg.addr);
        let copy = Command::new("skopeo")
            .args(["copy", "--dest-tls-verify=false"])
            .arg(format!("oci:{}:{compression}", layout.display()))
            .arg(format!("docker://{remote}"))
            .output()
            .unwrap();
        assert!(copy.status.success(), "skopeo copy: {}", String::from_utf8_lossy(&copy.stderr));

        let root = tempfile::tempdir().unwrap();
        kiln_ok(root.path(), &["--insecure-registry", &reg.addr, "pull", &remote]);
        assert_eq!(inspect_id(root.path(), &remote), built.config.digest().to_string(), "{compression}");
    }
}
