//! Writes the seed corpora under `fuzz/seeds/<target>/` from the demo mesh
//! (`deploy/local-mesh.yaml`) and `examples/seeds/extra.yaml`. Run after a schema change:
//! `cargo +nightly run --example seeds` in `fuzz/` (an ordinary build, no sanitizer).

use std::path::{Path, PathBuf};

use ambient_fuzz::{join_name, record};
use common::xds::LocalConfig;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let seeds = root.join("seeds");
    let mut configs = Vec::new();
    for (label, path) in
        [("mesh", root.join("../deploy/local-mesh.yaml")), ("extra", root.join("examples/seeds/extra.yaml"))]
    {
        let text = std::fs::read_to_string(&path)?;
        let texts = [(label.to_string(), text.clone())];
        let resources = if common::xds::local::is_objects(&texts) {
            write(&seeds.join("translate"), label, text.as_bytes())?;
            let t = common::translate::Translator::default().translate_yaml([(label, text.as_str())]);
            if let Some(refused) = t.refusals().next() {
                return Err(format!("{label}: {refused}").into());
            }
            t.resources
        } else {
            write(&seeds.join("local_yaml"), label, text.as_bytes())?;
            LocalConfig::from_yaml(&text)?.to_resources()?
        };
        // Seeds are worth most when they get past every check: the state must accept them all.
        let (_state, handlers) = ambient_fuzz::fresh_state();
        for r in &resources {
            let raw = ambient_fuzz::raw(&r.name, r.type_url, &r.body.value);
            let rejected = handlers.apply(r.type_url, vec![raw], vec![]).unwrap_or_default();
            if !rejected.is_empty() {
                return Err(format!("{label}: seed {} is rejected: {rejected:?}", r.name).into());
            }
        }
        configs.push((label, resources));
    }

    for (label, resources) in &configs {
        let mut state = Vec::new();
        for (i, r) in resources.iter().enumerate() {
            let target = match r.type_url {
                proto::ADDRESS_TYPE_URL => "xds_address",
                proto::AUTHORIZATION_TYPE_URL => "xds_authorization",
                _ => continue,
            };
            write(&seeds.join(target), &format!("{label}-{i}"), &join_name(None, &r.body.value))?;
            let kind = if target == "xds_address" { 0 } else { 1 };
            state.extend(record(kind, None, &r.body.value));
        }
        write(&seeds.join("xds_state"), label, &state)?;
    }

    let authorities = [
        "CONNECT 10.0.0.1:8080",
        "CONNECT [fd00::1]:15008",
        "CONNECT echo.demo.svc.cluster.local:80",
        "GET http://10.0.0.1:80/x",
    ];
    for (i, a) in authorities.iter().enumerate() {
        write(&seeds.join("connect_authority"), &format!("seed-{i}"), a.as_bytes())?;
    }
    let forwarded = [
        "for=\"10.1.1.2:4000\";host=echo.demo",
        "for=\"[2001:db8::1]:80\";proto=https",
        "by=a, For=10.0.0.3",
        "for=unknown",
    ];
    for (i, f) in forwarded.iter().enumerate() {
        write(&seeds.join("forwarded"), &format!("seed-{i}"), f.as_bytes())?;
    }
    Ok(())
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join(name), bytes)
}
