//! The link order of the proxies' code (`run --hot-text DIR`): the functions ztunnel and the
//! waypoint ran under callgrind are listed in a linker script, `<crate>/hot-text.ld`, that the
//! crate's build script passes to the linker in release builds; the linker gathers them into one
//! output section, `.text.hot`, at the start of the code. Two parts, each sorted by path: what
//! start-up and idle ran, then everything else the listing run ran (warming up, the fixed
//! workloads of the instruction counts, every scenario once, a hold of 250 connections).
//!
//! Why: the kernel maps an executable's code 64 KiB at a time around each page it faults in
//! ("fault-around"), so code run at start-up that lies scattered over the binary's 16 MiB of
//! `.text` left ~10 MiB of it resident in an idle ztunnel, most of which was never run. Gathered,
//! the ~4 MiB of listed code occupies ~4 MiB.
//!
//! The script lists the symbols' names as patterns ([`pattern`]): rustc's v0 mangling (set for
//! the workspace in `.cargo/config.toml`) spells out a function's path and generic arguments,
//! but also a hash of each crate's build (its dependencies, features, version), and LLVM adds
//! `.llvm.<n>` to some. Those parts become wildcards, so a list stays valid when a crate gains a
//! dependency or is bumped; only a renamed function or a moved closure drops out. (Under the
//! legacy mangling one hash stood for the path's crates and generic arguments together, so a
//! dependency change silently unlisted a third of the code, and no wildcard could tell
//! monomorphizations apart.) A name callgrind gives to code the linker folded into another
//! function has no section of its own and matches nothing.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use anyhow::Context;

/// The binaries listed, and the processes (callgrind dump names) whose dumps list them.
const BINARIES: [&str; 2] = ["ztunnel", "waypoint"];
const PROCESSES: [&str; 3] = ["ztunnel-a", "ztunnel-b", "waypoint"];

/// Code gathered whole, from the archive it is bundled in: jemalloc (C, all of its sections:
/// its functions are not listed by name) and ring's assembly (its `.text` only: ring's Rust
/// functions have their own sections, listed by name when they ran).
const WHOLE_ARCHIVES: [&str; 2] =
    ["*libtikv_jemalloc_sys-*.rlib:*(.text .text.*)", "*libring-*.rlib:*(.text)"];

/// Functions named in callgrind dumps, in order of first appearance over `dumps`, that the
/// object `binary` (a path ending in its file name) defines. Callgrind names the object of the
/// code of a binary linked with a `.text.hot` section "???", so both are read; the binary's own
/// symbol table (`defined`) keeps out what is not its code.
pub fn functions(dumps: &[String], binary: &str, defined: &HashSet<String>) -> Vec<String> {
    let suffix = format!("/{binary}");
    let mut seen = HashSet::new();
    let mut order = Vec::new();
    for text in dumps {
        // Callgrind compresses names: "ob=(3) /path" defines id 3, "ob=(3)" reuses it (and
        // "cob=" defines ids too); the same for "fn=" and "cfn=".
        let mut objects: std::collections::HashMap<&str, &str> = Default::default();
        let mut names: std::collections::HashMap<&str, &str> = Default::default();
        let mut in_binary = false;
        for line in text.lines() {
            let Some((key, rest)) = line.split_once('=') else { continue };
            let Some(rest) = rest.strip_prefix('(') else { continue };
            let Some((id, name)) = rest.split_once(')') else { continue };
            let name = name.strip_prefix(' ');
            match key {
                "ob" | "cob" => {
                    if let Some(name) = name {
                        objects.insert(id, name);
                    }
                    if key == "ob" {
                        let object = objects.get(id).copied().unwrap_or("");
                        in_binary = object.ends_with(&suffix) || object == "???";
                    }
                }
                "fn" | "cfn" => {
                    if let Some(name) = name {
                        names.insert(id, name);
                    }
                    if key == "fn"
                        && in_binary
                        && let Some(name) = names.get(id)
                        && defined.contains(*name)
                        && seen.insert(*name)
                    {
                        order.push((*name).to_string());
                    }
                }
                _ => {}
            }
        }
    }
    order
}

/// What start-up and idle ran first, then the rest; each part sorted by path ([`path_key`]),
/// so that a module's functions lie together and a new listing changes the file only where the
/// code run changed.
pub fn layout(mut startup: Vec<String>, all: Vec<String>) -> Vec<String> {
    let first: HashSet<String> = startup.iter().cloned().collect();
    let mut rest: Vec<String> = all.into_iter().filter(|f| !first.contains(f)).collect();
    startup.sort_by_cached_key(|f| (path_key(f), f.clone()));
    rest.sort_by_cached_key(|f| (path_key(f), f.clone()));
    startup.extend(rest);
    startup
}

/// One part of a v0 symbol's body (what follows `_R`), as [`v0_parts`] splits it.
#[derive(Debug, PartialEq, Eq)]
enum Part<'a> {
    /// A length-prefixed identifier (empty for a closure): its text.
    Ident(&'a str),
    /// `Cs<base-62>_`: a crate root with the hash of the crate's build.
    Crate,
    /// `s<base-62>_` elsewhere: another disambiguator.
    Disambiguator,
    /// `B<base-62>_`: a back-reference (an offset into the name).
    BackRef,
    /// Anything else: one tag or type letter.
    Other,
}

/// The parts of a v0 symbol's body, each with its text. Identifiers are skipped whole by their
/// length, so letters inside a name are never taken for tags.
fn v0_parts(body: &str) -> Vec<(Part<'_>, &str)> {
    let b = body.as_bytes();
    // The end of a base-62 number of at most `max` characters closed by '_', from `from`.
    let number_end = |from: usize, max: usize| {
        let digits = b
            .get(from..)
            .unwrap_or_default()
            .iter()
            .take(max)
            .take_while(|c| c.is_ascii_alphanumeric())
            .count();
        (b.get(from + digits) == Some(&b'_')).then_some(from + digits + 1)
    };
    let mut parts = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let (part, end) = match b[i] {
            b'C' if b.get(i + 1) == Some(&b's') && number_end(i + 2, 13).is_some() => {
                (Part::Crate, number_end(i + 2, 13).unwrap_or(i + 1))
            }
            b's' if number_end(i + 1, 13).is_some() => {
                (Part::Disambiguator, number_end(i + 1, 13).unwrap_or(i + 1))
            }
            b'B' if number_end(i + 1, 3).is_some() => (Part::BackRef, number_end(i + 1, 3).unwrap_or(i + 1)),
            c if c.is_ascii_digit() => {
                let digits = b[i..].iter().take_while(|c| c.is_ascii_digit()).count();
                let len: usize = body[i..i + digits].parse().unwrap_or(0);
                let mut start = i + digits;
                // An identifier that starts with a digit or '_' is preceded by a '_'.
                if b.get(start) == Some(&b'_') {
                    start += 1;
                }
                let end = (start + len).min(b.len());
                (Part::Ident(body.get(start..end).unwrap_or_default()), end)
            }
            _ => (Part::Other, i + 1),
        };
        // Text is ASCII in a v0 name; a stray byte ends the walk rather than split a character.
        let Some(text) = body.get(i..end) else { break };
        parts.push((part, text));
        i = end;
    }
    parts
}

/// The identifiers of a v0 name in order (`h2::proto::streams::recv::...`), for sorting: a v0
/// name starts with its tags (generic instance, closure, impl, ...), so sorting by the name
/// itself would split a module's functions into a dozen groups. Disambiguators and
/// back-references are left out. Other names are their own key.
pub fn path_key(symbol: &str) -> String {
    let Some(body) = symbol.strip_prefix("_R") else { return symbol.to_string() };
    let idents: Vec<&str> = v0_parts(body)
        .into_iter()
        .filter_map(|(p, _)| match p {
            Part::Ident(name) if !name.is_empty() => Some(name),
            _ => None,
        })
        .collect();
    idents.join("::")
}

/// `functions`, each followed by the other names of its code. rustc merges functions whose code
/// is identical (LLVM's MergeFunctions): one name becomes an alias of the other, at the same
/// address and in the other's section, and callgrind may report the code under the alias,
/// whose pattern matches no section: the code then stayed out of `.text.hot` (50 functions run
/// at start-up were, ~3 MiB of an idle ztunnel's RSS by the kernel's 64 KiB fault-around).
/// `addresses`: every function symbol of the binary with its address.
pub fn with_aliases(functions: Vec<String>, addresses: &HashMap<String, u64>) -> Vec<String> {
    let mut by_address: HashMap<u64, Vec<&str>> = HashMap::new();
    for (name, address) in addresses {
        by_address.entry(*address).or_default().push(name);
    }
    for names in by_address.values_mut() {
        names.sort_unstable();
    }
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for f in functions {
        let same = addresses.get(&f).and_then(|a| by_address.get(a)).cloned().unwrap_or_default();
        if seen.insert(f.clone()) {
            out.push(f);
        }
        for other in same {
            if seen.insert(other.to_string()) {
                out.push(other.to_string());
            }
        }
    }
    out
}

/// The function symbols `binary` defines, with their addresses, by `nm`.
fn defined_functions(binary: &Path) -> anyhow::Result<HashMap<String, u64>> {
    let out = std::process::Command::new("nm")
        .arg("--defined-only")
        .arg(binary)
        .output()
        .with_context(|| format!("nm {}", binary.display()))?;
    anyhow::ensure!(
        out.status.success(),
        "nm {}: {}",
        binary.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (address, kind, name) = (f.next()?, f.next()?, f.next()?);
            let address = u64::from_str_radix(address, 16).ok()?;
            matches!(kind, "t" | "T" | "W" | "w").then(|| (name.to_string(), address))
        })
        .collect())
}

/// The linker script: one output section of the listed functions (rustc puts each function in
/// `.text.<symbol>`, or `.text.unlikely.<symbol>` when LLVM deems it cold), inserted before the
/// default `.text` so the rest of the default script stays as it is. Each function is listed
/// with and without an LLVM suffix (`.llvm.*`, given to a function made visible across codegen
/// units), whichever it had: whether a function gets one changes from build to build as code
/// moves between codegen units, and a list generated for one build then missed functions of the
/// next (after a change to the HBONE server, 0.8 MiB more of ztunnel's code resident when idle).
pub fn script(binary: &str, functions: &[String]) -> String {
    let mut s = format!(
        "/* Generated by `mesh-bench run --only instructions --hot-text .` (bench/src/hot_text.rs):\n   \
         the {} functions {binary} ran under callgrind at start-up, idle, over the\n   \
         instruction-count workloads and every scenario, gathered at the start of its code.\n   \
         Used by build.rs in release builds. */\nSECTIONS\n{{\n  .text.hot :\n  {{\n",
        functions.len()
    );
    let mut seen = HashSet::new();
    let bases = functions.iter().map(|f| {
        let p = pattern(f);
        p.strip_suffix(".llvm.*").map(str::to_string).unwrap_or(p)
    });
    for f in bases.filter(|p| seen.insert(p.clone())) {
        if f.ends_with('*') {
            // A generic instance: its pattern's open end covers the suffix.
            s.push_str(&format!("    *(.text.{f} .text.unlikely.{f})\n"));
        } else {
            s.push_str(&format!(
                "    *(.text.{f} .text.{f}.llvm.* .text.unlikely.{f} .text.unlikely.{f}.llvm.*)\n"
            ));
        }
    }
    for a in WHOLE_ARCHIVES {
        s.push_str(&format!("    {a}\n"));
    }
    s.push_str("  }\n}\nINSERT BEFORE .text;\n");
    s
}

/// The linker pattern of a symbol: in a v0 name (`_R...`), each crate's disambiguator
/// (`Cs<base-62 hash>_`) and each back-reference (`B<base-62 offset>_`, an offset that moves
/// when a disambiguator's length does) become `*`; so does the crate a generic instance was
/// instantiated in (after the closing `E` of its generic arguments, a crate or a
/// back-reference to one), which depends on the set of packages built together and on
/// inlining: the same function was `..HeaderNameECs.._6common` in one LTO build and
/// `..HeaderNameECs.._2h2` in another. An LLVM suffix `.llvm.<digits>` becomes `.llvm.*`. A
/// wildcard only widens what a pattern matches. Other names (C, legacy) stay.
pub fn pattern(symbol: &str) -> String {
    let (name, llvm) = match symbol.split_once(".llvm.") {
        Some((name, n)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => (name, true),
        _ => (symbol, false),
    };
    let mut out = String::with_capacity(name.len());
    let mut instantiated = false;
    if let Some(body) = name.strip_prefix("_R") {
        out.push_str("_R");
        let mut parts = v0_parts(body);
        let n = parts.len();
        let tail = match parts.as_slice() {
            [.., (Part::Other, "E"), (Part::Crate, _), (Part::Ident(_), _)] => 2,
            [.., (Part::Other, "E"), (Part::BackRef, _)] => 1,
            _ => 0,
        };
        if tail > 0 {
            parts.truncate(n - tail);
            instantiated = true;
        }
        for (part, text) in parts {
            out.push_str(match part {
                Part::Crate => "Cs*_",
                Part::BackRef => "B*_",
                _ => text,
            });
        }
    } else {
        out.push_str(name);
    }
    if instantiated {
        // Also covers an LLVM suffix.
        out.push('*');
    } else if llvm {
        out.push_str(".llvm.*");
    }
    out
}

/// The callgrind dumps of process `name` in `dir`, oldest first: `<name>.callgrind.1`, `.2`,
/// ... (not `<name>.callgrind`, written when the process ended: shutdown is not hot).
fn dumps(dir: &Path, name: &str) -> anyhow::Result<Vec<String>> {
    let base = format!("{name}.callgrind");
    let mut files: Vec<(u32, PathBuf)> = std::fs::read_dir(dir)?
        .flatten()
        .filter_map(|e| {
            let file = e.file_name().to_string_lossy().into_owned();
            let rest = file.strip_prefix(&base)?;
            Some((rest.strip_prefix('.')?.parse::<u32>().ok()?, e.path()))
        })
        .collect();
    files.sort();
    anyhow::ensure!(!files.is_empty(), "no callgrind dumps of {name} in {}", dir.display());
    files.iter().map(|(_, p)| std::fs::read_to_string(p).with_context(|| p.display().to_string())).collect()
}

/// Before anything runs: `--hot-text` needs the instruction counts, `nm`, and the crates' folders.
pub fn check(repo: &Path, counting: bool) -> anyhow::Result<()> {
    anyhow::ensure!(
        counting,
        "--hot-text lists what the instruction-count run ran: keep `instructions` in --only"
    );
    let nm = std::process::Command::new("nm").arg("--version").output();
    anyhow::ensure!(nm.is_ok_and(|o| o.status.success()), "nm (binutils) is needed for --hot-text");
    for binary in BINARIES {
        let dir = repo.join(binary);
        anyhow::ensure!(
            dir.is_dir(),
            "--hot-text {}: no {} folder (give the repository)",
            repo.display(),
            dir.display()
        );
    }
    Ok(())
}

/// Removes the dumps an earlier run left in `dir`: a shorter run overwrites only the first of
/// them, and the rest would be read as this run's.
pub fn clear_dumps(dir: &Path) -> anyhow::Result<()> {
    for e in std::fs::read_dir(dir)?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if PROCESSES.iter().any(|p| name.starts_with(&format!("{p}.callgrind"))) {
            std::fs::remove_file(e.path()).with_context(|| e.path().display().to_string())?;
        }
    }
    Ok(())
}

/// Writes `<repo>/ztunnel/hot-text.ld` and `<repo>/waypoint/hot-text.ld` from the dumps of the
/// instruction-count run in `dir` (both ztunnels' dumps make ztunnel's list).
pub fn write(dir: &Path, bin_dir: &Path, repo: &Path) -> anyhow::Result<()> {
    for (binary, procs) in [(BINARIES[0], &PROCESSES[..2]), (BINARIES[1], &PROCESSES[2..])] {
        let addresses = defined_functions(&bin_dir.join(binary))?;
        let defined: HashSet<String> = addresses.keys().cloned().collect();
        let per_proc: Vec<Vec<String>> = procs.iter().map(|p| dumps(dir, p)).collect::<Result<_, _>>()?;
        let startup: Vec<String> = per_proc.iter().filter_map(|d| d.first().cloned()).collect();
        let all: Vec<String> = per_proc.into_iter().flatten().collect();
        let listed = |dumps: &[String]| with_aliases(functions(dumps, binary, &defined), &addresses);
        let functions = layout(listed(&startup), listed(&all));
        anyhow::ensure!(!functions.is_empty(), "no function of {binary} in its callgrind dumps");
        let path = repo.join(binary).join("hot-text.ld");
        std::fs::write(&path, script(binary, &functions)).with_context(|| path.display().to_string())?;
        tracing::info!(path = %path.display(), functions = functions.len(), "hot text written");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merged_functions_bring_the_names_of_their_code() {
        let addresses: HashMap<String, u64> =
            [("a", 0x10), ("alias_of_a", 0x10), ("b", 0x20), ("c", 0x30), ("alias_of_c", 0x30), ("z", 0x10)]
                .into_iter()
                .map(|(n, a)| (n.to_string(), a))
                .collect();
        let got =
            with_aliases(vec!["alias_of_a".into(), "b".into(), "a".into(), "unknown".into()], &addresses);
        assert_eq!(got, ["alias_of_a", "a", "z", "b", "unknown"]);
    }

    #[test]
    fn path_keys_put_a_modules_functions_together() {
        assert_eq!(
            path_key("_RNvMs0_NtNtCs1ab_2h25proto7streamsNtB5_4Recv4poll"),
            "h2::proto::streams::Recv::poll"
        );
        assert_eq!(path_key("_RNCNvNtCsx_2h25proto4send0B5_"), "h2::proto::send");
        assert_eq!(path_key("memcpy"), "memcpy");
        let mut v = vec![
            "_RNvNtCs1_5tokio2io4read".to_string(),
            "_RNCNvNtCs1_2h25proto4send0B5_".to_string(),
            "_RNvNtCs1_2h25proto4recv".to_string(),
        ];
        v = layout(Vec::new(), v);
        assert_eq!(
            v,
            ["_RNvNtCs1_2h25proto4recv", "_RNCNvNtCs1_2h25proto4send0B5_", "_RNvNtCs1_5tokio2io4read"]
        );
    }

    #[test]
    fn patterns_drop_build_hashes_and_keep_paths_and_generic_arguments() {
        let a = "_RNvMNtCsjrHSEGnQ3l9_3std4timeNtB2_7Instant3now";
        // The same function after the crate's hash changed length: the offset moved too.
        let b = "_RNvMNtCs1ab_3std4timeNtB1_7Instant3now";
        assert_eq!(pattern(a), "_RNvMNtCs*_3std4timeNtB*_7Instant3now");
        assert_eq!(pattern(a), pattern(b));
        // Different generic arguments stay different patterns.
        let u8s = "_RINvCs1_4core4takehEB2_";
        let u16s = "_RINvCs1_4core4taketEB2_";
        assert_ne!(pattern(u8s), pattern(u16s));
        assert_eq!(pattern("_RNvCs1_3foo3bar.llvm.1234567"), "_RNvCs*_3foo3bar.llvm.*");
        // Text that merely looks like a tag inside an identifier is left alone.
        assert_eq!(pattern("_RNvCs1_3foo5Bx_Cs"), "_RNvCs*_3foo5Bx_Cs");
        assert_eq!(pattern("_RNvCs1_3foo7barCs1_"), "_RNvCs*_3foo7barCs1_");
        assert_eq!(path_key("_RNvCs1_3foo7barCs1_"), "foo::barCs1_");
        // Not v0: unchanged (C functions, legacy names).
        assert_eq!(pattern("memcpy"), "memcpy");
        assert_eq!(pattern("_ZN3foo3bar17h0123456789abcdefE"), "_ZN3foo3bar17h0123456789abcdefE");
        assert_eq!(pattern("x.llvm.notdigits"), "x.llvm.notdigits");
        // The instantiating crate of a generic instance, named or a back-reference, is left
        // open: it changes with what is built together.
        let in_common = "_RINvNtCs1_4http3map4hashNtB2_4NameECs2_6common";
        let in_h2 = "_RINvNtCs1_4http3map4hashNtB2_4NameECs9ab_2h2";
        let in_http = "_RINvNtCs1_4http3map4hashNtB2_4NameEB4_";
        assert_eq!(pattern(in_common), "_RINvNtCs*_4http3map4hashNtB*_4NameE*");
        assert_eq!(pattern(in_h2), pattern(in_common));
        assert_eq!(pattern(in_http), pattern(in_common));
        assert_eq!(pattern("_RINvCs1_3foo3barhECs2_4main.llvm.42"), "_RINvCs*_3foo3barhE*");
        // A generic argument's closing `E` at the very end is not an instantiating crate.
        assert_eq!(pattern("_RINvCs1_3foo3barNtCs2_3baz3QuxE"), "_RINvCs*_3foo3barNtCs*_3baz3QuxE");
    }

    #[test]
    fn reads_compressed_names_of_the_binary_only_in_first_seen_order() {
        let dump = "\
ob=(1) /usr/lib/libc.so.6
fn=(1) memcpy
1 10
ob=(2) /x/target/release/ztunnel
fn=(2) _ZN7ztunnel4main17h0123456789abcdefE
1 5
cob=(1)
cfn=(3) _ZN7ztunnel5other17h0123456789abcdefE
calls=1 0
fn=(3)
1 4
ob=(3) ???
fn=(4) _RNvCs1_3std5hot
1 1
fn=(5) 0x0000000000001234
ob=(1)
fn=(6) strlen
"
        .to_string();
        let later = "ob=(1) /x/target/release/ztunnel\nfn=(9) _ZN7ztunnel4late17h0123456789abcdefE\nfn=(8) \
                     _ZN7ztunnel4main17h0123456789abcdefE\n"
            .to_string();
        let defined: HashSet<String> = [
            "_ZN7ztunnel4main17h0123456789abcdefE",
            "_ZN7ztunnel5other17h0123456789abcdefE",
            "_RNvCs1_3std5hot",
            "_ZN7ztunnel4late17h0123456789abcdefE",
            "memcpy",
        ]
        .into_iter()
        .map(String::from)
        .collect();
        let got = functions(&[dump, later], "ztunnel", &defined);
        assert_eq!(
            got,
            [
                "_ZN7ztunnel4main17h0123456789abcdefE",
                "_ZN7ztunnel5other17h0123456789abcdefE",
                "_RNvCs1_3std5hot",
                "_ZN7ztunnel4late17h0123456789abcdefE",
            ]
        );
        let laid = layout(vec!["b".into(), "a".into()], ["d", "a", "c", "b"].map(String::from).to_vec());
        assert_eq!(laid, ["a", "b", "c", "d"]);
        let laid = layout(vec!["d".into()], ["c", "d", "a"].map(String::from).to_vec());
        assert_eq!(laid, ["d", "a", "c"]);
        let s = script("ztunnel", &got);
        // Listed as a pattern: the crate's hash is a wildcard.
        let hot = "_RNvCs*_3std5hot";
        let listed = format!(
            "    *(.text.{hot} .text.{hot}.llvm.* .text.unlikely.{hot} .text.unlikely.{hot}.llvm.*)\n"
        );
        assert!(s.contains(&listed), "{s}");
        // A function seen with an LLVM suffix is listed once, in both forms.
        let s =
            script("ztunnel", &["_RNvCs1_3foo3bar.llvm.1234".to_string(), "_RNvCs1_3foo3bar".to_string()]);
        let bar = "_RNvCs*_3foo3bar";
        let listed = format!(
            "    *(.text.{bar} .text.{bar}.llvm.* .text.unlikely.{bar} .text.unlikely.{bar}.llvm.*)\n"
        );
        assert_eq!(s.matches(&listed).count(), 1, "{s}");
        assert!(s.ends_with("INSERT BEFORE .text;\n"), "{s}");
    }
}
