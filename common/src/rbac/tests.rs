//! Istio's authorization semantics, case by case: L4 fields, request fields and `when` conditions.

use super::*;
use crate::state::policy::{Clause, Rule, Scope};

fn id(ns: &str, sa: &str) -> Identity {
    Identity::new("cluster.local", ns, sa).expect("identity")
}

fn conn<'a>(source: Option<&'a Identity>, src: &str, dst: &str, port: u16) -> Connection<'a> {
    Connection {
        source,
        source_ip: src.parse().expect("ip"),
        destination_ip: dst.parse().expect("ip"),
        destination_port: port,
        http: None,
    }
}

fn policy(name: &str, action: Action, matches: Vec<Match>) -> Arc<Policy> {
    Arc::new(Policy {
        name: name.into(),
        namespace: "demo".into(),
        scope: Scope::Namespace,
        action,
        dry_run: false,
        rules: vec![Rule { clauses: vec![Clause { matches }] }],
    })
}

fn exact(s: &str) -> StringMatch {
    StringMatch::Exact(s.into())
}

#[test]
fn no_policies_allow_and_an_allow_policy_requires_a_match() {
    let client = id("demo", "client");
    let c = conn(Some(&client), "10.0.0.1", "10.0.0.2", 8080);
    assert_eq!(evaluate(&[], &c), Verdict::Allow);
    let only_other =
        policy("p", Action::Allow, vec![Match { namespaces: vec![exact("other")], ..Default::default() }]);
    assert_eq!(evaluate(std::slice::from_ref(&only_other), &c), Verdict::NotAllowed);
    let demo =
        policy("q", Action::Allow, vec![Match { namespaces: vec![exact("demo")], ..Default::default() }]);
    assert_eq!(evaluate(&[only_other, demo], &c), Verdict::Allow, "ALLOW policies are OR'd");
}

#[test]
fn deny_wins_over_allow() {
    let client = id("demo", "client");
    let c = conn(Some(&client), "10.0.0.1", "10.0.0.2", 8080);
    let allow = policy("allow-all", Action::Allow, vec![Match::default()]);
    let deny = policy(
        "deny-client",
        Action::Deny,
        vec![Match { principals: vec![exact("cluster.local/ns/demo/sa/client")], ..Default::default() }],
    );
    assert_eq!(evaluate(&[allow, deny], &c), Verdict::DeniedBy("demo/deny-client".into()));
}

#[test]
fn string_forms_and_negations() {
    let client = id("demo", "client");
    let c = conn(Some(&client), "10.0.0.1", "10.0.0.2", 8080);
    let holds = |m: Match| policy_matches(&policy("p", Action::Allow, vec![m]), &c);
    assert!(holds(Match {
        principals: vec![StringMatch::Prefix("cluster.local/ns/demo/".into())],
        ..Default::default()
    }));
    assert!(holds(Match {
        principals: vec![StringMatch::Suffix("/sa/client".into())],
        ..Default::default()
    }));
    assert!(!holds(Match {
        principals: vec![StringMatch::Suffix("/sa/other".into())],
        ..Default::default()
    }));
    assert!(holds(Match { principals: vec![StringMatch::Presence], ..Default::default() }));
    assert!(!holds(Match { not_principals: vec![StringMatch::Presence], ..Default::default() }));
    assert!(holds(Match { not_namespaces: vec![exact("other")], ..Default::default() }));
    assert!(!holds(Match { not_namespaces: vec![exact("demo")], ..Default::default() }));
    assert!(holds(Match { service_accounts: vec![("demo".into(), "client".into())], ..Default::default() }));
    assert!(!holds(Match {
        not_service_accounts: vec![("demo".into(), "client".into())],
        ..Default::default()
    }));
    assert!(holds(Match { source_ips: vec!["10.0.0.0/24".parse().expect("net")], ..Default::default() }));
    assert!(!holds(Match {
        not_source_ips: vec!["10.0.0.1/32".parse().expect("net")],
        ..Default::default()
    }));
    assert!(holds(Match {
        destination_ips: vec!["10.0.0.2/32".parse().expect("net")],
        ..Default::default()
    }));
    assert!(!holds(Match {
        not_destination_ips: vec!["10.0.0.0/8".parse().expect("net")],
        ..Default::default()
    }));
    assert!(holds(Match { destination_ports: vec![80, 8080], ..Default::default() }));
    assert!(!holds(Match { destination_ports: vec![80], ..Default::default() }));
    assert!(!holds(Match { not_destination_ports: vec![8080], ..Default::default() }));
    // Every field of one match must hold.
    assert!(!holds(Match {
        namespaces: vec![exact("demo")],
        destination_ports: vec![80],
        ..Default::default()
    }));
}

#[test]
fn plaintext_has_no_identity() {
    let c = conn(None, "10.0.0.1", "10.0.0.2", 8080);
    // Istio's way to refuse plaintext: DENY notPrincipals ["*"] (presence).
    let deny_plain = policy(
        "deny-plaintext",
        Action::Deny,
        vec![Match { not_principals: vec![StringMatch::Presence], ..Default::default() }],
    );
    assert_eq!(
        evaluate(std::slice::from_ref(&deny_plain), &c),
        Verdict::DeniedBy("demo/deny-plaintext".into())
    );
    let client = id("demo", "client");
    assert_eq!(evaluate(&[deny_plain], &conn(Some(&client), "10.0.0.1", "10.0.0.2", 8080)), Verdict::Allow);
    let by_ns =
        policy("ns", Action::Allow, vec![Match { namespaces: vec![exact("demo")], ..Default::default() }]);
    assert_eq!(evaluate(&[by_ns], &c), Verdict::NotAllowed, "a namespace match needs an identity");
}

#[test]
fn rules_clauses_and_matches_combine_as_istio_does() {
    let client = id("demo", "client");
    let c = conn(Some(&client), "10.0.0.1", "10.0.0.2", 8080);
    let ns = Match { namespaces: vec![exact("demo")], ..Default::default() };
    let wrong_port = Match { destination_ports: vec![9090], ..Default::default() };
    let right_port = Match { destination_ports: vec![8080], ..Default::default() };
    let p = |rules: Vec<Rule>| {
        Arc::new(Policy {
            name: "p".into(),
            namespace: "demo".into(),
            scope: Scope::Namespace,
            action: Action::Allow,
            dry_run: false,
            rules,
        })
    };
    let clause = |m: Vec<Match>| Clause { matches: m };
    // Clauses are AND'd.
    let and = p(vec![Rule { clauses: vec![clause(vec![ns.clone()]), clause(vec![wrong_port.clone()])] }]);
    assert_eq!(evaluate(&[and], &c), Verdict::NotAllowed);
    // Matches in a clause are OR'd.
    let or = p(vec![Rule {
        clauses: vec![clause(vec![ns.clone()]), clause(vec![wrong_port.clone(), right_port])],
    }]);
    assert_eq!(evaluate(&[or], &c), Verdict::Allow);
    // Rules are OR'd.
    let rules =
        p(vec![Rule { clauses: vec![clause(vec![wrong_port])] }, Rule { clauses: vec![clause(vec![ns])] }]);
    assert_eq!(evaluate(&[rules], &c), Verdict::Allow);
    // A policy without rules matches nothing: as the only ALLOW it refuses everything.
    assert_eq!(evaluate(&[p(vec![])], &c), Verdict::NotAllowed);
    // A rule without clauses matches everything.
    assert_eq!(evaluate(&[p(vec![Rule { clauses: vec![] }])], &c), Verdict::Allow);
}

#[test]
fn dry_run_never_decides_and_unsupported_matches_fail_closed() {
    let client = id("demo", "client");
    let c = conn(Some(&client), "10.0.0.1", "10.0.0.2", 8080);
    let mut deny = (*policy("dry", Action::Deny, vec![Match::default()])).clone();
    deny.dry_run = true;
    assert_eq!(evaluate(&[Arc::new(deny)], &c), Verdict::Allow);
    let unknown = Match { unsupported: true, ..Default::default() };
    assert_eq!(
        evaluate(&[policy("d", Action::Deny, vec![unknown.clone()])], &c),
        Verdict::DeniedBy("demo/d".into())
    );
    assert_eq!(evaluate(&[policy("a", Action::Allow, vec![unknown])], &c), Verdict::NotAllowed);
}

fn http_policy(name: &str, action: Action, http: HttpMatch) -> Arc<Policy> {
    policy(name, action, vec![Match { http: Some(Box::new(http)), ..Default::default() }])
}

#[test]
fn request_attributes_match_with_istio_strings() {
    use crate::state::policy::{Condition, HttpMatch};
    let client = id("demo", "client");
    let mut headers = http::HeaderMap::new();
    headers.insert("x-team", http::HeaderValue::from_static("blue"));
    let claims = serde_json::json!({"group": "admins", "level": 3});
    let req = Request {
        host: "echo.demo",
        port: None,
        method: "GET",
        path: "/admin/users",
        headers: &headers,
        request_principal: Some("https://issuer/alice"),
        claims: Some(&claims),
    };
    let mut c = conn(Some(&client), "10.0.0.1", "10.0.0.2", 8080);
    c.http = Some(&req);
    let holds = |h: HttpMatch| policy_matches(&http_policy("p", Action::Allow, h), &c);
    let s = StringMatch::istio;
    assert_eq!(s("*"), StringMatch::Presence);
    assert!(holds(HttpMatch { paths: vec![s("/admin*")], methods: vec![s("GET")], ..Default::default() }));
    assert!(!holds(HttpMatch {
        paths: vec![s("/admin*")],
        not_methods: vec![s("GET")],
        ..Default::default()
    }));
    assert!(holds(HttpMatch { hosts: vec![s("*.demo")], ..Default::default() }));
    assert!(holds(HttpMatch { request_principals: vec![s("https://issuer/*")], ..Default::default() }));
    let when = |key: &str, v: &str| HttpMatch {
        conditions: vec![Condition { key: key.into(), values: vec![s(v)], not_values: vec![] }],
        ..Default::default()
    };
    assert!(holds(when("request.headers[x-team]", "blue")));
    assert!(!holds(when("request.headers[x-team]", "red")));
    assert!(holds(when("request.auth.claims[group]", "admins")));
    assert!(holds(when("request.auth.claims[level]", "3")));
    assert!(holds(when("source.namespace", "demo")));
    assert!(holds(when("destination.port", "8080")));
    // An unknown key never allows and always denies.
    assert!(!holds(when("request.unknown", "x")));
    assert!(policy_matches(&http_policy("d", Action::Deny, when("request.unknown", "x")), &c));
}

#[test]
fn request_rules_fail_closed_at_l4_and_audit_never_decides() {
    use crate::state::policy::HttpMatch;
    let client = id("demo", "client");
    let c = conn(Some(&client), "10.0.0.1", "10.0.0.2", 8080);
    let by_path = HttpMatch { paths: vec![StringMatch::istio("/admin*")], ..Default::default() };
    assert_eq!(evaluate(&[http_policy("a", Action::Allow, by_path.clone())], &c), Verdict::NotAllowed);
    assert_eq!(
        evaluate(&[http_policy("d", Action::Deny, by_path.clone())], &c),
        Verdict::DeniedBy("demo/d".into())
    );
    assert_eq!(evaluate(&[http_policy("audit", Action::Audit, HttpMatch::default())], &c), Verdict::Allow);
}

#[test]
fn at_l4_a_deny_drops_its_request_fields_and_keeps_the_rest() {
    use crate::state::policy::HttpMatch;
    let client = id("demo", "client");
    let by_path = HttpMatch { paths: vec![StringMatch::istio("/admin*")], ..Default::default() };
    // DENY {paths: /admin*, ports: 80}: at L4 it refuses port 80 (all of it, since the path
    // cannot be read) and leaves port 82 alone; an ALLOW of the same shape admits nothing.
    let scoped = |action| {
        policy(
            "p",
            action,
            vec![Match {
                destination_ports: vec![80],
                http: Some(Box::new(by_path.clone())),
                ..Default::default()
            }],
        )
    };
    let on = |port| conn(Some(&client), "10.0.0.1", "10.0.0.2", port);
    assert_eq!(evaluate(&[scoped(Action::Deny)], &on(80)), Verdict::DeniedBy("demo/p".into()));
    assert_eq!(evaluate(&[scoped(Action::Deny)], &on(82)), Verdict::Allow);
    assert_eq!(evaluate(&[scoped(Action::Allow)], &on(80)), Verdict::NotAllowed);
    // Sources count too: a DENY for another namespace's requests does not refuse ours at L4.
    let others = policy(
        "o",
        Action::Deny,
        vec![Match { namespaces: vec![exact("other")], http: Some(Box::new(by_path)), ..Default::default() }],
    );
    assert_eq!(evaluate(&[others], &on(80)), Verdict::Allow);
}

/// Evaluates `h` as the only policy, an ALLOW or a DENY, for `req` from `demo/client`.
fn decide(req: &Request<'_>, action: Action, h: HttpMatch) -> Verdict {
    let client = id("demo", "client");
    let mut c = conn(Some(&client), "10.0.0.1", "10.0.0.2", 8080);
    c.http = Some(req);
    evaluate(&[http_policy("p", action, h)], &c)
}

fn allows(req: &Request<'_>, h: HttpMatch) -> bool {
    decide(req, Action::Allow, h) == Verdict::Allow
}

fn denies(req: &Request<'_>, h: HttpMatch) -> bool {
    decide(req, Action::Deny, h) == Verdict::DeniedBy("demo/p".into())
}

/// `when: [{key, values, notValues}]`, in Istio's string syntax.
fn when(key: &str, values: &[&str], not_values: &[&str]) -> HttpMatch {
    use crate::state::policy::Condition;
    let s = |v: &[&str]| v.iter().map(|v| StringMatch::istio(v)).collect();
    HttpMatch {
        conditions: vec![Condition { key: key.into(), values: s(values), not_values: s(not_values) }],
        ..Default::default()
    }
}

fn jwt_request<'a>(headers: &'a http::HeaderMap, claims: Option<&'a serde_json::Value>) -> Request<'a> {
    Request {
        host: "echo.demo",
        port: None,
        method: "GET",
        path: "/",
        headers,
        request_principal: claims.map(|_| "https://issuer/alice"),
        claims,
    }
}

fn sample_claims() -> serde_json::Value {
    serde_json::json!({
        "groups": ["admins", "dev"],
        "none": [],
        "mixed": ["x", 7, false, {"k": "v"}, ["y"], null],
        "realm": {
            "role": "ops",
            "access": {"level": "gold"},
            "roles": ["viewer", "editor"],
            "scope": "a b",
        },
        "level": 3,
        "ratio": 1.5,
        "admin": true,
        "nothing": null,
        "scope": "read  write",
        "permission": "p1 p2",
        "note": "a b",
        "aud": ["svc-a", "svc-b"],
        "azp": "web",
    })
}

#[test]
fn a_list_claim_matches_when_any_element_does() {
    let headers = http::HeaderMap::new();
    let claims = sample_claims();
    let req = jwt_request(&headers, Some(&claims));
    let groups = "request.auth.claims[groups]";
    // The bypass: a DENY on one group of a list claim must apply.
    assert!(denies(&req, when(groups, &["admins"], &[])));
    assert!(allows(&req, when(groups, &["admins"], &[])));
    assert!(allows(&req, when(groups, &["dev"], &[])));
    assert!(allows(&req, when(groups, &["adm*"], &[])));
    assert!(allows(&req, when(groups, &["*"], &[])));
    // No element matches.
    assert!(!allows(&req, when(groups, &["ops"], &[])));
    assert!(!denies(&req, when(groups, &["ops"], &[])));
    // notValues: hold only when no element matches.
    assert!(!allows(&req, when(groups, &[], &["dev"])));
    assert!(!denies(&req, when(groups, &[], &["dev"])));
    assert!(allows(&req, when(groups, &[], &["ops"])));
    assert!(denies(&req, when(groups, &[], &["ops"])));
    assert!(!allows(&req, when(groups, &["admins"], &["dev"])), "values and notValues both apply");
    // An empty list has no value.
    assert!(!allows(&req, when("request.auth.claims[none]", &["*"], &[])));
    assert!(allows(&req, when("request.auth.claims[none]", &[], &["*"])));
    // Scalar elements compare as their JSON text; objects, lists and nulls in a list never match.
    let mixed = "request.auth.claims[mixed]";
    for v in ["x", "7", "false"] {
        assert!(allows(&req, when(mixed, &[v], &[])), "{v}");
    }
    for v in ["k", "v", "{\"k\":\"v\"}", "y", "[\"y\"]", "null"] {
        assert!(!allows(&req, when(mixed, &[v], &[])), "{v}");
        assert!(!denies(&req, when(mixed, &[v], &[])), "{v}");
    }
}

#[test]
fn nested_claims_walk_objects() {
    let headers = http::HeaderMap::new();
    let claims = sample_claims();
    let req = jwt_request(&headers, Some(&claims));
    // Two and three levels.
    assert!(allows(&req, when("request.auth.claims[realm][role]", &["ops"], &[])));
    assert!(denies(&req, when("request.auth.claims[realm][role]", &["ops"], &[])));
    assert!(!allows(&req, when("request.auth.claims[realm][role]", &["dev"], &[])));
    assert!(allows(&req, when("request.auth.claims[realm][access][level]", &["gold"], &[])));
    assert!(denies(&req, when("request.auth.claims[realm][access][level]", &["gold"], &[])));
    assert!(!denies(&req, when("request.auth.claims[realm][access][level]", &[], &["gold"])));
    // Into a list: any element.
    assert!(allows(&req, when("request.auth.claims[realm][roles]", &["editor"], &[])));
    assert!(denies(&req, when("request.auth.claims[realm][roles]", &["editor"], &[])));
    assert!(!allows(&req, when("request.auth.claims[realm][roles]", &[], &["viewer"])));
    // Missing on the way, or walking through a list or a string: no value. A positive value
    // never matches (an ALLOW refuses, a DENY does not apply); notValues hold.
    for key in [
        "request.auth.claims[realm][missing]",
        "request.auth.claims[nope][role]",
        "request.auth.claims[realm][role][deeper]",
        "request.auth.claims[groups][admins]",
        "request.auth.claims[groups][0]",
    ] {
        assert!(!allows(&req, when(key, &["*"], &[])), "{key}");
        assert!(!denies(&req, when(key, &["*"], &[])), "{key}");
        assert!(allows(&req, when(key, &[], &["*"])), "{key}");
    }
    // An object as the final value never matches, not even `*`.
    assert!(!allows(&req, when("request.auth.claims[realm]", &["*"], &[])));
    assert!(!allows(&req, when("request.auth.claims[realm][access]", &["*"], &[])));
    // The nesting is walked as deep as the bound allows.
    let mut deep = serde_json::json!("bottom");
    for _ in 0..MAX_CLAIM_DEPTH {
        deep = serde_json::json!({ "n": deep });
    }
    let deep_req = jwt_request(&headers, Some(&deep));
    let key = format!("request.auth.claims{}", "[n]".repeat(MAX_CLAIM_DEPTH));
    assert!(allows(&deep_req, when(&key, &["bottom"], &[])));
}

#[test]
fn malformed_claim_keys_fail_closed() {
    let headers = http::HeaderMap::new();
    let claims = sample_claims();
    let req = jwt_request(&headers, Some(&claims));
    let too_deep = format!("request.auth.claims{}", "[n]".repeat(MAX_CLAIM_DEPTH + 1));
    for key in [
        "request.auth.claims",
        "request.auth.claims[]",
        "request.auth.claims[groups]]",
        "request.auth.claims[[groups]",
        "request.auth.claims[realm][]",
        "request.auth.claims[realm]role]",
        "request.auth.claims[realm]x",
        "request.auth.claims[re[alm]",
        "request.auth.claims[realm][role",
        "request.auth.claimsgroups",
        "request.auth.claims.groups",
        &too_deep,
    ] {
        for (values, not_values) in [(&["*"][..], &[][..]), (&[], &["*"])] {
            assert!(denies(&req, when(key, values, not_values)), "{key} {values:?} {not_values:?}");
            assert!(!allows(&req, when(key, values, not_values)), "{key} {values:?} {not_values:?}");
        }
    }
}

#[test]
fn scalar_claims_compare_as_json_text() {
    let headers = http::HeaderMap::new();
    let claims = sample_claims();
    let req = jwt_request(&headers, Some(&claims));
    assert!(allows(&req, when("request.auth.claims[level]", &["3"], &[])));
    assert!(denies(&req, when("request.auth.claims[level]", &["3"], &[])));
    assert!(!allows(&req, when("request.auth.claims[level]", &["4"], &[])));
    assert!(allows(&req, when("request.auth.claims[ratio]", &["1.5"], &[])));
    assert!(allows(&req, when("request.auth.claims[admin]", &["true"], &[])));
    assert!(denies(&req, when("request.auth.claims[admin]", &["true"], &[])));
    assert!(!allows(&req, when("request.auth.claims[admin]", &[], &["true"])));
    // A null claim has no value.
    assert!(!allows(&req, when("request.auth.claims[nothing]", &["*"], &[])));
    assert!(!allows(&req, when("request.auth.claims[nothing]", &["null"], &[])));
    assert!(allows(&req, when("request.auth.claims[nothing]", &[], &["*"])));
}

#[test]
fn scope_and_permission_are_space_delimited_lists() {
    let headers = http::HeaderMap::new();
    let claims = sample_claims();
    let req = jwt_request(&headers, Some(&claims));
    let scope = "request.auth.claims[scope]";
    assert!(allows(&req, when(scope, &["read"], &[])));
    assert!(denies(&req, when(scope, &["write"], &[])));
    assert!(!allows(&req, when(scope, &["read  write"], &[])), "the string is a list, as Envoy stores it");
    assert!(!allows(&req, when(scope, &[""], &[])), "empty items are skipped");
    assert!(!allows(&req, when(scope, &[], &["write"])));
    assert!(denies(&req, when("request.auth.claims[permission]", &["p2"], &[])));
    // Only those top-level claims: others stay whole strings.
    assert!(allows(&req, when("request.auth.claims[note]", &["a b"], &[])));
    assert!(!allows(&req, when("request.auth.claims[note]", &["a"], &[])));
    assert!(allows(&req, when("request.auth.claims[realm][scope]", &["a b"], &[])));
    // A scope of blanks only is left as it is (Envoy splits it into nothing and keeps it).
    let blank = serde_json::json!({"scope": "  "});
    let blank_req = jwt_request(&headers, Some(&blank));
    assert!(allows(&blank_req, when(scope, &["*"], &[])));
}

#[test]
fn audiences_and_presenter_read_aud_and_azp() {
    let headers = http::HeaderMap::new();
    let claims = sample_claims();
    let req = jwt_request(&headers, Some(&claims));
    assert!(allows(&req, when("request.auth.audiences", &["svc-b"], &[])));
    assert!(denies(&req, when("request.auth.audiences", &["svc-a"], &[])));
    assert!(!allows(&req, when("request.auth.audiences", &["svc-c"], &[])));
    assert!(!allows(&req, when("request.auth.audiences", &[], &["svc-a"])));
    assert!(allows(&req, when("request.auth.presenter", &["web"], &[])));
    assert!(!allows(&req, when("request.auth.presenter", &["cli"], &[])));
    let single = serde_json::json!({"aud": "svc-a"});
    let single_req = jwt_request(&headers, Some(&single));
    assert!(allows(&single_req, when("request.auth.audiences", &["svc-a"], &[])));
    assert!(!allows(&single_req, when("request.auth.presenter", &["*"], &[])));
    // Without a JWT every claim key is known and has no value.
    let anonymous = jwt_request(&headers, None);
    for key in ["request.auth.audiences", "request.auth.presenter", "request.auth.claims[realm][role]"] {
        assert!(!allows(&anonymous, when(key, &["*"], &[])), "{key}");
        assert!(!denies(&anonymous, when(key, &["*"], &[])), "{key}");
        assert!(allows(&anonymous, when(key, &[], &["*"])), "{key}");
    }
    // A malformed key stays unknown without a JWT too.
    assert!(denies(&anonymous, when("request.auth.claims[]", &["*"], &[])));
}

#[test]
fn claim_values_never_panics_and_reads_what_matching_reads() {
    let claims = sample_claims();
    let values = |key: &str| claim_values(&claims, key);
    assert_eq!(values("[groups]"), Some(vec!["admins".to_string(), "dev".to_string()]));
    assert_eq!(values("[realm][access][level]"), Some(vec!["gold".to_string()]));
    assert_eq!(values("[scope]"), Some(vec!["read".to_string(), "write".to_string()]));
    assert_eq!(values("[level]"), Some(vec!["3".to_string()]));
    assert_eq!(values("[realm]"), Some(vec![]));
    assert_eq!(values("[missing]"), Some(vec![]));
    assert_eq!(values("[]"), None);
    assert_eq!(values(""), None);
    assert_eq!(values("]["), None);
    assert_eq!(values("[a]]"), None);
    // Every key of up to six characters over brackets, an ASCII and a multi-byte letter: no
    // panic, and a key is read only when it is exactly its names in brackets.
    let nested = serde_json::json!({"a": {"a": ["a", 1]}, "é": {"é": "é"}});
    let alphabet = ['[', ']', 'a', 'é'];
    let (mut keys, mut level) = (vec![String::new()], vec![String::new()]);
    for _ in 0..6 {
        level = level.iter().flat_map(|k| alphabet.iter().map(move |c| format!("{k}{c}"))).collect();
        keys.extend(level.iter().cloned());
    }
    for key in &keys {
        for claims in [&claims, &nested, &serde_json::Value::Null, &serde_json::json!([1, [2], {"a": 3}])] {
            let _ = claim_values(claims, key);
        }
        if let Some(path) = claim_path(key) {
            assert_eq!(path.iter().map(|n| format!("[{n}]")).collect::<String>(), *key);
        }
    }
    assert_eq!(keys.len(), 5461);
}

/// A request for `host` from `demo/client`, to evaluate host, method and path rules on.
fn host_request<'a>(headers: &'a http::HeaderMap, host: &'a str) -> Request<'a> {
    Request {
        host,
        port: None,
        method: "GET",
        path: "/Admin",
        headers,
        request_principal: None,
        claims: None,
    }
}

fn hosts(patterns: &[&str]) -> HttpMatch {
    HttpMatch { hosts: patterns.iter().map(|p| StringMatch::istio(p)).collect(), ..Default::default() }
}

fn not_hosts(patterns: &[&str]) -> HttpMatch {
    HttpMatch { not_hosts: patterns.iter().map(|p| StringMatch::istio(p)).collect(), ..Default::default() }
}

#[test]
fn hosts_match_ignoring_ascii_case() {
    let headers = http::HeaderMap::new();
    let on = |host| host_request(&headers, host);
    // The bypass: a DENY on a host is not dodged by changing its case.
    for host in ["ADMIN.svc", "Admin.Svc", "admin.SVC", "admin.svc"] {
        assert!(denies(&on(host), hosts(&["admin.svc"])), "exact {host}");
        assert!(denies(&on(host), hosts(&["admin.*"])), "prefix {host}");
        assert!(denies(&on(host), hosts(&["*.svc"])), "suffix {host}");
        assert!(denies(&on(host), hosts(&["*"])), "presence {host}");
        assert!(allows(&on(host), hosts(&["ADMIN.SVC"])), "upper-case pattern {host}");
        assert!(allows(&on(host), hosts(&["*.SVC"])), "upper-case suffix {host}");
        assert!(allows(&on(host), hosts(&["Admin.*"])), "mixed-case prefix {host}");
        // not_hosts: an ALLOW that excludes the host refuses it in any case; a DENY of every
        // other host leaves it alone.
        assert!(!allows(&on(host), not_hosts(&["admin.svc"])), "not exact {host}");
        assert!(!allows(&on(host), not_hosts(&["*.svc"])), "not suffix {host}");
        assert!(!allows(&on(host), not_hosts(&["admin.*"])), "not prefix {host}");
        assert!(!denies(&on(host), not_hosts(&["admin.svc"])), "deny not exact {host}");
    }
    // Still only those hosts.
    assert!(!denies(&on("admin.svc.evil"), hosts(&["admin.svc"])));
    assert!(!denies(&on("xadmin.svc"), hosts(&["admin.*"])));
    assert!(!denies(&on("ADMIN.SVCX"), hosts(&["*.svc"])));
    assert!(!denies(&on("vc"), hosts(&["*.svc"])));
    assert!(!denies(&on(""), hosts(&["*"])));
    assert!(allows(&on("other.demo"), not_hosts(&["admin.svc"])));
    // ASCII case only, as Envoy's ignore_case; multi-byte hosts compare byte-wise without panicking.
    assert!(!denies(&on("ADMİN.svc"), hosts(&["admin.svc"])));
    assert!(denies(&on("é.SVC"), hosts(&["*.svc"])));
    assert!(!denies(&on("é"), hosts(&["É*"])));
    assert!(!denies(&on("aé"), hosts(&["*©"])));
}

#[test]
fn host_patterns_with_a_port_compare_with_host_and_port() {
    let headers = http::HeaderMap::new();
    let with_port = |port| Request { port, ..host_request(&headers, "admin.svc") };
    // The authority's own port, else the destination port (8080 here).
    for req in [with_port(None), with_port(Some(8080))] {
        assert!(denies(&req, hosts(&["admin.svc:8080"])), "exact with port, {:?}", req.port);
        assert!(denies(&req, hosts(&["ADMIN.svc:*"])), "any port, {:?}", req.port);
        assert!(denies(&req, hosts(&["admin.svc"])), "no port in the pattern, {:?}", req.port);
        assert!(!allows(&req, not_hosts(&["admin.svc:*"])), "not any port, {:?}", req.port);
    }
    assert!(!denies(&with_port(Some(9090)), hosts(&["admin.svc:8080"])), "another port");
    assert!(denies(&with_port(Some(9090)), hosts(&["admin.svc:*"])));
    let v6 = Request { port: Some(80), ..host_request(&headers, "[fd00::1]") };
    assert!(denies(&v6, hosts(&["[fd00::1]"])), "an IPv6 literal without a port");
    assert!(denies(&v6, hosts(&["[fd00::1]:80"])), "an IPv6 literal with a port");
}

#[test]
fn every_value_of_a_repeated_header_is_matched() {
    let mut headers = http::HeaderMap::new();
    headers.append("x-mode", http::HeaderValue::from_static("ok"));
    headers.append("x-mode", http::HeaderValue::from_static("very-bad"));
    let req = host_request(&headers, "echo.demo");
    assert!(denies(&req, when("request.headers[x-mode]", &["*bad"], &[])), "the second value");
    assert!(!allows(&req, when("request.headers[x-mode]", &[], &["*bad"])), "notValues sees it too");
    assert!(allows(&req, when("request.headers[x-mode]", &["ok"], &[])));
}

#[test]
fn methods_paths_and_headers_stay_case_sensitive() {
    let mut headers = http::HeaderMap::new();
    headers.insert("x-team", http::HeaderValue::from_static("Blue"));
    let req = host_request(&headers, "echo.demo");
    let s = StringMatch::istio;
    assert!(!allows(&req, HttpMatch { methods: vec![s("get")], ..Default::default() }));
    assert!(allows(&req, HttpMatch { methods: vec![s("GET")], ..Default::default() }));
    assert!(!allows(&req, HttpMatch { paths: vec![s("/admin")], ..Default::default() }));
    assert!(allows(&req, HttpMatch { paths: vec![s("/Admin")], ..Default::default() }));
    assert!(!allows(&req, when("request.headers[x-team]", &["blue"], &[])));
    assert!(allows(&req, when("request.headers[x-team]", &["Blue"], &[])));
}
