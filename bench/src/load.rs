//! The workers the runner starts inside pods: servers (echo, HTTP) and load generators
//! where fixed-rate open-loop load is needed (request/response, HTTP) and the idle connection
//! holder; closed-loop load and connection churn use wrk and h2load (tools.rs).
//! Each generator prints one JSON result on stdout.
//!
//! Open loop: every request has a scheduled send time (`start + k * interval` per connection).
//! When the previous response came back late, latency runs from that scheduled time, so the
//! backlog a slow response causes is counted (no coordinated omission). When the connection was
//! idle and merely woke up late (the timer's millisecond granularity), latency runs from the
//! wake-up: timer jitter is the generator's, not the system's.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Latency percentiles in microseconds.
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize)]
pub struct Latency {
    pub count: usize,
    pub errors: usize,
    pub achieved_rps: f64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

impl Latency {
    fn from_samples(mut us: Vec<u64>, errors: usize, elapsed: Duration) -> Self {
        us.sort_unstable();
        let q = |p: f64| -> u64 {
            if us.is_empty() {
                return 0;
            }
            let i = ((us.len() as f64 * p).ceil() as usize).clamp(1, us.len()) - 1;
            us[i]
        };
        Self {
            count: us.len(),
            errors,
            achieved_rps: us.len() as f64 / elapsed.as_secs_f64(),
            p50_us: q(0.50),
            p90_us: q(0.90),
            p99_us: q(0.99),
            p999_us: q(0.999),
            max_us: us.last().copied().unwrap_or(0),
        }
    }
}

/// Waits for a request's scheduled time; returns when its latency starts: the scheduled time if
/// we are already behind it (backlog counts), else the moment we woke (timer lateness does not).
async fn wait_for(scheduled: Instant) -> Instant {
    if Instant::now() >= scheduled {
        return scheduled;
    }
    tokio::time::sleep_until(scheduled.into()).await;
    Instant::now()
}

/// Echo server: answers every `size`-byte request with `size` bytes; a 1-byte request on a
/// fresh connection is a churn probe. Runs until killed.
pub async fn echo_server(port: u16) -> std::io::Result<()> {
    let listener = TcpListener::bind(("0.0.0.0", port)).await?;
    loop {
        let (mut s, _) = listener.accept().await?;
        let _ = s.set_nodelay(true);
        tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if s.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
    }
}

/// Fixed-rate request/response of `size` bytes over `conns` connections.
pub async fn request_response(
    addr: SocketAddr,
    rate: u64,
    conns: usize,
    size: usize,
    duration: Duration,
) -> Latency {
    let interval = Duration::from_secs_f64(conns as f64 / rate as f64);
    let start = Instant::now() + Duration::from_millis(100);
    let mut tasks = Vec::new();
    for c in 0..conns {
        tasks.push(tokio::spawn(async move {
            let mut samples = Vec::new();
            let mut errors = 0usize;
            let Ok(mut s) = TcpStream::connect(addr).await else { return (samples, 1) };
            let _ = s.set_nodelay(true);
            let req = vec![0x5au8; size];
            let mut resp = vec![0u8; size];
            // Spread the connections' schedules over one interval.
            let offset = interval.mul_f64(c as f64 / conns as f64);
            let mut k = 0u32;
            loop {
                let scheduled = start + offset + interval * k;
                if scheduled >= start + duration {
                    break;
                }
                let from = wait_for(scheduled).await;
                let ok = s.write_all(&req).await.is_ok() && s.read_exact(&mut resp).await.is_ok();
                if ok {
                    samples.push(from.elapsed().as_micros() as u64);
                } else {
                    errors += 1;
                    break;
                }
                k += 1;
            }
            (samples, errors)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        if let Ok((s, e)) = t.await {
            all.extend(s);
            errors += e;
        }
    }
    Latency::from_samples(all, errors, duration)
}

/// Exactly `count` connections one after the other, each one byte each way then closed (a
/// fixed workload for instruction counts). Returns how many succeeded.
pub async fn connections(addr: SocketAddr, count: usize) -> usize {
    let mut ok = 0;
    for _ in 0..count {
        let once = async {
            let mut s = TcpStream::connect(addr).await?;
            s.write_all(b"c").await?;
            let mut b = [0u8; 1];
            s.read_exact(&mut b).await?;
            Ok::<_, std::io::Error>(())
        };
        if matches!(tokio::time::timeout(Duration::from_secs(30), once).await, Ok(Ok(()))) {
            ok += 1;
        }
    }
    ok
}

/// Opens `count` connections (each proven end to end with one echo), prints `READY <n>`, and
/// holds them until stdin closes.
pub async fn hold(addr: SocketAddr, count: usize) -> usize {
    let mut held = Vec::with_capacity(count);
    for _ in 0..count {
        let Ok(Ok(mut s)) = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr)).await
        else {
            break;
        };
        let mut b = [0u8; 1];
        let proven = s.write_all(b"h").await.is_ok() && s.read_exact(&mut b).await.is_ok();
        if !proven {
            break;
        }
        held.push(s);
    }
    let n = held.len();
    // The runner reads this line, then closes our stdin to release the connections.
    tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "READY {n}");
        let _ = out.flush();
        let mut sink = Vec::new();
        let _ = std::io::stdin().read_to_end(&mut sink);
    })
    .await
    .ok();
    drop(held);
    n
}

enum Sender {
    H1(hyper::client::conn::http1::SendRequest<Empty<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Empty<Bytes>>),
}

impl Sender {
    async fn connect(addr: SocketAddr, h2: bool) -> Option<Self> {
        let s = TcpStream::connect(addr).await.ok()?;
        let _ = s.set_nodelay(true);
        let io = TokioIo::new(s);
        if h2 {
            let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await.ok()?;
            tokio::spawn(conn);
            Some(Sender::H2(send))
        } else {
            let (send, conn) = hyper::client::conn::http1::handshake(io).await.ok()?;
            tokio::spawn(conn);
            Some(Sender::H1(send))
        }
    }

    async fn get(&mut self, authority: &str) -> bool {
        let req = |uri: String| hyper::Request::get(uri).body(Empty::new());
        let resp = match self {
            Sender::H1(s) => {
                let Ok(r) = hyper::Request::get("/").header("host", authority).body(Empty::new()) else {
                    return false;
                };
                if s.ready().await.is_err() {
                    return false;
                }
                s.send_request(r).await
            }
            Sender::H2(s) => {
                let Ok(r) = req(format!("http://{authority}/")) else { return false };
                s.send_request(r).await
            }
        };
        match resp {
            Ok(r) if r.status().is_success() => r.into_body().collect().await.is_ok(),
            _ => false,
        }
    }
}

/// HTTP GETs at a fixed rate over `conns` connections (closed-loop maxima come from wrk and
/// h2load, see tools.rs).
pub async fn http_load(
    addr: SocketAddr,
    authority: String,
    h2: bool,
    rate: u64,
    conns: usize,
    duration: Duration,
) -> Latency {
    let interval = Duration::from_secs_f64(conns as f64 / rate as f64);
    let start = Instant::now() + Duration::from_millis(100);
    let mut tasks = Vec::new();
    for c in 0..conns {
        let authority = authority.clone();
        tasks.push(tokio::spawn(async move {
            let (mut samples, mut errors) = (Vec::new(), 0usize);
            let Some(mut s) = Sender::connect(addr, h2).await else { return (samples, 1) };
            let offset = interval.mul_f64(c as f64 / conns as f64);
            let mut k = 0u32;
            loop {
                let scheduled = start + offset + interval * k;
                if scheduled >= start + duration {
                    break;
                }
                let from = wait_for(scheduled).await;
                if s.get(&authority).await {
                    samples.push(from.elapsed().as_micros() as u64);
                } else {
                    errors += 1;
                }
                k += 1;
            }
            (samples, errors)
        }));
    }
    let (mut all, mut errors) = (Vec::new(), 0);
    for t in tasks {
        if let Ok((s, e)) = t.await {
            all.extend(s);
            errors += e;
        }
    }
    Latency::from_samples(all, errors, duration)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_pick_the_right_ranks() {
        let l = Latency::from_samples((1..=1000).collect(), 0, Duration::from_secs(1));
        assert_eq!((l.p50_us, l.p90_us, l.p99_us, l.p999_us, l.max_us), (500, 900, 990, 999, 1000));
        assert_eq!(l.achieved_rps, 1000.0);
    }

    #[tokio::test]
    async fn generators_measure_a_local_echo_server() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        drop(listener);
        tokio::spawn(echo_server(addr.port()));
        tokio::time::sleep(Duration::from_millis(50)).await;
        let l = request_response(addr, 200, 2, 64, Duration::from_millis(500)).await;
        assert!(l.count >= 90 && l.errors == 0, "{l:?}");
    }
}
