//! `pwsync-relay`: parses the command line and reports how it ended; the commands are
//! [`pwsync_relay::cli`]. Every command takes `--config FILE` (default
//! `/etc/pwsync/relay.toml`).

use clap::Parser;
use pwsync_relay::cli::{dispatch, Cli};
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = Cli::parse();
    pwsync_runtime::init_logging();
    match dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("pwsync-relay: {}", pwsync_runtime::error_report(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}
