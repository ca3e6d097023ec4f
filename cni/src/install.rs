//! Putting the plugin on a node (what its DaemonSet container runs): the binary goes into the
//! CNI bin directory and an entry for it is appended to the `plugins` of the runtime's network
//! configuration, the first `.conflist` or `.conf` of the conf directory in lexical order (the
//! one the runtime uses; a `.conf` is turned into a `.conflist`). Every write is a temporary
//! file renamed into place, and nothing is written when nothing changed, so running it again,
//! or every few seconds with `--watch` to undo a primary CNI that rewrote its file, is safe.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::conf::PLUGIN_TYPE;

/// What to install.
#[derive(Clone, Debug)]
pub struct Install {
    /// The binary to copy (normally this process's own).
    pub binary: PathBuf,
    pub bin_dir: PathBuf,
    pub conf_dir: PathBuf,
    /// ztunnel's enrollment socket, written into the plugin's entry.
    pub socket: PathBuf,
    pub exclude_namespaces: Vec<String>,
}

/// Why installing or uninstalling failed.
#[derive(Debug)]
pub enum InstallError {
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    /// The conf directory holds no network configuration yet (the primary CNI writes it).
    NoNetwork(PathBuf),
    /// A configuration that is not JSON, or not shaped like one.
    BadConfig {
        path: PathBuf,
        reason: String,
    },
}

impl std::fmt::Display for InstallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            InstallError::Io { path, error } => write!(f, "{}: {error}", path.display()),
            InstallError::NoNetwork(dir) => {
                write!(f, "no .conflist or .conf in {} (has the primary CNI written its own?)", dir.display())
            }
            InstallError::BadConfig { path, reason } => write!(f, "{}: {reason}", path.display()),
        }
    }
}

impl std::error::Error for InstallError {}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> InstallError + '_ {
    move |error| InstallError::Io { path: path.to_path_buf(), error }
}

/// What one pass changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Installed {
    /// The binary was (re)written.
    pub binary: bool,
    /// The network configuration the plugin is in.
    pub conflist: PathBuf,
    /// It was rewritten (plugin entry added or corrected, or a `.conf` converted).
    pub config: bool,
}

/// What uninstalling removed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Removed {
    pub binary: bool,
    /// Configurations the plugin's entry was removed from.
    pub configs: Vec<PathBuf>,
}

impl Install {
    /// The plugin's entry in a conflist.
    pub fn entry(&self) -> Value {
        json!({
            "type": PLUGIN_TYPE,
            "socket": self.socket.display().to_string(),
            "exclude_namespaces": self.exclude_namespaces,
        })
    }

    /// Copies the binary and inserts the entry, when either is not already so.
    pub fn run(&self) -> Result<Installed, InstallError> {
        let binary = self.copy_binary()?;
        let (conflist, config) = self.insert_entry()?;
        Ok(Installed { binary, conflist, config })
    }

    fn copy_binary(&self) -> Result<bool, InstallError> {
        let ours = fs::read(&self.binary).map_err(io_err(&self.binary))?;
        let target = self.bin_dir.join(PLUGIN_TYPE);
        if fs::read(&target).is_ok_and(|theirs| theirs == ours) {
            return Ok(false);
        }
        fs::create_dir_all(&self.bin_dir).map_err(io_err(&self.bin_dir))?;
        write_atomically(&target, &ours, 0o755)?;
        Ok(true)
    }

    fn insert_entry(&self) -> Result<(PathBuf, bool), InstallError> {
        let path = first_network_config(&self.conf_dir)?;
        let mut config = read_json(&path)?;
        let is_list = path.extension().is_some_and(|e| e == "conflist");
        if !is_list {
            config = conf_to_conflist(config, &path)?;
        }
        let plugins = plugins_of(&mut config, &path)?;
        let entry = self.entry();
        let ours = |p: &Value| p.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE);
        let in_place = plugins.last() == Some(&entry) && plugins.iter().filter(|p| ours(p)).count() == 1;
        if in_place && is_list {
            return Ok((path, false));
        }
        plugins.retain(|p| !ours(p));
        plugins.push(entry);
        let target = path.with_extension("conflist");
        write_atomically(&target, &pretty(&config), 0o644)?;
        if target != path {
            // The runtime would otherwise still pick the `.conf` (it sorts first).
            fs::remove_file(&path).map_err(io_err(&path))?;
        }
        Ok((target, true))
    }
}

/// Removes the plugin's entry from every conflist of `conf_dir` and its binary from `bin_dir`.
pub fn uninstall(bin_dir: &Path, conf_dir: &Path) -> Result<Removed, InstallError> {
    let mut removed = Removed::default();
    for path in network_configs(conf_dir)? {
        if path.extension().is_none_or(|e| e != "conflist") {
            continue;
        }
        let mut config = read_json(&path)?;
        let Ok(plugins) = plugins_of(&mut config, &path) else { continue };
        let before = plugins.len();
        plugins.retain(|p| p.get("type").and_then(Value::as_str) != Some(PLUGIN_TYPE));
        if plugins.len() != before {
            write_atomically(&path, &pretty(&config), 0o644)?;
            removed.configs.push(path);
        }
    }
    let binary = bin_dir.join(PLUGIN_TYPE);
    match fs::remove_file(&binary) {
        Ok(()) => removed.binary = true,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(InstallError::Io { path: binary, error: e }),
    }
    Ok(removed)
}

/// The `.conflist`, `.conf` and `.json` files of `dir`, in lexical order (as runtimes read them).
fn network_configs(dir: &Path) -> Result<Vec<PathBuf>, InstallError> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(InstallError::Io { path: dir.to_path_buf(), error: e }),
    };
    let mut out: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .filter(|p| p.extension().is_some_and(|e| e == "conflist" || e == "conf" || e == "json"))
        .collect();
    out.sort();
    Ok(out)
}

/// The network configuration the runtime uses: the first `.conflist` or `.conf`.
fn first_network_config(dir: &Path) -> Result<PathBuf, InstallError> {
    network_configs(dir)?
        .into_iter()
        .find(|p| p.extension().is_some_and(|e| e == "conflist" || e == "conf"))
        .ok_or_else(|| InstallError::NoNetwork(dir.to_path_buf()))
}

fn read_json(path: &Path) -> Result<Value, InstallError> {
    let bytes = fs::read(path).map_err(io_err(path))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| InstallError::BadConfig { path: path.into(), reason: e.to_string() })
}

/// A single-plugin `.conf` as a conflist of that one plugin (which keeps its own fields).
fn conf_to_conflist(conf: Value, path: &Path) -> Result<Value, InstallError> {
    let bad = |reason: &str| InstallError::BadConfig { path: path.into(), reason: reason.into() };
    let object = conf.as_object().ok_or_else(|| bad("not a JSON object"))?;
    let version = object.get("cniVersion").cloned().ok_or_else(|| bad("no cniVersion"))?;
    let name = object.get("name").cloned().ok_or_else(|| bad("no name"))?;
    Ok(json!({"cniVersion": version, "name": name, "plugins": [conf]}))
}

fn plugins_of<'a>(config: &'a mut Value, path: &Path) -> Result<&'a mut Vec<Value>, InstallError> {
    config
        .get_mut("plugins")
        .and_then(Value::as_array_mut)
        .ok_or_else(|| InstallError::BadConfig { path: path.into(), reason: "no `plugins` list".into() })
}

fn pretty(value: &Value) -> Vec<u8> {
    let mut out = serde_json::to_vec_pretty(value).unwrap_or_default();
    out.push(b'\n');
    out
}

/// Writes `target` through a hidden temporary file in its directory (which no runtime reads)
/// renamed over it, so a reader sees the old file or the new one, never half of one.
fn write_atomically(target: &Path, bytes: &[u8], mode: u32) -> Result<(), InstallError> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = target.parent().unwrap_or(Path::new("."));
    let name = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let temp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut file =
            fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(&temp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&temp, target)
    };
    write().map_err(|error| {
        let _ = fs::remove_file(&temp);
        InstallError::Io { path: target.to_path_buf(), error }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (tempfile::TempDir, Install) {
        let dir = tempfile::tempdir().expect("tempdir");
        let binary = dir.path().join("ambient-cni-build");
        fs::write(&binary, b"#!plugin v1").expect("binary");
        let install = Install {
            binary,
            bin_dir: dir.path().join("bin"),
            conf_dir: dir.path().join("net.d"),
            socket: PathBuf::from("/var/run/ambient/ztunnel-cni.sock"),
            exclude_namespaces: vec!["kube-system".into()],
        };
        fs::create_dir_all(&install.conf_dir).expect("conf dir");
        (dir, install)
    }

    const PTP: &str = r#"{"cniVersion":"1.0.0","name":"k8s","plugins":[{"type":"ptp","ipam":{"type":"host-local"}},{"type":"portmap"}]}"#;

    fn plugin_types(path: &Path) -> Vec<String> {
        let v = read_json(path).expect("json");
        v["plugins"]
            .as_array()
            .expect("plugins")
            .iter()
            .map(|p| p["type"].as_str().unwrap_or("").into())
            .collect()
    }

    #[test]
    fn install_is_idempotent_and_goes_last() {
        let (_dir, install) = setup();
        let list = install.conf_dir.join("10-k8s.conflist");
        fs::write(&list, PTP).expect("conflist");
        // A later file is not the runtime's and stays alone.
        fs::write(install.conf_dir.join("20-other.conflist"), PTP).expect("other");

        let first = install.run().expect("install");
        assert_eq!(first, Installed { binary: true, conflist: list.clone(), config: true });
        assert_eq!(plugin_types(&list), ["ptp", "portmap", "ambient-cni"]);
        let v = read_json(&list).expect("json");
        assert_eq!(v["plugins"][2], install.entry());
        assert_eq!(v["plugins"][0]["ipam"]["type"], "host-local", "the rest is kept");
        assert_eq!(fs::read(install.bin_dir.join("ambient-cni")).expect("bin"), b"#!plugin v1");
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(install.bin_dir.join("ambient-cni")).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o755);

        let modified = fs::metadata(&list).expect("meta").modified().expect("mtime");
        let again = install.run().expect("again");
        assert_eq!(again, Installed { binary: false, conflist: list.clone(), config: false });
        assert_eq!(fs::metadata(&list).expect("meta").modified().expect("mtime"), modified, "not rewritten");
        assert_eq!(plugin_types(&install.conf_dir.join("20-other.conflist")), ["ptp", "portmap"]);
        let leftovers: Vec<_> = fs::read_dir(&install.conf_dir)
            .expect("dir")
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");

        // A new build is copied again.
        fs::write(&install.binary, b"#!plugin v2").expect("binary");
        assert!(install.run().expect("upgrade").binary);
    }

    #[test]
    fn a_rewritten_or_misplaced_entry_is_put_back_last_once() {
        let (_dir, install) = setup();
        let list = install.conf_dir.join("10-k8s.conflist");
        // The primary CNI rewrote its file without us.
        fs::write(&list, PTP).expect("conflist");
        install.run().expect("install");
        fs::write(&list, PTP).expect("rewritten");
        assert!(install.run().expect("reinstall").config);
        assert_eq!(plugin_types(&list), ["ptp", "portmap", "ambient-cni"]);
        // An entry in the middle, with another socket: moved last and corrected.
        let stale = r#"{"cniVersion":"1.0.0","name":"k8s","plugins":[{"type":"ptp"},{"type":"ambient-cni","socket":"/old"},{"type":"portmap"}]}"#;
        fs::write(&list, stale).expect("stale");
        assert!(install.run().expect("fix").config);
        assert_eq!(plugin_types(&list), ["ptp", "portmap", "ambient-cni"]);
        assert_eq!(
            read_json(&list).expect("json")["plugins"][2]["socket"],
            "/var/run/ambient/ztunnel-cni.sock"
        );
    }

    #[test]
    fn a_conf_becomes_a_conflist() {
        let (_dir, install) = setup();
        let conf = install.conf_dir.join("10-bridge.conf");
        fs::write(&conf, r#"{"cniVersion":"0.4.0","name":"br","type":"bridge","bridge":"cni0"}"#)
            .expect("conf");
        let done = install.run().expect("install");
        let list = install.conf_dir.join("10-bridge.conflist");
        assert_eq!(done.conflist, list);
        assert!(!conf.exists(), "the .conf is replaced");
        let v = read_json(&list).expect("json");
        assert_eq!((v["cniVersion"].as_str(), v["name"].as_str()), (Some("0.4.0"), Some("br")));
        assert_eq!(plugin_types(&list), ["bridge", "ambient-cni"]);
        assert_eq!(v["plugins"][0]["bridge"], "cni0");
        assert!(!install.run().expect("again").config);
    }

    #[test]
    fn errors_are_reported_not_panicked() {
        let (_dir, install) = setup();
        assert!(matches!(install.run(), Err(InstallError::NoNetwork(_))));
        fs::write(install.conf_dir.join("05-broken.conflist"), "{not json").expect("broken");
        assert!(matches!(install.run(), Err(InstallError::BadConfig { .. })));
        fs::write(install.conf_dir.join("05-broken.conflist"), r#"{"name":"x"}"#).expect("no plugins");
        let e = install.run().expect_err("no plugins");
        assert!(e.to_string().contains("plugins"), "{e}");
        let missing = Install { binary: PathBuf::from("/nonexistent/ambient-cni"), ..install };
        assert!(matches!(missing.run(), Err(InstallError::Io { .. })));
    }

    #[test]
    fn uninstall_removes_entry_and_binary() {
        let (_dir, install) = setup();
        let list = install.conf_dir.join("10-k8s.conflist");
        fs::write(&list, PTP).expect("conflist");
        install.run().expect("install");
        let removed = uninstall(&install.bin_dir, &install.conf_dir).expect("uninstall");
        assert_eq!(removed, Removed { binary: true, configs: vec![list.clone()] });
        assert_eq!(plugin_types(&list), ["ptp", "portmap"]);
        assert_eq!(uninstall(&install.bin_dir, &install.conf_dir).expect("again"), Removed::default());
    }
}
