//! The Dockerfile parser and lowering to an op graph: any bytes give a
//! result or an error, never a panic.
#![no_main]

use kiln_frontend::image::{History, ImageConfig};
use kiln_frontend::{ImageMetaResolver, LowerOptions, Platform};
use libfuzzer_sys::fuzz_target;

/// Every base image exists, with no config: lowering goes as far as the
/// input lets it without a registry.
struct AnyImage;

impl ImageMetaResolver for AnyImage {
    fn resolve(&self, _reference: &str, _platform: &Platform) -> Result<(ImageConfig, Vec<History>), String> {
        Ok((ImageConfig::default(), vec![History::default()]))
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(parsed) = kiln_frontend::parser::parse(data) {
        let _ = parsed.ast.dump();
    }
    if let Ok(def) = kiln_frontend::lower(data, &LowerOptions::default(), &AnyImage) {
        // The solver relies on inputs coming before the ops that read them.
        for (i, op) in def.ops.iter().enumerate() {
            assert!(op.inputs.iter().all(|&j| j < i), "op {i} reads a later op");
        }
        assert!(def.target < def.ops.len());
    }
});
