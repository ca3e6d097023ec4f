//! A plain name -> resource store that validates on receipt: the simplest [`Handler`].
//!
//! Used where a component only needs the resources as received (the local demo's admin view,
//! tests); components that need indexes build their own handler.

use std::collections::BTreeMap;
use std::sync::{Arc, PoisonError, RwLock};

use tokio::sync::watch;

use super::handler::{Handler, Rejection, XdsResource, XdsUpdate};

type Validator<T> = fn(&str, &T) -> Result<(), String>;

/// Resources of one type by name, each with the version it arrived with.
pub struct ResourceStore<T> {
    items: RwLock<BTreeMap<String, XdsResource<T>>>,
    validate: Validator<T>,
    changed: watch::Sender<u64>,
}

impl<T> std::fmt::Debug for ResourceStore<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let len = self.items.read().unwrap_or_else(PoisonError::into_inner).len();
        f.debug_struct("ResourceStore").field("len", &len).finish()
    }
}

impl<T: Clone + Send + Sync + 'static> ResourceStore<T> {
    pub fn new(validate: Validator<T>) -> Arc<Self> {
        Arc::new(Self { items: RwLock::default(), validate, changed: watch::channel(0).0 })
    }

    pub fn get(&self, name: &str) -> Option<T> {
        self.read().get(name).map(|r| r.resource.clone())
    }

    pub fn version(&self, name: &str) -> Option<String> {
        self.read().get(name).map(|r| r.version.clone())
    }

    pub fn len(&self) -> usize {
        self.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn names(&self) -> Vec<String> {
        self.read().keys().cloned().collect()
    }

    /// Every resource held, by name (a copy, for consumers that build their own indexes).
    pub fn entries(&self) -> Vec<(String, T)> {
        self.read().iter().map(|(k, v)| (k.clone(), v.resource.clone())).collect()
    }

    /// Name -> version of everything held.
    pub fn versions(&self) -> BTreeMap<String, String> {
        self.read().iter().map(|(k, v)| (k.clone(), v.version.clone())).collect()
    }

    /// A receiver that changes after every applied batch.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Waits until `pred` holds for the store (checked after every change).
    pub async fn wait_for(&self, pred: impl Fn(&Self) -> bool) {
        let mut rx = self.subscribe();
        while !pred(self) {
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// Applies updates its owner has already validated (and converted for its own use), so
    /// that each resource is checked once.
    pub fn apply_accepted(&self, updates: Vec<XdsUpdate<T>>) {
        {
            let mut items = self.items.write().unwrap_or_else(PoisonError::into_inner);
            for update in updates {
                match update {
                    XdsUpdate::Update(r) => {
                        items.insert(r.name.clone(), r);
                    }
                    XdsUpdate::Remove(name) => {
                        items.remove(&name);
                    }
                }
            }
        }
        self.changed.send_modify(|n| *n += 1);
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, XdsResource<T>>> {
        self.items.read().unwrap_or_else(PoisonError::into_inner)
    }
}

impl<T: Clone + Send + Sync + 'static> Handler<T> for Arc<ResourceStore<T>> {
    fn handle(&self, updates: Vec<XdsUpdate<T>>) -> Vec<Rejection> {
        let mut rejected = Vec::new();
        {
            let mut items = self.items.write().unwrap_or_else(PoisonError::into_inner);
            for update in updates {
                match update {
                    XdsUpdate::Update(r) => match (self.validate)(&r.name, &r.resource) {
                        Ok(()) => {
                            items.insert(r.name.clone(), r);
                        }
                        Err(reason) => rejected.push(Rejection::new(r.name, reason)),
                    },
                    XdsUpdate::Remove(name) => {
                        items.remove(&name);
                    }
                }
            }
        }
        self.changed.send_modify(|n| *n += 1);
        rejected
    }
}
