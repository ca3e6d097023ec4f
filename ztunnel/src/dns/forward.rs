//! Queries that are not the mesh's go to the upstream resolvers, as received (EDNS and all):
//! each upstream in turn gets one try within the timeout, over UDP unless the client asked over
//! TCP, and over TCP again when its UDP answer comes back truncated. Sockets carry ztunnel's
//! mark so that the capture never takes them.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use hickory_proto::op::Message;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, UdpSocket};

/// Largest answer read from an upstream over UDP.
const MAX_UDP: usize = 4096;

/// Why no upstream answered.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("no upstream resolver is configured")]
    NoUpstream,
    #[error("upstream {upstream}: {reason}")]
    Upstream { upstream: SocketAddr, reason: String },
}

/// The upstream resolvers and how long each may take.
#[derive(Clone, Debug)]
pub struct Forwarder {
    pub upstreams: Vec<SocketAddr>,
    pub timeout: Duration,
    pub mark: Option<u32>,
    pub metrics: UpstreamMetrics,
}

/// `istio_dns_upstream_*`.
#[derive(Clone, Debug)]
pub struct UpstreamMetrics {
    pub requests: Counter,
    pub failures: Counter,
    pub duration: Histogram,
}

impl Default for UpstreamMetrics {
    fn default() -> Self {
        let buckets = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];
        Self { requests: Counter::default(), failures: Counter::default(), duration: Histogram::new(buckets) }
    }
}

impl Forwarder {
    /// The answer of the first upstream that gives one to `query` (whose id is `id`).
    pub async fn forward(&self, query: &[u8], id: u16, tcp: bool) -> Result<Vec<u8>, ForwardError> {
        let mut last = ForwardError::NoUpstream;
        for &upstream in &self.upstreams {
            self.metrics.requests.inc();
            let started = Instant::now();
            let result = tokio::time::timeout(self.timeout, self.try_one(upstream, query, id, tcp)).await;
            self.metrics.duration.observe(started.elapsed().as_secs_f64());
            let reason = match result {
                Ok(Ok(answer)) => return Ok(answer),
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("no answer within {:?}", self.timeout),
            };
            self.metrics.failures.inc();
            tracing::debug!(%upstream, %reason, "upstream DNS resolver failed; trying the next");
            last = ForwardError::Upstream { upstream, reason };
        }
        Err(last)
    }

    async fn try_one(
        &self,
        upstream: SocketAddr,
        query: &[u8],
        id: u16,
        tcp: bool,
    ) -> std::io::Result<Vec<u8>> {
        if !tcp {
            let answer = self.udp(upstream, query, id).await?;
            if !Message::from_vec(&answer).is_ok_and(|m| m.truncated()) {
                return Ok(answer);
            }
        }
        self.tcp(upstream, query, id).await
    }

    fn socket(&self, upstream: SocketAddr, ty: Type, protocol: Protocol) -> std::io::Result<Socket> {
        let domain = if upstream.is_ipv4() { Domain::IPV4 } else { Domain::IPV6 };
        let socket = Socket::new(domain, ty, Some(protocol))?;
        if let Some(mark) = self.mark {
            socket.set_mark(mark)?;
        }
        socket.set_nonblocking(true)?;
        Ok(socket)
    }

    async fn udp(&self, upstream: SocketAddr, query: &[u8], id: u16) -> std::io::Result<Vec<u8>> {
        let socket = self.socket(upstream, Type::DGRAM, Protocol::UDP)?;
        let any: SocketAddr =
            if upstream.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().map_err(invalid)?;
        socket.bind(&SockAddr::from(any))?;
        let socket = UdpSocket::from_std(socket.into())?;
        socket.connect(upstream).await?;
        socket.send(query).await?;
        let mut buf = vec![0; MAX_UDP];
        loop {
            let n = socket.recv(&mut buf).await?;
            // Anything but the answer to this query (a stray or spoofed datagram) is ignored.
            if answers(&buf[..n], id) {
                buf.truncate(n);
                return Ok(buf);
            }
        }
    }

    async fn tcp(&self, upstream: SocketAddr, query: &[u8], id: u16) -> std::io::Result<Vec<u8>> {
        let socket = self.socket(upstream, Type::STREAM, Protocol::TCP)?;
        let std: std::net::TcpStream = socket.into();
        let mut stream = TcpSocket::from_std_stream(std).connect(upstream).await?;
        let len = u16::try_from(query.len()).map_err(invalid)?;
        let mut framed = Vec::with_capacity(query.len() + 2);
        framed.extend_from_slice(&len.to_be_bytes());
        framed.extend_from_slice(query);
        stream.write_all(&framed).await?;
        let len = stream.read_u16().await?;
        let mut answer = vec![0; usize::from(len)];
        stream.read_exact(&mut answer).await?;
        if !answers(&answer, id) {
            return Err(invalid("the answer is not one to this query"));
        }
        Ok(answer)
    }
}

/// Whether `bytes` is a DNS response with id `id`.
fn answers(bytes: &[u8], id: u16) -> bool {
    bytes.len() >= 12 && u16::from_be_bytes([bytes[0], bytes[1]]) == id && bytes[2] & 0x80 != 0
}

fn invalid(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string())
}

/// The name servers of a `resolv.conf` (port 53), in order.
pub fn resolv_conf(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|rest| rest.split_whitespace().next())
        .filter_map(|ip| ip.split('%').next()?.parse::<std::net::IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_servers_come_from_resolv_conf() {
        let text = "# generated\nsearch demo.svc.cluster.local\nnameserver 10.96.0.10\nnameserver fe80::1%eth0\nnameserver  bogus\noptions ndots:5\n";
        let got = resolv_conf(text);
        assert_eq!(got, ["10.96.0.10:53".parse().expect("addr"), "[fe80::1]:53".parse().expect("addr")]);
    }

    #[test]
    fn only_a_response_with_the_query_id_answers_it() {
        let mut r = vec![0u8; 12];
        r[0..2].copy_from_slice(&0x1234u16.to_be_bytes());
        assert!(!answers(&r, 0x1234), "a query, not a response");
        r[2] = 0x80;
        assert!(answers(&r, 0x1234));
        assert!(!answers(&r, 0x1235));
        assert!(!answers(&r[..11], 0x1234));
    }
}
