//! `pwsync-relay check`: the config, and everything `run` loads from it, read the way `run`
//! reads it, without binding a listener or opening the journal (a running relay holds both).

use super::load;
use crate::config::RelayConfig;
use crate::credentials::Credentials;
use crate::gateway::tls_acceptor;
use anyhow::Context;
use pwsync_proto::agents::AgentDirectory;
use pwsync_proto::SigningKey;
use pwsync_runtime::mqtt_options;
use std::path::Path;
use std::process::ExitCode;

/// Checks the config at `config`; prints what it found.
pub fn check(config: &Path) -> anyhow::Result<ExitCode> {
    let cfg = load(config)?;
    let key = SigningKey::load(&cfg.keys.signing_key)?;
    for (name, g) in &cfg.groups {
        pwsync_proto::VerifyingKey::load(&g.public_key).with_context(|| format!("group {name}"))?;
    }
    check_what_run_loads(&cfg)?;
    let agents = AgentDirectory::new(&cfg.keys.agents_dir)
        .list()
        .with_context(|| format!("reading agents directory {}", cfg.keys.agents_dir.display()))?;
    if cfg.groups.is_empty() {
        println!("warning: no consumer groups declared; nothing will be delivered");
    }
    println!(
        "{}: OK (relay key {}, {} groups, {} enrolled agents)",
        config.display(),
        key.verifying_key().key_id(),
        cfg.groups.len(),
        agents.len()
    );
    Ok(ExitCode::SUCCESS)
}

/// For `check`: loads, the way `run` does, everything `run` loads besides the signing and group
/// keys (which `check` loads itself): the listener's TLS certificate, key and client CA, the
/// credentials file, the enrolment key, the revocation list, an external broker's `[transport]`
/// files; and checks that the journal folder can be created or written. Binding the listeners
/// and opening the journal are left to `run` (a running relay holds both).
fn check_what_run_loads(cfg: &RelayConfig) -> anyhow::Result<()> {
    let b = &cfg.broker;
    if b.listen.is_some() {
        if b.insecure_plaintext {
            println!("warning: insecure_plaintext = true: the MQTT listener has no TLS");
        } else if let (Some(cert), Some(key)) = (&b.tls_cert, &b.tls_key) {
            tls_acceptor(cert, key, b.client_ca.as_deref())?;
        }
        Credentials::open(&b.credentials)?;
    } else {
        let (host, port) = b.client_address();
        let mut o = mqtt_options(&b.client_id, &host, port, 1);
        cfg.transport
            .clone()
            .unwrap_or_default()
            .apply(&mut o)
            .context("[transport]")?;
    }
    cfg.agent_keys()?;
    if let Some(list) = &cfg.keys.revocation_list {
        // `run` reads a missing list as empty (`revoke` creates it); an unreadable one would
        // withdraw nobody, so it stops `check`.
        if list.exists() {
            std::fs::read_to_string(list)
                .with_context(|| format!("the revocation list {}", list.display()))?;
        }
    }
    check_writable_dir(&cfg.journal.dir).context("journal.dir")?;
    if let Some(js) = &cfg.journal.jetstream {
        let report = pwsync_runtime::tokio_runtime()
            .context("starting the async runtime")?
            .block_on(crate::journal::JetStreamJournal::probe(js))
            .context("[journal.jetstream]")?;
        println!("{report}");
    }
    Ok(())
}

/// `dir` is a folder this process can write to, or can be created (its nearest existing
/// ancestor is writable); a journal database in it is readable and writable.
fn check_writable_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let access = |p: &Path, mode: i32| -> bool {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            // SAFETY: access with a valid NUL-terminated path has no other preconditions.
            .map(|c| unsafe { libc::access(c.as_ptr(), mode) } == 0)
            .unwrap_or(false)
    };
    let mut existing = dir;
    while !existing.exists() {
        match existing.parent() {
            Some(p) => existing = p,
            None => break,
        }
    }
    if !existing.is_dir() {
        anyhow::bail!("{} is not a folder", existing.display());
    }
    if !access(existing, libc::W_OK | libc::X_OK) {
        anyhow::bail!(
            "{} is not writable by this user: {}",
            existing.display(),
            if existing == dir {
                "the relay cannot write its journal there"
            } else {
                "the relay cannot create its journal folder there"
            }
        );
    }
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "redb") && !access(&path, libc::R_OK | libc::W_OK)
        {
            anyhow::bail!(
                "{} is not readable and writable by this user",
                path.display()
            );
        }
    }
    Ok(())
}
