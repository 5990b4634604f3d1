//! `pwsync-bench`: system benchmarks with the real binaries, printed as a markdown table.
//!
//! ```text
//! cargo build --release --workspace --bins && target/release/pwsync-bench [SECTION...] [--write BENCHMARKS.md]
//! ```
//! Sections (all when none is named), each a table of its own in BENCHMARKS.md:
//! - `spool`: the raw fsync rate of the disk the temp dir is on, durable submits per second
//!   through the agent's socket with 1 and 32 concurrent submitters (group commit), and the
//!   relay's intake: a backlog drained from an agent's spool into the journal.
//! - `targets`: changes applied per second into a real slapd and a real PostgreSQL by a consumer
//!   draining a journaled backlog, beside what the servers' own clients (`ldapmodify`, `psql`)
//!   reach with the same modifications precomputed, on the same server.

use pwsync_agent::api::Response;
use pwsync_tests::cluster::AgentOptions;
use pwsync_tests::{wait_until, Cluster};
use std::io::Write;
use std::time::{Duration, Instant};

/// 4 KiB writes, each followed by fdatasync, for `secs` seconds.
fn raw_fsync_rate(dir: &std::path::Path, secs: f64) -> f64 {
    let path = dir.join("fsync-probe");
    let mut f = std::fs::File::create(&path).expect("probe file");
    let block = [0u8; 4096];
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed().as_secs_f64() < secs {
        f.write_all(&block).expect("write");
        f.sync_data().expect("fdatasync");
        n += 1;
    }
    let _ = std::fs::remove_file(&path);
    n as f64 / start.elapsed().as_secs_f64()
}

fn submits_per_sec(c: &Cluster, agent: usize, n: usize, concurrency: usize) -> f64 {
    let changes: Vec<(String, String)> = (0..n)
        .map(|i| (format!("user{}", i % 1000), format!("bench-{i}")))
        .collect();
    let start = Instant::now();
    let r = c.submit_many(agent, changes, concurrency);
    let secs = start.elapsed().as_secs_f64();
    assert!(r
        .iter()
        .all(|r| matches!(r, Response::Accepted { durable: true, .. })));
    n as f64 / secs
}

type Rows = Vec<(String, String)>;
/// A named section of the benchmark: its name on the command line and what measures it.
type Section = (&'static str, fn() -> Rows);

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let write_to = args.iter().skip_while(|a| *a != "--write").nth(1).cloned();
    let named: Vec<&str> = args
        .iter()
        .take_while(|a| *a != "--write")
        .map(|a| a.as_str())
        .collect();
    let sections: [Section; 2] = [("spool", spool), ("targets", targets)];
    for (name, run) in sections {
        if !named.is_empty() && !named.contains(&name) {
            continue;
        }
        println!("## {name}");
        let table = to_table(&run());
        println!("{table}");
        if let Some(path) = &write_to {
            write_section(path, name, &table);
            println!("written to {path}");
        }
    }
}

fn to_table(rows: &Rows) -> String {
    let mut table = String::from("| measurement | result |\n|---|---|\n");
    for (k, v) in rows {
        table += &format!("| {k} | {v} |\n");
    }
    table
}

/// Replaces the `<!-- pwsync-bench:NAME:begin/end -->` block of `path` (appends one if none).
fn write_section(path: &str, name: &str, table: &str) {
    let begin = format!("<!-- pwsync-bench:{name}:begin -->");
    let end = format!("<!-- pwsync-bench:{name}:end -->");
    let doc = std::fs::read_to_string(path).unwrap_or_default();
    let section = format!("{begin}\n{table}{end}");
    let new = match (doc.find(&begin), doc.find(&end)) {
        (Some(b), Some(e)) if e > b => {
            format!("{}{section}{}", &doc[..b], &doc[e + end.len()..])
        }
        _ => format!("{doc}\n{section}\n"),
    };
    std::fs::write(path, new).expect("write benchmarks file");
}

fn spool() -> Rows {
    let mut rows = Rows::new();

    let mut c = Cluster::new(&["bench"], "");
    let fsync_before = raw_fsync_rate(c.path(), 2.0);
    rows.push((
        "raw fdatasync of 4 KiB, same disk (before)".into(),
        format!("{fsync_before:.0}/s"),
    ));

    let a = c.add_agent("bench-a", AgentOptions::default());
    c.start_agent(a);
    let one = submits_per_sec(&c, a, 2_000, 1);
    rows.push((
        "durable submits through the socket, 1 submitter".into(),
        format!("{one:.0}/s"),
    ));
    let many = submits_per_sec(&c, a, 20_000, 32);
    rows.push((
        "durable submits through the socket, 32 submitters".into(),
        format!("{many:.0}/s"),
    ));

    // The spool now holds 22,000 envelopes; the relay takes them all.
    let backlog = c.status(a).spool_records;
    let start = Instant::now();
    c.start_relay();
    wait_until(Duration::from_secs(600), "the backlog to drain", || {
        c.status(a).spool_records == 0
    });
    let secs = start.elapsed().as_secs_f64();
    rows.push((
        format!("relay intake: {backlog}-envelope backlog drained into the journal"),
        format!("{secs:.2} s ({:.0} envelopes/s)", backlog as f64 / secs),
    ));
    c.relay().stop();
    let journal_bytes = std::fs::metadata(c.relay_dir.join("journal/journal.redb"))
        .map(|m| m.len())
        .unwrap_or(0);
    rows.push((
        "journal file bytes per envelope (1-password change, ~570 B envelope)".into(),
        format!("{:.0}", journal_bytes as f64 / backlog as f64),
    ));
    let fsync_after = raw_fsync_rate(c.path(), 2.0);
    rows.push((
        "raw fdatasync of 4 KiB, same disk (after)".into(),
        format!("{fsync_after:.0}/s"),
    ));

    rows
}

/// A cluster whose relay journal holds `changes` for group `bench` and whose consumer `k`
/// (configured with `target`) is not started yet.
fn journaled_backlog(target: &str, changes: Vec<(String, String)>) -> (Cluster, usize) {
    let mut c = Cluster::new(&["bench"], "");
    let a = c.add_agent("bench-a", AgentOptions::default());
    let k = c.add_consumer("k", "bench", target);
    c.start_relay();
    c.start_agent(a);
    let r = c.submit_many(a, changes, 32);
    assert!(r
        .iter()
        .all(|r| matches!(r, Response::Accepted { durable: true, .. })));
    wait_until(
        Duration::from_secs(600),
        "the relay to take the backlog",
        || c.status(a).spool_records == 0,
    );
    (c, k)
}

/// Seconds from the consumer's subscription until `done` holds (polled every 20 ms).
fn drain_secs(c: &mut Cluster, k: usize, done: impl Fn() -> bool) -> f64 {
    c.start_consumer(k);
    let start = Instant::now();
    wait_until(Duration::from_secs(1800), "the backlog applied", || {
        std::thread::sleep(Duration::from_millis(20));
        done()
    });
    start.elapsed().as_secs_f64()
}

/// A file holding `contents`, mode 0600, in `dir`.
fn secret_file(dir: &std::path::Path, name: &str, contents: &str) -> String {
    let path = dir.join(name);
    pwsync_relay::pki::write_private(&path, contents).expect("secret file");
    path.display().to_string()
}

fn rate(n: usize, secs: f64) -> String {
    format!("{:.0} changes/s ({n} in {secs:.2} s)", n as f64 / secs)
}

fn targets() -> Rows {
    let mut rows = ldap_target();
    rows.extend(postgres_target());
    rows
}

fn ldap_target() -> Rows {
    use pwsync_tests::slapd::{Slapd, ADMIN_DN, ADMIN_PW};
    const N: usize = 2_000;
    let mut rows = Rows::new();
    let slapd = Slapd::start().expect("slapd (apt-get install slapd ldap-utils)");
    let bind_pw = secret_file(slapd.dir.path(), "bind.pw", ADMIN_PW);
    let users: String = (0..N)
        .map(|i| format!("dn: uid=u{i},ou=people,dc=example,dc=org\nobjectClass: inetOrgPerson\nuid: u{i}\ncn: u{i}\nsn: u{i}\nuserPassword: initial\n\n"))
        .collect();
    slapd.add(&users);

    // The baseline: the same replaces, hashes precomputed, one ldapmodify connection.
    let ldif: String = (0..N)
        .map(|i| {
            let hash = pwsync_consumer::target::ldap::ssha(format!("Base-{i}").as_bytes());
            format!("dn: uid=u{i},ou=people,dc=example,dc=org\nchangetype: modify\nreplace: userPassword\nuserPassword: {hash}\n\n")
        })
        .collect();
    let start = Instant::now();
    slapd.modify(&ldif);
    let secs = start.elapsed().as_secs_f64();
    assert!(slapd.binds(&format!("u{}", N - 1), &format!("Base-{}", N - 1)));
    rows.push((
        format!("slapd: `ldapmodify` alone, {N} userPassword replaces ({{SSHA}} precomputed), one connection"),
        rate(N, secs),
    ));

    for (mode, label) in [
        ("ssha", "{SSHA} computed by pwsync"),
        ("exop", "Password Modify exop, the server hashes"),
    ] {
        let changes = (0..N)
            .map(|i| (format!("u{i}"), format!("{mode}-{i}")))
            .collect();
        let target = format!(
            "[targets.dir]\ntype = \"ldap\"\nsystem = \"ldap\"\nurl = \"{}\"\nbind_dn = \"{ADMIN_DN}\"\nbind_password_file = \"{bind_pw}\"\ndn_template = \"uid={{user}},ou=people,dc=example,dc=org\"\npassword_mode = \"{mode}\"\n",
            slapd.url(),
        );
        let (mut c, k) = journaled_backlog(&target, changes);
        let (user, pw) = (format!("u{}", N - 1), format!("{mode}-{}", N - 1));
        let secs = drain_secs(&mut c, k, || slapd.binds(&user, &pw));
        rows.push((
            format!("slapd: pwsync consumer, {label}, {N}-change journaled backlog"),
            rate(N, secs),
        ));
    }
    rows
}

fn postgres_target() -> Rows {
    use pwsync_tests::pg::{Pg, SUPERUSER_PW};
    const N: usize = 1_000;
    let mut rows = Rows::new();
    let pg = Pg::start().expect("PostgreSQL (apt-get install postgresql; run as root)");
    let pw_file = secret_file(pg.dir.path(), "super.pw", SUPERUSER_PW);
    let script = pg.dir.path().join("setup.sql");
    let mut sql = String::from("CREATE TABLE app_users (login text PRIMARY KEY, pw_hash text);\n");
    for i in 0..N {
        sql +=
            &format!("CREATE ROLE r{i} LOGIN;\nINSERT INTO app_users VALUES ('t{i}', 'none');\n");
    }
    std::fs::write(&script, sql).expect("setup.sql");
    pg.sql_file(&script);

    // The baselines: the same statements, verifiers and hashes precomputed, one psql session.
    let mut roles = String::new();
    let mut table = String::new();
    for i in 0..N {
        let v = postgres_protocol::password::scram_sha_256(format!("Base-{i}").as_bytes());
        roles += &format!("ALTER ROLE r{i} PASSWORD '{v}';\n");
        let h = bcrypt::hash(format!("Base-{i}"), 4).expect("bcrypt");
        table += &format!("UPDATE app_users SET pw_hash = '{h}' WHERE login = 't{i}';\n");
    }
    for (what, sql) in [
        ("ALTER ROLE … PASSWORD 'SCRAM-SHA-256$…'", roles),
        ("UPDATE of a bcrypt column", table),
    ] {
        std::fs::write(&script, sql).expect("baseline.sql");
        let start = Instant::now();
        pg.sql_file(&script);
        rows.push((
            format!("PostgreSQL: `psql` alone, {N} × {what} (precomputed), one session"),
            rate(N, start.elapsed().as_secs_f64()),
        ));
    }

    let connect = format!(
        "[targets.db]\ntype = \"postgres\"\nsystem = \"pg\"\nconnect = \"host=127.0.0.1 port={} user=postgres dbname=postgres\"\npassword_file = \"{pw_file}\"\n",
        pg.port
    );
    let role = (0..N)
        .map(|i| (format!("r{i}"), format!("role-{i}")))
        .collect();
    let (mut c, k) = journaled_backlog(&format!("{connect}mode = \"role\"\n"), role);
    let last = format!("r{}", N - 1);
    let secs = drain_secs(&mut c, k, || pg.logs_in(&last, &format!("role-{}", N - 1)));
    rows.push((
        format!("PostgreSQL: pwsync consumer, role mode (SCRAM-SHA-256 computed by pwsync, 4,096 iterations), {N}-change backlog"),
        rate(N, secs),
    ));
    drop(c);

    for (hash, label) in [
        ("hash = \"bcrypt\"\nbcrypt_cost = 4", "bcrypt cost 4"),
        (
            "hash = \"argon2id\"",
            "argon2id, crate defaults (19 MiB, t=2)",
        ),
    ] {
        let table = (0..N)
            .map(|i| (format!("t{i}"), format!("table-{i}")))
            .collect();
        pg.sql("UPDATE app_users SET pw_hash = 'none'");
        let (mut c, k) = journaled_backlog(
            &format!("{connect}mode = \"table\"\n{hash}\nupdate_sql = \"UPDATE app_users SET pw_hash = $1 WHERE login = $2\"\n"),
            table,
        );
        let q = format!(
            "SELECT pw_hash <> 'none' FROM app_users WHERE login = 't{}'",
            N - 1
        );
        let secs = drain_secs(&mut c, k, || pg.sql(&q) == "t");
        rows.push((
            format!("PostgreSQL: pwsync consumer, table mode, {label}, {N}-change backlog"),
            rate(N, secs),
        ));
    }
    rows
}
