//! `pow`, the one function of the C math library (libm) the proxies import, defined here so the
//! linker resolves it inside the executable and libm.so is not loaded at all.
//!
//! The caller is tokio's multi-threaded scheduler, which keeps a moving average of task poll
//! times with `f64::powf` after every batch of tasks, so the call is on a hot path, not a cold
//! one. Loading libm.so for that one function costs each process about 0.5 MiB of resident
//! memory: the dynamic loader resolves `pow`'s implementation at start-up (an indirect function
//! picked by CPU features) and the kernel maps 64 KiB around every page touched in libm's code
//! and tables. The implementation is the `libm` crate's (the Rust port of musl's), within one
//! unit in the last place like glibc's.
//!
//! A binary links this by naming the crate (`use nolibm as _;`). Whether it worked is checked
//! on the built executables: `readelf -d` lists no `libm.so.6` among their needed libraries
//! (`ztunnel/tests/no_libm.rs`, `waypoint/tests/no_libm.rs`, both with
//! [`testing::assert_needs_no_libm`]).

/// `double pow(double x, double y)` with C's semantics (special cases as in C99 Annex F).
// A C symbol: the attribute is `unsafe` because the name can clash with another definition, and
// replacing libm's is the point; the body is safe Rust.
#[allow(unsafe_code)]
#[unsafe(no_mangle)]
pub extern "C" fn pow(x: f64, y: f64) -> f64 {
    libm::pow(x, y)
}

/// The check the binaries' tests make on their executables.
#[cfg(feature = "testing")]
pub mod testing {
    use std::process::Command;

    /// Panics unless `exe` is a dynamic executable whose needed libraries (`readelf
    /// --dynamic`) include libc and not libm.
    pub fn assert_needs_no_libm(exe: &str) {
        let out = Command::new("readelf").args(["--dynamic", exe]).output().expect("readelf (binutils) runs");
        assert!(out.status.success(), "readelf {exe}: {}", String::from_utf8_lossy(&out.stderr));
        let dynamic = String::from_utf8_lossy(&out.stdout);
        let needed: Vec<&str> = dynamic.lines().filter(|l| l.contains("(NEEDED)")).collect();
        assert!(needed.iter().any(|l| l.contains("libc.so")), "not a dynamic executable? {needed:?}");
        assert!(!needed.iter().any(|l| l.contains("libm.so")), "{exe} loads libm: {needed:?}");
    }
}

#[cfg(test)]
mod tests {
    use super::pow;

    #[test]
    fn agrees_with_the_special_cases_and_ordinary_values() {
        assert_eq!(pow(2.0, 10.0), 1024.0);
        assert_eq!(pow(0.0, 0.0), 1.0);
        assert_eq!(pow(f64::NAN, 0.0), 1.0);
        assert_eq!(pow(1.0, f64::NAN), 1.0);
        assert!(pow(-1.0, 0.5).is_nan());
        assert_eq!(pow(0.0, -1.0), f64::INFINITY);
        assert_eq!(pow(-0.0, -3.0), f64::NEG_INFINITY);
        assert_eq!(pow(0.5, f64::INFINITY), 0.0);
        // tokio's use: 1 - (1 - alpha)^n for a poll-time average.
        let weighted = 1.0 - pow(1.0 - 0.1, 3.0);
        assert!((weighted - 0.271).abs() < 1e-12, "{weighted}");
        let x = pow(1.000_001, 1e6);
        assert!((x - std::f64::consts::E).abs() < 1e-5, "{x}");
    }
}
