//! The DNS proxy's decisions on real messages, and its forwarding over real sockets to a
//! resolver on loopback (one that answers, one that truncates, one that is gone).

use super::*;
use common::xds::LocalConfig;
use common::xds::handler::RawResource;
use hickory_proto::op::Message;
use hickory_proto::rr::RecordType;

const MESH: &str = r#"
workloads:
  - name: client
    namespace: demo
    addresses: [10.1.1.2]
  - name: db-0
    namespace: shop
    addresses: [10.1.2.7]
    services:
      shop/db.shop.svc.cluster.local: [{servicePort: 5432}]
  - name: db-1
    namespace: shop
    addresses: [10.1.2.8]
    services:
      shop/db.shop.svc.cluster.local: [{servicePort: 5432}]
  - name: db-sick
    namespace: shop
    addresses: [10.1.2.9]
    status: UNHEALTHY
    services:
      shop/db.shop.svc.cluster.local: [{servicePort: 5432}]
services:
  - {name: web, namespace: demo, hostname: web.demo.svc.cluster.local, addresses: [10.96.0.80, "fd00::80"]}
  - {name: web, namespace: shop, hostname: web.shop.svc.cluster.local, addresses: [10.96.1.80]}
  - {name: db, namespace: shop, hostname: db.shop.svc.cluster.local}
  - {name: ext, namespace: demo, hostname: api.example.com, addresses: [240.240.0.1]}
  - {name: wild, namespace: demo, hostname: "*.wild.example.com", addresses: [240.240.0.2]}
  - {name: elsewhere, namespace: demo, hostname: far.example.com, addresses: [10.200.0.1], network: other}
"#;

fn state() -> State {
    let (state, handlers) = State::new("");
    let resources = LocalConfig::from_yaml(MESH).expect("yaml").to_resources().expect("resources");
    let raw: Vec<RawResource> = resources
        .iter()
        .filter(|r| r.body.type_url == proto::ADDRESS_TYPE_URL)
        .map(|r| RawResource { name: r.name.clone(), version: "1".into(), body: Some(r.body.clone()) })
        .collect();
    assert_eq!(handlers.apply(proto::ADDRESS_TYPE_URL, raw, vec![]), Some(vec![]));
    state
}

fn ask(s: &Snapshot, name: &str, qtype: RecordType) -> Decision {
    let q = query_bytes(7, name, qtype).expect("query");
    decide(s, &q, Some("demo"), "cluster.local")
}

/// The answer's code and addresses.
fn answered(d: Decision) -> (ResponseCode, Vec<String>) {
    let Decision::Answer(bytes) = d else { panic!("not answered locally: {d:?}") };
    let m = Message::from_vec(&bytes).expect("answer parses");
    assert_eq!(m.id(), 7);
    assert!(m.answers().iter().all(|r| r.ttl() == TTL));
    (m.response_code(), m.answers().iter().map(|r| r.data().to_string()).collect())
}

#[test]
fn names_of_the_mesh_are_answered_with_their_addresses() {
    let s = state().snapshot();
    let ok = |ips: &[&str]| (ResponseCode::NoError, ips.iter().map(|s| s.to_string()).collect::<Vec<_>>());
    // Short forms along the client's search path, and the FQDN.
    assert_eq!(answered(ask(&s, "web", RecordType::A)), ok(&["10.96.0.80"]));
    assert_eq!(answered(ask(&s, "web.shop", RecordType::A)), ok(&["10.96.1.80"]));
    assert_eq!(answered(ask(&s, "web.shop.svc", RecordType::A)), ok(&["10.96.1.80"]));
    assert_eq!(answered(ask(&s, "WEB.demo.svc.cluster.local.", RecordType::A)), ok(&["10.96.0.80"]));
    assert_eq!(answered(ask(&s, "web.demo.svc.cluster.local", RecordType::AAAA)), ok(&["fd00::80"]));
    // A name of the mesh without an address of the asked family, or asked for another type:
    // NOERROR with no answer (NODATA), not NXDOMAIN and not upstream.
    assert_eq!(answered(ask(&s, "web.shop", RecordType::AAAA)), ok(&[]));
    assert_eq!(answered(ask(&s, "web", RecordType::MX)), ok(&[]));
    // ServiceEntry hosts, wildcards included; a headless service's healthy endpoints.
    assert_eq!(answered(ask(&s, "api.example.com", RecordType::A)), ok(&["240.240.0.1"]));
    assert_eq!(answered(ask(&s, "a.b.wild.example.com", RecordType::A)), ok(&["240.240.0.2"]));
    assert_eq!(answered(ask(&s, "db.shop", RecordType::A)), ok(&["10.1.2.7", "10.1.2.8"]));
}

#[test]
fn other_names_go_upstream() {
    let s = state().snapshot();
    for name in ["example.org", "wild.example.com", "web.other", "far.example.com"] {
        assert!(matches!(ask(&s, name, RecordType::A), Decision::Forward(_)), "{name}");
    }
}

#[test]
fn bad_packets_are_dropped_or_refused_without_panicking() {
    let s = state().snapshot();
    let d = |bytes: &[u8]| decide(&s, bytes, Some("demo"), "cluster.local");
    assert!(matches!(d(b"garbage"), Decision::Drop("malformed")));
    assert!(matches!(d(&[]), Decision::Drop("malformed")));
    let q = query_bytes(7, "web", RecordType::A).expect("query");
    assert!(matches!(d(&q[..q.len() - 3]), Decision::Drop("malformed")), "truncated");
    // A name made of a compression pointer to itself.
    let mut looped = q[..12].to_vec();
    looped.extend([0xc0, 12, 0, 1, 0, 1]);
    assert!(matches!(d(&looped), Decision::Drop("malformed")), "pointer loop");
    // A response is no query.
    let mut response = q.clone();
    response[2] |= 0x80;
    assert!(matches!(d(&response), Decision::Drop("not_a_query")));
    // Another opcode: NOTIMP; no question: FORMERR.
    let mut status = Message::from_vec(&q).expect("parses");
    status.set_op_code(OpCode::Status);
    assert_eq!(answered(d(&status.to_vec().expect("encodes"))).0, ResponseCode::NotImp);
    let mut none = Message::from_vec(&q).expect("parses");
    none.take_queries();
    assert_eq!(answered(d(&none.to_vec().expect("encodes"))).0, ResponseCode::FormErr);
}

#[test]
fn a_big_answer_is_cut_for_a_plain_udp_client() {
    let mut m = Message::new();
    m.set_id(9).set_message_type(MessageType::Response);
    m.add_query(Query::query(
        hickory_proto::rr::Name::from_ascii("many.example.com").expect("name"),
        RecordType::A,
    ));
    for i in 0..100u8 {
        let name = hickory_proto::rr::Name::from_ascii("many.example.com").expect("name");
        m.add_answer(Record::from_rdata(name, TTL, RData::A(A::new(10, 0, 0, i))));
    }
    let big = m.to_vec().expect("encodes");
    assert!(big.len() > PLAIN_UDP_PAYLOAD);
    let cut = Message::from_vec(&fit(big, PLAIN_UDP_PAYLOAD)).expect("parses");
    assert!(cut.truncated() && cut.answers().is_empty() && cut.queries().len() == 1);
}

#[test]
fn one_source_cannot_take_every_slot() {
    let (state, _) = State::new("");
    let config = config(vec![]);
    let r = Resolver::new(&config, state, DnsMetrics::default());
    let flood: IpAddr = "10.1.1.66".parse().expect("ip");
    let held: Vec<_> = (0..PER_SOURCE).map_while(|_| r.slot(flood)).collect();
    assert_eq!(held.len(), PER_SOURCE);
    assert!(r.slot(flood).is_none(), "the flooding source is at its limit");
    assert!(r.slot("10.1.1.2".parse().expect("ip")).is_some(), "another source is served");
    drop(held);
    assert!(r.slot(flood).is_some());
    let f = r.in_flight.lock().expect("lock");
    assert!(f.by_source.is_empty() && f.total == 0, "pruned when done");
}

fn config(upstreams: Vec<SocketAddr>) -> DnsConfig {
    DnsConfig {
        addr: "127.0.0.1:0".parse().expect("addr"),
        upstreams,
        upstream_timeout: Duration::from_millis(300),
        domain: "cluster.local".into(),
        mark: None,
        host_address: None,
    }
}

/// A resolver on loopback: answers every A query with 192.0.2.1 over UDP and TCP, or over UDP
/// only with an empty truncated answer when `truncate`.
async fn upstream(truncate: bool) -> SocketAddr {
    let udp = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let addr = udp.local_addr().expect("addr");
    let tcp = TcpListener::bind(addr).await.expect("bind tcp");
    let answer = |q: &[u8], cut: bool| {
        let q = Message::from_vec(q).expect("query");
        let mut a = reply_to(&q, ResponseCode::NoError);
        if cut {
            a.set_truncated(true);
        } else {
            let name = q.queries()[0].name().clone();
            a.add_answer(Record::from_rdata(name, 60, RData::A(A::new(192, 0, 2, 1))));
        }
        a.to_vec().expect("encodes")
    };
    tokio::spawn(async move {
        let mut buf = vec![0; 4096];
        while let Ok((n, from)) = udp.recv_from(&mut buf).await {
            let _ = udp.send_to(&answer(&buf[..n], truncate), from).await;
        }
    });
    tokio::spawn(async move {
        while let Ok((mut s, _)) = tcp.accept().await {
            let len = s.read_u16().await.expect("len");
            let mut q = vec![0; usize::from(len)];
            s.read_exact(&mut q).await.expect("query");
            let a = answer(&q, false);
            let mut framed = u16::try_from(a.len()).expect("fits").to_be_bytes().to_vec();
            framed.extend(a);
            s.write_all(&framed).await.expect("write");
        }
    });
    addr
}

async fn forwarded(upstreams: Vec<SocketAddr>) -> (Message, DnsMetrics) {
    let metrics = DnsMetrics::default();
    let r = Resolver::new(&config(upstreams), state(), metrics.clone());
    let q = query_bytes(7, "example.org", RecordType::A).expect("query");
    let client: SocketAddr = "10.1.1.2:5353".parse().expect("addr");
    let started = std::time::Instant::now();
    let a = r.answer(&q, client, Transport::Udp).await.expect("answered");
    assert!(started.elapsed() < Duration::from_secs(2), "bounded by the upstream timeout");
    (Message::from_vec(&a).expect("parses"), metrics)
}

#[tokio::test]
async fn other_names_are_answered_by_an_upstream_and_truncation_retries_over_tcp() {
    let (a, m) = forwarded(vec![upstream(false).await]).await;
    assert_eq!((a.id(), a.response_code()), (7, ResponseCode::NoError));
    assert_eq!(a.answers()[0].data().to_string(), "192.0.2.1");
    assert_eq!((m.upstream.requests.get(), m.upstream.failures.get()), (1, 0));

    let (a, _) = forwarded(vec![upstream(true).await]).await;
    assert!(!a.truncated(), "the truncated UDP answer was asked again over TCP");
    assert_eq!(a.answers().len(), 1);
}

#[tokio::test]
async fn a_dead_upstream_is_skipped_and_none_left_is_servfail() {
    // A port nobody listens on: UDP gets nothing back (or a refusal) and times out.
    let dead = {
        let s = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        s.local_addr().expect("addr")
    };
    let (a, m) = forwarded(vec![dead, upstream(false).await]).await;
    assert_eq!(a.answers().len(), 1, "the second upstream answered");
    assert_eq!((m.upstream.requests.get(), m.upstream.failures.get()), (2, 1));

    let (a, m) = forwarded(vec![dead]).await;
    assert_eq!((a.id(), a.response_code()), (7, ResponseCode::ServFail));
    assert_eq!(m.upstream.failures.get(), 1);

    // One that takes the query and never answers: SERVFAIL once its timeout has passed.
    let silent = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let started = std::time::Instant::now();
    let (a, _) = forwarded(vec![silent.local_addr().expect("addr")]).await;
    assert_eq!(a.response_code(), ResponseCode::ServFail);
    assert!(started.elapsed() >= Duration::from_millis(300), "waited for the upstream's timeout");
}

/// The UDP loop on a real socket: an oversized datagram is dropped and counted, a query after
/// it is still answered.
#[tokio::test]
async fn an_oversized_datagram_is_dropped_and_the_next_query_answered() {
    let metrics = DnsMetrics::default();
    let r = Resolver::new(&config(vec![]), state(), metrics.clone());
    let socket = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind"));
    let addr = socket.local_addr().expect("addr");
    let server = tokio::spawn(serve_udp(r, socket, None));
    let client = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    client.send_to(&vec![0u8; MAX_UDP_QUERY + 100], addr).await.expect("send");
    client
        .send_to(&query_bytes(7, "web.demo.svc.cluster.local", RecordType::A).expect("q"), addr)
        .await
        .expect("send");
    let mut buf = vec![0; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), client.recv(&mut buf))
        .await
        .expect("answered")
        .expect("recv");
    assert_eq!(answered(Decision::Answer(buf[..n].to_vec())).1, ["10.96.0.80"]);
    let oversized = metrics.dropped.get_or_create(&DropLabels { reason: "oversized" }).get();
    assert_eq!(oversized, 1);
    server.abort();
}

/// The TCP loop on a real socket: a client that stops half way through a query is cut off
/// after the idle time (counted as `slow_client`), and the next client is answered meanwhile.
/// The clock is tokio's paused one, so the wait costs nothing.
#[tokio::test(start_paused = true)]
async fn a_stalled_tcp_client_is_cut_off_and_others_are_answered() {
    let metrics = DnsMetrics::default();
    let r = Resolver::new(&config(vec![]), state(), metrics.clone());
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = tokio::spawn(serve_tcp(r, listener));
    let query = query_bytes(7, "web.demo.svc.cluster.local", RecordType::A).expect("q");

    let mut stalled = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let len = u16::try_from(query.len()).expect("fits").to_be_bytes();
    stalled.write_all(&len).await.expect("length");
    stalled.write_all(&query[..5]).await.expect("a part of the query");

    let mut other = tokio::net::TcpStream::connect(addr).await.expect("connect");
    other.write_all(&len).await.expect("length");
    other.write_all(&query).await.expect("query");
    let n = other.read_u16().await.expect("answer length");
    let mut answer = vec![0; usize::from(n)];
    other.read_exact(&mut answer).await.expect("answer");
    assert_eq!(answered(Decision::Answer(answer)).1, ["10.96.0.80"]);

    let slow = || metrics.dropped.get_or_create(&DropLabels { reason: "slow_client" }).get();
    assert_eq!(slow(), 0);
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(60), stalled.read_to_end(&mut rest)).await;
    assert!(closed.is_ok_and(|r| r.is_ok()) && rest.is_empty(), "closed without an answer");
    assert_eq!(slow(), 1);
    server.abort();
}
