//! A real PostgreSQL server for tests: `initdb` and `pg_ctl` as the unprivileged `nobody` in a
//! temp dir, on a free loopback port, with every statement logged (so tests can prove what did
//! and did not reach the server). Stopped when dropped. Needs root (for `runuser`), as CI has.

use crate::process::free_port;
use std::path::PathBuf;
use std::process::{Command, Output};

pub const SUPERUSER_PW: &str = "pg-super-secret";

pub struct Pg {
    pub dir: tempfile::TempDir,
    pub port: u16,
    bin: PathBuf,
}

fn pg_bin() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("bin"))
        .collect();
    dirs.sort();
    dirs.pop().filter(|d| d.join("initdb").exists())
}

fn check(what: &str, o: Output) -> Output {
    assert!(
        o.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

impl Pg {
    /// Starts PostgreSQL; `None` (outside CI) when it is not installed or we are not root.
    pub fn start() -> Option<Pg> {
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let Some(bin) = pg_bin().filter(|_| root) else {
            assert!(
                std::env::var_os("CI").is_none(),
                "PostgreSQL tests need the postgresql package and root"
            );
            eprintln!("skipped: PostgreSQL is not installed, or not root");
            return None;
        };
        let dir = tempfile::Builder::new()
            .prefix("pwsync-pg")
            .tempdir()
            .expect("temp dir");
        let d = dir.path().to_path_buf();
        std::fs::write(d.join("pw"), SUPERUSER_PW).expect("pwfile");
        for p in [d.clone(), d.join("pw")] {
            let c = std::ffi::CString::new(p.display().to_string()).expect("path");
            // SAFETY: chown of paths this test created, to nobody (65534).
            assert_eq!(
                unsafe { libc::chown(c.as_ptr(), 65534, 65534) },
                0,
                "chown {}",
                p.display()
            );
        }
        check(
            "initdb",
            Command::new("runuser")
                .args(["-u", "nobody", "--"])
                .arg(bin.join("initdb"))
                .args([
                    "-D",
                    &d.join("data").display().to_string(),
                    "-A",
                    "scram-sha-256",
                    &format!("--pwfile={}", d.join("pw").display()),
                    "-U",
                    "postgres",
                ])
                .output()
                .expect("initdb"),
        );
        let port = free_port();
        check(
            "pg_ctl start",
            Command::new("runuser")
                .args(["-u", "nobody", "--"])
                .arg(bin.join("pg_ctl"))
                .args([
                    "-D",
                    &d.join("data").display().to_string(),
                    "-o",
                    &format!(
                        "-c listen_addresses=127.0.0.1 -p {port} -k {} -c log_statement=all",
                        d.display()
                    ),
                    "-l",
                    &d.join("pg.log").display().to_string(),
                    "-w",
                    "start",
                ])
                .output()
                .expect("pg_ctl"),
        );
        Some(Pg { dir, port, bin })
    }

    /// Runs SQL as the superuser.
    pub fn sql(&self, sql: &str) -> String {
        let o = check(
            sql,
            Command::new("psql")
                .env("PGPASSWORD", SUPERUSER_PW)
                .args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &self.port.to_string(),
                    "-U",
                    "postgres",
                    "-d",
                    "postgres",
                    "-v",
                    "ON_ERROR_STOP=1",
                    "-tA",
                    "-c",
                    sql,
                ])
                .output()
                .expect("psql"),
        );
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    }

    /// Runs a file of SQL statements as the superuser, in one session.
    pub fn sql_file(&self, file: &std::path::Path) {
        check(
            "psql -f",
            Command::new("psql")
                .env("PGPASSWORD", SUPERUSER_PW)
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
                .args([
                    "-U",
                    "postgres",
                    "-d",
                    "postgres",
                    "-q",
                    "-v",
                    "ON_ERROR_STOP=1",
                ])
                .arg("-f")
                .arg(file)
                .output()
                .expect("psql"),
        );
    }

    /// Whether `user` can log in with `password`, as a user would check.
    pub fn logs_in(&self, user: &str, password: &str) -> bool {
        self.logs_in_with_bytes(user, password.as_bytes())
    }

    /// [`Pg::logs_in`] with a password of any bytes (but NUL, which no login can carry).
    pub fn logs_in_with_bytes(&self, user: &str, password: &[u8]) -> bool {
        use std::os::unix::ffi::OsStrExt;
        Command::new("psql")
            .env("PGPASSWORD", std::ffi::OsStr::from_bytes(password))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                user,
                "-d",
                "postgres",
                "-c",
                "select 1",
            ])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    }

    /// The server's log (every statement).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("pg.log")).unwrap_or_default()
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        let _ = Command::new("runuser")
            .args(["-u", "nobody", "--"])
            .arg(self.bin.join("pg_ctl"))
            .args([
                "-D",
                &self.dir.path().join("data").display().to_string(),
                "-m",
                "immediate",
                "stop",
            ])
            .output();
    }
}
