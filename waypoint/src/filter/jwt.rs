//! RequestAuthentication: JWTs (RS256/384/512, ES256/384, PS*, EdDSA, as the JWKS provides)
//! from `Authorization: Bearer`, verified against the issuer's keys: signature, `iss`, `aud`,
//! `exp` and `nbf`. Keys come inline or from a JWKS URL fetched and refreshed in the background
//! (the last good set stays when a refresh fails). A request without a token passes; one with an
//! invalid token is refused with 401. A verified token gives the request principal
//! (`<iss>/<sub>`) and claims to authorization, and may be copied into headers.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use base64::Engine;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{DecodingKey, Validation};
use proto::waypoint as wp;
use tracing::{debug, warn};

/// How often a JWKS URL is fetched again.
pub const JWKS_REFRESH: Duration = Duration::from_secs(300);

/// One issuer's rule, with its keys.
#[derive(Debug)]
pub struct JwtRule {
    pub issuer: String,
    pub audiences: Vec<String>,
    pub forward_original_token: bool,
    pub claim_headers: Vec<(http::HeaderName, String)>,
    pub jwks_uri: Option<String>,
    keys: RwLock<Option<Arc<JwkSet>>>,
}

/// What a verified token yields.
#[derive(Clone, Debug)]
pub struct Verified {
    /// `<iss>/<sub>`.
    pub principal: String,
    pub claims: serde_json::Value,
}

#[derive(Debug, thiserror::Error)]
pub enum JwtError {
    #[error("Jwt is not in the form of Header.Payload.Signature")]
    Malformed,
    #[error("Jwt issuer is not configured")]
    UnknownIssuer,
    #[error("Jwks is not available for issuer {0}")]
    NoKeys(String),
    #[error("Jwt verification fails: {0}")]
    Invalid(String),
}

impl JwtRule {
    pub fn from_proto(r: &wp::JwtRule) -> Result<Self, String> {
        if r.issuer.is_empty() {
            return Err("a JWT rule needs an issuer".into());
        }
        let keys = match (r.jwks.is_empty(), r.jwks_uri.is_empty()) {
            (false, _) => Some(Arc::new(
                serde_json::from_str::<JwkSet>(&r.jwks).map_err(|e| format!("jwks of {}: {e}", r.issuer))?,
            )),
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
            keys: RwLock::new(keys),
        })
    }

    fn keys(&self) -> Option<Arc<JwkSet>> {
        self.keys.read().ok().and_then(|k| k.clone())
    }

    pub fn set_keys(&self, keys: JwkSet) {
        if let Ok(mut k) = self.keys.write() {
            *k = Some(Arc::new(keys));
        }
    }

    /// Verifies `token`, which claims to come from this rule's issuer.
    fn verify(&self, token: &str) -> Result<Verified, JwtError> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| JwtError::Invalid(e.to_string()))?;
        let keys = self.keys().ok_or_else(|| JwtError::NoKeys(self.issuer.clone()))?;
        let candidates: Vec<_> = match &header.kid {
            Some(kid) => keys.keys.iter().filter(|k| k.common.key_id.as_deref() == Some(kid)).collect(),
            None => keys.keys.iter().collect(),
        };
        let mut last = JwtError::Invalid("no key matches".into());
        for jwk in candidates {
            let Ok(key) = DecodingKey::from_jwk(jwk) else { continue };
            let mut validation = Validation::new(header.alg);
            validation.set_issuer(&[&self.issuer]);
            if self.audiences.is_empty() {
                validation.validate_aud = false;
            } else {
                validation.set_audience(&self.audiences);
            }
            validation.validate_nbf = true;
            match jsonwebtoken::decode::<serde_json::Value>(token, &key, &validation) {
                Ok(data) => {
                    let sub = data.claims.get("sub").and_then(|s| s.as_str()).unwrap_or_default();
                    return Ok(Verified { principal: format!("{}/{sub}", self.issuer), claims: data.claims });
                }
                Err(e) => last = JwtError::Invalid(e.to_string()),
            }
        }
        Err(last)
    }
}

/// The `iss` of a token, read without verifying (to pick the rule that verifies it).
fn unverified_issuer(token: &str) -> Result<String, JwtError> {
    let payload = token.split('.').nth(1).ok_or(JwtError::Malformed)?;
    let bytes =
        base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).map_err(|_| JwtError::Malformed)?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).map_err(|_| JwtError::Malformed)?;
    claims.get("iss").and_then(|i| i.as_str()).map(str::to_string).ok_or(JwtError::UnknownIssuer)
}

/// Checks the request's bearer token against `rules`. `Ok(None)`: no token.
pub fn authenticate(
    rules: &[Arc<JwtRule>],
    headers: &mut http::HeaderMap,
) -> Result<Option<Verified>, JwtError> {
    let Some(value) = headers.get(http::header::AUTHORIZATION).and_then(|v| v.to_str().ok()) else {
        return Ok(None);
    };
    let Some(token) = value.strip_prefix("Bearer ").map(str::trim) else { return Ok(None) };
    let token = token.to_string();
    let issuer = unverified_issuer(&token)?;
    let rule = rules.iter().find(|r| r.issuer == issuer).ok_or(JwtError::UnknownIssuer)?;
    let verified = rule.verify(&token)?;
    if !rule.forward_original_token {
        headers.remove(http::header::AUTHORIZATION);
    }
    for (header, claim) in &rule.claim_headers {
        let value =
            verified.claims.get(claim).map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_string));
        if let Some(v) = value.and_then(|v| http::HeaderValue::from_str(&v).ok()) {
            headers.insert(header.clone(), v);
        }
    }
    Ok(Some(verified))
}

/// Fetches a JWKS over plain HTTP.
pub async fn fetch_jwks(uri: &str) -> Result<JwkSet, String> {
    use http_body_util::BodyExt;
    let uri: http::Uri = uri.parse().map_err(|e| format!("{uri}: {e}"))?;
    let host = uri.host().ok_or("no host")?.to_string();
    let port = uri.port_u16().unwrap_or(80);
    let stream =
        tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect((host.as_str(), port)))
            .await
            .map_err(|_| "connect timed out".to_string())?
            .map_err(|e| e.to_string())?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = http::Request::get(uri.path_and_query().map_or("/", |p| p.as_str()))
        .header(http::header::HOST, host)
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .map_err(|e| e.to_string())?;
    let resp = tokio::time::timeout(Duration::from_secs(10), sender.send_request(req))
        .await
        .map_err(|_| "request timed out".to_string())?
        .map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!("status {}", resp.status()));
    }
    let body = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
    serde_json::from_slice(&body).map_err(|e| format!("JWKS: {e}"))
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
                    debug!(issuer = %rule.issuer, %uri, keys = keys.keys.len(), "JWKS fetched");
                    rule.set_keys(keys);
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
    use super::*;

    #[test]
    fn malformed_tokens_and_rules_are_refused() {
        assert!(matches!(unverified_issuer("abc"), Err(JwtError::Malformed)));
        assert!(matches!(unverified_issuer("a.!!!.c"), Err(JwtError::Malformed)));
        let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(br#"{"sub":"x"}"#);
        assert!(matches!(unverified_issuer(&format!("a.{payload}.c")), Err(JwtError::UnknownIssuer)));
        let rule = |jwks: &str, uri: &str| {
            JwtRule::from_proto(&wp::JwtRule {
                issuer: "iss".into(),
                jwks: jwks.into(),
                jwks_uri: uri.into(),
                ..Default::default()
            })
        };
        assert!(rule("", "").is_err(), "no keys at all");
        assert!(rule("not json", "").is_err());
        assert!(rule("", "https://keys").is_err(), "https JWKS URLs are not supported yet");
        assert!(rule("", "http://keys/jwks.json").is_ok());
        let mut headers = http::HeaderMap::new();
        assert!(authenticate(&[], &mut headers).expect("no token").is_none());
        headers.insert(http::header::AUTHORIZATION, http::HeaderValue::from_static("Bearer a.b"));
        assert!(authenticate(&[], &mut headers).is_err());
    }
}
