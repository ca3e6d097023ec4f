//! The ztunnel executable does not load libm.so: its one math function, `pow`, is defined inside
//! it by the `nolibm` crate (about 0.5 MiB of resident memory per process; see that crate).

#[test]
fn the_executable_needs_no_libm() {
    nolibm::testing::assert_needs_no_libm(env!("CARGO_BIN_EXE_ztunnel"));
}
