//! Trust: mutual TLS on both ports, identities from certificates, deny-by-default access
//! rights, certificate rotation, and hostile bytes on the ports. Every test runs real
//! `kerwen serve` processes with the harness's own CA.

mod harness;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use harness::{message, trace, Cluster, ProcessCluster, TEST_SUBSYSTEM};
use kerwen_broker::access::Principal;
use kerwen_broker::ids::SubsystemId;
use kerwen_node::client::{Client, ClientTls};
use kerwen_node::pki::{self, CertificateAuthority, LeafSpec};
use rand::{Rng, RngCore, SeedableRng};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};
use tonic::Code;

const OWNER: &str = "TM/GOV/MINFIN/tax";
const SENDER: &str = "TM/GOV/MINCOM/registry";
const STRANGER: &str = "TM/GOV/MINEDU/schools";
const MAILBOX: &str = "TM/GOV/MINFIN/tax/declarations";

fn ca(cluster: &ProcessCluster) -> Result<CertificateAuthority> {
    CertificateAuthority::load(cluster.pki_dir())
}

fn ca_pem(cluster: &ProcessCluster) -> Result<Vec<u8>> {
    Ok(std::fs::read(cluster.pki_dir().join(pki::CA_CERT))?)
}

/// TLS settings presenting a certificate made from `spec` by `issuer`.
fn tls_from(cluster: &ProcessCluster, issuer: &CertificateAuthority, spec: &LeafSpec) -> Result<ClientTls> {
    let pair = issuer.issue(spec)?;
    Ok(ClientTls::from_pem(ca_pem(cluster)?, pair.cert, pair.key))
}

fn subsystem_spec(uris: &[&str]) -> LeafSpec {
    let mut spec = LeafSpec::new("test client", Duration::from_secs(3600));
    spec.uris = uris.iter().map(|u| (*u).to_owned()).collect();
    spec
}

/// Tries one authenticated call with `tls` against `node`'s client port. `Ok(code)` when the
/// call got an answer from the service (its status code), `Err` when the connection itself
/// was refused (handshake or transport).
async fn try_call(cluster: &ProcessCluster, node: u64, tls: ClientTls) -> std::result::Result<Code, String> {
    let attempt = async {
        let mut client = Client::connect_with(&[cluster.endpoint(node)], Some(tls)).await.map_err(|s| s.to_string())?;
        match client.add_member(STRANGER, None).await {
            Ok(_) => Ok(Code::Ok),
            Err(s) if is_transport(&s) => Err(format!("{s}")),
            Err(s) => Ok(s.code()),
        }
    };
    tokio::time::timeout(Duration::from_secs(15), attempt).await.unwrap_or_else(|_| Err("timed out".into()))
}

/// A status made by the client's transport (the connection failed or was closed under the
/// call: UNAVAILABLE or CANCELLED), not sent by a service.
fn is_transport(s: &tonic::Status) -> bool {
    use std::error::Error;
    s.source().is_some()
}

/// Criteria 1, 3 and 4: the handshake refuses no certificate, an expired one, one from
/// another CA, the wrong kind for the port, and identities that smuggle separators or are
/// over-long; none of these changes any state. Issuance refuses bad identities too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_refuse_bad_certificates_and_the_wrong_port() -> Result<()> {
    let cluster = ProcessCluster::builder().start().await?;
    let ca = ca(&cluster)?;

    // Control: a valid admin certificate gets through and is refused nothing.
    let admin_tls = cluster.tls_for(&pki::IdentityFiles {
        cert: cluster.pki_dir().join("admin.pem"),
        key: cluster.pki_dir().join("admin.key"),
    })?;

    // No client certificate at all.
    let channel = tonic::transport::Endpoint::from_shared(format!("https://{}", cluster.endpoint(1)))?
        .tls_config(tonic::transport::ClientTlsConfig::new().ca_certificate(tonic::transport::Certificate::from_pem(ca_pem(&cluster)?)))?
        .connect_timeout(Duration::from_secs(5));
    let anonymous = async {
        let channel = channel.connect().await.map_err(|e| e.to_string())?;
        let mut access = kerwen_proto::v1::access_client::AccessClient::new(channel);
        access.who_am_i(kerwen_proto::v1::WhoAmIRequest {}).await.map(|_| ()).map_err(|s| s.to_string())
    };
    let r = tokio::time::timeout(Duration::from_secs(15), anonymous).await.context("anonymous call hung")?;
    ensure!(r.is_err(), "a client without a certificate was served");
    trace(format!("no certificate: {r:?}"));

    let mut expired = subsystem_spec(&[&Principal::Subsystem(STRANGER.parse()?).uri()]);
    expired.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(30);
    expired.not_after = time::OffsetDateTime::now_utc() - time::Duration::days(1);
    let rogue = CertificateAuthority::generate("rogue CA")?;
    let node_cert = cluster.tls_for(&cluster.node_cert(2))?;
    let refused: Vec<(&str, ClientTls)> = vec![
        ("an expired certificate", tls_from(&cluster, &ca, &expired)?),
        ("a certificate of another CA", tls_from(&cluster, &rogue, &subsystem_spec(&["kerwen-admin:admin"]))?),
        ("a node certificate on the client port", node_cert.clone()),
        ("no kerwen identity", tls_from(&cluster, &ca, &subsystem_spec(&["spiffe://gov.tm/x"]))?),
        ("two identities", tls_from(&cluster, &ca, &subsystem_spec(&["kerwen-admin:admin", "kerwen:TM/GOV/MINFIN/tax"]))?),
        ("a smuggled separator", tls_from(&cluster, &ca, &subsystem_spec(&["kerwen:TM/GOV/MINFIN/tax/extra"]))?),
        ("a percent-encoded separator", tls_from(&cluster, &ca, &subsystem_spec(&["kerwen:TM/GOV/MINFIN/ta%2Fx"]))?),
        // URI SANs are 7-bit IA5 strings: a look-alike can only arrive percent-encoded.
        ("a percent-encoded look-alike", tls_from(&cluster, &ca, &subsystem_spec(&["kerwen:TM/GOV/MIN%D0%A1OM/registry"]))?),
        ("an over-long part", tls_from(&cluster, &ca, &subsystem_spec(&[&format!("kerwen:TM/GOV/{}/tax", "M".repeat(65))]))?),
        ("an admin name with a slash", tls_from(&cluster, &ca, &subsystem_spec(&["kerwen-admin:ops/root"]))?),
    ];
    for (what, tls) in refused {
        let r = try_call(&cluster, 1, tls).await;
        ensure!(r.is_err(), "{what}: the call was answered ({r:?}); the handshake must refuse it");
        trace(format!("{what}: refused ({})", r.unwrap_err()));
    }
    ensure!(try_call(&cluster, 1, admin_tls.clone()).await == Ok(Code::Ok), "the admin's own call must succeed");

    // The peer port admits node certificates only.
    for (what, tls) in [("a subsystem certificate", cluster.subsystem_tls(SENDER)?), ("an admin certificate", admin_tls.clone())] {
        let r = tokio::time::timeout(
            Duration::from_secs(15),
            kerwen_node::testing::set_blocked_peers(&cluster.peer_endpoint(1), &[2], Some(tls)),
        )
        .await
        .context("peer call hung")?;
        ensure!(r.is_err(), "{what} was served on the node-to-node port");
        trace(format!("{what} on the peer port: refused ({:#})", r.unwrap_err()));
    }
    kerwen_node::testing::set_blocked_peers(&cluster.peer_endpoint(1), &[], Some(node_cert)).await.context("a node certificate on the peer port")?;

    // Nothing the refused callers tried changed anything: only the test identity and the
    // stranger registered by the admin's control call are members.
    let admin = cluster.admin_client(2).await?;
    let members = admin.access().list_members(kerwen_proto::v1::ListMembersRequest {}).await?.into_inner().members;
    let mut names: Vec<String> = members.into_iter().map(|m| m.subsystem).collect();
    names.sort();
    let mut expected = vec![STRANGER.to_owned(), TEST_SUBSYSTEM.to_owned()];
    expected.sort();
    ensure!(names == expected, "members: {names:?}");
    let audit = cluster.log_grep(1, "TLS handshake refused");
    ensure!(audit.len() >= 5, "refused handshakes are logged: {audit:?}");

    // Issuance refuses identities the node would refuse (look-alike, separator, length).
    let look_alike = SubsystemId {
        instance: "TM".into(),
        member_class: "GOV".into(),
        member_code: "MIN\u{0421}OM".into(),
        subsystem: "registry".into(),
    };
    let separator = SubsystemId { subsystem: "reg/istry".into(), ..look_alike.clone() };
    let long = SubsystemId { member_code: "M".repeat(65), ..separator.clone() };
    for bad in [look_alike, separator, long] {
        ensure!(ca.issue_for(&Principal::Subsystem(bad.clone()), &[], pki::DEFAULT_VALIDITY).is_err(), "issued for {bad:?}");
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kerwen"))
        .args(["certs", "issue", "--subsystem", "TM/GOV/MIN\u{0421}OM/registry", "--pki-dir"])
        .arg(cluster.pki_dir())
        .env("KERWEN_PROFILE", cluster.root().join("no-profile.toml"))
        .output()?;
    ensure!(!out.status.success(), "kerwen certs issue accepted a look-alike identity");
    cluster.check_no_crash()
}

/// Criterion 2 and discovery: deny by default, grants (direct and through a group),
/// revocation, owner-only consumption, and the audit log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_is_denied_by_default_granted_by_the_owner_and_audited() -> Result<()> {
    let cluster = ProcessCluster::builder().start().await?;
    cluster.register(OWNER).await?;
    cluster.register(SENDER).await?;
    let mut owner = cluster.client_as(1, OWNER).await?;
    let mut sender = cluster.client_as(2, SENDER).await?;
    let mut stranger = cluster.client_as(3, STRANGER).await?;
    let mut admin = cluster.admin_client(3).await?;
    owner.create_mailbox(MAILBOX, 2).await.map_err(|s| anyhow!("owner creates its mailbox: {s}"))?;
    let denied = sender.create_mailbox("TM/GOV/MINFIN/tax/other", 1).await.err().map(|s| s.code());
    ensure!(denied == Some(Code::PermissionDenied), "a mailbox of another subsystem: {denied:?}");

    let publish = |id: &str| vec![message(id, MAILBOX, None, format!("payload {id}"))];
    let s = sender.publish(publish("m1")).await.err().context("publish without a grant was accepted")?;
    ensure!(s.code() == Code::PermissionDenied, "no grant: {s:?}");
    ensure!(s.message().contains(SENDER), "the refusal names the caller: {}", s.message());
    let s = stranger.publish(publish("m2")).await.err().context("an unregistered subsystem published")?;
    ensure!(s.code() == Code::PermissionDenied && s.message().contains("not registered"), "unregistered: {s:?}");
    let s = admin.publish(publish("m3")).await.err().context("an admin published")?;
    ensure!(s.code() == Code::PermissionDenied, "admin publish: {s:?}");
    let s = sender.subscribe(MAILBOX, 10).await.err().context("a non-owner subscribed")?;
    ensure!(s.code() == Code::PermissionDenied, "subscribe by a non-owner: {s:?}");
    let s = admin.subscribe(MAILBOX, 10).await.err().context("an admin subscribed")?;
    ensure!(s.code() == Code::PermissionDenied, "subscribe by an admin: {s:?}");
    let s = sender.describe_mailbox(MAILBOX).await.err().context("a non-owner described the mailbox")?;
    ensure!(s.code() == Code::PermissionDenied, "describe by a non-owner: {s:?}");

    // Audited with the caller's identity, on the node that refused.
    let audit = cluster.log_grep(2, "permission denied");
    ensure!(audit.iter().any(|l| l.contains(SENDER) && l.contains("send to")), "publish denial audited: {audit:?}");
    ensure!(audit.iter().any(|l| l.contains(SENDER) && l.contains("consume")), "subscribe denial audited: {audit:?}");

    // The owner grants; the sender may send through any node at once (a lagging node asks
    // the metadata leader before refusing).
    let allowed = |c: &mut Client| {
        let mut access = c.access();
        async move {
            let r = access.allowed_services(kerwen_proto::v1::AllowedServicesRequest::default()).await?;
            Ok::<_, tonic::Status>(r.into_inner().services)
        }
    };
    ensure!(allowed(&mut sender).await?.is_empty(), "nothing allowed before the grant");
    owner.grant(MAILBOX, SENDER).await.map_err(|s| anyhow!("grant: {s}"))?;
    for node in cluster.node_ids() {
        let mut c = cluster.client_as(node, SENDER).await?;
        c.publish(publish(&format!("granted-{node}"))).await.map_err(|s| anyhow!("publish through node {node} after the grant: {s}"))?;
    }
    ensure!(allowed(&mut sender).await? == [MAILBOX], "allowed-services lists the granted mailbox");
    let s = sender.grant(MAILBOX, STRANGER).await.err().context("a grantee granted onwards")?;
    ensure!(s.code() == Code::PermissionDenied, "only the owner grants: {s:?}");

    // Revoked: refused at once by the metadata leader's node, and by every other node as soon
    // as it has applied the revocation (its replication lag). Publishes a lagging node still
    // accepted meanwhile are counted: they were sent while that node knew the grant.
    owner.revoke(MAILBOX, SENDER).await.map_err(|s| anyhow!("revoke: {s}"))?;
    let meta_leader = cluster.leader_of(0).await?;
    let mut expected: Vec<String> = ["granted-1", "granted-2", "granted-3", "via-group"].map(String::from).to_vec();
    let mut c = cluster.client_as(meta_leader, SENDER).await?;
    let r = c.publish(publish("revoked-at-leader")).await;
    ensure!(r.as_ref().err().map(|s| s.code()) == Some(Code::PermissionDenied), "after revoke, via the metadata leader: {r:?}");
    for node in cluster.node_ids() {
        let mut c = cluster.client_as(node, SENDER).await?;
        let deadline = Instant::now() + Duration::from_secs(10);
        for attempt in 0.. {
            let id = format!("revoked-{node}-{attempt}");
            match c.publish(publish(&id)).await {
                Err(s) if s.code() == Code::PermissionDenied => break,
                Ok(_) if Instant::now() < deadline => expected.push(id),
                other => bail!("after revoke via node {node}: {other:?}"),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    // A grant to a group covers its members.
    admin.access().add_to_group(kerwen_proto::v1::GroupRequest { group: "ministries".into(), subsystem: SENDER.into() }).await?;
    owner.grant(MAILBOX, "group:ministries").await.map_err(|s| anyhow!("group grant: {s}"))?;
    sender.publish(publish("via-group")).await.map_err(|s| anyhow!("publish through a group grant: {s}"))?;

    // Only the owner consumes; deliveries carry the authenticated sender.
    let mut sub = owner.subscribe(MAILBOX, 100).await.map_err(|s| anyhow!("owner subscribes: {s}"))?;
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while got.len() < expected.len() && Instant::now() < deadline {
        if let Some(d) = sub.next_delivery(Duration::from_secs(5)).await? {
            let m = d.message.clone().unwrap_or_default();
            ensure!(m.sender == SENDER, "delivery {} carries sender {:?}", m.id, m.sender);
            got.push(m.id);
        }
    }
    got.sort();
    expected.sort();
    ensure!(got == expected, "delivered: {got:?}, expected {expected:?}");

    // Discovery.
    let mut access = stranger.access();
    let s = access.list_members(kerwen_proto::v1::ListMembersRequest {}).await.err().context("unregistered discovery")?;
    ensure!(s.code() == Code::PermissionDenied, "discovery needs registration: {s:?}");
    let services =
        sender.access().list_services(kerwen_proto::v1::ListServicesRequest { subsystem: OWNER.into() }).await?.into_inner().services;
    ensure!(services == [MAILBOX], "services of {OWNER}: {services:?}");
    let who = sender.access().who_am_i(kerwen_proto::v1::WhoAmIRequest {}).await?.into_inner().identity;
    ensure!(who == format!("kerwen:{SENDER}"), "whoami: {who}");
    cluster.check_no_crash()
}

/// Criterion 5: a certificate rotated on disk is served to new connections while an
/// established one keeps working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_certificate_is_picked_up_while_old_connections_keep_working() -> Result<()> {
    let cluster = ProcessCluster::builder().start().await?;
    let mut before = cluster.client(1).await?;
    before.create_mailbox("TM/GOV/MINCOM/registry/rotation", 1).await.map_err(|s| anyhow!("{s}"))?;
    let old_der = served_certificate(&cluster, 1).await?;

    let files = cluster.node_cert(1);
    let new = ca(&cluster)?.issue_for(&Principal::Node(1), &pki::loopback_hosts(), pki::DEFAULT_VALIDITY)?;
    // Key first: until the certificate follows, the pair does not match and the node keeps
    // the old one (and says so once).
    pki::write_file(&files.key, new.key.as_bytes(), 0o600)?;
    pki::write_file(&files.cert, new.cert.as_bytes(), 0o644)?;
    let new_der = CertificateDer::from_pem_slice(new.cert.as_bytes())?.to_vec();
    ensure!(new_der != old_der, "the new certificate differs");

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let served = served_certificate(&cluster, 1).await?;
        if served == new_der {
            break;
        }
        ensure!(served == old_der, "node 1 serves an unknown certificate");
        ensure!(Instant::now() < deadline, "node 1 did not pick up the rotated certificate within 30 s");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    trace("node 1 serves the rotated certificate");
    ensure!(!cluster.log_grep(1, "TLS certificate reloaded").is_empty(), "the reload is logged");

    // The connection opened before the rotation still works, and node 1's own connections to
    // its peers (re-dialled with the new certificate) carry forwarded writes.
    before.publish(vec![message("after-rotation", "TM/GOV/MINCOM/registry/rotation", None, "x")]).await.map_err(|s| anyhow!("{s}"))?;
    let mut fresh = cluster.client(1).await?;
    for i in 0..20 {
        fresh.publish(vec![message(format!("fresh-{i}"), "TM/GOV/MINCOM/registry/rotation", None, "x")]).await.map_err(|s| anyhow!("{s}"))?;
    }
    let info = fresh.describe_mailbox("TM/GOV/MINCOM/registry/rotation").await.map_err(|s| anyhow!("{s}"))?;
    ensure!(info.pending_messages == 21, "pending {}", info.pending_messages);
    cluster.check_no_crash()
}

/// The certificate `node` presents on its client port to a new connection.
async fn served_certificate(cluster: &ProcessCluster, node: u64) -> Result<Vec<u8>> {
    let stream = tls_connect(cluster, &cluster.endpoint(node)).await?;
    let certs = stream.get_ref().1.peer_certificates().context("no server certificate")?;
    Ok(certs[0].to_vec())
}

fn admin_tls_config(cluster: &ProcessCluster) -> Result<Arc<ClientConfig>> {
    let mut roots = RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(&ca_pem(cluster)?) {
        roots.add(ca?)?;
    }
    let cert = CertificateDer::pem_file_iter(cluster.pki_dir().join("admin.pem"))?.collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(cluster.pki_dir().join("admin.key"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(cert, key)?;
    Ok(Arc::new(config))
}

async fn tls_connect(cluster: &ProcessCluster, addr: &str) -> Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let connector = tokio_rustls::TlsConnector::from(admin_tls_config(cluster)?);
    let name = ServerName::try_from("127.0.0.1")?.to_owned();
    Ok(tokio::time::timeout(Duration::from_secs(10), connector.connect(name, tcp)).await.context("TLS handshake hung")??)
}

/// The first flight of a real TLS 1.3 handshake (a ClientHello), to send truncated.
fn client_hello(cluster: &ProcessCluster) -> Result<Vec<u8>> {
    let mut conn = rustls::ClientConnection::new(admin_tls_config(cluster)?, ServerName::try_from("127.0.0.1")?.to_owned())?;
    let mut out = Vec::new();
    conn.write_tls(&mut out)?;
    ensure!(out.len() > 100, "a ClientHello is longer than {} bytes", out.len());
    Ok(out)
}

/// Criterion 6: random bytes, plaintext HTTP/1 and truncated handshakes on every port never
/// crash or wedge a node; connections that stall mid-handshake hold up no one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_every_port_never_crashes_or_wedges_a_node() -> Result<()> {
    let cluster = ProcessCluster::builder().start().await?;
    let mut client = cluster.client(1).await?;
    let mailbox = "TM/GOV/MINCOM/registry/fuzz";
    client.create_mailbox(mailbox, 1).await.map_err(|s| anyhow!("{s}"))?;
    let hello = client_hello(&cluster)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x6b65_7277_656e);
    let ports: Vec<String> = cluster.node_ids().into_iter().flat_map(|n| [cluster.endpoint(n), cluster.peer_endpoint(n)]).collect();

    // Stalled handshakes, held open through the rest of the test.
    let mut stalled = Vec::new();
    for port in &ports {
        for cut in [0, 5, hello.len() / 2] {
            let mut s = TcpStream::connect(port).await?;
            s.write_all(&hello[..cut]).await?;
            stalled.push(s);
        }
    }

    let mut sent = 0;
    for round in 0..20 {
        for port in &ports {
            let mut payload = match round % 4 {
                0 => {
                    let mut b = vec![0u8; rng.random_range(1..4096)];
                    rng.fill_bytes(&mut b);
                    b
                }
                1 => b"GET / HTTP/1.1\r\nHost: kerwen\r\nConnection: close\r\n\r\n".to_vec(),
                2 => hello[..rng.random_range(1..hello.len())].to_vec(),
                _ => {
                    // A valid ClientHello followed by garbage where the next flight belongs.
                    let mut b = hello.clone();
                    let mut junk = vec![0u8; 512];
                    rng.fill_bytes(&mut junk);
                    b.extend_from_slice(&junk);
                    b
                }
            };
            if round % 8 == 7 {
                // Flip one byte of an otherwise real handshake.
                payload = hello.clone();
                let i = rng.random_range(0..payload.len());
                payload[i] ^= 0x40;
            }
            let mut s = TcpStream::connect(port).await.with_context(|| format!("connecting to {port} in round {round}"))?;
            let _ = s.write_all(&payload).await;
            let _ = s.shutdown().await;
            // Whatever the node answers (an alert, nothing), it closes the connection in bounded time.
            let mut sink = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(15), s.read_to_end(&mut sink)).await.context("the node kept a garbage connection open")?;
            sent += 1;
        }
        // The cluster keeps serving real clients throughout.
        let started = Instant::now();
        client.publish(vec![message(format!("m{round}"), mailbox, None, "ok")]).await.map_err(|s| anyhow!("publish in round {round}: {s}"))?;
        ensure!(started.elapsed() < Duration::from_secs(5), "a publish took {:?} with garbage around", started.elapsed());
    }
    trace(format!("{sent} hostile connections, {} stalled handshakes held open", stalled.len()));
    cluster.check_no_crash()?;
    let fresh = try_call(&cluster, 2, cluster.subsystem_tls(TEST_SUBSYSTEM)?).await;
    ensure!(fresh.is_ok(), "a new connection is served: {fresh:?}");
    let info = client.describe_mailbox(mailbox).await.map_err(|s| anyhow!("{s}"))?;
    ensure!(info.pending_messages == 20, "pending {}", info.pending_messages);
    drop(stalled);
    if cluster.node_ids().iter().any(|n| cluster.log_grep(*n, "panicked").len() > 0) {
        bail!("a node panicked");
    }
    Ok(())
}

/// Criterion 7: a tenant flooding past its rate quota is throttled with a retry hint, while
/// another tenant's publishes through the same node keep their latency; a tenant's stored
/// bytes are capped until its messages are consumed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_tenant_is_throttled_and_the_others_are_not() -> Result<()> {
    const FLOODER: &str = "TM/GOV/MINFIN/bulk";
    const QUIET: &str = "TM/GOV/MINEDU/schools";
    const RATE: u64 = 200;
    let cluster = ProcessCluster::builder().start().await?;
    let mut admin = cluster.admin_client(1).await?;
    let quota = kerwen_proto::v1::Quota { publish_messages_per_second: Some(RATE), ..Default::default() };
    admin.add_member(FLOODER, Some(quota)).await.map_err(|s| anyhow!("{s}"))?;
    cluster.register(QUIET).await?;
    let flood_box = format!("{FLOODER}/exports");
    let quiet_box = format!("{QUIET}/reports");
    cluster.client_as(1, FLOODER).await?.create_mailbox(&flood_box, 3).await.map_err(|s| anyhow!("{s}"))?;
    let mut quiet = cluster.client_as(1, QUIET).await?;
    quiet.create_mailbox(&quiet_box, 3).await.map_err(|s| anyhow!("{s}"))?;

    async fn latencies(client: &mut Client, mailbox: &str, tag: &str, n: usize) -> Result<Vec<Duration>> {
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            let started = Instant::now();
            client.publish(vec![message(format!("{tag}-{i}"), mailbox, None, "q")]).await.map_err(|s| anyhow!("quiet publish: {s}"))?;
            out.push(started.elapsed());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        out.sort();
        Ok(out)
    }
    let baseline = latencies(&mut quiet, &quiet_box, "before", 50).await?;

    // Four flooders hammering node 1 with batches of 20, ignoring the retry hints (through
    // node 1 only: each node enforces the rate on what it receives).
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut flooders = Vec::new();
    for f in 0..4 {
        let mut client = cluster.client_as(1, FLOODER).await?.without_direct_routing();
        let (stop, mailbox) = (stop.clone(), flood_box.clone());
        flooders.push(tokio::spawn(async move {
            let (mut accepted, mut throttled, mut hinted) = (0u64, 0u64, 0u64);
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let batch = (0..20).map(|j| message(format!("f{f}-{i}-{j}"), &mailbox, None, "flood")).collect();
                i += 1;
                match client.publish(batch).await {
                    Ok(_) => accepted += 20,
                    Err(s) if s.code() == Code::ResourceExhausted => {
                        throttled += 1;
                        hinted += u64::from(s.metadata().get("retry-after-ms").is_some());
                    }
                    Err(s) => return Err(anyhow!("flooder: {s}")),
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Ok::<_, anyhow::Error>((accepted, throttled, hinted))
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let flood_started = Instant::now();
    let during = latencies(&mut quiet, &quiet_box, "during", 100).await?;
    let flood_secs = flood_started.elapsed().as_secs_f64() + 0.5;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut accepted, mut throttled, mut hinted) = (0, 0, 0);
    for f in flooders {
        let (a, t, h) = f.await??;
        accepted += a;
        throttled += t;
        hinted += h;
    }
    let p = |v: &[Duration], q: f64| v[((v.len() as f64 * q) as usize).min(v.len() - 1)];
    trace(format!(
        "flooder: {accepted} accepted in {flood_secs:.1} s ({:.0}/s against {RATE}/s), {throttled} throttled; quiet p50 {:?} -> {:?}, p99 {:?} -> {:?}",
        accepted as f64 / flood_secs,
        p(&baseline, 0.5),
        p(&during, 0.5),
        p(&baseline, 0.99),
        p(&during, 0.99)
    ));
    ensure!(throttled > 0 && hinted == throttled, "the flooder was throttled with retry hints ({throttled}, {hinted} hinted)");
    // One second of burst plus one batch of debt beyond the rate.
    let allowed = (RATE as f64 * (flood_secs + 1.0)) as u64 + 4 * 20;
    ensure!(accepted <= allowed, "the flooder got {accepted} messages through, more than {allowed}");
    ensure!(
        p(&during, 0.5) <= p(&baseline, 0.5) * 3 + Duration::from_millis(50),
        "the quiet tenant's median latency went from {:?} to {:?}",
        p(&baseline, 0.5),
        p(&during, 0.5)
    );
    ensure!(p(&during, 0.99) < Duration::from_secs(2), "the quiet tenant's p99 is {:?}", p(&during, 0.99));

    // Stored bytes: at most 600 bytes waiting (200 per shard, some taken by the quiet publishes
    // above), then room again after consuming.
    let quota = kerwen_proto::v1::Quota { max_stored_bytes: Some(600), ..Default::default() };
    admin.access().set_quota(kerwen_proto::v1::SetQuotaRequest { subsystem: QUIET.into(), quota: Some(quota) }).await?;
    let mut stored = 0;
    let mut refused = None;
    for i in 0..100 {
        match quiet.publish(vec![message(format!("big-{i}"), &quiet_box, None, vec![b'x'; 50])]).await {
            Ok(_) => stored += 50,
            Err(s) => {
                refused = Some(s);
                break;
            }
        }
    }
    let refused = refused.context("the stored-bytes quota never refused")?;
    ensure!(refused.code() == Code::ResourceExhausted && refused.message().contains(QUIET), "refusal: {refused:?}");
    trace(format!("stored {stored} bytes before the quota refused: {}", refused.message()));
    let mut consumer = harness::Consumer::open(&mut quiet, &quiet_box, 1000).await?;
    let all = consumer.take(150 + stored as usize / 50, Duration::from_secs(30)).await?;
    let positions = harness::positions_of(&all);
    consumer.ack(positions.clone()).await?;
    consumer.wait_confirmed(&positions, Duration::from_secs(30)).await?;
    drop(consumer);
    quiet.publish(vec![message("after-drain", &quiet_box, None, vec![b'x'; 50])]).await.map_err(|s| anyhow!("after draining: {s}"))?;
    cluster.check_no_crash()
}
