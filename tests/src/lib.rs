//! `ferry-e2e`: start real parts for tests. A `nats-server` with JetStream in
//! its own temp dir on a free port ([`NatsServer`]), and `ferry-sidecar`
//! processes ([`Process`]) whose log lines can be awaited, and a test app
//! that records deliveries and answers per a script ([`app::TestApp`]).
//!
//! Nothing here mocks a broker: every test that needs one runs the real
//! server binary (`FERRY_NATS_SERVER`, else `nats-server` on `PATH`; the
//! test command installs a pinned one).

pub mod app;
pub mod check;

use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a process may take to print an awaited line.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A free TCP port on 127.0.0.1 (bound then released), below the kernel's
/// ephemeral range when there is room for it there.
///
/// A port from the ephemeral range (what binding port 0 gives) can be taken
/// between its release and its use by any outgoing connection; and while a
/// test's nats-server is stopped, the sidecar reconnecting to that port can
/// be given the very port as its own source port, connecting to itself (a
/// TCP self-connect), so the server cannot bind it again when restarted.
/// The kernel hands out no port below the range on its own.
pub fn free_port() -> u16 {
    static HANDED_OUT: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let low = ephemeral_start().saturating_sub(1).min(u16::MAX as u32) as u16;
    if low > 20_000 {
        let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
        for _ in 0..1000 {
            let port = 10_000 + (uuid::Uuid::new_v4().as_u128() % u128::from(low - 10_000)) as u16;
            if !handed_out.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
                handed_out.push(port);
                return port;
            }
        }
    }
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free loopback port")
}

/// The first port of the kernel's ephemeral range (32768 if unknown).
fn ephemeral_start() -> u32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

/// A child process whose output lines are collected and can be awaited.
pub struct Process {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    rx: Receiver<String>,
    name: String,
}

impl Process {
    /// Spawns `cmd` with stdout and stderr captured.
    pub fn spawn(name: &str, mut cmd: Command) -> Process {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).stdin(Stdio::null());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawning {name}: {e}"));
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let out: Box<dyn Read + Send> = Box::new(child.stdout.take().expect("piped stdout"));
        let err: Box<dyn Read + Send> = Box::new(child.stderr.take().expect("piped stderr"));
        for stream in [out, err] {
            let lines = lines.clone();
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    lines.lock().unwrap_or_else(|e| e.into_inner()).push(line.clone());
                    let _ = tx.send(line);
                }
            });
        }
        Process { child, lines, rx, name: name.to_owned() }
    }

    /// Waits for an output line containing `needle` (lines seen before count
    /// too); panics with the output so far if it does not come in `timeout`.
    pub fn wait_for_line(&mut self, needle: &str, timeout: Duration) -> String {
        if let Some(l) = self.output().into_iter().find(|l| l.contains(needle)) {
            return l;
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => {}
                Err(_) => panic!(
                    "{}: no line containing {needle:?} within {timeout:?}; output:\n{}",
                    self.name,
                    self.output().join("\n")
                ),
            }
        }
    }

    /// Waits until `count` output lines contain `needle`; panics with the
    /// output so far if they do not come in `timeout`.
    pub fn wait_for_lines(&mut self, needle: &str, count: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.output().iter().filter(|l| l.contains(needle)).count() < count {
            let left = deadline.saturating_duration_since(Instant::now());
            if self.rx.recv_timeout(left).is_err() {
                panic!(
                    "{}: fewer than {count} lines containing {needle:?} within {timeout:?}; output:\n{}",
                    self.name,
                    self.output().join("\n")
                );
            }
        }
    }

    /// Every output line so far.
    pub fn output(&self) -> Vec<String> {
        self.lines.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal by number (15 = SIGTERM).
    pub fn signal(&self, sig: i32) {
        // Through the `kill` command: the workspace denies `unsafe` (libc::kill).
        let pid = self.child.id().to_string();
        let status = Command::new("kill").arg(format!("-{sig}")).arg(&pid).status().expect("running kill");
        assert!(status.success(), "kill -{sig} {pid} failed");
    }

    /// `kill -9` and reap.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for the process to exit, at most `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("{} did not exit within {timeout:?}; output:\n{}", self.name, self.output().join("\n"));
            }
            // Polling a child's exit: there is no portable exit event to await here.
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The nats-server binary to run.
pub fn nats_server_binary() -> PathBuf {
    std::env::var_os("FERRY_NATS_SERVER").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("nats-server"))
}

/// A real nats-server with JetStream, in its own temp dir, on a free port.
pub struct NatsServer {
    process: Option<Process>,
    port: u16,
    dir: tempfile::TempDir,
}

impl NatsServer {
    /// Starts a server and waits until it is ready.
    pub fn start() -> NatsServer {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut s = NatsServer { process: None, port: free_port(), dir };
        s.start_again();
        s
    }

    /// A server that is not running yet, with its port and dir chosen.
    pub fn stopped() -> NatsServer {
        NatsServer { process: None, port: free_port(), dir: tempfile::tempdir().expect("temp dir") }
    }

    /// A server that is not running yet and starts with this config file
    /// text (e.g. `max_payload: 65536`) besides its flags.
    pub fn stopped_with_config(config: &str) -> NatsServer {
        let s = NatsServer::stopped();
        std::fs::write(s.dir.path().join("nats.conf"), config).expect("writing nats.conf");
        s
    }

    /// (Re)starts the server on the same port and store dir.
    pub fn start_again(&mut self) {
        assert!(self.process.is_none(), "nats-server already running");
        let mut cmd = Command::new(nats_server_binary());
        let config = self.dir.path().join("nats.conf");
        if config.exists() {
            cmd.arg("-c").arg(config);
        }
        cmd.args(["-js", "-a", "127.0.0.1", "-p", &self.port.to_string(), "-sd"]).arg(self.store_dir());
        let mut p = Process::spawn("nats-server", cmd);
        p.wait_for_line("Server is ready", START_TIMEOUT);
        self.process = Some(p);
    }

    /// Stops the server (SIGKILL), keeping its store dir.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.kill9();
        }
    }

    /// Stops the server with SIGTERM (it syncs its store) and waits for it.
    pub fn stop_gracefully(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.signal(15);
            p.wait_exit(START_TIMEOUT);
        }
    }

    /// Deletes the JetStream store (data loss at the broker). Stop first.
    pub fn wipe_store(&self) {
        assert!(self.process.is_none(), "stop the server before wiping its store");
        let _ = std::fs::remove_dir_all(self.store_dir());
    }

    /// `nats://127.0.0.1:{port}`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The JetStream store directory.
    pub fn store_dir(&self) -> PathBuf {
        self.dir.path().join("jetstream")
    }
}

/// Writes `files` (name, YAML) into a new temp dir of manifests.
pub fn manifests(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).expect("writing a manifest");
    }
    dir
}

/// A path's display string (for command lines).
pub fn arg(p: &Path) -> String {
    p.display().to_string()
}

/// A size-limited tmpfs mounted for one test (needs root, which CI has);
/// unmounted (lazily) when dropped.
pub struct TmpfsMount(PathBuf);

impl TmpfsMount {
    /// Mounts a tmpfs of `size` (e.g. `"256k"`) on `path`; panics if it cannot.
    pub fn new(path: &Path, size: &str) -> TmpfsMount {
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .status()
            .expect("running mount");
        assert!(status.success(), "mounting a tmpfs needs root (CI runs as root); this test cannot run here");
        TmpfsMount(path.to_path_buf())
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_never_handed_out_twice_and_lie_below_the_ephemeral_range() {
        let ports: Vec<u16> = (0..300).map(|_| free_port()).collect();
        let unique: std::collections::BTreeSet<u16> = ports.iter().copied().collect();
        assert_eq!(unique.len(), ports.len(), "a port was handed out twice");
        let start = ephemeral_start();
        if start > 20_001 {
            assert!(ports.iter().all(|&p| u32::from(p) < start), "a port from the ephemeral range: {ports:?}");
        }
    }
}
