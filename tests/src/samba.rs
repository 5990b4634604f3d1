//! A throwaway Samba AD domain controller for tests, in a network namespace of its own.
//!
//! A DC's ports (88, 389, 464, 636) are fixed, so it cannot share the machine's loopback: a
//! keeper thread unshares a network namespace, and the DC is provisioned and started there.
//! A test thread joins that namespace with [`SambaDc::enter`]; everything it starts afterwards
//! (slapd, the pwsync daemons, `ldapsearch`, `kinit`) runs there too, on that namespace's
//! loopback. Samba is the keeper thread's child with a parent-death signal, so it goes when the
//! fixture is dropped or the test process ends, and the namespace with it.
//!
//! The DC holds passwords for the hook of `samba-tool user syncpasswords` encrypted to a GPG key
//! of the fixture's (`password hash gpg key ids`), serves LDAPS with a certificate for
//! 127.0.0.1 signed by a CA of the fixture's (`ca.pem`), and forgets an old password at once
//! (`old password allowed period = 0`), so that a test can prove the old one is refused.

use crate::process::wait_until;
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

pub const REALM: &str = "SAMDOM.TEST";
pub const BASE_DN: &str = "DC=samdom,DC=test";
pub const USERS_DN: &str = "CN=Users,DC=samdom,DC=test";
pub const ADMIN_DN: &str = "CN=Administrator,CN=Users,DC=samdom,DC=test";
pub const ADMIN_PW: &str = "Adm1n-Pass!x";
pub const LDAPS_URL: &str = "ldaps://127.0.0.1";

type SpawnRequest = (Command, mpsc::Sender<std::io::Result<Child>>);

pub struct SambaDc {
    pub dir: tempfile::TempDir,
    netns: std::fs::File,
    keeper: Option<mpsc::Sender<SpawnRequest>>,
    samba: Option<Child>,
}

/// Whether Samba's DC is installed; outside CI its absence skips (in CI it fails).
pub fn installed() -> bool {
    let ok = Path::new("/usr/bin/samba-tool").exists() && Path::new("/usr/sbin/samba").exists();
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "Samba's AD DC is not installed (scripts/install-deps.sh installs it)"
        );
        eprintln!("skipped: Samba's AD DC is not installed");
    }
    ok
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Hex-escapes every byte of a DN value but letters and digits (RFC 4514 allows it for any).
pub fn dn_value(v: &str) -> String {
    v.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("\\{b:02x}")
            }
        })
        .collect()
}

fn b64(v: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(v)
}

/// The `unicodePwd` value of `password`, base64 for LDIF.
pub fn unicode_pwd_b64(password: &str) -> String {
    let mut raw = vec![];
    for u in format!("\"{password}\"").encode_utf16() {
        raw.extend_from_slice(&u.to_le_bytes());
    }
    b64(&raw)
}

impl SambaDc {
    /// Provisions and starts a DC (about ten seconds); `None` (outside CI) when Samba is not
    /// installed.
    pub fn start() -> Option<SambaDc> {
        if !installed() {
            return None;
        }
        let dir = tempfile::Builder::new()
            .prefix("pwsync-samba")
            .tempdir()
            .expect("temp dir");
        let (netns, keeper) = keeper();
        let mut me = SambaDc {
            dir,
            netns,
            keeper: Some(keeper),
            samba: None,
        };
        me.enter();
        me.provision();
        me.start_samba();
        Some(me)
    }

    /// Moves the calling thread into the DC's network namespace: what it connects to and starts
    /// from now on is there.
    pub fn enter(&self) {
        use std::os::fd::AsRawFd;
        // SAFETY: setns on a namespace file descriptor this fixture holds open; it changes only
        // the calling thread's network namespace.
        let r = unsafe { libc::setns(self.netns.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(
            r,
            0,
            "setns into the DC's namespace: {}",
            std::io::Error::last_os_error()
        );
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
    pub fn smb_conf(&self) -> PathBuf {
        self.path().join("etc/smb.conf")
    }
    pub fn gnupg(&self) -> PathBuf {
        self.path().join("gnupg")
    }
    pub fn ca_file(&self) -> PathBuf {
        self.path().join("ca.pem")
    }
    pub fn krb5_conf(&self) -> PathBuf {
        self.path().join("krb5.conf")
    }

    fn provision(&self) {
        let d = self.path().display().to_string();
        std::fs::create_dir_all(self.path().join("run")).expect("run dir");
        let opt = |o: &str| format!("--option={o}");
        run(Command::new("samba-tool").args([
            "domain",
            "provision",
            &format!("--targetdir={d}"),
            &format!("--realm={REALM}"),
            "--domain=SAMDOM",
            "--server-role=dc",
            "--dns-backend=NONE",
            "--use-rfc2307",
            &format!("--adminpass={ADMIN_PW}"),
            "--host-name=dc1",
            "--host-ip=127.0.0.1",
            &opt("interfaces=lo"),
            &opt("bind interfaces only=yes"),
            &opt("server services=ldap, kdc"),
            &opt(&format!("pid directory={d}/run")),
            &opt(&format!("ncalrpc dir={d}/run/ncalrpc")),
            &opt(&format!("winbindd socket directory={d}/run/winbindd")),
            &opt(&format!("ntp signd socket directory={d}/run/ntp_signd")),
            &opt(&format!("log file={d}/log.%m")),
        ]));
        // LDAPS with a certificate for 127.0.0.1 (Samba's own has no subjectAltName).
        let ca = pwsync_relay::pki::Ca::generate("samba test CA").expect("CA");
        let server = ca
            .issue_server(&["127.0.0.1", "dc1.samdom.test"])
            .expect("server certificate");
        std::fs::write(self.ca_file(), &ca.cert_pem).expect("ca.pem");
        std::fs::write(self.path().join("server.pem"), &server.cert_pem).expect("server.pem");
        pwsync_relay::pki::write_private(&self.path().join("server.key"), &server.key_pem)
            .expect("server.key");
        // A GPG key without a passphrase, so the DC keeps a recoverable copy of each password.
        std::fs::create_dir_all(self.gnupg()).expect("gnupg");
        std::fs::set_permissions(
            self.gnupg(),
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .expect("chmod gnupg");
        run(Command::new("gpg").env("GNUPGHOME", self.gnupg()).args([
            "--batch",
            "--pinentry-mode",
            "loopback",
            "--passphrase",
            "",
            "--quick-gen-key",
            "Samba Test <samba@test>",
            "default",
            "default",
            "never",
        ]));
        let keys = run(Command::new("gpg")
            .env("GNUPGHOME", self.gnupg())
            .args(["--list-keys", "--with-colons"]));
        let fingerprint = String::from_utf8_lossy(&keys.stdout)
            .lines()
            .find(|l| l.starts_with("fpr:"))
            .and_then(|l| l.split(':').nth(9).map(str::to_string))
            .expect("the new key's fingerprint");
        // Key generation started a gpg-agent; samba needs only the public key (the sync's
        // decryption starts one again, stopped when the fixture is dropped).
        let _ = Command::new("gpgconf")
            .args(["--kill", "gpg-agent"])
            .env("GNUPGHOME", self.gnupg())
            .status();
        let conf = std::fs::read_to_string(self.smb_conf()).expect("smb.conf");
        let conf = conf.replacen(
            "[global]\n",
            &format!(
                "[global]\n\tpassword hash gpg key ids = {fingerprint}\n\told password allowed period = 0\n\
                 \ttls enabled = yes\n\ttls keyfile = {d}/server.key\n\ttls certfile = {d}/server.pem\n\
                 \ttls cafile = {d}/ca.pem\n"
            ),
            1,
        );
        std::fs::write(self.smb_conf(), conf).expect("smb.conf");
        std::fs::write(
            self.krb5_conf(),
            format!(
                "[libdefaults]\n\tdefault_realm = {REALM}\n\tdns_lookup_kdc = false\n\tdns_lookup_realm = false\n\trdns = false\n\
                 [realms]\n\t{REALM} = {{\n\t\tkdc = 127.0.0.1\n\t\tkpasswd_server = 127.0.0.1\n\t}}\n"
            ),
        )
        .expect("krb5.conf");
        self.tool(&[
            "domain",
            "passwordsettings",
            "set",
            "--complexity=off",
            "--history-length=0",
            "--min-pwd-age=0",
            "--max-pwd-age=0",
        ]);
    }

    /// Starts samba (single process, LDAP and KDC only) and waits for LDAPS to answer.
    pub fn start_samba(&mut self) {
        let mut cmd = Command::new("samba");
        cmd.args(["-i", "-M", "single", "-s"])
            .arg(self.smb_conf())
            .env("GNUPGHOME", self.gnupg())
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(self.path().join("samba.out")).expect("samba.out"))
            .stderr(Stdio::null());
        let (tx, rx) = mpsc::channel();
        self.keeper
            .as_ref()
            .expect("keeper")
            .send((cmd, tx))
            .expect("keeper thread");
        self.samba = Some(rx.recv().expect("keeper thread").expect("starting samba"));
        wait_until(Duration::from_secs(30), "Samba's LDAPS to answer", || {
            self.binds_dn(ADMIN_DN, ADMIN_PW.as_bytes())
        });
    }

    /// Stops samba (SIGTERM) and waits for it.
    pub fn stop_samba(&mut self) {
        if let Some(mut child) = self.samba.take() {
            // SAFETY: signalling the samba process this fixture started.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let _ = child.wait();
        }
    }

    /// `samba-tool ARGS` on the DC's own database (`-H ldb://…/sam.ldb -s smb.conf`).
    pub fn tool(&self, args: &[&str]) -> Output {
        run(Command::new("samba-tool")
            .args(args)
            .arg("-H")
            .arg(format!("ldb://{}/private/sam.ldb", self.path().display()))
            .arg("-s")
            .arg(self.smb_conf())
            .env("GNUPGHOME", self.gnupg()))
    }

    /// An LDAP tool (`ldapadd`, `ldapmodify`, `ldapsearch`) against the DC's LDAPS, bound as
    /// `dn` with `password` (from a file, so no password is in argv), LDIF on stdin.
    pub fn ldap_tool(
        &self,
        tool: &str,
        dn: &str,
        password: &[u8],
        args: &[&str],
        ldif: &str,
    ) -> Output {
        let pw = self.path().join(format!(
            "bind-{}-{:?}.pw",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::write(&pw, password).expect("password file");
        let mut child = Command::new(tool)
            .args(["-x", "-H", LDAPS_URL, "-D", dn, "-y"])
            .arg(&pw)
            .args(args)
            .env("LDAPTLS_CACERT", self.ca_file())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{tool}: {e}"));
        // A refusal may come before the tool reads its input: a closed pipe is an answer.
        let _ = child
            .stdin
            .take()
            .expect("stdin")
            .write_all(ldif.as_bytes());
        let out = child.wait_with_output().expect(tool);
        let _ = std::fs::remove_file(&pw);
        out
    }

    /// Whether `dn` binds over LDAPS with `password` (and a base-scope search answers: Samba
    /// has no "who am I").
    pub fn binds_dn(&self, dn: &str, password: &[u8]) -> bool {
        self.ldap_tool(
            "ldapsearch",
            dn,
            password,
            &["-b", "", "-s", "base", "dn"],
            "",
        )
        .status
        .success()
    }

    /// The DN of user `name` created by [`SambaDc::create_user`].
    pub fn user_dn(name: &str) -> String {
        format!("CN={},{USERS_DN}", dn_value(name))
    }

    /// Whether user `name` binds with `password`.
    pub fn binds(&self, name: &str, password: &[u8]) -> bool {
        self.binds_dn(&Self::user_dn(name), password)
    }

    /// Creates an enabled user `name` with `password`, as an administrator would over LDAPS.
    pub fn create_user(&self, name: &str, password: &str) {
        let ldif = format!(
            "dn:: {}\nobjectClass: user\nsAMAccountName:: {}\nunicodePwd:: {}\nuserAccountControl: 512\n",
            b64(Self::user_dn(name).as_bytes()),
            b64(name.as_bytes()),
            unicode_pwd_b64(password)
        );
        let out = self.ldap_tool("ldapadd", ADMIN_DN, ADMIN_PW.as_bytes(), &[], &ldif);
        assert!(
            out.status.success(),
            "creating AD user {name:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The user's own password change over LDAP (delete the old value, add the new: the form
    /// that enforces the domain's policy and history).
    pub fn user_changes_password(&self, name: &str, old: &str, new: &str) -> Output {
        let dn = Self::user_dn(name);
        let ldif = format!(
            "dn:: {}\nchangetype: modify\ndelete: unicodePwd\nunicodePwd:: {}\n-\nadd: unicodePwd\nunicodePwd:: {}\n-\n",
            b64(dn.as_bytes()),
            unicode_pwd_b64(old),
            unicode_pwd_b64(new)
        );
        self.ldap_tool("ldapmodify", &dn, old.as_bytes(), &[], &ldif)
    }

    /// `userAccountControl` of user `name`.
    pub fn account_control(&self, name: &str) -> u32 {
        let out = self.ldap_tool(
            "ldapsearch",
            ADMIN_DN,
            ADMIN_PW.as_bytes(),
            &[
                "-LLL",
                "-b",
                &Self::user_dn(name),
                "-s",
                "base",
                "userAccountControl",
            ],
            "",
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| l.strip_prefix("userAccountControl: "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("userAccountControl of {name:?}: {out:?}"))
    }

    /// `kinit NAME` against the DC's KDC with `password` on stdin: whether it got a ticket.
    pub fn kinit(&self, name: &str, password: &str) -> bool {
        let mut child = Command::new("kinit")
            .arg(name)
            .env("KRB5_CONFIG", self.krb5_conf())
            .env(
                "KRB5CCNAME",
                format!("FILE:{}/cc-{}", self.path().display(), std::process::id()),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("kinit");
        let _ = child
            .stdin
            .take()
            .expect("stdin")
            .write_all(format!("{password}\n").as_bytes());
        child.wait().map(|s| s.success()).unwrap_or(false)
    }
}

impl Drop for SambaDc {
    fn drop(&mut self) {
        self.stop_samba();
        // The keeper thread ends when its channel closes, and the namespace with it.
        self.keeper.take();
        let _ = Command::new("gpgconf")
            .args(["--kill", "gpg-agent"])
            .env("GNUPGHOME", self.gnupg())
            .status();
    }
}

/// Starts the keeper thread: it unshares a network namespace, brings its loopback up, hands
/// back the namespace's file, then spawns what it is sent with a parent-death signal, until its
/// channel closes.
fn keeper() -> (std::fs::File, mpsc::Sender<SpawnRequest>) {
    let (ns_tx, ns_rx) = mpsc::channel::<Result<std::fs::File, String>>();
    let (tx, rx) = mpsc::channel::<SpawnRequest>();
    std::thread::spawn(move || {
        // SAFETY: unshare changes only this thread's network namespace.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            let _ = ns_tx.send(Err(format!(
                "unshare(CLONE_NEWNET): {} (the Samba tests need root)",
                std::io::Error::last_os_error()
            )));
            return;
        }
        let up = Command::new("ip")
            .args(["link", "set", "lo", "up"])
            .status();
        if !matches!(up, Ok(s) if s.success()) {
            let _ = ns_tx.send(Err(format!("ip link set lo up: {up:?}")));
            return;
        }
        let _ = ns_tx.send(
            std::fs::File::open("/proc/thread-self/ns/net")
                .map_err(|e| format!("the namespace file: {e}")),
        );
        for (mut cmd, reply) in rx {
            // SAFETY: prctl is async-signal-safe; the child gets SIGTERM when this thread ends.
            unsafe {
                cmd.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                    Ok(())
                });
            }
            let _ = reply.send(cmd.spawn());
        }
    });
    let ns = ns_rx
        .recv()
        .expect("keeper thread")
        .unwrap_or_else(|e| panic!("{e}"));
    (ns, tx)
}
