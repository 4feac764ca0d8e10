//! Prints the golden sample assertion (test key), e.g. to regenerate
//! `tests/fixtures/golden-assertion.xml` or to feed it to xmlsec1 by hand.
#[path = "../tests/common/sample.rs"]
mod sample;

fn main() {
    print!("{}", sample::signed_sample());
}
