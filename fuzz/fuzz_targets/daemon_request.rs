//! The daemon's request parsing: query strings, percent-decoded paths,
//! API versions, JSON bodies and build-context tars (whose entries must
//! stay inside the context directory).
#![no_main]

use kiln_engine::daemon::api::{MissingRequest, PullRequest, TagRequest};
use kiln_engine::daemon::containers::RunRequest;
use kiln_engine::daemon::context::{self, ContextEntry};
use kiln_engine::daemon::docker::{strip_version, unix_seconds};
use kiln_engine::daemon::web::{Query, parse_json, percent_decode_path};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = parse_json::<PullRequest>(data);
    let _ = parse_json::<TagRequest>(data);
    let _ = parse_json::<MissingRequest>(data);
    let _ = parse_json::<RunRequest>(data);
    if let Ok(entries) = parse_json::<Vec<ContextEntry>>(data) {
        let _ = context::validate(&entries);
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = Query::parse(Some(text));
        let _ = percent_decode_path(text);
        let _ = strip_version(text);
        let _ = unix_seconds(text);
        let _ = context::safe_relative(text);
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let dest = dir.path().join("ctx");
    std::fs::create_dir(&dest).expect("context dir");
    let _ = context::unpack_tar(data, &dest);
    let names: Vec<_> = std::fs::read_dir(dir.path()).expect("read dir").flatten().map(|e| e.file_name()).collect();
    assert_eq!(names, vec![std::ffi::OsString::from("ctx")], "a context tar wrote outside its directory");
});
