//! Fuzzes ztunnel's DNS proxy on what a pod sends it: any bytes are parsed, answered from a
//! small mesh or marked for forwarding, or dropped, without a panic; whatever is answered
//! parses as a DNS response to the query's id.
#![no_main]

use std::sync::LazyLock;

use common::state::State;
use common::xds::LocalConfig;
use common::xds::handler::RawResource;
use libfuzzer_sys::fuzz_target;
use ztunnel::dns::{Decision, decide};

const MESH: &str = r#"
workloads:
  - {name: client, namespace: demo, addresses: [10.1.1.2]}
  - name: db-0
    namespace: shop
    addresses: [10.1.2.7, "fd00::7"]
    services: {shop/db.shop.svc.cluster.local: [{servicePort: 5432}]}
services:
  - {name: web, namespace: demo, hostname: web.demo.svc.cluster.local, addresses: [10.96.0.80, "fd00::80"]}
  - {name: db, namespace: shop, hostname: db.shop.svc.cluster.local}
  - {name: wild, namespace: demo, hostname: "*.wild.example.com", addresses: [240.240.0.2]}
"#;

static STATE: LazyLock<State> = LazyLock::new(|| {
    let (state, handlers) = State::new("");
    let resources = LocalConfig::from_yaml(MESH).expect("yaml").to_resources().expect("resources");
    let raw: Vec<RawResource> = resources
        .iter()
        .map(|r| RawResource { name: r.name.clone(), version: "1".into(), body: Some(r.body.clone()) })
        .collect();
    handlers.apply(proto::ADDRESS_TYPE_URL, raw, vec![]);
    state
});

fuzz_target!(|data: &[u8]| {
    let snapshot = STATE.snapshot();
    for ns in [Some("demo"), None] {
        if let Decision::Answer(bytes) = decide(&snapshot, data, ns, "cluster.local") {
            let answer = hickory_proto::op::Message::from_vec(&bytes).expect("our answer parses");
            assert_eq!(answer.id(), u16::from_be_bytes([data[0], data[1]]), "answer to the query's id");
            assert_eq!(answer.message_type(), hickory_proto::op::MessageType::Response);
        }
    }
});
