//! Fuzzes request authentication: any bytes, cut at NUL bytes into a query string and header
//! values (Authorization, a custom token header, Cookie, a claim header), against rules with
//! inline keys that read every kind of place. Nothing the fuzzer writes is signed by those keys,
//! so nothing may verify, and a claim header never survives a request that did not verify. A
//! part after a 0xff byte is also read as JSON claims and a `request.auth.claims` key for
//! `common::rbac::claim_values`.
#![no_main]

use std::sync::{Arc, LazyLock};

use libfuzzer_sys::fuzz_target;
use proto::waypoint as wp;
use waypoint::filter::jwt::{JwtRule, authenticate};

/// A P-256 public key whose private half is nowhere.
const JWKS: &str = r#"{"keys": [{"kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": "k1",
    "x": "6STMIn38pZWnD7Z3VUAn0pLuGSiobnrM06bNQfwLZUg", "y": "Mq4N6Hy2kBU7pCvXr1c5EWmi1QFCgNfoKv6Ir10wDSM"}]}"#;

/// Headers a value may go to, picked by the value's first byte.
const HEADERS: [&str; 5] = ["authorization", "x-jwt", "cookie", "x-jwt-sub", "authorization"];

/// One rule on the default places, one on a header, a parameter and a cookie.
static RULES: LazyLock<Vec<Arc<JwtRule>>> = LazyLock::new(|| {
    let rule = |issuer: &str, edit: fn(&mut wp::JwtRule)| {
        let mut r = wp::JwtRule {
            issuer: issuer.into(),
            jwks: JWKS.into(),
            output_claim_to_headers: vec![wp::ClaimToHeader {
                header: "x-jwt-sub".into(),
                claim: "sub".into(),
            }],
            ..Default::default()
        };
        edit(&mut r);
        Arc::new(JwtRule::from_proto(&r).expect("the fuzz rules are valid"))
    };
    vec![
        rule("https://issuer.test", |_| {}),
        rule("https://other.test", |r| {
            r.from_headers = vec![wp::JwtHeader { name: "x-jwt".into(), prefix: "Bearer ".into() }];
            r.from_params = vec!["my_token".into()];
            r.from_cookies = vec!["session".into()];
            r.forward_original_token = true;
        }),
    ]
});

fuzz_target!(|data: &[u8]| {
    let (request, claims) = match data.iter().position(|b| *b == 0xff) {
        Some(i) => (&data[..i], Some(&data[i + 1..])),
        None => (data, None),
    };
    let mut parts = request.split(|b| *b == 0);
    let query = parts.next().and_then(|q| std::str::from_utf8(q).ok());
    let mut headers = http::HeaderMap::new();
    for part in parts {
        let Some((&pick, value)) = part.split_first() else { continue };
        if let Ok(value) = http::HeaderValue::from_bytes(value) {
            headers.append(HEADERS[usize::from(pick) % HEADERS.len()], value);
        }
    }
    match authenticate(&RULES, &mut headers, query) {
        Ok(Some(v)) => panic!("a fuzzed token verified: {}", v.principal),
        Ok(None) | Err(_) => {
            assert!(!headers.contains_key("x-jwt-sub"), "a client-sent claim header survived")
        }
    }

    if let Some((json, key)) = claims.and_then(|c| {
        let i = c.iter().position(|b| *b == 0)?;
        Some((
            serde_json::from_slice::<serde_json::Value>(&c[..i]).ok()?,
            std::str::from_utf8(&c[i + 1..]).ok()?,
        ))
    }) {
        let values = common::rbac::claim_values(&json, key);
        if !key.starts_with('[') {
            assert!(values.is_none(), "{key:?} is not a claim key");
        }
    }
});
