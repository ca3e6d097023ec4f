//! Unit tests of the certificate manager against [`TestCa`], a scripted in-process CA. Most run
//! on tokio's paused clock: the CA takes 1 ms of (virtual) time per request, so a worker that
//! asks in a loop shows up as thousands of requests instead of hanging the test.

use std::collections::BTreeSet;
use std::time::Instant;

use super::*;
use crate::readiness::Ready;

const HOUR: Duration = Duration::from_secs(3600);

fn id(sa: &str) -> Identity {
    Identity::new("cluster.local", "default", sa).expect("identity")
}

/// What the test CA signs.
#[derive(Clone, Copy, Debug)]
pub enum Validity {
    /// Valid from a minute ago for this long from now.
    For(Duration),
    /// Expired an hour ago.
    Expired,
    /// `notBefore` == `notAfter` (an hour from now).
    Empty,
}

/// A CA that counts requests per identity and can be told what to sign or to refuse.
#[derive(Debug)]
pub struct TestCa {
    ca: LocalCa,
    validity: Mutex<Validity>,
    /// Identities refused, with the error given.
    refuse: Mutex<HashMap<Identity, String>>,
    calls: Mutex<HashMap<Identity, usize>>,
}

impl TestCa {
    fn new(validity: Validity) -> Arc<Self> {
        Arc::new(Self {
            ca: LocalCa::generate("cluster.local").expect("ca"),
            validity: Mutex::new(validity),
            refuse: Mutex::default(),
            calls: Mutex::default(),
        })
    }

    /// A manager over this CA, its metrics registered in a registry (returned for rendering).
    fn manager(self: &Arc<Self>) -> (CertificateManager, Registry) {
        let mut registry = Registry::with_prefix("istio");
        let metrics = CertMetrics::new(&mut registry);
        (CertificateManager::new(CaSource::Test(self.clone()), metrics), registry)
    }

    fn calls(&self, identity: &Identity) -> usize {
        self.calls.lock().expect("lock").get(identity).copied().unwrap_or_default()
    }

    fn refuse(&self, identity: &Identity, error: Option<&str>) {
        let mut refuse = self.refuse.lock().expect("lock");
        match error {
            Some(e) => refuse.insert(identity.clone(), e.into()),
            None => refuse.remove(identity),
        };
    }

    pub async fn fetch(&self, identity: &Identity) -> Result<WorkloadCertificate, String> {
        tokio::time::sleep(Duration::from_millis(1)).await;
        *self.calls.lock().expect("lock").entry(identity.clone()).or_default() += 1;
        if let Some(e) = self.refuse.lock().expect("lock").get(identity) {
            return Err(e.clone());
        }
        let now = SystemTime::now();
        let validity = *self.validity.lock().expect("lock");
        let (not_before, not_after) = match validity {
            Validity::For(d) => (now - Duration::from_secs(60), now + d),
            Validity::Expired => (now - 2 * HOUR, now - HOUR),
            Validity::Empty => (now + HOUR, now + HOUR),
        };
        self.ca.issue_with_validity(identity, not_before, not_after).map_err(|e| e.to_string())
    }
}

fn metric(registry: &Registry, line_start: &str) -> u64 {
    let text = crate::metrics::render(registry);
    text.lines()
        .find_map(|l| l.strip_prefix(line_start)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {line_start} in\n{text}"))
}

fn local(lifetime: Duration) -> CertificateManager {
    let ca = Arc::new(LocalCa::generate("cluster.local").expect("ca"));
    CertificateManager::new(CaSource::Local(ca, lifetime), CertMetrics::default())
}

#[tokio::test]
async fn concurrent_asks_share_one_certificate() {
    let m = local(Duration::from_secs(3600));
    let asks = (0..64).map(|_| {
        let m = m.clone();
        tokio::spawn(async move { m.fetch(&id("a")).await })
    });
    let mut certs = Vec::new();
    for ask in asks {
        certs.push(ask.await.expect("join").expect("cert"));
    }
    assert!(certs.windows(2).all(|w| Arc::ptr_eq(&w[0], &w[1])), "one fetch shared by all callers");
    let fetched =
        m.inner.metrics.fetches.get_or_create(&OutcomeLabels { source: "local", outcome: "success" });
    assert_eq!(fetched.get(), 1);
    let other = m.fetch(&id("b")).await.expect("b");
    assert_eq!(other.identity, id("b"));
    assert_eq!(m.summary().len(), 2);
}

#[tokio::test]
async fn rotates_at_about_half_life() {
    let m = local(Duration::from_secs(2));
    let first = m.fetch(&id("a")).await.expect("cert");
    let start = Instant::now();
    let second = tokio::time::timeout(Duration::from_secs(5), m.rotated(&id("a"), &first))
        .await
        .expect("rotation within the lifetime");
    let waited = start.elapsed();
    // X.509 times have whole seconds, so "half of what remains" is between ~0.5 s and 1 s (or
    // the refresh floor of 1 s when that is less).
    assert!(waited >= Duration::from_millis(400) && waited < Duration::from_millis(1500), "{waited:?}");
    assert_ne!(second.chain[0], first.chain[0], "a new leaf");
}

#[tokio::test]
async fn wrong_trust_domain_fails_and_is_counted() {
    let m = local(Duration::from_secs(60));
    let foreign = Identity::new("elsewhere.td", "ns", "sa").expect("id");
    let err = m.fetch(&foreign).await.expect_err("foreign trust domain");
    assert!(err.to_string().contains("outside trust domain"), "{err}");
    let summary = m.summary();
    assert_eq!(summary[0].state, "failed");
    m.forget(&foreign);
    assert!(m.summary().is_empty());
}

/// (1) A CA answering with expired certificates is asked with backoff, not in a loop; the
/// certificates are counted and never handed out.
#[tokio::test(start_paused = true)]
async fn expired_certificates_are_not_used_and_the_ca_is_asked_with_backoff() {
    let ca = TestCa::new(Validity::Expired);
    let (m, registry) = ca.manager();
    let a = id("a");
    let err = m.fetch(&a).await.expect_err("an expired certificate is no certificate");
    assert!(matches!(&err, ManagerError::Unusable { problem: Unusable::Expired { .. }, .. }), "{err}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let in_two_seconds = ca.calls(&a);
    assert!((1..=5).contains(&in_two_seconds), "{in_two_seconds} CA requests in 2 s");
    tokio::time::sleep(Duration::from_secs(58)).await;
    let in_a_minute = ca.calls(&a);
    // Waits of 1 s, 1-2 s, 2-4 s, ... capped at 15-30 s: at most 8 requests in a minute.
    assert!((3..=8).contains(&in_a_minute), "{in_a_minute} CA requests in 60 s");

    let counted = metric(&registry, r#"istio_certificate_unusable_total{source="test",reason="expired"}"#);
    assert_eq!(counted, in_a_minute as u64);
    let errors = metric(&registry, r#"istio_certificate_fetches_total{source="test",outcome="error"}"#);
    assert_eq!(errors, in_a_minute as u64);
    assert!(m.current(&a).is_none(), "not handed out");
    assert!(m.fetch(&a).await.is_err());
    let missing = m.missing([&a]);
    assert_eq!(missing.len(), 1);
    assert!(missing[0].to_string().contains("certificate expired"), "{}", missing[0]);
    assert_eq!(m.summary()[0].state, "failed");
}

/// (1) notBefore == notAfter: no lifetime at all.
#[tokio::test(start_paused = true)]
async fn certificates_without_a_validity_period_are_not_used() {
    let ca = TestCa::new(Validity::Empty);
    let (m, registry) = ca.manager();
    let err = m.fetch(&id("a")).await.expect_err("no lifetime");
    assert!(matches!(&err, ManagerError::Unusable { problem: Unusable::NoLifetime { .. }, .. }), "{err}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(ca.calls(&id("a")) <= 5, "{} CA requests in 2 s", ca.calls(&id("a")));
    assert!(
        metric(&registry, r#"istio_certificate_unusable_total{source="test",reason="no_lifetime"}"#) >= 1
    );
    assert!(m.current(&id("a")).is_none());
}

/// (1) A lifetime so short that half of it is under the refresh floor: used while valid, but
/// refreshed no faster than the floor, with backoff.
#[tokio::test(start_paused = true)]
async fn short_lived_certificates_are_refreshed_with_a_floor_and_backoff() {
    // X.509 keeps whole seconds: 1.5 s from now leaves 0.5-1.5 s, half of it under the floor.
    let ca = TestCa::new(Validity::For(Duration::from_millis(1500)));
    let (m, registry) = ca.manager();
    let cert = m.fetch(&id("a")).await.expect("valid for now");
    assert_eq!(cert.identity, id("a"));
    tokio::time::sleep(Duration::from_secs(10)).await;
    let calls = ca.calls(&id("a"));
    // Rotating at half life would mean a request every 0.25-0.8 s; with the floor and backoff,
    // requests come at 0, 1 s, 2-3 s, 4-7 s, 8-15 s.
    assert!((2..=5).contains(&calls), "{calls} CA requests in 10 s");
    let counted =
        metric(&registry, r#"istio_certificate_unusable_total{source="test",reason="short_lived"}"#);
    assert_eq!(counted, calls as u64);
}

/// (1) A held certificate the CA fails to replace stops being handed out when it expires.
#[tokio::test(start_paused = true)]
async fn a_held_certificate_is_not_used_past_its_expiry() {
    let ca = TestCa::new(Validity::For(HOUR));
    let (m, _registry) = ca.manager();
    let a = id("a");
    let first = m.fetch(&a).await.expect("cert");
    ca.refuse(&a, Some("CA down"));
    // Rotation at ~30 min fails; the certificate stays in use while it is valid...
    tokio::time::sleep(Duration::from_secs(40 * 60)).await;
    let held = m.current(&a).expect("still valid");
    assert!(Arc::ptr_eq(&held, &first));
    assert!(ca.calls(&a) > 1, "rotation was tried");
    // ...and not after.
    tokio::time::sleep(Duration::from_secs(25 * 60)).await;
    assert!(m.current(&a).is_none(), "expired certificate still handed out");
    // The identity is missing again, with the CA's latest error (retries go on).
    m.fetch(&a).await.expect_err("no certificate");
    assert_eq!(m.summary()[0].state, "failed");
    // The CA recovers: a new certificate is used.
    ca.refuse(&a, None);
    let second = tokio::time::timeout(Duration::from_secs(60), m.wait_ready(&a)).await.expect("recovered");
    assert!(!Arc::ptr_eq(&second, &first));
}

/// (2) Identities no longer wanted are dropped and no longer refreshed.
#[tokio::test(start_paused = true)]
async fn retain_drops_and_stops_refreshing_identities_no_longer_wanted() {
    let ca = TestCa::new(Validity::For(HOUR));
    let (m, registry) = ca.manager();
    let (a, b) = (id("a"), id("b"));
    m.fetch(&a).await.expect("a");
    m.fetch(&b).await.expect("b");
    // Both are rotated about every half hour.
    tokio::time::sleep(3 * HOUR).await;
    assert!(ca.calls(&a) >= 5 && ca.calls(&b) >= 5, "{} {}", ca.calls(&a), ca.calls(&b));
    let text = crate::metrics::render(&registry);
    assert!(text.contains(&format!(r#"identity="{b}""#)), "{text}");

    assert_eq!(m.retain([&a]), vec![b.clone()]);
    let b_calls = ca.calls(&b);
    let a_calls = ca.calls(&a);
    assert!(m.current(&b).is_none());
    assert_eq!(m.summary().iter().map(|s| s.identity.clone()).collect::<Vec<_>>(), vec![a.to_string()]);
    let text = crate::metrics::render(&registry);
    assert!(!text.contains(&format!(r#"identity="{b}""#)), "expiry gauge of b removed: {text}");

    tokio::time::sleep(3 * HOUR).await;
    assert_eq!(ca.calls(&b), b_calls, "b no longer refreshed");
    assert!(ca.calls(&a) >= a_calls + 5, "a still refreshed");
    // Asked for again (a connection of a workload that came back), it is held again.
    m.fetch(&b).await.expect("b again");
    assert_eq!(ca.calls(&b), b_calls + 1);
}

/// (2) The map is bounded: unwanted identities make room, wanted ones are never evicted.
#[tokio::test(start_paused = true)]
async fn at_most_the_limit_of_identities_is_held() {
    let ca = TestCa::new(Validity::For(HOUR));
    let m = CertificateManager::with_limit(CaSource::Test(ca.clone()), CertMetrics::default(), 2);
    let (a, b, c, d) = (id("a"), id("b"), id("c"), id("d"));
    m.retain([&a, &b]);
    m.fetch(&a).await.expect("a");
    m.fetch(&b).await.expect("b");
    let err = m.fetch(&c).await.expect_err("full of wanted identities");
    assert!(matches!(err, ManagerError::TooMany { limit: 2, .. }), "{err}");
    assert_eq!(ca.calls(&c), 0);

    m.retain([&a]);
    m.fetch(&c).await.expect("room after b left");
    // c is not wanted (asked between two retains): it makes room for d.
    m.fetch(&d).await.expect("d");
    let held: Vec<String> = m.summary().into_iter().map(|s| s.identity).collect();
    assert_eq!(held, vec![a.to_string(), d.to_string()]);
}

/// (3) Readiness names the identities still missing and why, follows the wanted set, and is
/// released once every wanted identity has a certificate.
#[tokio::test(start_paused = true)]
async fn readiness_names_the_missing_identities() {
    let ca = TestCa::new(Validity::For(HOUR));
    let (m, _registry) = ca.manager();
    let (a, b, c) = (id("a"), id("b"), id("c"));
    ca.refuse(&b, Some("CA down"));
    let ready = Ready::new();
    let block = ready.register("workload certificates");
    let wanted = Arc::new(Mutex::new(BTreeSet::from([a.clone(), b.clone()])));
    let (changes, rx) = watch::channel(0u64);
    let follower = {
        let (m, wanted) = (m.clone(), wanted.clone());
        tokio::spawn(async move { m.follow(rx, move || wanted.lock().expect("lock").clone(), block).await })
    };

    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        ready.pending(),
        vec![format!("workload certificates: missing {b} (CA error: CA down)")],
        "a is in, b is not"
    );

    // A new workload whose certificate is still on its way.
    ca.refuse(&c, Some("CA busy"));
    wanted.lock().expect("lock").insert(c.clone());
    changes.send_modify(|n| *n += 1);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        ready.pending(),
        vec![format!("workload certificates: missing {b} (CA error: CA down), {c} (CA error: CA busy)")]
    );

    // c's certificate arrives on a retry; b's workload leaves: nothing is missing any more.
    ca.refuse(&c, None);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(ready.pending(), vec![format!("workload certificates: missing {b} (CA error: CA down)")]);
    wanted.lock().expect("lock").remove(&b);
    changes.send_modify(|n| *n += 1);
    tokio::time::timeout(Duration::from_secs(1), ready.wait()).await.expect("ready");
    let b_calls = ca.calls(&b);
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert_eq!(ca.calls(&b), b_calls, "b dropped, no more retries");
    let held: Vec<String> = m.summary().into_iter().map(|s| s.identity).collect();
    assert_eq!(held, vec![a.to_string(), c.to_string()]);

    // The follower ends with the state feed.
    drop(changes);
    tokio::time::timeout(Duration::from_secs(1), follower).await.expect("ends").expect("join");
}

#[test]
fn long_missing_lists_are_shortened() {
    let missing: Vec<Missing> =
        (0..8).map(|i| Missing { identity: id(&format!("sa{i}")), error: None }).collect();
    let text = describe_missing(&missing);
    assert!(
        text.starts_with("missing spiffe://cluster.local/ns/default/sa/sa0 (waiting for the CA), "),
        "{text}"
    );
    assert!(text.ends_with("sa/sa4 (waiting for the CA) and 3 more"), "{text}");
}
