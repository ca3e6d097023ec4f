//! Standard load generators and servers: nginx as the server, wrk (HTTP/1.1, keep-alive or a
//! new connection per request) and h2load (HTTP/2) as the clients, and parsers of their output.
//! Our own workers remain only where fixed-rate open-loop load is needed (see load.rs).

use std::path::Path;

use serde::{Deserialize, Serialize};

/// nginx in the server pod: one worker, no logs, a 2-byte answer on every path, HTTP/1.1 on
/// `h1_port` and prior-knowledge h2c on `h2_port`.
pub fn nginx_config(work: &Path, h1_port: u16, h2_port: u16) -> String {
    let w = work.display();
    format!(
        "user root;\n\
         worker_processes 1;\n\
         daemon off;\n\
         master_process off;\n\
         pid {w}/nginx.pid;\n\
         error_log stderr warn;\n\
         worker_rlimit_nofile 262144;\n\
         events {{ worker_connections 65536; multi_accept on; }}\n\
         http {{\n\
           access_log off;\n\
           client_body_temp_path {w}/nginx-body;\n\
           proxy_temp_path {w}/nginx-proxy;\n\
           fastcgi_temp_path {w}/nginx-fastcgi;\n\
           uwsgi_temp_path {w}/nginx-uwsgi;\n\
           scgi_temp_path {w}/nginx-scgi;\n\
           keepalive_requests 1000000;\n\
           tcp_nodelay on;\n\
           server {{ listen {h1_port} backlog=65535; location / {{ return 200 \"ok\"; }} }}\n\
           server {{ listen {h2_port} http2 backlog=65535; location / {{ return 200 \"ok\"; }} }}\n\
         }}\n"
    )
}

/// What wrk printed, as numbers.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Wrk {
    pub requests: u64,
    pub per_second: f64,
    /// connect + read + write + timeout socket errors.
    pub socket_errors: u64,
    pub non_2xx: u64,
    /// Latency percentiles (from `--latency`), microseconds.
    pub p50_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
}

/// `1.23ms`, `456.00us`, `2.00s`, `3.1m` as microseconds.
fn duration_us(s: &str) -> Option<f64> {
    let split = s.find(|c: char| c.is_ascii_alphabetic())?;
    let (n, unit) = s.split_at(split);
    let n: f64 = n.parse().ok()?;
    let scale = match unit {
        "us" => 1.0,
        "ms" => 1e3,
        "s" => 1e6,
        "m" => 60e6,
        "h" => 3600e6,
        _ => return None,
    };
    Some(n * scale)
}

/// Parses wrk's text report (run with `--latency`).
pub fn parse_wrk(out: &str) -> Result<Wrk, String> {
    let mut w = Wrk::default();
    let mut saw_rate = false;
    for line in out.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        if let Some(v) = line.strip_prefix("Requests/sec:") {
            w.per_second = v.trim().parse().map_err(|e| format!("Requests/sec {v:?}: {e}"))?;
            saw_rate = true;
        } else if words.len() >= 3 && words[1] == "requests" && words[2] == "in" {
            w.requests = words[0].parse().map_err(|e| format!("requests {:?}: {e}", words[0]))?;
        } else if let Some(v) = line.strip_prefix("Socket errors:") {
            // connect 0, read 0, write 0, timeout 0
            w.socket_errors =
                v.split(',').filter_map(|part| part.split_whitespace().nth(1)?.parse::<u64>().ok()).sum();
        } else if let Some(v) = line.strip_prefix("Non-2xx or 3xx responses:") {
            w.non_2xx = v.trim().parse().unwrap_or(0);
        } else if words.len() == 2 && words[0] == "50%" {
            w.p50_us = duration_us(words[1]).unwrap_or(0.0);
        } else if words.len() == 2 && words[0] == "99%" {
            w.p99_us = duration_us(words[1]).unwrap_or(0.0);
        } else if words.first() == Some(&"Latency") && words.len() >= 4 {
            w.max_us = duration_us(words[3]).unwrap_or(0.0);
        }
    }
    if !saw_rate {
        return Err(format!("no Requests/sec in wrk's output:\n{out}"));
    }
    Ok(w)
}

/// What h2load printed, as numbers.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct H2load {
    pub per_second: f64,
    pub succeeded: u64,
    pub failed: u64,
    pub errored: u64,
}

pub fn parse_h2load(out: &str) -> Result<H2load, String> {
    let mut h = H2load::default();
    let mut saw_rate = false;
    for line in out.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("finished in ") {
            // finished in 5.00s, 12345.60 req/s, 1.23MB/s
            let rate = rest.split(',').nth(1).and_then(|p| p.trim().strip_suffix(" req/s"));
            h.per_second =
                rate.and_then(|r| r.trim().parse().ok()).ok_or_else(|| format!("h2load rate in {line:?}"))?;
            saw_rate = true;
        } else if let Some(rest) = line.strip_prefix("requests: ") {
            // 61728 total, 61728 started, 61728 done, 61728 succeeded, 0 failed, 0 errored, 0 timeout
            for part in rest.split(',') {
                let mut it = part.split_whitespace();
                let (Some(n), Some(what)) = (it.next(), it.next()) else { continue };
                let n: u64 = n.parse().unwrap_or(0);
                match what {
                    "succeeded" => h.succeeded = n,
                    "failed" => h.failed = n,
                    "errored" => h.errored = n,
                    _ => {}
                }
            }
        }
    }
    if !saw_rate {
        return Err(format!("no 'finished in' line in h2load's output:\n{out}"));
    }
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_report() {
        let out = "Running 5s test @ http://10.2.1.2:8081/
  1 threads and 8 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   271.91us  103.74us   1.01s    92.95%
    Req/Sec    29.10k     1.06k   30.79k    70.00%
  Latency Distribution
     50%  260.00us
     75%  290.00us
     90%  335.00us
     99%  520.00us
  144803 requests in 5.00s, 20.44MB read
  Socket errors: connect 0, read 3, write 0, timeout 2
  Non-2xx or 3xx responses: 7
Requests/sec:  28955.33
Transfer/sec:      4.09MB
";
        let w = parse_wrk(out).expect("parses");
        assert_eq!(w.requests, 144803);
        assert_eq!(w.per_second, 28955.33);
        assert_eq!(w.socket_errors, 5);
        assert_eq!(w.non_2xx, 7);
        assert_eq!(w.p50_us, 260.0);
        assert_eq!(w.p99_us, 520.0);
        assert_eq!(w.max_us, 1.01e6);
        assert!(parse_wrk("unable to connect to 10.2.1.2:8081 Connection refused").is_err());
    }

    #[test]
    fn h2load_report() {
        let out = "finished in 5.00s, 12345.60 req/s, 1.23MB/s
requests: 61728 total, 61728 started, 61728 done, 61720 succeeded, 8 failed, 1 errored, 0 timeout
status codes: 61728 2xx, 0 3xx, 0 4xx, 0 5xx
";
        let h = parse_h2load(out).expect("parses");
        assert_eq!(h.per_second, 12345.6);
        assert_eq!((h.succeeded, h.failed, h.errored), (61720, 8, 1));
        assert!(parse_h2load("connect error").is_err());
    }
}
