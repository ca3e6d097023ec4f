//! ambient-cni binary: the CNI plugin, or its `install`/`uninstall` commands (see `ambient_cni::cli`).

fn main() {
    std::process::exit(ambient_cni::cli::main(std::env::args_os().collect()));
}
