//! Replays every saved fuzz input — the corpus and each crash found — through the same
//! checks the fuzz targets run (`fuzz/harness.rs`), on the stable toolchain, so `make
//! test` keeps what fuzzing learned. `make fuzz` grows the corpus.

#[path = "../fuzz/harness.rs"]
mod harness;

use std::path::Path;

fn inputs(dir: &Path) -> Vec<Vec<u8>> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .map(|e| std::fs::read(e.expect("a directory entry").path()).expect("a readable input"))
        .collect()
}

#[test]
fn every_saved_input_passes_its_target() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    for (name, check) in harness::TARGETS {
        let corpus = inputs(&root.join("corpus").join(name));
        assert!(!corpus.is_empty(), "fuzz/corpus/{name} is missing or empty");
        let regressions = inputs(&root.join("regressions").join(name));
        for input in corpus.iter().chain(&regressions) {
            check(input);
        }
    }
}
