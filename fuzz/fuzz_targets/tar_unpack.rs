//! Layer unpacking (compression detection, then the tar reader with
//! whiteouts, links and path checks): nothing panics and nothing is
//! written outside the target directory.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().expect("temp dir");
    let target = dir.path().join("rootfs");
    std::fs::create_dir(&target).expect("target dir");
    let _ = kiln_engine::unpack::unpack(data, &target);
    // Only the target may exist next to it.
    let names: Vec<_> = std::fs::read_dir(dir.path()).expect("read dir").flatten().map(|e| e.file_name()).collect();
    assert_eq!(names, vec![std::ffi::OsString::from("rootfs")], "unpack wrote outside its target");
});
