//! Placeholder until the plugin lands: refuses every command.
fn main() {
    std::process::exit(1);
}
