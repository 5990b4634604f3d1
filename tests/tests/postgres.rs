//! The PostgreSQL target against a real server, through the whole pipeline (issue: real
//! downstream systems).

use pwsync_agent::api::Response;
use pwsync_proto::Op;
use pwsync_tests::cluster::AgentOptions;
use pwsync_tests::pg::{Pg, SUPERUSER_PW};
use pwsync_tests::{wait_until, Cluster};
use std::time::Duration;

fn consumer_with_pg(c: &mut Cluster, pg: &Pg, extra: &str) -> usize {
    let pw_file = c.path().join("pg.pw");
    std::fs::write(&pw_file, format!("{SUPERUSER_PW}\n")).expect("pw");
    std::fs::set_permissions(
        &pw_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .expect("chmod");
    c.add_consumer(
        "k",
        "g1",
        &format!(
            "[retry]\nbase_ms = 100\nmax_secs = 1\nno_such_user_secs = 2\n\n[targets.db]\ntype = \"postgres\"\nsystem = \"pg-main\"\nconnect = \"host=127.0.0.1 port={} user=postgres dbname=postgres\"\npassword_file = \"{}\"\n{extra}\n",
            pg.port,
            pw_file.display()
        ),
    )
}

fn ok(r: Response) {
    assert!(
        matches!(r, Response::Accepted { durable: true, .. }),
        "{r:?}"
    );
}

#[test]
fn role_mode_sets_scram_verifiers_so_the_cleartext_never_reaches_the_server() {
    let Some(pg) = Pg::start() else { return };
    pg.sql("CREATE ROLE alice LOGIN PASSWORD 'old-alice'");
    let mut c = Cluster::new(&["g1"], "");
    let a = c.add_agent("host-a", AgentOptions::default());
    let k = consumer_with_pg(&mut c, &pg, "mode = \"role\"");
    c.start_relay();
    c.start_consumer(k);
    c.start_agent(a);

    ok(c.submit(a, "alice", Op::Replace, Some("Pg-Role-New-1")));
    wait_until(
        Duration::from_secs(20),
        "alice to log in with the new password",
        || pg.logs_in("alice", "Pg-Role-New-1"),
    );
    assert!(!pg.logs_in("alice", "old-alice"));
    assert!(pg
        .sql("SELECT rolpassword FROM pg_authid WHERE rolname = 'alice'")
        .starts_with("SCRAM-SHA-256$"));
    let log = pg.log();
    assert!(
        log.contains("ALTER ROLE \"alice\" PASSWORD 'SCRAM-SHA-256$"),
        "statements are logged: {log}"
    );
    assert!(
        !log.contains("Pg-Role-New-1"),
        "the cleartext reached the server's log"
    );

    ok(c.submit(a, "alice", Op::Revoke, None));
    wait_until(Duration::from_secs(20), "alice to be NOLOGIN", || {
        !pg.logs_in("alice", "Pg-Role-New-1")
    });
    ok(c.submit(a, "alice", Op::Resume, None));
    wait_until(Duration::from_secs(20), "alice to log in again", || {
        pg.logs_in("alice", "Pg-Role-New-1")
    });
    // delete of a value that is not the current password changes nothing; of the current one
    // clears it.
    ok(c.submit(a, "alice", Op::Delete, Some("not-hers")));
    ok(c.submit(a, "alice", Op::Delete, Some("Pg-Role-New-1")));
    wait_until(Duration::from_secs(20), "alice's password cleared", || {
        pg.sql("SELECT rolpassword IS NULL FROM pg_authid WHERE rolname = 'alice'") == "t"
    });
    assert_eq!(
        c.consumer_status(k)["targets"]["db"]["dead_lettered"].as_u64(),
        Some(0)
    );
}

#[test]
fn table_mode_updates_a_hash_column_and_runs_the_account_statements() {
    let Some(pg) = Pg::start() else { return };
    pg.sql("CREATE TABLE app_users (login text PRIMARY KEY, pw_hash text, active boolean NOT NULL DEFAULT true)");
    pg.sql("INSERT INTO app_users (login, pw_hash) VALUES ('carol', 'none')");
    let mut c = Cluster::new(&["g1"], "");
    let a = c.add_agent("host-a", AgentOptions::default());
    let k = consumer_with_pg(
        &mut c,
        &pg,
        "mode = \"table\"\nhash = \"bcrypt\"\nbcrypt_cost = 4\nupdate_sql = \"UPDATE app_users SET pw_hash = $1 WHERE login = $2\"\nrevoke_sql = \"UPDATE app_users SET active = false WHERE login = $1\"\nresume_sql = \"UPDATE app_users SET active = true WHERE login = $1\"",
    );
    c.start_relay();
    c.start_consumer(k);
    c.start_agent(a);

    ok(c.submit(a, "carol", Op::Replace, Some("Pg-Table-1")));
    wait_until(Duration::from_secs(20), "carol's hash", || {
        pg.sql("SELECT pw_hash FROM app_users WHERE login = 'carol'")
            .starts_with("$2y$")
    });
    let hash = pg.sql("SELECT pw_hash FROM app_users WHERE login = 'carol'");
    assert!(
        bcrypt::verify("Pg-Table-1", &hash).expect("bcrypt"),
        "{hash}"
    );
    assert!(!pg.log().contains("Pg-Table-1"));
    ok(c.submit(a, "carol", Op::Revoke, None));
    wait_until(Duration::from_secs(20), "carol inactive", || {
        pg.sql("SELECT active FROM app_users WHERE login = 'carol'") == "f"
    });
    ok(c.submit(a, "carol", Op::Resume, None));
    wait_until(Duration::from_secs(20), "carol active", || {
        pg.sql("SELECT active FROM app_users WHERE login = 'carol'") == "t"
    });

    // A user without a row waits out the no-such-user window (2 s here), then is a dead letter.
    ok(c.submit(a, "dave", Op::Replace, Some("Pg-Dave")));
    wait_until(Duration::from_secs(30), "dave's dead letter", || {
        c.consumer_status(k)["targets"]["db"]["dead_lettered"].as_u64() == Some(1)
    });
}

#[test]
fn table_mode_with_argon2id_stores_a_phc_hash_that_verifies() {
    use argon2::{PasswordHash, PasswordVerifier};
    let Some(pg) = Pg::start() else { return };
    pg.sql("CREATE TABLE accounts (name text PRIMARY KEY, secret_hash text)");
    pg.sql("INSERT INTO accounts (name, secret_hash) VALUES ('erin', 'none')");
    let mut c = Cluster::new(&["g1"], "");
    let a = c.add_agent("host-a", AgentOptions::default());
    let k = consumer_with_pg(
        &mut c,
        &pg,
        "mode = \"table\"\nhash = \"argon2id\"\nupdate_sql = \"UPDATE accounts SET secret_hash = $1 WHERE name = $2\"",
    );
    c.start_relay();
    c.start_consumer(k);
    c.start_agent(a);

    ok(c.submit(a, "erin", Op::Replace, Some("Pg-Argon-1")));
    wait_until(Duration::from_secs(20), "erin's argon2id hash", || {
        pg.sql("SELECT secret_hash FROM accounts WHERE name = 'erin'")
            .starts_with("$argon2id$")
    });
    let stored = pg.sql("SELECT secret_hash FROM accounts WHERE name = 'erin'");
    let hash = PasswordHash::new(&stored).expect("a PHC string");
    let argon = argon2::Argon2::default();
    assert!(argon.verify_password(b"Pg-Argon-1", &hash).is_ok());
    assert!(argon.verify_password(b"Pg-Argon-0", &hash).is_err());
    assert!(!pg.log().contains("Pg-Argon-1"));
    assert!(!c.all_logs().contains("Pg-Argon-1"));
    assert_eq!(
        c.consumer_status(k)["targets"]["db"]["applied"].as_u64(),
        Some(1)
    );
}

/// The target's own login failing is the target's problem, not the change's: the change waits
/// in the retry queue (never a dead letter) and the target is reported unavailable; and the
/// login's own role is never changed, even when a change names it.
#[test]
fn a_refused_own_login_retries_loudly_and_the_login_role_is_never_changed() {
    let Some(pg) = Pg::start() else { return };
    pg.sql("CREATE ROLE bob LOGIN PASSWORD 'old-bob'");
    let mut c = Cluster::new(&["g1"], "");
    let a = c.add_agent("host-a", AgentOptions::default());
    let k = consumer_with_pg(&mut c, &pg, "mode = \"role\"");
    // The password file now holds a wrong password: the server refuses this target's login.
    std::fs::write(c.path().join("pg.pw"), "not-the-password\n").expect("pw");
    c.start_relay();
    c.start_consumer(k);
    c.start_agent(a);
    ok(c.submit(a, "bob", Op::Replace, Some("New-bob-1")));
    wait_until(
        Duration::from_secs(20),
        "the target to be reported unavailable",
        || c.consumer_status(k)["targets"]["db"]["unavailable"].is_string(),
    );
    let status = c.consumer_status(k);
    assert_eq!(status["targets"]["db"]["dead_lettered"], 0, "{status}");
    assert!(
        status["targets"]["db"]["retry_depth"].as_u64() >= Some(1),
        "{status}"
    );
    assert!(pg.logs_in("bob", "old-bob"));

    // With the right password again (a restart reads it), the queued change lands; a change
    // for the role the target logs in as is refused, and that login still works.
    std::fs::write(c.path().join("pg.pw"), format!("{SUPERUSER_PW}\n")).expect("pw");
    c.consumers[k].daemon.as_mut().expect("consumer").restart();
    wait_until(Duration::from_secs(30), "bob's change to land", || {
        pg.logs_in("bob", "New-bob-1")
    });
    ok(c.submit(a, "postgres", Op::Replace, Some("Hijack-pw-1")));
    wait_until(Duration::from_secs(20), "the refusal", || {
        c.consumer_status(k)["targets"]["db"]["dead_lettered"].as_u64() == Some(1)
    });
    assert!(pg.logs_in("postgres", SUPERUSER_PW));
    assert!(!pg.logs_in("postgres", "Hijack-pw-1"));
    let status = c.consumer_status(k);
    assert!(
        status["users"]["postgres"]["db"]
            .as_str()
            .is_some_and(|s| s.contains("protected") || s.contains("login")),
        "{status}"
    );
    assert!(status["targets"]["db"]["unavailable"].is_null(), "{status}");
}
