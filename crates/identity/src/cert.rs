//! A workload's certificate material: its key pair (generated where it is used), the CSR it
//! sends, the chain it gets back, and the trust bundle (one or more roots, so a root can be
//! rotated by publishing the new one next to the old before switching).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use x509_parser::prelude::*;

use crate::{Error, SpiffeId};

/// A key pair and a CSR for `id` (the private key stays with the caller).
pub struct KeyAndCsr {
    pub key: PrivateKeyDer<'static>,
    pub csr_pem: String,
}

/// Generates an ECDSA P-256 key pair and a CSR whose only SAN is the SPIFFE URI.
pub fn generate_csr(id: &SpiffeId) -> Result<KeyAndCsr, Error> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![rcgen::SanType::URI(id.to_string().try_into()?)];
    params.distinguished_name = rcgen::DistinguishedName::new();
    let csr = params.serialize_request(&key)?;
    Ok(KeyAndCsr { key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())), csr_pem: csr.pem()? })
}

/// Parses every certificate of a PEM bundle.
pub fn parse_pem_certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(pem.as_bytes()).collect();
    let certs = certs.map_err(|e| Error::Invalid(format!("bad PEM certificate: {e:?}")))?;
    if certs.is_empty() {
        return Err(Error::Invalid("no certificate in PEM".into()));
    }
    Ok(certs)
}

/// Parses a PEM private key (PKCS#8, PKCS#1 or SEC1).
pub fn parse_pem_key(pem: &str) -> Result<PrivateKeyDer<'static>, Error> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| Error::Invalid(format!("bad PEM private key: {e:?}")))
}

/// The SPIFFE URI SANs of a certificate.
pub fn spiffe_ids(cert: &CertificateDer<'_>) -> Result<Vec<SpiffeId>, Error> {
    let (_, x509) = X509Certificate::from_der(cert).map_err(|e| Error::Invalid(format!("bad certificate: {e}")))?;
    let mut out = Vec::new();
    if let Ok(Some(san)) = x509.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::URI(uri) = name {
                if let Ok(id) = SpiffeId::parse(uri) {
                    out.push(id);
                }
            }
        }
    }
    Ok(out)
}

/// Every DNS name, URI and email subject alternative name of a certificate, as text (IP
/// addresses in their usual notation).
pub fn subject_alt_names(cert: &CertificateDer<'_>) -> Result<Vec<String>, Error> {
    let (_, x509) = X509Certificate::from_der(cert).map_err(|e| Error::Invalid(format!("bad certificate: {e}")))?;
    let mut out = Vec::new();
    if let Ok(Some(san)) = x509.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(n) | GeneralName::URI(n) | GeneralName::RFC822Name(n) => out.push(n.to_string()),
                GeneralName::IPAddress(b) => match b.len() {
                    4 => out.push(std::net::Ipv4Addr::new(b[0], b[1], b[2], b[3]).to_string()),
                    16 => {
                        let mut a = [0u8; 16];
                        a.copy_from_slice(b);
                        out.push(std::net::Ipv6Addr::from(a).to_string());
                    }
                    _ => {}
                },
                _ => {}
            }
        }
    }
    Ok(out)
}

/// `(not_before, not_after)` of a certificate.
pub fn validity(cert: &CertificateDer<'_>) -> Result<(SystemTime, SystemTime), Error> {
    let (_, x509) = X509Certificate::from_der(cert).map_err(|e| Error::Invalid(format!("bad certificate: {e}")))?;
    let to_sys = |t: ASN1Time| SystemTime::UNIX_EPOCH + Duration::from_secs(t.timestamp().max(0) as u64);
    Ok((to_sys(x509.validity().not_before), to_sys(x509.validity().not_after)))
}

/// A workload's current certificate: chain (leaf first) and key, with its identity and life.
#[derive(Debug)]
pub struct WorkloadCert {
    pub id: SpiffeId,
    /// The leaf's serial number, hex (`/certs` on the admin port shows it).
    pub serial: String,
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl WorkloadCert {
    pub fn new(key: PrivateKeyDer<'static>, chain: Vec<CertificateDer<'static>>) -> Result<WorkloadCert, Error> {
        let leaf = chain.first().ok_or_else(|| Error::Invalid("empty certificate chain".into()))?;
        let id = spiffe_ids(leaf)?
            .into_iter()
            .next()
            .ok_or_else(|| Error::Invalid("certificate has no SPIFFE id".into()))?;
        let (not_before, not_after) = validity(leaf)?;
        let (_, x509) = X509Certificate::from_der(leaf).map_err(|e| Error::Invalid(format!("bad certificate: {e}")))?;
        let serial = x509.raw_serial_as_string().replace(':', "");
        Ok(WorkloadCert { id, serial, chain, key, not_before, not_after })
    }

    /// When to renew: at `fraction` of the lifetime (Istio renews at ~80%).
    pub fn refresh_at(&self, fraction: f64) -> SystemTime {
        let life = self.not_after.duration_since(self.not_before).unwrap_or_default();
        self.not_before + life.mul_f64(fraction.clamp(0.1, 0.95))
    }
}

/// The roots a proxy trusts.
#[derive(Clone, Debug)]
pub struct TrustBundle {
    pub roots: Vec<CertificateDer<'static>>,
}

impl TrustBundle {
    pub fn from_pem(pem: &str) -> Result<TrustBundle, Error> {
        Ok(TrustBundle { roots: parse_pem_certs(pem)? })
    }

    /// The roots as webpki trust anchors.
    pub fn anchors(&self) -> Vec<rustls::pki_types::TrustAnchor<'static>> {
        self.roots.iter().filter_map(|r| webpki::anchor_from_trusted_cert(r).ok().map(|a| a.to_owned())).collect()
    }
}

/// What a proxy holds: its certificate and the bundle, swapped whole on rotation.
#[derive(Debug)]
pub struct Credentials {
    pub cert: WorkloadCert,
    pub bundle: TrustBundle,
    pub anchors: Vec<rustls::pki_types::TrustAnchor<'static>>,
    /// What TLS presents: the chain and the loaded signing key.
    pub certified: Arc<rustls::sign::CertifiedKey>,
}

impl Credentials {
    pub fn new(cert: WorkloadCert, bundle: TrustBundle) -> Result<Credentials, Error> {
        let signing_key = crate::provider()
            .key_provider
            .load_private_key(cert.key.clone_key())
            .map_err(|e| Error::Invalid(format!("unusable private key: {e}")))?;
        let anchors = bundle.anchors();
        if anchors.is_empty() {
            return Err(Error::Invalid("trust bundle has no usable root".into()));
        }
        let certified = Arc::new(rustls::sign::CertifiedKey::new(cert.chain.clone(), signing_key));
        Ok(Credentials { cert, bundle, anchors, certified })
    }
}
