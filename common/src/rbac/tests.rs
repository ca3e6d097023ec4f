//! Istio's L4 semantics, case by case.

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
