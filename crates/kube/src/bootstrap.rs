//! What the control plane sets up in its cluster at start: its CA kept in a Secret (so a restart
//! keeps the root every workload certificate chains to, as Istio's `istio-ca-secret`), and the
//! admission webhooks' `caBundle` set to that root (as istiod patches its webhooks).

use std::path::Path;

use k8s_openapi::api::admissionregistration::v1::{MutatingWebhookConfiguration, ValidatingWebhookConfiguration};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::ByteString;
use kube::api::{Api, PostParams};

/// The files of a CA directory kept in the Secret (Istio's plug-in CA names).
const CA_FILES: [&str; 4] = ["ca-cert.pem", "ca-key.pem", "root-cert.pem", "cert-chain.pem"];

/// Writes the CA kept in Secret `namespace/name` into `dir`. `Ok(false)`: there is none yet.
pub async fn restore_ca(client: &kube::Client, namespace: &str, name: &str, dir: &Path) -> Result<bool, String> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let Some(secret) = api.get_opt(name).await.map_err(|e| format!("cannot read Secret {namespace}/{name}: {e}"))?
    else {
        return Ok(false);
    };
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let data = secret.data.unwrap_or_default();
    for f in CA_FILES {
        if let Some(v) = data.get(f) {
            write_private(&dir.join(f), &v.0).map_err(|e| format!("cannot write {}: {e}", dir.join(f).display()))?;
        }
    }
    tracing::info!(secret = %format!("{namespace}/{name}"), "CA restored from its Secret");
    Ok(true)
}

/// Keeps the CA files of `dir` in Secret `namespace/name` (created once).
pub async fn save_ca(client: &kube::Client, namespace: &str, name: &str, dir: &Path) -> Result<(), String> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let mut data = std::collections::BTreeMap::new();
    for f in CA_FILES {
        if let Ok(bytes) = std::fs::read(dir.join(f)) {
            data.insert(f.to_string(), ByteString(bytes));
        }
    }
    let secret = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(namespace.to_string()),
            labels: Some([("app.kubernetes.io/part-of".to_string(), "trellis".to_string())].into()),
            ..Default::default()
        },
        data: Some(data),
        type_: Some("Opaque".into()),
        ..Default::default()
    };
    api.create(&PostParams::default(), &secret)
        .await
        .map_err(|e| format!("cannot create Secret {namespace}/{name}: {e}"))?;
    tracing::info!(secret = %format!("{namespace}/{name}"), "CA saved in a Secret");
    Ok(())
}

/// Sets `caBundle` of every webhook of the named configurations (mutating or validating) to
/// `bundle_pem` (read, changed, replaced: a concurrent change makes the replace fail, not lose it).
/// A name that exists as neither is reported.
pub async fn patch_ca_bundles(client: &kube::Client, names: &[String], bundle_pem: &str) -> Result<(), String> {
    let bundle = ByteString(bundle_pem.as_bytes().to_vec());
    for name in names {
        let mutating: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
        let validating: Api<ValidatingWebhookConfiguration> = Api::all(client.clone());
        let err = |e: kube::Error| format!("cannot set the caBundle of {name}: {e}");
        let n = if let Some(mut m) = mutating.get_opt(name).await.map_err(err)? {
            let hooks = m.webhooks.get_or_insert_with(Vec::new);
            hooks.iter_mut().for_each(|w| w.client_config.ca_bundle = Some(bundle.clone()));
            let n = hooks.len();
            mutating.replace(name, &PostParams::default(), &m).await.map_err(err)?;
            n
        } else if let Some(mut v) = validating.get_opt(name).await.map_err(err)? {
            let hooks = v.webhooks.get_or_insert_with(Vec::new);
            hooks.iter_mut().for_each(|w| w.client_config.ca_bundle = Some(bundle.clone()));
            let n = hooks.len();
            validating.replace(name, &PostParams::default(), &v).await.map_err(err)?;
            n
        } else {
            return Err(format!("no webhook configuration named {name}"));
        };
        tracing::info!(webhook_configuration = %name, webhooks = n, "caBundle set to the mesh CA's root");
    }
    Ok(())
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
    f.write_all(bytes)
}
