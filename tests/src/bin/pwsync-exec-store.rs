//! An application's user store, kept in step by pwsync's `exec` target: the system the target
//! conformance suite runs the exec plugin protocol against (deploy/EXEC.md), and a worked example
//! of a plugin that keeps to it.
//!
//! ```text
//! pwsync-exec-store apply STORE            the exec target's program: one change (or an
//!                                          audit, answered on stdout), JSON on stdin
//! pwsync-exec-store create STORE ACCOUNT   as the store's administrator; password on stdin
//! pwsync-exec-store login STORE ACCOUNT    the store's own login; password on stdin; exit 0 if in
//! ```
//!
//! The store is one JSON file of accounts, each with its Argon2id password hashes (several: the
//! target is multi-valued) and a lock. Names are byte-exact; an account must exist before its
//! password is set (exit 67, `EX_NOUSER`, as the protocol asks). Each run takes an exclusive
//! lock on `STORE.lock` and replaces the file atomically, so a killed run leaves the old store.
//! Passwords never reach argv, stdout or stderr.

use argon2::password_hash::{PasswordHash, PasswordHasher, SaltString};
use argon2::{Argon2, PasswordVerifier};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

const EX_USAGE: u8 = 64;
const EX_NOUSER: u8 = 67;
const EX_TEMPFAIL: u8 = 75;

#[derive(Default, Serialize, Deserialize)]
struct Account {
    hashes: Vec<String>,
    locked: bool,
}

type Store = BTreeMap<String, Account>;

/// The change document the exec target writes (the fields this program needs).
#[derive(Deserialize)]
struct Doc {
    account: String,
    op: String,
    values: Vec<String>,
}

/// How a run ends: the exit status and a message for stderr (never a password).
struct Exit(u8, String);

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.as_slice() {
        [cmd, store] if cmd == "apply" => with_store(Path::new(store), apply),
        [cmd, store, account] if cmd == "create" => {
            with_store(Path::new(store), |s, input| create(s, account, input))
        }
        [cmd, store, account] if cmd == "login" => login(Path::new(store), account),
        _ => Err(Exit(
            EX_USAGE,
            "usage: pwsync-exec-store apply STORE | create STORE ACCOUNT | login STORE ACCOUNT"
                .into(),
        )),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Exit(code, message)) => {
            eprintln!("pwsync-exec-store: {message}");
            ExitCode::from(code)
        }
    }
}

fn stdin_bytes() -> Result<Vec<u8>, Exit> {
    let mut input = Vec::new();
    std::io::stdin()
        .read_to_end(&mut input)
        .map_err(|e| Exit(EX_TEMPFAIL, format!("reading stdin: {e}")))?;
    Ok(input)
}

fn read_store(path: &Path) -> Result<Store, Exit> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map_err(|e| Exit(1, format!("{} is not a store: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Store::new()),
        Err(e) => Err(Exit(EX_TEMPFAIL, format!("{}: {e}", path.display()))),
    }
}

/// Runs `f` on the store under its lock, with stdin, and writes the store back if `f` succeeds.
fn with_store(
    path: &Path,
    f: impl FnOnce(&mut Store, Vec<u8>) -> Result<(), Exit>,
) -> Result<(), Exit> {
    let lock_path = PathBuf::from(format!("{}.lock", path.display()));
    let lock = std::fs::File::create(&lock_path)
        .map_err(|e| Exit(EX_TEMPFAIL, format!("{}: {e}", lock_path.display())))?;
    // SAFETY: flock on a descriptor this function owns for its whole run.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(Exit(EX_TEMPFAIL, "cannot lock the store".into()));
    }
    let mut store = read_store(path)?;
    f(&mut store, stdin_bytes()?)?;
    let tmp = PathBuf::from(format!("{}.tmp", path.display()));
    let bytes = serde_json::to_vec(&store).map_err(|e| Exit(1, e.to_string()))?;
    std::fs::write(&tmp, bytes)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| Exit(EX_TEMPFAIL, format!("{}: {e}", path.display())))
}

fn hash(password: &[u8]) -> Result<String, Exit> {
    let mut raw = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut raw))
        .map_err(|e| Exit(EX_TEMPFAIL, format!("/dev/urandom: {e}")))?;
    let salt = SaltString::encode_b64(&raw).map_err(|e| Exit(1, format!("salt: {e}")))?;
    Argon2::default()
        .hash_password(password, &salt)
        .map(|h| h.to_string())
        .map_err(|e| Exit(1, format!("hashing: {e}")))
}

fn matches(hash: &str, password: &[u8]) -> bool {
    PasswordHash::new(hash).is_ok_and(|h| Argon2::default().verify_password(password, &h).is_ok())
}

fn apply(store: &mut Store, input: Vec<u8>) -> Result<(), Exit> {
    let doc: Doc =
        serde_json::from_slice(&input).map_err(|e| Exit(1, format!("not a change: {e}")))?;
    if doc.op == "remove" {
        store.remove(&doc.account);
        return Ok(());
    }
    let Some(account) = store.get_mut(&doc.account) else {
        return Err(Exit(EX_NOUSER, format!("no account {:?}", doc.account)));
    };
    match doc.op.as_str() {
        // The account audit: what changes whenever the password does (the hashes), on stdout.
        "audit" => {
            let answer = serde_json::json!({
                "changed_at_ms": null,
                "changed_by": null,
                "verifier": account.hashes.join("\n"),
            });
            println!("{answer}");
        }
        "replace" => {
            account.hashes = doc
                .values
                .iter()
                .map(|v| hash(v.as_bytes()))
                .collect::<Result<_, _>>()?;
        }
        "add" => {
            for v in &doc.values {
                account.hashes.push(hash(v.as_bytes())?);
            }
        }
        // No value: every password goes.
        "delete" if doc.values.is_empty() => account.hashes.clear(),
        "delete" => account
            .hashes
            .retain(|h| !doc.values.iter().any(|v| matches(h, v.as_bytes()))),
        "revoke" => account.locked = true,
        "resume" => account.locked = false,
        other => return Err(Exit(1, format!("unknown operation {other:?}"))),
    }
    Ok(())
}

fn create(store: &mut Store, account: &str, password: Vec<u8>) -> Result<(), Exit> {
    store.insert(
        account.to_string(),
        Account {
            hashes: vec![hash(&password)?],
            locked: false,
        },
    );
    Ok(())
}

fn login(path: &Path, account: &str) -> Result<(), Exit> {
    let password = stdin_bytes()?;
    let store = read_store(path)?;
    match store.get(account) {
        Some(a) if !a.locked && a.hashes.iter().any(|h| matches(h, &password)) => Ok(()),
        _ => Err(Exit(1, "login refused".into())),
    }
}
