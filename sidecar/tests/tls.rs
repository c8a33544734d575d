//! A broker that only speaks TLS, with a certificate a private CA signed
//! (as a cluster's own issuer would): the sidecar reaches it with
//! `--broker-tls-ca` (what the chart's `tlsCASecret` passes), and without
//! the CA it does not trust it. A real nats-server with a `tls` block.

mod support;

use ferry_operator::webhook::tls::TlsMaterial;
use support::*;

/// A nats-server requiring TLS with a fresh CA's certificate for 127.0.0.1,
/// and the CA's file.
fn tls_server(dir: &std::path::Path) -> (NatsServer, std::path::PathBuf) {
    let m = TlsMaterial::generate(&["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
    let (cert, key, ca) = (dir.join("server.pem"), dir.join("server-key.pem"), dir.join("ca.pem"));
    std::fs::write(&cert, &m.cert_pem).unwrap();
    std::fs::write(&key, &m.key_pem).unwrap();
    std::fs::write(&ca, m.ca_pem.as_deref().unwrap()).unwrap();
    let config = format!("tls {{\n  cert_file: {cert:?}\n  key_file: {key:?}\n}}\n");
    let mut nats = NatsServer::stopped_with_config(&config);
    nats.start_again();
    (nats, ca)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sidecar_reaches_a_tls_broker_through_its_private_ca_and_not_without_it() {
    let certs = tempfile::tempdir().unwrap();
    let (nats, ca) = tls_server(certs.path());
    let res = manifests(&[("topics.yaml", TOPICS)]);

    // Without the CA: the server's certificate is not trusted, nothing is made.
    let data = tempfile::tempdir().unwrap();
    let mut untrusting = Launch::new(nats.url(), res.path(), data.path()).start();
    untrusting.process.wait_for_line("could not configure the broker yet", START_TIMEOUT);
    assert!(!untrusting.process.output().iter().any(|l| l.contains("broker configured")));
    untrusting.process.kill9();

    // With it: configured, and a produce is confirmed by the broker.
    let data = tempfile::tempdir().unwrap();
    let mut sc =
        Launch::new(nats.url(), res.path(), data.path()).arg("--broker-tls-ca").arg(ca.to_str().unwrap()).start();
    sc.wait_configured();
    produce_to(&sc, "orders", "over-tls", None, "sealed").await;

    let client = async_nats::ConnectOptions::new()
        .add_root_certificates(ca)
        .require_tls(true)
        .connect(nats.url())
        .await
        .unwrap();
    let js = async_nats::jetstream::new(client);
    assert_eq!(stored_ids(&js, "FERRY_default_orders").await, ["over-tls"]);
}
