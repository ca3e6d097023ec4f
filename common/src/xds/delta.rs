//! The server side of delta ADS, shared by every server we run (the controller, and the
//! in-repo control plane of the tests and demo): a resource as served, and the difference
//! between what a client holds and what is served now.

use std::collections::{BTreeMap, HashMap};

use proto::discovery::Resource;

/// One served resource: its body and the version clients are told (a hash of the body).
#[derive(Clone, Debug)]
pub struct Versioned {
    pub version: String,
    pub body: prost_types::Any,
}

impl Versioned {
    pub fn new(body: prost_types::Any) -> Self {
        Self { version: super::local::version_of(&body), body }
    }
}

/// What a client holding `held` (name → version) must be sent so that it holds `current`: the
/// resources it lacks or holds at another version, and the names to remove. Updates `held` to
/// what it will hold once it applies them.
pub fn delta(
    current: &BTreeMap<String, Versioned>,
    held: &mut HashMap<String, String>,
) -> (Vec<Resource>, Vec<String>) {
    let mut resources = Vec::new();
    for (name, r) in current {
        if held.get(name) != Some(&r.version) {
            resources.push(Resource {
                name: name.clone(),
                version: r.version.clone(),
                resource: Some(r.body.clone()),
                ..Default::default()
            });
            held.insert(name.clone(), r.version.clone());
        }
    }
    let removed: Vec<String> = held.keys().filter(|n| !current.contains_key(*n)).cloned().collect();
    for name in &removed {
        held.remove(name);
    }
    (resources, removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn any(v: u8) -> prost_types::Any {
        prost_types::Any { type_url: "t".into(), value: vec![v] }
    }

    #[test]
    fn only_what_changed_is_sent_and_what_is_gone_is_removed() {
        let mut current = BTreeMap::from([("a".to_string(), Versioned::new(any(1)))]);
        let mut held = HashMap::new();
        let (sent, removed) = delta(&current, &mut held);
        assert_eq!((sent.len(), removed.len()), (1, 0));
        assert_eq!(delta(&current, &mut held), (vec![], vec![]), "nothing new, nothing sent");
        current.insert("a".into(), Versioned::new(any(2)));
        current.insert("b".into(), Versioned::new(any(3)));
        let (sent, _) = delta(&current, &mut held);
        assert_eq!(sent.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        current.remove("a");
        assert_eq!(delta(&current, &mut held), (vec![], vec!["a".to_string()]));
        assert!(!held.contains_key("a"));
    }
}
