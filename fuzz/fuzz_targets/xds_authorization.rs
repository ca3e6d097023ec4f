//! Fuzzes an `istio.security.Authorization` as received over xDS: protobuf decoding, the
//! validation on receipt, the conversion into the evaluated policy, the fail-safe form a
//! rejected one is held in (also when only its leading fields can be read), and the state's
//! handler end to end with a workload that is subject to the policy.
//! Input: a name selector (see `ambient_fuzz::split_name`) then the encoded resource.
#![no_main]

use ambient_fuzz::{Fed, assert_fail_safe_shape, exercise_snapshot, fresh_state, raw, split_name};
use common::state::Policy;
use common::state::policy::AuthorizationHeader;
use common::xds::validate;
use libfuzzer_sys::fuzz_target;
use prost::Message;
use proto::security::Authorization;
use proto::workload as wl;

fuzz_target!(|data: &[u8]| {
    let Some((name, body)) = split_name(data) else { return };
    let decoded = Authorization::decode(body);
    let name = name.unwrap_or_else(|| {
        decoded.as_ref().map(|a| format!("{}/{}", a.namespace, a.name)).unwrap_or_default()
    });

    // What the state should end up holding, worked out from the public pieces.
    let mut fed = Fed::default();
    let held_fail_safe = match &decoded {
        Err(_) => AuthorizationHeader::read(body).and_then(|a| Policy::fail_safe(&name, &a)),
        Ok(a) => {
            let valid = validate::authorization(&name, a);
            let converted = Policy::from_proto(a);
            if let Some(p) = Policy::fail_safe(&name, a) {
                assert_fail_safe_shape(&p);
            }
            match (valid, converted) {
                (Ok(()), Ok(p)) => {
                    assert_eq!(p.key(), name, "an accepted policy is known by its resource name");
                    fed.accepted_policies.push(p);
                    None
                }
                _ => Policy::fail_safe(&name, a),
            }
        }
    };
    if let Some(p) = &held_fail_safe {
        assert_fail_safe_shape(p);
        if let Some((ns, n)) = name.split_once('/')
            && !ns.is_empty()
            && !n.is_empty()
            && !n.contains('/')
        {
            assert_eq!(p.key(), name, "a stand-in is known by its resource name");
        }
    }

    // A workload subject to the policy whatever its scope: same namespace, and names it.
    let key = held_fail_safe
        .as_ref()
        .map(Policy::key)
        .or_else(|| fed.accepted_policies.first().map(Policy::key))
        .unwrap_or_else(|| name.clone());
    let namespace = key.split_once('/').map_or("fuzz", |(ns, _)| ns).to_string();
    let probe = wl::Address {
        r#type: Some(wl::address::Type::Workload(wl::Workload {
            uid: "fuzz-probe".into(),
            name: "probe".into(),
            namespace,
            addresses: vec![vec![10, 0, 0, 1]],
            authorization_policies: vec![key.clone()],
            ..Default::default()
        })),
    };
    let (state, handlers) = fresh_state();
    let probe_rejected = handlers
        .apply(
            proto::ADDRESS_TYPE_URL,
            vec![raw("fuzz-probe", proto::ADDRESS_TYPE_URL, &probe.encode_to_vec())],
            vec![],
        )
        .expect("the state registers an Address handler");
    if probe_rejected.is_empty() {
        fed.workloads.push("fuzz-probe".into());
    }
    let rejections = handlers
        .apply(proto::AUTHORIZATION_TYPE_URL, vec![raw(&name, proto::AUTHORIZATION_TYPE_URL, body)], vec![])
        .expect("the state registers an Authorization handler");
    assert_eq!(
        rejections.is_empty(),
        !fed.accepted_policies.is_empty(),
        "the state must accept exactly what validates and converts: {rejections:?}"
    );

    let snapshot = state.snapshot();
    if let Some(p) = &held_fail_safe {
        assert!(snapshot.failsafe_reason(&p.key()).is_some(), "rejected {name} is not held fail-safe");
    }
    if let Some(w) = snapshot.workload_by_uid("fuzz-probe") {
        let missing = snapshot.missing_policies(w).count();
        let held = held_fail_safe.is_some() || !fed.accepted_policies.is_empty();
        assert_eq!(missing == 0, held, "probe naming {key} sees it missing={missing}, held={held}");
    }
    exercise_snapshot(&snapshot, &fed);
});
