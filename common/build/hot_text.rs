// Shared by ztunnel/build.rs and waypoint/build.rs (included): in release builds on x86_64
// Linux, link binary `bin` with the crate's `hot-text.ld` when there is one (its functions
// gathered at the start of `.text`; bench/src/hot_text.rs writes it and says why).
fn hot_text(bin: &str) {
    println!("cargo:rerun-if-changed=hot-text.ld");
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
    }
}
