//! A real OpenLDAP `slapd` for tests: its own config in a temp dir, a free loopback port, the
//! ppolicy overlay (account locking), and a people branch with users. Stopped when dropped.

use crate::process::{free_port, wait_until};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

pub const SUFFIX: &str = "dc=example,dc=org";
pub const ADMIN_DN: &str = "cn=admin,dc=example,dc=org";
pub const ADMIN_PW: &str = "admin-secret";

pub struct Slapd {
    pub dir: tempfile::TempDir,
    pub port: u16,
    /// The `ldaps://` port (the plain port also offers StartTLS).
    pub tls_port: u16,
    pid_file: PathBuf,
}

fn run(cmd: &mut Command) -> std::process::Output {
    cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
}

/// The start of a slapd.conf: the schemas the tests use and the modules of mdb and ppolicy.
pub const PROLOGUE: &str =
    "include /etc/ldap/schema/core.schema\ninclude /etc/ldap/schema/cosine.schema\n\
     include /etc/ldap/schema/nis.schema\ninclude /etc/ldap/schema/inetorgperson.schema\n\
     modulepath /usr/lib/ldap\nmoduleload back_mdb\nmoduleload ppolicy\n";

impl Slapd {
    /// Starts slapd; `None` (outside CI) when it is not installed.
    pub fn start() -> Option<Slapd> {
        Self::start_with("")
    }

    /// [`Slapd::start`] with `db_extra` in the database's section, after ppolicy (so an overlay
    /// given there runs before it) and before the access rules (which it can precede).
    pub fn start_with(db_extra: &str) -> Option<Slapd> {
        if !Path::new("/usr/sbin/slapd").exists() {
            assert!(
                std::env::var_os("CI").is_none(),
                "slapd is not installed (scripts/install-deps.sh installs it)"
            );
            eprintln!("skipped: slapd is not installed");
            return None;
        }
        let dir = tempfile::Builder::new()
            .prefix("pwsync-slapd")
            .tempdir()
            .expect("temp dir");
        let d = dir.path().display().to_string();
        std::fs::create_dir_all(dir.path().join("db")).expect("db dir");
        // A CA of the test's own and a certificate for 127.0.0.1, for LDAPS and StartTLS.
        let ca = pwsync_relay::pki::Ca::generate("slapd test CA").expect("CA");
        let server = ca.issue_server(&["127.0.0.1"]).expect("server certificate");
        std::fs::write(dir.path().join("ca.pem"), &ca.cert_pem).expect("ca.pem");
        std::fs::write(dir.path().join("server.pem"), &server.cert_pem).expect("server.pem");
        pwsync_relay::pki::write_private(&dir.path().join("server.key"), &server.key_pem)
            .expect("server.key");
        let conf = dir.path().join("slapd.conf");
        std::fs::write(
            &conf,
            format!(
                "{PROLOGUE}moduleload back_sock\n\
                 pidfile {d}/slapd.pid\nargsfile {d}/slapd.args\nloglevel none\npassword-hash {{SSHA}}\n\
                 TLSCACertificateFile {d}/ca.pem\nTLSCertificateFile {d}/server.pem\nTLSCertificateKeyFile {d}/server.key\n\
                 database mdb\nmaxsize 104857600\nsuffix \"{SUFFIX}\"\nrootdn \"{ADMIN_DN}\"\nrootpw {ADMIN_PW}\n\
                 directory {d}/db\nindex objectClass eq\nindex uid eq\n\
                 overlay ppolicy\nppolicy_default \"cn=default,ou=policies,{SUFFIX}\"\nppolicy_use_lockout\n{db_extra}\n\
                 access to attrs=userPassword by self write by anonymous auth by * none\naccess to * by * read\n"
            ),
        )
        .expect("slapd.conf");
        let t = run(Command::new("slaptest").args(["-f", &conf.display().to_string(), "-u"]));
        assert!(
            t.status.success(),
            "slaptest: {}",
            String::from_utf8_lossy(&t.stderr)
        );
        let me = Slapd {
            pid_file: dir.path().join("slapd.pid"),
            dir,
            port: free_port(),
            tls_port: free_port(),
        };
        let s = run(Command::new("/usr/sbin/slapd").args([
            "-f",
            &conf.display().to_string(),
            "-h",
            &me.listen_urls(),
        ]));
        assert!(
            s.status.success(),
            "slapd: {}",
            String::from_utf8_lossy(&s.stderr)
        );
        wait_until(Duration::from_secs(20), "slapd to answer", || {
            Command::new("ldapsearch")
                .args(["-x", "-H", &me.url(), "-b", "", "-s", "base"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false)
        });
        me.add(&format!(
            "dn: {SUFFIX}\nobjectClass: dcObject\nobjectClass: organization\ndc: example\no: Example\n\n\
             dn: ou=people,{SUFFIX}\nobjectClass: organizationalUnit\nou: people\n\n\
             dn: ou=policies,{SUFFIX}\nobjectClass: organizationalUnit\nou: policies\n\n\
             dn: cn=default,ou=policies,{SUFFIX}\nobjectClass: organizationalRole\nobjectClass: pwdPolicy\n\
             cn: default\npwdAttribute: userPassword\npwdLockout: TRUE\n"
        ));
        Some(me)
    }

    /// The CPU time slapd has used so far (user and system), in seconds, from `/proc`.
    pub fn cpu_secs(&self) -> f64 {
        let pid = std::fs::read_to_string(&self.pid_file).unwrap_or_default();
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", pid.trim())).unwrap_or_default();
        // Fields after the command name (which may hold spaces): utime and stime are 14 and 15.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let ticks: u64 = rest
            .split_whitespace()
            .skip(11)
            .take(2)
            .filter_map(|f| f.parse::<u64>().ok())
            .sum();
        // SAFETY: sysconf reads a constant of the system.
        let per_sec = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        ticks as f64 / per_sec
    }

    /// Stops slapd (SIGTERM, waits for it to exit).
    pub fn stop(&self) {
        if let Some(pid) = std::fs::read_to_string(&self.pid_file)
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok())
        {
            // SAFETY: signalling the slapd this test started, by its pid file.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            assert!(wait_or_kill(pid), "slapd did not stop on SIGTERM");
        }
    }

    /// Kills slapd with SIGKILL (no chance to finish anything) and waits for it to be gone.
    pub fn kill9(&self) {
        if let Some(pid) = std::fs::read_to_string(&self.pid_file)
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok())
        {
            // SAFETY: signalling the slapd this test started, by its pid file.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            assert!(wait_or_kill(pid), "slapd did not die on SIGKILL");
            let _ = std::fs::remove_file(&self.pid_file);
        }
    }

    /// Starts the stopped slapd again, same config, same port, same data.
    pub fn restart(&self) {
        let conf = self.dir.path().join("slapd.conf");
        let s = run(Command::new("/usr/sbin/slapd").args([
            "-f",
            &conf.display().to_string(),
            "-h",
            &self.listen_urls(),
        ]));
        assert!(
            s.status.success(),
            "slapd: {}",
            String::from_utf8_lossy(&s.stderr)
        );
        wait_until(Duration::from_secs(20), "slapd to answer again", || {
            Command::new("ldapsearch")
                .args(["-x", "-H", &self.url(), "-b", "", "-s", "base"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false)
        });
    }

    pub fn url(&self) -> String {
        format!("ldap://127.0.0.1:{}/", self.port)
    }

    /// A consumer's `[targets.NAME]` section for this directory: bound as its administrator
    /// (the password written to `password_file`, 0600), `{SSHA}` computed by pwsync, entries
    /// under `ou=people` by template.
    pub fn target_section(&self, name: &str, password_file: &std::path::Path) -> String {
        crate::secret_file(password_file, ADMIN_PW);
        format!(
            "[targets.{name}]\ntype = \"ldap\"\nsystem = \"ldap\"\nurl = \"{}\"\nbind_dn = \"{ADMIN_DN}\"\nbind_password_file = \"{}\"\npassword_mode = \"ssha\"\ndn_template = \"uid={{user}},ou=people,{SUFFIX}\"\n",
            self.url(),
            password_file.display()
        )
    }

    pub fn ldaps_url(&self) -> String {
        format!("ldaps://127.0.0.1:{}/", self.tls_port)
    }

    fn listen_urls(&self) -> String {
        format!("{} {}", self.url(), self.ldaps_url())
    }

    /// The CA (PEM) that signed the server's certificate.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// ldapadd as the admin.
    pub fn add(&self, ldif: &str) {
        self.admin_tool("ldapadd", ldif)
    }

    /// ldapmodify as the admin, one connection for the whole LDIF.
    pub fn modify(&self, ldif: &str) {
        self.admin_tool("ldapmodify", ldif)
    }

    fn admin_tool(&self, tool: &str, ldif: &str) {
        let mut child = Command::new(tool)
            .args(["-x", "-H", &self.url(), "-D", ADMIN_DN, "-w", ADMIN_PW])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{tool}: {e}"));
        std::io::Write::write_all(&mut child.stdin.take().expect("stdin"), ldif.as_bytes())
            .expect("ldif");
        let out = child.wait_with_output().expect(tool);
        assert!(
            out.status.success(),
            "{tool}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A person `uid=NAME,ou=people,...` with an initial password.
    pub fn add_user(&self, uid: &str, password: &str) {
        self.add(&format!(
            "dn: uid={uid},ou=people,{SUFFIX}\nobjectClass: inetOrgPerson\nuid: {uid}\ncn: {uid}\nsn: {uid}\nuserPassword: {password}\n"
        ));
    }

    pub fn user_dn(uid: &str) -> String {
        format!("uid={uid},ou=people,{SUFFIX}")
    }

    /// Whether `uid` can bind with `password` (ldapwhoami, as a user would check).
    pub fn binds(&self, uid: &str, password: &str) -> bool {
        Command::new("ldapwhoami")
            .args([
                "-x",
                "-H",
                &self.url(),
                "-D",
                &Self::user_dn(uid),
                "-w",
                password,
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }

    /// The values of `attr` on `uid`'s entry, read as the admin.
    pub fn attr(&self, uid: &str, attr: &str) -> Vec<String> {
        use base64::Engine;
        let out = run(Command::new("ldapsearch").args([
            "-x",
            "-LLL",
            "-o",
            "ldif-wrap=no",
            "-H",
            &self.url(),
            "-D",
            ADMIN_DN,
            "-w",
            ADMIN_PW,
            "-b",
            &Self::user_dn(uid),
            "-s",
            "base",
            attr,
        ]));
        let prefix = format!("{attr}:");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.strip_prefix(&prefix))
            .map(|v| match v.strip_prefix(':') {
                Some(b64) => base64::engine::general_purpose::STANDARD
                    .decode(b64.trim())
                    .map(|b| String::from_utf8_lossy(&b).into_owned())
                    .unwrap_or_default(),
                None => v.trim().to_string(),
            })
            .collect()
    }
}

impl Drop for Slapd {
    fn drop(&mut self) {
        if let Some(pid) = std::fs::read_to_string(&self.pid_file)
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok())
        {
            // SAFETY: signalling the slapd this test started, by its pid file.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            let _ = wait_or_kill(pid);
        }
    }
}

fn wait_or_kill(pid: i32) -> bool {
    for _ in 0..100 {
        // SAFETY: signal 0 only checks that the process exists.
        if unsafe { libc::kill(pid, 0) } != 0 {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    false
}
