//! Registry manifests/indexes and image config JSON as kiln reads them.
#![no_main]

use kiln_engine::registry::manifest::{Manifest, select_platform};
use kiln_frontend::image::{History, ImageConfig};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for header in [None, Some("application/vnd.oci.image.index.v1+json"), Some("application/vnd.docker.distribution.manifest.v2+json")] {
        if let Ok(Manifest::Index { manifests, .. }) = Manifest::parse(data, header) {
            let platform = kiln_engine::registry::manifest::parse_platform("linux/amd64").expect("valid platform");
            let _ = select_platform(&manifests, &platform);
            let _ = kiln_engine::registry::manifest::platforms(&manifests);
        }
    }
    let _ = serde_json::from_slice::<ImageConfig>(data);
    let _ = serde_json::from_slice::<Vec<History>>(data);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = kiln_engine::registry::manifest::parse_platform(text);
    }
});
