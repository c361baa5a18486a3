//! Certificates for development and tests (rcgen): a cluster CA, node certificates, admin and
//! subsystem client certificates, and the on-disk layout `kerwen dev` and `kerwen certs issue`
//! share. Production clusters bring their own PEM files (cert-manager, a PKI); the node only
//! reads them (see `tls`).
//!
//! A certificate's identity is one URI SAN (`kerwen:INSTANCE/CLASS/MEMBER/SUBSYSTEM`,
//! `kerwen-admin:NAME` or `kerwen-node:ID`, see `kerwen_broker::access`). Issuing validates
//! it strictly, so no certificate issued here carries an identity the node would refuse.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use kerwen_broker::access::Principal;
use kerwen_broker::ids::SubsystemId;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// File names inside a PKI directory.
pub const CA_CERT: &str = "ca.pem";
pub const CA_KEY: &str = "ca.key";
/// Subdirectory of client certificates issued by `kerwen certs issue`.
pub const CLIENTS_DIR: &str = "clients";

/// Validity of certificates issued without an explicit one.
pub const DEFAULT_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);

/// A certificate and its private key, PEM encoded.
#[derive(Debug, Clone)]
pub struct PemPair {
    pub cert: String,
    pub key: String,
}

impl PemPair {
    /// Writes `stem.pem` and `stem.key` (the key readable by the owner only).
    pub fn write(&self, dir: &Path, stem: &str) -> anyhow::Result<(PathBuf, PathBuf)> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let cert = dir.join(format!("{stem}.pem"));
        let key = dir.join(format!("{stem}.key"));
        write_file(&cert, self.cert.as_bytes(), 0o644)?;
        write_file(&key, self.key.as_bytes(), 0o600)?;
        Ok((cert, key))
    }
}

/// Writes a file atomically (temp file + rename), so a node watching it never reads half.
pub fn write_file(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp~");
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)
            .with_context(|| format!("writing {}", tmp.display()))?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}

/// What a leaf certificate says. [`CertificateAuthority::issue`] validates the identity;
/// this is the raw form, for tests that need certificates the node must refuse.
#[derive(Debug, Clone)]
pub struct LeafSpec {
    /// URI SANs, verbatim.
    pub uris: Vec<String>,
    /// DNS names and IP addresses the certificate is valid for as a server.
    pub hosts: Vec<String>,
    pub not_before: time::OffsetDateTime,
    pub not_after: time::OffsetDateTime,
    pub common_name: String,
}

impl LeafSpec {
    /// A certificate valid from now for `validity`.
    pub fn new(common_name: impl Into<String>, validity: Duration) -> Self {
        let now = time::OffsetDateTime::now_utc();
        // A little back-dating absorbs clock skew between the issuer and the nodes.
        Self {
            uris: Vec::new(),
            hosts: Vec::new(),
            not_before: now - time::Duration::minutes(5),
            not_after: now + validity,
            common_name: common_name.into(),
        }
    }
}

/// A CA that can issue certificates.
pub struct CertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    key_pem: String,
}

impl CertificateAuthority {
    /// A new self-signed CA named `name`, valid for ten years.
    pub fn generate(name: &str) -> anyhow::Result<Self> {
        let key = KeyPair::generate().context("generating the CA key")?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(5);
        params.not_after = now + time::Duration::days(3650);
        let cert = params.self_signed(&key).context("self-signing the CA")?;
        let key_pem = key.serialize_pem();
        Ok(Self { cert_pem: cert.pem(), key_pem, issuer: Issuer::new(params, key) })
    }

    /// Loads `ca.pem` and `ca.key` from `dir`.
    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        let cert_path = dir.join(CA_CERT);
        let key_path = dir.join(CA_KEY);
        let cert_pem = std::fs::read_to_string(&cert_path).with_context(|| format!("reading {}", cert_path.display()))?;
        let key_pem = std::fs::read_to_string(&key_path).with_context(|| format!("reading {}", key_path.display()))?;
        let key = KeyPair::from_pem(&key_pem).with_context(|| format!("parsing {}", key_path.display()))?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key).with_context(|| format!("parsing {}", cert_path.display()))?;
        Ok(Self { issuer, cert_pem, key_pem })
    }

    /// Writes `ca.pem` and `ca.key` into `dir`.
    pub fn save(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        write_file(&dir.join(CA_CERT), self.cert_pem.as_bytes(), 0o644)?;
        write_file(&dir.join(CA_KEY), self.key_pem.as_bytes(), 0o600)
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Issues a certificate for `who`, also valid as a server for `hosts` (nodes).
    pub fn issue_for(&self, who: &Principal, hosts: &[String], validity: Duration) -> anyhow::Result<PemPair> {
        // The round trip is the validation: only what the node will accept is issued.
        let uri = who.uri();
        match Principal::from_uri(&uri) {
            Ok(Some(p)) if p == *who => {}
            Ok(_) => bail!("{who} does not round-trip through its URI {uri:?}"),
            Err(e) => bail!("refusing to issue a certificate for {uri:?}: {e}"),
        }
        let mut spec = LeafSpec::new(who.to_string(), validity);
        spec.uris = vec![uri];
        spec.hosts = hosts.to_vec();
        self.issue(&spec)
    }

    /// Issues exactly what `spec` says, unvalidated.
    pub fn issue(&self, spec: &LeafSpec) -> anyhow::Result<PemPair> {
        let key = KeyPair::generate().context("generating a key")?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, spec.common_name.as_str());
        params.distinguished_name = dn;
        params.not_before = spec.not_before;
        params.not_after = spec.not_after;
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth, ExtendedKeyUsagePurpose::ServerAuth];
        for uri in &spec.uris {
            params.subject_alt_names.push(SanType::URI(uri.as_str().try_into().with_context(|| format!("URI SAN {uri:?}"))?));
        }
        for host in &spec.hosts {
            params.subject_alt_names.push(match host.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(host.as_str().try_into().with_context(|| format!("DNS name {host:?}"))?),
            });
        }
        let cert = params.signed_by(&key, &self.issuer).context("signing the certificate")?;
        Ok(PemPair { cert: cert.pem(), key: key.serialize_pem() })
    }
}

/// The file stem of a subsystem's client certificate: `/` becomes `_`, which no identifier
/// part may contain, so the mapping is one-to-one.
pub fn subsystem_file_stem(subsystem: &SubsystemId) -> String {
    subsystem.to_string().replace('/', "_")
}

/// The file stem of a node's certificate.
pub fn node_file_stem(node: u64) -> String {
    format!("node-{node}")
}

/// Hosts a dev or test node certificate is valid for.
pub fn loopback_hosts() -> Vec<String> {
    vec!["127.0.0.1".into(), "localhost".into()]
}

/// Paths of one identity's certificate and key inside a PKI directory.
#[derive(Debug, Clone)]
pub struct IdentityFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A subsystem's client certificate in `pki_dir/clients`, issued from the CA in `pki_dir`
/// when it is not there yet (dev clusters, tests, the load generator).
pub fn subsystem_identity(pki_dir: &Path, subsystem: &SubsystemId) -> anyhow::Result<IdentityFiles> {
    let dir = pki_dir.join(CLIENTS_DIR);
    let stem = subsystem_file_stem(subsystem);
    let files = IdentityFiles { cert: dir.join(format!("{stem}.pem")), key: dir.join(format!("{stem}.key")) };
    if !files.cert.exists() || !files.key.exists() {
        let ca = CertificateAuthority::load(pki_dir)?;
        ca.issue_for(&Principal::Subsystem(subsystem.clone()), &[], DEFAULT_VALIDITY)?.write(&dir, &stem)?;
    }
    Ok(files)
}

/// A complete development PKI in `dir`: the CA, one certificate per node (valid for
/// `hosts`) and an admin certificate. Returns the admin's files.
pub fn create_dev_pki(dir: &Path, nodes: &[u64], hosts: &[String]) -> anyhow::Result<IdentityFiles> {
    let ca = CertificateAuthority::generate("Kerwen development CA")?;
    ca.save(dir)?;
    for node in nodes {
        ca.issue_for(&Principal::Node(*node), hosts, DEFAULT_VALIDITY)?.write(dir, &node_file_stem(*node))?;
    }
    let (cert, key) = ca.issue_for(&Principal::Admin("admin".into()), &[], DEFAULT_VALIDITY)?.write(dir, "admin")?;
    Ok(IdentityFiles { cert, key })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issues_only_valid_identities() {
        let ca = CertificateAuthority::generate("test CA").unwrap();
        let ok = Principal::Subsystem("TM/GOV/MINCOM/registry".parse().unwrap());
        assert!(ca.issue_for(&ok, &[], DEFAULT_VALIDITY).is_ok());
        for bad in [Principal::Admin("a/b".into()), Principal::Admin("\u{0430}dmin".into()), Principal::Node(0)] {
            assert!(ca.issue_for(&bad, &[], DEFAULT_VALIDITY).is_err(), "{bad:?} must be refused");
        }
        let dir = tempfile::tempdir().unwrap();
        ca.save(dir.path()).unwrap();
        let again = CertificateAuthority::load(dir.path()).unwrap();
        let files = subsystem_identity(dir.path(), &"TM/GOV/MINFIN/tax".parse().unwrap()).unwrap();
        assert!(files.cert.ends_with("clients/TM_GOV_MINFIN_tax.pem"), "{}", files.cert.display());
        assert!(again.issue_for(&ok, &loopback_hosts(), DEFAULT_VALIDITY).is_ok());
    }
}
