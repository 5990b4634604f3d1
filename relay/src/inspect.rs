//! `pwsync-relay journal ls|stats|groups|import`: the journal tools. `ls`, `stats` and
//! `groups` ask the running relay over its admin socket (`JOURNAL_DIR/admin.sock`,
//! [`pwsync_runtime::admin`]), which runs them on its open journal ([`answer`]); with no relay
//! running they open the journal themselves (an embedded one; a JetStream one is read live
//! either way). `import` opens the journal itself (an embedded one with the relay stopped).
//! They show metadata only; the relay cannot decrypt anything and neither can these.

use crate::journal::{Incoming, Intake, Journal};
use pwsync_proto::agents::AgentKeys;
use pwsync_proto::export::ExportReader;
use pwsync_proto::{GroupName, Offset};
use std::collections::BTreeMap;
use std::io::Write;

/// A journal command, as the running relay's admin socket takes it.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub enum JournalRequest {
    Ls,
    Stats,
    Groups,
}

/// Runs `request` on the running relay's journal, its lines to `reply`.
pub async fn answer(
    j: &Journal,
    declared: &[GroupName],
    request: JournalRequest,
    reply: pwsync_runtime::admin::Reply,
) {
    let result = {
        let mut out = pwsync_runtime::admin::LineWriter::new(&reply);
        match request {
            JournalRequest::Ls => ls(j, &mut out).await,
            JournalRequest::Stats => stats(j, &mut out).await,
            JournalRequest::Groups => groups(j, declared, &mut out).await,
        }
    };
    reply.end(result.map_err(|e| format!("{e:#}")));
}

/// One line per record: offset, time received, agent, seq, size.
pub async fn ls(j: &Journal, out: &mut impl Write) -> anyhow::Result<()> {
    let mut from = Offset(0);
    loop {
        let chunk = j.read_from(from, 4096).await?;
        let Some((last, _)) = chunk.last() else {
            return Ok(());
        };
        from = Offset(last.0 + 1);
        for (offset, rec) in chunk {
            match rec {
                Ok(r) => writeln!(
                    out,
                    "{offset}\t{}\t{}\tseq {}\t{} bytes",
                    pwsync_runtime::wall_time(r.received_ms),
                    r.agent,
                    r.seq,
                    r.envelope.len()
                )?,
                Err(e) => writeln!(out, "{offset}\tCORRUPT\t{e}")?,
            }
        }
    }
}

pub async fn stats(j: &Journal, out: &mut impl Write) -> anyhow::Result<()> {
    let s = j.stats().await?;
    let agents = j.agents().await?;
    writeln!(out, "records:      {}", s.records)?;
    writeln!(out, "bytes:        {}", s.bytes)?;
    writeln!(
        out,
        "first offset: {}",
        s.first_offset
            .map(|o| o.to_string())
            .unwrap_or_else(|| "-".into())
    )?;
    writeln!(out, "next offset:  {}", s.next_offset)?;
    writeln!(out, "agents:       {}", agents.len())?;
    for (agent, seq) in &agents {
        writeln!(out, "  {agent}\tjournaled through seq {seq}")?;
    }
    Ok(())
}

pub async fn groups(
    j: &Journal,
    declared: &[GroupName],
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let now = pwsync_proto::hlc::wall_ms();
    for g in j.groups(declared).await? {
        let age = g
            .oldest_unconsumed_ms
            .map(|t| format!("oldest unconsumed {}s old", now.saturating_sub(t) / 1000))
            .unwrap_or_else(|| "nothing unconsumed".into());
        writeln!(
            out,
            "{}\tcommitted {}\tlag {} records\t{age}",
            g.group, g.committed, g.lag_records
        )?;
    }
    Ok(())
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ImportTally {
    pub appended: u64,
    pub duplicates: u64,
    pub refused: u64,
}

async fn import_batch(
    j: &Journal,
    batch: &mut Vec<Incoming>,
    tally: &mut ImportTally,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let applied = j.apply(batch.clone(), Vec::new(), Vec::new(), 0).await?;
    let mut gaps: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for (inc, intake) in batch.iter().zip(applied.intake) {
        match intake {
            Intake::Appended(_) => tally.appended += 1,
            Intake::Duplicate => tally.duplicates += 1,
            Intake::OutOfOrder { expected } => {
                tally.refused += 1;
                gaps.entry(format!(
                    "{} (the journal expects seq {expected} next)",
                    inc.agent
                ))
                .or_insert((inc.seq.0, inc.seq.0))
                .1 = inc.seq.0;
            }
        }
    }
    for (who, (a, b)) in gaps {
        writeln!(
            out,
            "agent {who}: seqs {a}..={b} refused; import the earlier changes first"
        )?;
    }
    batch.clear();
    Ok(())
}

/// Journals the envelopes of a spool export, checking each one's signature as if it had come
/// over MQTT, in batches of one transaction each.
pub async fn import(
    j: &Journal,
    agents: &AgentKeys,
    file: &std::path::Path,
    out: &mut impl Write,
) -> anyhow::Result<ImportTally> {
    use anyhow::Context;
    let f = std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?;
    let bar = pwsync_runtime::progress(f.metadata()?.len(), "importing bytes");
    let mut reader = ExportReader::new(std::io::BufReader::new(bar.wrap_read(f)))?;
    let mut tally = ImportTally::default();
    let mut batch: Vec<Incoming> = Vec::new();
    while let Some((bytes, env)) = reader.next_envelope()? {
        let agent = env.agent().clone();
        let verified = match agents.speaker(&env) {
            Ok(s) if env.verify(&s.key) => true,
            Ok(_) => {
                writeln!(
                    out,
                    "seq {} of {agent}: signature does not verify with the enrolled key; refused",
                    env.seq()
                )?;
                false
            }
            Err(e) => {
                writeln!(out, "seq {} of {agent}: {e}; refused", env.seq())?;
                false
            }
        };
        if !verified {
            tally.refused += 1;
            continue;
        }
        batch.push(Incoming {
            agent,
            seq: env.seq(),
            hlc: env.header().hlc,
            envelope: bytes,
        });
        if batch.len() >= 4096 {
            import_batch(j, &mut batch, &mut tally, out).await?;
        }
    }
    import_batch(j, &mut batch, &mut tally, out).await?;
    bar.finish_and_clear();
    writeln!(
        out,
        "imported {} records ({} already journaled, {} refused)",
        tally.appended, tally.duplicates, tally.refused
    )?;
    Ok(tally)
}
