//! `pwsync-bench`: system benchmarks with the real binaries, printed as a markdown table.
//!
//! ```text
//! cargo build --release --workspace --bins && target/release/pwsync-bench [--write BENCHMARKS.md]
//! ```
//! Measures, in one run on this machine: the raw fsync rate of the disk the temp dir is on,
//! durable submits per second through the agent's socket with 1 and 32 concurrent submitters
//! (group commit), and the relay's intake: a backlog drained from an agent's spool into the
//! journal (journaled envelopes per second, journal bytes per envelope).

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

fn main() {
    let write_to = std::env::args().skip_while(|a| a != "--write").nth(1);
    let mut rows: Vec<(String, String)> = Vec::new();

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

    let mut table = String::from("| measurement | result |\n|---|---|\n");
    for (k, v) in &rows {
        table += &format!("| {k} | {v} |\n");
    }
    println!("{table}");
    if let Some(path) = write_to {
        let begin = "<!-- pwsync-bench:begin -->";
        let end = "<!-- pwsync-bench:end -->";
        let doc = std::fs::read_to_string(&path).unwrap_or_default();
        let section = format!("{begin}\n{table}{end}");
        let new = match (doc.find(begin), doc.find(end)) {
            (Some(b), Some(e)) if e > b => {
                format!("{}{section}{}", &doc[..b], &doc[e + end.len()..])
            }
            _ => format!("{doc}\n{section}\n"),
        };
        std::fs::write(&path, new).expect("write benchmarks file");
        println!("written to {path}");
    }
}
