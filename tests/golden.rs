//! The signer's output is byte-for-byte the committed golden assertion (natively).
mod common;

#[test]
fn signed_sample_matches_the_golden_file() {
    assert_eq!(common::sample::signed_sample(), common::sample::GOLDEN);
}

#[test]
fn ecdsa_signed_sample_matches_its_golden_file() {
    assert_eq!(
        common::sample::signed_sample_ec(),
        common::sample::GOLDEN_EC
    );
}

#[test]
fn user_certificates_match_their_golden_files() {
    common::sample::assert_user_certificates_are_golden();
}
