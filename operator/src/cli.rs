//! The operator's command line: flags and `FERRY_*` env (clap). The Helm
//! chart renders the Deployment's args from this, and a test parses the
//! rendered args with [`Cli`] so the two cannot drift.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// `ferry-operator`.
#[derive(Parser, Debug)]
#[command(name = "ferry-operator", version, about = "Ferry operator")]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Cmd,
}

/// The subcommands.
#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Run the controllers (in a cluster, or with a kubeconfig).
    Run(Box<RunArgs>),
    /// Print the CRDs (YAML), or write them into a directory.
    Crd {
        /// Write one file per CRD into this directory instead of printing.
        #[arg(long)]
        write: Option<PathBuf>,
    },
}

/// Flags of `ferry-operator run`.
#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// NATS URL(s) of the broker, comma-separated.
    #[arg(long, env = "FERRY_BROKER")]
    pub broker: String,
    /// NATS credentials file (JWT + seed).
    #[arg(long, env = "FERRY_BROKER_CREDS")]
    pub broker_creds: Option<PathBuf>,
    /// NATS user (with --broker-password).
    #[arg(long, env = "FERRY_BROKER_USER", requires = "broker_password")]
    pub broker_user: Option<String>,
    /// NATS password.
    #[arg(long, env = "FERRY_BROKER_PASSWORD", hide_env_values = true, requires = "broker_user")]
    pub broker_password: Option<String>,
    /// NATS token.
    #[arg(long, env = "FERRY_BROKER_TOKEN", hide_env_values = true)]
    pub broker_token: Option<String>,
    /// PEM file of the CA that signed the broker's certificate (turns TLS on).
    #[arg(long, env = "FERRY_BROKER_TLS_CA")]
    pub broker_tls_ca: Option<PathBuf>,
    /// Replicas of the `ferry-config` KV bucket (the sidecars' config): 3 in
    /// a clustered NATS of 3 or more servers, so losing one keeps every
    /// sidecar's config watch. An existing bucket is set to this.
    #[arg(long, env = "FERRY_CONFIG_REPLICAS", default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=5))]
    pub config_replicas: u8,
    /// Watch only this namespace (default: all).
    #[arg(long, env = "FERRY_WATCH_NAMESPACE")]
    pub namespace: Option<String>,
    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = "FERRY_METRICS_ADDR", default_value = "[::]:8080")]
    pub metrics_addr: SocketAddr,
    /// The namespace the operator runs in: its Lease, and the Secret and
    /// Service of the webhook, live there.
    #[arg(long, env = "FERRY_OPERATOR_NAMESPACE", default_value = "ferry-system")]
    pub operator_namespace: String,
    /// This replica's name (the Lease holder identity). Default: the host name.
    #[arg(long, env = "FERRY_POD_NAME")]
    pub pod_name: Option<String>,
    /// Take a Lease so only one replica reconciles (`false` for a single
    /// replica run outside a cluster).
    #[arg(long, env = "FERRY_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_election: bool,
    /// Name of the Lease.
    #[arg(long, env = "FERRY_LEASE_NAME", default_value = "ferry-operator")]
    pub lease_name: String,
    /// Serve the sidecar-injection webhook (HTTPS) on this address.
    #[arg(long, env = "FERRY_WEBHOOK_ADDR")]
    pub webhook_addr: Option<SocketAddr>,
    /// Directory holding `tls.crt` and `tls.key` for the webhook (e.g. from
    /// cert-manager). Without it the operator generates a certificate, keeps
    /// it in --webhook-secret and patches the webhook's caBundle.
    #[arg(long, env = "FERRY_WEBHOOK_CERT_DIR")]
    pub webhook_cert_dir: Option<PathBuf>,
    /// Secret (in the operator's namespace) holding a generated certificate.
    #[arg(long, env = "FERRY_WEBHOOK_SECRET", default_value = "ferry-webhook-tls")]
    pub webhook_secret: String,
    /// Service in front of the webhook (the certificate's DNS name is
    /// `{service}.{operator namespace}.svc`).
    #[arg(long, env = "FERRY_WEBHOOK_SERVICE", default_value = "ferry-webhook")]
    pub webhook_service: String,
    /// MutatingWebhookConfiguration whose caBundle a generated certificate is
    /// patched into.
    #[arg(long, env = "FERRY_WEBHOOK_CONFIG", default_value = "ferry-sidecar-injector")]
    pub webhook_config: String,
    /// YAML file with the injected sidecar's defaults (image, broker, volume,
    /// resources, ports); see `webhook::InjectConfig`.
    #[arg(long, env = "FERRY_INJECT_CONFIG")]
    pub inject_config: Option<PathBuf>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_takes_defaults_and_explicit_false() {
        let cli =
            Cli::try_parse_from(["ferry-operator", "run", "--broker", "nats://n:4222", "--leader-election", "false"])
                .unwrap();
        let Cmd::Run(args) = cli.command else { panic!("not run") };
        assert!(!args.leader_election);
        assert_eq!(args.operator_namespace, "ferry-system");
        assert!(args.webhook_addr.is_none());
        assert_eq!(args.config_replicas, 1);
    }

    #[test]
    fn config_replicas_takes_one_to_five() {
        let parse =
            |n: &str| Cli::try_parse_from(["ferry-operator", "run", "--broker", "nats://n", "--config-replicas", n]);
        let Cmd::Run(args) = parse("3").unwrap().command else { panic!("not run") };
        assert_eq!(args.config_replicas, 3);
        assert!(parse("0").is_err() && parse("6").is_err());
    }

    #[test]
    fn a_user_without_password_is_refused() {
        assert!(Cli::try_parse_from(["ferry-operator", "run", "--broker", "nats://n", "--broker-user", "u"]).is_err());
    }
}
