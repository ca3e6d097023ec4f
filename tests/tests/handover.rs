//! ztunnel replaced on a node under load, without a failed connection (root; CI runs as root,
//! elsewhere this fails saying why).
//!
//! A client pod on node-a opens 250 short connections a second to an echo pod on node-b, and a
//! few long-lived streams keep exchanging lines, all through both ztunnels over HBONE. Then
//! node-b's ztunnel is replaced, then node-a's, the way an upgrade does it: the new ztunnel
//! starts beside the old one (same ports, `SO_REUSEPORT`; the same pinned capture, adopted),
//! becomes ready, and the old one drains: it closes its listeners (queued connections migrate to
//! the new one), sends GOAWAY on its HBONE connections (peers retry new streams on a new
//! connection), and lets open connections run to the end of the drain period.
//!
//! The test asserts no short connection failed, and that the long-lived streams through the
//! draining ztunnel kept moving bytes until the drain period ended.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use mesh_tests::netns::{Netns, link_nodes, require_root, wire};
use mesh_tests::node::NodeZtunnel;
use mesh_tests::xds_server::XdsStore;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const XDS_ADDR: &str = "10.0.0.1:15010";
const ECHO: &str = "10.2.1.2:8080";
/// Drain period of the replaced ztunnels.
const PERIOD: Duration = Duration::from_secs(2);
/// Interval between new short connections (250 a second).
const CHURN_EVERY: Duration = Duration::from_millis(4);
/// Long-lived streams per replacement.
const STREAMS: usize = 3;

const MESH: &str = r#"
workloads:
  - {name: client, namespace: demo, serviceAccount: client, addresses: [10.1.1.2], node: node-a,
     workloadName: client}
  - {name: echo, namespace: demo, serviceAccount: echo, addresses: [10.2.1.2], node: node-b,
     workloadName: echo}
"#;

/// Outcomes of the short connections.
#[derive(Default)]
struct Churn {
    ok: AtomicU64,
    failed: AtomicU64,
    errors: std::sync::Mutex<Vec<String>>,
}

/// One short connection: connect, send a line, read the echo, close.
async fn one(id: u64) -> Result<(), String> {
    let mut stream = tokio::net::TcpStream::connect(ECHO).await.map_err(|e| format!("connect: {e}"))?;
    stream.write_all(format!("c{id}\n").as_bytes()).await.map_err(|e| format!("write: {e}"))?;
    let mut line = String::new();
    BufReader::new(&mut stream).read_line(&mut line).await.map_err(|e| format!("read: {e}"))?;
    if !line.starts_with("echo ") || !line.trim_end().ends_with(&format!("c{id}")) {
        return Err(format!("unexpected reply {line:?}"));
    }
    Ok(())
}

/// Opens a short connection every [`CHURN_EVERY`] until `stop`; each gets 10 s.
async fn churn(stats: Arc<Churn>, stop: Arc<AtomicBool>) {
    let mut tick = tokio::time::interval(CHURN_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = tokio::task::JoinSet::new();
    let mut id = 0u64;
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        id += 1;
        let stats = stats.clone();
        tasks.spawn(async move {
            match tokio::time::timeout(Duration::from_secs(10), one(id)).await {
                Ok(Ok(())) => {
                    stats.ok.fetch_add(1, Ordering::Relaxed);
                }
                outcome => {
                    stats.failed.fetch_add(1, Ordering::Relaxed);
                    let why = match outcome {
                        Ok(Err(e)) => e,
                        _ => "timed out".to_string(),
                    };
                    if let Ok(mut errors) = stats.errors.lock() {
                        errors.push(format!("connection {id}: {why}"));
                    }
                }
            }
        });
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
}

/// A long-lived stream exchanging a line every 20 ms until `stop` or an error; returns when it
/// last got an echo back and how it ended.
async fn long_lived(name: String, stop: Arc<AtomicBool>) -> (Option<Instant>, String) {
    let mut last = None;
    let stream = match tokio::net::TcpStream::connect(ECHO).await {
        Ok(s) => s,
        Err(e) => return (last, format!("connect: {e}")),
    };
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::new(rd);
    let mut n = 0u64;
    loop {
        if stop.load(Ordering::Relaxed) {
            return (last, "stopped".into());
        }
        n += 1;
        if let Err(e) = wr.write_all(format!("{name}-{n}\n").as_bytes()).await {
            return (last, format!("write: {e}"));
        }
        let mut line = String::new();
        match tokio::time::timeout(Duration::from_secs(5), rd.read_line(&mut line)).await {
            Ok(Ok(0)) => return (last, "closed".into()),
            Ok(Ok(_)) if line.trim_end().ends_with(&format!("{name}-{n}")) => last = Some(Instant::now()),
            Ok(Ok(_)) => return (last, format!("unexpected reply {line:?}")),
            Ok(Err(e)) => return (last, format!("read: {e}")),
            Err(_) => return (last, "read timed out".into()),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Starts a new ztunnel in `node` beside `old`, waits until it is ready, then drains `old` for
/// [`PERIOD`] and drops it. Returns the new ztunnel and when the drain started and ended.
fn replace(node: &Netns, old: NodeZtunnel, flags: &[&str]) -> (NodeZtunnel, Instant, Instant) {
    let new = NodeZtunnel::start(node, flags);
    new.wait_ready(&format!("the new ztunnel in {}", node.name));
    let NodeZtunnel { rt, mut app } = old;
    let started = Instant::now();
    let (app, cut) = rt
        .block_on(rt.spawn(async move {
            let cut = app.drain(PERIOD).await;
            (app, cut)
        }))
        .expect("drain");
    let ended = Instant::now();
    assert!(cut <= STREAMS, "only the long-lived streams were still open at the end: {cut}");
    node.enter(|| drop(app));
    drop(rt);
    (new, started, ended)
}

/// Checks the long-lived streams kept exchanging lines until (nearly) the end of the drain.
fn check_streams(what: &str, ended: &[(Option<Instant>, String)], drain_started: Instant) {
    assert_eq!(ended.len(), STREAMS);
    for (i, (last, how)) in ended.iter().enumerate() {
        let last = last.unwrap_or_else(|| panic!("{what}: stream {i} never got an echo ({how})"));
        let moved_for = last.saturating_duration_since(drain_started);
        assert!(
            moved_for + Duration::from_millis(400) >= PERIOD,
            "{what}: stream {i} stopped moving {moved_for:?} into a {PERIOD:?} drain ({how})"
        );
    }
}

#[test]
fn ztunnel_is_replaced_under_load_without_a_failed_connection() {
    require_root("the ztunnel hand-over test");
    let pid = std::process::id();
    let ns = |role: &str| Netns::create(&format!("ho{pid}-{role}"));
    let (node_a, node_b, client, echo) = (ns("na"), ns("nb"), ns("client"), ns("echo"));
    link_nodes(&node_a, &node_b);
    wire(&node_a, &client, "v-client", "10.1.1");
    wire(&node_b, &echo, "v-echo", "10.2.1");
    mesh_tests::echo::serve_pod(&echo, "0.0.0.0", "echo");

    let ca_dir = tempfile::tempdir().expect("tempdir");
    let ca = ca_dir.path().to_str().expect("path").to_string();
    let store = XdsStore::new();
    store.load_yaml(MESH).unwrap_or_else(|e| panic!("config: {e:#}"));
    let (cp_rt, xds) = mesh_tests::node::control_plane(&node_a, XDS_ADDR, store.clone());
    let url = format!("http://{XDS_ADDR}");
    let common = ["--xds-address", url.as_str(), "--local-ca", &ca, "--redirect", "--uplink", "*"];
    let flags_a = [&common[..], &["--node-name", "node-a"]].concat();
    let flags_b = [&common[..], &["--node-name", "node-b"]].concat();
    let zt_a = NodeZtunnel::start(&node_a, &flags_a);
    let zt_b = NodeZtunnel::start(&node_b, &flags_b);
    zt_a.wait_ready("ztunnel on node-a");
    zt_b.wait_ready("ztunnel on node-b");
    zt_a.converge("client enrolled", &|s| s.pods.len() == 1);
    zt_b.converge("echo enrolled", &|s| s.pods.len() == 1);
    for node in [&node_a, &node_b] {
        let migrate = node.exec(&["sysctl", "-n", "net.ipv4.tcp_migrate_req"]);
        assert_eq!(migrate.trim(), "1", "ztunnel turns on listener migration in {}", node.name);
    }

    let load_rt = client.runtime();
    let warm = load_rt.block_on(load_rt.spawn(one(0))).expect("join");
    assert_eq!(warm, Ok(()), "the mesh works before the load starts");
    let stats = Arc::new(Churn::default());
    let stop = Arc::new(AtomicBool::new(false));
    let load_started = Instant::now();
    let load = load_rt.spawn(churn(stats.clone(), stop.clone()));
    let streams = |tag: &str| {
        (0..STREAMS).map(|i| load_rt.spawn(long_lived(format!("{tag}{i}"), stop.clone()))).collect::<Vec<_>>()
    };

    // node-b first: the streams' HBONE connections from node-a go to the draining ztunnel.
    let through_b = streams("b");
    std::thread::sleep(Duration::from_secs(1));
    let (zt_b, b_started, _) = replace(&node_b, zt_b, &flags_b);
    let ended: Vec<_> = through_b.into_iter().map(|t| load_rt.block_on(t).expect("join")).collect();
    check_streams("through the replaced node-b ztunnel", &ended, b_started);

    // Then node-a: the streams' pod connections are held by the draining ztunnel.
    let through_a = streams("a");
    std::thread::sleep(Duration::from_secs(1));
    let (zt_a, a_started, _) = replace(&node_a, zt_a, &flags_a);
    let ended: Vec<_> = through_a.into_iter().map(|t| load_rt.block_on(t).expect("join")).collect();
    check_streams("through the replaced node-a ztunnel", &ended, a_started);

    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    load_rt.block_on(load).expect("load generator");
    let seconds = load_started.elapsed().as_secs_f64();
    let (ok, failed) = (stats.ok.load(Ordering::Relaxed), stats.failed.load(Ordering::Relaxed));
    let errors =
        stats.errors.lock().map(|e| e.iter().take(10).cloned().collect::<Vec<_>>()).unwrap_or_default();
    assert_eq!(failed, 0, "{failed} of {} connections failed during the hand-overs: {errors:?}", ok + failed);
    let rate = ok as f64 / seconds;
    assert!(
        rate >= 200.0,
        "the generator kept at least 200 connections a second: {rate:.0}/s over {seconds:.1} s"
    );

    // The replacements serve on their own.
    let after = load_rt.block_on(load_rt.spawn(one(1))).expect("join");
    assert_eq!(after, Ok(()));
    drop(load_rt);
    zt_a.stop(&node_a);
    zt_b.stop(&node_b);
    cp_rt.block_on(xds.stop());
}
