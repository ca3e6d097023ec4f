//! Fuzzes what the CNI plugin and ztunnel's enrollment socket read from others: the network
//! configuration a container runtime writes on stdin (with the previous plugins' result),
//! `CNI_ARGS`, and the one-line JSON requests and replies on the socket. The first byte picks
//! the parser.
#![no_main]

use ambient_cni::conf::{NetConf, PodArgs};
use ambient_cni::protocol::{Reply, Request, decode};
use ambient_cni::result::PrevResult;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else { return };
    match which % 4 {
        0 => {
            let Ok(conf) = NetConf::parse(rest) else { return };
            let _ = conf.timeout();
            let Some(prev) = conf.prev_result.as_ref() else { return };
            let Ok(result) = PrevResult::parse(prev) else { return };
            if let Ok(ips) = result.pod_ips("eth0") {
                for (i, ip) in ips.iter().enumerate() {
                    assert!(!ips[..i].contains(ip), "pod addresses repeat: {ips:?}");
                }
            }
            let _ = result.host_interface();
        }
        1 => {
            let Ok(text) = std::str::from_utf8(rest) else { return };
            if let Ok(args) = PodArgs::parse(text) {
                for v in [&args.namespace, &args.name, &args.uid].into_iter().flatten() {
                    assert!(!v.contains(';'), "a value kept its separator: {v:?}");
                }
            }
        }
        2 => {
            if let Ok(req) = decode::<Request>(rest) {
                // What decodes re-encodes and decodes the same.
                let again = ambient_cni::protocol::encode(&req);
                assert!(decode::<Request>(&again).is_ok());
            }
        }
        _ => {
            let _ = decode::<Reply>(rest);
        }
    }
});
