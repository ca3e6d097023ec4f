//! Pod-side helpers for the local demo (`deploy/local-mesh.sh`), run inside pod namespaces:
//! `serve` is a line echo server that says who it is and which client address it saw; `talk`
//! opens connections and reports who answered, or that the connection was refused.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(about = "Pod-side helpers for the local mesh demo")]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Answer each line with `<name> saw <client ip>: <line>`.
    Serve {
        #[arg(long)]
        name: String,
        #[arg(long, default_value_t = 8080)]
        port: u16,
    },
    /// HTTP/1.1 + h2c: answer each request with `<name> saw <client ip>: <method> <path>`.
    HttpServe {
        #[arg(long)]
        name: String,
        #[arg(long, default_value_t = 8081)]
        port: u16,
    },
    /// Connect `count` times to `dst`, send a line, and report the answers.
    Talk {
        dst: SocketAddr,
        #[arg(long, default_value_t = 1)]
        count: usize,
        #[arg(long, default_value = "hello")]
        line: String,
    },
}

fn serve(name: String, port: u16) -> std::io::Result<()> {
    let listener = TcpListener::bind(("0.0.0.0", port))?;
    mesh_tests::echo::serve_lines(listener, |name, peer, line| format!("{name} saw {peer}: {line}"), name);
    loop {
        std::thread::park();
    }
}

/// One connection: the reply, or why there was none.
fn talk_once(dst: SocketAddr, line: &str) -> Result<String, String> {
    let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(3)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(10))).map_err(|e| e.to_string())?;
    writeln!(s, "{line}").map_err(|e| e.to_string())?;
    s.shutdown(Shutdown::Write).map_err(|e| e.to_string())?;
    let mut reply = String::new();
    s.read_to_string(&mut reply).map_err(|e| e.to_string())?;
    match reply.trim_end() {
        "" => Err("closed without a reply".into()),
        r => Ok(r.to_string()),
    }
}

fn http_serve(name: String, port: u16) -> std::io::Result<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(("0.0.0.0", port)).await?;
        loop {
            let (stream, peer) = listener.accept().await?;
            let name = name.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let body = format!("{name} saw {}: {} {}\n", peer.ip(), req.method(), req.uri().path());
                    async move {
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(http_body_util::Full::new(
                            bytes::Bytes::from(body),
                        )))
                    }
                });
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    })
}

#[allow(clippy::print_stdout)]
fn main() -> std::io::Result<()> {
    match Args::parse().command {
        Command::Serve { name, port } => serve(name, port),
        Command::HttpServe { name, port } => http_serve(name, port),
        Command::Talk { dst, count, line } => {
            let mut tally: BTreeMap<String, usize> = BTreeMap::new();
            for _ in 0..count {
                let outcome = talk_once(dst, &line);
                if count == 1 {
                    match &outcome {
                        Ok(r) => println!("      {r}"),
                        Err(e) => println!("      refused: {e}"),
                    }
                }
                let key = match outcome {
                    Ok(r) => r.split(' ').next().unwrap_or_default().to_string(),
                    Err(_) => "refused".to_string(),
                };
                *tally.entry(key).or_default() += 1;
            }
            if count > 1 {
                let parts: Vec<String> = tally.iter().map(|(k, v)| format!("{k}: {v}")).collect();
                println!("      {count} connections -> {}", parts.join(", "));
            }
            Ok(())
        }
    }
}
