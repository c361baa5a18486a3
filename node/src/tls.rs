//! TLS 1.3 everywhere (rustls with the ring provider), mutual on both ports.
//!
//! - The **client port** accepts only certificates of admins and subsystems; the **peer port**
//!   only node certificates. The check runs inside the handshake ([`IdentityVerifier`]), so a
//!   certificate of the wrong kind, from another CA, expired, or with a malformed identity
//!   never gets a connection.
//! - [`NodeTls`] holds the node's current configuration and reloads it when the PEM files
//!   change on disk (cert-manager rotation): new handshakes use the new certificate,
//!   established connections keep theirs until they close.
//! - [`tls_incoming`] accepts TCP connections and runs each handshake in its own task with a
//!   deadline, so a client that stalls mid-handshake or sends garbage holds up no one else.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{bail, Context};
use kerwen_broker::access::Principal;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use sha2::{Digest, Sha256};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_rustls::rustls::client::danger::HandshakeSignatureValid;
use tokio_rustls::rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{self, CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig, SignatureScheme};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

/// How long a TLS handshake may take before the connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once per port; connections beyond are closed at once.
const MAX_PENDING_HANDSHAKES: usize = 1024;
/// How often the node looks at its PEM files for a rotation.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(2);

/// Which listener a connection arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Port {
    /// Exchange and Admin: admins and subsystems.
    Client,
    /// Raft and Peer: nodes only.
    Peer,
}

impl Port {
    fn admits(self, who: &Principal) -> bool {
        match self {
            Port::Client => matches!(who, Principal::Admin(_) | Principal::Subsystem(_)),
            Port::Peer => matches!(who, Principal::Node(_)),
        }
    }
}

impl std::fmt::Display for Port {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Port::Client => "client",
            Port::Peer => "peer",
        })
    }
}

/// The PEM files of a node or client: the CA bundle it trusts, its certificate chain and key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsFiles {
    fn read(&self) -> anyhow::Result<PemBundle> {
        let read = |p: &Path| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
        Ok(PemBundle { ca: read(&self.ca)?, cert: read(&self.cert)?, key: read(&self.key)? })
    }
}

/// The bytes of a [`TlsFiles`] set.
#[derive(Clone)]
pub struct PemBundle {
    pub ca: Vec<u8>,
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
}

impl PemBundle {
    fn fingerprint(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        for part in [&self.ca, &self.cert, &self.key] {
            h.update((part.len() as u64).to_be_bytes());
            h.update(part);
        }
        h.finalize().into()
    }
}

/// A client's TLS settings: the CA to trust and the certificate to present.
#[derive(Clone)]
pub struct ClientTls(PemBundle);

impl ClientTls {
    pub fn from_files(files: &TlsFiles) -> anyhow::Result<Self> {
        Ok(Self(files.read()?))
    }

    pub fn from_pem(ca: impl Into<Vec<u8>>, cert: impl Into<Vec<u8>>, key: impl Into<Vec<u8>>) -> Self {
        Self(PemBundle { ca: ca.into(), cert: cert.into(), key: key.into() })
    }

    /// tonic's settings: the server is verified against the CA and its name (the endpoint's
    /// host), and we present our certificate.
    pub fn tonic_config(&self) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.0.ca))
            .identity(Identity::from_pem(&self.0.cert, &self.0.key))
    }
}

/// The expiry (Unix seconds) of the first certificate of a PEM chain.
fn certificate_not_after(chain_pem: &[u8]) -> Option<i64> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(chain_pem).ok()?;
    let cert = pem.parse_x509().ok()?;
    Some(cert.validity().not_after.timestamp())
}

/// The identity a certificate carries (its one kerwen URI SAN).
pub fn identity_of(cert: &CertificateDer<'_>) -> anyhow::Result<Principal> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).context("unparseable certificate")?;
    let san = parsed.subject_alternative_name().context("malformed subject alternative names")?;
    let uris = san.iter().flat_map(|ext| ext.value.general_names.iter()).filter_map(|name| match name {
        x509_parser::extensions::GeneralName::URI(uri) => Some(*uri),
        _ => None,
    });
    Ok(Principal::from_uris(uris)?)
}

/// Chain verification by webpki, then the identity check of the port.
#[derive(Debug)]
struct IdentityVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    port: Port,
}

impl ClientCertVerifier for IdentityVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner.verify_client_cert(end_entity, intermediates, now)?;
        match identity_of(end_entity) {
            Ok(who) if self.port.admits(&who) => Ok(ClientCertVerified::assertion()),
            Ok(who) => {
                tracing::warn!(target: "kerwen::audit", port = %self.port, caller = %who, "TLS handshake refused: wrong kind of certificate for this port");
                Err(rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure))
            }
            Err(e) => {
                tracing::warn!(target: "kerwen::audit", port = %self.port, "TLS handshake refused: {e:#}");
                Err(rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure))
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The server configurations of both ports, from one parse of the files.
fn server_configs(pem: &PemBundle) -> anyhow::Result<(Arc<ServerConfig>, Arc<ServerConfig>)> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(&pem.ca) {
        roots.add(ca.context("parsing the CA bundle")?).context("adding a CA certificate")?;
    }
    if roots.is_empty() {
        bail!("the CA bundle holds no certificate");
    }
    let roots = Arc::new(roots);
    let chain = CertificateDer::pem_slice_iter(&pem.cert).collect::<Result<Vec<_>, _>>().context("parsing the certificate")?;
    if chain.is_empty() {
        bail!("the certificate file holds no certificate");
    }
    match identity_of(&chain[0]) {
        Ok(Principal::Node(_)) => {}
        Ok(other) => bail!("the node's certificate carries {other}, not a node identity (kerwen-node:ID)"),
        Err(e) => bail!("the node's certificate: {e:#}"),
    }
    let key = PrivateKeyDer::from_pem_slice(&pem.key).context("parsing the private key")?;
    let config = |port: Port| -> anyhow::Result<Arc<ServerConfig>> {
        let inner = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .context("building the client certificate verifier")?;
        let mut config = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .context("TLS 1.3")?
            .with_client_cert_verifier(Arc::new(IdentityVerifier { inner, port }))
            .with_single_cert(chain.clone(), key.clone_key())
            .context("the certificate does not match the key")?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    };
    Ok((config(Port::Client)?, config(Port::Peer)?))
}

/// One loaded generation of the node's TLS material.
struct Loaded {
    fingerprint: [u8; 32],
    /// When the node's own certificate expires (Unix seconds), for monitoring.
    not_after: Option<i64>,
    client_port: Arc<ServerConfig>,
    peer_port: Arc<ServerConfig>,
    outgoing: ClientTls,
}

impl Loaded {
    fn build(pem: PemBundle, fingerprint: [u8; 32]) -> anyhow::Result<Self> {
        let (client_port, peer_port) = server_configs(&pem)?;
        let not_after = certificate_not_after(&pem.cert);
        Ok(Self { fingerprint, not_after, client_port, peer_port, outgoing: ClientTls(pem) })
    }
}

/// The node's TLS configuration, reloaded from its files when they change.
pub struct NodeTls {
    files: TlsFiles,
    current: RwLock<Arc<Loaded>>,
    /// Bumped on every reload that changed something.
    generation: watch::Sender<u64>,
}

impl NodeTls {
    /// Loads the files; any problem with them is a startup error.
    pub fn load(files: TlsFiles) -> anyhow::Result<Arc<Self>> {
        let pem = files.read()?;
        let fingerprint = pem.fingerprint();
        let loaded = Loaded::build(pem, fingerprint).with_context(|| format!("TLS files {files:?}"))?;
        Ok(Arc::new(Self { files, current: RwLock::new(Arc::new(loaded)), generation: watch::channel(0).0 }))
    }

    fn current(&self) -> Arc<Loaded> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn server_config(&self, port: Port) -> Arc<ServerConfig> {
        let c = self.current();
        match port {
            Port::Client => c.client_port.clone(),
            Port::Peer => c.peer_port.clone(),
        }
    }

    /// When the certificate in use expires (Unix seconds).
    pub fn certificate_not_after(&self) -> Option<i64> {
        self.current().not_after
    }

    /// What this node presents when it connects to its peers.
    pub fn outgoing(&self) -> ClientTls {
        self.current().outgoing.clone()
    }

    /// Changes when a reload took effect.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// Re-reads the files; `Ok(true)` when they changed and the new material is in use. Bad
    /// new material is an error and the old stays in use.
    pub fn reload(&self) -> anyhow::Result<bool> {
        let pem = self.files.read()?;
        let fingerprint = pem.fingerprint();
        if fingerprint == self.current().fingerprint {
            return Ok(false);
        }
        let loaded = Loaded::build(pem, fingerprint)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(loaded);
        self.generation.send_modify(|g| *g += 1);
        Ok(true)
    }

    /// Polls the files every [`RELOAD_INTERVAL`] until `stop` fires.
    pub fn spawn_watcher(self: &Arc<Self>, mut stop: watch::Receiver<bool>) {
        let tls = self.clone();
        tokio::spawn(async move {
            let mut last_error = String::new();
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(RELOAD_INTERVAL) => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
                match tls.reload() {
                    Ok(true) => {
                        last_error.clear();
                        tracing::info!(files = ?tls.files, "TLS certificate reloaded: new connections use it");
                    }
                    Ok(false) => last_error.clear(),
                    Err(e) => {
                        let e = format!("{e:#}");
                        // Files are often replaced one at a time: report once per distinct error.
                        if e != last_error {
                            tracing::warn!("TLS files changed but cannot be used yet, keeping the current ones: {e}");
                            last_error = e;
                        }
                    }
                }
            }
        });
    }
}

/// Accepted, handshaken connections of one port, for tonic's `serve_with_incoming`.
pub fn tls_incoming(listener: TcpListener, tls: Arc<NodeTls>, port: Port) -> ReceiverStream<std::io::Result<TlsStream<TcpStream>>> {
    let (tx, rx) = mpsc::channel(64);
    let pending = Arc::new(Semaphore::new(MAX_PENDING_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                // The server stopped reading: stop accepting and release the port.
                _ = tx.closed() => return,
            };
            let (tcp, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(%port, "accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(permit) = pending.clone().try_acquire_owned() else {
                tracing::warn!(%port, %peer, "too many TLS handshakes in progress: connection closed");
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = TlsAcceptor::from(tls.server_config(port));
            let tx = tx.clone();
            tokio::spawn(async move {
                let _permit = permit;
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Ok(Err(e)) => handshake_failed(port, peer, failure_reason(&e), &e.to_string()),
                    Err(_) => handshake_failed(port, peer, "timeout", "timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

fn handshake_failed(port: Port, peer: SocketAddr, reason: &'static str, detail: &str) {
    metrics::counter!("kerwen_tls_handshake_failures_total", "port" => port.to_string(), "reason" => reason).increment(1);
    tracing::info!(target: "kerwen::audit", %port, %peer, reason, "TLS handshake failed: {detail}");
}

/// A failed handshake's reason as a metric label: a few fixed values, never the message.
fn failure_reason(e: &std::io::Error) -> &'static str {
    use tokio_rustls::rustls::{CertificateError, Error};
    let Some(tls) = e.get_ref().and_then(|inner| inner.downcast_ref::<Error>()) else {
        return "io";
    };
    match tls {
        Error::NoCertificatesPresented => "no_certificate",
        Error::InvalidCertificate(CertificateError::Expired | CertificateError::ExpiredContext { .. }) => "expired_certificate",
        Error::InvalidCertificate(CertificateError::UnknownIssuer) => "unknown_issuer",
        Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure | CertificateError::Other(_)) => "identity_refused",
        Error::InvalidCertificate(_) => "bad_certificate",
        Error::AlertReceived(_) => "alert_received",
        Error::PeerIncompatible(_) => "incompatible",
        Error::General(_) => "identity_refused",
        _ => "protocol",
    }
}
