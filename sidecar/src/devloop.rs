//! `ferry-sidecar run`: the sidecar and an app side by side, for a laptop.

use std::process::ExitCode;

use tokio::process::Command;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::oneshot;

use crate::config::Config;

/// Starts the sidecar, then the app with `FERRY_URL` set; forwards SIGINT
/// and SIGTERM to the app; when the app exits, stops the sidecar (draining
/// as on SIGTERM) and returns the app's exit status (128 + signal when it
/// was killed by one).
pub async fn run_with_app(config: Config, command: Vec<String>) -> ExitCode {
    // Installed first: from now on SIGINT/SIGTERM are ours to forward,
    // never the default action that would kill us and orphan the app.
    let (mut int, mut term) = match (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) {
        (Ok(i), Ok(t)) => (i, t),
        _ => {
            eprintln!("ferry: cannot install signal handlers");
            return ExitCode::FAILURE;
        }
    };
    let (ready_tx, ready_rx) = oneshot::channel();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let broker = if config.broker.is_embedded() {
        "embedded (in this process)".to_owned()
    } else {
        config.broker.urls.join(",")
    };
    let data_dir = config.data_dir.display().to_string();
    let app_id = config.app_id.clone();
    let app_port = config.app_port;
    let mut sidecar = tokio::spawn(crate::run(
        config,
        async move {
            let _ = stop_rx.await;
        },
        Some(ready_tx),
    ));
    let started = tokio::select! {
        s = ready_rx => match s {
            Ok(s) => s,
            Err(_) => return sidecar_failed(sidecar.await),
        },
        r = &mut sidecar => return sidecar_failed(r),
    };
    eprintln!("ferry: sidecar for app {app_id:?} is ready");
    eprintln!("ferry:   API      http://{}  (FERRY_URL)", started.api);
    eprintln!("ferry:   admin    http://{}/readyz  /metrics", started.admin);
    eprintln!("ferry:   broker   {broker}");
    eprintln!("ferry:   data     {data_dir}");
    eprintln!("ferry:   topics   {}", started.topics.join(", "));
    eprintln!(
        "ferry:   subscriptions of {app_id}: {}",
        if started.subscriptions.is_empty() { "none".to_owned() } else { started.subscriptions.join(", ") }
    );
    eprintln!("ferry: starting app: {}", command.join(" "));

    let mut cmd = Command::new(&command[0]);
    cmd.args(&command[1..])
        .env("FERRY_URL", format!("http://{}", started.api))
        .env("FERRY_API_PORT", started.api.port().to_string())
        .env("FERRY_APP_ID", &app_id)
        // Its own process group: a terminal's Ctrl-C reaches us, and we pass it on once.
        .process_group(0);
    if let Some(port) = app_port {
        cmd.env("FERRY_APP_PORT", port.to_string());
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ferry: cannot start {:?}: {e}", command[0]);
            let _ = stop_tx.send(());
            let _ = sidecar.await;
            return ExitCode::from(127);
        }
    };
    let pid = child.id();
    let forward = |sig: &str| {
        if let Some(pid) = pid {
            let _ = std::process::Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()).status();
        }
    };
    let status = loop {
        tokio::select! {
            status = child.wait() => break status,
            _ = int.recv() => forward("INT"),
            _ = term.recv() => forward("TERM"),
        }
    };
    let code = match status {
        Ok(s) => {
            use std::os::unix::process::ExitStatusExt;
            s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(0))
        }
        Err(e) => {
            eprintln!("ferry: waiting for the app: {e}");
            1
        }
    };
    eprintln!("ferry: app exited with status {code}; stopping the sidecar");
    let _ = stop_tx.send(());
    match sidecar.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => eprintln!("ferry: sidecar: {e}"),
        Err(e) => eprintln!("ferry: sidecar task: {e}"),
    }
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

fn sidecar_failed(r: Result<Result<(), crate::StartError>, tokio::task::JoinError>) -> ExitCode {
    match r {
        Ok(Err(e)) => {
            eprintln!("ferry-sidecar: {e}");
            match e {
                crate::StartError::Config(_) => ExitCode::from(crate::config::EXIT_CONFIG),
                _ => ExitCode::FAILURE,
            }
        }
        _ => {
            eprintln!("ferry-sidecar: stopped before it was ready");
            ExitCode::FAILURE
        }
    }
}
