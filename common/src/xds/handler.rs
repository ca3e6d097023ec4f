//! Typed handlers per type URL, and the type-erased layer that decodes raw resources for them.

use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;

/// One resource as received, already decoded into its prost type.
#[derive(Clone, Debug, PartialEq)]
pub struct XdsResource<T> {
    /// Resource name (a workload's uid, `namespace/hostname` for a service, ...).
    pub name: String,
    /// Opaque version chosen by the control plane.
    pub version: String,
    pub resource: T,
}

/// A change a handler must apply.
#[derive(Clone, Debug, PartialEq)]
pub enum XdsUpdate<T> {
    Update(XdsResource<T>),
    Remove(String),
}

impl<T> XdsUpdate<T> {
    pub fn name(&self) -> &str {
        match self {
            XdsUpdate::Update(r) => &r.name,
            XdsUpdate::Remove(name) => name,
        }
    }
}

/// A resource that was not applied, and why. Becomes part of a NACK's `error_detail`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    pub name: String,
    pub reason: String,
}

impl Rejection {
    pub fn new(name: impl Into<String>, reason: impl Into<String>) -> Self {
        Self { name: name.into(), reason: reason.into() }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.name, self.reason)
    }
}

/// Applies decoded resources of one type. Every update that is not returned as a rejection
/// must be in force when `handle` returns. A rejected update leaves the previous state of that
/// resource untouched, unless the handler documents a fail-safe form it holds instead (the
/// ztunnel state does this for Authorizations: what cannot be applied never widens access).
pub trait Handler<T>: Send + Sync + 'static {
    fn handle(&self, updates: Vec<XdsUpdate<T>>) -> Vec<Rejection>;

    /// Told, before `handle` runs for the same batch, about each resource of the batch that
    /// could not be decoded. It is rejected (NACKed) whatever the handler does; a handler may
    /// act on what it can still read of it. `handle` is then called even if nothing else in
    /// the batch decoded. Does nothing by default.
    fn undecodable(&self, _raw: &RawResource, _reason: &str) {}
}

/// A resource before decoding, as carried by a delta response or the local file.
#[derive(Clone, Debug)]
pub struct RawResource {
    pub name: String,
    pub version: String,
    pub body: Option<prost_types::Any>,
}

/// Type-erased handler: decodes raw resources for the typed handler behind it.
trait RawHandler: Send + Sync {
    fn handle(&self, resources: Vec<RawResource>, removed: Vec<String>) -> Vec<Rejection>;
}

struct Typed<T, H> {
    type_url: String,
    handler: H,
    _marker: PhantomData<fn() -> T>,
}

impl<T, H> RawHandler for Typed<T, H>
where
    T: prost::Message + Default + 'static,
    H: Handler<T>,
{
    fn handle(&self, resources: Vec<RawResource>, removed: Vec<String>) -> Vec<Rejection> {
        let mut rejected = Vec::new();
        let mut updates = Vec::with_capacity(resources.len() + removed.len());
        for raw in resources {
            match decode::<T>(&self.type_url, &raw) {
                Ok(resource) => updates.push(XdsUpdate::Update(XdsResource {
                    name: raw.name,
                    version: raw.version,
                    resource,
                })),
                Err(reason) => {
                    self.handler.undecodable(&raw, &reason);
                    rejected.push(Rejection::new(raw.name, reason));
                }
            }
        }
        updates.extend(removed.into_iter().map(XdsUpdate::Remove));
        if !updates.is_empty() || !rejected.is_empty() {
            rejected.extend(self.handler.handle(updates));
        }
        rejected
    }
}

fn decode<T: prost::Message + Default>(type_url: &str, raw: &RawResource) -> Result<T, String> {
    let Some(any) = &raw.body else {
        return Err("resource has no body".to_string());
    };
    if any.type_url != type_url {
        return Err(format!("body has type {:?}, expected {type_url:?}", any.type_url));
    }
    T::decode(any.value.as_slice()).map_err(|e| format!("cannot decode {type_url}: {e}"))
}

/// The handlers registered per type URL. Cheap to clone; shared by the xDS client and the
/// local file source.
#[derive(Clone, Default)]
pub struct Handlers {
    by_type: BTreeMap<String, Arc<dyn RawHandler>>,
}

impl fmt::Debug for Handlers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.by_type.keys()).finish()
    }
}

impl Handlers {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers the handler for resources of `type_url`, decoded as `T`.
    pub fn add<T, H>(&mut self, type_url: &str, handler: H) -> &mut Self
    where
        T: prost::Message + Default + 'static,
        H: Handler<T>,
    {
        let typed = Typed::<T, H> { type_url: type_url.to_string(), handler, _marker: PhantomData };
        self.by_type.insert(type_url.to_string(), Arc::new(typed));
        self
    }

    /// The type URLs subscribed to.
    pub fn type_urls(&self) -> impl Iterator<Item = &str> {
        self.by_type.keys().map(String::as_str)
    }

    pub fn is_empty(&self) -> bool {
        self.by_type.is_empty()
    }

    /// Decodes and applies one batch. `None` when no handler exists for `type_url`.
    pub fn apply(
        &self,
        type_url: &str,
        resources: Vec<RawResource>,
        removed: Vec<String>,
    ) -> Option<Vec<Rejection>> {
        let handler = self.by_type.get(type_url)?;
        Some(handler.handle(resources, removed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<String>>);

    impl Handler<proto::workload::Address> for Arc<Recorder> {
        fn handle(&self, updates: Vec<XdsUpdate<proto::workload::Address>>) -> Vec<Rejection> {
            let mut seen = self.0.lock().expect("test lock");
            seen.extend(updates.iter().map(|u| u.name().to_string()));
            vec![]
        }
    }

    #[test]
    fn undecodable_and_mistyped_resources_are_rejected_others_applied() {
        let recorder = Arc::new(Recorder::default());
        let mut handlers = Handlers::new();
        handlers.add::<proto::workload::Address, _>(proto::ADDRESS_TYPE_URL, recorder.clone());
        let value = prost::Message::encode_to_vec(&proto::workload::Address::default());
        let good = prost_types::Any { type_url: proto::ADDRESS_TYPE_URL.into(), value };
        let garbage =
            prost_types::Any { type_url: proto::ADDRESS_TYPE_URL.into(), value: vec![0xff, 0xff, 0xff] };
        let mistyped = prost_types::Any { type_url: "type.googleapis.com/x.Y".into(), value: vec![] };
        let raw = |name: &str, body| RawResource { name: name.into(), version: "1".into(), body };
        let rejected = handlers
            .apply(
                proto::ADDRESS_TYPE_URL,
                vec![
                    raw("good", Some(good)),
                    raw("garbage", Some(garbage)),
                    raw("mistyped", Some(mistyped)),
                    raw("empty", None),
                ],
                vec!["gone".into()],
            )
            .expect("handler registered");
        let names: Vec<_> = rejected.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["garbage", "mistyped", "empty"]);
        assert!(rejected[0].reason.contains("cannot decode"), "{}", rejected[0]);
        assert_eq!(*recorder.0.lock().expect("test lock"), ["good", "gone"]);
        assert!(handlers.apply("type.googleapis.com/unknown", vec![], vec![]).is_none());
    }

    /// Records what `handle` and `undecodable` are told, in order.
    #[derive(Default)]
    struct Told(Mutex<Vec<String>>);

    impl Handler<proto::workload::Address> for Arc<Told> {
        fn handle(&self, updates: Vec<XdsUpdate<proto::workload::Address>>) -> Vec<Rejection> {
            self.0.lock().expect("test lock").push(format!("handle {}", updates.len()));
            vec![]
        }

        fn undecodable(&self, raw: &RawResource, reason: &str) {
            assert!(reason.contains("cannot decode"), "{reason}");
            self.0.lock().expect("test lock").push(format!("undecodable {}", raw.name));
        }
    }

    #[test]
    fn the_handler_is_told_of_undecodable_resources_and_still_handles_the_batch() {
        let told = Arc::new(Told::default());
        let mut handlers = Handlers::new();
        handlers.add::<proto::workload::Address, _>(proto::ADDRESS_TYPE_URL, told.clone());
        let garbage =
            prost_types::Any { type_url: proto::ADDRESS_TYPE_URL.into(), value: vec![0xff, 0xff, 0xff] };
        let raw = RawResource { name: "garbage".into(), version: "1".into(), body: Some(garbage) };
        let rejected = handlers.apply(proto::ADDRESS_TYPE_URL, vec![raw], vec![]).expect("registered");
        assert_eq!(rejected.len(), 1);
        assert_eq!(*told.0.lock().expect("test lock"), ["undecodable garbage", "handle 0"]);
        // An empty batch with nothing rejected is not handed on.
        assert_eq!(handlers.apply(proto::ADDRESS_TYPE_URL, vec![], vec![]), Some(vec![]));
        assert_eq!(told.0.lock().expect("test lock").len(), 2);
    }
}
