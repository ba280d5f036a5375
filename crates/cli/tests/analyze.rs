//! `trellis analyze`: every rule has a failing example under `tests/data/analyze/bad`, each
//! offending line marked `# <- CODE`; the test checks that exactly those findings come out, at
//! those lines, with exit code 1 on errors and 0 on a clean config.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

fn data(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/analyze").join(rel)
}

fn analyze_json(paths: &[PathBuf]) -> (i32, Vec<serde_json::Value>) {
    let out = Command::new(support::trellis_bin())
        .arg("analyze")
        .arg("--output")
        .arg("json")
        .args(paths)
        .output()
        .expect("run analyze");
    let findings: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("json output ({e}): {}", String::from_utf8_lossy(&out.stdout)));
    (out.status.code().unwrap_or(-1), findings)
}

/// `(code, line)` of every `# <- CODE [CODE...]` marker in a file.
fn markers(path: &Path) -> Vec<(String, u64)> {
    let text = std::fs::read_to_string(path).expect("read");
    text.lines()
        .enumerate()
        .filter_map(|(i, l)| l.split_once("# <- ").map(|(_, codes)| (codes, i as u64 + 1)))
        .flat_map(|(codes, line)| codes.split_whitespace().map(move |c| (c.to_string(), line)))
        .collect()
}

#[test]
fn every_rule_reports_its_code_file_and_line() {
    let dir = data("bad");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir).expect("dir").map(|e| e.expect("entry").path()).collect();
    files.sort();
    let mut covered = std::collections::BTreeSet::new();
    for file in files {
        let expected = markers(&file);
        let (code, findings) = analyze_json(std::slice::from_ref(&file));
        let got: Vec<(String, u64)> = findings
            .iter()
            .map(|f| (f["code"].as_str().unwrap_or_default().to_string(), f["line"].as_u64().unwrap_or(0)))
            .collect();
        for f in &findings {
            assert!(
                f["file"]
                    .as_str()
                    .unwrap_or_default()
                    .ends_with(file.file_name().and_then(|n| n.to_str()).unwrap_or("?")),
                "{f}"
            );
            assert!(f["column"].as_u64().unwrap_or(0) >= 1, "{f}");
            assert!(!f["message"].as_str().unwrap_or_default().is_empty());
        }
        let mut want = expected.clone();
        want.sort();
        let mut have = got.clone();
        have.sort();
        assert_eq!(have, want, "findings of {}: {findings:#?}", file.display());
        let has_error = findings.iter().any(|f| f["severity"] == "Error");
        assert_eq!(code, if has_error { 1 } else { 0 }, "exit code for {}", file.display());
        covered.extend(expected.into_iter().map(|(c, _)| c));
    }
    let all = [
        "TRL0001", "TRL0002", "TRL0003", "TRL0004", "TRL0005", "TRL0006", "TRL0101", "TRL0102", "TRL0103", "TRL0104",
        "TRL0105", "TRL0106", "TRL0107", "TRL0108", "TRL0109", "TRL0110", "TRL0111", "TRL0112", "TRL0113", "TRL0114",
        "TRL0115", "TRL0116", "TRL0117", "TRL0118", "TRL0119", "TRL0120", "TRL0121", "TRL0122", "TRL0123", "TRL0201",
        "TRL0124", "TRL0125", "TRL0126", "TRL0202", "TRL0203", "TRL0204", "TRL0205", "TRL0301", "TRL0302", "TRL0401",
        "TRL0402", "TRL0403", "TRL0404", "TRL0405", "TRL0406", "TRL0008", "TRL0009", "TRL0127", "TRL0206", "TRL0501",
        "TRL0502", "TRL0503", "TRL0504", "TRL0128",
    ];
    for c in all {
        assert!(covered.contains(c), "no failing example for {c}");
    }
}

#[test]
fn a_valid_mesh_has_no_findings_and_exits_zero() {
    let (code, findings) = analyze_json(&[data("good")]);
    assert_eq!(code, 0);
    assert!(findings.is_empty(), "{findings:#?}");
    let out = Command::new(support::trellis_bin()).arg("analyze").arg(data("good")).output().expect("run");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("No validation issues found"), "{text}");
}

#[test]
fn human_output_names_file_line_column_resource_and_field() {
    let out = Command::new(support::trellis_bin()).arg("analyze").arg(data("bad/routes.yaml")).output().expect("run");
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| l.contains("TRL0105")).unwrap_or_else(|| panic!("{text}"));
    assert!(line.starts_with("Error [TRL0105 (IST0101)] "), "names the istioctl code too: {line}");
    assert!(
        line.contains("routes.yaml:44:9 VirtualService default/reviews (spec.http[3].route[0].destination.host)"),
        "{line}"
    );
    assert!(line.contains("\"ratings\""), "{line}");
    assert!(text.lines().last().unwrap_or_default().contains("5 errors, 2 warnings"), "{text}");
}

#[test]
fn istio_tutorial_manifests_are_read_unchanged() {
    // Manifests as Istio tutorials write them (v1alpha3 Gateway bound to a VirtualService with
    // several match blocks, v1beta1 canary split): they parse without schema findings and the
    // only findings are the hosts nothing defines.
    let dir = support::ConfigDir::new();
    let file = dir.write(
        "league.yaml",
        "apiVersion: networking.istio.io/v1alpha3\nkind: Gateway\nmetadata:\n  name: league-gateway\nspec:\n  selector:\n    istio: ingressgateway\n  servers:\n  - port:\n      number: 80\n      name: http\n      protocol: HTTP\n    hosts:\n    - \"*\"\n---\napiVersion: networking.istio.io/v1alpha3\nkind: VirtualService\nmetadata:\n  name: league\nspec:\n  hosts:\n  - \"*\"\n  gateways:\n  - league-gateway\n  http:\n  - match:\n    - uri:\n        exact: /\n    - uri:\n        prefix: \"/players/\"\n    route:\n    - destination:\n        host: frontend\n        port:\n          number: 80\n",
    );
    let (code, findings) = analyze_json(&[dir.path().to_path_buf()]);
    assert_eq!(code, 1);
    assert_eq!(findings.len(), 1, "{findings:#?}");
    assert_eq!(findings[0]["code"], "TRL0105");
    let text = std::fs::read_to_string(&file).expect("read");
    let line = text.lines().position(|l| l.trim() == "host: frontend").expect("host line") as u64 + 1;
    assert_eq!(findings[0]["line"], line);
    assert!(findings[0]["message"].as_str().unwrap_or_default().contains("\"frontend\""));
}

#[test]
fn deployments_are_workloads_so_subsets_they_select_are_not_reported() {
    // Bookinfo's shape: Deployments (not Workloads or WorkloadEntries) carry the version labels
    // that DestinationRule subsets select; ServiceAccounts and Namespaces load without warnings.
    let dir = support::ConfigDir::new();
    let mut yaml = String::from(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: default, labels: {istio-injection: enabled}}\n---\napiVersion: v1\nkind: ServiceAccount\nmetadata: {name: bookinfo-reviews}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: reviews, labels: {app: reviews}}\nspec:\n  ports: [{port: 9080, name: http}]\n  selector: {app: reviews}\n",
    );
    for v in ["v1", "v2", "v3"] {
        yaml.push_str(&format!(
            "---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: reviews-{v}, labels: {{app: reviews, version: {v}}}}}\nspec:\n  replicas: 1\n  selector: {{matchLabels: {{app: reviews, version: {v}}}}}\n  template:\n    metadata: {{labels: {{app: reviews, version: {v}}}}}\n    spec:\n      serviceAccountName: bookinfo-reviews\n      containers:\n      - name: reviews\n        image: docker.io/istio/examples-bookinfo-reviews-{v}:1.20.3\n        imagePullPolicy: IfNotPresent\n        env: [{{name: LOG_DIR, value: /tmp/logs}}]\n        ports: [{{containerPort: 9080}}]\n        volumeMounts: [{{name: tmp, mountPath: /tmp}}]\n        securityContext: {{runAsUser: 1000}}\n      volumes: [{{name: tmp, emptyDir: {{}}}}]\n"
        ));
    }
    yaml.push_str("---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: reviews}\nspec:\n  host: reviews\n  subsets:\n  - {name: v1, labels: {version: v1}}\n  - {name: v2, labels: {version: v2}}\n  - {name: v3, labels: {version: v3}}\n  - name: v4\n    labels: {version: v4}\n");
    let file = dir.write("bookinfo.yaml", &yaml);
    let (code, findings) = analyze_json(&[dir.path().to_path_buf()]);
    assert_eq!(code, 0, "{findings:#?}");
    assert_eq!(findings.len(), 1, "only the subset no Deployment selects: {findings:#?}");
    assert_eq!(findings[0]["code"], "TRL0109");
    let text = std::fs::read_to_string(&file).expect("read");
    let line = text.lines().position(|l| l.trim() == "- name: v4").expect("v4 line") as u64 + 1;
    assert_eq!(findings[0]["line"], line + 1, "the finding points at the subset's labels");

    // A mesh HTTPRoute (GAMMA) to those versions analyzes clean too.
    dir.write(
        "route.yaml",
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: reviews}\nspec:\n  parentRefs: [{kind: Service, group: \"\", name: reviews}]\n  rules:\n  - backendRefs: [{name: reviews, port: 9080}]\n",
    );
    let (code, findings) = analyze_json(&[dir.path().to_path_buf()]);
    assert_eq!((code, findings.len()), (0, 1), "{findings:#?}");
}

#[test]
fn istio_parity_counterparts_are_clean_and_thresholds_work_as_istioctl() {
    // The clean counterparts of bad/istio-*.yaml: only the note that TLS origination is not
    // enforced yet (an Info).
    let (code, findings) = analyze_json(&[data("good/istio")]);
    let codes: Vec<&str> = findings.iter().filter_map(|f| f["code"].as_str()).collect();
    assert!(!codes.is_empty() && codes.iter().all(|c| *c == "TRL0005"), "{findings:#?}");
    assert_eq!(code, 0, "exit 1 on errors only, by default");
    let run = |args: &[&str], path: PathBuf| {
        let out = Command::new(support::trellis_bin()).arg("analyze").args(args).arg(path).output().expect("run");
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let (code, _) = run(&["--failure-threshold", "Info"], data("good/istio"));
    assert_eq!(code, Some(1), "--failure-threshold Info fails on an Info");
    let (code, text) = run(&["--output-threshold", "Warning"], data("good/istio"));
    assert_eq!(code, Some(0));
    assert!(!text.contains("TRL0005"), "--output-threshold Warning hides Infos: {text}");
    // Warnings only (no error): exit 0 unless the threshold says Warning.
    let (code, text) = run(&["--output-threshold", "warning"], data("bad/istio-services.yaml"));
    assert_eq!(code, Some(1), "this file has errors");
    assert!(text.contains("Warning [TRL0116 (IST0134)]") && !text.contains("TRL0121"), "{text}");
    let dir = tempfile::tempdir().expect("dir");
    let warning_only = dir.path().join("dr.yaml");
    std::fs::write(
        &warning_only,
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: d}\nspec: {host: nowhere}\n",
    )
    .expect("write");
    let (default_code, text) = run(&[], warning_only.clone());
    assert!(text.contains("TRL0118 (IST0174)"), "{text}");
    let (code, _) = run(&["--failure-threshold", "Warning"], warning_only);
    assert_eq!((default_code, code), (Some(0), Some(1)), "a warning fails only when the threshold says so");
}
