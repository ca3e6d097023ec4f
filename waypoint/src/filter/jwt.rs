//! RequestAuthentication (Istio semantics): finds the request's JWT where the rules say, verifies
//! it against its issuer's keys (signature, `iss`, `aud`, `exp`, `nbf`) and yields the request
//! principal (`<iss>/<sub>`) and claims for authorization. Keys come inline or from a JWKS URL,
//! fetched within a time and size bound and refreshed in the background (the last good set stays
//! when a refresh fails).
//!
//! What is a token, and what is refused with 401:
//! - Each rule reads the places it lists (`fromHeaders`, `fromParams`, `fromCookies`), or, when it
//!   lists none, Envoy's defaults: `Authorization: Bearer <token>` and the `access_token` query
//!   parameter. A place no rule reads is not looked at: with every rule on `x-jwt`, a token in
//!   `Authorization` goes upstream untouched and unverified, as in Envoy.
//! - A header prefix is matched ignoring ASCII case, and blanks after it are skipped (`bearer`,
//!   `BEARER \t<token>`). An `Authorization` value with another scheme (`Basic ...`) is not a JWT
//!   and is ignored; in any other token header a value without the prefix is refused (Istio: "If
//!   the header doesn't have this exact prefix, it is considered invalid").
//! - One token per request at most: two `Authorization: Bearer` values, two `access_token`
//!   parameters, or a header token plus a parameter token are refused. Envoy verifies each and
//!   needs all valid, and Istio calls several tokens unsupported ("the output principal of such
//!   requests is undefined"); refusing keeps an upstream from reading a token other than the one
//!   verified here.
//! - A token is one compact JWS: three non-empty base64url parts joined by dots, nothing else (an
//!   empty value, blanks, non-ASCII bytes are refused).
//! - The token's `iss` must be the issuer of a rule that reads the place it was found in.
//!
//! A request without a token passes (an authorization policy on `requestPrincipals` requires one).
//! A verified token is removed from the header it came from unless `forwardOriginalToken`; one in a
//! cookie stays (as in Envoy), and so does one in a query parameter (Envoy rewrites the path to
//! drop it; this filter does not touch the path). The `outputClaimToHeaders` headers are
//! removed from every request first, so a client cannot supply them; a verified token then sets
//! them from string, number and bool claims (as Envoy), lists of those joined with `,` (Envoy
//! skips lists), and `a.b` reaches a nested claim when there is no top-level `a.b` claim.
//!
//! Errors and logs name the place and the issuer, never the token.

use std::borrow::Cow;
use std::fmt;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use base64::Engine;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{Jwk, JwkSet, PublicKeyUse};
use jsonwebtoken::{DecodingKey, Validation};
use proto::waypoint as wp;
use serde::Deserialize;
use tracing::{debug, warn};

/// How often a JWKS URL is fetched again.
pub const JWKS_REFRESH: Duration = Duration::from_secs(300);
/// How long one JWKS fetch may take, connect to last body byte.
pub const JWKS_FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest JWKS body accepted.
pub const MAX_JWKS_BYTES: usize = 256 * 1024;
/// The most keys a JWKS may hold (a token without `kid` is tried against each).
pub const MAX_JWKS_KEYS: usize = 64;
/// The query parameter read by default.
const DEFAULT_PARAM: &str = "access_token";
/// The `Authorization` prefix read by default.
const BEARER: &str = "Bearer ";

/// One issuer's rule, with its keys.
#[derive(Debug)]
pub struct JwtRule {
    pub issuer: String,
    pub audiences: Vec<String>,
    pub forward_original_token: bool,
    pub claim_headers: Vec<(http::HeaderName, String)>,
    pub jwks_uri: Option<String>,
    /// Where this rule reads tokens (never empty: the defaults when the config lists none).
    locations: Vec<Location>,
    keys: RwLock<Option<Arc<Vec<Key>>>>,
}

/// A place a rule reads tokens from.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Location {
    /// The value after `prefix` (matched ignoring ASCII case; empty: the whole value).
    Header {
        name: http::HeaderName,
        prefix: String,
    },
    Param(String),
    Cookie(String),
}

impl Location {
    fn source(&self) -> TokenSource {
        match self {
            Self::Header { name, .. } => TokenSource::Header(name.clone()),
            Self::Param(p) => TokenSource::Param(p.clone()),
            Self::Cookie(c) => TokenSource::Cookie(c.clone()),
        }
    }
}

/// Where a token was found. The names come from the configuration, never from the request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenSource {
    Header(http::HeaderName),
    Param(String),
    Cookie(String),
}

impl fmt::Display for TokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Header(h) => write!(f, "header {h}"),
            Self::Param(p) => write!(f, "query parameter {p}"),
            Self::Cookie(c) => write!(f, "cookie {c}"),
        }
    }
}

/// What a verified token yields.
#[derive(Clone, Debug)]
pub struct Verified {
    /// `<iss>/<sub>`.
    pub principal: String,
    pub claims: serde_json::Value,
}

/// Why a request's token is refused (401). Carries the place and the configured issuer, never
/// token material or the token's unverified claims.
#[derive(Debug, thiserror::Error)]
pub enum JwtError {
    #[error("{0} JWTs in the request, at most one is accepted")]
    MultipleTokens(usize),
    #[error("{0} does not start with the configured token prefix")]
    MissingPrefix(TokenSource),
    #[error("JWT in {0} is not in the form of Header.Payload.Signature")]
    Malformed(TokenSource),
    #[error("JWT in {0} is from an issuer not configured for that place")]
    UnknownIssuer(TokenSource),
    #[error("JWKS is not available yet for issuer {0}")]
    NoKeys(String),
    #[error("no key of issuer {0} matches the JWT's kid and alg")]
    NoMatchingKey(String),
    #[error("JWT signature does not verify with the keys of issuer {0}")]
    BadSignature(String),
    #[error("JWT of issuer {0} has expired")]
    Expired(String),
    #[error("JWT of issuer {0} is not valid yet")]
    NotYetValid(String),
    #[error("JWT audiences are not allowed by the rule of issuer {0}")]
    AudienceNotAllowed(String),
    #[error("JWT of issuer {issuer} is refused: {reason}")]
    Invalid { issuer: String, reason: &'static str },
}

impl JwtError {
    /// A short stable label (for a metric or the response details).
    pub fn reason(&self) -> &'static str {
        match self {
            Self::MultipleTokens(_) => "multiple_tokens",
            Self::MissingPrefix(_) => "missing_prefix",
            Self::Malformed(_) => "malformed",
            Self::UnknownIssuer(_) => "unknown_issuer",
            Self::NoKeys(_) => "jwks_unavailable",
            Self::NoMatchingKey(_) => "no_matching_key",
            Self::BadSignature(_) => "bad_signature",
            Self::Expired(_) => "expired",
            Self::NotYetValid(_) => "not_yet_valid",
            Self::AudienceNotAllowed(_) => "audience_not_allowed",
            Self::Invalid { .. } => "invalid",
        }
    }
}

/// Why a JWKS (fetched or inline) is not used.
#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    #[error("JWKS {0}")]
    Fetch(#[from] common::fetch::FetchError),
    #[error("not JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("no \"keys\" array")]
    NotAKeySet,
    #[error("{count} keys, more than {limit}")]
    TooManyKeys { count: usize, limit: usize },
    #[error("none of its {0} keys is usable")]
    NoUsableKey(usize),
}

impl JwtRule {
    pub fn from_proto(r: &wp::JwtRule) -> Result<Self, String> {
        if r.issuer.is_empty() {
            return Err("a JWT rule needs an issuer".into());
        }
        let keys = match (r.jwks.is_empty(), r.jwks_uri.is_empty()) {
            (false, _) => {
                let set = parse_jwks(r.jwks.as_bytes(), MAX_JWKS_KEYS)
                    .map_err(|e| format!("jwks of {}: {e}", r.issuer))?;
                let keys = Key::prepare(set);
                if keys.is_empty() {
                    return Err(format!("jwks of {}: no key can verify a signature", r.issuer));
                }
                Some(Arc::new(keys))
            }
            (true, false) if r.jwks_uri.starts_with("http://") => None,
            (true, false) => return Err(format!("jwksUri {:?}: only http:// is supported", r.jwks_uri)),
            (true, true) => return Err(format!("JWT rule for {} needs jwks or jwksUri", r.issuer)),
        };
        let claim_headers = r
            .output_claim_to_headers
            .iter()
            .map(|c| {
                http::HeaderName::from_bytes(c.header.as_bytes())
                    .map(|h| (h, c.claim.clone()))
                    .map_err(|_| format!("header name {:?}", c.header))
            })
            .collect::<Result<_, String>>()?;
        Ok(Self {
            issuer: r.issuer.clone(),
            audiences: r.audiences.clone(),
            forward_original_token: r.forward_original_token,
            claim_headers,
            jwks_uri: (!r.jwks_uri.is_empty()).then(|| r.jwks_uri.clone()),
            locations: locations(r)?,
            keys: RwLock::new(keys),
        })
    }

    fn keys(&self) -> Option<Arc<Vec<Key>>> {
        self.keys.read().ok().and_then(|k| k.clone())
    }

    /// Replaces the keys with those of `set` that can verify a signature; a set with none
    /// leaves the last keys in place. Returns how many were taken.
    pub fn set_keys(&self, set: JwkSet) -> usize {
        let keys = Key::prepare(set);
        let n = keys.len();
        if n > 0
            && let Ok(mut k) = self.keys.write()
        {
            *k = Some(Arc::new(keys));
        }
        n
    }

    /// Starts with `other`'s keys (a new rule fetching from the same URL as an old one).
    pub fn adopt_keys(&self, other: &JwtRule) {
        if let (Some(keys), Ok(mut k)) = (other.keys(), self.keys.write()) {
            *k = Some(keys);
        }
    }

    /// Verifies `token`, whose unverified `iss` is this rule's issuer.
    fn verify(&self, token: &str, source: &TokenSource) -> Result<Verified, JwtError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| JwtError::Malformed(source.clone()))?;
        let keys = self.keys().ok_or_else(|| JwtError::NoKeys(self.issuer.clone()))?;
        let mut validation = Validation::new(header.alg);
        validation.set_issuer(&[&self.issuer]);
        if self.audiences.is_empty() {
            validation.validate_aud = false;
        } else {
            validation.set_audience(&self.audiences);
        }
        validation.validate_nbf = true;
        // `exp` and `nbf` are checked when present; a token without `exp` is valid, as in Envoy.
        validation.required_spec_claims.clear();
        let mut refusal = JwtError::NoMatchingKey(self.issuer.clone());
        let alg = format!("{:?}", header.alg);
        for key in keys.iter().filter(|k| k.fits(header.kid.as_deref(), &alg)) {
            match jsonwebtoken::decode::<serde_json::Value>(token, &key.decoding, &validation) {
                Ok(data) => {
                    let sub = data.claims.get("sub").and_then(|s| s.as_str()).unwrap_or_default();
                    return Ok(Verified { principal: format!("{}/{sub}", self.issuer), claims: data.claims });
                }
                // Not this key: try the next one.
                Err(e) if key_mismatch(e.kind()) => refusal = JwtError::BadSignature(self.issuer.clone()),
                // Signed by this key, refused on its claims.
                Err(e) => return Err(self.refusal(e.kind(), source)),
            }
        }
        Err(refusal)
    }

    fn refusal(&self, kind: &ErrorKind, source: &TokenSource) -> JwtError {
        let issuer = self.issuer.clone();
        match kind {
            ErrorKind::ExpiredSignature => JwtError::Expired(issuer),
            ErrorKind::ImmatureSignature => JwtError::NotYetValid(issuer),
            ErrorKind::InvalidAudience => JwtError::AudienceNotAllowed(issuer),
            ErrorKind::InvalidToken | ErrorKind::Base64(_) | ErrorKind::Utf8(_) => {
                JwtError::Malformed(source.clone())
            }
            ErrorKind::MissingRequiredClaim(_) => {
                JwtError::Invalid { issuer, reason: "a required claim is missing" }
            }
            ErrorKind::InvalidIssuer => JwtError::Invalid { issuer, reason: "iss differs" },
            ErrorKind::Json(_) => JwtError::Invalid { issuer, reason: "claims are not a JSON object" },
            _ => JwtError::Invalid { issuer, reason: "verification failed" },
        }
    }
}

/// The rule's token places: the configured ones, each checked, or the defaults.
fn locations(r: &wp::JwtRule) -> Result<Vec<Location>, String> {
    let mut out = Vec::with_capacity(r.from_headers.len() + r.from_params.len() + r.from_cookies.len());
    for h in &r.from_headers {
        let name = http::HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| format!("fromHeaders name {:?} of {}", h.name, r.issuer))?;
        out.push(Location::Header { name, prefix: h.prefix.clone() });
    }
    for p in &r.from_params {
        if p.is_empty() || p.contains(['&', '=', '#']) {
            return Err(format!("fromParams {p:?} of {}", r.issuer));
        }
        out.push(Location::Param(p.clone()));
    }
    for c in &r.from_cookies {
        let token_char = |b: u8| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b);
        if c.is_empty() || !c.bytes().all(token_char) {
            return Err(format!("fromCookies {c:?} of {}", r.issuer));
        }
        out.push(Location::Cookie(c.clone()));
    }
    if out.is_empty() {
        out.push(Location::Header { name: http::header::AUTHORIZATION, prefix: BEARER.into() });
        out.push(Location::Param(DEFAULT_PARAM.into()));
    }
    Ok(out)
}

/// A verification key, decoded once when the keys arrive (not for every token).
struct Key {
    kid: Option<String>,
    /// The algorithm the key is for, as `jsonwebtoken` names it (`ES256`); `None`: any.
    alg: Option<String>,
    decoding: DecodingKey,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Key").field("kid", &self.kid).field("alg", &self.alg).finish_non_exhaustive()
    }
}

impl Key {
    /// The signing keys of `set` that decode; encryption keys are left out.
    fn prepare(set: JwkSet) -> Vec<Key> {
        set.keys
            .iter()
            .filter(|jwk| jwk.common.public_key_use != Some(PublicKeyUse::Encryption))
            .filter_map(|jwk| {
                Some(Key {
                    kid: jwk.common.key_id.clone(),
                    alg: jwk.common.key_algorithm.map(|a| a.to_string()),
                    decoding: DecodingKey::from_jwk(jwk).ok()?,
                })
            })
            .collect()
    }

    /// Whether this key may have signed a token whose header names `kid` and `alg`.
    fn fits(&self, kid: Option<&str>, alg: &str) -> bool {
        kid.is_none_or(|kid| self.kid.as_deref() == Some(kid)) && self.alg.as_deref().is_none_or(|a| a == alg)
    }
}

/// Errors that mean "not signed by this key" rather than "signed, but refused".
fn key_mismatch(kind: &ErrorKind) -> bool {
    matches!(
        kind,
        ErrorKind::InvalidSignature
            | ErrorKind::InvalidAlgorithm
            | ErrorKind::InvalidKeyFormat
            | ErrorKind::InvalidEcdsaKey
            | ErrorKind::InvalidRsaKey(_)
            | ErrorKind::Crypto(_)
    )
}

/// The `iss` of a token, read without verifying (to pick the rule that verifies it). `Ok(None)`:
/// the token has no string `iss`.
fn unverified_issuer(token: &str) -> Result<Option<String>, ()> {
    let payload = token.split('.').nth(1).ok_or(())?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).map_err(|_| ())?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).map_err(|_| ())?;
    Ok(claims.get("iss").and_then(|i| i.as_str()).map(str::to_string))
}

/// A token found in the request, with the rules that read the place it was found in.
struct Found<'r> {
    source: TokenSource,
    /// Which value of a repeated header, parameter or cookie: two values are two tokens.
    index: usize,
    token: String,
    rules: Vec<&'r Arc<JwtRule>>,
}

/// Checks the request's token against `rules` (see the module doc). `query` is the request's
/// query string, without `?`. `Ok(None)`: no token. On success, and on `Ok(None)`, `headers` is
/// prepared for upstream (claim headers set or cleared, the token's header removed).
pub fn authenticate(
    rules: &[Arc<JwtRule>],
    headers: &mut http::HeaderMap,
    query: Option<&str>,
) -> Result<Option<Verified>, JwtError> {
    for (header, _) in rules.iter().flat_map(|r| &r.claim_headers) {
        headers.remove(header);
    }
    let mut found: Vec<Found<'_>> = Vec::new();
    // A value one rule cannot read (no prefix, not a token) counts only where no other rule
    // found a token in the same place: two rules on one header with different prefixes do not
    // refuse each other's tokens.
    let mut unreadable: Vec<(TokenSource, JwtError)> = Vec::new();
    for rule in rules {
        for location in &rule.locations {
            let tokens = match extract(location, headers, query) {
                Ok(tokens) => tokens,
                Err(e) => {
                    unreadable.push((location.source(), e));
                    continue;
                }
            };
            for (index, token) in tokens {
                let source = location.source();
                match found.iter_mut().find(|f| f.source == source && f.index == index && f.token == token) {
                    Some(f) => f.rules.push(rule),
                    None => found.push(Found { source, index, token, rules: vec![rule] }),
                }
            }
        }
    }
    if let Some((_, e)) =
        unreadable.into_iter().find(|(source, _)| !found.iter().any(|f| f.source == *source))
    {
        return Err(e);
    }
    let found = match found.len() {
        0 => return Ok(None),
        1 => found.swap_remove(0),
        n => return Err(JwtError::MultipleTokens(n)),
    };
    let issuer = unverified_issuer(&found.token).map_err(|()| JwtError::Malformed(found.source.clone()))?;
    let mut candidates = found.rules.iter().filter(|r| Some(&r.issuer) == issuer.as_ref()).peekable();
    if candidates.peek().is_none() {
        return Err(JwtError::UnknownIssuer(found.source));
    }
    let mut refusal = None;
    for rule in candidates {
        match rule.verify(&found.token, &found.source) {
            Ok(verified) => {
                admit(rule, &found.source, &verified, headers);
                return Ok(Some(verified));
            }
            Err(e) => refusal = Some(e),
        }
    }
    Err(refusal.unwrap_or(JwtError::UnknownIssuer(found.source)))
}

/// Prepares the headers of a request whose token `rule` verified.
fn admit(rule: &JwtRule, source: &TokenSource, verified: &Verified, headers: &mut http::HeaderMap) {
    if !rule.forward_original_token
        && let TokenSource::Header(name) = source
    {
        headers.remove(name);
    }
    for (header, claim) in &rule.claim_headers {
        let value = claim_header_value(&verified.claims, claim);
        match value.and_then(|v| http::HeaderValue::from_str(&v).ok()) {
            Some(v) => {
                headers.insert(header.clone(), v);
            }
            None => {
                debug!(issuer = %rule.issuer, claim, "claim not copied to a header: absent or not a scalar")
            }
        }
    }
}

/// A claim as a header value: strings, numbers and bools as they are, a list of those joined with
/// `,`. `a.b` is the claim `a.b`, or else `b` inside the object `a`.
fn claim_header_value(claims: &serde_json::Value, claim: &str) -> Option<String> {
    use serde_json::Value;
    let scalar = |v: &Value| match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    };
    let value = match claims.get(claim) {
        Some(v) => v,
        None => claim.split('.').try_fold(claims, |v, part| v.get(part))?,
    };
    match value {
        Value::Array(items) => Some(items.iter().map(scalar).collect::<Option<Vec<_>>>()?.join(",")),
        v => scalar(v),
    }
}

/// The tokens at `location`, each with its index among the values there.
fn extract(
    location: &Location,
    headers: &http::HeaderMap,
    query: Option<&str>,
) -> Result<Vec<(usize, String)>, JwtError> {
    let token = |bytes: &[u8]| token(bytes).ok_or_else(|| JwtError::Malformed(location.source()));
    let mut out = Vec::new();
    match location {
        Location::Header { name, prefix } => {
            for (index, value) in headers.get_all(name).iter().enumerate() {
                let Some(rest) = strip_prefix(value.as_bytes().trim_ascii(), prefix) else {
                    if name == http::header::AUTHORIZATION {
                        continue; // another scheme (Basic, Digest...): not a JWT
                    }
                    return Err(JwtError::MissingPrefix(location.source()));
                };
                out.push((index, token(rest.trim_ascii())?));
            }
        }
        Location::Param(param) => {
            let pairs = query.into_iter().flat_map(|q| q.split('&')).filter(|p| !p.is_empty());
            let values = pairs.filter_map(|pair| {
                let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                (*query_decode(key) == *param.as_bytes()).then(|| query_decode(value))
            });
            for (index, value) in values.enumerate() {
                out.push((index, token(&value)?));
            }
        }
        Location::Cookie(cookie) => {
            let cookies = headers.get_all(http::header::COOKIE).into_iter();
            let pairs = cookies.flat_map(|v| v.as_bytes().split(|b| *b == b';'));
            let values = pairs.filter_map(|pair| {
                let eq = pair.iter().position(|b| *b == b'=')?;
                (pair[..eq].trim_ascii() == cookie.as_bytes()).then(|| pair[eq + 1..].trim_ascii())
            });
            for (index, value) in values.enumerate() {
                let value = value.strip_prefix(b"\"").and_then(|v| v.strip_suffix(b"\"")).unwrap_or(value);
                out.push((index, token(value)?));
            }
        }
    }
    Ok(out)
}

/// `value` after `prefix`, matched ignoring ASCII case. A prefix ending in blanks ("Bearer ")
/// needs at least one blank after its word, and then any number are allowed.
fn strip_prefix<'v>(value: &'v [u8], prefix: &str) -> Option<&'v [u8]> {
    let prefix = prefix.as_bytes();
    let word = &prefix[..prefix.iter().rposition(|b| !is_blank(b)).map_or(0, |e| e + 1)];
    let head = value.get(..word.len())?;
    let rest = &value[word.len()..];
    let blank_follows = rest.first().is_none_or(is_blank);
    (head.eq_ignore_ascii_case(word) && (word.len() == prefix.len() || blank_follows)).then_some(rest)
}

/// `bytes` as a token if it is one compact JWS: three non-empty base64url parts joined by dots.
fn token(bytes: &[u8]) -> Option<String> {
    let base64url = |b: &u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_');
    let parts = bytes.split(|b| *b == b'.');
    let well_formed =
        parts.clone().count() == 3 && parts.into_iter().all(|p| !p.is_empty() && p.iter().all(base64url));
    std::str::from_utf8(bytes).ok().filter(|_| well_formed).map(str::to_owned)
}

fn is_blank(b: &u8) -> bool {
    matches!(b, b' ' | b'\t')
}

/// A query component with `%XX` escapes and `+` decoded (a bad escape stays as it is).
fn query_decode(s: &str) -> Cow<'_, [u8]> {
    if s.contains('+') {
        Cow::Owned(percent_encoding::percent_decode_str(&s.replace('+', " ")).collect())
    } else {
        percent_encoding::percent_decode_str(s).into()
    }
}

/// Reads a JWKS, keeping the keys this proxy can use (an unknown key type or algorithm is skipped,
/// as Envoy does) and refusing a set with more than `max_keys` keys or none usable.
fn parse_jwks(body: &[u8], max_keys: usize) -> Result<JwkSet, JwksError> {
    let set: serde_json::Value = serde_json::from_slice(body)?;
    let keys = set.get("keys").and_then(|k| k.as_array()).ok_or(JwksError::NotAKeySet)?;
    if keys.len() > max_keys {
        return Err(JwksError::TooManyKeys { count: keys.len(), limit: max_keys });
    }
    let usable: Vec<Jwk> = keys.iter().filter_map(|k| Jwk::deserialize(k).ok()).collect();
    if usable.is_empty() {
        return Err(JwksError::NoUsableKey(keys.len()));
    }
    Ok(JwkSet { keys: usable })
}

/// Bounds on one JWKS fetch.
#[derive(Clone, Copy, Debug)]
struct FetchLimits {
    /// Connect, request and the whole body.
    timeout: Duration,
    max_bytes: usize,
    max_keys: usize,
}

const FETCH_LIMITS: FetchLimits =
    FetchLimits { timeout: JWKS_FETCH_TIMEOUT, max_bytes: MAX_JWKS_BYTES, max_keys: MAX_JWKS_KEYS };

/// Fetches a JWKS over plain HTTP, within [`JWKS_FETCH_TIMEOUT`] and [`MAX_JWKS_BYTES`].
pub async fn fetch_jwks(uri: &str) -> Result<JwkSet, JwksError> {
    fetch_jwks_within(uri, FETCH_LIMITS).await
}

async fn fetch_jwks_within(uri: &str, limits: FetchLimits) -> Result<JwkSet, JwksError> {
    let body = common::fetch::get(uri, limits.timeout, limits.max_bytes).await?;
    parse_jwks(&body, limits.max_keys)
}

/// Keeps a rule's keys fetched from its URL, refreshing them; stops when the rule is dropped.
pub fn keep_fetched(rule: &Arc<JwtRule>) {
    let Some(uri) = rule.jwks_uri.clone() else { return };
    let weak = Arc::downgrade(rule);
    tokio::spawn(async move {
        loop {
            let Some(rule) = weak.upgrade() else { return };
            match fetch_jwks(&uri).await {
                Ok(keys) => {
                    let taken = rule.set_keys(keys);
                    debug!(issuer = %rule.issuer, %uri, keys = taken, "JWKS fetched");
                }
                Err(e) => {
                    warn!(issuer = %rule.issuer, %uri, error = %e, "JWKS fetch failed; keeping the last keys")
                }
            }
            let wait = if rule.keys().is_some() { JWKS_REFRESH } else { Duration::from_secs(2) };
            drop(rule);
            tokio::time::sleep(wait).await;
        }
    });
}

#[cfg(test)]
mod tests {
    use std::sync::OnceLock;
    use std::time::{Instant, SystemTime, UNIX_EPOCH};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use common::fetch::FetchError;

    const ISS: &str = "https://issuer.test";

    /// A P-256 key pair, once per test binary: the JWKS (kid k1) and the signing key.
    fn keys() -> &'static (String, jsonwebtoken::EncodingKey) {
        static KEYS: OnceLock<(String, jsonwebtoken::EncodingKey)> = OnceLock::new();
        KEYS.get_or_init(|| {
            let key = rcgen::KeyPair::generate().expect("P-256 key");
            let raw = key.public_key_raw();
            let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
            let jwks = serde_json::json!({"keys": [{"kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig",
                "kid": "k1", "x": b64(&raw[1..33]), "y": b64(&raw[33..65])}]});
            (jwks.to_string(), jsonwebtoken::EncodingKey::from_ec_der(&key.serialize_der()))
        })
    }

    fn sign_with(key: &jsonwebtoken::EncodingKey, claims: &serde_json::Value) -> String {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some("k1".into());
        jsonwebtoken::encode(&header, claims, key).expect("token")
    }

    fn now() -> u64 {
        SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_secs()
    }

    /// Claims of a valid token from `iss`.
    fn claims(iss: &str) -> serde_json::Value {
        serde_json::json!({"iss": iss, "sub": "alice", "aud": "echo", "exp": now() + 600,
            "groups": ["a", "b"], "org": {"team": "blue"}, "admin": true, "obj": {"x": 1}})
    }

    /// A valid token from [`ISS`].
    fn valid() -> String {
        sign_with(&keys().1, &claims(ISS))
    }

    /// A token from [`ISS`] signed by another key (same kid).
    fn forged() -> String {
        let other = rcgen::KeyPair::generate().expect("P-256 key");
        sign_with(&jsonwebtoken::EncodingKey::from_ec_der(&other.serialize_der()), &claims(ISS))
    }

    /// A rule for `iss` with the inline keys, changed by `edit`.
    fn rule(iss: &str, edit: impl FnOnce(&mut wp::JwtRule)) -> Arc<JwtRule> {
        let mut r = wp::JwtRule {
            issuer: iss.into(),
            audiences: vec!["echo".into()],
            jwks: keys().0.clone(),
            ..Default::default()
        };
        edit(&mut r);
        Arc::new(JwtRule::from_proto(&r).expect("rule"))
    }

    fn x_jwt(prefix: &str) -> impl FnOnce(&mut wp::JwtRule) {
        let prefix = prefix.to_string();
        move |r| r.from_headers = vec![wp::JwtHeader { name: "x-jwt".into(), prefix }]
    }

    fn headers(pairs: &[(&str, &str)]) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        for (k, v) in pairs {
            h.append(http::HeaderName::from_bytes(k.as_bytes()).expect("name"), v.parse().expect("value"));
        }
        h
    }

    fn principal(r: Result<Option<Verified>, JwtError>) -> String {
        r.expect("accepted").expect("a token").principal
    }

    #[test]
    fn two_rules_on_one_header_do_not_refuse_each_others_tokens() {
        let with_prefix = rule(ISS, x_jwt("Bearer "));
        let bare = rule("https://other.test", x_jwt(""));
        let mut h = headers(&[("x-jwt", &format!("Bearer {}", valid()))]);
        assert_eq!(
            principal(authenticate(&[with_prefix.clone(), bare.clone()], &mut h, None)),
            format!("{ISS}/alice")
        );
        // Unreadable for every rule: still refused.
        let mut h = headers(&[("x-jwt", "Bearer not-a-token")]);
        assert!(authenticate(&[with_prefix, bare], &mut h, None).is_err());
    }

    #[test]
    fn a_token_without_exp_is_valid_and_exp_is_checked_when_present() {
        let mut c = claims(ISS);
        c.as_object_mut().expect("object").remove("exp");
        let mut h = headers(&[("authorization", &format!("Bearer {}", sign_with(&keys().1, &c)))]);
        assert_eq!(principal(authenticate(&[rule(ISS, |_| {})], &mut h, None)), format!("{ISS}/alice"));
        c["exp"] = (now() - 3600).into();
        let mut h = headers(&[("authorization", &format!("Bearer {}", sign_with(&keys().1, &c)))]);
        assert!(matches!(authenticate(&[rule(ISS, |_| {})], &mut h, None), Err(JwtError::Expired(_))));
    }

    #[test]
    fn malformed_tokens_and_rules_are_refused() {
        assert!(unverified_issuer("abc").is_err());
        assert!(unverified_issuer("a.!!!.c").is_err());
        let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(br#"{"sub":"x"}"#);
        assert_eq!(unverified_issuer(&format!("a.{payload}.c")), Ok(None));
        let proto = |jwks: &str, uri: &str| wp::JwtRule {
            issuer: "iss".into(),
            jwks: jwks.into(),
            jwks_uri: uri.into(),
            ..Default::default()
        };
        let rule = |r: wp::JwtRule| JwtRule::from_proto(&r);
        assert!(rule(proto("", "")).is_err(), "no keys at all");
        assert!(rule(proto("not json", "")).is_err());
        assert!(rule(proto(r#"{"keys": []}"#, "")).is_err(), "no usable key");
        assert!(rule(proto("", "https://keys")).is_err(), "https JWKS URLs are not supported yet");
        assert!(rule(proto("", "http://keys/jwks.json")).is_ok());
        let bad_header = wp::JwtHeader { name: "bad header".into(), prefix: String::new() };
        assert!(rule(wp::JwtRule { from_headers: vec![bad_header], ..proto("", "http://k/") }).is_err());
        assert!(rule(wp::JwtRule { from_params: vec![String::new()], ..proto("", "http://k/") }).is_err());
        assert!(rule(wp::JwtRule { from_cookies: vec!["a;b".into()], ..proto("", "http://k/") }).is_err());

        let rules = [rule_default()];
        assert!(authenticate(&rules, &mut http::HeaderMap::new(), None).expect("no token").is_none());
        for value in ["Bearer", "Bearer   ", "Bearer a.b", "Bearer a..c", "Bearer a.b.c.d", "Bearer a b.c.d"]
        {
            let r = authenticate(&rules, &mut headers(&[("authorization", value)]), None);
            assert!(matches!(r, Err(JwtError::Malformed(_))), "{value:?}: {r:?}");
        }
        let mut h = http::HeaderMap::new();
        h.insert(
            http::header::AUTHORIZATION,
            http::HeaderValue::from_bytes(b"Bearer a.b\xff.c").expect("obs-text"),
        );
        assert!(matches!(authenticate(&rules, &mut h, None), Err(JwtError::Malformed(_))));
        assert!(matches!(
            authenticate(&rules, &mut headers(&[]), Some("access_token=")),
            Err(JwtError::Malformed(_))
        ));
    }

    fn rule_default() -> Arc<JwtRule> {
        rule(ISS, |_| {})
    }

    #[test]
    fn the_bearer_scheme_is_matched_ignoring_case_and_forged_tokens_are_refused() {
        let rules = [rule_default()];
        for scheme in ["bearer", "BEARER", "Bearer", "bEaReR \t "] {
            let forged = format!("{scheme} {}", forged());
            let r = authenticate(&rules, &mut headers(&[("authorization", &forged)]), None);
            assert!(matches!(r, Err(JwtError::BadSignature(_))), "{scheme:?}: {r:?}");
            let good = format!("{scheme} {}", valid());
            assert_eq!(
                principal(authenticate(&rules, &mut headers(&[("authorization", &good)]), None)),
                "https://issuer.test/alice"
            );
        }
        let r =
            authenticate(&rules, &mut headers(&[("authorization", &format!("Bearer{}", forged()))]), None);
        assert!(r.expect("Bearer<token> is another scheme").is_none());
    }

    #[test]
    fn several_tokens_are_refused() {
        let rules = [rule_default()];
        let bearer = format!("Bearer {}", valid());
        let mut h = headers(&[("authorization", &bearer), ("authorization", &bearer)]);
        assert!(matches!(authenticate(&rules, &mut h, None), Err(JwtError::MultipleTokens(2))));
        let mut h = headers(&[
            ("authorization", "Basic dXNlcjpwYXNz"),
            ("authorization", &format!("bearer {}", forged())),
        ]);
        assert!(authenticate(&rules, &mut h, None).is_err(), "a Bearer token after a Basic one still counts");
        let query = format!("access_token={}", valid());
        let r = authenticate(&rules, &mut headers(&[("authorization", &bearer)]), Some(&query));
        assert!(matches!(r, Err(JwtError::MultipleTokens(2))), "header and parameter");
        let query = format!("access_token={0}&access%5Ftoken={0}", valid());
        assert!(matches!(
            authenticate(&rules, &mut headers(&[]), Some(&query)),
            Err(JwtError::MultipleTokens(2))
        ));
    }

    #[test]
    fn other_schemes_are_not_jwts() {
        let rules = [rule_default()];
        let mut h = headers(&[("authorization", "Basic dXNlcjpwYXNz")]);
        assert!(authenticate(&rules, &mut h, None).expect("ignored").is_none());
        assert_eq!(h[http::header::AUTHORIZATION], "Basic dXNlcjpwYXNz", "left for upstream");
    }

    #[test]
    fn tokens_are_read_where_the_rule_says() {
        let token = valid();
        let prefixed = [rule(ISS, x_jwt("Bearer "))];
        let mut h = headers(&[("x-jwt", &format!("bearer  {token}")), ("x-other", "kept")]);
        assert_eq!(principal(authenticate(&prefixed, &mut h, None)), "https://issuer.test/alice");
        assert!(!h.contains_key("x-jwt"), "the token's header is removed");
        assert!(h.contains_key("x-other"));
        let r = authenticate(&prefixed, &mut headers(&[("x-jwt", &token)]), None);
        assert!(matches!(r, Err(JwtError::MissingPrefix(_))), "a value without the prefix is refused");

        let raw = rule(ISS, x_jwt(""));
        assert!(authenticate(&[raw], &mut headers(&[("x-jwt", &token)]), None).expect("ok").is_some());

        let param = [rule(ISS, |r| r.from_params = vec!["my_token".into()])];
        let query = format!("a=1&my_token={token}&b");
        assert!(authenticate(&param, &mut headers(&[]), Some(&query)).expect("ok").is_some());
        let default_param = format!("access_token={token}");
        let r = authenticate(&param, &mut headers(&[]), Some(&default_param));
        assert!(r.expect("not read").is_none(), "a rule with places reads only those");

        let default_param = format!("x=%20&access_token={token}");
        assert!(
            authenticate(&[rule_default()], &mut headers(&[]), Some(&default_param)).expect("ok").is_some()
        );

        let cookie = rule(ISS, |r| r.from_cookies = vec!["session".into()]);
        let mut h = headers(&[("cookie", "a=b"), ("cookie", &format!("c=d; session=\"{token}\""))]);
        assert!(authenticate(&[cookie], &mut h, None).expect("ok").is_some());
    }

    #[test]
    fn a_rule_on_its_own_header_ignores_the_default_places() {
        // As Envoy: the default places are read only for a rule that lists no place, so the
        // Authorization header is not looked at (it goes upstream as it came).
        let rules = [rule(ISS, x_jwt("Bearer "))];
        let bearer = format!("Bearer {}", forged());
        let mut h = headers(&[("authorization", &bearer)]);
        assert!(authenticate(&rules, &mut h, None).expect("not read").is_none());
        assert!(h.contains_key(http::header::AUTHORIZATION));
        let query = format!("access_token={}", forged());
        assert!(authenticate(&rules, &mut headers(&[]), Some(&query)).expect("not read").is_none());

        // Another rule reads Authorization: a token there must come from that rule's issuer.
        let both = [rule(ISS, x_jwt("Bearer ")), rule("https://other.test", |_| {})];
        let r = authenticate(&both, &mut headers(&[("authorization", &format!("Bearer {}", valid()))]), None);
        assert!(matches!(r, Err(JwtError::UnknownIssuer(TokenSource::Header(_)))), "{r:?}");
    }

    #[test]
    fn forward_original_token_keeps_the_header() {
        let bearer = format!("Bearer {}", valid());
        let mut h = headers(&[("authorization", &bearer)]);
        authenticate(&[rule_default()], &mut h, None).expect("ok");
        assert!(!h.contains_key(http::header::AUTHORIZATION));
        let mut h = headers(&[("authorization", &bearer)]);
        authenticate(&[rule(ISS, |r| r.forward_original_token = true)], &mut h, None).expect("ok");
        assert_eq!(h[http::header::AUTHORIZATION], bearer.as_str());
    }

    #[test]
    fn claims_are_copied_to_headers_and_spoofed_ones_removed() {
        let to = |header: &str, claim: &str| wp::ClaimToHeader { header: header.into(), claim: claim.into() };
        let rules = [rule(ISS, |r| {
            r.output_claim_to_headers = vec![
                to("x-groups", "groups"),
                to("x-team", "org.team"),
                to("x-admin", "admin"),
                to("x-obj", "obj"),
            ]
        })];
        let mut h = headers(&[("x-groups", "spoofed"), ("x-obj", "spoofed")]);
        assert!(authenticate(&rules, &mut h, None).expect("no token").is_none());
        assert!(!h.contains_key("x-groups") && !h.contains_key("x-obj"), "client-sent claim headers go");

        let mut h = headers(&[("authorization", &format!("Bearer {}", valid())), ("x-obj", "spoofed")]);
        authenticate(&rules, &mut h, None).expect("ok");
        assert_eq!(h["x-groups"], "a,b");
        assert_eq!(h["x-team"], "blue");
        assert_eq!(h["x-admin"], "true");
        assert!(!h.contains_key("x-obj"), "objects are not copied");
    }

    #[test]
    fn claims_are_checked() {
        let rules = [rule_default()];
        let check = |claims: serde_json::Value| {
            let bearer = format!("Bearer {}", sign_with(&keys().1, &claims));
            authenticate(&rules, &mut headers(&[("authorization", &bearer)]), None)
        };
        let mut c = claims(ISS);
        c["exp"] = (now() - 3600).into();
        assert!(matches!(check(c), Err(JwtError::Expired(_))));
        let mut c = claims(ISS);
        c["aud"] = "other".into();
        assert!(matches!(check(c), Err(JwtError::AudienceNotAllowed(_))));
        let mut c = claims(ISS);
        c["nbf"] = (now() + 3600).into();
        assert!(matches!(check(c), Err(JwtError::NotYetValid(_))));
        assert!(matches!(check(claims("https://unknown.test")), Err(JwtError::UnknownIssuer(_))));
        let e = check(claims("https://unknown.test")).expect_err("refused");
        assert!(!e.to_string().contains("unknown.test"), "the token's claims stay out of errors: {e}");
    }

    #[test]
    fn a_jwks_is_bounded_and_unknown_keys_are_skipped() {
        let key = serde_json::json!({"kty": "oct", "k": "c2VjcmV0"});
        let unknown = serde_json::json!({"kty": "weird"});
        let set = |keys: Vec<serde_json::Value>| serde_json::json!({ "keys": keys }).to_string();
        assert_eq!(
            parse_jwks(set(vec![key.clone(), unknown.clone()]).as_bytes(), 2).expect("usable").keys.len(),
            1
        );
        assert!(matches!(
            parse_jwks(set(vec![key; 3]).as_bytes(), 2),
            Err(JwksError::TooManyKeys { count: 3, limit: 2 })
        ));
        assert!(matches!(parse_jwks(set(vec![unknown]).as_bytes(), 2), Err(JwksError::NoUsableKey(1))));
        assert!(matches!(parse_jwks(b"{}", 2), Err(JwksError::NotAKeySet)));
    }

    /// A one-connection HTTP server: reads the request head, writes `response`, then holds the
    /// connection open for an hour when `stall`.
    async fn serve(response: Vec<u8>, stall: bool) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        tokio::spawn(async move {
            let Ok((mut s, _)) = listener.accept().await else { return };
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let _ = s.write_all(&response).await;
            if stall {
                tokio::time::sleep(Duration::from_secs(3600)).await;
            }
        });
        format!("http://{addr}/jwks.json")
    }

    fn response(head: &str, body: &[u8]) -> Vec<u8> {
        [format!("HTTP/1.1 200 OK\r\n{head}\r\n").as_bytes(), body].concat()
    }

    #[tokio::test]
    async fn jwks_fetches_are_bounded_in_size_and_time() {
        let jwks = keys().0.as_bytes();
        let uri = serve(response(&format!("content-length: {}\r\n", jwks.len()), jwks), false).await;
        assert_eq!(fetch_jwks(&uri).await.expect("fetched").keys.len(), 1);

        // No length given: the body is read until the limit, then refused.
        let big = vec![b' '; MAX_JWKS_BYTES + 1];
        let uri = serve(response("connection: close\r\n", &big), true).await;
        assert!(matches!(
            fetch_jwks(&uri).await,
            Err(JwksError::Fetch(FetchError::TooLarge(MAX_JWKS_BYTES)))
        ));
        let uri = serve(response(&format!("content-length: {}\r\n", MAX_JWKS_BYTES * 4), b"{"), true).await;
        assert!(
            matches!(fetch_jwks(&uri).await, Err(JwksError::Fetch(FetchError::TooLarge(_)))),
            "refused on its declared length"
        );

        let limits = FetchLimits { timeout: Duration::from_millis(300), ..FETCH_LIMITS };
        for stalled in [Vec::new(), response("content-length: 100\r\n", b"{\"keys\"")] {
            let uri = serve(stalled, true).await;
            let start = Instant::now();
            let r = fetch_jwks_within(&uri, limits).await;
            assert!(matches!(r, Err(JwksError::Fetch(FetchError::Timeout(_)))), "{r:?}");
            assert!(start.elapsed() < Duration::from_secs(2), "within the bound: {:?}", start.elapsed());
        }
        let uri = serve(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n".to_vec(), false).await;
        assert!(matches!(fetch_jwks(&uri).await, Err(JwksError::Fetch(FetchError::Status(_)))));
    }
}
