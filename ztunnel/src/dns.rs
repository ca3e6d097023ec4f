//! ztunnel's DNS proxy on 15053, UDP and TCP: answers A and AAAA for the mesh's names itself
//! ([`names`]) and forwards everything else to the upstream resolvers ([`forward`]).
//!
//! Every query is parsed with `hickory-proto` first. What does not parse as a single-question
//! query (garbage, truncated or oversized packets, compression loops, responses) is dropped and
//! counted in `istio_dns_dropped_total{reason}`; a query with an opcode other than QUERY is
//! answered NOTIMP. A name of the mesh gets its addresses of the asked family (NOERROR with no
//! answer when it has none of that family or the type is not A/AAAA); any other name the
//! upstreams' answer, passed through unchanged, or SERVFAIL when none answers within the
//! timeout. An answer too big for a UDP client's buffer comes back truncated, so that it asks
//! again over TCP. Each source address may have at most [`PER_SOURCE`] queries in flight and
//! all sources together [`IN_FLIGHT`]: a flood from one pod is dropped (counted) while the
//! others are served.

pub mod forward;
pub mod names;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use common::state::{Snapshot, State};
use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{RData, Record, RecordType};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tracing::{debug, warn};

pub use forward::{Forwarder, UpstreamMetrics};

/// TTL of the answers for the mesh's names (seconds).
pub const TTL: u32 = 30;
/// The warning of queries no upstream answered, at most once per 10 s (the metric counts all).
static UPSTREAM_FAILED: common::throttle::Throttle = common::throttle::Throttle::new(Duration::from_secs(10));

/// Queries in flight per source address; more are dropped.
pub const PER_SOURCE: usize = 64;
/// Queries in flight in all.
pub const IN_FLIGHT: usize = 1024;
/// Largest UDP query accepted (bigger ones are dropped as oversized).
const MAX_UDP_QUERY: usize = 4096;
/// What a UDP client without EDNS can take.
const PLAIN_UDP_PAYLOAD: usize = 512;
/// What we offer in EDNS on our own answers.
const OUR_UDP_PAYLOAD: u16 = 1232;
/// TCP connections served at once, and how long one may sit idle between queries.
const TCP_CONNECTIONS: usize = 256;
const TCP_IDLE: Duration = Duration::from_secs(10);

/// Settings of the DNS proxy (part of ztunnel's config).
#[derive(Clone, Debug, serde::Serialize)]
pub struct DnsConfig {
    /// Where it listens, UDP and TCP.
    pub addr: SocketAddr,
    /// Where names that are not the mesh's go.
    pub upstreams: Vec<SocketAddr>,
    /// How long each upstream may take to answer.
    pub upstream_timeout: Duration,
    /// The cluster's DNS domain (`cluster.local`).
    pub domain: String,
    /// `SO_MARK` of the upstream sockets (ztunnel's own, never captured).
    pub mark: Option<u32>,
    /// Host mode: the host's address, standing for a client on loopback (the host's own
    /// processes, whose queries the host capture sends there).
    pub host_address: Option<IpAddr>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    request_query_type: &'static str,
    request_protocol: &'static str,
    /// `local` (a name of the mesh), `upstream`, or `error` (SERVFAIL, NOTIMP).
    answered_by: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DropLabels {
    reason: &'static str,
}

/// The DNS proxy's metrics (`istio_dns_*`).
#[derive(Clone, Debug, Default)]
pub struct DnsMetrics {
    requests: Family<RequestLabels, Counter>,
    dropped: Family<DropLabels, Counter>,
    upstream: UpstreamMetrics,
}

impl DnsMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "dns_requests",
            "DNS queries answered, by type, transport and who answered",
            m.requests.clone(),
        );
        registry.register(
            "dns_dropped",
            "DNS packets dropped unanswered: malformed, oversized, not a query, or over the in-flight limit",
            m.dropped.clone(),
        );
        registry.register(
            "dns_upstream_requests",
            "DNS queries sent to upstream resolvers",
            m.upstream.requests.clone(),
        );
        registry.register(
            "dns_upstream_failures",
            "DNS queries an upstream resolver did not answer in time or answered wrongly",
            m.upstream.failures.clone(),
        );
        registry.register(
            "dns_upstream_request_duration_seconds",
            "Time upstream resolvers took per try",
            m.upstream.duration.clone(),
        );
        m
    }

    fn drop(&self, reason: &'static str) {
        self.dropped.get_or_create(&DropLabels { reason }).inc();
    }
}

/// How a query arrived.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

impl Transport {
    fn label(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
        }
    }
}

/// What to do with a packet.
#[derive(Debug)]
pub enum Decision {
    /// Drop it unanswered (the reason is the metric's label).
    Drop(&'static str),
    /// Send this answer.
    Answer(Vec<u8>),
    /// Not the mesh's name: ask the upstreams.
    Forward(Box<Message>),
}

/// Decides on one packet from a client in namespace `ns`: parses it and answers a name of the
/// mesh from `snapshot`. Never panics, whatever the bytes (fuzzed).
pub fn decide(snapshot: &Snapshot, packet: &[u8], ns: Option<&str>, domain: &str) -> Decision {
    match Message::from_vec(packet) {
        Ok(query) => decide_parsed(snapshot, query, ns, domain),
        Err(_) => Decision::Drop("malformed"),
    }
}

/// [`decide`] on a packet already parsed.
fn decide_parsed(snapshot: &Snapshot, query: Message, ns: Option<&str>, domain: &str) -> Decision {
    if query.message_type() != MessageType::Query {
        return Decision::Drop("not_a_query");
    }
    if query.op_code() != OpCode::Query {
        return answer_or_drop(&reply_to(&query, ResponseCode::NotImp));
    }
    let [question] = query.queries() else {
        return answer_or_drop(&reply_to(&query, ResponseCode::FormErr));
    };
    let qname = question.name().to_lowercase().to_ascii();
    let qname = qname.trim_end_matches('.');
    let Some(found) = names::lookup(snapshot, qname, ns, domain) else {
        return Decision::Forward(Box::new(query));
    };
    let mut reply = reply_to(&query, ResponseCode::NoError);
    reply.set_authoritative(true);
    for ip in found.addresses {
        let rdata = match (question.query_type(), ip) {
            (RecordType::A, IpAddr::V4(v4)) => RData::A(A(v4)),
            (RecordType::AAAA, IpAddr::V6(v6)) => RData::AAAA(AAAA(v6)),
            _ => continue,
        };
        reply.add_answer(Record::from_rdata(question.name().clone(), TTL, rdata));
    }
    answer_or_drop(&reply)
}

fn answer_or_drop(m: &Message) -> Decision {
    match m.to_vec() {
        Ok(bytes) => Decision::Answer(bytes),
        Err(_) => Decision::Drop("unencodable"),
    }
}

/// The header of a response to `query`, with its question and EDNS when it used EDNS.
fn reply_to(query: &Message, code: ResponseCode) -> Message {
    let mut reply = Message::new();
    reply
        .set_id(query.id())
        .set_message_type(MessageType::Response)
        .set_op_code(query.op_code())
        .set_recursion_desired(query.recursion_desired())
        .set_recursion_available(true)
        .set_checking_disabled(query.checking_disabled())
        .set_response_code(code);
    reply.add_queries(query.queries().iter().cloned());
    if query.extensions().is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(OUR_UDP_PAYLOAD).set_version(0);
        reply.set_edns(edns);
    }
    reply
}

/// What a UDP client of `query` can take in one datagram.
fn udp_limit(query: &Message) -> usize {
    query
        .extensions()
        .as_ref()
        .map_or(PLAIN_UDP_PAYLOAD, |e| usize::from(e.max_payload()).max(PLAIN_UDP_PAYLOAD))
}

/// `answer` cut to its header, question and EDNS, flagged truncated, when it does not fit
/// `limit` bytes.
fn fit(answer: Vec<u8>, limit: usize) -> Vec<u8> {
    if answer.len() <= limit {
        return answer;
    }
    match Message::from_vec(&answer).and_then(|m| m.truncate().to_vec()) {
        Ok(cut) => cut,
        Err(_) => answer,
    }
}

/// The proxy: the mesh's state, the upstreams, the limits and the metrics.
pub struct Resolver {
    state: State,
    domain: String,
    host_address: Option<IpAddr>,
    forwarder: Forwarder,
    metrics: DnsMetrics,
    in_flight: Mutex<InFlight>,
}

/// Queries in flight, per source and in all.
#[derive(Debug, Default)]
struct InFlight {
    by_source: HashMap<IpAddr, usize>,
    total: usize,
}

/// A query's place in the in-flight limits, given back when dropped.
struct Slot<'a> {
    resolver: &'a Resolver,
    source: IpAddr,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let mut guard = self.resolver.in_flight.lock().unwrap_or_else(PoisonError::into_inner);
        let f = &mut *guard;
        if let Some(n) = f.by_source.get_mut(&self.source) {
            *n -= 1;
            f.total -= 1;
            if *n == 0 {
                f.by_source.remove(&self.source);
            }
        }
    }
}

impl Resolver {
    pub fn new(config: &DnsConfig, state: State, metrics: DnsMetrics) -> Arc<Self> {
        let forwarder = Forwarder {
            upstreams: config.upstreams.clone(),
            timeout: config.upstream_timeout,
            mark: config.mark,
            metrics: metrics.upstream.clone(),
        };
        Arc::new(Self {
            state,
            domain: config.domain.clone(),
            host_address: config.host_address,
            forwarder,
            metrics,
            in_flight: Mutex::default(),
        })
    }

    /// A slot for one more query from `source`, if the limits allow it.
    fn slot(&self, source: IpAddr) -> Option<Slot<'_>> {
        let mut f = self.in_flight.lock().unwrap_or_else(PoisonError::into_inner);
        let mine = f.by_source.get(&source).copied().unwrap_or(0);
        if f.total >= IN_FLIGHT || mine >= PER_SOURCE {
            return None;
        }
        *f.by_source.entry(source).or_default() += 1;
        f.total += 1;
        Some(Slot { resolver: self, source })
    }

    /// The answer to `packet` from `client`, or `None` when it is dropped.
    pub async fn answer(&self, packet: &[u8], client: SocketAddr, transport: Transport) -> Option<Vec<u8>> {
        let Some(_slot) = self.slot(client.ip()) else {
            self.metrics.drop("overload");
            return None;
        };
        let Ok(query) = Message::from_vec(packet) else {
            debug!(%client, "DNS packet dropped: malformed");
            self.metrics.drop("malformed");
            return None;
        };
        // What the record needs of the query, read before deciding takes it.
        let qtype = query.query().map_or("other", |q| query_type_label(q.query_type()));
        let limit = udp_limit(&query);
        let snapshot = self.state.snapshot();
        let asker = match self.host_address {
            Some(host) if client.ip().to_canonical().is_loopback() => host,
            _ => client.ip(),
        };
        let ns = snapshot.workload_by_ip(asker).map(|w| w.namespace.as_str());
        let (answer, by) = match decide_parsed(&snapshot, query, ns, &self.domain) {
            Decision::Drop(reason) => {
                debug!(%client, reason, "DNS packet dropped");
                self.metrics.drop(reason);
                return None;
            }
            Decision::Answer(bytes) => {
                let by = if bytes.get(3).is_some_and(|b| b & 0x0f == 0) { "local" } else { "error" };
                (bytes, by)
            }
            Decision::Forward(query) => {
                match self.forwarder.forward(packet, query.id(), transport == Transport::Tcp).await {
                    Ok(bytes) => (bytes, "upstream"),
                    Err(e) => {
                        // Every query fails while the upstream is down: one line per period.
                        if let Some(held_back) = UPSTREAM_FAILED.pass() {
                            warn!(%client, error = %e, held_back, "DNS query not answered upstream: SERVFAIL");
                        } else {
                            debug!(%client, error = %e, "DNS query not answered upstream: SERVFAIL");
                        }
                        match reply_to(&query, ResponseCode::ServFail).to_vec() {
                            Ok(bytes) => (bytes, "error"),
                            Err(_) => return None,
                        }
                    }
                }
            }
        };
        debug!(%client, qtype, answered_by = by, bytes = answer.len(), "DNS query answered");
        let labels =
            RequestLabels { request_query_type: qtype, request_protocol: transport.label(), answered_by: by };
        self.metrics.requests.get_or_create(&labels).inc();
        Some(match transport {
            Transport::Udp => fit(answer, limit),
            Transport::Tcp => answer,
        })
    }
}

fn query_type_label(t: RecordType) -> &'static str {
    match t {
        RecordType::A => "A",
        RecordType::AAAA => "AAAA",
        RecordType::CNAME => "CNAME",
        RecordType::MX => "MX",
        RecordType::NS => "NS",
        RecordType::PTR => "PTR",
        RecordType::SRV => "SRV",
        RecordType::TXT => "TXT",
        _ => "other",
    }
}

/// Serves `resolver` on a bound UDP socket until the task is dropped. A query the capture
/// handed over (its original destination is not this socket's own address) is answered from
/// that destination, so that the pod cannot tell; others from this socket.
pub async fn serve_udp(resolver: Arc<Resolver>, socket: Arc<UdpSocket>, mark: Option<u32>) {
    let own_port = socket.local_addr().map_or(0, |a| a.port());
    let mut buf = vec![0u8; MAX_UDP_QUERY];
    loop {
        let fd = socket.as_raw_fd();
        let received = socket.async_io(tokio::io::Interest::READABLE, || recv_with_dst(fd, &mut buf)).await;
        let (n, client, dst) = match received {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "DNS UDP receive failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        if n > MAX_UDP_QUERY {
            resolver.metrics.drop("oversized");
            continue;
        }
        let packet = buf[..n].to_vec();
        let captured = dst.filter(|d| d.port() != own_port);
        let (resolver, socket) = (resolver.clone(), socket.clone());
        tokio::spawn(async move {
            let Some(answer) = resolver.answer(&packet, client, Transport::Udp).await else { return };
            let sent = match captured {
                Some(from) => send_from(from, client, &answer, mark),
                None => socket.send_to(&answer, client).await.map(drop),
            };
            if let Err(e) = sent {
                resolver.metrics.drop("unsent");
                debug!(%client, error = %e, "DNS answer not sent");
            }
        });
    }
}

/// One datagram into `buf`: its full length (more than `buf` when it was cut), its source and
/// its original destination (`IP_RECVORIGDSTADDR`).
fn recv_with_dst(fd: RawFd, buf: &mut [u8]) -> std::io::Result<(usize, SocketAddr, Option<SocketAddr>)> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, SockaddrStorage, recvmsg};
    let mut cmsg = nix::cmsg_space!(nix::libc::sockaddr_in6);
    let mut iov = [std::io::IoSliceMut::new(buf)];
    let msg = recvmsg::<SockaddrStorage>(
        fd,
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_TRUNC,
    )?;
    let source = msg.address.as_ref().and_then(|a| {
        a.as_sockaddr_in()
            .map(|a| SocketAddr::new(IpAddr::V4(a.ip()), a.port()))
            .or_else(|| a.as_sockaddr_in6().map(|a| SocketAddr::new(IpAddr::V6(a.ip()), a.port())))
    });
    let Some(source) = source else {
        return Err(std::io::Error::other("datagram without a source address"));
    };
    let mut dst = None;
    for c in msg.cmsgs()? {
        match c {
            ControlMessageOwned::Ipv4OrigDstAddr(a) => {
                let ip = std::net::Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
                dst = Some(SocketAddr::new(IpAddr::V4(ip), u16::from_be(a.sin_port)));
            }
            ControlMessageOwned::Ipv6OrigDstAddr(a) => {
                let ip = std::net::Ipv6Addr::from(a.sin6_addr.s6_addr);
                dst = Some(SocketAddr::new(IpAddr::V6(ip), u16::from_be(a.sin6_port)));
            }
            _ => {}
        }
    }
    Ok((msg.bytes, source, dst))
}

/// Sends `bytes` to `to` from `from`, an address that is not ours (the one a captured query
/// was sent to), on a transparent socket carrying ztunnel's mark.
fn send_from(from: SocketAddr, to: SocketAddr, bytes: &[u8], mark: Option<u32>) -> std::io::Result<()> {
    let domain = if from.is_ipv4() { socket2::Domain::IPV4 } else { socket2::Domain::IPV6 };
    let socket = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    transparent(&socket, from)?;
    socket.set_reuse_address(true)?;
    if let Some(mark) = mark {
        socket.set_mark(mark)?;
    }
    socket.bind(&from.into())?;
    socket.send_to(bytes, &to.into())?;
    Ok(())
}

fn transparent(socket: &socket2::Socket, addr: SocketAddr) -> std::io::Result<()> {
    if addr.is_ipv4() { socket.set_ip_transparent_v4(true) } else { socket.set_ip_transparent_v6(true) }
}

/// Serves `resolver` on a TCP listener until the task is dropped: length-prefixed queries,
/// answered in order, a connection closed after [`TCP_IDLE`] without a query.
pub async fn serve_tcp(resolver: Arc<Resolver>, listener: TcpListener) {
    let connections = Arc::new(tokio::sync::Semaphore::new(TCP_CONNECTIONS));
    loop {
        let (stream, client) = match listener.accept().await {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "DNS TCP accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            resolver.metrics.drop("overload");
            continue;
        };
        let resolver = resolver.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = tcp_connection(&resolver, stream, client).await {
                debug!(%client, error = %e, "DNS TCP connection ended");
            }
        });
    }
}

async fn tcp_connection(
    resolver: &Resolver,
    mut stream: TcpStream,
    client: SocketAddr,
) -> std::io::Result<()> {
    loop {
        let len = match tokio::time::timeout(TCP_IDLE, stream.read_u16()).await {
            Ok(Ok(len)) => usize::from(len),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Ok(Err(e)) => return Err(e),
            Err(_) => return Ok(()),
        };
        let mut packet = vec![0; len];
        match tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut packet)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                resolver.metrics.drop("slow_client");
                return Ok(());
            }
        }
        let Some(answer) = resolver.answer(&packet, client, Transport::Tcp).await else { continue };
        let Ok(len) = u16::try_from(answer.len()) else { continue };
        let mut framed = Vec::with_capacity(answer.len() + 2);
        framed.extend_from_slice(&len.to_be_bytes());
        framed.extend_from_slice(&answer);
        // A client that does not read its answers is not waited for.
        match tokio::time::timeout(TCP_IDLE, stream.write_all(&framed)).await {
            Ok(written) => written?,
            Err(_) => {
                resolver.metrics.drop("slow_client");
                return Ok(());
            }
        }
    }
}

/// Binds `config.addr` (and, for an unspecified IPv4 address, its IPv6 twin when the node has
/// IPv6) for UDP and TCP, transparently so that the capture can hand pods' DNS over, and serves
/// `resolver` on each; returns the tasks.
pub async fn start(
    config: &DnsConfig,
    resolver: Arc<Resolver>,
) -> std::io::Result<Vec<tokio::task::JoinHandle<()>>> {
    let mut addrs = vec![config.addr];
    if config.addr.ip() == IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED) {
        addrs.push(SocketAddr::new(IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED), config.addr.port()));
    } else if config.addr.ip() == IpAddr::V4(std::net::Ipv4Addr::LOCALHOST) {
        addrs.push(SocketAddr::new(IpAddr::V6(std::net::Ipv6Addr::LOCALHOST), config.addr.port()));
    }
    let mut tasks = Vec::new();
    for (i, addr) in addrs.into_iter().enumerate() {
        let bound = bind_udp(addr, config.mark).and_then(|udp| {
            let tcp =
                crate::socket::transparent_listener(addr, config.mark).map_err(std::io::Error::other)?;
            Ok((udp, tcp))
        });
        let (udp, tcp) = match bound {
            Ok(b) => b,
            Err(e) if i > 0 => {
                warn!(%addr, error = %e, "DNS proxy not serving IPv6");
                continue;
            }
            Err(e) => return Err(e),
        };
        tasks.push(tokio::spawn(serve_udp(resolver.clone(), Arc::new(udp), config.mark)));
        tasks.push(tokio::spawn(serve_tcp(resolver.clone(), tcp)));
    }
    tracing::info!(
        addr = %config.addr,
        upstreams = ?config.upstreams,
        domain = %config.domain,
        "DNS proxy serving"
    );
    if config.upstreams.is_empty() {
        warn!("the DNS proxy has no upstream resolver: names outside the mesh get SERVFAIL");
    }
    Ok(tasks)
}

/// The UDP socket of the proxy: transparent, told each datagram's original destination,
/// bindable by the next ztunnel too (a hand-over: `SO_REUSEPORT`, which the kernel grants only
/// to the same user; no `SO_REUSEADDR`, with which any process could bind the port beside us),
/// and carrying ztunnel's mark (how the host capture recognises it).
fn bind_udp(addr: SocketAddr, mark: Option<u32>) -> std::io::Result<UdpSocket> {
    use nix::sys::socket::{setsockopt, sockopt};
    let domain = if addr.is_ipv4() { socket2::Domain::IPV4 } else { socket2::Domain::IPV6 };
    let socket = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    socket.set_reuse_port(true)?;
    if let Some(mark) = mark {
        socket.set_mark(mark)?;
    }
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
        setsockopt(&socket, sockopt::Ipv6OrigDstAddr, &true)?;
    } else {
        setsockopt(&socket, sockopt::Ipv4OrigDstAddr, &true)?;
    }
    transparent(&socket, addr)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    UdpSocket::from_std(socket.into())
}

/// A question for `name` of type `qtype`, as a client would send it (tests, the fuzz seeds).
pub fn query_bytes(id: u16, name: &str, qtype: RecordType) -> Option<Vec<u8>> {
    let mut m = Message::new();
    m.set_id(id).set_message_type(MessageType::Query).set_op_code(OpCode::Query).set_recursion_desired(true);
    m.add_query(Query::query(hickory_proto::rr::Name::from_ascii(name).ok()?, qtype));
    m.to_vec().ok()
}

#[cfg(test)]
mod tests;
