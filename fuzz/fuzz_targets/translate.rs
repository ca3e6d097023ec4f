//! Fuzzes the translation of user-written objects (the local config files): YAML text into
//! objects, objects into wire resources, twice with one translator (the second read, a prefix
//! of the first, exercises the kept previous versions). Whatever the text, nothing panics, and
//! every resource the translation emits passes the checks the proxies apply on receipt.
#![no_main]

use common::translate::Translator;
use common::xds::validate;
use libfuzzer_sys::fuzz_target;
use prost::Message;
use proto::security::Authorization;
use proto::waypoint as wp;
use proto::workload::Address;

fn check(t: &common::translate::Translation) {
    for r in &t.resources {
        assert_eq!(r.body.type_url, r.type_url);
        match r.type_url {
            proto::ADDRESS_TYPE_URL => {
                let a = Address::decode(r.body.value.as_slice()).expect("address decodes");
                if let Err(e) = validate::address(&r.name, &a) {
                    panic!("translation emitted an address the proxies refuse: {} {e}: {a:?}", r.name);
                }
            }
            proto::AUTHORIZATION_TYPE_URL => {
                let a = Authorization::decode(r.body.value.as_slice()).expect("authorization decodes");
                if let Err(e) = validate::authorization(&r.name, &a) {
                    panic!("translation emitted a policy the proxies refuse: {} {e}: {a:?}", r.name);
                }
            }
            proto::WAYPOINT_RESOURCE_TYPE_URL => {
                let res = wp::Resource::decode(r.body.value.as_slice()).expect("waypoint resource decodes");
                if let Some(wp::resource::Kind::Route(route)) = &res.kind {
                    // A route may still be refused (a regex the engine rejects is checked there).
                    let _ = waypoint::route::Route::from_proto(route);
                }
            }
            other => panic!("unexpected type {other}"),
        }
    }
    for s in &t.statuses {
        assert!(s.accepted || s.fault.is_some(), "{:?} refused without a reason", s.object);
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let mut translator = Translator::default();
    check(&translator.translate_yaml([("fuzz.yaml", text)]));
    let cut = text.char_indices().map(|(i, _)| i).nth(text.chars().count() / 2).unwrap_or(0);
    check(&translator.translate_yaml([("fuzz.yaml", &text[..cut])]));
});
