//! The writer's side of the state: what each resource put into the view, and who claims each
//! index key, so that a push changes only the index entries its resources touch.
//!
//! The view ([`Snapshot`]) is made of persistent maps: the model edits its own copy in place,
//! which shares every untouched part with the snapshot readers hold, and publishing is a
//! clone of a few map roots. Applying one changed workload costs the lookups of its own keys
//! (uid, addresses, node, the services it backs), whatever the size of the mesh.
//!
//! Several resources may claim the same key (two workloads with one address while a pod IP is
//! reused, two services with one VIP). The view then holds the claim of the greatest resource
//! name, as if every resource had been applied at once in name order; when that one goes, the
//! next claim takes its place. The result therefore does not depend on the order of pushes.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Arc;

use super::{Endpoint, Policy, Scope, Service, Snapshot, Workload};

/// What one address resource put into the view.
#[derive(Clone, Debug)]
pub(super) enum Entry {
    Workload(Arc<Workload>),
    Service(Arc<Service>),
}

/// For each key, every resource (by name) that claims it and with what.
#[derive(Debug)]
struct Claims<K, V> {
    by_key: HashMap<K, BTreeMap<String, V>>,
}

impl<K, V> Default for Claims<K, V> {
    fn default() -> Self {
        Self { by_key: HashMap::new() }
    }
}

impl<K: Hash + Eq + Clone, V: Clone> Claims<K, V> {
    /// `name` claims `key` with `value`; returns what is now in force for `key`.
    fn claim(&mut self, key: &K, name: &str, value: V) -> V {
        let claims = self.by_key.entry(key.clone()).or_default();
        claims.insert(name.to_string(), value);
        Self::winner(claims)
    }

    /// `name` no longer claims `key`; returns what is now in force for it, if anything.
    fn release(&mut self, key: &K, name: &str) -> Option<V> {
        let claims = self.by_key.get_mut(key)?;
        claims.remove(name);
        if claims.is_empty() {
            self.by_key.remove(key);
            return None;
        }
        Some(Self::winner(claims))
    }

    fn winner(claims: &BTreeMap<String, V>) -> V {
        match claims.last_key_value() {
            Some((_, v)) => v.clone(),
            None => unreachable!("a claimed key has at least one claim"),
        }
    }
}

/// Sets `key` in a persistent index to `value`, or removes it.
fn put<K: Hash + Eq + Clone, V: Clone>(map: &mut imbl::HashMap<K, V>, key: K, value: Option<V>) {
    match value {
        Some(v) => {
            map.insert(key, v);
        }
        None => {
            map.remove(&key);
        }
    }
}

/// The writer's model. Only the xDS handlers (through [`super::State`]) touch it, under a lock.
#[derive(Debug, Default)]
pub(super) struct Model {
    /// The view being edited; published by cloning it.
    pub view: Snapshot,
    /// Address resources in force, by resource name.
    addresses: HashMap<String, Entry>,
    /// Authorizations in force (accepted, or held fail-safe), by resource name.
    policies: HashMap<String, Arc<Policy>>,
    /// Resource name -> policy key it is held fail-safe under.
    failsafe: HashMap<String, String>,

    uids: Claims<String, Arc<Workload>>,
    workload_ips: Claims<(String, IpAddr), Arc<Workload>>,
    service_keys: Claims<String, Arc<Service>>,
    vips: Claims<(String, IpAddr), Arc<Service>>,
    policy_keys: Claims<String, Arc<Policy>>,
    failsafe_keys: Claims<String, String>,
    /// Service key -> its endpoints by workload resource name.
    endpoints: HashMap<String, BTreeMap<String, Endpoint>>,
    /// The policies in force with global scope, and with namespace scope per namespace, by key.
    global: BTreeMap<String, Arc<Policy>>,
    namespaced: HashMap<String, BTreeMap<String, Arc<Policy>>>,

    /// What [`Model::flush`] must rebuild: endpoint lists, policy lists.
    dirty_endpoints: BTreeSet<String>,
    dirty_global: bool,
    dirty_namespaces: BTreeSet<String>,
}

impl Model {
    pub fn new(network: &str) -> Self {
        Self { view: Snapshot { network: network.into(), ..Default::default() }, ..Default::default() }
    }

    /// Puts `entry` in force for the address resource `name` (`None` removes it).
    pub fn set_address(&mut self, name: &str, entry: Option<Entry>) {
        match self.addresses.remove(name) {
            Some(Entry::Workload(w)) => self.unindex_workload(name, &w),
            Some(Entry::Service(s)) => self.unindex_service(name, &s),
            None => {}
        }
        match &entry {
            Some(Entry::Workload(w)) => self.index_workload(name, w),
            Some(Entry::Service(s)) => self.index_service(name, s),
            None => {}
        }
        if let Some(entry) = entry {
            self.addresses.insert(name.to_string(), entry);
        }
    }

    /// Puts `policy` in force for the Authorization resource `name` (`None` removes it);
    /// `failsafe` says why, when it is a rejected resource's fail-safe stand-in.
    pub fn set_policy(&mut self, name: &str, policy: Option<Arc<Policy>>, failsafe: Option<String>) {
        if let Some(old) = self.policies.remove(name) {
            let key = old.key();
            let now = self.policy_keys.release(&key, name);
            self.put_policy(key, now);
        }
        if let Some(key) = self.failsafe.remove(name) {
            let now = self.failsafe_keys.release(&key, name);
            Self::put_ordered(&mut self.view.failsafe_policies, key, now);
        }
        let Some(policy) = policy else { return };
        let key = policy.key();
        if let Some(reason) = failsafe {
            let now = self.failsafe_keys.claim(&key, name, reason);
            self.view.failsafe_policies.insert(key.clone(), now);
            self.failsafe.insert(name.to_string(), key.clone());
        }
        let now = self.policy_keys.claim(&key, name, policy.clone());
        self.put_policy(key, Some(now));
        self.policies.insert(name.to_string(), policy);
    }

    /// Rebuilds the lists a batch changed (each once, however many of its resources touched
    /// it). Call before publishing.
    pub fn flush(&mut self) {
        for key in std::mem::take(&mut self.dirty_endpoints) {
            match self.endpoints.get(&key) {
                Some(by_name) => {
                    let list: Arc<[Endpoint]> = by_name.values().cloned().collect();
                    self.view.endpoints.insert(key, list);
                }
                None => {
                    self.view.endpoints.remove(&key);
                }
            }
        }
        if std::mem::take(&mut self.dirty_global) {
            self.view.global_policies = self.global.values().cloned().collect();
        }
        for ns in std::mem::take(&mut self.dirty_namespaces) {
            let list = self.namespaced.get(&ns).map(|by_key| by_key.values().cloned().collect());
            put(&mut self.view.namespace_policies, ns, list);
        }
    }

    fn index_workload(&mut self, name: &str, w: &Arc<Workload>) {
        let now = self.uids.claim(&w.uid, name, w.clone());
        self.put_workload(w.uid.clone(), Some(now));
        for ip in &w.addresses {
            let key = (w.network.clone(), *ip);
            let now = self.workload_ips.claim(&key, name, w.clone());
            self.put_workload_ip(key, Some(now));
        }
        for (service, ports) in &w.services {
            let endpoint = Endpoint { workload: w.clone(), ports: ports.clone() };
            self.endpoints.entry(service.clone()).or_default().insert(name.to_string(), endpoint);
            self.dirty_endpoints.insert(service.clone());
        }
    }

    fn unindex_workload(&mut self, name: &str, w: &Arc<Workload>) {
        let now = self.uids.release(&w.uid, name);
        self.put_workload(w.uid.clone(), now);
        for ip in &w.addresses {
            let key = (w.network.clone(), *ip);
            let now = self.workload_ips.release(&key, name);
            self.put_workload_ip(key, now);
        }
        for service in w.services.keys() {
            if let Some(by_name) = self.endpoints.get_mut(service) {
                by_name.remove(name);
                if by_name.is_empty() {
                    self.endpoints.remove(service);
                }
            }
            self.dirty_endpoints.insert(service.clone());
        }
    }

    fn index_service(&mut self, name: &str, s: &Arc<Service>) {
        let now = self.service_keys.claim(&s.key().to_string(), name, s.clone());
        self.put_host(s.key(), Some(&now));
        self.view.services.insert(s.key().to_string(), now);
        for vip in &s.vips {
            let now = self.vips.claim(vip, name, s.clone());
            self.put_vip(vip.clone(), Some(now));
        }
    }

    fn unindex_service(&mut self, name: &str, s: &Arc<Service>) {
        let key = s.key().to_string();
        let now = self.service_keys.release(&key, name);
        self.put_host(&key, now.as_ref());
        Self::put_ordered(&mut self.view.services, key, now);
        for vip in &s.vips {
            let now = self.vips.release(vip, name);
            self.put_vip(vip.clone(), now);
        }
    }

    /// Keeps the by-hostname index in step with the service in force for `key`: the view's
    /// current one goes, `now` comes (call before the view's `services` changes).
    fn put_host(&mut self, key: &str, now: Option<&Arc<Service>>) {
        let view = &mut self.view;
        if let Some(before) = view.services.get(key).cloned() {
            let host = before.hostname.to_ascii_lowercase();
            if let Some(by_key) = view.services_by_host.get_mut(&host) {
                by_key.remove(key);
                if by_key.is_empty() {
                    view.services_by_host.remove(&host);
                }
            }
        }
        if let Some(now) = now {
            let host = now.hostname.to_ascii_lowercase();
            view.services_by_host.entry(host).or_default().insert(key.to_string(), now.clone());
        }
    }

    /// The workload now in force for `uid`, kept in the by-node index too.
    fn put_workload(&mut self, uid: String, now: Option<Arc<Workload>>) {
        let view = &mut self.view;
        let before = view.workloads.get(&uid).cloned();
        if let Some(before) = &before {
            if now.as_ref().is_some_and(|now| Arc::ptr_eq(now, before)) {
                return;
            }
            if let Some(on_node) = view.workloads_by_node.get_mut(&before.node) {
                on_node.remove(&uid);
                if on_node.is_empty() {
                    view.workloads_by_node.remove(&before.node);
                }
            }
        }
        if let Some(now) = &now {
            view.workloads_by_node.entry(now.node.clone()).or_default().insert(uid.clone(), now.clone());
        }
        Self::put_ordered(&mut view.workloads, uid, now);
    }

    fn put_workload_ip(&mut self, key: (String, IpAddr), now: Option<Arc<Workload>>) {
        if key.0 == *self.view.network {
            put(&mut self.view.local_workloads, key.1, now.clone());
        }
        put(&mut self.view.workloads_by_ip, key, now);
    }

    fn put_vip(&mut self, key: (String, IpAddr), now: Option<Arc<Service>>) {
        if key.0 == *self.view.network {
            put(&mut self.view.local_services, key.1, now.clone());
        }
        put(&mut self.view.services_by_vip, key, now);
    }

    /// The policy now in force for `key`, kept in its scope's list too.
    fn put_policy(&mut self, key: String, now: Option<Arc<Policy>>) {
        if let Some(before) = self.view.policies.get(&key).cloned() {
            match before.scope {
                Scope::Global => {
                    self.global.remove(&key);
                    self.dirty_global = true;
                }
                Scope::Namespace => {
                    if let Some(by_key) = self.namespaced.get_mut(&before.namespace) {
                        by_key.remove(&key);
                        if by_key.is_empty() {
                            self.namespaced.remove(&before.namespace);
                        }
                    }
                    self.dirty_namespaces.insert(before.namespace.clone());
                }
                Scope::WorkloadSelector => {}
            }
        }
        if let Some(now) = &now {
            match now.scope {
                Scope::Global => {
                    self.global.insert(key.clone(), now.clone());
                    self.dirty_global = true;
                }
                Scope::Namespace => {
                    let ns = self.namespaced.entry(now.namespace.clone()).or_default();
                    ns.insert(key.clone(), now.clone());
                    self.dirty_namespaces.insert(now.namespace.clone());
                }
                Scope::WorkloadSelector => {}
            }
        }
        Self::put_ordered(&mut self.view.policies, key, now);
    }

    fn put_ordered<V: Clone>(map: &mut imbl::OrdMap<String, V>, key: String, value: Option<V>) {
        match value {
            Some(v) => {
                map.insert(key, v);
            }
            None => {
                map.remove(&key);
            }
        }
    }
}
