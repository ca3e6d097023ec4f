//! Fuzzes the local config source: YAML text into the schema, the schema into wire resources,
//! and those resources through the state's handlers, as `LocalSource` does on each reload.
#![no_main]

use ambient_fuzz::{Fed, exercise_snapshot, fresh_state, raw};
use common::state::Policy;
use common::xds::{LocalConfig, validate};
use libfuzzer_sys::fuzz_target;
use prost::Message;
use proto::security::Authorization;
use proto::workload::{Address, address};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(config) = LocalConfig::from_yaml(text) else { return };
    let Ok(resources) = config.to_resources() else { return };

    let (state, handlers) = fresh_state();
    let mut fed = Fed::default();
    for r in resources {
        assert_eq!(r.body.type_url, r.type_url);
        // What the schema encodes must decode again as its own type.
        match r.type_url {
            proto::ADDRESS_TYPE_URL => match Address::decode(r.body.value.as_slice()) {
                Ok(Address { r#type: Some(address::Type::Workload(w)) }) => fed.workloads.push(w.uid),
                Ok(Address { r#type: Some(address::Type::Service(s)) }) => {
                    fed.services.push((s.namespace, s.hostname))
                }
                other => panic!("{} encodes an Address that reads back as {other:?}", r.name),
            },
            proto::AUTHORIZATION_TYPE_URL => {
                let a = Authorization::decode(r.body.value.as_slice())
                    .unwrap_or_else(|e| panic!("{} encodes an undecodable Authorization: {e}", r.name));
                if let (Ok(()), Ok(p)) = (validate::authorization(&r.name, &a), Policy::from_proto(&a)) {
                    fed.accepted_policies.push(p);
                }
            }
            _ => {}
        }
        // Waypoint resources have no handler in the ztunnel state; `apply` answers `None`.
        let _ = handlers.apply(r.type_url, vec![raw(&r.name, r.type_url, &r.body.value)], vec![]);
    }
    exercise_snapshot(&state.snapshot(), &fed);
});
