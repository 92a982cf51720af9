//! The Helm chart under helm/postern and the plain manifests under
//! deploy/kubernetes: `helm lint --strict` and `helm template` for the
//! default values and every file in helm/postern/ci/, every rendered object
//! through `kubernetes-validate --strict` (the cert-manager and Prometheus
//! Operator objects, which it has no schema for, are checked here), the
//! rendered Postern configuration through `postern check-config`, the
//! PrometheusRule through promtool, the plain manifests equal to the
//! default render, the client listeners (IMAP, POP3, submission,
//! ManageSieve) with their ports, policies and backend-port checks, the
//! cluster store (an external one, or the Valkey StatefulSet the chart
//! runs) with its mounts and network policies, and the chart README
//! naming every value.
//!
//! The tools come from scripts/test: helm v3.18.0 (checked by its sha256),
//! kubernetes-validate from PyPI, promtool from Debian's prometheus.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;
use serde_yaml::Value;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn chart() -> PathBuf {
    root().join("helm/postern")
}

fn run(program: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(program)
        .args(args)
        .current_dir(root())
        .output()
        .unwrap_or_else(|e| panic!("{program} is missing ({e}): scripts/test installs it"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn helm(args: &[&str]) -> String {
    let (ok, out, err) = run("helm", args);
    assert!(ok, "helm {args:?} failed:\n{out}{err}");
    out
}

/// helm's error for a render that must fail.
fn helm_error(args: &[&str]) -> String {
    let (ok, out, err) = run("helm", args);
    assert!(!ok, "helm {args:?} should have failed:\n{out}");
    err
}

/// The default values, then each ci/*.yaml: (label, extra helm arguments).
fn values_files() -> Vec<(String, Vec<String>)> {
    let mut files = vec![("default".to_owned(), Vec::new())];
    let mut ci: Vec<PathBuf> = fs::read_dir(chart().join("ci"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    ci.sort();
    assert!(ci.len() >= 2, "helm/postern/ci holds the test values files");
    for path in ci {
        let label = path.file_name().unwrap().to_string_lossy().into_owned();
        files.push((label, vec!["-f".to_owned(), path.display().to_string()]));
    }
    files
}

fn render(extra: &[String]) -> String {
    let mut args = vec!["template", "postern", "helm/postern"];
    args.extend(extra.iter().map(String::as_str));
    helm(&args)
}

fn documents(text: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|d| Value::deserialize(d).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

fn kind(doc: &Value) -> &str {
    doc["kind"].as_str().unwrap_or_default()
}

fn find<'a>(docs: &'a [Value], k: &str) -> Option<&'a Value> {
    docs.iter().find(|d| kind(d) == k)
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> &'a str {
    let mut at = v;
    for key in path {
        at = &at[*key];
    }
    at.as_str()
        .unwrap_or_else(|| panic!("no string at {path:?} in {v:?}"))
}

#[test]
fn tools_are_the_pinned_versions() {
    assert!(helm(&["version", "--short"]).starts_with("v3.18.0"));
    let (ok, out, err) = run("kubernetes-validate", &["--version"]);
    assert!(ok, "{out}{err}");
}

#[test]
fn helm_lint_strict_passes_for_every_values_file() {
    for (label, extra) in values_files() {
        let mut args = vec!["lint", "--strict", "helm/postern"];
        args.extend(extra.iter().map(String::as_str));
        let out = helm(&args);
        assert!(out.contains("0 chart(s) failed"), "{label}: {out}");
    }
}

#[test]
fn every_rendered_object_passes_kubernetes_validate_strict() {
    let dir = tempdir("validate");
    for (label, extra) in values_files() {
        let text = render(&extra);
        let file = dir.join(format!("{label}.rendered.yaml"));
        fs::write(&file, &text).unwrap();
        let (ok, out, err) = run("kubernetes-validate", &["--strict", file.to_str().unwrap()]);
        assert!(
            ok,
            "{label}: kubernetes-validate --strict failed:\n{out}{err}"
        );
        let docs = documents(&text);
        let custom = ["Certificate", "ServiceMonitor", "PrometheusRule"];
        for doc in &docs {
            let k = kind(doc);
            let name = str_at(doc, &["metadata", "name"]);
            if custom.contains(&k) {
                check_custom_resource(doc, &docs);
            } else {
                let passed = format!("passed for resource {}/{name}", k.to_lowercase());
                assert!(
                    out.contains(&passed),
                    "{label}: no `{passed}` in:\n{out}{err}"
                );
            }
        }
        let kinds: BTreeSet<&str> = docs.iter().map(kind).collect();
        for always in [
            "Deployment",
            "Service",
            "ConfigMap",
            "Secret",
            "PodDisruptionBudget",
        ] {
            if always == "Secret" && !kinds.contains("Secret") {
                // Users from an existing Secret: the chart makes none.
                continue;
            }
            assert!(kinds.contains(always), "{label}: no {always} in {kinds:?}");
        }
    }
}

/// What kubernetes-validate has no schema for: the fields cert-manager and
/// the Prometheus Operator require, and references that must match.
fn check_custom_resource(doc: &Value, docs: &[Value]) {
    let deployment = find(docs, "Deployment").unwrap();
    let pod = &deployment["spec"]["template"]["spec"];
    match kind(doc) {
        "Certificate" => {
            assert_eq!(str_at(doc, &["apiVersion"]), "cert-manager.io/v1");
            let secret = str_at(doc, &["spec", "secretName"]);
            assert!(!str_at(doc, &["spec", "issuerRef", "name"]).is_empty());
            assert!(
                ["Issuer", "ClusterIssuer"].contains(&str_at(doc, &["spec", "issuerRef", "kind"]))
            );
            assert!(!doc["spec"]["dnsNames"].as_sequence().unwrap().is_empty());
            let mounted = pod["volumes"]
                .as_sequence()
                .unwrap()
                .iter()
                .any(|v| v["secret"]["secretName"].as_str() == Some(secret));
            assert!(mounted, "the Certificate's Secret {secret} is mounted");
        }
        "ServiceMonitor" => {
            assert_eq!(str_at(doc, &["apiVersion"]), "monitoring.coreos.com/v1");
            let selector = doc["spec"]["selector"]["matchLabels"].as_mapping().unwrap();
            let metrics = docs
                .iter()
                .filter(|d| kind(d) == "Service")
                .find(|s| {
                    selector
                        .iter()
                        .all(|(k, v)| s["metadata"]["labels"].get(k) == Some(v))
                })
                .expect("the ServiceMonitor selects a Service");
            assert_eq!(metrics["spec"]["type"].as_str(), Some("ClusterIP"));
            let endpoint = &doc["spec"]["endpoints"][0];
            assert_eq!(endpoint["path"].as_str(), Some("/metrics"));
            let port = endpoint["port"].as_str().unwrap();
            assert!(metrics["spec"]["ports"]
                .as_sequence()
                .unwrap()
                .iter()
                .any(|p| p["name"].as_str() == Some(port)));
        }
        "PrometheusRule" => {
            assert_eq!(str_at(doc, &["apiVersion"]), "monitoring.coreos.com/v1");
            let alerts: Value = serde_yaml::from_str(
                &fs::read_to_string(root().join("deploy/prometheus/postern-alerts.yaml")).unwrap(),
            )
            .unwrap();
            assert_eq!(
                doc["spec"], alerts,
                "the PrometheusRule carries the alert file"
            );
        }
        other => unreachable!("{other}"),
    }
}

#[test]
fn chart_alert_rules_are_the_deploy_files_and_pass_promtool() {
    let shipped = fs::read(root().join("deploy/prometheus/postern-alerts.yaml")).unwrap();
    let in_chart = fs::read(chart().join("files/postern-alerts.yaml")).unwrap();
    assert!(
        shipped == in_chart,
        "helm/postern/files/postern-alerts.yaml differs from deploy/prometheus/postern-alerts.yaml: \
         cp deploy/prometheus/postern-alerts.yaml helm/postern/files/"
    );
    let docs = documents(&render(&[
        "--set".to_owned(),
        "prometheusRule.enabled=true".to_owned(),
    ]));
    let rule = find(&docs, "PrometheusRule").expect("a PrometheusRule");
    let dir = tempdir("rules");
    let file = dir.join("rules.yaml");
    fs::write(&file, serde_yaml::to_string(&rule["spec"]).unwrap()).unwrap();
    let (ok, out, err) = run("promtool", &["check", "rules", file.to_str().unwrap()]);
    assert!(ok && out.contains("SUCCESS"), "{out}{err}");
}

#[test]
fn plain_manifests_equal_the_default_render() {
    let plain = fs::read_to_string(root().join("deploy/kubernetes/postern.yaml")).unwrap();
    let rendered = render(&[]);
    assert!(
        plain == rendered,
        "deploy/kubernetes/postern.yaml is not the chart's default render; regenerate it:\n  \
         helm template postern helm/postern > deploy/kubernetes/postern.yaml"
    );
}

/// The configuration each values file renders passes `postern
/// check-config`, with the files it names (mounted Secrets in a pod) made
/// under a temporary root.
#[test]
fn rendered_configuration_passes_check_config() {
    for (label, extra) in values_files() {
        let docs = documents(&render(&extra));
        let config = find(&docs, "ConfigMap").unwrap()["data"]["postern.yaml"]
            .as_str()
            .unwrap()
            .to_owned();
        let dir = tempdir(&format!("config-{label}"));
        let base = dir.display().to_string();
        let config = config
            .replace("/etc/postern/", &format!("{base}/etc/postern/"))
            .replace("/var/lib/postern", &format!("{base}/var/lib/postern"));
        let parsed: Value = serde_yaml::from_str(&config).unwrap();

        let users = dir.join("etc/postern/users/users.yaml");
        fs::create_dir_all(users.parent().unwrap()).unwrap();
        let users_secret = docs
            .iter()
            .find(|d| kind(d) == "Secret" && d["stringData"]["users.yaml"].is_string());
        match users_secret {
            Some(secret) => fs::write(&users, str_at(secret, &["stringData", "users.yaml"])),
            None if parsed["auth"]["static"]["format"].as_str() == Some("passwd-file") => {
                fs::write(&users, "alice@example.com:{PLAIN}secret\n")
            }
            None => fs::write(&users, "users: []\n"),
        }
        .unwrap();
        let made = rcgen::generate_simple_self_signed(vec!["imap.example.com".into()]).unwrap();
        for file in mentioned_files(&config, &base) {
            fs::create_dir_all(file.parent().unwrap()).unwrap();
            let name = file.file_name().unwrap().to_string_lossy();
            let text = if name.ends_with(".key") {
                made.key_pair.serialize_pem()
            } else if name.ends_with(".crt") || name.ends_with(".pem") {
                made.cert.pem()
            } else if file.ends_with("cluster-key/key") {
                // The fingerprint key wants 16 bytes or more.
                "a-cluster-fingerprint-key-of-32b\n".to_owned()
            } else {
                "secret\n".to_owned()
            };
            if !file.exists() {
                fs::write(&file, text).unwrap();
            }
        }
        let path = dir.join("postern.yaml");
        fs::write(&path, &config).unwrap();
        let (ok, out, err) = run(
            env!("CARGO_BIN_EXE_postern"),
            &["check-config", path.to_str().unwrap()],
        );
        assert!(
            ok && out.contains("configuration OK"),
            "{label}:\n{config}\n{out}{err}"
        );
    }
}

/// Absolute paths under `base` in a configuration (cert, key, CA, password
/// and token files), except the self-signed directory.
fn mentioned_files(config: &str, base: &str) -> Vec<PathBuf> {
    config
        .split(|c: char| c.is_whitespace() || c == '"' || c == '\'' || c == ',')
        .filter(|w| w.starts_with(base) && !w.contains("self-signed"))
        .map(PathBuf::from)
        .collect()
}

#[test]
fn configuration_reload_is_hot_or_rolls_the_pods() {
    let pod_annotations = |extra: &[&str]| {
        let mut args: Vec<String> = Vec::new();
        for e in extra {
            args.extend(["--set".to_owned(), e.to_string()]);
        }
        let docs = documents(&render(&args));
        let deployment = find(&docs, "Deployment").unwrap().clone();
        let config = find(&docs, "ConfigMap").unwrap()["data"]["postern.yaml"]
            .as_str()
            .unwrap()
            .to_owned();
        (
            deployment["spec"]["template"]["metadata"]["annotations"].clone(),
            config,
        )
    };
    let (hot, config) = pod_annotations(&[]);
    assert!(hot.is_null(), "hot reload rolls nothing: {hot:?}");
    assert!(config.contains("watch: true"), "{config}");

    let (a, config) = pod_annotations(&["reload.mode=restart"]);
    assert!(
        config.contains("watch: true"),
        "Secrets the chart does not make still reload in place: {config}"
    );
    let (b, _) = pod_annotations(&["reload.mode=restart", "log.level=debug"]);
    let (c, _) = pod_annotations(&[
        "reload.mode=restart",
        "users.entries[0].user=x",
        "users.entries[0].password=hash",
    ]);
    let sum = |v: &Value, k: &str| v[k].as_str().unwrap().to_owned();
    assert_ne!(sum(&a, "checksum/config"), sum(&b, "checksum/config"));
    assert_eq!(sum(&a, "checksum/config"), sum(&c, "checksum/config"));
    assert_ne!(sum(&a, "checksum/users"), sum(&c, "checksum/users"));
}

#[test]
fn pods_are_locked_down_and_outlive_their_drain() {
    for (label, extra) in values_files() {
        let docs = documents(&render(&extra));
        let pod = &find(&docs, "Deployment").unwrap()["spec"]["template"]["spec"];
        let container = &pod["containers"][0];
        let sc = &container["securityContext"];
        assert_eq!(
            pod["securityContext"]["runAsNonRoot"].as_bool(),
            Some(true),
            "{label}"
        );
        assert_eq!(
            sc["readOnlyRootFilesystem"].as_bool(),
            Some(true),
            "{label}"
        );
        assert_eq!(
            sc["allowPrivilegeEscalation"].as_bool(),
            Some(false),
            "{label}"
        );
        assert_eq!(
            sc["capabilities"]["drop"][0].as_str(),
            Some("ALL"),
            "{label}"
        );
        for port in container["ports"].as_sequence().unwrap() {
            assert!(
                port["containerPort"].as_u64().unwrap() >= 1024,
                "{label}: {port:?}"
            );
        }
        for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
            assert_eq!(
                container[probe]["httpGet"]["path"].as_str(),
                Some(path),
                "{label}"
            );
            assert_eq!(
                container[probe]["httpGet"]["port"].as_str(),
                Some("metrics")
            );
        }
        let config: Value = serde_yaml::from_str(
            find(&docs, "ConfigMap").unwrap()["data"]["postern.yaml"]
                .as_str()
                .unwrap(),
        )
        .unwrap();
        let drain: u64 = str_at(&config, &["limits", "shutdown_drain"])
            .strip_suffix('s')
            .unwrap()
            .parse()
            .unwrap();
        let sleep = container["lifecycle"]["preStop"]["sleep"]["seconds"]
            .as_u64()
            .unwrap_or(0);
        let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
        assert!(
            grace > drain + sleep,
            "{label}: grace {grace} vs drain {drain} + {sleep}"
        );
        // The metrics port answers probes from outside the pod.
        assert!(
            !str_at(&config, &["metrics", "bind"]).starts_with("127."),
            "{label}"
        );
    }
}

/// A render's client port names: the container's, the client Service's
/// (name, port), and the NetworkPolicy's client ingress rule's (empty
/// without a policy).
fn client_ports(docs: &[Value]) -> (Vec<String>, Vec<(String, u64)>, Vec<String>) {
    let container = &find(docs, "Deployment").unwrap()["spec"]["template"]["spec"]["containers"][0];
    let container_ports = container["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| str_at(p, &["name"]).to_owned())
        .collect();
    let service_ports = client_service(docs)["spec"]["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| {
            assert_eq!(p["targetPort"], p["name"], "{p:?}");
            (str_at(p, &["name"]).to_owned(), p["port"].as_u64().unwrap())
        })
        .collect();
    let ingress = find(docs, "NetworkPolicy")
        .map(|np| {
            np["spec"]["ingress"][0]["ports"]
                .as_sequence()
                .unwrap()
                .iter()
                .map(|p| str_at(p, &["port"]).to_owned())
                .collect()
        })
        .unwrap_or_default();
    (container_ports, service_ports, ingress)
}

fn client_service(docs: &[Value]) -> &Value {
    docs.iter()
        .find(|d| kind(d) == "Service" && str_at(d, &["metadata", "name"]) == "postern")
        .unwrap()
}

/// The client Service's node port for the port named `name`.
fn node_port(docs: &[Value], name: &str) -> Option<u64> {
    client_service(docs)["spec"]["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|p| p["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no Service port {name}"))["nodePort"]
        .as_u64()
}

/// The rendered Postern configuration.
fn rendered_config(docs: &[Value]) -> Value {
    serde_yaml::from_str(
        find(docs, "ConfigMap").unwrap()["data"]["postern.yaml"]
            .as_str()
            .unwrap(),
    )
    .unwrap()
}

/// The rendered configuration's listeners: (name, protocol, "tls bind").
fn rendered_listeners(docs: &[Value]) -> Vec<(String, String, String)> {
    rendered_config(docs)["listeners"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|l| {
            (
                str_at(l, &["name"]).to_owned(),
                l["protocol"].as_str().unwrap_or("imap").to_owned(),
                format!("{} {}", str_at(l, &["tls"]), str_at(l, &["bind"])),
            )
        })
        .collect()
}

/// The NetworkPolicy's egress rules: (ports, peers) each.
fn egress_rules(docs: &[Value]) -> Vec<(Vec<u64>, Value)> {
    find(docs, "NetworkPolicy").unwrap()["spec"]["egress"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|rule| {
            let ports = rule["ports"]
                .as_sequence()
                .unwrap()
                .iter()
                .map(|p| p["port"].as_u64().unwrap())
                .collect();
            (ports, rule["to"].clone())
        })
        .collect()
}

fn owned<const N: usize>(rows: [(&str, &str, &str); N]) -> Vec<(String, String, String)> {
    rows.iter()
        .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
        .collect()
}

fn named_ports<const N: usize>(rows: [(&str, u64); N]) -> Vec<(String, u64)> {
    rows.iter().map(|(n, p)| (n.to_string(), *p)).collect()
}

/// The POP3 listeners are off by default; enabled, their ports appear on
/// the container, the Service (995, 110) and the NetworkPolicy, the
/// configuration gets `protocol: pop3` listeners, and egress allows the
/// backends' POP3 ports.
#[test]
fn pop3_ports_render_only_when_enabled() {
    let docs = documents(&render(&[
        "--set".to_owned(),
        "networkPolicy.enabled=true".to_owned(),
    ]));
    let (container, service, ingress) = client_ports(&docs);
    assert_eq!(container, ["imaps", "imap", "metrics"]);
    assert_eq!(service, named_ports([("imaps", 993), ("imap", 143)]));
    assert_eq!(ingress, ["imaps", "imap"]);
    assert!(rendered_listeners(&docs)
        .iter()
        .all(|(_, protocol, _)| protocol == "imap"));

    let values = chart().join("ci/pop3-values.yaml");
    let docs = documents(&render(&["-f".to_owned(), values.display().to_string()]));
    let (container, service, ingress) = client_ports(&docs);
    assert_eq!(container, ["imaps", "imap", "pop3s", "pop3", "metrics"]);
    assert_eq!(
        service,
        named_ports([("imaps", 993), ("imap", 143), ("pop3s", 995), ("pop3", 110)])
    );
    assert_eq!(ingress, ["imaps", "imap", "pop3s", "pop3"]);
    assert_eq!(
        rendered_listeners(&docs),
        owned([
            ("imaps", "imap", "implicit [::]:9993"),
            ("imap", "imap", "starttls [::]:9143"),
            ("pop3s", "pop3", "implicit [::]:9995"),
            ("pop3", "pop3", "starttls [::]:9110"),
        ])
    );
    assert_eq!(node_port(&docs, "pop3s"), Some(30995));
    assert_eq!(egress_rules(&docs)[1].0, [143, 993, 110, 995]);

    // POP3 alone: the IMAP ports go, the POP3 ones stay.
    let docs = documents(&render(&[
        "-f".to_owned(),
        values.display().to_string(),
        "--set".to_owned(),
        "listeners.imaps=false".to_owned(),
        "--set".to_owned(),
        "listeners.imap=false".to_owned(),
    ]));
    let (container, _, ingress) = client_ports(&docs);
    assert_eq!(container, ["pop3s", "pop3", "metrics"]);
    assert_eq!(ingress, ["pop3s", "pop3"]);
}

/// The submission (587 STARTTLS, 465 implicit TLS) and ManageSieve (4190)
/// listeners are off by default; enabled, their ports appear on the
/// container (9587, 9465, 9190), the Service (with node ports) and the
/// NetworkPolicy, the configuration gets `protocol: submission` and
/// `protocol: managesieve` listeners and the values' `submission` and
/// `managesieve` blocks as they are, and egress allows the backends'
/// submission and ManageSieve ports.
#[test]
fn submission_and_sieve_ports_render_only_when_enabled() {
    let docs = documents(&render(&[]));
    let config = rendered_config(&docs);
    assert!(config.get("submission").is_none(), "{config:?}");
    assert!(config.get("managesieve").is_none(), "{config:?}");

    let values = chart().join("ci/submission-values.yaml");
    let docs = documents(&render(&["-f".to_owned(), values.display().to_string()]));
    let (container, service, ingress) = client_ports(&docs);
    assert_eq!(
        container,
        [
            "imaps",
            "imap",
            "submission",
            "submissions",
            "sieve",
            "metrics"
        ]
    );
    assert_eq!(
        service,
        named_ports([
            ("imaps", 993),
            ("imap", 143),
            ("submission", 587),
            ("submissions", 465),
            ("sieve", 4190),
        ])
    );
    assert_eq!(
        ingress,
        ["imaps", "imap", "submission", "submissions", "sieve"]
    );
    assert_eq!(
        rendered_listeners(&docs),
        owned([
            ("imaps", "imap", "implicit [::]:9993"),
            ("imap", "imap", "starttls [::]:9143"),
            ("submission", "submission", "starttls [::]:9587"),
            ("submissions", "submission", "implicit [::]:9465"),
            ("sieve", "managesieve", "starttls [::]:9190"),
        ])
    );
    assert_eq!(node_port(&docs, "submission"), None);
    assert_eq!(node_port(&docs, "submissions"), Some(30465));
    assert_eq!(node_port(&docs, "sieve"), Some(30190));
    let config = rendered_config(&docs);
    assert_eq!(
        str_at(&config, &["submission", "hostname"]),
        "mail.example.com"
    );
    assert_eq!(
        config["submission"]["max_message_size"].as_u64(),
        Some(36700160)
    );
    assert_eq!(str_at(&config, &["submission", "greeting_delay"]), "2s");
    assert!(str_at(&config, &["managesieve", "sieve_extensions"]).starts_with("fileinto "));
    // DNS, then the backends: IMAP's ports, then each backend's submission
    // and ManageSieve ports (587 and 4190, the archive's 465 and 14190).
    let egress = egress_rules(&docs);
    assert_eq!(egress.len(), 2, "{egress:?}");
    assert_eq!(egress[1].0, [143, 993, 587, 465, 4190, 14190]);

    // One listener at a time: only its ports, and only its backend port
    // in egress.
    for (on, port) in [("submission", 587), ("submissions", 465), ("sieve", 4190)] {
        let mut args = vec!["-f".to_owned(), values.display().to_string()];
        for name in ["imaps", "imap", "submission", "submissions", "sieve"] {
            args.extend([
                "--set".to_owned(),
                format!("listeners.{name}={}", name == on),
            ]);
        }
        let docs = documents(&render(&args));
        let (container, service, ingress) = client_ports(&docs);
        assert_eq!(container, [on, "metrics"]);
        assert_eq!(service, named_ports([(on, port)]));
        assert_eq!(ingress, [on]);
        let want: &[u64] = if on == "sieve" {
            &[143, 993, 4190, 14190]
        } else {
            &[143, 993, 587, 465]
        };
        assert_eq!(egress_rules(&docs)[1].0, want, "{on}");
    }
}

/// With `submission.relays` every submission goes to those MTAs: the
/// backends need no `submission_port`, and egress gets a rule of its own
/// for the relays' ports, to `networkPolicy.egress.relayTo`, while a
/// submission listener runs; the backends' submission ports are not opened.
#[test]
fn submission_relays_lift_the_backend_port_and_get_their_own_egress() {
    let values = chart().join("ci/submission-relays-values.yaml");
    let docs = documents(&render(&["-f".to_owned(), values.display().to_string()]));
    let config = rendered_config(&docs);
    let relays = config["submission"]["relays"].as_sequence().unwrap();
    assert_eq!(relays.len(), 2);
    assert!(config["backends"]["pool"]
        .as_sequence()
        .unwrap()
        .iter()
        .all(|b| b.get("submission_port").is_none()));
    let egress = egress_rules(&docs);
    assert_eq!(egress.len(), 3, "{egress:?}");
    assert_eq!(egress[1].0, [143, 993]);
    assert_eq!(
        egress[1].1[0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"].as_str(),
        Some("mail")
    );
    assert_eq!(egress[2].0, [587, 465]);
    assert_eq!(
        str_at(&egress[2].1[0], &["ipBlock", "cidr"]),
        "10.40.0.0/24"
    );

    // Backends that have submission ports anyway: relays win, their ports
    // stay closed.
    let docs = documents(&render(&[
        "-f".to_owned(),
        values.display().to_string(),
        "--set".to_owned(),
        "backends.pool[0].submission_port=10587".to_owned(),
    ]));
    let egress = egress_rules(&docs);
    assert_eq!(egress[1].0, [143, 993]);
    assert_eq!(egress[2].0, [587, 465]);

    // No submission listener: no relay rule.
    let docs = documents(&render(&[
        "-f".to_owned(),
        values.display().to_string(),
        "--set".to_owned(),
        "listeners.submissions=false".to_owned(),
    ]));
    assert_eq!(egress_rules(&docs).len(), 2);
}

/// Users from a chart-made Secret are mounted by its own key, whatever
/// `users.key` says; one pod per node rolls without a surge pod.
#[test]
fn users_key_and_rollout_follow_the_other_values() {
    let docs = documents(&render(&[
        "--set".to_owned(),
        "users.key=passwd".to_owned(),
    ]));
    let pod = &find(&docs, "Deployment").unwrap()["spec"]["template"]["spec"];
    let users = pod["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["name"].as_str() == Some("users"))
        .unwrap();
    let secret = find(&docs, "Secret").unwrap();
    let key = users["secret"]["items"][0]["key"].as_str().unwrap();
    assert!(
        secret["stringData"].get(key).is_some(),
        "{key} in {secret:?}"
    );

    for (preset, surge, unavailable) in [("soft", 1, 0), ("hard", 0, 1)] {
        let docs = documents(&render(&[
            "--set".to_owned(),
            format!("podAntiAffinity={preset}"),
        ]));
        let rolling = &find(&docs, "Deployment").unwrap()["spec"]["strategy"]["rollingUpdate"];
        assert_eq!(rolling["maxSurge"].as_u64(), Some(surge), "{preset}");
        assert_eq!(
            rolling["maxUnavailable"].as_u64(),
            Some(unavailable),
            "{preset}"
        );
    }
}

/// The `cluster` block of a render's Postern configuration (Null without).
fn cluster_block(docs: &[Value]) -> Value {
    let config: Value = serde_yaml::from_str(
        find(docs, "ConfigMap").unwrap()["data"]["postern.yaml"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    config["cluster"].clone()
}

/// Where a file Postern's configuration names comes from in its pod:
/// ("secret" or "configMap", the object's name, its key), found through
/// the container's mount of the file's directory and that volume's items.
fn mounted_from(docs: &[Value], path: &str) -> (String, String, String) {
    let pod = &find(docs, "Deployment").unwrap()["spec"]["template"]["spec"];
    let path = Path::new(path);
    let dir = path.parent().unwrap().to_str().unwrap();
    let file = path.file_name().unwrap().to_str().unwrap();
    let mount = pod["containers"][0]["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|m| m["mountPath"].as_str() == Some(dir))
        .unwrap_or_else(|| panic!("nothing mounted at {dir}"));
    assert_eq!(mount["readOnly"].as_bool(), Some(true), "{mount:?}");
    let volume = pod["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap();
    let (source, name) = if volume["secret"].is_mapping() {
        ("secret", str_at(volume, &["secret", "secretName"]))
    } else {
        ("configMap", str_at(volume, &["configMap", "name"]))
    };
    let item = volume[source]["items"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|i| i["path"].as_str() == Some(file))
        .unwrap_or_else(|| panic!("{file} is not an item of {volume:?}"));
    (
        source.to_owned(),
        name.to_owned(),
        str_at(item, &["key"]).to_owned(),
    )
}

fn from(source: &str, name: &str, key: &str) -> (String, String, String) {
    (source.to_owned(), name.to_owned(), key.to_owned())
}

/// Whether every label of `selector` (a matchLabels map) is in `labels`.
fn selects(selector: &Value, labels: &Value) -> bool {
    let selector = selector.as_mapping().unwrap();
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

fn named<'a>(docs: &'a [Value], k: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| kind(d) == k && str_at(d, &["metadata", "name"]) == name)
        .unwrap_or_else(|| panic!("no {k} {name}"))
}

/// The egress rule of Postern's NetworkPolicy that opens the store's
/// port, and only that port.
fn store_egress(docs: &[Value], port: u64) -> Value {
    let rules: Vec<&Value> = named(docs, "NetworkPolicy", "postern")["spec"]["egress"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter(|r| {
            r["ports"]
                .as_sequence()
                .unwrap()
                .iter()
                .any(|p| p["port"].as_u64() == Some(port))
        })
        .collect();
    assert_eq!(rules.len(), 1, "one egress rule for port {port}: {rules:?}");
    let ports = rules[0]["ports"].as_sequence().unwrap();
    assert_eq!(ports.len(), 1, "{ports:?}");
    assert_eq!(ports[0]["protocol"].as_str(), Some("TCP"));
    rules[0].clone()
}

/// The value of a `--flag value` pair in a container's args.
fn arg_after<'a>(args: &'a [Value], flag: &str) -> &'a str {
    let at = args
        .iter()
        .position(|a| a.as_str() == Some(flag))
        .unwrap_or_else(|| panic!("no {flag} in {args:?}"));
    args[at + 1].as_str().unwrap()
}

/// The shared store (issue 18): off by default; an external store renders
/// the `cluster` block with every file it names mounted from the values'
/// Secrets and an egress rule to the store's network; the Valkey option
/// adds a locked-down single-node StatefulSet with its Services, a
/// password from a Secret (made by the chart or existing), and network
/// policies that let Postern's pods, and only them, reach it.
#[test]
fn cluster_store_renders_external_or_as_valkey() {
    let docs = documents(&render(&[]));
    assert!(cluster_block(&docs).is_null());
    assert!(find(&docs, "StatefulSet").is_none());

    // An external store over TLS.
    let values = chart().join("ci/cluster-values.yaml");
    let docs = documents(&render(&["-f".to_owned(), values.display().to_string()]));
    let want: Value = serde_yaml::from_str(
        "{store: {url: 'rediss://store.example.internal:6380/2', username: postern, \
          password_file: /etc/postern/store/password, ca_file: /etc/postern/store-ca/ca.pem, \
          timeout: 80ms, key_prefix: mail-eu}, \
         key_file: /etc/postern/cluster-key/key, lease_ttl: 90s, user_expire: 120s, hold_wait: 15s}",
    )
    .unwrap();
    // No `replica`: Postern's default, the host name, is the pod's name.
    assert_eq!(cluster_block(&docs), want);
    assert_eq!(
        mounted_from(&docs, "/etc/postern/store/password"),
        from("secret", "postern-store", "password")
    );
    assert_eq!(
        mounted_from(&docs, "/etc/postern/store-ca/ca.pem"),
        from("secret", "store-ca", "ca.crt")
    );
    assert_eq!(
        mounted_from(&docs, "/etc/postern/cluster-key/key"),
        from("secret", "postern-cluster-key", "key")
    );
    let egress = store_egress(&docs, 6380);
    let to: Value = serde_yaml::from_str("[{ipBlock: {cidr: 10.40.0.0/24}}]").unwrap();
    assert_eq!(egress["to"], to);
    assert!(find(&docs, "StatefulSet").is_none());

    // The CA from a ConfigMap instead.
    let docs = documents(&render(&[
        "-f".to_owned(),
        values.display().to_string(),
        "--set".to_owned(),
        "cluster.store.caSecret.name=".to_owned(),
        "--set".to_owned(),
        "cluster.store.caConfigMap.name=store-ca-bundle".to_owned(),
    ]));
    assert_eq!(
        mounted_from(&docs, "/etc/postern/store-ca/ca.pem"),
        from("configMap", "store-ca-bundle", "ca.crt")
    );

    // The Valkey StatefulSet, its password from an existing Secret.
    let values = chart().join("ci/cluster-valkey-values.yaml");
    let docs = documents(&render(&["-f".to_owned(), values.display().to_string()]));
    let cluster = cluster_block(&docs);
    assert_eq!(
        str_at(&cluster, &["store", "url"]),
        "redis://postern-valkey.default.svc:6390/0"
    );
    assert_eq!(
        str_at(&cluster, &["store", "password_file"]),
        "/etc/postern/store/password"
    );
    for absent in [&cluster["store"]["ca_file"], &cluster["key_file"]] {
        assert!(absent.is_null(), "{cluster:?}");
    }
    assert_eq!(
        mounted_from(&docs, "/etc/postern/store/password"),
        from("secret", "valkey-auth", "secret")
    );
    assert!(
        !docs
            .iter()
            .any(|d| kind(d) == "Secret" && str_at(d, &["metadata", "name"]) == "postern-valkey"),
        "an existing Secret: the chart makes none"
    );
    let sts = named(&docs, "StatefulSet", "postern-valkey");
    assert_eq!(sts["spec"]["replicas"].as_u64(), Some(1));
    let template = &sts["spec"]["template"];
    let labels = &template["metadata"]["labels"];
    assert!(selects(&sts["spec"]["selector"]["matchLabels"], labels));
    let pod = &template["spec"];
    let c = &pod["containers"][0];
    assert_eq!(
        str_at(c, &["image"]),
        "registry.example.com/mirror/valkey:8.1.1"
    );
    let args = c["args"].as_sequence().unwrap();
    for (flag, value) in [
        ("--port", "6390"),
        ("--requirepass", "$(VALKEY_PASSWORD)"),
        ("--maxmemory", "512mb"),
        ("--maxmemory-policy", "volatile-ttl"),
        ("--appendonly", "yes"),
        ("--dir", "/data"),
    ] {
        assert_eq!(arg_after(args, flag), value, "{args:?}");
    }
    // The password only by reference, for the server and for valkey-cli.
    let env = c["env"].as_sequence().unwrap();
    for var in ["VALKEY_PASSWORD", "REDISCLI_AUTH"] {
        let e = env
            .iter()
            .find(|e| e["name"].as_str() == Some(var))
            .unwrap_or_else(|| panic!("no {var} in {env:?}"));
        assert!(e["value"].is_null(), "{e:?}");
        let r = &e["valueFrom"]["secretKeyRef"];
        assert_eq!(
            (str_at(r, &["name"]), str_at(r, &["key"])),
            ("valkey-auth", "secret")
        );
    }
    for probe in ["livenessProbe", "readinessProbe"] {
        let command: Vec<&str> = c[probe]["exec"]["command"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        let line = command.join(" ");
        assert!(
            line.contains("valkey-cli -p 6390 ping") && line.contains("PONG"),
            "{probe}: {line}"
        );
    }
    assert_eq!(pod["securityContext"]["runAsNonRoot"].as_bool(), Some(true));
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"].as_str(),
        Some("RuntimeDefault")
    );
    assert_eq!(pod["automountServiceAccountToken"].as_bool(), Some(false));
    let sc = &c["securityContext"];
    assert_eq!(sc["readOnlyRootFilesystem"].as_bool(), Some(true));
    assert_eq!(sc["allowPrivilegeEscalation"].as_bool(), Some(false));
    assert_eq!(sc["capabilities"]["drop"][0].as_str(), Some("ALL"));
    assert_eq!(c["resources"]["limits"]["memory"].as_str(), Some("1Gi"));
    let data = c["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|m| m["mountPath"].as_str() == Some("/data"))
        .expect("/data is mounted (the root filesystem is read-only)");
    let claim = &sts["spec"]["volumeClaimTemplates"][0];
    assert_eq!(claim["metadata"]["name"], data["name"]);
    assert_eq!(
        claim["spec"]["resources"]["requests"]["storage"].as_str(),
        Some("2Gi")
    );
    assert_eq!(claim["spec"]["storageClassName"].as_str(), Some("fast-ssd"));

    // The Services select the Valkey pod; no selector of Postern's does,
    // and theirs do not take Postern's pods.
    let service = named(&docs, "Service", "postern-valkey");
    assert!(selects(&service["spec"]["selector"], labels));
    assert_eq!(service["spec"]["ports"][0]["port"].as_u64(), Some(6390));
    assert_eq!(
        service["spec"]["ports"][0]["targetPort"].as_str(),
        c["ports"][0]["name"].as_str()
    );
    let headless = named(&docs, "Service", str_at(sts, &["spec", "serviceName"]));
    assert_eq!(headless["spec"]["clusterIP"].as_str(), Some("None"));
    assert!(selects(&headless["spec"]["selector"], labels));
    let postern_pod = &find(&docs, "Deployment").unwrap()["spec"]["template"]["metadata"]["labels"];
    for selector in [
        &named(&docs, "Service", "postern")["spec"]["selector"],
        &named(&docs, "PodDisruptionBudget", "postern")["spec"]["selector"]["matchLabels"],
        &find(&docs, "Deployment").unwrap()["spec"]["selector"]["matchLabels"],
        &named(&docs, "NetworkPolicy", "postern")["spec"]["podSelector"]["matchLabels"],
    ] {
        assert!(!selects(selector, labels), "{selector:?} takes Valkey");
        assert!(selects(selector, postern_pod));
    }
    assert!(!selects(&service["spec"]["selector"], postern_pod));

    // Postern's pods reach the Valkey pod on the store port; the Valkey
    // pod takes connections from them only, and opens none.
    let egress = store_egress(&docs, 6390);
    let to = egress["to"].as_sequence().unwrap();
    assert_eq!(to.len(), 1, "{to:?}");
    assert!(to[0]["namespaceSelector"].is_null());
    assert!(selects(&to[0]["podSelector"]["matchLabels"], labels));
    let policy = named(&docs, "NetworkPolicy", "postern-valkey");
    assert!(selects(
        &policy["spec"]["podSelector"]["matchLabels"],
        labels
    ));
    let ingress = policy["spec"]["ingress"].as_sequence().unwrap();
    assert_eq!(ingress.len(), 1, "{ingress:?}");
    let peers = ingress[0]["from"].as_sequence().unwrap();
    assert_eq!(peers.len(), 1, "{peers:?}");
    assert!(selects(
        &peers[0]["podSelector"]["matchLabels"],
        postern_pod
    ));
    assert!(!selects(&peers[0]["podSelector"]["matchLabels"], labels));
    assert_eq!(ingress[0]["ports"][0]["port"], c["ports"][0]["name"]);
    let types: Vec<&str> = policy["spec"]["policyTypes"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(types, ["Ingress", "Egress"]);
    assert_eq!(
        policy["spec"]["egress"].as_sequence().map(Vec::len),
        Some(0)
    );

    // The defaults: a password the chart makes, data in memory only.
    let docs = documents(&render(&[
        "--set".to_owned(),
        "cluster.enabled=true".to_owned(),
        "--set".to_owned(),
        "cluster.valkey.enabled=true".to_owned(),
    ]));
    let secret = named(&docs, "Secret", "postern-valkey");
    let password = str_at(secret, &["data", "password"]);
    assert_eq!(password.len(), 44, "32 characters, base64: {password}");
    assert_eq!(
        mounted_from(&docs, "/etc/postern/store/password"),
        from("secret", "postern-valkey", "password")
    );
    assert_eq!(
        str_at(&cluster_block(&docs), &["store", "url"]),
        "redis://postern-valkey.default.svc:6379/0"
    );
    let sts = named(&docs, "StatefulSet", "postern-valkey");
    let c = &sts["spec"]["template"]["spec"]["containers"][0];
    let args = c["args"].as_sequence().unwrap();
    assert_eq!(arg_after(args, "--save"), "");
    assert_eq!(arg_after(args, "--appendonly"), "no");
    assert_eq!(arg_after(args, "--maxmemory-policy"), "volatile-ttl");
    assert_eq!(str_at(c, &["image"]), "valkey/valkey:8.1");
    assert!(sts["spec"]["volumeClaimTemplates"].is_null());
    let volumes = sts["spec"]["template"]["spec"]["volumes"]
        .as_sequence()
        .unwrap();
    assert!(volumes[0]["emptyDir"].is_mapping(), "{volumes:?}");
    assert_eq!(
        c["env"][0]["valueFrom"]["secretKeyRef"]["name"].as_str(),
        Some("postern-valkey")
    );
    assert!(find(&docs, "NetworkPolicy").is_none());
}

#[test]
fn bad_values_are_refused_with_the_key_named() {
    let cases: &[(&[&str], &str)] = &[
        (&["service.type=Foo"], "service.type"),
        (&["listeners.imapz=true"], "imapz"),
        (
            &["shutdown.terminationGracePeriodSeconds=20"],
            "shutdown.terminationGracePeriodSeconds",
        ),
        (
            &["proxyProtocol.enabled=true"],
            "proxyProtocol.trustedNetworks",
        ),
        (
            &[
                "tls.certManager.enabled=true",
                "tls.certManager.dnsNames[0]=a",
            ],
            "tls.certManager.issuerRef.name",
        ),
        (
            &[
                "tls.certManager.enabled=true",
                "tls.certManager.issuerRef.name=i",
            ],
            "tls.certManager.dnsNames",
        ),
        (
            &[
                "tls.existingSecret=s",
                "tls.certManager.enabled=true",
                "tls.certManager.issuerRef.name=i",
                "tls.certManager.dnsNames[0]=a",
            ],
            "not both",
        ),
        (&["admin.enabled=true"], "admin.existingSecret"),
        (
            &["listeners.imap=false", "listeners.imaps=false"],
            "listeners",
        ),
        (
            &[
                "autoscaling.enabled=true",
                "autoscaling.minReplicas=5",
                "autoscaling.maxReplicas=2",
            ],
            "autoscaling.minReplicas",
        ),
        (&["image.digest=latest"], "image.digest"),
        (
            &["config.limits.shutdown_drain=60s"],
            "shutdown.drainSeconds",
        ),
        (
            &["config.metrics.bind=127.0.0.1:9090"],
            "containerPorts.metrics",
        ),
        (&["config.listeners=x"], "config.listeners"),
        (&["listeners.pop3=true"], "backends.pool[0].pop3_port"),
        (
            &[
                "listeners.pop3s=true",
                "backends.pool[0].name=a",
                "backends.pool[0].address=a:143",
                "backends.pool[0].pop3_port=110",
                "backends.pools[0].name=p",
                "backends.pools[0].servers[0].name=b",
                "backends.pools[0].servers[0].address=b:143",
            ],
            "backends.pools[0].servers[0].pop3_port",
        ),
        (&["containerPorts.pop3=0"], "containerPorts.pop3"),
        (
            &["listeners.submission=true"],
            "backends.pool[0].submission_port",
        ),
        (
            &[
                "listeners.submissions=true",
                "backends.pool[0].name=a",
                "backends.pool[0].address=a:143",
                "backends.pool[0].submission_port=587",
                "backends.pools[0].name=p",
                "backends.pools[0].servers[0].name=b",
                "backends.pools[0].servers[0].address=b:143",
            ],
            "backends.pools[0].servers[0].submission_port",
        ),
        (
            // Relays set through `config` lift the requirement too; a
            // ManageSieve listener still needs sieve_port.
            &[
                "listeners.submission=true",
                "listeners.sieve=true",
                "config.submission.relays[0].name=mta",
                "config.submission.relays[0].address=mta:587",
            ],
            "backends.pool[0].sieve_port",
        ),
        (&["listeners.sieve=true"], "backends.pool[0].sieve_port"),
        (
            &[
                "listeners.sieve=true",
                "backends.pool[0].name=a",
                "backends.pool[0].address=a:143",
                "backends.pool[0].sieve_port=4190",
                "backends.pools[0].name=p",
                "backends.pools[0].servers[0].name=b",
                "backends.pools[0].servers[0].address=b:143",
            ],
            "backends.pools[0].servers[0].sieve_port",
        ),
        (
            &["containerPorts.submission=0"],
            "containerPorts.submission",
        ),
        (&["containerPorts.sieve=70000"], "containerPorts.sieve"),
        (&["service.nodePorts.sieve=80"], "service.nodePorts.sieve"),
        (
            &[
                "submission.relays[0].name=mta",
                "submission.relays[0].address=mta",
            ],
            "submission.relays",
        ),
        (
            &[
                "config.submission.relays[0].name=mta",
                "config.submission.relays[0].address=mta",
            ],
            "submission.relays[0].address",
        ),
        (
            &["submission.max_message_size=50M"],
            "submission.max_message_size",
        ),
        (&["managesieve.extensions=x"], "managesieve"),
        (
            &[
                "users.format=passwd-file",
                "users.entries[0].user=a",
                "users.entries[0].password=b",
            ],
            "users.entries",
        ),
        (
            &[
                "tls.certManager.enabled=true",
                "tls.certManager.issuerRef.name=i",
                "tls.certManager.dnsNames[0]=a",
                "tls.certManager.privateKey.algorithm=RSA",
            ],
            "2048",
        ),
        (&["cluster.enabled=true"], "cluster.store.url"),
        (
            &["cluster.store.url=http://valkey:6379"],
            "cluster.store.url",
        ),
        (&["cluster.valkey.enabled=true"], "cluster.valkey.enabled"),
        (
            &[
                "cluster.enabled=true",
                "cluster.store.url=redis://valkey:6380/0",
            ],
            "cluster.store.port",
        ),
        (
            &[
                "cluster.enabled=true",
                "cluster.store.url=redis://valkey:6379/0",
                "cluster.store.caSecret.name=ca",
            ],
            "rediss://",
        ),
        (
            &[
                "cluster.enabled=true",
                "cluster.store.url=rediss://valkey:6379/0",
                "cluster.store.caSecret.name=ca",
                "cluster.store.caConfigMap.name=ca",
            ],
            "not both",
        ),
        (&["config.cluster.lease_ttl=1s"], "config.cluster"),
        (
            &["cluster.valkey.maxmemoryPolicy=evict-everything"],
            "cluster.valkey.maxmemoryPolicy",
        ),
    ];
    for (sets, needle) in cases {
        let mut args = vec!["template", "postern", "helm/postern"];
        for s in *sets {
            args.extend(["--set", s]);
        }
        let err = helm_error(&args);
        assert!(err.contains(needle), "{sets:?}: `{needle}` not in:\n{err}");
    }
}

#[test]
fn chart_readme_documents_every_value() {
    let values: Value =
        serde_yaml::from_str(&fs::read_to_string(chart().join("values.yaml")).unwrap()).unwrap();
    let readme = fs::read_to_string(chart().join("README.md")).unwrap();
    let mut keys = Vec::new();
    leaf_keys(&values, "", &mut keys);
    assert!(keys.len() > 60, "{keys:?}");
    let missing: Vec<_> = keys
        .iter()
        .filter(|k| !readme.contains(&format!("`{k}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "helm/postern/README.md does not describe {missing:?}"
    );
    // The schema knows every top-level value, and refuses others.
    let schema: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(chart().join("values.schema.json")).unwrap())
            .unwrap();
    let known = schema["properties"].as_object().unwrap();
    for key in values.as_mapping().unwrap().keys() {
        assert!(
            known.contains_key(key.as_str().unwrap()),
            "{key:?} not in the schema"
        );
    }
}

/// Value paths down to the blocks that pass through as Kubernetes or
/// Postern objects.
fn leaf_keys(v: &Value, prefix: &str, out: &mut Vec<String>) {
    const WHOLE: &[&str] = &[
        "backends",
        "submission",
        "managesieve",
        "config",
        "resources",
        "podSecurityContext",
        "securityContext",
        "livenessProbe",
        "readinessProbe",
        "autoscaling.behavior",
        "cluster.valkey.resources",
        "cluster.valkey.podSecurityContext",
        "cluster.valkey.securityContext",
    ];
    match v.as_mapping() {
        Some(map) if !map.is_empty() && !WHOLE.contains(&prefix) => {
            for (k, v) in map {
                let k = k.as_str().unwrap();
                let path = if prefix.is_empty() {
                    k.to_owned()
                } else {
                    format!("{prefix}.{k}")
                };
                leaf_keys(v, &path, out);
            }
        }
        _ => out.push(prefix.to_owned()),
    }
}

/// A directory under the system's temp dir, removed when dropped.
struct TempDir(PathBuf);

impl std::ops::Deref for TempDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn tempdir(name: &str) -> TempDir {
    let dir = std::env::temp_dir().join(format!("postern-chart-{}-{name}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    TempDir(dir)
}
