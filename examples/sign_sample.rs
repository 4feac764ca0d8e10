//! Prints the golden sample assertion (RSA test key, or `ec` for the P-256 one), e.g.
//! to regenerate `tests/fixtures/golden-assertion*.xml` or to feed it to xmlsec1.
#[path = "../tests/common/sample.rs"]
mod sample;

fn main() {
    match std::env::args().nth(1).as_deref() {
        Some("ec") => print!("{}", sample::signed_sample_ec()),
        _ => print!("{}", sample::signed_sample()),
    }
}
