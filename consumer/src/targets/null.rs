//! `null`: applies nothing and always succeeds. For measuring the pipeline itself (benchmarks)
//! and for trying a configuration out; with `record_file`, one line per applied change is
//! appended there: `user<TAB>op<TAB>unix-ms`, never a value.

use super::{Limits, Outcome, Target, Unusable};
use pwsync_proto::Change;
use serde::Deserialize;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NullConfig {
    #[serde(default)]
    pub record_file: Option<PathBuf>,
}

pub struct Null {
    record: Option<Mutex<std::fs::File>>,
}

impl Null {
    pub fn new(cfg: NullConfig, base: &Path) -> Result<Null, String> {
        let record = match cfg.record_file {
            Some(p) => {
                let p = pwsync_runtime::resolve(base, &p);
                let f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&p)
                    .map_err(|e| format!("record_file {}: {e}", p.display()))?;
                Some(Mutex::new(f))
            }
            None => None,
        };
        Ok(Null { record })
    }
}

impl Target for Null {
    fn apply(&self, change: &Change, account: &str) -> Outcome {
        if let Some(f) = &self.record {
            let line = format!(
                "{account}\t{}\t{}\n",
                change.op,
                pwsync_proto::hlc::wall_ms()
            );
            let mut f = f.lock().unwrap_or_else(|p| p.into_inner());
            if let Err(e) = f.write_all(line.as_bytes()) {
                return Outcome::RetryLater(format!("record_file: {e}"));
            }
        }
        Outcome::Applied
    }

    fn check(&self) -> Result<(), Unusable> {
        Ok(())
    }

    fn limits(&self) -> Limits {
        Limits {
            password_utf8: false,
            multi_valued: true,
            ..Limits::text("nothing (a record of the change)")
        }
    }
}
