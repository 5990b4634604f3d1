//! Processes: finding the binaries, free ports, starting, killing and restarting daemons,
//! bounded waits.

use std::fs::File;
use std::net::{TcpListener, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The path of a workspace binary, built by `cargo test --workspace`.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // A test runs from target/<profile>/deps/, a bench binary from target/<profile>/.
    let here = exe.parent().expect("executable dir");
    let dir = if here.ends_with("deps") {
        here.parent().expect("target dir")
    } else {
        here
    };
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} not found: run the suite with `cargo test --workspace` (scripts/test.sh) so the binaries are built",
        path.display()
    );
    path
}

/// The first port [`free_port`] hands out, and how many it cycles through: below Linux's
/// ephemeral range (32768–60999), so the local port of some test's outgoing connection cannot
/// take a port between its being chosen here and a daemon binding it (a port the kernel picked
/// for `bind(:0)` is in that range, and did: a NATS node once lost its monitor port that way).
const FIRST_TEST_PORT: u32 = 10_000;
const TEST_PORTS: u32 = 22_000;

/// Ports handed out by this test process so far: two tests never get the same one.
static PORTS_HANDED_OUT: AtomicU32 = AtomicU32::new(0);

/// A port on 127.0.0.1, free for TCP and UDP a moment ago, never handed out before by this
/// process. Each process starts at its own place in the range, so the test binaries of one
/// run rarely meet either.
pub fn free_port() -> u16 {
    let start = std::process::id().wrapping_mul(7919) % TEST_PORTS;
    for _ in 0..TEST_PORTS {
        let n = PORTS_HANDED_OUT.fetch_add(1, Ordering::Relaxed);
        let port = (FIRST_TEST_PORT + (start + n) % TEST_PORTS) as u16;
        let tcp = TcpListener::bind(("127.0.0.1", port)).is_ok();
        if tcp && UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!(
        "no free loopback port in {FIRST_TEST_PORT}..{}",
        FIRST_TEST_PORT + TEST_PORTS
    )
}

/// Polls `f` every 20 ms until it is true; panics naming `what` after `timeout`.
pub fn wait_until(timeout: Duration, what: &str, f: impl FnMut() -> bool) {
    assert!(
        wait_for(timeout, f),
        "timed out after {timeout:?} waiting for {what}"
    );
}

/// Polls `f` every 20 ms until it is true or `timeout` has passed; returns which.
pub fn wait_for(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while !f() {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// A daemon process whose stdout and stderr go to a log file (appended across restarts).
pub struct Daemon {
    pub name: String,
    program: PathBuf,
    args: Vec<String>,
    pub log: PathBuf,
    /// Set in the process's environment, on every start.
    env: Vec<(String, String)>,
    child: Option<Child>,
}

impl Daemon {
    pub fn start(name: &str, program: PathBuf, args: &[&str], log: PathBuf) -> Daemon {
        Self::start_with_env(name, program, args, log, &[])
    }

    /// [`Daemon::start`] with `env` set in the process's environment (also on restarts).
    pub fn start_with_env(
        name: &str,
        program: PathBuf,
        args: &[&str],
        log: PathBuf,
        env: &[(&str, &str)],
    ) -> Daemon {
        let mut d = Daemon {
            name: name.into(),
            program,
            args: args.iter().map(|s| s.to_string()).collect(),
            log,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            child: None,
        };
        d.spawn();
        d
    }

    fn spawn(&mut self) {
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let child = Command::new(&self.program)
            .args(&self.args)
            .env("PWSYNC_LOG", "info,rumqttd=warn")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", self.name));
        self.child = Some(child);
    }

    /// The running process's id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// SIGKILL, no chance to clean up.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait (bounded) for a clean exit; SIGKILL if it does not come.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: sending a signal to our own child by pid.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                if Instant::now() > deadline {
                    let _ = c.kill();
                    let _ = c.wait();
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// SIGSTOP: the process keeps its sockets open and answers nothing (a hung host).
    pub fn pause(&mut self) {
        self.signal(libc::SIGSTOP);
    }

    /// SIGCONT after [`Daemon::pause`].
    pub fn resume(&mut self) {
        self.signal(libc::SIGCONT);
    }

    fn signal(&mut self, sig: i32) {
        if let Some(c) = &self.child {
            // SAFETY: sending a signal to our own child by pid.
            unsafe { libc::kill(c.id() as i32, sig) };
        }
    }

    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "{} is still running", self.name);
        self.spawn();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Watches every process's command line (`/proc/*/cmdline`) every few milliseconds while it
/// lives, for any of the given secrets: a program started with a password in its argv shows in
/// the process list, to every user of the host.
pub struct ArgvWatch {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<(u64, Vec<String>)>>,
}

impl ArgvWatch {
    /// Starts watching for `secrets` (bounded: it stops after an hour at most).
    pub fn start(secrets: &[&str]) -> ArgvWatch {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let secrets: Vec<Vec<u8>> = secrets.iter().map(|s| s.as_bytes().to_vec()).collect();
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(3600);
            let (mut scans, mut seen) = (0u64, Vec::new());
            while !flag.load(Ordering::Relaxed) && Instant::now() < deadline {
                for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
                    let Ok(argv) = std::fs::read(entry.path().join("cmdline")) else {
                        continue;
                    };
                    if secrets
                        .iter()
                        .any(|s| argv.windows(s.len()).any(|w| w == s.as_slice()))
                    {
                        seen.push(String::from_utf8_lossy(&argv).replace('\0', " "));
                    }
                }
                scans += 1;
                std::thread::sleep(Duration::from_millis(2));
            }
            (scans, seen)
        });
        ArgvWatch {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops watching: how many scans of the process list were made, and every command line
    /// that held a secret.
    pub fn finish(mut self) -> (u64, Vec<String>) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread
            .take()
            .map(|t| t.join().expect("argv watch"))
            .unwrap_or_default()
    }
}

impl Drop for ArgvWatch {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Runs `cmd` with `input` on its stdin; its output. A program that refuses early may not read
/// its input: a closed pipe is fine.
pub fn run_with_input(cmd: &mut std::process::Command, input: &[u8]) -> std::process::Output {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(input);
    }
    child.wait_with_output().expect("the program's output")
}

/// Whether this process runs as root, which `what` needs (another user's processes, /etc/pam.d,
/// Unix accounts). Outside CI a test without it is skipped, and says so; in CI it fails.
pub fn root_or_skip(what: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert!(std::env::var_os("CI").is_none(), "{what} needs root in CI");
    eprintln!("skipped: {what} needs root");
    false
}
