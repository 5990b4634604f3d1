//! The source conformance suite (issue 29): every capture source, one table of cases, one rule.
//!
//! For every case a source can express, after the source has done what it does with it:
//! either **what the source holds afterwards is what every target holds** (each proven by its
//! own login: a bind at the source directory and at a multi-valued LDAP target, `htpasswd -vb`
//! and `kinit` at the single-valued htpasswd file and MIT realm, `pamtester authenticate` at
//! pam_unix), or **the source refused the
//! change with a reason the person sees**, and nothing changed anywhere. A source that sets the
//! password before pwsync sees it (the Samba hook) cannot refuse: what it cannot carry is
//! answered "NOT synchronised" and counted, and nothing reaches a target.
//!
//! The sources, each run by one line: ldap-sock for MODIFY (`ldapmodify`) and for Password
//! Modify (`ldappasswd`) on a real slapd with ppolicy; PAM through a real stack (`pam_unix`
//! with pwsync's `check` line before it, its update line after, real Unix accounts, and the
//! person's own change run as that person); the Samba hook (run as samba-tool runs it, an
//! object's LDIF on stdin: the real DC is in `samba.rs`); the socket API (`Submit`).
//!
//! Each case uses a fresh account, set to its first password at the source and at the targets
//! before the case starts. Then a differential test: seeded random sequences of modifications
//! through slapd and ldap-sock, after each of which the set of passwords that bind at the
//! directory equals the set that verify at the LDAP target and, while the directory holds at
//! most one, at the htpasswd one.

use pwsync_agent::api::{Request, Response};
use pwsync_proto::{Op, Secret};
use pwsync_tests::cluster::AgentOptions;
use pwsync_tests::krb5::Kdc;
use pwsync_tests::process::{root_or_skip, run_with_input};
use pwsync_tests::scrape::{get, sample};
use pwsync_tests::slapd::{Slapd, ADMIN_DN, ADMIN_PW, SUFFIX};
use pwsync_tests::{bin, free_port, htpasswd_verifies, wait_until, Cluster, Daemon, HT_TARGET};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);

/// The capture sources under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    LdapModify,
    LdapExop,
    Pam,
    SambaHook,
    Socket,
}

/// What a case does, in words every source that can express it understands.
#[derive(Clone, Debug)]
enum Action {
    /// An administrator sets a new password.
    Set(String),
    /// The person changes their own password, giving the current one (LDAP: a delete of the
    /// old value and an add of the new one, in the order `add_first` says).
    OwnChange { new: String, add_first: bool },
    /// The person changes their own password, giving a wrong current one.
    WrongOld { new: String },
    /// Someone else, bound as themselves, sets this account's password (the source's ACL).
    OtherPerson { new: String },
    /// An administrator's modifications of `userPassword`, in order: (`add`|`delete`|`replace`,
    /// values). `{FIRST}` stands for the account's first password, `{STORED}` for the value the
    /// directory stores for it (its hash).
    Modify(Vec<(&'static str, Vec<String>)>),
}

/// What the source must do with a case.
#[derive(Clone, Copy, Debug)]
enum Expect {
    /// Take it: the targets end holding what the source holds.
    Applied,
    /// Refuse it, saying this (case aside); nothing changes anywhere.
    Refused(&'static str),
    /// (A source that has set the password already.) Say it is not synchronised; nothing
    /// reaches a target.
    NotSynchronised,
    /// Whatever the source ends holding (a kill in the middle), the targets hold it too.
    Consistent,
}

struct Case {
    name: &'static str,
    action: Action,
    /// The account's spelling in the request: another case and spacing (`UID=X, OU=People`).
    respell: bool,
    /// A name with a control character in it.
    control_name: bool,
    /// ldap-sock runs under this failpoint for the case.
    failpoint: &'static str,
    expect: Vec<(Source, Expect)>,
}

fn case(name: &'static str, action: Action, expect: &[(Source, Expect)]) -> Case {
    Case {
        name,
        action,
        respell: false,
        control_name: false,
        failpoint: "",
        expect: expect.to_vec(),
    }
}

fn modify(mods: &[(&'static str, &[&str])]) -> Action {
    Action::Modify(
        mods.iter()
            .map(|(k, vs)| (*k, vs.iter().map(|v| v.to_string()).collect()))
            .collect(),
    )
}

/// The htpasswd target keeps bcrypt, which reads 72 bytes: the group's policy says at most 71.
fn at_limit() -> String {
    "At-limit-pw-1".to_string() + &"x".repeat(71 - 13)
}

/// The table: every case, and what each source that can express it must do.
fn cases() -> Vec<Case> {
    use Expect::*;
    use Source::*;
    let all_apply = [
        (LdapModify, Applied),
        (LdapExop, Applied),
        (Pam, Applied),
        (SambaHook, Applied),
        (Socket, Applied),
    ];
    let past_limit = at_limit() + "y";
    let past_agent = "P".repeat(1025);
    vec![
        case("replace", Action::Set("Replaced-pw-1".into()), &all_apply),
        case(
            "own change, the old value deleted first",
            Action::OwnChange {
                new: "Own-new-pw-2".into(),
                add_first: false,
            },
            &all_apply,
        ),
        case(
            "own change, the new value added first",
            Action::OwnChange {
                new: "Own-new-pw-3".into(),
                add_first: true,
            },
            &[(LdapModify, Applied)],
        ),
        case(
            "add only",
            modify(&[("add", &["Added-pw-4"])]),
            &[(LdapModify, Applied), (Socket, Applied)],
        ),
        case(
            "delete only",
            modify(&[("delete", &["{FIRST}"])]),
            &[(LdapModify, Applied), (Socket, Applied)],
        ),
        case(
            "delete every value",
            modify(&[("delete", &[])]),
            &[(LdapModify, Applied), (Socket, Applied)],
        ),
        case(
            "replace with none",
            modify(&[("replace", &[])]),
            &[(LdapModify, Applied)],
        ),
        // ppolicy takes one password value per modification: slapd's own refusal.
        case(
            "two values added and one deleted in one change",
            modify(&[
                ("add", &["Other-a-pw-5"]),
                ("add", &["Other-b-pw-5"]),
                ("delete", &["Other-a-pw-5"]),
            ]),
            &[(LdapModify, Refused("only allows one password value"))],
        ),
        case(
            "a value sent hashed",
            modify(&[("replace", &["{SSHA}aGFzaGVkLXZhbHVlLXNhbHQ="])]),
            &[(LdapModify, Refused("hashed"))],
        ),
        case(
            "hashed and cleartext mixed",
            modify(&[
                ("add", &["{SSHA}aGFzaGVkLXZhbHVlLXNhbHQ="]),
                ("add", &["Clear-pw-6"]),
            ]),
            &[(LdapModify, Refused("hashed"))],
        ),
        case(
            "the stored hash rotated to a cleartext value",
            modify(&[("delete", &["{STORED}"]), ("add", &["Rotated-pw-7"])]),
            &[(LdapModify, Applied)],
        ),
        Case {
            respell: true,
            ..case(
                "the account in another case and spacing",
                Action::Set("Respelled-pw-8".into()),
                &[(LdapModify, Applied), (LdapExop, Applied)],
            )
        },
        Case {
            control_name: true,
            ..case(
                "a control character in the name",
                Action::Set("Control-pw-9".into()),
                &[
                    (LdapModify, Refused("control")),
                    (SambaHook, NotSynchronised),
                    (Socket, Refused("control")),
                ],
            )
        },
        case("at the targets' limit", Action::Set(at_limit()), &all_apply),
        case(
            "past the targets' limit",
            Action::Set(past_limit),
            &[
                (LdapModify, Refused("at most 71 bytes")),
                (LdapExop, Refused("at most 71 bytes")),
                (Pam, Refused("at most 71 bytes")),
                (Socket, Refused("at most 71 bytes")),
            ],
        ),
        case(
            "past what the agent takes",
            Action::Set(past_agent),
            &[
                (SambaHook, NotSynchronised),
                (Socket, Refused("1024 bytes")),
            ],
        ),
        case(
            "a wrong old password",
            Action::WrongOld {
                new: "Wrong-old-pw-10".into(),
            },
            &[
                (LdapModify, Refused("")),
                (LdapExop, Refused("")),
                (Pam, Refused("")),
            ],
        ),
        case(
            "the directory's own policy (a person's change)",
            Action::OwnChange {
                new: "short".into(),
                add_first: false,
            },
            &[
                (LdapModify, Refused("constraint")),
                (LdapExop, Refused("constraint")),
            ],
        ),
        case(
            "another person's account",
            Action::OtherPerson {
                new: "Not-yours-pw-11".into(),
            },
            &[
                (LdapModify, Refused("insufficient access")),
                // slapd's answer to a Password Modify that its ACL refuses, with the sock
                // overlay configured, does not parse in ldappasswd ("Bad parameter to an
                // ldap routine"): the person sees a failure, not its reason.
                (LdapExop, Refused("")),
            ],
        ),
        Case {
            failpoint: "exit-after-pending",
            ..case(
                "capture killed once pending, before slapd is answered",
                Action::Set("Killed-pending-pw-12".into()),
                &[(LdapModify, Consistent), (LdapExop, Consistent)],
            )
        },
        Case {
            failpoint: "exit-at-result",
            ..case(
                "capture killed when slapd's result arrives",
                Action::Set("Killed-result-pw-13".into()),
                &[(LdapModify, Applied), (LdapExop, Applied)],
            )
        },
    ]
}

/// One installation: a source slapd with ldap-sock, an agent, and a consumer with an htpasswd
/// target and a Kerberos realm (one password per account each) and a multi-valued LDAP target on
/// a second slapd.
struct World {
    c: Cluster,
    source: Slapd,
    target: Slapd,
    realm: Kdc,
    agent: usize,
    sock: Option<Daemon>,
    config: PathBuf,
    socket: PathBuf,
    htpasswd: PathBuf,
    metrics_port: u16,
    /// Unix accounts made for the PAM source, removed when the world goes.
    unix_users: Vec<String>,
    next: usize,
    _dir: tempfile::TempDir,
}

/// A program's whole output, as the person would read it.
fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr)
}

fn private_file(path: &Path, text: &str) {
    std::fs::write(path, text).expect("write");
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("chmod");
}

impl World {
    fn new() -> Option<World> {
        Self::with_mode("strict")
    }

    /// [`World::new`] with ldap-sock in `mode`.
    fn with_mode(mode: &str) -> Option<World> {
        let dir = tempfile::tempdir().expect("temp dir");
        let socket = dir.path().join("slapd-sock");
        let source = Slapd::start_with(&format!(
            "overlay sock\nsocketpath {}\nsockops modify extended\nsockresps result\nextensions binddn connid\nsockdnpat \",ou=people,{SUFFIX}$\"\n\
             access to attrs=entry by self write by * read\n",
            socket.display()
        ))?;
        let target = Slapd::start()?;
        target.add_user("marker", "Marker-pw-0");
        let realm = Kdc::start()?;
        realm.add_principal("marker", "Marker-pw-0");
        let mut c = Cluster::new(&["g1"], "");
        let agent = c.add_agent("src1", AgentOptions::default());
        let config = c.agents[agent].config.clone();
        // The agent enforces the group's policy (the htpasswd target's 71 bytes).
        let key = c.root.path().join("keys/group-g1.pub");
        c.groups["g1"]
            .verifying_key()
            .save(&key)
            .expect("group key");
        let metrics_port = free_port();
        let base = std::fs::read_to_string(&config).expect("agent config");
        std::fs::write(
            &config,
            format!(
                "origin = \"src\"\nbackfill_interval_secs = 0\n{base}\n[policy]\ngroups = {{ g1 = {key:?} }}\n\n\
                 [ldap_sock]\nsocket = {socket:?}\nstate_dir = \"ldapsock\"\nmode = \"{mode}\"\nurl = \"{}\"\nsync_base = \"ou=people,{SUFFIX}\"\n\
                 settle_secs = 2\nslapd_user = \"root\"\nmetrics_listen = \"127.0.0.1:{metrics_port}\"\n\n\
                 [samba]\nstate_dir = \"samba\"\n",
                source.url()
            ),
        )
        .expect("agent config");
        let pw = c.path().join("target-ldap.pw");
        private_file(&pw, ADMIN_PW);
        let k = c.add_consumer(
            "k",
            "g1",
            &format!(
                "{HT_TARGET}\n[targets.dir]\ntype = \"ldap\"\nsystem = \"dir\"\nurl = \"{}\"\nbind_dn = \"{ADMIN_DN}\"\n\
                 bind_password_file = {pw:?}\npassword_mode = \"ssha\"\ndn_template = \"uid={{user}},ou=people,{SUFFIX}\"\n\n\
                 [targets.realm]\n{}",
                target.url(),
                realm.target_section()
            ),
        );
        c.start_relay();
        let krb5_conf = realm.krb5_conf().display().to_string();
        c.start_consumer_with_env(k, &[("KRB5_CONFIG", &krb5_conf)]);
        c.start_agent(agent);
        let htpasswd = c.consumers[k].dir.join("htpasswd");
        let mut w = World {
            c,
            source,
            target,
            realm,
            agent,
            sock: None,
            config,
            socket,
            htpasswd,
            metrics_port,
            unix_users: vec![],
            next: 0,
            _dir: dir,
        };
        w.start_sock("");
        // slapd's own policy: 8 characters at least (ppolicy's quality check).
        w.source.modify(&format!(
            "dn: cn=default,ou=policies,{SUFFIX}\nchangetype: modify\nadd: pwdMinLength\npwdMinLength: 8\n-\nadd: pwdCheckQuality\npwdCheckQuality: 1\n"
        ));
        wait_until(WAIT, "the group's policy at the agent", || {
            matches!(
                pwsync_agent_api::blocking::request(
                    &w.c.agents[w.agent].socket,
                    &Request::CheckPassword {
                        user: "probe".into(),
                        password: Secret::from(at_limit().as_str()),
                    },
                    Duration::from_secs(5),
                ),
                Ok(Response::Ready)
            ) && matches!(
                pwsync_agent_api::blocking::request(
                    &w.c.agents[w.agent].socket,
                    &Request::CheckPassword {
                        user: "probe".into(),
                        password: Secret::from((at_limit() + "y").as_str()),
                    },
                    Duration::from_secs(5),
                ),
                Ok(Response::Rejected { .. })
            )
        });
        Some(w)
    }

    /// (Re)starts ldap-sock, under `failpoint` when not empty; waits for its socket.
    fn start_sock(&mut self, failpoint: &str) {
        if let Some(mut d) = self.sock.take() {
            d.stop();
        }
        let _ = std::fs::remove_file(&self.socket);
        let env: Vec<(&str, &str)> = if failpoint.is_empty() {
            vec![]
        } else {
            vec![("PWSYNC_LDAPSOCK_FAILPOINT", failpoint)]
        };
        let config = self.config.display().to_string();
        self.sock = Some(Daemon::start_with_env(
            "ldap-sock",
            bin("pwsync-agent"),
            &["--config", &config, "ldap-sock"],
            self.c.path().join("ldap-sock.log"),
            &env,
        ));
        wait_until(WAIT, "ldap-sock's socket", || self.socket.exists());
    }

    /// Waits until every change ldap-sock captured is decided, then until a marker change
    /// submitted after them has reached both targets: whatever the source handed the agent
    /// before has been applied by then.
    fn barrier(&mut self) {
        if self.sock.as_mut().is_some_and(|d| d.is_running()) {
            // Nothing pending (a gauge set by each settling pass, every second), and every
            // capture of this process decided (live counters; a process started again may
            // also decide what its predecessor captured).
            wait_until(WAIT, "every captured change decided", || {
                let (_, page) = get(self.metrics_port, "/metrics");
                let event = |e: &str| {
                    sample(
                        &page,
                        &format!("pwsync_ldapsock_events_total{{event=\"{e}\"}}"),
                    )
                    .unwrap_or(0.0)
                };
                sample(&page, "pwsync_ldapsock_pending") == Some(0.0)
                    && event("captured")
                        <= event("delivered")
                            + event("refused_by_slapd")
                            + event("settled_discarded")
            });
        }
        self.next += 1;
        let marker = format!("Marker-pw-{}", self.next);
        assert!(matches!(
            self.c
                .submit(self.agent, "marker", Op::Replace, Some(&marker)),
            Response::Accepted { .. }
        ));
        wait_until(WAIT, "the marker at the targets", || {
            htpasswd_verifies(&self.htpasswd, "marker", &marker)
                && self.target.binds("marker", &marker)
                && self.realm.kinit("marker", marker.as_bytes())
        });
    }

    /// What the targets hold of `candidates`: (verify at htpasswd, bind at the LDAP target,
    /// `kinit` at the realm).
    fn targets_hold(&self, user: &str, candidates: &BTreeSet<String>) -> Held {
        let web = candidates
            .iter()
            .filter(|p| htpasswd_verifies(&self.htpasswd, user, p))
            .cloned()
            .collect();
        let dir = candidates
            .iter()
            .filter(|p| self.target.binds(user, p))
            .cloned()
            .collect();
        let realm = candidates
            .iter()
            .filter(|p| self.realm.kinit(user, p.as_bytes()))
            .cloned()
            .collect();
        Held { web, dir, realm }
    }

    fn agent_socket(&self) -> PathBuf {
        self.c.agents[self.agent].socket.clone()
    }
}

impl Drop for World {
    fn drop(&mut self) {
        if let Some(d) = self.sock.as_mut() {
            d.stop();
        }
        for u in &self.unix_users {
            let _ = Command::new("userdel").arg(u).output();
        }
    }
}

type Set = BTreeSet<String>;

/// What each target holds of a case's passwords.
#[derive(Debug, Default)]
struct Held {
    /// htpasswd: one password per account.
    web: Set,
    /// LDAP: several.
    dir: Set,
    /// Kerberos: one.
    realm: Set,
}

impl Held {
    /// Whether every target holds `want` (the single-valued ones only while `want` has at most
    /// one value, which is all they can hold).
    fn agrees(&self, want: &Set, single_too: bool) -> bool {
        self.dir == *want && (!single_too || (self.web == *want && self.realm == *want))
    }
}

/// One account of one case at one source: its name, first password and the source's handle.
struct Account {
    /// The account as the source stores it.
    user: String,
    first: String,
    /// Samba: the object's GUID and the last `pwdLastSet` handed to the hook.
    guid: String,
    pwd_last_set: u64,
}

/// A name with a control character, as a DN's value is written (RFC 4514 hex escape).
fn control_name(n: usize) -> (String, String) {
    (format!("ctl\u{7}{n}"), format!("ctl\\07{n}"))
}

impl World {
    /// Makes an account for `source`, set to its first password at the source and at both
    /// targets.
    fn provision(&mut self, source: Source, case: &Case) -> Account {
        self.next += 1;
        let n = self.next;
        let user = match (source, case.control_name) {
            (_, true) => control_name(n).0,
            (Source::Pam, _) => format!("pwc{}x{n}", std::process::id() % 100_000),
            _ => format!("acct{n}"),
        };
        let first = format!("First-pw-{n}");
        let mut account = Account {
            user: user.clone(),
            first: first.clone(),
            guid: format!("guid-{n}"),
            pwd_last_set: 100,
        };
        if !case.control_name {
            self.target.add_user(&user, "Target-init-pw-0");
            self.realm.add_principal(&user, "Target-init-pw-0");
        }
        match source {
            Source::LdapModify | Source::LdapExop if case.control_name => {
                use base64::Engine;
                let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
                self.source.add(&format!(
                    "dn:: {}\nobjectClass: inetOrgPerson\nuid:: {}\ncn: ctl\nsn: ctl\nuserPassword: {first}\n",
                    b64(&format!("uid={user},ou=people,{SUFFIX}")),
                    b64(&user)
                ));
            }
            Source::LdapModify | Source::LdapExop => self.source.add_user(&user, &first),
            Source::Pam => {
                let out = Command::new("useradd")
                    .args(["-M", "-s", "/usr/sbin/nologin", &user])
                    .output()
                    .expect("useradd");
                assert!(out.status.success(), "useradd: {}", text(&out));
                self.unix_users.push(user.clone());
                let out = run_with_input(
                    &mut Command::new("chpasswd"),
                    format!("{user}:{first}\n").as_bytes(),
                );
                assert!(out.status.success(), "chpasswd: {}", text(&out));
            }
            Source::SambaHook => {
                // First sight of an object set before the hook's state: recorded, not sent.
                let out = self.samba_hook(&mut account, &first, 100);
                assert!(out.contains("DONE-EXIT"), "the hook: {out}");
            }
            Source::Socket => {}
        }
        if !case.control_name {
            // The targets start where the source stands.
            assert!(matches!(
                self.c.submit(self.agent, &user, Op::Replace, Some(&first)),
                Response::Accepted { .. }
            ));
            wait_until(WAIT, "the first password at the targets", || {
                htpasswd_verifies(&self.htpasswd, &user, &first)
                    && self.target.binds(&user, &first)
                    && self.realm.kinit(&user, first.as_bytes())
            });
        }
        account
    }

    /// Hands the hook one object (as samba-tool does) with `password` set at `pwd_last_set`;
    /// its answer.
    fn samba_hook(&self, a: &mut Account, password: &str, pwd_last_set: u64) -> String {
        use base64::Engine;
        let b64 = |s: &[u8]| base64::engine::general_purpose::STANDARD.encode(s);
        a.pwd_last_set = pwd_last_set;
        let ldif = format!(
            "dn: CN=x,CN=Users,DC=samdom,DC=test\nobjectGUID: {}\nsAMAccountName:: {}\nuserAccountControl: 512\npwdLastSet: {pwd_last_set}\nvirtualClearTextUTF8:: {}\n\n",
            a.guid,
            b64(a.user.as_bytes()),
            b64(password.as_bytes())
        );
        let out = run_with_input(
            Command::new(bin("pwsync-agent"))
                .env(pwsync_agent::sources::samba::HOOK_ENV, &self.config),
            ldif.as_bytes(),
        );
        text(&out)
    }

    /// A PAM service: pwsync's `check` line, pam_unix, pwsync's update line (deploy/pam.d's
    /// Debian stack), and pam_unix for `authenticate`.
    fn pam_service(&self) -> Option<pwsync_tests::pam::Service> {
        let socket = self.agent_socket().display().to_string();
        pwsync_tests::pam::Service::with_stack(&format!(
            "auth required pam_unix.so nodelay\n\
             password requisite {{module}} socket={socket} check\n\
             password [success=1 default=ignore] pam_unix.so yescrypt use_authtok\n\
             password requisite pam_deny.so\n\
             password required pam_permit.so\n\
             password required {{module}} socket={socket}\n"
        ))
    }
}

/// `ldapmodify` bound as `binddn`, with `ldif`: (succeeded, what it printed).
fn ldapmodify(url: &str, binddn: &str, bindpw: &str, ldif: &str) -> (bool, String) {
    let out = run_with_input(
        Command::new("ldapmodify").args(["-x", "-H", url, "-D", binddn, "-w", bindpw]),
        ldif.as_bytes(),
    );
    (out.status.success(), text(&out))
}

/// `ldappasswd` bound as `binddn` (for `target` when given; with the old password when given):
/// (succeeded, what it printed). The new password on a file, not in argv.
fn ldappasswd(
    url: &str,
    binddn: &str,
    bindpw: &str,
    target: Option<&str>,
    old: Option<&str>,
    new: &str,
) -> (bool, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let newfile = dir.path().join("new");
    private_file(&newfile, new);
    let mut cmd = Command::new("ldappasswd");
    cmd.args(["-x", "-H", url, "-D", binddn, "-w", bindpw, "-T"])
        .arg(&newfile);
    if let Some(old) = old {
        let oldfile = dir.path().join("old");
        private_file(&oldfile, old);
        cmd.arg("-t").arg(oldfile);
    }
    if let Some(t) = target {
        cmd.arg(t);
    }
    let out = cmd.output().expect("ldappasswd");
    (out.status.success(), text(&out))
}

/// The source's answer to a case: whether it took the change, and what it said.
struct Done {
    taken: bool,
    said: String,
    /// The values the case names (candidates for every login check).
    values: Set,
}

impl World {
    fn perform(&mut self, source: Source, case: &Case, a: &mut Account) -> Done {
        let url = self.source.url();
        let (dn, dn_spelled) = if case.control_name {
            let escaped = control_name(self.next_of(a)).1;
            let dn = format!("uid={escaped},ou=people,{SUFFIX}");
            (dn.clone(), dn)
        } else {
            let dn = Slapd::user_dn(&a.user);
            let spelled = if case.respell {
                format!(
                    "UID={}, OU=People, {}",
                    a.user.to_uppercase(),
                    SUFFIX.to_uppercase()
                )
            } else {
                dn.clone()
            };
            (dn, spelled)
        };
        let first = a.first.clone();
        let mut values: Set = [first.clone()].into();
        let done = |taken: bool, said: String, values: Set| Done {
            taken,
            said,
            values,
        };
        match (&case.action, source) {
            (Action::Set(new), Source::LdapModify) => {
                values.insert(new.clone());
                let (ok, said) = ldapmodify(
                    &url,
                    ADMIN_DN,
                    ADMIN_PW,
                    &format!("dn: {dn_spelled}\nchangetype: modify\nreplace: userPassword\nuserPassword: {new}\n-\n"),
                );
                done(ok, said, values)
            }
            (Action::Set(new), Source::LdapExop) => {
                values.insert(new.clone());
                let (ok, said) = ldappasswd(&url, ADMIN_DN, ADMIN_PW, Some(&dn_spelled), None, new);
                done(ok, said, values)
            }
            (Action::Set(new), Source::Pam) => {
                values.insert(new.clone());
                let service = self.pam_service().expect("PAM service");
                let out = service.chauthtok(&a.user, new);
                done(out.status.success(), text(&out), values)
            }
            (Action::Set(new), Source::SambaHook) => {
                values.insert(new.clone());
                let said = self.samba_hook(a, new, u64::MAX / 4);
                done(!said.contains("NOT synchronised"), said, values)
            }
            (Action::Set(new), Source::Socket) => {
                values.insert(new.clone());
                let r = self.c.submit(self.agent, &a.user, Op::Replace, Some(new));
                done(
                    matches!(r, Response::Accepted { .. }),
                    format!("{r:?}"),
                    values,
                )
            }
            (Action::OwnChange { new, add_first }, Source::LdapModify) => {
                values.insert(new.clone());
                let (del, add) = (
                    format!("delete: userPassword\nuserPassword: {first}\n-\n"),
                    format!("add: userPassword\nuserPassword: {new}\n-\n"),
                );
                let mods = if *add_first { add + &del } else { del + &add };
                let (ok, said) = ldapmodify(
                    &url,
                    &dn,
                    &first,
                    &format!("dn: {dn}\nchangetype: modify\n{mods}"),
                );
                done(ok, said, values)
            }
            (Action::OwnChange { new, .. }, Source::LdapExop) => {
                values.insert(new.clone());
                let (ok, said) = ldappasswd(&url, &dn, &first, None, Some(&first), new);
                done(ok, said, values)
            }
            (Action::OwnChange { new, .. }, Source::Pam) => {
                values.insert(new.clone());
                let out = self.pam_as_user(&a.user, &format!("{first}\n{new}\n{new}\n"));
                done(out.status.success(), text(&out), values)
            }
            (Action::OwnChange { new, .. }, Source::SambaHook) => {
                values.insert(new.clone());
                let said = self.samba_hook(a, new, u64::MAX / 4);
                done(!said.contains("NOT synchronised"), said, values)
            }
            (Action::OwnChange { new, .. }, Source::Socket) => {
                values.insert(new.clone());
                let r = pwsync_agent_api::blocking::request(
                    &self.agent_socket(),
                    &Request::Submit {
                        user: a.user.clone(),
                        op: Op::Replace,
                        values: vec![Secret::from(new.as_str())],
                        attributes: Default::default(),
                        previous: Some(Secret::from(first.as_str())),
                    },
                    Duration::from_secs(30),
                )
                .expect("the agent answers");
                done(
                    matches!(r, Response::Accepted { .. }),
                    format!("{r:?}"),
                    values,
                )
            }
            (Action::WrongOld { new }, Source::LdapModify) => {
                values.insert(new.clone());
                let (ok, said) = ldapmodify(
                    &url,
                    &dn,
                    &first,
                    &format!("dn: {dn}\nchangetype: modify\ndelete: userPassword\nuserPassword: Not-the-old-pw\n-\nadd: userPassword\nuserPassword: {new}\n-\n"),
                );
                done(ok, said, values)
            }
            (Action::WrongOld { new }, Source::LdapExop) => {
                values.insert(new.clone());
                let (ok, said) = ldappasswd(&url, &dn, &first, None, Some("Not-the-old-pw"), new);
                done(ok, said, values)
            }
            (Action::WrongOld { new }, Source::Pam) => {
                values.insert(new.clone());
                let out = self.pam_as_user(&a.user, &format!("Not-the-old-pw\n{new}\n{new}\n"));
                done(out.status.success(), text(&out), values)
            }
            (Action::OtherPerson { new }, Source::LdapModify | Source::LdapExop) => {
                values.insert(new.clone());
                self.next += 1;
                let other = format!("other{}", self.next);
                self.source.add_user(&other, "Other-person-pw-1");
                let other_dn = Slapd::user_dn(&other);
                let (ok, said) = if source == Source::LdapModify {
                    ldapmodify(
                        &url,
                        &other_dn,
                        "Other-person-pw-1",
                        &format!("dn: {dn}\nchangetype: modify\nreplace: userPassword\nuserPassword: {new}\n-\n"),
                    )
                } else {
                    ldappasswd(&url, &other_dn, "Other-person-pw-1", Some(&dn), None, new)
                };
                done(ok, said, values)
            }
            (Action::Modify(mods), Source::LdapModify) => {
                let stored = self.source.attr(&a.user, "userPassword");
                let mut ldif = format!("dn: {dn_spelled}\nchangetype: modify\n");
                for (kind, vs) in mods {
                    ldif += &format!("{kind}: userPassword\n");
                    for v in vs {
                        let v = v
                            .replace("{FIRST}", &first)
                            .replace("{STORED}", stored.first().map(String::as_str).unwrap_or(""));
                        if !v.starts_with('{') {
                            values.insert(v.clone());
                        }
                        ldif += &format!("userPassword: {v}\n");
                    }
                    ldif += "-\n";
                }
                let (ok, said) = ldapmodify(&url, ADMIN_DN, ADMIN_PW, &ldif);
                done(ok, said, values)
            }
            (Action::Modify(mods), Source::Socket) => {
                // The socket API's words for the same: one submit per modification.
                let mut said = String::new();
                let mut taken = true;
                for (kind, vs) in mods {
                    let vs: Vec<String> = vs.iter().map(|v| v.replace("{FIRST}", &first)).collect();
                    values.extend(vs.iter().cloned());
                    let op = match *kind {
                        "add" => Op::Add,
                        "delete" => Op::Delete,
                        _ => Op::Replace,
                    };
                    let r = pwsync_agent_api::blocking::request(
                        &self.agent_socket(),
                        &Request::Submit {
                            user: a.user.clone(),
                            op,
                            values: vs.iter().map(|v| Secret::from(v.as_str())).collect(),
                            attributes: Default::default(),
                            previous: None,
                        },
                        Duration::from_secs(30),
                    )
                    .expect("the agent answers");
                    taken &= matches!(r, Response::Accepted { .. });
                    said += &format!("{r:?}\n");
                }
                done(taken, said, values)
            }
            (action, source) => panic!("{source:?} cannot express {action:?}"),
        }
    }

    /// `pamtester chauthtok` as the person (real uid theirs, effective root, as `passwd`
    /// runs): pam_unix asks for the current password.
    fn pam_as_user(&self, user: &str, answers: &str) -> Output {
        let service = self.pam_service().expect("PAM service");
        let uid = pwsync_agent::unix_users::user_id(user).expect("the account's uid");
        run_with_input(
            Command::new("setpriv").args([
                &format!("--ruid={uid}"),
                "pamtester",
                &service.name,
                user,
                "chauthtok",
            ]),
            answers.as_bytes(),
        )
    }

    /// What the source holds for `a`: which of `candidates` its own login takes.
    fn source_holds(
        &mut self,
        source: Source,
        case: &Case,
        a: &Account,
        candidates: &Set,
        model: &Set,
    ) -> Set {
        match source {
            Source::LdapModify | Source::LdapExop if case.control_name => candidates
                .iter()
                .filter(|p| {
                    let dn = format!("uid={},ou=people,{SUFFIX}", control_name(self.next_of(a)).1);
                    Command::new("ldapwhoami")
                        .args(["-x", "-H", &self.source.url(), "-D", &dn, "-w", p])
                        .output()
                        .map(|o| o.status.success())
                        .unwrap_or(false)
                })
                .cloned()
                .collect(),
            Source::LdapModify | Source::LdapExop => candidates
                .iter()
                .filter(|p| self.source.binds(&a.user, p))
                .cloned()
                .collect(),
            Source::Pam => {
                let service = self.pam_service().expect("PAM service");
                candidates
                    .iter()
                    .filter(|p| service.authenticate(&a.user, p).status.success())
                    .cloned()
                    .collect()
            }
            // The hook and the socket hold what they were told: the model.
            Source::SambaHook | Source::Socket => model.clone(),
        }
    }

    fn next_of(&self, a: &Account) -> usize {
        a.user
            .trim_start_matches("ctl\u{7}")
            .parse()
            .expect("a control name's number")
    }
}

/// What a source that keeps exactly what it is told holds after `action` (the socket API, the
/// Samba hook: their "directory" is the submitter's intent).
fn model(action: &Action, first: &str, before: &Set, taken: bool) -> Set {
    if !taken {
        return before.clone();
    }
    let mut s = before.clone();
    match action {
        Action::Set(new) | Action::OwnChange { new, .. } => s = [new.clone()].into(),
        Action::Modify(mods) => {
            for (kind, vs) in mods {
                let vs: Vec<String> = vs.iter().map(|v| v.replace("{FIRST}", first)).collect();
                match *kind {
                    "add" => s.extend(vs),
                    "delete" if vs.is_empty() => s.clear(),
                    "delete" => s.retain(|v| !vs.contains(v)),
                    _ => s = vs.into_iter().collect(),
                }
            }
        }
        Action::WrongOld { .. } | Action::OtherPerson { .. } => {}
    }
    s
}

/// Runs every case `source` can express, and checks the rule for each.
fn conform(source: Source) {
    if source == Source::Pam && !root_or_skip("the PAM source (Unix accounts, /etc/pam.d)") {
        return;
    }
    let Some(mut w) = World::new() else { return };
    let mut ran = 0;
    // Every password a case used (the first ones and the previous ones too), for the log check.
    let mut every_value = Set::new();
    for case in cases() {
        let Some(&(_, expect)) = case.expect.iter().find(|(s, _)| *s == source) else {
            continue;
        };
        ran += 1;
        let mut a = w.provision(source, &case);
        if !case.failpoint.is_empty() {
            w.start_sock(case.failpoint);
        }
        let first: Set = [a.first.clone()].into();
        let done = w.perform(source, &case, &mut a);
        every_value.extend(done.values.iter().filter(|v| v.len() >= 8).cloned());
        let what = format!(
            "{source:?}, case {:?}: the source said: {}",
            case.name, done.said
        );
        if !case.failpoint.is_empty() {
            // The capture process ended where it was told to; back to serving.
            w.start_sock("");
        }
        let model = model(&case.action, &a.first, &first, done.taken);
        match expect {
            Expect::Refused(reason) => {
                assert!(!done.taken, "{what}: taken, but must be refused");
                assert!(
                    done.said.to_lowercase().contains(&reason.to_lowercase()),
                    "{what}: refused without saying {reason:?}"
                );
            }
            Expect::NotSynchronised => {
                assert!(!done.taken, "{what}: must say NOT synchronised");
            }
            Expect::Applied => assert!(done.taken, "{what}: refused, but must be taken"),
            Expect::Consistent => {}
        }
        w.barrier();
        if case.control_name {
            // No target can hold such a name; the rule is that nothing reached one.
            let holds = w.source_holds(source, &case, &a, &done.values, &model);
            assert!(
                matches!(expect, Expect::NotSynchronised) || holds == first,
                "{what}: the directory changed ({holds:?})"
            );
            assert!(
                !std::fs::read_to_string(&w.htpasswd)
                    .unwrap_or_default()
                    .contains("ctl"),
                "{what}: a name with a control character reached htpasswd"
            );
            continue;
        }
        let source_holds = w.source_holds(source, &case, &a, &done.values, &model);
        if matches!(expect, Expect::Refused(_)) {
            assert_eq!(
                source_holds, first,
                "{what}: refused, but the source changed"
            );
        }
        let want = if matches!(expect, Expect::NotSynchronised) {
            // The source moved on; what it could not carry reached no target.
            first.clone()
        } else {
            source_holds.clone()
        };
        let mut last = Held::default();
        let agreed = pwsync_tests::process::wait_for(WAIT, || {
            last = w.targets_hold(&a.user, &done.values);
            last.agrees(&want, want.len() <= 1)
        });
        assert!(
            agreed,
            "{what}: the source holds {source_holds:?}, the targets {last:?}"
        );
        if case.respell {
            let text = std::fs::read_to_string(&w.htpasswd).unwrap_or_default();
            assert!(
                !text.contains(&a.user.to_uppercase()),
                "{what}: an account was made in the request's spelling"
            );
        }
    }
    assert!(ran >= 5, "{source:?} ran only {ran} cases");
    let logs = w.c.all_logs() + &w.sock.as_ref().map(|d| d.log_text()).unwrap_or_default();
    for p in &every_value {
        assert!(!logs.contains(p.as_str()), "a password in the logs");
    }
}

#[test]
fn ldap_sock_modify_conforms() {
    conform(Source::LdapModify);
}

#[test]
fn ldap_sock_password_modify_conforms() {
    conform(Source::LdapExop);
}

#[test]
fn pam_through_pam_unix_conforms() {
    conform(Source::Pam);
}

#[test]
fn the_samba_hook_conforms() {
    conform(Source::SambaHook);
}

#[test]
fn socket_submit_conforms() {
    conform(Source::Socket);
}

/// The differential test: seeded random sequences of `userPassword` modifications, applied by
/// an administrator through slapd with ldap-sock. After each: the passwords that bind at the
/// directory are the ones that bind at the multi-valued LDAP target (but for the documented
/// rule that a delete-old/add-new is a replace: where the directory keeps other values beside,
/// the target keeps the new one alone) and, while the directory has never held more than one (a
/// target with one password per account cannot follow more), the ones that verify at the
/// htpasswd target. A modification slapd refuses changes nothing
/// anywhere. `PWSYNC_SEED` replays a seed (CI runs seed 29); the seed of a run is printed.
#[test]
fn random_modifications_leave_the_directory_and_the_targets_alike() {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
    let Some(w) = World::new() else { return };
    // CI replays one seed (a red build must be reproducible); elsewhere each run explores a
    // new one.
    let fixed = std::env::var_os("CI").map(|_| 29);
    let seed: u64 = std::env::var("PWSYNC_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .or(fixed)
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(7)
        });
    eprintln!("differential test: PWSYNC_SEED={seed}");
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let mut runner = TestRunner::new_with_rng(
        Config {
            cases: 24,
            max_shrink_iters: 16,
            failure_persistence: None,
            ..Config::default()
        },
        TestRng::from_seed(RngAlgorithm::ChaCha, &bytes),
    );
    // A modification: a kind (0 add one value, 1 delete one value, 2 delete every value,
    // 3 replace with one value, 4 replace with none) and a pick, resolved against what the
    // directory holds, so that most modifications are ones LDAP takes (an add of an absent
    // value, a delete of a present one).
    let modification = (0u8..5, 0usize..4);
    let step = proptest::collection::vec(modification, 1..4);
    let sequence = proptest::collection::vec(step, 1..4);
    let w = std::cell::RefCell::new(w);
    let result = runner.run(&sequence, |steps| {
        let mut w = w.borrow_mut();
        let case = case("differential", Action::Set(String::new()), &[]);
        let a = w.provision(Source::LdapModify, &case);
        let pool: Vec<String> = [a.first.clone()]
            .into_iter()
            .chain((1..4).map(|i| format!("Pool-{i}-{}", a.user)))
            .collect();
        let candidates: Set = pool.iter().cloned().collect();
        let mut ever_multi = false;
        let mut held: Set = [a.first.clone()].into();
        // What the multi-valued target should hold, by the documented rule: a person's own
        // change (one value deleted, one added, nothing replaced) is a replace, which leaves
        // the new value alone where the directory kept others; every other change is its adds
        // and deletes.
        let mut target_model = held.clone();
        for step in steps {
            let mut ldif = format!("dn: {}\nchangetype: modify\n", Slapd::user_dn(&a.user));
            let mut model = held.clone();
            let mut set_ops: Vec<(&str, Vec<String>)> = vec![];
            for (kind, pick) in &step {
                let absent: Vec<&String> = pool.iter().filter(|p| !model.contains(*p)).collect();
                let present: Vec<String> = model.iter().cloned().collect();
                let (kind, values): (&str, Vec<String>) = match kind {
                    0 if !absent.is_empty() => ("add", vec![absent[pick % absent.len()].clone()]),
                    1 if !present.is_empty() => {
                        ("delete", vec![present[pick % present.len()].clone()])
                    }
                    2 => ("delete", vec![]),
                    3 => ("replace", vec![pool[*pick].clone()]),
                    _ => ("replace", vec![]),
                };
                match kind {
                    "add" => model.extend(values.iter().cloned()),
                    "delete" if values.is_empty() => model.clear(),
                    "delete" => model.retain(|v| !values.contains(v)),
                    _ => model = values.iter().cloned().collect(),
                }
                ldif += &format!("{kind}: userPassword\n");
                for v in &values {
                    ldif += &format!("userPassword: {v}\n");
                }
                ldif += "-\n";
                set_ops.push((kind, values));
            }
            let (ok, said) = ldapmodify(&w.source.url(), ADMIN_DN, ADMIN_PW, &ldif);
            w.barrier();
            let dir: Set = candidates
                .iter()
                .filter(|p| w.source.binds(&a.user, p))
                .cloned()
                .collect();
            ever_multi |= dir.len() > 1;
            if ok {
                let gone: Set = held.difference(&dir).cloned().collect();
                let came: Set = dir.difference(&held).cloned().collect();
                let whole = set_ops
                    .iter()
                    .any(|(k, v)| *k == "replace" || (*k == "delete" && v.is_empty()));
                if !whole && gone.len() == 1 && came.len() == 1 {
                    target_model = came;
                } else {
                    for (kind, values) in &set_ops {
                        match *kind {
                            "add" => target_model.extend(values.iter().cloned()),
                            "delete" if values.is_empty() => target_model.clear(),
                            "delete" => target_model.retain(|v| !values.contains(v)),
                            _ => target_model = values.iter().cloned().collect(),
                        }
                    }
                }
            }
            held = dir.clone();
            let mut last = Held::default();
            let alike = pwsync_tests::process::wait_for(WAIT, || {
                last = w.targets_hold(&a.user, &candidates);
                last.dir == target_model
                    && (ever_multi || (last.web == dir && last.realm == dir))
            });
            prop_assert!(
                alike,
                "after {ldif:?} (slapd: {}, {said:?}): the directory holds {dir:?}, the targets {last:?} (the LDAP target should hold {target_model:?})",
                if ok { "applied" } else { "refused" }
            );
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("PWSYNC_SEED={seed}: {e}");
    }
}

/// Runs `program` with `args` as `nobody` (group `nogroup`), `input` on stdin.
fn as_nobody(program: &Path, args: &[&str], input: &[u8]) -> Output {
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(program)
        .args(args);
    run_with_input(&mut cmd, input)
}

/// A client of the sock overlay's socket, as slapd speaks to it: a MODIFY setting `password`
/// on `dn`, then slapd's RESULT 0 for it.
const FORGER: &str = r#"
import socket, sys
path, dn, password = sys.argv[1], sys.argv[2], sys.argv[3]
for message in ("MODIFY\nmsgid: 7\nconnid: 99999\nsuffix: dc=example,dc=org\ndn: %s\nreplace: userPassword\nuserPassword: %s\n-\n\n" % (dn, password),
                "RESULT\nmsgid: 7\nconnid: 99999\ncode: 0\n\n"):
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    try:
        s.sendall(message.encode())
        s.shutdown(socket.SHUT_WR)
        print(s.recv(4096))
    except OSError as e:
        print("closed:", e)
    s.close()
"#;

/// Trust by peer, not by assertion: a submit's "already set" mark skips the password policy
/// only from root, the agent's own user and `[socket] committers`; ldap-sock's socket serves
/// only slapd's user. Each is shown refusing `nobody`, and doing what it refuses to `nobody`
/// for root (so the check is what stops it).
#[test]
fn only_committers_skip_the_policy_and_only_slapd_speaks_to_ldap_sock() {
    if !root_or_skip("a test that runs clients as nobody") {
        return;
    }
    let Some(mut w) = World::new() else { return };
    // nobody may use the agent's socket (a member of its group) and ldap-sock's (mode 0666);
    // the folders on the way let it through.
    let config = std::fs::read_to_string(&w.config).expect("config");
    let config = config
        .replace("[socket]\n", "[socket]\ngroup = \"nogroup\"\n")
        .replace("mode = 384\n", "mode = 0o660\n")
        .replace("[ldap_sock]\n", "[ldap_sock]\nsocket_mode = 0o666\n");
    std::fs::write(&w.config, &config).expect("config");
    w.c.agent(w.agent).stop();
    w.c.start_agent(w.agent);
    w.start_sock("");
    let traverse = std::os::unix::fs::PermissionsExt::from_mode(0o711);
    for d in [w.c.root.path(), &w.c.agents[w.agent].dir, w._dir.path()] {
        std::fs::set_permissions(d, std::fs::Permissions::clone(&traverse)).expect("chmod");
    }
    // A copy of the config nobody may read (submit reads only the socket's path from it).
    let open = tempfile::tempdir().expect("temp dir");
    std::fs::set_permissions(
        open.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    let readable = open.path().join("agent.toml");
    std::fs::write(
        &readable,
        config.replace(
            "path = \"agent.sock\"",
            &format!("path = {:?}", w.agent_socket()),
        ),
    )
    .expect("config copy");
    std::fs::set_permissions(
        &readable,
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .expect("chmod");
    let too_long = at_limit() + "y";
    let submit = [
        "--config",
        readable.to_str().expect("path"),
        "submit",
        "--user",
        "mallory",
        "--attr",
        "pwsync.committed=1",
    ];
    let out = as_nobody(
        &bin("pwsync-agent"),
        &submit,
        format!("{too_long}\n").as_bytes(),
    );
    assert!(
        !out.status.success() && text(&out).contains("at most 71 bytes"),
        "nobody's 'already set' mark skipped the policy: {}",
        text(&out)
    );
    assert!(w.c.all_logs().contains("is not a committer"));
    let out = run_with_input(
        Command::new(bin("pwsync-agent")).args(submit),
        format!("{too_long}\n").as_bytes(),
    );
    assert!(out.status.success(), "root's mark: {}", text(&out));

    // ldap-sock: a MODIFY and its RESULT from nobody are refused, never forwarded.
    let case = case("peer", Action::Set(String::new()), &[]);
    let a = w.provision(Source::LdapModify, &case);
    let dn = Slapd::user_dn(&a.user);
    let socket = w.socket.display().to_string();
    let python = Path::new("/usr/bin/python3");
    let out = as_nobody(
        python,
        &["-c", FORGER, &socket, &dn, "Forged-by-nobody-1"],
        b"",
    );
    assert!(out.status.success(), "the forger ran: {}", text(&out));
    let sock_log = || w.sock.as_ref().map(|d| d.log_text()).unwrap_or_default();
    wait_until(WAIT, "ldap-sock to refuse nobody", || {
        sock_log().contains("refused a connection to the overlay's socket")
    });
    w.barrier();
    assert!(!htpasswd_verifies(
        &w.htpasswd,
        &a.user,
        "Forged-by-nobody-1"
    ));
    assert!(htpasswd_verifies(&w.htpasswd, &a.user, &a.first));
    // The same from root (slapd's user here) is forwarded: what stopped nobody is the check.
    let out = run_with_input(
        Command::new(python).args(["-c", FORGER, &socket, &dn, "Sent-by-root-2"]),
        b"",
    );
    assert!(out.status.success(), "as root: {}", text(&out));
    wait_until(WAIT, "root's change at the target", || {
        htpasswd_verifies(&w.htpasswd, &a.user, "Sent-by-root-2")
    });
}

/// No cleartext at rest: ldap-sock's pending store holds no password once a change is
/// forwarded, and the state folders of the capture sources are 0700.
#[test]
fn forwarded_changes_leave_no_cleartext_and_state_folders_are_private() {
    let Some(mut w) = World::new() else { return };
    let case = case("at rest", Action::Set(String::new()), &[]);
    let a = w.provision(Source::LdapModify, &case);
    let (ok, said) = ldapmodify(
        &w.source.url(),
        ADMIN_DN,
        ADMIN_PW,
        &format!(
            "dn: {}\nchangetype: modify\nreplace: userPassword\nuserPassword: At-rest-secret-9\n-\n",
            Slapd::user_dn(&a.user)
        ),
    );
    assert!(ok, "{said}");
    w.barrier();
    assert!(htpasswd_verifies(&w.htpasswd, &a.user, "At-rest-secret-9"));
    let dir = w.c.agents[w.agent].dir.clone();
    let store = std::fs::read(dir.join("ldapsock/ldap-pending.redb")).expect("the pending store");
    assert!(
        !store.windows(16).any(|x| x == b"At-rest-secret-9"),
        "the pending store holds a forwarded password in clear"
    );
    // The Samba hook's state, made by a first call.
    let mut acct = w.provision(Source::SambaHook, &case);
    let _ = w.samba_hook(&mut acct, "Samba-rest-pw-1", 100);
    use std::os::unix::fs::PermissionsExt;
    for folder in ["ldapsock", "samba", "spool/policy"] {
        let mode = std::fs::metadata(dir.join(folder))
            .unwrap_or_else(|e| panic!("{folder}: {e}"))
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700, "{folder} is {:o}", mode & 0o777);
    }
}

/// Lenient mode: what pwsync cannot carry goes through the directory, is counted, and
/// `pwsync-agent status` names the account as not synchronised until a later change of it is
/// forwarded; nothing reaches a target meanwhile.
#[test]
fn lenient_mode_lets_an_uncarriable_change_through_and_status_names_the_account() {
    let Some(mut w) = World::with_mode("lenient") else {
        return;
    };
    let case = case("lenient", Action::Set(String::new()), &[]);
    let a = w.provision(Source::LdapModify, &case);
    let dn = Slapd::user_dn(&a.user);
    let set = |w: &World, value: &str| {
        ldapmodify(
            &w.source.url(),
            ADMIN_DN,
            ADMIN_PW,
            &format!(
                "dn: {dn}\nchangetype: modify\nreplace: userPassword\nuserPassword: {value}\n-\n"
            ),
        )
    };
    let (ok, said) = set(&w, "{SSHA}aGFzaGVkLXZhbHVlLXNhbHQ=");
    assert!(ok, "lenient mode lets it through: {said}");
    w.barrier();
    assert!(htpasswd_verifies(&w.htpasswd, &a.user, &a.first));
    let config = w.config.display().to_string();
    let status = || {
        text(
            &Command::new(bin("pwsync-agent"))
                .args(["--config", &config, "status"])
                .output()
                .expect("pwsync-agent status"),
        )
    };
    let line = format!("{} NOT synchronised since", a.user);
    wait_until(WAIT, "status to name the account", || {
        status().contains(&line)
    });
    let (ok, said) = set(&w, "Later-pw-1");
    assert!(ok, "{said}");
    w.barrier();
    assert!(htpasswd_verifies(&w.htpasswd, &a.user, "Later-pw-1"));
    wait_until(WAIT, "status to drop the account", || {
        !status().contains(&line)
    });
}

/// `CheckPassword` (PAM's `check` line asks it before pam_unix sets anything) refuses what a
/// submit would: a value past the agent's limit or a name it cannot carry, not only what the
/// policy refuses.
#[test]
fn check_password_refuses_what_a_submit_would() {
    let Some(w) = World::new() else { return };
    let check = |user: &str, password: &str| {
        pwsync_agent_api::blocking::request(
            &w.agent_socket(),
            &Request::CheckPassword {
                user: user.into(),
                password: Secret::from(password),
            },
            Duration::from_secs(10),
        )
        .expect("the agent answers")
    };
    let refused = |r: Response, want: &str| match r {
        Response::Rejected { reason } => assert!(reason.contains(want), "{reason}"),
        other => panic!("{other:?}, not a refusal saying {want:?}"),
    };
    assert_eq!(check("carol", "Fine-pw-1"), Response::Ready);
    refused(check("carol", &"P".repeat(1025)), "1024 bytes");
    refused(check("ca\nrol", "Fine-pw-1"), "control");
    refused(check("carol", &(at_limit() + "y")), "at most 71 bytes");
}

/// `pwsync-agent check` looks the capture's service users up: a `slapd_user` that does not
/// exist is named before `ldap-sock` would refuse to start.
#[test]
fn check_names_a_slapd_user_that_does_not_exist() {
    let Some(w) = World::new() else { return };
    let check = |config: &Path| {
        Command::new(bin("pwsync-agent"))
            .args(["--config", config.to_str().expect("path"), "check"])
            .output()
            .expect("pwsync-agent check")
    };
    let out = check(&w.config);
    assert!(out.status.success(), "check: {}", text(&out));
    let bad = w.config.with_file_name("agent-bad.toml");
    let config = std::fs::read_to_string(&w.config).expect("config");
    std::fs::write(
        &bad,
        config.replace("slapd_user = \"root\"", "slapd_user = \"no-such-user-pw\""),
    )
    .expect("config");
    let out = check(&bad);
    assert!(
        !out.status.success() && text(&out).contains("slapd_user"),
        "check: {}",
        text(&out)
    );
}
