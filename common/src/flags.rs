//! Envoy's response flags, as both proxies report them in `response_flags` (metrics label and
//! access log): why a connection or request ended the way it did when the answer was local.

/// One response flag. `None` renders as `-`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize)]
pub enum ResponseFlag {
    #[default]
    None,
    /// `NR`: no route (or no destination) for the request.
    NoRoute,
    /// `UH`: no healthy upstream endpoint.
    NoHealthyUpstream,
    /// `UF`: the upstream connection failed.
    UpstreamConnectionFailure,
    /// `UO`: the upstream's request cap was reached (circuit breaking).
    UpstreamOverflow,
    /// `UT`: the upstream did not answer in time.
    UpstreamRequestTimeout,
    /// `URX`: retries ran out (the last answer is passed on).
    UpstreamRetryLimitExceeded,
    /// `DC`: the downstream went away before the exchange ended.
    DownstreamConnectionTermination,
    /// `DPE`: the downstream request could not be understood (e.g. a path that does not
    /// normalize).
    DownstreamProtocolError,
    /// `SI`: the downstream stream stalled past its idle timeout.
    StreamIdleTimeout,
    /// `FI`: an injected fault aborted the request.
    FaultInjected,
    /// `DI`: an injected fault delayed the request.
    DelayInjected,
    /// `RL`: a local rate limit refused the request.
    RateLimited,
}

impl ResponseFlag {
    /// The flag as Envoy writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            ResponseFlag::None => "-",
            ResponseFlag::NoRoute => "NR",
            ResponseFlag::NoHealthyUpstream => "UH",
            ResponseFlag::UpstreamConnectionFailure => "UF",
            ResponseFlag::UpstreamOverflow => "UO",
            ResponseFlag::UpstreamRequestTimeout => "UT",
            ResponseFlag::UpstreamRetryLimitExceeded => "URX",
            ResponseFlag::DownstreamConnectionTermination => "DC",
            ResponseFlag::DownstreamProtocolError => "DPE",
            ResponseFlag::StreamIdleTimeout => "SI",
            ResponseFlag::FaultInjected => "FI",
            ResponseFlag::DelayInjected => "DI",
            ResponseFlag::RateLimited => "RL",
        }
    }
}

impl std::fmt::Display for ResponseFlag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
