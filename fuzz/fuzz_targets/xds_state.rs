//! Fuzzes the ztunnel state fed by a sequence of xDS updates and removals (Addresses and
//! Authorizations that refer to each other: services and their endpoints, waypoints, policies
//! named by workloads), then runs the queries proxies make and checks that what a policy query
//! returns is either an accepted policy or a fail-safe stand-in.
//! Input: records (see `ambient_fuzz::Records`); kind % 4 is 0 Address update, 1 Authorization
//! update, 2 Address removal, 3 Authorization removal.
#![no_main]

use ambient_fuzz::{Fed, Records, exercise_snapshot, fresh_state, raw};
use common::state::Policy;
use common::xds::validate;
use libfuzzer_sys::fuzz_target;
use prost::Message;
use proto::security::Authorization;
use proto::workload::{Address, address};

fuzz_target!(|data: &[u8]| {
    let (state, handlers) = fresh_state();
    let mut fed = Fed::default();
    for rec in Records::new(data).take(64) {
        let (type_url, name, removal) = match rec.kind % 4 {
            0 | 2 => {
                let decoded = Address::decode(rec.body).ok();
                let implied = match decoded.as_ref().and_then(|a| a.r#type.as_ref()) {
                    Some(address::Type::Workload(w)) => {
                        fed.workloads.push(w.uid.clone());
                        w.uid.clone()
                    }
                    Some(address::Type::Service(s)) => {
                        fed.services.push((s.namespace.clone(), s.hostname.clone()));
                        format!("{}/{}", s.namespace, s.hostname)
                    }
                    None => String::new(),
                };
                (proto::ADDRESS_TYPE_URL, rec.name.unwrap_or(implied), rec.kind % 4 == 2)
            }
            _ => {
                let decoded = Authorization::decode(rec.body).ok();
                let name = rec.name.unwrap_or_else(|| {
                    decoded.as_ref().map(|a| format!("{}/{}", a.namespace, a.name)).unwrap_or_default()
                });
                if let Some(a) = &decoded
                    && let (Ok(()), Ok(p)) = (validate::authorization(&name, a), Policy::from_proto(a))
                {
                    fed.accepted_policies.push(p);
                }
                (proto::AUTHORIZATION_TYPE_URL, name, rec.kind % 4 == 3)
            }
        };
        let (resources, removed) =
            if removal { (vec![], vec![name]) } else { (vec![raw(&name, type_url, rec.body)], vec![]) };
        let _ = handlers.apply(type_url, resources, removed);
    }
    exercise_snapshot(&state.snapshot(), &fed);
});
