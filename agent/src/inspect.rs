//! `pwsync-agent spool ls|show|stats|verify|export`: reading an agent's spool. With the agent
//! running, the command asks it over its admin socket (`SPOOL_DIR/admin.sock`,
//! [`pwsync_runtime::admin`]) and the agent runs the same functions on its open spool
//! ([`answer`]); with it stopped (or on a copy from a broken host), the command opens the spool
//! itself. Shows metadata only: envelopes are sealed for the consumers, so nothing here can show
//! a password, and nothing tries.

use crate::spool::{Spool, SpoolRecord};
use pwsync_proto::{Envelope, Seq, VerifyingKey};
use std::io::Write;

const CHUNK: usize = 4096;

/// A spool command, as the running agent's admin socket takes it.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub enum SpoolRequest {
    Ls,
    Show {
        seq: u64,
    },
    Stats,
    /// With no key, the agent's own.
    Verify {
        agent_key: Option<std::path::PathBuf>,
    },
    /// `file` is absolute (the agent's working folder is not the operator's).
    Export {
        file: std::path::PathBuf,
    },
}

/// Runs `request` on the running agent's `spool` (blocking: call it off the async runtime),
/// its lines to `reply`. `own_key` verifies when the request names no key.
pub fn answer(
    spool: &Spool,
    own_key: &VerifyingKey,
    request: SpoolRequest,
    reply: pwsync_runtime::admin::Reply,
) {
    let result = {
        let mut out = pwsync_runtime::admin::LineWriter::new(&reply);
        match request {
            SpoolRequest::Ls => ls(spool, &mut out),
            SpoolRequest::Show { seq } => show(spool, Seq(seq), &mut out),
            SpoolRequest::Stats => stats(spool, &mut out),
            SpoolRequest::Verify { agent_key } => agent_key
                .map(|p| VerifyingKey::load(&p).map_err(anyhow::Error::from))
                .transpose()
                .and_then(|key| verify(spool, Some(key.as_ref().unwrap_or(own_key)), &mut out))
                .and_then(|bad| match bad {
                    0 => Ok(()),
                    n => Err(anyhow::anyhow!("{n} records failed verification")),
                }),
            SpoolRequest::Export { file } if !file.is_absolute() => Err(anyhow::anyhow!(
                "export needs an absolute path, not {}",
                file.display()
            )),
            SpoolRequest::Export { file } => export(spool, &file, &mut out).map(|_| ()),
        }
    };
    reply.end(result.map_err(|e| format!("{e:#}")));
}

/// Calls `f` for every record in seq order, reading in chunks.
pub fn for_each(
    spool: &Spool,
    mut f: impl FnMut(Seq, Result<&SpoolRecord, String>) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let mut from = Seq(0);
    loop {
        let chunk = spool.read_from(from, CHUNK)?;
        let Some((last, _)) = chunk.last() else {
            return Ok(());
        };
        from = last.next();
        for (seq, rec) in &chunk {
            f(*seq, rec.as_ref().map_err(|e| e.to_string()))?;
        }
    }
}

/// One line per record, starting with its seq.
pub fn ls(spool: &Spool, out: &mut impl Write) -> anyhow::Result<()> {
    for_each(spool, |seq, rec| {
        match rec {
            Ok(r) => match Envelope::decode(&r.envelope) {
                Ok(env) => writeln!(
                    out,
                    "{seq}\t{}\t{} bytes\tresends {}\tkey {}\thlc {}",
                    pwsync_runtime::wall_time(r.accepted_ms),
                    r.envelope.len(),
                    r.attempts,
                    env.header().key_id,
                    env.header().hlc
                )?,
                Err(e) => writeln!(out, "{seq}\tCORRUPT envelope: {e}")?,
            },
            Err(e) => writeln!(out, "{seq}\tCORRUPT record: {e}")?,
        }
        Ok(())
    })
}

pub fn show(spool: &Spool, seq: Seq, out: &mut impl Write) -> anyhow::Result<()> {
    let Some((found, rec)) = spool
        .read_from(seq, 1)?
        .into_iter()
        .next()
        .filter(|(s, _)| *s == seq)
    else {
        anyhow::bail!("no record {seq} in the spool");
    };
    let rec = rec.map_err(|e| anyhow::anyhow!("record {found} is corrupt: {e}"))?;
    writeln!(out, "seq:          {found}")?;
    writeln!(
        out,
        "accepted:     {}",
        pwsync_runtime::wall_time(rec.accepted_ms)
    )?;
    writeln!(out, "resends:      {}", rec.attempts)?;
    writeln!(out, "size:         {} bytes", rec.envelope.len())?;
    let env = Envelope::decode(&rec.envelope)
        .map_err(|e| anyhow::anyhow!("envelope of record {found} is corrupt: {e}"))?;
    let h = env.header();
    writeln!(out, "agent:        {}", h.agent)?;
    writeln!(out, "envelope seq: {}", h.seq)?;
    writeln!(out, "hlc:          {}", h.hlc)?;
    writeln!(out, "key id:       {}", h.key_id.to_hex())?;
    writeln!(
        out,
        "ciphertext:   {} bytes (sealed for the consumers; not readable here)",
        env.ciphertext_len()
    )?;
    Ok(())
}

pub fn stats(spool: &Spool, out: &mut impl Write) -> anyhow::Result<()> {
    let s = spool.stats()?;
    writeln!(out, "records:      {}", s.records)?;
    writeln!(out, "bytes:        {}", s.bytes)?;
    writeln!(out, "next seq:     {}", s.next_seq)?;
    writeln!(out, "acked seq:    {}", s.acked_seq)?;
    match (s.oldest_seq, s.oldest_accepted_ms) {
        (Some(seq), Some(ms)) => writeln!(
            out,
            "oldest:       seq {seq}, accepted {}",
            pwsync_runtime::wall_time(ms)
        )?,
        (Some(seq), None) => writeln!(out, "oldest:       seq {seq} (unreadable)")?,
        _ => writeln!(out, "oldest:       (empty)")?,
    }
    writeln!(out, "quarantined:  {}", s.quarantined)?;
    Ok(())
}

/// Checks every record decodes, is filed under its own seq and (with a key) carries a valid
/// signature. Reports each bad record by seq; returns how many were bad.
pub fn verify(
    spool: &Spool,
    key: Option<&VerifyingKey>,
    out: &mut impl Write,
) -> anyhow::Result<u64> {
    let (mut good, mut bad) = (0u64, 0u64);
    for_each(spool, |seq, rec| {
        let problem = match rec {
            Err(e) => Some(format!("record unreadable: {e}")),
            Ok(r) => match Envelope::decode(&r.envelope) {
                Err(e) => Some(format!("envelope unreadable: {e}")),
                Ok(env) if env.seq() != seq => Some(format!("envelope says seq {}", env.seq())),
                Ok(env) => match key {
                    Some(k) if !env.verify(k) => {
                        Some("signature does not verify with the agent's key".into())
                    }
                    _ => None,
                },
            },
        };
        match problem {
            Some(p) => {
                bad += 1;
                writeln!(out, "{seq}\tBAD\t{p}")?;
            }
            None => good += 1,
        }
        Ok(())
    })?;
    let sig = if key.is_some() {
        "signatures checked"
    } else {
        "signatures NOT checked (no agent key given)"
    };
    writeln!(out, "{good} good, {bad} bad; {sig}")?;
    Ok(bad)
}

/// Writes every readable record to an export file for `pwsync-relay journal import`.
/// Returns (exported, skipped).
pub fn export(
    spool: &Spool,
    file: &std::path::Path,
    out: &mut impl Write,
) -> anyhow::Result<(u64, u64)> {
    use anyhow::Context;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(file)
        .with_context(|| format!("creating {}", file.display()))?;
    let mut w = std::io::BufWriter::new(f);
    pwsync_proto::export::write_header(&mut w)?;
    let (mut n, mut skipped) = (0u64, 0u64);
    let bar = pwsync_runtime::progress(spool.stats()?.records, "exporting");
    for_each(spool, |seq, rec| {
        bar.inc(1);
        match rec.map(|r| (Envelope::decode(&r.envelope), r)) {
            Ok((Ok(_), r)) => {
                pwsync_proto::export::write_record(&mut w, &r.envelope)?;
                n += 1;
            }
            Ok((Err(e), _)) => {
                skipped += 1;
                writeln!(out, "{seq}\tSKIPPED\tenvelope unreadable: {e}")?;
            }
            Err(e) => {
                skipped += 1;
                writeln!(out, "{seq}\tSKIPPED\trecord unreadable: {e}")?;
            }
        }
        Ok(())
    })?;
    bar.finish_and_clear();
    w.flush()?;
    w.get_ref().sync_all()?;
    writeln!(
        out,
        "exported {n} records to {} ({skipped} skipped)",
        file.display()
    )?;
    Ok((n, skipped))
}
