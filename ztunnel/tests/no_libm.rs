//! The ztunnel executable does not load libm.so: its one math function, `pow`, is defined inside
//! it by the `nolibm` crate (about 0.5 MiB of resident memory per process; see that crate).

use std::process::Command;

#[test]
fn the_executable_needs_no_libm() {
    let exe = env!("CARGO_BIN_EXE_ztunnel");
    let out = Command::new("readelf").args(["--dynamic", exe]).output().expect("readelf (binutils) runs");
    assert!(out.status.success(), "readelf {exe}: {}", String::from_utf8_lossy(&out.stderr));
    let dynamic = String::from_utf8_lossy(&out.stdout);
    let needed: Vec<&str> = dynamic.lines().filter(|l| l.contains("(NEEDED)")).collect();
    assert!(needed.iter().any(|l| l.contains("libc.so")), "not a dynamic executable? {needed:?}");
    assert!(!needed.iter().any(|l| l.contains("libm.so")), "{exe} loads libm: {needed:?}");
}
