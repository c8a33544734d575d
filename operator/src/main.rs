//! The `ferry-operator` binary.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use ferry_operator::cli::{Cli, Cmd, RunArgs};

/// Connects to NATS with the credentials the flags name; keeps retrying a
/// broker that is down at start.
async fn connect_broker(args: &RunArgs) -> Result<async_nats::Client, String> {
    let mut opts = async_nats::ConnectOptions::new()
        .name("ferry-operator")
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(2));
    if let Some(path) = &args.broker_creds {
        opts = opts.credentials_file(path).await.map_err(|e| format!("credentials file {}: {e}", path.display()))?;
    }
    if let (Some(user), Some(password)) = (&args.broker_user, &args.broker_password) {
        opts = opts.user_and_password(user.clone(), password.clone());
    }
    if let Some(token) = &args.broker_token {
        opts = opts.token(token.clone());
    }
    if let Some(ca) = &args.broker_tls_ca {
        opts = opts.add_root_certificates(ca.clone()).require_tls(true);
    }
    opts.connect(args.broker.as_str()).await.map_err(|e| format!("broker {}: {e}", args.broker))
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Cmd::Run(args) => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
                )
                .init();
            let rt = match tokio::runtime::Runtime::new() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("ferry-operator: {e}");
                    return ExitCode::FAILURE;
                }
            };
            rt.block_on(async {
                let client = match kube::Client::try_default().await {
                    Ok(c) => c,
                    Err(e) => {
                        eprintln!("ferry-operator: no Kubernetes API: {e}");
                        return ExitCode::FAILURE;
                    }
                };
                let nats = match connect_broker(&args).await {
                    Ok(c) => c,
                    Err(e) => {
                        eprintln!("ferry-operator: {e}");
                        return ExitCode::FAILURE;
                    }
                };
                match ferry_operator::run::run(client, nats, &args).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        eprintln!("ferry-operator: {e}");
                        ExitCode::FAILURE
                    }
                }
            })
        }
        Cmd::Crd { write: None } => {
            for (_, yaml) in ferry_operator::crd::rendered() {
                println!("---\n{yaml}");
            }
            ExitCode::SUCCESS
        }
        Cmd::Crd { write: Some(dir) } => {
            for (name, yaml) in ferry_operator::crd::rendered() {
                let path = dir.join(&name);
                if let Err(e) = std::fs::write(&path, yaml) {
                    eprintln!("ferry-operator: writing {}: {e}", path.display());
                    return ExitCode::FAILURE;
                }
                println!("wrote {}", path.display());
            }
            ExitCode::SUCCESS
        }
    }
}
