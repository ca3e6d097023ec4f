// Shared by ztunnel/build.rs and waypoint/build.rs (included): in release builds on x86_64
// Linux, link binary `bin` with the crate's `hot-text.ld` when there is one (its functions
// gathered at the start of `.text`; bench/src/hot_text.rs writes it and says why), and
// optionally with packed relocations.
fn hot_text(bin: &str) {
    println!("cargo:rerun-if-changed=hot-text.ld");
    println!("cargo:rerun-if-env-changed=AMBIENT_PACK_RELOCS");
    let var = |k: &str| std::env::var(k).unwrap_or_default();
    if var("PROFILE") == "release"
        && var("CARGO_CFG_TARGET_ARCH") == "x86_64"
        && var("CARGO_CFG_TARGET_OS") == "linux"
    {
        let script = std::path::Path::new(&var("CARGO_MANIFEST_DIR")).join("hot-text.ld");
        if script.exists() {
            // `-T<script>` to the compiler driver, which hands it to the linker: unlike
            // `-Wl,-T,<script>`, a comma in the path does not split it.
            println!("cargo:rustc-link-arg-bin={bin}=-T{}", script.display());
        }
        // With AMBIENT_PACK_RELOCS=1 (the images and the benchmark suite set it), relative
        // relocations are packed as DT_RELR (a bitmap; GNU ld >= 2.38) instead of 24-byte RELA
        // entries: ~1 MiB less that the dynamic loader reads at start-up and that then stays in
        // an idle proxy's resident set. The binary then needs glibc >= 2.36 at run time: the
        // images carry the build host's glibc; a plain release build stays loadable on VM hosts
        // with an older one (RHEL 9, Amazon Linux 2023, Ubuntu 22.04).
        if var("AMBIENT_PACK_RELOCS") == "1" {
            println!("cargo:rustc-link-arg-bin={bin}=-Wl,-z,pack-relative-relocs");
        }
    }
}
