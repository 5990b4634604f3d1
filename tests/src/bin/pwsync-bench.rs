//! `pwsync-bench`: system benchmarks with the real binaries, printed as a markdown table.
//!
//! ```text
//! cargo build --release --workspace --bins && target/release/pwsync-bench [SECTION...] [--write BENCHMARKS.md]
//! ```
//! Sections (all when none is named), each a table of its own in BENCHMARKS.md:
//! - `spool`: the raw fsync rate of the disk the temp dir is on, durable submits per second
//!   through the agent's socket with 1 and 32 concurrent submitters (group commit), and the
//!   relay's intake: a backlog drained from an agent's spool into the journal.
//! - `e2e`: changes/s from `submit` to applied at a null target with 1 and 8 agents, p50/p99
//!   submit-to-applied latency at fixed rates of 100 and 1,000 changes/s, the drain time of a
//!   100,000-change backlog after a relay outage, agent memory idle and under load, relay memory
//!   with 1,000 connected idle agents, and the peer baseline: raw MQTT QoS1 messages/s of the
//!   same size through Debian's Mosquitto, started here.
//! - `audit`: the account audit of 10,000 LDAP accounts pwsync wrote, unthrottled (through
//!   `pwsync-consumer audit` on the stopped consumer's state): its time, and the CPU it cost
//!   slapd; and how fast the same consumer applied them, keeping an audit mark at each write.
//! - `agents`: many agent sessions on one relay (`PWSYNC_BENCH_SESSIONS`, default 5,000), held
//!   from this process as agents hold theirs (TLS, a login each, keep-alive pings, the agent's
//!   own reconnect loop with its jittered backoff): the time to enrol and connect them all, the
//!   relay's memory and descriptors per session, and a reconnect storm (the relay killed while a
//!   real agent spools 1,000 changes, then started again): the time until every session is back
//!   and every change applied, and the relay's peak memory meanwhile.
//! - `targets`: changes applied per second into a real slapd and a real PostgreSQL by a consumer
//!   draining a journaled backlog, beside what the servers' own clients (`ldapmodify`, `psql`)
//!   reach with the same modifications precomputed, on the same server.
//! - `ha`: the embedded relay beside two relays sharing a JetStream journal on a three-node NATS
//!   cluster (3 replicas), in one run: throughput and latency, and the pause when the stream's
//!   leader is killed.

use pwsync_agent::api::Response;
use pwsync_tests::cluster::AgentOptions;
use pwsync_tests::{wait_until, Cluster};
use std::io::Write;
use std::time::{Duration, Instant};

/// Records of an envelope's size appended 100 at a time, each hundred followed by fdatasync,
/// for `secs` seconds: the ceiling of a group-committing spool on this disk, in records/s.
fn raw_batched_fsync_rate(dir: &std::path::Path, secs: f64) -> f64 {
    let path = dir.join("fsync-batch-probe");
    let mut f = std::fs::File::create(&path).expect("probe file");
    let record = [0x5au8; 570];
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed().as_secs_f64() < secs {
        for _ in 0..100 {
            f.write_all(&record).expect("write");
        }
        f.sync_data().expect("fdatasync");
        n += 100;
    }
    let _ = std::fs::remove_file(&path);
    n as f64 / start.elapsed().as_secs_f64()
}

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

/// Durable submits per second from `concurrency` submitters, each connecting once per change
/// (as hooks do) or, with `kept_open`, each over one connection it keeps (as a bulk source can).
fn submits_per_sec(
    c: &Cluster,
    agent: usize,
    n: usize,
    concurrency: usize,
    kept_open: bool,
) -> f64 {
    let changes: Vec<(String, String)> = (0..n)
        .map(|i| (format!("user{}", i % 1000), format!("bench-{i}")))
        .collect();
    let start = Instant::now();
    let r = if kept_open {
        c.submit_many_connected(agent, changes, concurrency)
    } else {
        c.submit_many(agent, changes, concurrency)
    };
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
    let sections: [Section; 6] = [
        ("spool", spool),
        ("e2e", e2e),
        ("agents", agents),
        ("targets", targets),
        ("audit", audit),
        ("ha", ha),
    ];
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
    let one = submits_per_sec(&c, a, 2_000, 1, false);
    rows.push((
        "durable submits through the socket, 1 submitter".into(),
        format!("{one:.0}/s"),
    ));
    let many = submits_per_sec(&c, a, 20_000, 32, false);
    let kept = submits_per_sec(&c, a, 20_000, 32, true);
    let batched = raw_batched_fsync_rate(c.path(), 2.0);
    rows.push((
        "raw appends of 570-byte records, 100 per fdatasync, same disk".into(),
        format!("{batched:.0} records/s"),
    ));
    for (how, rate) in [
        ("one connection per change", many),
        ("each over one kept connection", kept),
    ] {
        rows.push((
            format!("durable submits through the socket, 32 submitters, {how}"),
            format!(
                "{rate:.0}/s ({:.0}% of the raw 100-per-fdatasync rate)",
                100.0 * rate / batched
            ),
        ));
    }

    // The spool now holds 42,000 envelopes; the relay takes them all.
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

fn audit() -> Rows {
    use pwsync_tests::slapd::{Slapd, ADMIN_DN, ADMIN_PW};
    const N: usize = 10_000;
    let mut rows = Rows::new();
    let slapd = Slapd::start().expect("slapd (apt-get install slapd ldap-utils)");
    let bind_pw = secret_file(slapd.dir.path(), "bind.pw", ADMIN_PW);
    let users: String = (0..N)
        .map(|i| format!("dn: uid=u{i},ou=people,dc=example,dc=org\nobjectClass: inetOrgPerson\nuid: u{i}\ncn: u{i}\nsn: u{i}\nuserPassword: initial\n\n"))
        .collect();
    slapd.add(&users);
    let target = format!(
        "[audit]\nevery_secs = 0\nreads_per_sec = 1000000\n\n[targets.dir]\ntype = \"ldap\"\nsystem = \"ldap\"\nurl = \"{}\"\nbind_dn = \"{ADMIN_DN}\"\nbind_password_file = \"{bind_pw}\"\ndn_template = \"uid={{user}},ou=people,dc=example,dc=org\"\npassword_mode = \"ssha\"\n",
        slapd.url(),
    );
    let changes = (0..N)
        .map(|i| (format!("u{i}"), format!("audited-{i}")))
        .collect();
    let (mut c, k) = journaled_backlog(&target, changes);
    let (user, pw) = (format!("u{}", N - 1), format!("audited-{}", N - 1));
    let secs = drain_secs(&mut c, k, || slapd.binds(&user, &pw));
    rows.push((
        format!("slapd: pwsync consumer, {{SSHA}}, {N}-change journaled backlog, an audit mark read back after each write"),
        rate(N, secs),
    ));
    c.consumer(k).stop();
    let cfg = c.consumers[k].config.display().to_string();
    let cpu = slapd.cpu_secs();
    let start = Instant::now();
    let out = c.tool("pwsync-consumer", &["--config", &cfg, "audit", "--json"]);
    let secs = start.elapsed().as_secs_f64();
    let cpu = slapd.cpu_secs() - cpu;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("the report");
    assert_eq!(
        report["summary"]["dir"]["in_step"], N,
        "every account in step"
    );
    rows.push((
        format!("account audit of {N} LDAP accounts, unthrottled (`reads_per_sec` not binding), consumer stopped"),
        format!(
            "{secs:.1} s ({:.0} accounts/s); slapd CPU {cpu:.1} s ({:.0}% of one core); at the default 20 reads/s it takes {:.0} s",
            N as f64 / secs,
            100.0 * cpu / secs,
            N as f64 / 20.0
        ),
    ));
    rows
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
            let hash = pwsync_consumer::targets::ldap::ssha(format!("Base-{i}").as_bytes());
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

// ---- end to end ---------------------------------------------------------------------------

/// A consumer target that applies nothing and records each applied change with its time.
fn null_target(record: &std::path::Path) -> String {
    format!(
        "[targets.null]\ntype = \"null\"\nsystem = \"bench-null\"\nrecord_file = \"{}\"\n",
        record.display()
    )
}

/// user → unix ms at which the null target applied it.
fn applied(record: &std::path::Path) -> std::collections::HashMap<String, u64> {
    std::fs::read_to_string(record)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut f = l.split('\t');
            let user = f.next()?.to_string();
            let ms = f.nth(1)?.parse().ok()?;
            Some((user, ms))
        })
        .collect()
}

/// Waits until the null target has recorded `n` changes. Reads only what was appended since the
/// last look, so the watching costs next to nothing beside the system being measured.
fn wait_lines(record: &std::path::Path, n: usize) {
    use std::io::Read;
    let mut file = None;
    let mut seen = 0;
    let mut buf = vec![0u8; 1 << 16];
    wait_until(Duration::from_secs(1800), "every change applied", || {
        std::thread::sleep(Duration::from_millis(10));
        if file.is_none() {
            file = std::fs::File::open(record).ok();
        }
        if let Some(f) = file.as_mut() {
            while let Ok(k @ 1..) = f.read(&mut buf) {
                seen += buf[..k].iter().filter(|c| **c == b'\n').count();
            }
        }
        seen >= n
    });
}

/// Resident memory of a process, in MiB.
fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map(|kib| kib / 1024.0)
        .unwrap_or(0.0)
}

/// CPU seconds (user + system) a process has used so far.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The fields after the parenthesised name: state is field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    (ticks(11) + ticks(12)) / hz
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// A running installation: relay, a consumer with a null target, and `agents` agents.
fn e2e_cluster(agents: usize) -> (Cluster, usize, std::path::PathBuf) {
    e2e_cluster_on(agents, None)
}

/// [`e2e_cluster`], or with `nats`: two relays sharing a JetStream journal (3 replicas) on it,
/// agents spread over them (each lists both, every other one the second relay first), the
/// consumer on the first.
fn e2e_cluster_on(
    agents: usize,
    nats: Option<&pwsync_tests::nats::NatsCluster>,
) -> (Cluster, usize, std::path::PathBuf) {
    // A stream of its own: agents of another installation may have the same names.
    let stream = format!("BENCH{}", pwsync_tests::free_port());
    e2e_cluster_on_stream(agents, nats, &stream)
}

/// [`e2e_cluster_on`] with the JetStream journal on the stream `stream`.
fn e2e_cluster_on_stream(
    agents: usize,
    nats: Option<&pwsync_tests::nats::NatsCluster>,
    stream: &str,
) -> (Cluster, usize, std::path::PathBuf) {
    let mut c = Cluster::new(&["bench"], "");
    if let Some(nats) = nats {
        c.use_jetstream(
            &nats.journal_section_on(stream, 3),
            pwsync_tests::free_port(),
        );
        c.add_relay_replica();
    }
    let first_relay_first = c.endpoints.clone();
    for i in 0..agents {
        if nats.is_some() {
            c.endpoints.reverse();
        }
        c.add_agent(&format!("bench-{i}"), AgentOptions::default());
    }
    c.endpoints = first_relay_first;
    let record = c.path().join("applied.tsv");
    let k = c.add_consumer("k", "bench", &null_target(&record));
    c.start_relay();
    for r in 0..c.replicas.len() {
        c.start_relay_replica(r);
    }
    c.start_consumer(k);
    for i in 0..agents {
        c.start_agent(i);
    }
    (c, k, record)
}

fn changes(prefix: &str, n: usize) -> Vec<(String, String)> {
    (0..n)
        .map(|i| (format!("{prefix}-{i}"), format!("Bench-Pw-{i:08}")))
        .collect()
}

/// Changes per second from the first submit to the last one applied.
/// With `kept_open`, each submitter keeps one connection for all its changes.
fn throughput(agents: usize, per_agent: usize, kept_open: bool) -> f64 {
    let (c, _, record) = e2e_cluster(agents);
    throughput_in(&c, &record, agents, per_agent, kept_open)
}

fn throughput_in(
    c: &Cluster,
    record: &std::path::Path,
    agents: usize,
    per_agent: usize,
    kept_open: bool,
) -> f64 {
    let start = Instant::now();
    std::thread::scope(|s| {
        for a in 0..agents {
            let c = &c;
            s.spawn(move || {
                let mine = changes(&format!("t{a}"), per_agent);
                if kept_open {
                    c.submit_many_connected(a, mine, 32);
                } else {
                    c.submit_many(a, mine, 32);
                }
            });
        }
    });
    wait_lines(record, agents * per_agent);
    (agents * per_agent) as f64 / start.elapsed().as_secs_f64()
}

/// A quantile of a summary in a Prometheus page from 127.0.0.1:`port`/metrics.
fn scrape_quantile(port: u16, name: &str, q: &str) -> Option<f64> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    write!(s, "GET /metrics HTTP/1.0\r\n\r\n").ok()?;
    let mut page = String::new();
    s.read_to_string(&mut page).ok()?;
    let key = format!("{name}{{quantile=\"{q}\"}} ");
    page.lines()
        .find_map(|l| l.strip_prefix(key.as_str()))
        .and_then(|v| v.trim().parse().ok())
}

/// Submit-to-applied latency (ms) at `rate` changes/s for `secs` seconds: p50 and p99 of the
/// whole path, and, to see where it goes, p50 of the durable submit itself and of the agent's
/// publish-to-ack (relay intake and journal) from the agent's metrics.
/// Appends a `[metrics]` section listening on a free loopback port to `config`; returns the port.
fn metrics_on_free_port(config: &std::path::Path) -> u16 {
    use std::io::Write;
    let port = pwsync_tests::free_port();
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(config)
        .expect("config");
    let _ = write!(f, "\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n");
    port
}

fn latency(rate: usize, secs: usize) -> [f64; 5] {
    let (mut c, _, record) = e2e_cluster(1);
    let metrics_port = metrics_on_free_port(&c.agents[0].config);
    let relay_metrics_port = metrics_on_free_port(&c.relay_config);
    c.agent(0).stop();
    c.relay().stop();
    c.start_relay();
    c.start_agent(0);
    let (ms, submit) = at_rate(&c, &record, rate, secs);
    std::thread::sleep(Duration::from_secs(3)); // the agent's metrics refresh
    let to_ack = scrape_quantile(metrics_port, "pwsync_agent_publish_to_ack_seconds", "0.5")
        .map(|s| s * 1000.0)
        .unwrap_or(f64::NAN);
    let commit = scrape_quantile(
        relay_metrics_port,
        "pwsync_relay_journal_commit_seconds",
        "0.5",
    )
    .map(|s| s * 1000.0)
    .unwrap_or(f64::NAN);
    [
        percentile(&ms, 0.5),
        percentile(&ms, 0.99),
        percentile(&submit, 0.5),
        to_ack,
        commit,
    ]
}

/// Submits to agent 0 at `rate` changes/s for `secs` s and waits for all to be applied: the
/// submit → applied latencies and the durable submits' own (ms), each sorted.
fn at_rate(
    c: &Cluster,
    record: &std::path::Path,
    rate: usize,
    secs: usize,
) -> (Vec<f64>, Vec<f64>) {
    let n = rate * secs;
    let threads = 8;
    let start = Instant::now();
    let submitted: Vec<(String, u64, f64)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let c = &c;
                s.spawn(move || {
                    let mut mine = Vec::new();
                    for i in (t..n).step_by(threads) {
                        let due = Duration::from_secs_f64(i as f64 / rate as f64);
                        if let Some(wait) = due.checked_sub(start.elapsed()) {
                            std::thread::sleep(wait);
                        }
                        let user = format!("lat{rate}-{i}");
                        let sent = pwsync_proto::hlc::wall_ms();
                        let t = Instant::now();
                        c.submit(0, &user, pwsync_proto::Op::Replace, Some("Bench-Latency"));
                        mine.push((user, sent, t.elapsed().as_secs_f64() * 1000.0));
                    }
                    mine
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("submitter"))
            .collect()
    });
    wait_lines(record, n);
    let done = applied(record);
    let mut ms: Vec<f64> = submitted
        .iter()
        .filter_map(|(u, sent, _)| done.get(u).map(|a| a.saturating_sub(*sent) as f64))
        .collect();
    ms.sort_by(|a, b| a.total_cmp(b));
    let mut submit: Vec<f64> = submitted.iter().map(|(_, _, d)| *d).collect();
    submit.sort_by(|a, b| a.total_cmp(b));
    (ms, submit)
}

/// The embedded relay beside two relays sharing a JetStream journal on a three-node NATS
/// cluster (3 replicas), in one run: throughput and latency of the same installation.
fn ha() -> Rows {
    let mut rows = Rows::new();
    let Some(mut nats) = pwsync_tests::nats::NatsCluster::start(3) else {
        rows.push((
            "relays on JetStream".into(),
            "not measured (apt-get install nats-server)".into(),
        ));
        return rows;
    };
    for (name, on) in [
        ("embedded relay (redb journal)", None),
        ("2 relays, JetStream journal (3 nodes, R3)", Some(&nats)),
    ] {
        let (c, _, record) = e2e_cluster_on(2, on);
        let rate = throughput_in(&c, &record, 2, 10_000, true);
        rows.push((
            format!("{name}: end to end, 2 agents (32 submitters each, kept connections), 20,000 changes"),
            format!("{rate:.0} changes/s"),
        ));
        drop(c);
        for per_sec in [100, 1_000] {
            let (c, _, record) = e2e_cluster_on(2, on);
            let (ms, _) = at_rate(&c, &record, per_sec, 5);
            rows.push((
                format!("{name}: submit → applied latency at {per_sec} changes/s for 5 s"),
                format!(
                    "p50 {:.0} ms, p99 {:.0} ms",
                    percentile(&ms, 0.5),
                    percentile(&ms, 0.99)
                ),
            ));
        }
    }
    rows.extend(leader_kills(&mut nats));
    rows
}

/// Rounds of [`leader_kills`], changes submitted per second in all, and each round's length.
const KILL_ROUNDS: usize = 3;
const KILL_RATE: usize = 200;
const KILL_ROUND: Duration = Duration::from_secs(20);
/// When in its round the leader is killed, and when it is started again.
const KILL_AT: Duration = Duration::from_secs(4);
const BACK_AT: Duration = Duration::from_secs(14);

/// Changes flow at [`KILL_RATE`] a second from two agents (one on each relay) for
/// [`KILL_ROUNDS`] rounds; in each, the NATS node leading the installation's records stream is
/// SIGKILLed (asked of the nodes' `/jsz`) and later started again. Per round: how long the
/// cluster took to elect a new leader (from the kill until a surviving node names one) and the
/// longest pause between two changes applied at the target after the kill.
fn leader_kills(nats: &mut pwsync_tests::nats::NatsCluster) -> Rows {
    let stream = format!("BENCH{}", pwsync_tests::free_port());
    let (c, _, record) = e2e_cluster_on_stream(2, Some(nats), &stream);
    let n = KILL_RATE * KILL_ROUND.as_secs() as usize * KILL_ROUNDS;
    let threads = 8;
    let start = Instant::now();
    // Per round: the kill's unix ms, and the election's duration.
    let mut kills: Vec<(u64, Option<Duration>)> = Vec::new();
    std::thread::scope(|s| {
        for t in 0..threads {
            let c = &c;
            s.spawn(move || {
                for i in (t..n).step_by(threads) {
                    let due = Duration::from_secs_f64(i as f64 / KILL_RATE as f64);
                    if let Some(wait) = due.checked_sub(start.elapsed()) {
                        std::thread::sleep(wait);
                    }
                    c.submit(
                        i % 2,
                        &format!("kill-{i}"),
                        pwsync_proto::Op::Replace,
                        Some("Bench-Failover"),
                    );
                }
            });
        }
        for round in 0..KILL_ROUNDS {
            let at = KILL_ROUND * round as u32;
            if let Some(wait) = (at + KILL_AT).checked_sub(start.elapsed()) {
                std::thread::sleep(wait);
            }
            let Some(leader) = nats.stream_leader(&stream) else {
                eprintln!("round {round}: no node names a leader of {stream}; not killed");
                continue;
            };
            let name = nats.nodes[leader].name.clone();
            let killed_ms = pwsync_proto::hlc::wall_ms();
            let killed = Instant::now();
            nats.nodes[leader].daemon.kill9();
            let mut elected = None;
            while killed.elapsed() < Duration::from_secs(60) {
                let new = (0..nats.nodes.len())
                    .filter(|i| *i != leader)
                    .find_map(|i| nats.stream_leader_seen_by(i, &stream))
                    .filter(|l| *l != name);
                if new.is_some() {
                    elected = Some(killed.elapsed());
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            eprintln!(
                "round {round}: killed {name}, the stream's leader; new leader after {elected:?}"
            );
            kills.push((killed_ms, elected));
            if let Some(wait) = (at + BACK_AT).checked_sub(start.elapsed()) {
                std::thread::sleep(wait);
            }
            nats.nodes[leader].daemon.start_again();
            nats.wait_healthy(leader, Duration::from_secs(60));
        }
    });
    wait_lines(&record, n);
    let mut times: Vec<u64> = applied(&record)
        .into_iter()
        .filter(|(u, _)| u.starts_with("kill-"))
        .map(|(_, ms)| ms)
        .collect();
    times.sort_unstable();
    let mut rows = Rows::new();
    for (round, (killed_ms, elected)) in kills.iter().enumerate() {
        let until = killed_ms + KILL_ROUND.as_millis() as u64 - KILL_AT.as_millis() as u64;
        // The longest gap between consecutive applied changes ending after the kill.
        let pause = times
            .windows(2)
            .filter(|w| w[1] > *killed_ms && w[1] <= until)
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or(0);
        let elected = match elected {
            Some(e) => format!("{} ms", e.as_millis()),
            None => "none within 60 s".into(),
        };
        rows.push((
            format!(
                "2 relays, JetStream journal (3 nodes, R3): stream leader SIGKILLed at {KILL_RATE} changes/s, round {}",
                round + 1
            ),
            format!("new leader after {elected}; longest pause between applied changes {pause} ms"),
        ));
    }
    rows
}

/// Seconds to drain a `n`-change backlog spooled while the relay was down; the agent's resident
/// memory idle and at its highest while taking the backlog in; and the CPU each process used
/// during the drain (% of one core), which shows which one bounds it.
fn backlog(n: usize) -> (f64, f64, f64, [f64; 3]) {
    let mut c = Cluster::new(&["bench"], "");
    let a = c.add_agent("bench-0", AgentOptions::default());
    let record = c.path().join("applied.tsv");
    let k = c.add_consumer("k", "bench", &null_target(&record));
    c.start_agent(a);
    std::thread::sleep(Duration::from_secs(1));
    let pid = c.agent(a).pid().expect("agent pid");
    let idle = rss_mib(pid);
    let peak = std::sync::atomic::AtomicU64::new(0);
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                peak.fetch_max(
                    (rss_mib(pid) * 1024.0) as u64,
                    std::sync::atomic::Ordering::Relaxed,
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        c.submit_many(a, changes("backlog", n), 32);
        done.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    let start = Instant::now();
    c.start_relay();
    c.start_consumer(k);
    let pids = [
        pid,
        c.relay().pid().expect("relay pid"),
        c.consumer(k).pid().expect("consumer pid"),
    ];
    let cpu_before = pids.map(cpu_secs);
    wait_lines(&record, n);
    let secs = start.elapsed().as_secs_f64();
    let cpu = [0, 1, 2].map(|i| 100.0 * (cpu_secs(pids[i]) - cpu_before[i]) / secs);
    let peak = peak.load(std::sync::atomic::Ordering::Relaxed) as f64 / 1024.0;
    (secs, idle, peak.max(rss_mib(pid)), cpu)
}

/// Open file descriptors of a process.
fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Sessions connected now, of those [`hold_sessions`] holds.
type Connected = std::sync::Arc<std::sync::atomic::AtomicUsize>;

/// Holds one agent session per login from this process, each on the agent's own reconnect loop
/// (`pwsync_runtime::poll_broker`: jittered backoff up to the agent's default 30 s), counting in
/// the returned counter the sessions connected now. The clients must outlive the sessions.
fn hold_sessions(
    c: &Cluster,
    logins: &[pwsync_runtime::transport::TransportConfig],
) -> (Vec<rumqttc::AsyncClient>, Connected) {
    use std::sync::atomic::Ordering::Relaxed;
    let connected = Connected::default();
    let mut clients = Vec::with_capacity(logins.len());
    for (i, t) in logins.iter().enumerate() {
        let mut o =
            pwsync_runtime::mqtt_options(&format!("idle-{i}"), "127.0.0.1", c.relay_port, 16);
        t.apply(&mut o).expect("transport");
        let failover = pwsync_runtime::failover::Failover::new(vec![o.clone()]);
        let (client, el) = pwsync_runtime::mqtt_client(o, 16);
        clients.push(client);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        c.rt.spawn(pwsync_runtime::poll_broker(
            el,
            tx,
            Duration::from_secs(30),
            failover,
            std::sync::Arc::new(tokio::sync::Notify::new()),
        ));
        let count = connected.clone();
        c.rt.spawn(async move {
            let mut up = false;
            while let Some(event) = rx.recv().await {
                match event {
                    pwsync_runtime::BrokerEvent::Connected { .. } if !up => {
                        up = true;
                        count.fetch_add(1, Relaxed);
                    }
                    pwsync_runtime::BrokerEvent::Disconnected(_) if up => {
                        up = false;
                        count.fetch_sub(1, Relaxed);
                    }
                    _ => {}
                }
            }
        });
    }
    (clients, connected)
}

/// Many agent sessions on one relay, and a reconnect storm (see the module docs).
fn agents() -> Rows {
    use std::sync::atomic::Ordering::Relaxed;
    let n: usize = std::env::var("PWSYNC_BENCH_SESSIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5_000);
    let mut rows = Rows::new();
    // The relay holds 3 descriptors per session, this process one: both inherit this limit.
    let open_files = pwsync_runtime::raise_open_files_limit().unwrap_or(0);
    if open_files < 3 * n as u64 + 1_024 {
        rows.push((
            format!("{n} agent sessions"),
            format!("not measured: the relay needs about {} open files and this shell allows {open_files}; run as root under `ulimit -Hn 65536`", 3 * n + 1_024),
        ));
        return rows;
    }
    let mut c = Cluster::new(&["bench"], "");
    let a = c.add_agent("bench-0", AgentOptions::default());
    let record = c.path().join("applied.tsv");
    let k = c.add_consumer("k", "bench", &null_target(&record));
    let enrolling = Instant::now();
    let logins: Vec<_> = (0..n)
        .map(|i| c.login(&format!("agent:idle-{i}")))
        .collect();
    let enrol_secs = enrolling.elapsed().as_secs_f64();
    c.start_relay();
    c.start_consumer(k);
    c.start_agent(a);
    let pid = c.relay().pid().expect("relay pid");
    std::thread::sleep(Duration::from_secs(1));
    let (before, fds_before) = (rss_mib(pid), fd_count(pid));
    let connecting = Instant::now();
    let (_clients, connected) = hold_sessions(&c, &logins);
    let all_back = |what: &str| {
        wait_until(Duration::from_secs(600), what, || {
            std::thread::sleep(Duration::from_millis(50));
            connected.load(Relaxed) >= n
        })
    };
    all_back("every session connected");
    let connect_secs = connecting.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_secs(3));
    let (with, fds_with) = (rss_mib(pid), fd_count(pid));
    rows.push((
        format!("{n} agent sessions (TLS, a login each): enrolled one by one (`pwsync-relay enroll`), then connected all at once"),
        format!("enrolled in {enrol_secs:.1} s; all connected {connect_secs:.1} s after they started"),
    ));
    rows.push((
        format!("relay with {n} idle sessions: resident memory, and per session"),
        format!(
            "{before:.1} MiB without them, {with:.1} MiB with them: {:.1} KiB and {:.1} file descriptors per session",
            (with - before) * 1024.0 / n as f64,
            (fds_with as f64 - fds_before as f64) / n as f64
        ),
    ));

    // The storm: the relay killed; 1,000 changes spooled by the real agent meanwhile; the relay
    // started again, and every session and the agent come back at once.
    const SPOOLED: usize = 1_000;
    c.relay().kill9();
    wait_until(Duration::from_secs(60), "every session lost", || {
        std::thread::sleep(Duration::from_millis(50));
        connected.load(Relaxed) == 0
    });
    let accepted = c
        .submit_many(a, changes("storm", SPOOLED), 32)
        .into_iter()
        .filter(|r| matches!(r, Response::Accepted { durable: true, .. }))
        .count();
    assert_eq!(
        accepted, SPOOLED,
        "changes spooled while the relay was down"
    );
    let peak = std::sync::atomic::AtomicU64::new(0);
    let done = std::sync::atomic::AtomicBool::new(false);
    let restarted = Instant::now();
    c.relay().start_again();
    let pid = c.relay().pid().expect("relay pid");
    let cpu_before = cpu_secs(pid);
    let (back_secs, applied_secs, cpu) = std::thread::scope(|s| {
        let (peak, done) = (&peak, &done);
        s.spawn(move || {
            while !done.load(Relaxed) {
                peak.fetch_max((rss_mib(pid) * 1024.0) as u64, Relaxed);
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let (mut back, mut applied) = (None, None);
        let deadline = Instant::now() + Duration::from_secs(900);
        while (back.is_none() || applied.is_none()) && Instant::now() < deadline {
            if back.is_none() && connected.load(Relaxed) >= n {
                back = Some(restarted.elapsed().as_secs_f64());
            }
            if applied.is_none()
                && std::fs::read_to_string(&record)
                    .map(|t| t.lines().filter(|l| l.starts_with("storm")).count() >= SPOOLED)
                    .unwrap_or(false)
            {
                applied = Some(restarted.elapsed().as_secs_f64());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let busy = 100.0 * (cpu_secs(pid) - cpu_before) / restarted.elapsed().as_secs_f64();
        done.store(true, Relaxed);
        (back, applied, busy)
    });
    let secs = |s: Option<f64>| s.map_or("not within 900 s".to_string(), |s| format!("{s:.1} s"));
    rows.push((
        format!("reconnect storm: relay SIGKILLed, {SPOOLED} changes spooled by a real agent, relay started again with {n} sessions coming back"),
        format!(
            "every session back after {}; every spooled change applied after {}; relay peak {:.1} MiB, {cpu:.0}% of one core until then",
            secs(back_secs),
            secs(applied_secs),
            peak.load(Relaxed) as f64 / 1024.0
        ),
    ));
    rows
}

/// The relay's resident memory with `n` agents connected and idle (each its own login).
fn relay_with_idle_agents(n: usize) -> (f64, f64) {
    let mut c = Cluster::new(&["bench"], "");
    c.start_relay();
    let pid = c.relay().pid().expect("relay pid");
    let before = rss_mib(pid);
    let logins: Vec<_> = (0..n)
        .map(|i| c.login(&format!("agent:idle-{i}")))
        .collect();
    let clients: Vec<_> = logins
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let mut o =
                pwsync_runtime::mqtt_options(&format!("idle-{i}"), "127.0.0.1", c.relay_port, 16);
            t.apply(&mut o).expect("transport");
            let (client, mut el) = pwsync_runtime::mqtt_client(o, 16);
            let task = c.rt.spawn(async move {
                loop {
                    if el.poll().await.is_err() {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            });
            (client, task)
        })
        .collect();
    let seen = c.relay_dir.join("journal/agents-seen.json");
    wait_until(
        Duration::from_secs(300),
        "every idle agent connected",
        || {
            std::thread::sleep(Duration::from_millis(200));
            std::fs::read_to_string(&seen)
                .map(|t| t.matches("\"connections\": 1").count() >= n)
                .unwrap_or(false)
        },
    );
    std::thread::sleep(Duration::from_secs(3));
    let with = rss_mib(pid);
    for (_, task) in clients {
        task.abort();
    }
    (before, with)
}

/// Raw MQTT QoS1 messages/s of `size` bytes through Debian's Mosquitto on loopback: one
/// publisher, one subscriber, in this process.
fn mosquitto_qos1(n: usize, size: usize) -> Option<f64> {
    let dir = tempfile::tempdir().ok()?;
    let port = pwsync_tests::free_port();
    let conf = dir.path().join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 0\n"),
    )
    .ok()?;
    let mut broker = std::process::Command::new("mosquitto")
        .arg("-c")
        .arg(&conf)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()?;
    std::thread::sleep(Duration::from_millis(500));
    let rt = tokio::runtime::Runtime::new().ok()?;
    let rate = rt.block_on(async {
        use rumqttc::{Event, Packet, QoS};
        let mut so = pwsync_runtime::mqtt_options("bench-sub", "127.0.0.1", port, 256);
        so.set_manual_acks(false)
            .set_transport(rumqttc::Transport::Tcp);
        let (sub, mut sub_el) = pwsync_runtime::mqtt_client(so, 1024);
        sub.subscribe("bench/qos1", QoS::AtLeastOnce).await.ok()?;
        let (got_tx, got_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let (mut got, mut tx) = (0usize, Some(got_tx));
            let mut started = None;
            while let Ok(ev) = sub_el.poll().await {
                if let Event::Incoming(Packet::Publish(_)) = ev {
                    started.get_or_insert_with(Instant::now);
                    got += 1;
                    if got == n {
                        if let Some(tx) = tx.take() {
                            let _ = tx.send(());
                        }
                    }
                }
            }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut po = pwsync_runtime::mqtt_options("bench-pub", "127.0.0.1", port, 256);
        po.set_transport(rumqttc::Transport::Tcp);
        let (publisher, mut pub_el) = pwsync_runtime::mqtt_client(po, 1024);
        tokio::spawn(async move { while pub_el.poll().await.is_ok() {} });
        let start = Instant::now();
        let payload = vec![0x5au8; size];
        for _ in 0..n {
            publisher
                .publish("bench/qos1", QoS::AtLeastOnce, false, payload.clone())
                .await
                .ok()?;
        }
        tokio::time::timeout(Duration::from_secs(120), got_rx)
            .await
            .ok()?
            .ok()?;
        Some(n as f64 / start.elapsed().as_secs_f64())
    });
    let _ = broker.kill();
    let _ = broker.wait();
    rate
}

fn e2e() -> Rows {
    let mut rows = Rows::new();
    let envelope = 570;
    let mosquitto = mosquitto_qos1(100_000, envelope);
    rows.push((
        format!("peer baseline: Mosquitto, raw MQTT QoS1, {envelope}-byte messages, 1 publisher → 1 subscriber, loopback"),
        mosquitto.map(|r| format!("{r:.0} msgs/s")).unwrap_or_else(|| "not measured (apt-get install mosquitto)".into()),
    ));
    let ratio = |r: f64| {
        mosquitto
            .map(|m| format!(" ({:.0}% of Mosquitto QoS1)", 100.0 * r / m))
            .unwrap_or_default()
    };
    let one = throughput(1, 20_000, false);
    rows.push((
        "end to end, 1 agent (32 submitters), 20,000 changes, submit → applied at a null target, durable at every hop".into(),
        format!("{one:.0} changes/s{}", ratio(one)),
    ));
    let kept = throughput(1, 20_000, true);
    rows.push((
        "end to end, 1 agent, 32 submitters each over one kept connection, 20,000 changes".into(),
        format!("{kept:.0} changes/s{}", ratio(kept)),
    ));
    let eight = throughput(8, 2_500, false);
    rows.push((
        "end to end, 8 agents (32 submitters each), 20,000 changes".into(),
        format!("{eight:.0} changes/s{}", ratio(eight)),
    ));
    rows.extend(latency_rows());
    let (drain, idle, peak, cpu) = backlog(100_000);
    rows.push((
        "100,000-change backlog (spooled while the relay was down) drained to applied".into(),
        format!(
            "{drain:.1} s ({:.0} changes/s; CPU during the drain: agent {:.0}%, relay {:.0}%, consumer {:.0}% of one core)",
            100_000.0 / drain,
            cpu[0],
            cpu[1],
            cpu[2]
        ),
    ));
    rows.push((
        "agent resident memory: idle / peak while spooling 100,000 changes".into(),
        format!("{idle:.1} MiB / {peak:.1} MiB"),
    ));
    let (before, with) = relay_with_idle_agents(1_000);
    rows.push((
        "relay resident memory: no client / 1,000 connected idle agents (TLS, own logins)".into(),
        format!("{before:.1} MiB / {with:.1} MiB"),
    ));
    rows
}

fn latency_rows() -> Rows {
    let mut rows = Rows::new();
    for rate in [100, 1_000] {
        let [p50, p99, submit, to_ack, commit] = latency(rate, 5);
        rows.push((
            format!("submit → applied latency at {rate} changes/s for 5 s"),
            format!("p50 {p50:.0} ms, p99 {p99:.0} ms (p50 of its parts: durable submit {submit:.1} ms, publish → relay ack {to_ack:.1} ms, of which the relay's journal commit {commit:.1} ms)"),
        ));
    }
    rows
}
