//! Release builds on x86_64 Linux link with `hot-text.ld`: the code the waypoint runs at start-up
//! and on its hot paths gathered at the start of `.text` (see bench/src/hot_text.rs).
include!("../common/build/hot_text.rs");

fn main() {
    hot_text("waypoint");
}
