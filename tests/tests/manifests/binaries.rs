//! Our binaries as the manifests run them: which one a container runs, the flags and environment
//! their clap definitions accept, the command line a container amounts to, and what the binary
//! makes of it (ports, files, names), read from its own `Args` and `Config`.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{ArgAction, CommandFactory, Parser};

/// The binaries our images run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Binary {
    Ztunnel,
    Waypoint,
    Controller,
    Cni,
}

/// Environment read outside clap: `common::telemetry` reads `RUST_LOG`.
const TELEMETRY_ENV: [&str; 1] = ["RUST_LOG"];

impl Binary {
    /// The binary a container runs, from its image's name (registry and tag aside) and its
    /// command. As deploy/images/build.sh builds them: ambient-ztunnel's entrypoint is ztunnel
    /// and it also carries ambient-cni; ambient-waypoint and ambient-controller run theirs.
    pub fn of(image: &str, command: Option<&[String]>) -> Result<Self, String> {
        let repo = image.rsplit('/').next().unwrap_or(image);
        let repo = repo.split(['@', ':']).next().unwrap_or(repo);
        let from_image = match repo {
            "ambient-ztunnel" => Self::Ztunnel,
            "ambient-waypoint" => Self::Waypoint,
            "ambient-controller" => Self::Controller,
            _ => {
                return Err(format!(
                    "image {image:?} is not one of ours (ambient-ztunnel, -waypoint, -controller)"
                ));
            }
        };
        let Some(program) = command.and_then(|c| c.first()) else { return Ok(from_image) };
        let program = program.rsplit('/').next().unwrap_or(program);
        match (from_image, program) {
            (Self::Ztunnel, "ztunnel")
            | (Self::Waypoint, "waypoint")
            | (Self::Controller, "ambient-controller") => Ok(from_image),
            (Self::Ztunnel, "ambient-cni") => Ok(Self::Cni),
            _ => Err(format!("command {program:?} is not a binary of image {image:?}")),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Ztunnel => "ztunnel",
            Self::Waypoint => "waypoint",
            Self::Controller => "ambient-controller",
            Self::Cni => "ambient-cni",
        }
    }

    /// The binary's clap definition, built (defaults and value parsers in place).
    pub fn command(self) -> clap::Command {
        let mut cmd = match self {
            Self::Ztunnel => ztunnel::config::Args::command(),
            Self::Waypoint => waypoint::config::Args::command(),
            Self::Controller => controller::config::Args::command(),
            Self::Cni => ambient_cni::cli::Args::command(),
        };
        cmd.build();
        cmd
    }

    /// Whether the process reads `name` from its environment.
    pub fn reads_env(self, name: &str) -> bool {
        let telemetry = self != Self::Cni && TELEMETRY_ENV.contains(&name);
        telemetry || all_args(&self.command()).iter().any(|a| a.get_env().is_some_and(|e| e == name))
    }

    /// What the binary makes of `argv` (a full command line, environment folded in): parsed by
    /// its own `Args`, then its own `Config` when it has one.
    pub fn facts(self, argv: &[OsString]) -> Result<Facts, String> {
        let mut facts = Facts::default();
        match self {
            Self::Ztunnel => {
                use ztunnel::config::{self as c, Args, Config};
                let args = Args::try_parse_from(argv).map_err(|e| e.to_string())?;
                let cp = &args.control_plane;
                if !args.no_proxy {
                    facts.ports.extend([
                        ("outbound capture", c::DEFAULT_OUTBOUND_ADDR.port()),
                        ("inbound plaintext capture", c::DEFAULT_INBOUND_PLAINTEXT_ADDR.port()),
                        ("HBONE", c::DEFAULT_INBOUND_ADDR.port()),
                    ]);
                }
                facts.metrics_port = Some(args.metrics_addr.port());
                facts.readiness_port = Some(args.readiness_addr.port());
                let istiod = cp.local_config.is_none()
                    && cp.xds_address.as_deref().unwrap_or(c::DEFAULT_XDS_ADDRESS).starts_with("https://");
                facts.root_cert = istiod.then(|| cp.xds_root_cert.clone());
                facts.token = cp.xds_token_path.clone();
                facts.drain_seconds = Some(args.drain_period_seconds);
                facts.bpf_pin_dir = args.redirect.then(|| args.bpf_pin_dir.clone());
                let again = Args::try_parse_from(argv).map_err(|e| e.to_string())?;
                Config::from_args(again).map_err(|e| format!("ztunnel's Config refuses it: {e}"))?;
            }
            Self::Waypoint => {
                use waypoint::config::{Args, Config};
                let args = Args::try_parse_from(argv).map_err(|e| e.to_string())?;
                facts.ports.push(("HBONE", args.listen_addr.port()));
                facts.metrics_port = Some(args.metrics_addr.port());
                facts.readiness_port = Some(args.readiness_addr.port());
                facts.root_cert = Some(args.control_plane.xds_root_cert.clone());
                facts.token = args.control_plane.xds_token_path.clone();
                facts.drain_seconds = Some(args.drain_period_seconds);
                let again = Args::try_parse_from(argv).map_err(|e| e.to_string())?;
                Config::from_args(again).map_err(|e| format!("the waypoint's Config refuses it: {e}"))?;
            }
            Self::Controller => {
                use controller::config::{Args, Config};
                let args = Args::try_parse_from(argv).map_err(|e| e.to_string())?;
                facts.ports.push(("xDS", args.xds_addr.port()));
                facts.xds_port = Some(args.xds_addr.port());
                facts.metrics_port = Some(args.metrics_addr.port());
                facts.readiness_port = Some(args.readiness_addr.port());
                if args.local_ca.is_none() {
                    facts.root_cert = Some(args.root_cert.clone());
                    facts.token = Some(args.token_path.clone());
                }
                facts.gateway_class = Some((args.gateway_class.clone(), args.controller_name.clone()));
                facts.lease_name = Some(args.lease_name.clone());
                let config = Config::from_args(args)
                    .map_err(|e| format!("the controller's Config refuses it: {e}"))?;
                facts.advertised_xds = Some(config.waypoint_xds_address);
            }
            Self::Cni => {
                use ambient_cni::cli::{Args, Command};
                let args = Args::try_parse_from(argv).map_err(|e| e.to_string())?;
                if let Command::Install { bin_dir, conf_dir, socket, .. } = args.command {
                    facts.cni_install = Some(CniInstall { bin_dir, conf_dir, socket });
                }
            }
        }
        if let Some(port) = facts.metrics_port {
            facts.ports.push(("metrics", port));
        }
        if let Some(port) = facts.readiness_port {
            facts.ports.push(("readiness", port));
        }
        Ok(facts)
    }
}

/// What a binary does with a container's command line and environment.
#[derive(Debug, Default)]
pub struct Facts {
    /// Ports it listens on, reachable from outside the pod, by role.
    pub ports: Vec<(&'static str, u16)>,
    pub metrics_port: Option<u16>,
    pub readiness_port: Option<u16>,
    /// The mesh root it verifies istiod with.
    pub root_cert: Option<PathBuf>,
    /// The token (audience istio-ca) it sends to istiod.
    pub token: Option<PathBuf>,
    /// How long it drains after SIGTERM.
    pub drain_seconds: Option<u64>,
    /// The controller: the GatewayClass it owns and the controllerName it answers to.
    pub gateway_class: Option<(String, String)>,
    /// The controller: its leader-election Lease.
    pub lease_name: Option<String>,
    /// The controller: the xDS address it gives the waypoints it deploys.
    pub advertised_xds: Option<String>,
    pub xds_port: Option<u16>,
    /// ztunnel with capture: where it pins it (must be the node's bpffs).
    pub bpf_pin_dir: Option<PathBuf>,
    /// `ambient-cni install`: where it installs and the socket it tells the plugin.
    pub cni_install: Option<CniInstall>,
}

#[derive(Debug)]
pub struct CniInstall {
    pub bin_dir: PathBuf,
    pub conf_dir: PathBuf,
    pub socket: PathBuf,
}

/// Every argument of `cmd` and of its subcommands (recursively).
pub fn all_args(cmd: &clap::Command) -> Vec<clap::Arg> {
    let mut out: Vec<clap::Arg> = cmd.get_arguments().cloned().collect();
    for sub in cmd.get_subcommands() {
        out.extend(all_args(sub));
    }
    out
}

/// Flags (`--name` or `-n`) of `tokens` that `cmd` (or the subcommand the tokens select) does
/// not define, as written.
pub fn unknown_flags(cmd: &clap::Command, tokens: &[String]) -> Vec<String> {
    let mut scope = cmd;
    let mut unknown = Vec::new();
    for token in tokens {
        if token == "--" {
            break;
        }
        if let Some(long) = token.strip_prefix("--") {
            let long = long.split('=').next().unwrap_or(long);
            let known = |c: &clap::Command| c.get_arguments().any(|a| a.get_long() == Some(long));
            if !(known(scope) || known(cmd) || matches!(long, "help" | "version")) {
                unknown.push(format!("--{long}"));
            }
        } else if let Some(shorts) = token.strip_prefix('-').filter(|s| !s.is_empty()) {
            let short = shorts.chars().next().unwrap_or('-');
            let known = |c: &clap::Command| c.get_arguments().any(|a| a.get_short() == Some(short));
            if !(known(scope) || known(cmd) || short == 'h') {
                unknown.push(format!("-{short}"));
            }
        } else if let Some(sub) = scope.find_subcommand(token) {
            scope = sub;
        }
    }
    unknown
}

/// The command line `binary` gets from a container: its program, the container's arguments,
/// then each environment variable the binary reads and the command line does not already set,
/// as the flag it stands for (clap lets the command line win over the environment, so the
/// parse is the same). Every value goes through the flag's own value parser; errors name the
/// variable.
pub fn command_line(
    binary: Binary,
    args: &[String],
    env: &[(String, String)],
) -> Result<Vec<OsString>, Vec<String>> {
    let cmd = binary.command();
    let mut argv: Vec<OsString> = vec![binary.name().into()];
    argv.extend(args.iter().map(OsString::from));
    let matches = cmd.clone().try_get_matches_from(&argv).map_err(|e| vec![render_clap_error(&e)])?;
    let sub = matches.subcommand().and_then(|(name, m)| Some((cmd.find_subcommand(name)?, m)));
    let mut root_flags = Vec::new();
    let mut sub_flags = Vec::new();
    let mut problems = Vec::new();
    for (name, value) in env {
        let (scope, scope_matches, flags) = match sub {
            Some((sub_cmd, sub_matches))
                if sub_cmd.get_arguments().any(|a| a.get_env().is_some_and(|e| e == name.as_str())) =>
            {
                (sub_cmd, sub_matches, &mut sub_flags)
            }
            _ => (&cmd, &matches, &mut root_flags),
        };
        let Some(arg) = scope.get_arguments().find(|a| a.get_env().is_some_and(|e| e == name.as_str()))
        else {
            continue;
        };
        if scope_matches.value_source(arg.get_id().as_str()) == Some(clap::parser::ValueSource::CommandLine) {
            continue;
        }
        let Some(long) = arg.get_long() else {
            problems
                .push(format!("env {name}: its argument {} has no long flag to check it with", arg.get_id()));
            continue;
        };
        // A flag's value from the environment goes through its value parser as on the command
        // line; a boolean flag takes `true` or `false` there.
        let flag = match arg.get_action() {
            ArgAction::SetTrue | ArgAction::SetFalse => match value.as_str() {
                "true" | "false" => {
                    let set = (value == "true") == matches!(arg.get_action(), ArgAction::SetTrue);
                    set.then(|| OsString::from(format!("--{long}")))
                }
                _ => {
                    problems.push(format!("env {name}={value:?}: a flag's variable must be true or false"));
                    continue;
                }
            },
            _ => Some(OsString::from(format!("--{long}={value}"))),
        };
        let Some(flag) = flag else { continue };
        let mut alone = argv.clone();
        if std::ptr::eq(scope, &cmd) {
            alone.insert(1, flag.clone());
        } else {
            alone.push(flag.clone());
        }
        if let Err(e) = cmd.clone().try_get_matches_from(&alone) {
            problems.push(format!("env {name}={value:?}: {}", render_clap_error(&e)));
            continue;
        }
        flags.push(flag);
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    let mut full = vec![argv[0].clone()];
    full.extend(root_flags);
    full.extend(argv.into_iter().skip(1));
    full.extend(sub_flags);
    Ok(full)
}

/// clap's error on one line.
fn render_clap_error(e: &clap::Error) -> String {
    let text = e.render().to_string();
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("Usage:") && !l.starts_with("For more information"))
        .collect::<Vec<_>>()
        .join(" ")
}
