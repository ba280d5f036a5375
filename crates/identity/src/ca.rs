//! The mesh's certificate authority, run by the control plane.
//!
//! On first start it generates a root (ECDSA P-256, 10 years) and keeps it in its directory
//! as Istio's plug-in CA files: `ca-cert.pem`, `ca-key.pem`, `root-cert.pem` (the trust bundle:
//! one or more roots) and `cert-chain.pem` (intermediates, if any). A user-supplied CA is the
//! same files put there first (an intermediate signed by the user's root: `ca-cert.pem` is the
//! intermediate, `cert-chain.pem` the chain to the root, `root-cert.pem` the root).
//!
//! It signs a CSR only for the identity the caller proved it holds, and only that identity:
//! the CSR must ask for exactly that SPIFFE URI.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{CertificateParams, CertificateSigningRequestParams, IsCa, Issuer, KeyPair, SanType};

use crate::{Error, SpiffeId};

pub struct CertificateAuthority {
    ca_cert_pem: String,
    key: KeyPair,
    chain_pem: String,
    roots_pem: String,
    pub trust_domain: String,
    pub ttl: Duration,
    pub dir: PathBuf,
}

const FILES: [&str; 4] = ["ca-cert.pem", "ca-key.pem", "root-cert.pem", "cert-chain.pem"];

impl CertificateAuthority {
    /// Loads the CA from `dir`, or generates a root there on first start.
    pub fn load_or_generate(dir: &Path, trust_domain: &str, ttl: Duration) -> Result<CertificateAuthority, Error> {
        let [cert_f, key_f, root_f, chain_f] = FILES.map(|f| dir.join(f));
        if !cert_f.exists() || !key_f.exists() {
            std::fs::create_dir_all(dir)?;
            let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
            let mut params = CertificateParams::default();
            params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            params.key_usages = vec![
                rcgen::KeyUsagePurpose::KeyCertSign,
                rcgen::KeyUsagePurpose::CrlSign,
                rcgen::KeyUsagePurpose::DigitalSignature,
            ];
            let mut dn = rcgen::DistinguishedName::new();
            dn.push(rcgen::DnType::OrganizationName, "Trellis");
            dn.push(rcgen::DnType::CommonName, format!("Trellis root CA ({trust_domain})"));
            params.distinguished_name = dn;
            let now = time::OffsetDateTime::now_utc();
            params.not_before = now - time::Duration::minutes(5);
            params.not_after = now + time::Duration::days(3650);
            let cert = params.self_signed(&key)?;
            write_private(&key_f, &key.serialize_pem())?;
            std::fs::write(&cert_f, cert.pem())?;
            std::fs::write(&root_f, cert.pem())?;
            tracing::info!(dir = %dir.display(), "generated a new root CA");
        }
        let ca_cert_pem = std::fs::read_to_string(&cert_f)?;
        let key = KeyPair::from_pem(&std::fs::read_to_string(&key_f)?)?;
        let roots_pem = if root_f.exists() { std::fs::read_to_string(&root_f)? } else { ca_cert_pem.clone() };
        let chain_pem = if chain_f.exists() { std::fs::read_to_string(&chain_f)? } else { String::new() };
        // Fail now, not at the first CSR, if the files do not fit together.
        Issuer::from_ca_cert_pem(&ca_cert_pem, &key)?;
        crate::cert::parse_pem_certs(&roots_pem)?;
        Ok(CertificateAuthority {
            ca_cert_pem,
            key,
            chain_pem,
            roots_pem,
            trust_domain: trust_domain.to_string(),
            ttl,
            dir: dir.to_path_buf(),
        })
    }

    /// The trust bundle (PEM roots).
    pub fn bundle_pem(&self) -> &str {
        &self.roots_pem
    }

    /// Signs `csr_pem` for `id`, the identity the caller proved it holds. Returns the chain
    /// (leaf first, then intermediates) as PEM.
    pub fn sign(&self, csr_pem: &str, id: &SpiffeId) -> Result<Vec<String>, Error> {
        if id.trust_domain != self.trust_domain {
            return Err(Error::Invalid(format!("identity {id} is outside trust domain {}", self.trust_domain)));
        }
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)?;
        let wanted: Vec<String> = csr
            .params
            .subject_alt_names
            .iter()
            .map(|s| match s {
                SanType::URI(u) => u.as_str().to_string(),
                other => format!("{other:?}"),
            })
            .collect();
        if wanted != [id.to_string()] {
            return Err(Error::Invalid(format!("the CSR asks for {wanted:?}, but the caller holds {id}")));
        }
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(id.to_string().try_into()?)];
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature, rcgen::KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages =
            vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth, rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        let mut serial: [u8; 16] = std::array::from_fn(|_| fastrand::u8(..));
        serial[0] &= 0x7f; // positive
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
        let now =
            time::OffsetDateTime::now_utc().replace_nanosecond(0).unwrap_or_else(|_| time::OffsetDateTime::now_utc());
        params.not_before = now;
        params.not_after = now + time::Duration::seconds(self.ttl.as_secs() as i64);
        let issuer = Issuer::from_ca_cert_pem(&self.ca_cert_pem, &self.key)?;
        let leaf = params.signed_by(&csr.public_key, &issuer)?;
        let mut chain = vec![leaf.pem()];
        if !self.chain_pem.trim().is_empty() {
            chain.push(self.chain_pem.clone());
        } else if self.ca_cert_pem != self.roots_pem {
            chain.push(self.ca_cert_pem.clone());
        }
        Ok(chain)
    }
}

impl CertificateAuthority {
    /// A TLS server certificate for the control plane's own HTTPS endpoints (the admission
    /// webhooks the API server calls), for `dns_names` and `ips`: (chain PEM, private key PEM).
    pub fn serving_certificate(
        &self,
        dns_names: &[String],
        ips: &[std::net::IpAddr],
    ) -> Result<(String, String), Error> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::new(dns_names.to_vec())?;
        params.subject_alt_names.extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        let mut dn = rcgen::DistinguishedName::new();
        dn.push(rcgen::DnType::CommonName, dns_names.first().cloned().unwrap_or_else(|| "trellis-control".into()));
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature, rcgen::KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(5);
        params.not_after = now + time::Duration::days(365);
        let issuer = Issuer::from_ca_cert_pem(&self.ca_cert_pem, &self.key)?;
        let leaf = params.signed_by(&key, &issuer)?;
        let mut chain = leaf.pem();
        if !self.chain_pem.trim().is_empty() {
            chain.push_str(&self.chain_pem);
        } else if self.ca_cert_pem != self.roots_pem {
            chain.push_str(&self.ca_cert_pem);
        }
        Ok((chain, key.serialize_pem()))
    }
}

fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
    f.write_all(text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cert::{generate_csr, parse_pem_certs, validity, WorkloadCert};

    #[test]
    fn signs_only_the_identity_the_caller_holds() {
        let dir = std::env::temp_dir().join(format!("trellis-ca-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let ca = CertificateAuthority::load_or_generate(&dir, "cluster.local", Duration::from_secs(3600)).expect("ca");
        let me = SpiffeId::new("cluster.local", "default", "reviews");
        let other = SpiffeId::new("cluster.local", "default", "admin");
        let kc = generate_csr(&me).expect("csr");
        let chain = ca.sign(&kc.csr_pem, &me).expect("signed");
        let certs = parse_pem_certs(&chain.join("")).expect("pem");
        let wc = WorkloadCert::new(kc.key, certs.clone()).expect("cert");
        assert_eq!(wc.id, me);
        let (nb, na) = validity(&certs[0]).expect("validity");
        assert_eq!(na.duration_since(nb).expect("order"), Duration::from_secs(3600), "lifetime is the configured TTL");
        // A CSR for another identity is refused.
        let forged = generate_csr(&other).expect("csr");
        assert!(ca.sign(&forged.csr_pem, &me).is_err());
        // The CA survives a restart from its files.
        let again =
            CertificateAuthority::load_or_generate(&dir, "cluster.local", Duration::from_secs(60)).expect("reload");
        assert_eq!(again.bundle_pem(), ca.bundle_pem());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
