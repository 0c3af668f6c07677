//! TLS for the NATS listeners that are neither loopback nor the overlay
//! (`ployzd run --nats-listen`): one CA per network (ECDSA P-256, made by
//! rcgen once, stored in the hidden `pki` bucket) and a server certificate
//! per machine, signed by it at start with the machine's addresses as SANs.
//! Pure apart from key generation.

use ployz_api::NatsCaRecord;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use std::net::IpAddr;
use std::sync::Arc;

fn ca_params(network_id: &str) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "ployz");
    dn.push(
        DnType::CommonName,
        format!("ployz network {network_id} NATS CA"),
    );
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p
}

/// A new CA for network `network_id`.
pub fn new_ca(network_id: &str) -> Result<NatsCaRecord, String> {
    let key = KeyPair::generate().map_err(|e| format!("cannot make the CA key: {e}"))?;
    let cert = ca_params(network_id)
        .self_signed(&key)
        .map_err(|e| format!("cannot sign the CA certificate: {e}"))?;
    Ok(NatsCaRecord {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// A server certificate for `ips` signed by `ca`, as a rustls server
/// configuration (TLS 1.2 and 1.3, ring).
pub fn server_config(
    ca: &NatsCaRecord,
    network_id: &str,
    machine: &str,
    ips: &[IpAddr],
) -> Result<Arc<rustls::ServerConfig>, String> {
    let ca_key =
        KeyPair::from_pem(&ca.key_pem).map_err(|e| format!("the stored CA key is broken: {e}"))?;
    let issuer = Issuer::new(ca_params(network_id), ca_key);
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "ployz");
    dn.push(DnType::CommonName, format!("ployz machine {machine} NATS"));
    p.distinguished_name = dn;
    p.subject_alt_names = ips.iter().map(|ip| SanType::IpAddress(*ip)).collect();
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate().map_err(|e| format!("cannot make the server key: {e}"))?;
    let cert = p
        .signed_by(&key, &issuer)
        .map_err(|e| format!("cannot sign the server certificate: {e}"))?;
    let ca_der = pem_der(&ca.cert_pem)?;
    let chain = vec![cert.der().clone(), ca_der];
    let key_der = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)
        .map(Arc::new)
        .map_err(|e| format!("TLS setup: {e}"))
}

/// The DER inside one PEM certificate block.
fn pem_der(pem: &str) -> Result<rustls::pki_types::CertificateDer<'static>, String> {
    use base64::Engine as _;
    let body: String = pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .map(str::trim)
        .collect();
    base64::engine::general_purpose::STANDARD
        .decode(body)
        .map(Into::into)
        .map_err(|e| format!("the stored CA certificate is broken: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::client::danger::ServerCertVerifier;

    #[test]
    fn a_server_certificate_chains_to_the_network_ca() {
        let ca = new_ca("net1").unwrap();
        assert!(ca.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(!format!("{ca:?}").contains(&ca.key_pem));
        let ips: Vec<IpAddr> = vec!["10.0.0.5".parse().unwrap(), "127.0.0.1".parse().unwrap()];
        let cfg = server_config(&ca, "net1", "m1", &ips).unwrap();
        assert!(cfg.alpn_protocols.is_empty());
        // The chain's issuer verifies with webpki against the CA as root.
        let mut roots = rustls::RootCertStore::empty();
        roots.add(pem_der(&ca.cert_pem).unwrap()).unwrap();
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap();
        let key = KeyPair::from_pem(&ca.key_pem).unwrap();
        let issuer = Issuer::new(ca_params("net1"), key);
        let mut p = CertificateParams::default();
        p.subject_alt_names = vec![SanType::IpAddress(ips[0])];
        let leaf_key = KeyPair::generate().unwrap();
        let leaf = p.signed_by(&leaf_key, &issuer).unwrap();
        let name = rustls::pki_types::ServerName::IpAddress(ips[0].into());
        verifier
            .verify_server_cert(
                leaf.der(),
                &[],
                &name,
                &[],
                rustls::pki_types::UnixTime::now(),
            )
            .expect("a leaf signed by the stored CA verifies");
        let other =
            rustls::pki_types::ServerName::IpAddress("10.9.9.9".parse::<IpAddr>().unwrap().into());
        assert!(verifier
            .verify_server_cert(
                leaf.der(),
                &[],
                &other,
                &[],
                rustls::pki_types::UnixTime::now()
            )
            .is_err());
    }
}
