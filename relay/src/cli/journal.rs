//! `pwsync-relay journal`: ls, stats and groups through the running relay's admin socket (or
//! on the journal itself when the relay is stopped); import with an embedded journal's relay
//! stopped.

use super::load;
use crate::inspect;
use crate::journal::Journal;
use crate::reload::AdminRequest;
use anyhow::Context;
use clap::Subcommand;
use pwsync_proto::GroupName;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Subcommand)]
pub enum JournalCommand {
    /// One line per record: offset, time received, agent, seq, size.
    Ls,
    /// Records, bytes, offsets, agents.
    Stats,
    /// Per declared group: committed offset, lag, age of the oldest unconsumed record.
    Groups,
    /// Journal the envelopes of a spool export (`pwsync-agent spool export`).
    Import { file: PathBuf },
}

/// Runs a journal tool on `journal` (default: the config's `journal.dir`).
pub fn run(
    config: &Path,
    journal: Option<PathBuf>,
    command: JournalCommand,
) -> anyhow::Result<ExitCode> {
    let cfg = load(config);
    // --journal names an embedded journal's folder; without it the config decides.
    let explicit = journal.is_some();
    let dir = match (journal, &cfg) {
        (Some(d), _) => d,
        (None, Ok(c)) => c.journal.dir.clone(),
        (None, Err(e)) => {
            anyhow::bail!("no --journal given and the config is unusable: {e}")
        }
    };
    let jetstream = cfg
        .as_ref()
        .ok()
        .filter(|_| !explicit)
        .and_then(|c| c.journal.jetstream.clone());
    let live = match &command {
        JournalCommand::Ls => Some(inspect::JournalRequest::Ls),
        JournalCommand::Stats => Some(inspect::JournalRequest::Stats),
        JournalCommand::Groups => Some(inspect::JournalRequest::Groups),
        JournalCommand::Import { .. } => None,
    };
    if let Some(request) = live {
        let socket = dir.join(pwsync_runtime::admin::SOCKET_NAME);
        match pwsync_runtime::admin::call_printing(
            &socket,
            &AdminRequest::Journal(request),
            "journal",
        ) {
            Ok(()) => return Ok(ExitCode::SUCCESS),
            Err(pwsync_runtime::admin::AdminError::NotRunning(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let rt = pwsync_runtime::tokio_runtime().context("starting the async runtime")?;
    let code = rt.block_on(async {
        let j = Journal::open_for_tools(&dir, jetstream.as_ref()).await?;
        let mut out = std::io::stdout().lock();
        match command {
            JournalCommand::Ls => inspect::ls(&j, &mut out).await?,
            JournalCommand::Stats => inspect::stats(&j, &mut out).await?,
            JournalCommand::Groups => {
                let declared: Vec<GroupName> = cfg
                    .as_ref()
                    .map(|c| c.groups.keys().cloned().collect())
                    .unwrap_or_default();
                if declared.is_empty() {
                    anyhow::bail!("no groups declared (groups come from --config)");
                }
                inspect::groups(&j, &declared, &mut out).await?;
            }
            JournalCommand::Import { file } => {
                let cfg = cfg.as_ref().map_err(|e| {
                    anyhow::anyhow!(
                        "import checks signatures against keys.agents_dir from the config: {e}"
                    )
                })?;
                let tally = inspect::import(&j, &cfg.agent_keys()?, &file, &mut out).await?;
                if tally.refused > 0 {
                    return Ok(ExitCode::FAILURE);
                }
            }
        }
        Ok::<_, anyhow::Error>(ExitCode::SUCCESS)
    })?;
    Ok(code)
}
