//! The monitoring files under deploy/: the alert rules pass `promtool
//! check rules` and their unit tests (`promtool test rules`), and every
//! metric the dashboard and the alerts query is one Postern exports (the
//! cluster store's, exported only with a store configured, are held to
//! the names the store's metrics have).

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The cluster store's families (issue 18), exported only by a Postern
/// with `cluster.store` configured, some only once something happened
/// (a fallback, an event): what the dashboard's "Cluster store" row and
/// the store alerts may query.
const CLUSTER_FAMILIES: &[&str] = &[
    "postern_cluster_store_up",
    "postern_cluster_store_errors_total",
    "postern_cluster_fallbacks_total",
    "postern_cluster_store_seconds",
    "postern_cluster_events_total",
];

fn promtool(args: &[&str]) -> String {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(root().join("deploy/prometheus"))
        .output()
        .expect("promtool is missing: apt-get install prometheus (scripts/test does)");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "promtool {args:?}:\n{text}");
    text
}

/// Metric family names in a PromQL expression.
fn families(expr: &str) -> BTreeSet<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("postern_") || w.starts_with("process_"))
        .map(|w| {
            ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| w.strip_suffix(s))
                .unwrap_or(w)
                .to_owned()
        })
        .collect()
}

#[test]
fn alert_rules_pass_promtool_and_their_unit_tests() {
    assert!(promtool(&["check", "rules", "postern-alerts.yaml"]).contains("SUCCESS"));
    assert!(promtool(&["test", "rules", "postern-alerts.test.yaml"]).contains("SUCCESS"));
}

#[test]
fn dashboard_and_alerts_query_only_exported_metrics() {
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("deploy/grafana/postern-dashboard.json")).unwrap(),
    )
    .unwrap();
    let mut queried = BTreeSet::new();
    let mut rows = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        if panel["type"] == "row" {
            // An open row holds no panels of its own: they follow it.
            assert_eq!(panel["panels"].as_array().map(Vec::len), Some(0));
            rows.push(panel["title"].as_str().unwrap());
            continue;
        }
        for target in panel["targets"].as_array().unwrap() {
            queried.extend(families(target["expr"].as_str().unwrap()));
        }
    }
    assert_eq!(rows, ["Cluster store"]);
    let rules: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(root().join("deploy/prometheus/postern-alerts.yaml")).unwrap(),
    )
    .unwrap();
    for group in rules["groups"].as_sequence().unwrap() {
        for rule in group["rules"].as_sequence().unwrap() {
            queried.extend(families(rule["expr"].as_str().unwrap()));
        }
    }
    assert!(queried.len() > 10, "{queried:?}");
    let (cluster, queried): (BTreeSet<String>, BTreeSet<String>) = queried
        .into_iter()
        .partition(|f| f.starts_with("postern_cluster_"));
    let unknown: Vec<&String> = cluster
        .iter()
        .filter(|f| !CLUSTER_FAMILIES.contains(&f.as_str()))
        .collect();
    assert!(
        unknown.is_empty(),
        "no such cluster store family: {unknown:?}"
    );
    for family in [
        "postern_cluster_store_up",
        "postern_cluster_fallbacks_total",
    ] {
        assert!(cluster.contains(family), "{family} is not queried");
    }

    // Traffic of every kind the queries look at: a failed and a good
    // login, relayed commands, a failed TLS handshake, ended sessions.
    let (_b, p) = common::postern::alice_behind("deploy", "", "");
    let (mut c, _) = common::client::Client::imaps(p.imaps);
    assert!(c
        .login("alice", "wrong")
        .last()
        .unwrap()
        .starts_with("L1 NO"));
    let ok = c.login("alice", common::postern::PASSWORD);
    assert!(ok.last().unwrap().starts_with("L1 OK"));
    c.command("s", "SELECT INBOX");
    c.command("Z", "LOGOUT");
    drop(c);
    let mut raw = common::client::tcp(p.imaps);
    std::io::Write::write_all(&mut raw, b"GET / HTTP/1.0\r\n\r\n").unwrap();
    drop(raw);
    common::wait_until("both sessions have ended", common::SETTLE, || {
        let text = p.metrics_text();
        text.contains("postern_tls_handshake_failures_total")
            && text.contains("postern_sessions_ended_total")
    });
    // A family is exported from its first sample on, and some get theirs
    // only as a session ends: wait for them all rather than read once.
    let missing = common::wait_for(
        "every queried metric family to be exported",
        common::SETTLE,
        || {
            let exported: BTreeSet<String> = p
                .metrics_text()
                .lines()
                .filter_map(|l| l.strip_prefix("# TYPE "))
                .filter_map(|l| l.split(' ').next())
                .map(str::to_owned)
                .collect();
            queried
                .difference(&exported)
                .cloned()
                .collect::<Vec<String>>()
        },
        |missing| missing.is_empty(),
    );
    assert!(missing.is_empty(), "queried but not exported: {missing:?}");
}
