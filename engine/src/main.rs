//! The `kiln` binary: a thin layer over the engine.
fn main() {
    println!("kiln");
}
