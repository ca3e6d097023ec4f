//! A line echo server for pods in the root-only tests and the local demo: each line a client
//! sends is answered with one line saying who answered and which client address it saw, so a
//! reply proves both the path and whether the source address was kept.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;

/// Serves `listener` on background threads; each line gets `reply(name, client ip, line)`.
pub fn serve_lines(listener: TcpListener, reply: fn(&str, &str, &str) -> String, name: String) {
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let name = name.clone();
            std::thread::spawn(move || {
                let peer = stream.peer_addr().map(|p| p.ip().to_string()).unwrap_or_default();
                let Ok(mut out) = stream.try_clone() else { return };
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { return };
                    if writeln!(out, "{}", reply(&name, &peer, &line)).is_err() {
                        return;
                    }
                }
            });
        }
    });
}
