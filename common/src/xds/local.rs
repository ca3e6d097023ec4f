//! The local config source: the same typed resources as xDS, read from a YAML file (or a
//! directory of them) and re-read when it changes. What a lone VM/ECS host or the local demo
//! runs on.
//!
//! The files hold the resources users already write (Kubernetes, Gateway API and Istio kinds,
//! multi-document YAML), translated by [`crate::translate`]; an object that cannot be applied is
//! refused on its own (logged, counted, shown by [`ConfigObjects`]) and its last accepted
//! version stays in force. Our internal mirror of the wire types ([`LocalConfig`]) is for tests
//! that build exact resources; a file in it is refused.
//!
//! Each (re)load is diffed against what was applied: changed resources are handed to the
//! handlers as updates, vanished ones as removals. A file that does not parse changes nothing;
//! a resource a handler rejects keeps its previous state. Both are logged and counted.

pub mod routes;
pub mod schema;

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::time::Duration;

use std::sync::{Arc, PoisonError, RwLock};

use tracing::{debug, info, warn};

use crate::translate::{ObjectStatus, Translation, Translator, Unreadable};

pub use schema::{EncodedResource, LocalConfig, SchemaError};

use super::handler::{Handlers, RawResource};
use super::metrics::XdsMetrics;
use crate::readiness::{BlockReady, Ready};

/// How often the file is checked for changes.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error("cannot read config file {path:?}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error(
        "config file {path:?} is in our internal wire schema (workloads:, services:, ...), which is not a config format: write Kubernetes, Gateway API and Istio objects (see deploy/local-mesh.yaml)"
    )]
    Internal { path: PathBuf },
}

/// Version string of a resource body: a hash of its bytes, stable within a process.
pub fn version_of(body: &prost_types::Any) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    body.value.hash(&mut h);
    format!("{:016x}", h.finish())
}

/// The status of every object of the last load, for the config dump.
#[derive(Clone, Debug, Default)]
pub struct ConfigObjects(Arc<RwLock<ObjectsSnapshot>>);

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ObjectsSnapshot {
    pub objects: Vec<ObjectStatus>,
    pub unreadable: Vec<Unreadable>,
}

impl ConfigObjects {
    pub fn snapshot(&self) -> ObjectsSnapshot {
        self.0.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    fn set(&self, t: &Translation) {
        *self.0.write().unwrap_or_else(PoisonError::into_inner) =
            ObjectsSnapshot { objects: t.statuses.clone(), unreadable: t.unreadable.clone() };
    }
}

/// The YAML files a path names: the file itself, or a directory's `*.yaml`/`*.yml` files in
/// name order (not recursive). Each comes with its name, for messages.
fn read_texts(path: &std::path::Path) -> Result<Vec<(String, String)>, LocalError> {
    let err = |source| LocalError::Read { path: path.to_path_buf(), source };
    if !path.is_dir() {
        let text = std::fs::read_to_string(path).map_err(err)?;
        return Ok(vec![(path.display().to_string(), text)]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(err)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|f| {
            let text =
                std::fs::read_to_string(&f).map_err(|source| LocalError::Read { path: f.clone(), source })?;
            let name = f.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            Ok((name, text))
        })
        .collect()
}

/// The top-level keys of our internal schema ([`LocalConfig`]).
const INTERNAL_KEYS: &[&str] = &["workloads:", "services:", "policies:", "routes:", "waypointPolicies:"];

/// Whether texts hold Kubernetes-style objects rather than our internal schema: a directory
/// always does; a file does unless its first top-level key is one of the internal schema's.
pub fn is_objects(texts: &[(String, String)]) -> bool {
    texts.len() != 1
        || texts.iter().any(|(_, t)| {
            !t.lines()
                .find(|l| !l.trim().is_empty() && !l.starts_with([' ', '\t', '#', '-']))
                .is_some_and(|l| INTERNAL_KEYS.iter().any(|k| l.starts_with(k)))
        })
}

/// Feeds handlers from a YAML file.
pub struct LocalSource {
    path: PathBuf,
    handlers: Handlers,
    metrics: XdsMetrics,
    poll: Duration,
    /// type URL -> name -> version applied.
    applied: HashMap<String, HashMap<String, String>>,
    /// Last file contents seen, to skip unchanged reloads cheaply.
    last_text: Option<Vec<(String, String)>>,
    /// A changed read waiting for the next poll to confirm it.
    settling: Option<Vec<(String, String)>>,
    initial: Option<BlockReady>,
    translator: Translator,
    objects: ConfigObjects,
}

impl LocalSource {
    pub fn new(path: impl Into<PathBuf>, handlers: Handlers, ready: &Ready, metrics: XdsMetrics) -> Self {
        let path = path.into();
        let initial = Some(ready.register(format!("local config {}", path.display())));
        Self {
            path,
            handlers,
            metrics,
            poll: DEFAULT_POLL_INTERVAL,
            applied: HashMap::new(),
            last_text: None,
            settling: None,
            initial,
            translator: Translator::default(),
            objects: ConfigObjects::default(),
        }
    }

    /// Reports each load's object statuses into `objects`.
    pub fn with_objects(mut self, objects: ConfigObjects) -> Self {
        self.objects = objects;
        self
    }

    pub fn with_poll_interval(mut self, poll: Duration) -> Self {
        self.poll = poll;
        self
    }

    /// Loads once (readiness is released after the first successful load).
    pub fn load(&mut self) -> Result<(), LocalError> {
        let path = self.path.clone();
        let texts = read_texts(&path)?;
        if self.last_text.as_ref() == Some(&texts) {
            self.settling = None;
            return Ok(());
        }
        // A change applies once two reads a poll apart agree, so that a file caught half
        // written (truncated: policies missing, a DENY without its rules) is never applied.
        // The first load applies at once.
        if self.initial.is_none() && self.settling.as_ref() != Some(&texts) {
            self.settling = Some(texts);
            return Ok(());
        }
        if !is_objects(&texts) {
            // Stays settled: the next poll reports the same error (logged once), not a new read.
            return Err(LocalError::Internal { path });
        }
        self.settling = None;
        let t = self.translator.translate_yaml(texts.iter().map(|(n, t)| (n.as_str(), t.as_str())));
        self.report(&t);
        self.apply(t.resources);
        self.last_text = Some(texts);
        if let Some(block) = self.initial.take() {
            block.done();
        }
        Ok(())
    }

    /// Logs and counts every object a load refused, and publishes the statuses.
    fn report(&self, t: &Translation) {
        // Objects kept because the read had unreadable documents (no origin) were not refused:
        // the unreadable documents are reported below.
        for s in t.statuses.iter().filter(|s| !s.accepted && !s.origin.is_empty()) {
            let fault = s.fault.as_ref().map(ToString::to_string).unwrap_or_default();
            warn!(object = %s.object, origin = %s.origin, in_force = ?s.in_force, %fault, "config object refused");
            self.metrics.rejected_objects.get_or_create(&XdsMetrics::kind_label(&s.object.kind)).inc();
        }
        for u in &t.unreadable {
            warn!(origin = %u.origin, fault = %u.fault, "config document unreadable");
            self.metrics.rejected_objects.get_or_create(&XdsMetrics::kind_label("")).inc();
        }
        for s in t.statuses.iter().filter(|s| !s.notes.is_empty()) {
            info!(object = %s.object, notes = ?s.notes, "config object applied differently from what was written");
        }
        info!(objects = t.statuses.len(), refused = t.refused_count(), path = %self.path.display(), "read local config objects");
        self.objects.set(t);
    }

    /// Loads now, then re-loads whenever the file changes. Runs forever.
    pub async fn run(mut self) {
        let mut interval = tokio::time::interval(self.poll);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_error: Option<String> = None;
        loop {
            interval.tick().await;
            match self.load() {
                Ok(()) => last_error = None,
                Err(e) => {
                    let msg = e.to_string();
                    // Log a persistent error once, not every poll.
                    if last_error.as_deref() != Some(msg.as_str()) {
                        warn!(error = %msg, "local config not applied, keeping the previous one");
                        for url in self.handlers.type_urls() {
                            self.metrics.nacks.get_or_create(&XdsMetrics::type_label(url)).inc();
                        }
                        last_error = Some(msg);
                    }
                }
            }
        }
    }

    fn apply(&mut self, resources: Vec<EncodedResource>) {
        // Every subscribed type is visited, so removals reach types the file no longer mentions.
        let mut by_type: BTreeMap<String, Vec<EncodedResource>> =
            self.handlers.type_urls().map(|url| (url.to_string(), Vec::new())).collect();
        for r in resources {
            by_type.entry(r.type_url.to_string()).or_default().push(r);
        }
        for (type_url, resources) in by_type {
            let label = XdsMetrics::type_label(&type_url);
            let applied = self.applied.entry(type_url.clone()).or_default();
            let mut seen = std::collections::HashSet::new();
            let mut updates = Vec::new();
            for r in resources {
                let version = version_of(&r.body);
                seen.insert(r.name.clone());
                if applied.get(&r.name) != Some(&version) {
                    updates.push(RawResource { name: r.name, version, body: Some(r.body) });
                }
            }
            let removed: Vec<String> = applied.keys().filter(|n| !seen.contains(*n)).cloned().collect();
            if updates.is_empty() && removed.is_empty() {
                continue;
            }
            let versions: Vec<(String, String)> =
                updates.iter().map(|u| (u.name.clone(), u.version.clone())).collect();
            let count = versions.len() + removed.len();
            let Some(rejections) = self.handlers.apply(&type_url, updates, removed.clone()) else {
                // A file shared by ztunnel and waypoints holds types only one of them reads.
                debug!(%type_url, "local config has resources of a type nothing here consumes");
                continue;
            };
            self.metrics.messages.get_or_create(&label).inc();
            self.metrics.resources.get_or_create(&label).inc_by(count as u64);
            let rejected: std::collections::HashSet<&str> =
                rejections.iter().map(|r| r.name.as_str()).collect();
            for (name, version) in versions {
                if !rejected.contains(name.as_str()) {
                    applied.insert(name, version);
                }
            }
            for name in &removed {
                applied.remove(name);
            }
            if !rejections.is_empty() {
                self.metrics.nacks.get_or_create(&label).inc();
                self.metrics.rejected_resources.get_or_create(&label).inc_by(rejections.len() as u64);
                for r in &rejections {
                    warn!(%type_url, resource = %r.name, reason = %r.reason, "rejected local resource, keeping the previous version (a rejected Authorization is held fail-safe)");
                }
            }
            info!(%type_url, changed = count, rejected = rejections.len(), path = %self.path.display(), "applied local config");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::is_objects;

    #[test]
    fn objects_unless_the_first_key_is_the_internal_schemas() {
        let one = |t: &str| is_objects(&[("f".to_string(), t.to_string())]);
        assert!(one("apiVersion: v1\nkind: Pod\n"));
        assert!(one("# comment\n---\nmetadata: {name: a}\napiVersion: v1\nkind: Pod\n"));
        assert!(one("kind: Service\n"));
        assert!(!one("# demo\nworkloads:\n  - name: a\n"));
        assert!(!one("\nservices: []\npolicies: []\n"));
        let two = [("a".to_string(), "workloads: []".to_string()), ("b".to_string(), String::new())];
        assert!(is_objects(&two), "a directory always holds objects");
    }
}
