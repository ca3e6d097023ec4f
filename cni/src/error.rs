//! The CNI error result (spec 1.0, "Error"): a code, a message and details, printed on stdout
//! with a non-zero exit. Codes below 100 are the spec's; 100 and up are this plugin's.

use serde::Serialize;

/// The spec's well-known error codes, and this plugin's own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Code {
    /// 1: the runtime asked for a CNI version the plugin does not speak.
    IncompatibleVersion,
    /// 4: a required `CNI_*` variable is missing or malformed.
    InvalidEnvironment,
    /// 5: reading stdin or writing stdout failed.
    Io,
    /// 6: the network configuration or `prevResult` could not be decoded.
    Decode,
    /// 7: the network configuration is well-formed but unusable.
    InvalidConfig,
    /// 11: a transient condition (ztunnel unreachable): the runtime should try again later.
    TryAgainLater,
    /// 100: ztunnel refused the pod (it cannot enroll it, or does not know it yet).
    Refused,
}

impl Code {
    /// The number the spec (or this plugin, from 100 on) gives the code.
    pub fn number(self) -> u32 {
        match self {
            Code::IncompatibleVersion => 1,
            Code::InvalidEnvironment => 4,
            Code::Io => 5,
            Code::Decode => 6,
            Code::InvalidConfig => 7,
            Code::TryAgainLater => 11,
            Code::Refused => 100,
        }
    }
}

/// A failed command, as the runtime gets it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CniError {
    pub code: Code,
    pub msg: String,
    pub details: String,
}

/// The JSON form of [`CniError`].
#[derive(Serialize)]
struct Wire<'a> {
    #[serde(rename = "cniVersion")]
    cni_version: &'a str,
    code: u32,
    msg: &'a str,
    details: &'a str,
}

impl CniError {
    pub fn new(code: Code, msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self { code, msg: msg.into(), details: details.into() }
    }

    /// The error result as printed on stdout, in `cni_version` (the configuration's).
    pub fn to_json(&self, cni_version: &str) -> String {
        let wire = Wire { cni_version, code: self.code.number(), msg: &self.msg, details: &self.details };
        serde_json::to_string(&wire).unwrap_or_else(|_| {
            format!(r#"{{"code":{},"msg":"ambient-cni: cannot encode its error"}}"#, self.code.number())
        })
    }
}

/// `msg: details (code N)`, for logs.
impl std::fmt::Display for CniError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.details.is_empty() {
            write!(f, "{} (code {})", self.msg, self.code.number())
        } else {
            write!(f, "{}: {} (code {})", self.msg, self.details, self.code.number())
        }
    }
}

impl std::error::Error for CniError {}
