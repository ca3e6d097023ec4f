//! state-bench: what one xDS push costs the proxies' mesh state, at 1k / 10k / 50k workloads.
//!
//! Builds the state the way the xDS client feeds it (encoded `istio.workload.Address` and
//! `istio.security.Authorization` resources through the registered handlers, decode included),
//! loads a mesh of `n` workloads (one service per 10 workloads, 100 namespaces with a namespace
//! policy each, a global policy, one selector policy per 10 workloads), then times and counts
//! the allocations of single-resource pushes: a changed workload, a new workload, its removal,
//! a changed policy. Allocation counts do not depend on machine noise; times do (median of the
//! repeats). Prints JSON (one object per size) for the benchmark report.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use clap::Parser;
use common::state::State;
use common::xds::Handlers;
use common::xds::handler::RawResource;
use mesh_bench::push::{Push, Size};
use prost::Message;
use proto::security as sec;
use proto::workload as wl;
use tikv_jemalloc_ctl::{Access, AsName, epoch, thread};

/// The product's allocator, whose statistics count the allocations.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Allocation requests so far (all arenas, thread caches merged) and bytes this thread has
/// allocated.
fn allocated() -> (u64, u64) {
    // Turning the thread cache off and on again flushes it, merging its counts into the arena's.
    let tcache = b"thread.tcache.enabled\0".name();
    let _ = tcache.write(false);
    let _ = tcache.write(true);
    let _ = epoch::advance();
    let read = |name: &[u8]| Access::<u64>::read(name.name()).unwrap_or(0);
    let requests =
        read(b"stats.arenas.4096.small.nrequests\0") + read(b"stats.arenas.4096.large.nrequests\0");
    (requests, thread::allocatedp::read().map_or(0, |p| p.get()))
}

#[derive(Debug, Parser)]
#[command(about = "Time and allocations per xDS push into the mesh state")]
struct Args {
    /// Mesh sizes (workloads), comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000,50000")]
    workloads: Vec<usize>,
    /// Pushes of each kind measured per size.
    #[arg(long, default_value_t = 21)]
    repeats: usize,
}

const NAMESPACES: usize = 100;

fn any<M: Message>(type_url: &str, name: String, m: &M) -> RawResource {
    let body = prost_types::Any { type_url: type_url.to_string(), value: m.encode_to_vec() };
    RawResource { name, version: "1".into(), body: Some(body) }
}

fn ns(i: usize) -> String {
    format!("ns-{}", i % NAMESPACES)
}

fn ip(i: usize, base: u8) -> Vec<u8> {
    let i = u32::try_from(i).unwrap_or(u32::MAX);
    Ipv4Addr::from(u32::from_be_bytes([base, 0, 0, 0]) + i + 1).octets().to_vec()
}

fn service_key(s: usize) -> String {
    format!("{}/svc-{s}.{}.svc.cluster.local", ns(s), ns(s))
}

fn workload(i: usize, healthy: bool) -> RawResource {
    let uid = format!("Kubernetes//Pod/{}/pod-{i}", ns(i / 10));
    let port = wl::Port { service_port: 80, target_port: 8080, app_protocol: 0 };
    let w = wl::Workload {
        uid: uid.clone(),
        name: format!("pod-{i}"),
        namespace: ns(i / 10),
        addresses: vec![ip(i, 10)],
        tunnel_protocol: wl::TunnelProtocol::Hbone as i32,
        service_account: "default".into(),
        node: format!("node-{}", i % 50),
        canonical_name: format!("app-{}", i / 10),
        canonical_revision: "v1".into(),
        workload_name: format!("app-{}", i / 10),
        services: [(service_key(i / 10), wl::PortList { ports: vec![port] })].into_iter().collect(),
        authorization_policies: vec![format!("{}/select-{}", ns(i / 10), i / 10)],
        status: if healthy { wl::WorkloadStatus::Healthy } else { wl::WorkloadStatus::Unhealthy } as i32,
        ..Default::default()
    };
    let a = wl::Address { r#type: Some(wl::address::Type::Workload(w)) };
    any(proto::ADDRESS_TYPE_URL, uid, &a)
}

fn service(s: usize) -> RawResource {
    let svc = wl::Service {
        name: format!("svc-{s}"),
        namespace: ns(s),
        hostname: format!("svc-{s}.{}.svc.cluster.local", ns(s)),
        addresses: vec![wl::NetworkAddress { network: String::new(), address: ip(s, 11), length: None }],
        ports: vec![wl::Port { service_port: 80, target_port: 8080, app_protocol: 0 }],
        ..Default::default()
    };
    let a = wl::Address { r#type: Some(wl::address::Type::Service(svc)) };
    any(proto::ADDRESS_TYPE_URL, service_key(s), &a)
}

fn policy(name: String, namespace: String, scope: sec::Scope, port: u32) -> RawResource {
    let m = sec::Match { destination_ports: vec![port], ..Default::default() };
    let p = sec::Authorization {
        name: name.clone(),
        namespace: namespace.clone(),
        scope: scope as i32,
        action: sec::Action::Allow as i32,
        rules: vec![sec::Rule { clauses: vec![sec::Clause { matches: vec![m] }] }],
        ..Default::default()
    };
    any(proto::AUTHORIZATION_TYPE_URL, format!("{namespace}/{name}"), &p)
}

fn apply(handlers: &Handlers, type_url: &str, resources: Vec<RawResource>, removed: Vec<String>) {
    match handlers.apply(type_url, resources, removed) {
        Some(rejected) if rejected.is_empty() => {}
        other => panic!("push not applied: {other:?}"),
    }
}

/// Runs `push` `repeats` times (each one built beforehand, outside the measurement).
fn measure(kind: &'static str, repeats: usize, mut prepare: impl FnMut(usize) -> Box<dyn FnOnce()>) -> Push {
    let mut times = Vec::with_capacity(repeats);
    let (mut allocs, mut bytes) = (0, 0);
    for r in 0..repeats {
        let push = prepare(r);
        let (a0, b0) = allocated();
        let t = Instant::now();
        push();
        times.push(t.elapsed());
        let (a1, b1) = allocated();
        allocs += a1 - a0;
        bytes += b1 - b0;
    }
    times.sort();
    let median = times.get(repeats / 2).copied().unwrap_or(Duration::ZERO);
    let n = repeats.max(1) as u64;
    Push {
        kind: kind.to_string(),
        median_us: median.as_secs_f64() * 1e6,
        allocations: allocs / n,
        alloc_bytes: bytes / n,
    }
}

fn size(n: usize, repeats: usize) -> Size {
    let (state, handlers) = State::new("");
    let services = n.div_ceil(10);
    let mut addresses: Vec<RawResource> = (0..n).map(|i| workload(i, true)).collect();
    addresses.extend((0..services).map(service));
    let mut policies = vec![policy("global".into(), "istio-system".into(), sec::Scope::Global, 1)];
    policies.extend((0..NAMESPACES).map(|i| policy("ns".into(), ns(i), sec::Scope::Namespace, 2)));
    policies
        .extend((0..services).map(|s| policy(format!("select-{s}"), ns(s), sec::Scope::WorkloadSelector, 3)));
    let policy_count = policies.len();

    let a0 = allocated().0;
    let t = Instant::now();
    apply(&handlers, proto::AUTHORIZATION_TYPE_URL, policies, vec![]);
    apply(&handlers, proto::ADDRESS_TYPE_URL, addresses, vec![]);
    let load = t.elapsed();
    let load_allocations = allocated().0 - a0;
    assert_eq!(state.snapshot().workloads_on("node-0").count(), n.div_ceil(50), "mesh loaded");

    let h = handlers.clone();
    let changed = measure("one workload changed", repeats, |r| {
        let update = workload(n / 2, r % 2 == 1);
        let h = h.clone();
        Box::new(move || apply(&h, proto::ADDRESS_TYPE_URL, vec![update], vec![]))
    });
    let added = measure("one workload added", repeats, |r| {
        let update = workload(n + r, true);
        let h = h.clone();
        Box::new(move || apply(&h, proto::ADDRESS_TYPE_URL, vec![update], vec![]))
    });
    let removed = measure("one workload removed", repeats, |r| {
        let name = format!("Kubernetes//Pod/{}/pod-{}", ns((n + r) / 10), n + r);
        let h = h.clone();
        Box::new(move || apply(&h, proto::ADDRESS_TYPE_URL, vec![], vec![name]))
    });
    let policy_changed = measure("one policy changed", repeats, |r| {
        let update = policy("select-0".into(), ns(0), sec::Scope::WorkloadSelector, 3 + (r % 2) as u32);
        let h = h.clone();
        Box::new(move || apply(&h, proto::AUTHORIZATION_TYPE_URL, vec![update], vec![]))
    });
    Size {
        workloads: n,
        services,
        policies: policy_count,
        load_ms: load.as_secs_f64() * 1e3,
        load_allocations,
        pushes: vec![changed, added, removed, policy_changed],
    }
}

#[allow(clippy::print_stdout)]
fn main() {
    let args = Args::parse();
    // The counters count what they should: a known number of allocations shows up as such.
    let (a0, _) = allocated();
    let boxes: Vec<Box<u64>> = (0..1000).map(Box::new).collect();
    let (a1, _) = allocated();
    drop(boxes);
    assert!((1000..1010).contains(&(a1 - a0)), "allocation statistics are off: {} for 1000", a1 - a0);
    for n in args.workloads {
        let s = size(n, args.repeats);
        println!("{}", serde_json::to_string(&s).unwrap_or_default());
    }
}
