//! The spool writer: one thread that seals changes and appends them to the spool in groups.
//!
//! Submissions queue on a channel. The writer takes everything queued (up to [`MAX_BATCH`]),
//! gives each change the next sequence number and a clock reading, seals it, writes the whole
//! group in one transaction with one fsync, and only then answers each submitter. So concurrent
//! submits share one flush (group commit), sequence numbers stay gap-free (a failed group leaves
//! `next_seq` where it was), and no submitter hears "accepted" before its change is on disk.
//!
//! The writer also owns the [`Sealer`] (the agent's signing key and the consumers' public key),
//! so it seals the placeholders that replace unreadable spool records.

use crate::spool::{Spool, SpoolRecord};
use pwsync_proto::hlc::wall_ms;
use pwsync_proto::{Change, HybridClock, Sealer, Seq};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use tokio::sync::{oneshot, Notify};

/// Most submissions written in one transaction.
pub const MAX_BATCH: usize = 1024;

/// The reason given when the spool has no room.
pub const SPOOL_FULL: &str =
    "spool is full: the relay has not taken the backlog yet; try again later";

/// What became of one submission.
#[derive(Debug)]
pub enum Outcome {
    Durable(Seq),
    Failed(String),
}

pub enum Job {
    Submit {
        change: Change,
        reply: oneshot::Sender<Outcome>,
    },
    /// Replace the unreadable record at `seq` with a sealed placeholder.
    ReplaceLost {
        seq: Seq,
        reply: oneshot::Sender<Outcome>,
    },
}

/// A handle to submit to the writer thread.
#[derive(Clone)]
pub struct WriterHandle {
    tx: mpsc::Sender<Job>,
}

impl WriterHandle {
    pub async fn submit(&self, change: Change) -> Outcome {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Job::Submit { change, reply }).is_err() {
            return Outcome::Failed("the spool writer has stopped".into());
        }
        rx.await
            .unwrap_or_else(|_| Outcome::Failed("the spool writer has stopped".into()))
    }

    pub async fn replace_lost(&self, seq: Seq) -> Outcome {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Job::ReplaceLost { seq, reply }).is_err() {
            return Outcome::Failed("the spool writer has stopped".into());
        }
        rx.await
            .unwrap_or_else(|_| Outcome::Failed("the spool writer has stopped".into()))
    }
}

/// Starts the writer thread. It stops when every [`WriterHandle`] is dropped.
pub fn start(
    spool: Arc<Spool>,
    sealer: Sealer,
    origin: String,
    clock: Arc<Mutex<HybridClock>>,
    appended: Arc<Notify>,
) -> std::io::Result<(WriterHandle, std::thread::JoinHandle<()>)> {
    let (tx, rx) = mpsc::channel();
    let thread = std::thread::Builder::new()
        .name("spool-writer".into())
        .spawn(move || {
            let mut w = Writer {
                spool,
                sealer,
                origin,
                clock,
            };
            while let Ok(first) = rx.recv() {
                let mut batch = vec![first];
                while batch.len() < MAX_BATCH {
                    match rx.try_recv() {
                        Ok(job) => batch.push(job),
                        Err(_) => break,
                    }
                }
                w.write_batch(batch);
                appended.notify_one();
            }
        })?;
    Ok((WriterHandle { tx }, thread))
}

struct Writer {
    spool: Arc<Spool>,
    sealer: Sealer,
    origin: String,
    clock: Arc<Mutex<HybridClock>>,
}

impl Writer {
    fn now(&self) -> pwsync_proto::Hlc {
        self.clock.lock().unwrap_or_else(|p| p.into_inner()).now()
    }

    fn write_batch(&mut self, batch: Vec<Job>) {
        let mut records = Vec::with_capacity(batch.len());
        let mut replies = Vec::with_capacity(batch.len());
        let mut next = self.spool.next_seq();
        let mut free = self.spool.free_bytes();
        let mut last_hlc = self.spool.last_hlc();
        for job in batch {
            match job {
                Job::Submit { change, reply } => {
                    let hlc = self.now();
                    match self.sealer.seal(next, hlc, &change) {
                        Ok(env) => {
                            let record = SpoolRecord {
                                accepted_ms: wall_ms(),
                                attempts: 0,
                                envelope: env.encode(),
                            }
                            .encode();
                            if record.len() as u64 > free {
                                let _ = reply.send(Outcome::Failed(SPOOL_FULL.into()));
                                continue;
                            }
                            free -= record.len() as u64;
                            last_hlc = last_hlc.max(hlc);
                            records.push((next, record));
                            replies.push((next, reply));
                            next = next.next();
                        }
                        Err(e) => {
                            let _ =
                                reply.send(Outcome::Failed(format!("cannot seal the change: {e}")));
                        }
                    }
                }
                Job::ReplaceLost { seq, reply } => {
                    let outcome = self.replace_lost(seq);
                    let _ = reply.send(outcome);
                }
            }
        }
        match self.spool.append_durable(&records, last_hlc) {
            Ok(()) => {
                for (seq, reply) in replies {
                    let _ = reply.send(Outcome::Durable(seq));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, changes = replies.len(), "spool write failed; changes not taken");
                for (_, reply) in replies {
                    let _ = reply.send(Outcome::Failed(format!("spool write failed: {e}")));
                }
            }
        }
    }

    fn replace_lost(&mut self, seq: Seq) -> Outcome {
        let hlc = self.now();
        let env = match self
            .sealer
            .seal(seq, hlc, &Change::lost(self.origin.clone()))
        {
            Ok(env) => env,
            Err(e) => return Outcome::Failed(e.to_string()),
        };
        let record = SpoolRecord {
            accepted_ms: wall_ms(),
            attempts: 0,
            envelope: env.encode(),
        }
        .encode();
        match self.spool.quarantine(seq, &record) {
            Ok(()) => Outcome::Durable(seq),
            Err(e) => Outcome::Failed(e.to_string()),
        }
    }
}
