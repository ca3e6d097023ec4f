//! Fuzzes an `istio.workload.Address` as received over xDS: protobuf decoding, the validation
//! on receipt, the conversion into the state model, and the state's handler end to end.
//! Input: a name selector (see `ambient_fuzz::split_name`) then the encoded resource.
#![no_main]

use ambient_fuzz::{Fed, exercise_snapshot, fresh_state, raw, split_name};
use common::state::{Service, Workload};
use common::xds::validate;
use libfuzzer_sys::fuzz_target;
use prost::Message;
use proto::workload::{Address, address};

fuzz_target!(|data: &[u8]| {
    let Some((name, body)) = split_name(data) else { return };
    let decoded = Address::decode(body);
    let name = name.unwrap_or_else(|| decoded.as_ref().map(implied_name).unwrap_or_default());

    let (state, handlers) = fresh_state();
    let rejections = handlers
        .apply(proto::ADDRESS_TYPE_URL, vec![raw(&name, proto::ADDRESS_TYPE_URL, body)], vec![])
        .expect("the state registers an Address handler");

    let Ok(addr) = decoded else {
        assert_eq!(rejections.len(), 1, "an undecodable Address must be rejected");
        return;
    };
    let valid = validate::address(&name, &addr);
    let mut fed = Fed::default();
    let converted = match &addr.r#type {
        Some(address::Type::Workload(w)) => Workload::from_proto(w).map(|c| {
            assert_eq!(c.uid, w.uid);
            fed.workloads.push(c.uid);
        }),
        Some(address::Type::Service(s)) => Service::from_proto(s).map(|c| {
            assert_eq!(c.key(), format!("{}/{}", s.namespace, s.hostname));
            fed.services.push((c.namespace, c.hostname));
        }),
        None => Ok(()),
    };
    let accepted = valid.is_ok() && converted.is_ok();
    assert_eq!(
        rejections.is_empty(),
        accepted,
        "the state must accept exactly what validates and converts: {valid:?} {converted:?} {rejections:?}"
    );

    let snapshot = state.snapshot();
    if accepted {
        match &addr.r#type {
            Some(address::Type::Workload(w)) => {
                assert!(snapshot.workload_by_uid(&w.uid).is_some(), "accepted workload {name} missing")
            }
            Some(address::Type::Service(s)) => assert!(
                snapshot.service(&s.namespace, &s.hostname).is_some(),
                "accepted service {name} missing"
            ),
            None => {}
        }
    }
    exercise_snapshot(&snapshot, &fed);
});

/// The resource name a well-formed Address carries: the workload UID, or `namespace/hostname`.
fn implied_name(a: &Address) -> String {
    match &a.r#type {
        Some(address::Type::Workload(w)) => w.uid.clone(),
        Some(address::Type::Service(s)) => format!("{}/{}", s.namespace, s.hostname),
        None => String::new(),
    }
}
