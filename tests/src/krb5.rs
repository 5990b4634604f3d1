//! A throwaway MIT Kerberos realm for tests: `krb5kdc` and `kadmind` on free loopback ports, the
//! database, configs and logs in a temp dir, and a `pwsync/admin` service principal with a
//! keytab and the rights the `kerberos` target needs. Stopped when dropped.
//!
//! Every command gets `KRB5_CONFIG` and `KRB5_KDC_PROFILE` pointing into the temp dir (Debian's
//! packages write /etc/krb5.conf and /etc/krb5kdc/kdc.conf for another realm). Passwords reach
//! the tools on stdin, never in argv.

use crate::process::{free_port, wait_until};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

pub const REALM: &str = "TEST.REALM";
pub const ADMIN: &str = "pwsync/admin";

pub struct Kdc {
    pub dir: tempfile::TempDir,
    pub kdc_port: u16,
    pub kadmin_port: u16,
    pub kpasswd_port: u16,
    kdc: Option<Child>,
    kadmind: Option<Child>,
}

fn installed() -> bool {
    let ok = Path::new("/usr/sbin/krb5kdc").exists() && Path::new("/usr/sbin/kadmind").exists();
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "MIT Kerberos' KDC is not installed (scripts/install-deps.sh installs it)"
        );
        eprintln!("skipped: MIT Kerberos' KDC is not installed");
    }
    ok
}

impl Kdc {
    /// Creates the realm and starts both daemons; `None` (outside CI) when not installed.
    pub fn start() -> Option<Kdc> {
        if !installed() {
            return None;
        }
        let dir = tempfile::Builder::new()
            .prefix("pwsync-krb5")
            .tempdir()
            .expect("temp dir");
        let mut me = Kdc {
            dir,
            kdc_port: free_port(),
            kadmin_port: free_port(),
            kpasswd_port: free_port(),
            kdc: None,
            kadmind: None,
        };
        me.write_configs();
        let out = me.run(
            Command::new("kdb5_util").args([
                "create",
                "-s",
                "-r",
                REALM,
                "-P",
                "pwsync-master-key",
            ]),
            "",
        );
        assert!(out.status.success(), "kdb5_util create: {out:?}");
        me.local(&format!("addprinc -randkey {ADMIN}"), "");
        me.local(
            &format!("ktadd -k {} {ADMIN}", me.admin_keytab().display()),
            "",
        );
        me.start_kdc();
        me.start_kadmind();
        Some(me)
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
    pub fn krb5_conf(&self) -> PathBuf {
        self.path().join("krb5.conf")
    }
    pub fn admin_keytab(&self) -> PathBuf {
        self.path().join("admin.keytab")
    }

    fn write_configs(&self) {
        let d = self.path().display();
        let (kdc, kadm, kpw) = (self.kdc_port, self.kadmin_port, self.kpasswd_port);
        std::fs::write(
            self.path().join("kdc.conf"),
            format!(
                "[kdcdefaults]\n\tkdc_listen = 127.0.0.1:{kdc}\n\tkdc_tcp_listen = 127.0.0.1:{kdc}\n\
                 [realms]\n\t{REALM} = {{\n\t\tdatabase_name = {d}/principal\n\t\tkey_stash_file = {d}/stash\n\
                 \t\tacl_file = {d}/kadm5.acl\n\t\tkdc_listen = 127.0.0.1:{kdc}\n\t\tkdc_tcp_listen = 127.0.0.1:{kdc}\n\
                 \t\tkadmind_listen = 127.0.0.1:{kadm}\n\t\tkpasswd_listen = 127.0.0.1:{kpw}\n\t}}\n\
                 [logging]\n\tkdc = FILE:{d}/kdc.log\n\tadmin_server = FILE:{d}/kadmind.log\n"
            ),
        )
        .expect("kdc.conf");
        std::fs::write(
            self.krb5_conf(),
            format!(
                "[libdefaults]\n\tdefault_realm = {REALM}\n\tdns_lookup_kdc = false\n\tdns_lookup_realm = false\n\trdns = false\n\
                 [realms]\n\t{REALM} = {{\n\t\tkdc = 127.0.0.1:{kdc}\n\t\tadmin_server = 127.0.0.1:{kadm}\n\t\tkpasswd_server = 127.0.0.1:{kpw}\n\t}}\n"
            ),
        )
        .expect("krb5.conf");
        // What the kerberos target needs: change passwords, modify attributes, inquire, delete, list (to read the policies of its principals).
        std::fs::write(
            self.path().join("kadm5.acl"),
            format!("{ADMIN}@{REALM} cmidl\n"),
        )
        .expect("kadm5.acl");
    }

    fn env<'a>(&self, cmd: &'a mut Command) -> &'a mut Command {
        cmd.env("KRB5_CONFIG", self.krb5_conf())
            .env("KRB5_KDC_PROFILE", self.path().join("kdc.conf"))
            .env(
                "KRB5CCNAME",
                format!(
                    "FILE:{}/cc-{:?}",
                    self.path().display(),
                    std::thread::current().id()
                ),
            )
    }

    /// Runs `cmd` in the realm's environment with `input` on stdin.
    fn run(&self, cmd: &mut Command, input: &str) -> Output {
        let mut child = self
            .env(cmd)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
        // A refusal may come before the tool reads its input: a closed pipe is an answer.
        let _ = child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes());
        child.wait_with_output().expect("output")
    }

    /// `kadmin.local -q QUERY` on the realm's database, `input` on stdin; panics on failure.
    pub fn local(&self, query: &str, input: &str) -> Output {
        let out = self.run(
            Command::new("kadmin.local").args(["-r", REALM, "-q", query]),
            input,
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && !err.contains("kadmin.local:") && !err.contains("while "),
            "kadmin.local -q {query:?}: {out:?}"
        );
        out
    }

    /// Creates principal `name` (in this realm) with `password` (typed on stdin).
    pub fn add_principal(&self, name: &str, password: &str) {
        self.local(
            &format!("addprinc {}", quote(name)),
            &format!("{password}\n{password}\n"),
        );
    }

    /// The principal's attributes as `getprinc` prints them (`Attributes: …`).
    pub fn attributes(&self, name: &str) -> String {
        let out = self.local(&format!("getprinc {}", quote(name)), "");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| l.strip_prefix("Attributes:"))
            .map(|a| a.trim().to_string())
            .unwrap_or_default()
    }

    /// A `[targets.NAME]` section (without the header) for a `kerberos` target on this realm,
    /// logging in as [`ADMIN`] with the fixture's keytab.
    pub fn target_section(&self) -> String {
        format!(
            "type = \"kerberos\"\nsystem = \"kerberos\"\nrealm = \"{REALM}\"\nprincipal = \"{ADMIN}@{REALM}\"\nkeytab = {:?}\n",
            self.admin_keytab()
        )
    }

    /// Whether principal `name` exists.
    pub fn exists(&self, name: &str) -> bool {
        let out = self.run(
            Command::new("kadmin.local").args([
                "-r",
                REALM,
                "-q",
                &format!("getprinc {}", quote(name)),
            ]),
            "",
        );
        !String::from_utf8_lossy(&out.stderr).contains("Principal does not exist")
    }

    /// `kinit NAME` with `password` on stdin: whether the KDC gave a ticket.
    pub fn kinit(&self, name: &str, password: &[u8]) -> bool {
        let mut input = password.to_vec();
        input.push(b'\n');
        let mut child = self
            .env(Command::new("kinit").arg(format!("{name}@{REALM}")))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("kinit");
        let _ = child.stdin.take().expect("stdin").write_all(&input);
        child.wait().map(|s| s.success()).unwrap_or(false)
    }

    fn daemon(&self, program: &str, args: &[&str], port: u16) -> Child {
        let log = std::fs::File::create(self.path().join(format!("{program}.out"))).expect("log");
        let child = self
            .env(Command::new(program).args(args))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("{program}: {e}"));
        wait_until(
            Duration::from_secs(20),
            &format!("{program} to listen"),
            || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
        );
        child
    }

    fn start_kdc(&mut self) {
        let pid = self.path().join("kdc.pid").display().to_string();
        self.kdc = Some(self.daemon("krb5kdc", &["-n", "-r", REALM, "-P", &pid], self.kdc_port));
    }

    /// Starts kadmind (again).
    pub fn start_kadmind(&mut self) {
        let pid = self.path().join("kadmind.pid").display().to_string();
        self.kadmind = Some(self.daemon(
            "kadmind",
            &["-nofork", "-r", REALM, "-P", &pid],
            self.kadmin_port,
        ));
    }

    /// Stops kadmind (SIGTERM) and waits for it.
    pub fn stop_kadmind(&mut self) {
        stop(self.kadmind.take());
    }
}

/// A principal name as one word of a kadmin query (ss quoting: `""` is a quote inside quotes).
fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn stop(child: Option<Child>) {
    if let Some(mut c) = child {
        // SAFETY: signalling a daemon this fixture started.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let _ = c.wait();
    }
}

impl Drop for Kdc {
    fn drop(&mut self) {
        stop(self.kadmind.take());
        stop(self.kdc.take());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_throwaway_realm_takes_the_password_and_no_other() {
        let Some(mut kdc) = Kdc::start() else { return };
        kdc.add_principal("quote\"d name", "Realm-Pw-1");
        assert!(kdc.exists("quote\"d name"));
        assert!(!kdc.exists("nobody"));
        assert!(kdc.kinit("quote\"d name", b"Realm-Pw-1"));
        assert!(!kdc.kinit("quote\"d name", b"Realm-Pw-2"));
        assert!(kdc.attributes("quote\"d name").is_empty());
        // kadmind stops and starts again on its port.
        kdc.stop_kadmind();
        kdc.start_kadmind();
        assert!(kdc.admin_keytab().exists());
    }
}
