//! The target conformance suite: every target, against its real server, takes the same hard
//! account names and passwords, and for each either the real system's own login (`htpasswd -v`,
//! an LDAP bind, a PostgreSQL connection, an application's hash check) accepts the new password
//! for exactly that account, refuses the old one, and no other account changed; or the change is
//! refused with a reason that names the limit (a dead letter), and nothing changed at all.
//!
//! Changes go through `Configured::apply`, the one path by which the consumer's pipeline reaches
//! a target (limits and protected accounts first). A target added later joins by one line in
//! [`all_targets`].

use proptest::prelude::*;
use pwsync_consumer::targets::{self, Configured, Outcome};
use pwsync_proto::{Change, Op, Secret};
use pwsync_tests::exec_store;
use pwsync_tests::krb5::Kdc;
use pwsync_tests::pg::{Pg, SUPERUSER_PW};
use pwsync_tests::samba::SambaDc;
use pwsync_tests::slapd::{Slapd, ADMIN_DN, ADMIN_PW, SUFFIX};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};

/// One target under test, with the real system's own ways to make and to check an account.
trait System: Send + Sync {
    fn name(&self) -> &str;
    fn target(&self) -> &Configured;
    /// Creates `account` with `password`, as the system's administrator would.
    fn create(&self, account: &str, password: &str);
    /// The system's own login: whether `account` gets in with `password`.
    fn logs_in(&self, account: &str, password: &[u8]) -> bool;
    /// Sets `account`'s password directly, as an administrator would beside pwsync (for the
    /// audit: a change made outside pwsync).
    fn set_outside(&self, account: &str, password: &str);
}

struct Servers {
    /// The Samba AD DC, in a network namespace of its own: every thread that uses the servers
    /// joins it, and slapd and PostgreSQL are started there too.
    dc: Option<SambaDc>,
    kdc: Option<Kdc>,
    slapd: Slapd,
    pg: Pg,
    dir: tempfile::TempDir,
}

/// One Samba DC, one slapd and one PostgreSQL for the whole suite (the slow fixtures, started
/// once); the calling thread is moved into their network namespace.
fn servers() -> Option<&'static Servers> {
    static S: OnceLock<Option<Servers>> = OnceLock::new();
    let s = S
        .get_or_init(|| {
            let dc = SambaDc::start();
            let kdc = Kdc::start();
            if let Some(kdc) = &kdc {
                // libkadm5 finds the realm's KDC through KRB5_CONFIG, read when a kadm5
                // connection is made: set here, before any target connects.
                std::env::set_var("KRB5_CONFIG", kdc.krb5_conf());
            }
            let slapd = Slapd::start()?;
            let pg = Pg::start()?;
            let dir = tempfile::tempdir().expect("temp dir");
            Some(Servers {
                dc,
                kdc,
                slapd,
                pg,
                dir,
            })
        })
        .as_ref()?;
    if let Some(dc) = &s.dc {
        dc.enter();
    }
    Some(s)
}

fn private_file(path: &Path, text: &str) {
    std::fs::write(path, text).expect("write");
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("chmod");
}

fn build(dir: &Path, name: &str, section: &str) -> Configured {
    let table: toml::Table = toml::from_str(section).expect("section");
    targets::build(name, table, &dir.join("consumer.toml")).expect("target builds")
}

// ---- htpasswd ------------------------------------------------------------------------------

struct Htpasswd {
    t: Configured,
    file: PathBuf,
}

impl System for Htpasswd {
    fn name(&self) -> &str {
        "htpasswd"
    }
    fn target(&self) -> &Configured {
        &self.t
    }
    fn create(&self, account: &str, password: &str) {
        let hash = bcrypt::hash(password, 4).expect("bcrypt");
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&self.file)
            .expect("htpasswd file");
        writeln!(f, "{account}:{hash}").expect("line");
    }
    fn set_outside(&self, account: &str, password: &str) {
        let ok = Command::new("htpasswd")
            .args(["-b", "-B", "-C", "4"])
            .arg(&self.file)
            .args([account, password])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "htpasswd -b {account:?}");
    }
    fn logs_in(&self, account: &str, password: &[u8]) -> bool {
        use std::os::unix::ffi::OsStrExt;
        Command::new("htpasswd")
            .arg("-vb")
            .arg(&self.file)
            .arg(account)
            .arg(std::ffi::OsStr::from_bytes(password))
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    }
}

// ---- LDAP ----------------------------------------------------------------------------------

struct Ldap {
    label: String,
    t: Configured,
    url: String,
    dir: PathBuf,
}

/// A DN value escaped independently of the code under test: every character but letters and
/// digits as `\XX` hex pairs of its UTF-8 (RFC 4514 allows a hex pair for any character).
fn hex_dn_value(v: &str) -> String {
    let mut out = String::new();
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() {
            out.push(b as char);
        } else {
            out.push_str(&format!("\\{b:02x}"));
        }
    }
    out
}

fn b64(v: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(v)
}

fn ldap_dn(account: &str) -> String {
    format!("uid={},ou=people,{SUFFIX}", hex_dn_value(account))
}

impl System for Ldap {
    fn name(&self) -> &str {
        &self.label
    }
    fn target(&self) -> &Configured {
        &self.t
    }
    fn create(&self, account: &str, password: &str) {
        let ldif = format!(
            "dn:: {}\nobjectClass: inetOrgPerson\nuid:: {}\ncn:: {}\nsn: x\nuserPassword:: {}\n",
            b64(ldap_dn(account).as_bytes()),
            b64(account.as_bytes()),
            b64(account.as_bytes()),
            b64(password.as_bytes())
        );
        let mut child = Command::new("ldapadd")
            .args(["-x", "-H", &self.url, "-D", ADMIN_DN, "-w", ADMIN_PW])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("ldapadd");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(ldif.as_bytes())
            .expect("ldif");
        let out = child.wait_with_output().expect("ldapadd");
        assert!(
            out.status.success(),
            "ldapadd {account:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    fn set_outside(&self, account: &str, password: &str) {
        // The Password Modify operation as the directory's administrator (ldappasswd).
        let ok = Command::new("ldappasswd")
            .args([
                "-x", "-H", &self.url, "-D", ADMIN_DN, "-w", ADMIN_PW, "-s", password,
            ])
            .arg(ldap_dn(account))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "ldappasswd {account:?}");
    }
    fn logs_in(&self, account: &str, password: &[u8]) -> bool {
        // The password from a file (-y), so every byte reaches the bind as it is.
        let pw = self.dir.join(format!("bind-{}.pw", std::process::id()));
        std::fs::write(&pw, password).expect("password file");
        let ok = Command::new("ldapwhoami")
            .args(["-x", "-H", &self.url, "-D", &ldap_dn(account), "-y"])
            .arg(&pw)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        let _ = std::fs::remove_file(&pw);
        ok
    }
}

// ---- PostgreSQL ----------------------------------------------------------------------------

fn pg_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn pg_literal(v: &str) -> String {
    format!("'{}'", v.replace('\'', "''"))
}

struct PgRole {
    t: Configured,
}

impl System for PgRole {
    fn name(&self) -> &str {
        "postgres role"
    }
    fn target(&self) -> &Configured {
        &self.t
    }
    fn create(&self, account: &str, password: &str) {
        servers().expect("servers").pg.sql(&format!(
            "CREATE ROLE {} LOGIN PASSWORD {}",
            pg_ident(account),
            pg_literal(password)
        ));
    }
    fn logs_in(&self, account: &str, password: &[u8]) -> bool {
        servers()
            .expect("servers")
            .pg
            .logs_in_with_bytes(account, password)
    }
    fn set_outside(&self, account: &str, password: &str) {
        servers().expect("servers").pg.sql(&format!(
            "ALTER ROLE {} PASSWORD {}",
            pg_ident(account),
            pg_literal(password)
        ));
    }
}

/// An application's own users table; its login is the application's hash check of the row.
struct PgTable {
    label: String,
    t: Configured,
    table: String,
}

impl System for PgTable {
    fn name(&self) -> &str {
        &self.label
    }
    fn target(&self) -> &Configured {
        &self.t
    }
    fn create(&self, account: &str, password: &str) {
        let hash = bcrypt::hash(password, 4).expect("bcrypt");
        servers().expect("servers").pg.sql(&format!(
            "INSERT INTO {} (login, hash) VALUES ({}, {})",
            self.table,
            pg_literal(account),
            pg_literal(&hash)
        ));
    }
    fn set_outside(&self, account: &str, password: &str) {
        let hash = bcrypt::hash(password, 4).expect("bcrypt");
        servers().expect("servers").pg.sql(&format!(
            "UPDATE {} SET hash = {} WHERE login = {}",
            self.table,
            pg_literal(&hash),
            pg_literal(account)
        ));
    }
    fn logs_in(&self, account: &str, password: &[u8]) -> bool {
        let pg = &servers().expect("servers").pg;
        let rows = pg.sql(&format!(
            "SELECT hash FROM {} WHERE login = {} AND NOT locked",
            self.table,
            pg_literal(account)
        ));
        let Some(hash) = rows.lines().next() else {
            return false;
        };
        if hash.starts_with("$argon2") {
            use argon2::password_hash::{PasswordHash, PasswordVerifier};
            PasswordHash::new(hash).is_ok_and(|h| {
                argon2::Argon2::default()
                    .verify_password(password, &h)
                    .is_ok()
            })
        } else {
            bcrypt::verify(password, hash).unwrap_or(false)
        }
    }
}

// ---- exec ----------------------------------------------------------------------------------

/// An application's user store kept by the exec plugin protocol (`pwsync-exec-store`, a program
/// of this crate); its login is the store's own password check.
struct ExecStore {
    t: Configured,
    store: PathBuf,
}

impl System for ExecStore {
    fn name(&self) -> &str {
        "exec"
    }
    fn target(&self) -> &Configured {
        &self.t
    }
    fn create(&self, account: &str, password: &str) {
        assert!(
            exec_store("create", &self.store, account, password.as_bytes()),
            "creating {account:?}"
        );
    }
    fn logs_in(&self, account: &str, password: &[u8]) -> bool {
        exec_store("login", &self.store, account, password)
    }
    fn set_outside(&self, account: &str, password: &str) {
        self.create(account, password);
    }
}

// ---- Active Directory ----------------------------------------------------------------------

/// A Samba AD DC; its login is an LDAPS bind as the user (and a base-scope search).
struct Ad {
    t: Configured,
    dc: &'static SambaDc,
}

impl System for Ad {
    fn name(&self) -> &str {
        "ad"
    }
    fn target(&self) -> &Configured {
        &self.t
    }
    fn create(&self, account: &str, password: &str) {
        self.dc.create_user(account, password);
    }
    fn logs_in(&self, account: &str, password: &[u8]) -> bool {
        self.dc.binds(account, password)
    }
    fn set_outside(&self, account: &str, password: &str) {
        let out = self.dc.tool(&[
            "user",
            "setpassword",
            account,
            &format!("--newpassword={password}"),
        ]);
        assert!(out.status.success(), "samba-tool user setpassword: {out:?}");
    }
}

fn ad(dir: &Path, dc: &'static SambaDc) -> Box<dyn System> {
    private_file(&dir.join("ad.pw"), pwsync_tests::samba::ADMIN_PW);
    let section = format!(
        "type = \"ad\"\nsystem = \"ad\"\nurl = \"{}\"\nca_file = {:?}\nbind_dn = \"{}\"\nbind_password_file = \"ad.pw\"\nsearch_base = \"{}\"\n",
        pwsync_tests::samba::LDAPS_URL,
        dc.ca_file(),
        pwsync_tests::samba::ADMIN_DN,
        pwsync_tests::samba::BASE_DN
    );
    Box::new(Ad {
        t: build(dir, "ad", &section),
        dc,
    })
}

// ---- Kerberos ------------------------------------------------------------------------------

/// A throwaway MIT realm; its login is `kinit` (the password on its stdin).
struct Kerberos {
    t: Configured,
    kdc: &'static Kdc,
}

impl System for Kerberos {
    fn name(&self) -> &str {
        "kerberos"
    }
    fn target(&self) -> &Configured {
        &self.t
    }
    fn create(&self, account: &str, password: &str) {
        self.kdc.add_principal(account, password);
    }
    fn logs_in(&self, account: &str, password: &[u8]) -> bool {
        self.kdc.kinit(account, password)
    }
    fn set_outside(&self, account: &str, password: &str) {
        self.kdc.local(
            &format!("cpw {account}"),
            &format!("{password}\n{password}\n"),
        );
    }
}

fn kerberos(dir: &Path, kdc: &'static Kdc) -> Box<dyn System> {
    Box::new(Kerberos {
        t: build(dir, "kerberos", &kdc.target_section()),
        kdc,
    })
}

fn all_targets(s: &'static Servers) -> Vec<Box<dyn System>> {
    let dir = s.dir.path();
    private_file(&dir.join("ldap.pw"), ADMIN_PW);
    private_file(&dir.join("pg.pw"), SUPERUSER_PW);
    let ldap = |label: &str, mode: &str, locate: &str| -> Box<dyn System> {
        Box::new(Ldap {
            label: label.into(),
            t: build(
                dir,
                label,
                &format!(
                    "type = \"ldap\"\nsystem = \"ldap\"\nurl = \"{}\"\nbind_dn = \"{ADMIN_DN}\"\nbind_password_file = \"ldap.pw\"\npassword_mode = \"{mode}\"\n{locate}\n",
                    s.slapd.url()
                ),
            ),
            url: s.slapd.url(),
            dir: dir.to_path_buf(),
        })
    };
    let template = format!("dn_template = \"uid={{user}},ou=people,{SUFFIX}\"");
    let search = format!("search_base = \"ou=people,{SUFFIX}\"");
    let pg_connect = format!(
        "connect = \"host=127.0.0.1 port={} user=postgres dbname=postgres\"\npassword_file = \"pg.pw\"",
        s.pg.port
    );
    let table = |label: &str, hash: &str| -> Box<dyn System> {
        let name = format!("app_{}", hash);
        s.pg.sql(&format!(
            "CREATE TABLE {name} (login text PRIMARY KEY, hash text NOT NULL, locked boolean NOT NULL DEFAULT false)"
        ));
        Box::new(PgTable {
            label: label.into(),
            t: build(
                dir,
                label,
                &format!(
                    "type = \"postgres\"\nsystem = \"app\"\nmode = \"table\"\nhash = \"{hash}\"\nbcrypt_cost = 4\n{pg_connect}\n\
                     update_sql = \"UPDATE {name} SET hash = $1 WHERE login = $2\"\n\
                     revoke_sql = \"UPDATE {name} SET locked = true WHERE login = $1\"\n\
                     resume_sql = \"UPDATE {name} SET locked = false WHERE login = $1\"\n\
                     audit_sql = \"SELECT hash FROM {name} WHERE login = $1\"\n"
                ),
            ),
            table: name,
        })
    };
    std::fs::write(dir.join("htpasswd"), "").expect("htpasswd");
    let all: Vec<Box<dyn System>> = vec![
        Box::new(Htpasswd {
            t: build(
                dir,
                "htpasswd",
                "type = \"htpasswd\"\nsystem = \"web\"\npath = \"htpasswd\"\ncost = 4\n",
            ),
            file: dir.join("htpasswd"),
        }),
        ldap("ldap exop by template", "exop", &template),
        ldap("ldap ssha by search", "ssha", &search),
        ldap("ldap crypt by template", "crypt", &template),
        Box::new(PgRole {
            t: build(
                dir,
                "postgres role",
                &format!("type = \"postgres\"\nsystem = \"pg\"\nmode = \"role\"\n{pg_connect}\n"),
            ),
        }),
        table("postgres table bcrypt", "bcrypt"),
        table("postgres table argon2id", "argon2id"),
        Box::new(ExecStore {
            t: build(
                dir,
                "exec",
                &format!(
                    "type = \"exec\"\nsystem = \"app\"\ncommand = [{:?}, \"apply\", {:?}]\naudit = true\n",
                    pwsync_tests::bin("pwsync-exec-store"),
                    dir.join("store.json")
                ),
            ),
            store: dir.join("store.json"),
        }),
    ];
    all.into_iter()
        .chain(s.dc.as_ref().map(|dc| ad(dir, dc)))
        .chain(s.kdc.as_ref().map(|kdc| kerberos(dir, kdc)))
        .collect()
}

/// The targets, made once (each case uses fresh account names), and a guard that runs the
/// suite's tests one at a time (the fixtures set up accounts as an administrator would, beside
/// the target, not through it).
type Systems = &'static [Box<dyn System>];

fn systems() -> Option<(Systems, std::sync::MutexGuard<'static, ()>)> {
    static T: OnceLock<Option<Vec<Box<dyn System>>>> = OnceLock::new();
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    let guard = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    // Every test thread joins the servers' namespace, not only the one that started them.
    let servers = servers();
    T.get_or_init(|| servers.map(all_targets))
        .as_ref()
        .map(|t| (t.as_slice(), guard))
}

/// A fresh account-name suffix, so cases never meet on one server.
fn fresh() -> String {
    static N: Mutex<u32> = Mutex::new(0);
    let mut n = N.lock().unwrap_or_else(|p| p.into_inner());
    *n += 1;
    format!("{n}")
}

fn replace(user: &str, password: &[u8]) -> Change {
    Change::new(
        user,
        "elsewhere",
        Op::Replace,
        vec![Secret::new(password.to_vec())],
    )
}

fn op(user: &str, op: Op) -> Change {
    Change::new(user, "elsewhere", op, vec![])
}

/// What one case showed.
#[derive(Debug, PartialEq)]
enum Landed {
    Applied,
    Refused(String),
}

/// Creates `account` (old password) and a bystander, sends a replace for `user` (the account
/// unless a test aims at another spelling), and checks the real logins. Panics on any wrong
/// outcome; returns which of the two right ones it was.
fn case(sys: &dyn System, account: &str, user: &str, new: &[u8]) -> Landed {
    let old = format!("Old-{}-pw", fresh());
    let bystander = format!("bystander{}", fresh());
    sys.create(account, &old);
    sys.create(&bystander, "Bystander-pw-1");
    let outcome = sys.target().apply(&replace(user, new), user);
    let ctx = format!(
        "{}: account {account:?}, change for {user:?}, password {:?}",
        sys.name(),
        String::from_utf8_lossy(new)
    );
    assert!(
        sys.logs_in(&bystander, b"Bystander-pw-1"),
        "{ctx}: the bystander changed"
    );
    match outcome {
        Outcome::Applied => {
            assert!(
                sys.logs_in(user, new),
                "{ctx}: applied, but the new password does not log in"
            );
            if user == account {
                assert!(
                    !sys.logs_in(account, old.as_bytes()),
                    "{ctx}: the old password still logs in"
                );
            } else {
                assert!(
                    sys.logs_in(account, old.as_bytes()),
                    "{ctx}: another account ({account:?}) changed"
                );
            }
            Landed::Applied
        }
        Outcome::Failed(reason) | Outcome::NoSuchUser(reason) => {
            assert!(
                sys.logs_in(account, old.as_bytes()),
                "{ctx}: refused ({reason}), but the account changed"
            );
            Landed::Refused(reason)
        }
        other => panic!("{ctx}: {other:?}"),
    }
}

fn refused(r: &Landed) -> &str {
    match r {
        Landed::Refused(reason) => reason,
        Landed::Applied => "",
    }
}

/// Hard names and passwords every target must set exactly, or refuse by a declared limit.
#[test]
fn hard_names_and_passwords_land_exactly_or_are_refused_by_a_limit() {
    let Some((systems, _one)) = systems() else {
        return;
    };
    let names = [
        "o'brien",
        "back\\slash",
        "tab\there",
        "colon:name",
        "com,ma",
        "plus+sign",
        "eq=ual",
        "#hash",
        "star*",
        "paren(",
        "semi;colon",
        "less<",
        "quote\"d",
        "Zoë",
        "Zoe\u{308}",
        " lead",
        "trail ",
        "in  side",
    ];
    let passwords: [&[u8]; 8] = [
        b"plain-Password-1",
        b"'quote\"double\\back",
        b" spaces at either end ",
        b"tab\tcolon:comma,#hash*(;<",
        "Zoë-NFC-ß-日本".as_bytes(),
        "Zoe\u{308}-NFD-\u{a0}nbsp".as_bytes(),
        b"p\0nul",
        b"\xff\xfe not utf-8",
    ];
    for sys in systems {
        for (i, name) in names.iter().enumerate() {
            let account = format!("{name}{}", fresh());
            // A name with a space at its end keeps it there.
            let account = if name.ends_with(' ') {
                format!("{}{name}", fresh())
            } else {
                account
            };
            let limits = &sys.target().limits;
            let name_ok = targets::limits::check_account(limits, &account).is_ok();
            if !name_ok {
                // Not creatable on this system as the name it is (or creatable and ambiguous):
                // the change must be refused by the name limit before anything happens.
                let r = sys
                    .target()
                    .apply(&replace(&account, b"New-pw-1"), &account);
                assert!(
                    matches!(&r, Outcome::Failed(m) if m.starts_with("refused: account name")),
                    "{}: {account:?}: {r:?}",
                    sys.name()
                );
                continue;
            }
            let pw = passwords[i % passwords.len()];
            let r = case(sys.as_ref(), &account, &account, pw);
            let must_refuse =
                pw.contains(&0) || (limits.password_utf8 && std::str::from_utf8(pw).is_err());
            if must_refuse {
                assert!(
                    refused(&r).starts_with("refused:"),
                    "{}: {account:?} {pw:?}: {r:?}",
                    sys.name()
                );
            } else {
                assert_eq!(r, Landed::Applied, "{}: {account:?}", sys.name());
            }
        }
    }
}

#[test]
fn lengths_at_each_limit_and_one_past() {
    let Some((systems, _one)) = systems() else {
        return;
    };
    for sys in systems {
        let limits = sys.target().limits.clone();
        if limits.max_password_bytes < pwsync_proto::limits::MAX_VALUE_BYTES {
            let at = "a".repeat(limits.max_password_bytes);
            let account = format!("len{}", fresh());
            assert_eq!(
                case(sys.as_ref(), &account, &account, at.as_bytes()),
                Landed::Applied,
                "{}",
                sys.name()
            );
            let past = "a".repeat(limits.max_password_bytes + 1);
            let account = format!("len{}", fresh());
            let r = case(sys.as_ref(), &account, &account, past.as_bytes());
            assert!(
                refused(&r).contains(&format!("reads only {} bytes", limits.max_password_bytes)),
                "{}: {r:?}",
                sys.name()
            );
            // The prefix the scheme would have read logs in to nothing.
            assert!(!sys.logs_in(&account, at.as_bytes()), "{}", sys.name());
        }
        if limits.max_account_bytes < pwsync_proto::limits::MAX_USER_BYTES {
            // The server would cut this name to the one it already has.
            let stem = format!("x{}", fresh());
            let long = format!(
                "{stem}{}",
                "n".repeat(limits.max_account_bytes + 1 - stem.len())
            );
            let cut = &long[..limits.max_account_bytes];
            sys.create(cut, "Cut-pw-1");
            let r = sys.target().apply(&replace(&long, b"New-pw-1"), &long);
            assert!(
                matches!(&r, Outcome::Failed(m) if m.contains(&format!("only {} bytes", limits.max_account_bytes))),
                "{}: {r:?}",
                sys.name()
            );
            assert!(
                sys.logs_in(cut, b"Cut-pw-1"),
                "{}: the account the server would cut to changed",
                sys.name()
            );
            let at = &long[..limits.max_account_bytes];
            assert!(targets::limits::check_account(&limits, at).is_ok());
        }
    }
}

#[test]
fn names_that_differ_only_in_case_or_spaces_never_change_each_other() {
    let Some((systems, _one)) = systems() else {
        return;
    };
    for sys in systems {
        let n = fresh();
        let r = case(
            sys.as_ref(),
            &format!("alice{n}"),
            &format!("Alice{n}"),
            b"Case-pw-1",
        );
        if let Landed::Refused(reason) = &r {
            assert!(!reason.is_empty());
        }
        let n = fresh();
        let r = case(
            sys.as_ref(),
            &format!("lead{n}"),
            &format!(" lead{n}"),
            b"Lead-pw-1",
        );
        if !sys.target().limits.account_edge_spaces {
            assert!(refused(&r).contains("space"), "{}: {r:?}", sys.name());
        }
        let n = fresh();
        let account = format!("two words{n}");
        let r = case(
            sys.as_ref(),
            &account,
            &format!("two  words{n}"),
            b"Space-pw-1",
        );
        assert!(
            matches!(r, Landed::Refused(_) | Landed::Applied),
            "{}",
            sys.name()
        );
    }
}

#[test]
fn protected_accounts_and_the_targets_own_login_are_never_changed() {
    let Some((systems, _one)) = systems() else {
        return;
    };
    for sys in systems {
        let r = sys.target().apply(&replace("root", b"Root-pw-1"), "root");
        assert!(
            matches!(&r, Outcome::Failed(m) if m.contains("protected")),
            "{}: {r:?}",
            sys.name()
        );
    }
    let s = servers().expect("servers");
    // postgres is the role-mode target's own login, and on the default protect list too.
    assert!(s.pg.logs_in("postgres", SUPERUSER_PW));
}

#[test]
fn revoke_locks_and_resume_unlocks_on_every_target() {
    let Some((systems, _one)) = systems() else {
        return;
    };
    for sys in systems {
        let t = sys.target();
        let account = format!("locked{}", fresh());
        sys.create(&account, "Before-pw-1");
        assert_eq!(
            t.apply(&op(&account, Op::Revoke), &account),
            Outcome::Applied,
            "{}",
            sys.name()
        );
        assert!(
            !sys.logs_in(&account, b"Before-pw-1"),
            "{}: revoke",
            sys.name()
        );
        assert_eq!(
            t.apply(&op(&account, Op::Resume), &account),
            Outcome::Applied,
            "{}",
            sys.name()
        );
        assert!(
            sys.logs_in(&account, b"Before-pw-1"),
            "{}: resume",
            sys.name()
        );
    }
}

/// The account audit reads each target's own record of a password (its change time, who made
/// it, the stored hash or a key version) through `Target::observe`: after pwsync's write the
/// account is in step; after a password set directly on the system (the administrator's own
/// tool) it is changed outside pwsync, at a time within seconds of now where the system keeps
/// one; an account pwsync never wrote is never written; one that is not there is missing.
#[test]
fn the_audit_tells_a_password_set_outside_pwsync_from_pwsyncs_own() {
    use pwsync_consumer::audit::{judge, AuditState, Known, Observed, WriteMark};
    let Some((systems, _one)) = systems() else {
        return;
    };
    // A keyed fingerprint stands in the consumer; any function of the bytes shows the rule.
    let fp = |b: &[u8]| {
        use std::hash::{Hash, Hasher};
        let mut out = [0u8; 32];
        for (i, chunk) in out.chunks_mut(8).enumerate() {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            (i, b).hash(&mut h);
            chunk.copy_from_slice(&h.finish().to_le_bytes());
        }
        out
    };
    let now_ms = || pwsync_proto::hlc::wall_ms();
    for sys in systems {
        let t = sys.target();
        let name = sys.name();
        let observe = |account: &str| t.target.observe(account);
        let account = format!("audited{}", fresh());
        sys.create(&account, "Created-pw-1");
        let never = judge(&Known::default(), &observe(&account), fp);
        assert_eq!(never, AuditState::NeverWritten, "{name}");
        assert_eq!(
            t.apply(&replace(&account, b"By-pwsync-pw-2"), &account),
            Outcome::Applied,
            "{name}"
        );
        let known = Known {
            mark: Some(WriteMark::of(now_ms(), &observe(&account), fp)),
            ..Known::default()
        };
        assert_eq!(
            judge(&known, &observe(&account), fp),
            AuditState::InStep,
            "{name}: after pwsync's own write"
        );
        // Second-resolution change times (LDAP, Kerberos, AD) must be able to move.
        std::thread::sleep(std::time::Duration::from_millis(1_100));
        let before = now_ms();
        sys.set_outside(&account, "Set-outside-pw-3");
        assert!(sys.logs_in(&account, b"Set-outside-pw-3"), "{name}");
        match judge(&known, &observe(&account), fp) {
            AuditState::ChangedOutside { at_ms, by } => {
                if let Some(at) = at_ms {
                    assert!(
                        at + 2_000 >= before && at <= now_ms() + 2_000,
                        "{name}: changed at {at}, set between {before} and now"
                    );
                } else {
                    assert!(
                        ["htpasswd", "postgres role", "exec"].contains(&name)
                            || name.starts_with("postgres table"),
                        "{name}: keeps a change time but gave none"
                    );
                }
                if name == "kerberos" {
                    assert!(
                        by.is_some_and(|b| !b.starts_with("pwsync")),
                        "{name}: by whom"
                    );
                }
            }
            other => panic!("{name}: after a change outside pwsync: {other:?}"),
        }
        assert!(
            matches!(observe(&format!("absent{}", fresh())), Observed::Missing),
            "{name}: an account that is not there"
        );
    }
}

/// A delete with no value (LDAP's `delete: userPassword`) leaves the account with no password
/// that logs in, on every target that can delete; AD and a table keep one password and say so.
#[test]
fn a_delete_with_no_value_removes_every_password() {
    let Some((systems, _one)) = systems() else {
        return;
    };
    for sys in systems {
        let t = sys.target();
        let account = format!("emptied{}", fresh());
        sys.create(&account, "Before-pw-1");
        let r = t.apply(&op(&account, Op::Delete), &account);
        if sys.name() == "ad" || sys.name().contains("table") {
            assert!(matches!(r, Outcome::Failed(_)), "{}: {r:?}", sys.name());
            assert!(sys.logs_in(&account, b"Before-pw-1"), "{}", sys.name());
            continue;
        }
        assert_eq!(r, Outcome::Applied, "{}", sys.name());
        assert!(
            !sys.logs_in(&account, b"Before-pw-1"),
            "{}: the password still logs in",
            sys.name()
        );
        // Delivered again (at least once): done.
        assert_eq!(
            t.apply(&op(&account, Op::Delete), &account),
            Outcome::Applied,
            "{}: again",
            sys.name()
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, failure_persistence: None, ..ProptestConfig::default() })]
    /// Generated names and passwords: applied exactly, or refused by a limit.
    #[test]
    fn generated_names_and_passwords(name in "[a-zA-Z0-9 '\"\\\\:,+=#*(;<ëé\u{308}]{1,20}", pw in proptest::collection::vec(any::<u8>(), 1..90)) {
        let Some((systems, _one)) = systems() else { return Ok(()) };
        for sys in systems {
            let account = format!("g{}{name}", fresh());
            if targets::limits::check_account(&sys.target().limits, &account).is_err() {
                let r = sys.target().apply(&replace(&account, &pw), &account);
                prop_assert!(matches!(&r, Outcome::Failed(m) if m.starts_with("refused:")), "{}: {:?}", sys.name(), r);
                continue;
            }
            let r = case(sys.as_ref(), &account, &account, &pw);
            let limits = &sys.target().limits;
            let forbidden = String::from_utf8_lossy(&pw).chars().any(|c| limits.password_forbidden.0.contains(&c));
            if (limits.password_utf8 && std::str::from_utf8(&pw).is_err()) || pw.contains(&0) || pw.len() > limits.max_password_bytes || forbidden {
                prop_assert!(refused(&r).starts_with("refused:"), "{}: {:?}", sys.name(), r);
            }
        }
    }
}
