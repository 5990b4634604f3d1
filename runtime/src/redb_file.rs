//! Opening a redb file so that a kill can never leave it half made.
//!
//! redb writes a new database's magic number last, so a process killed while it creates one
//! leaves a file that no later open accepts ("invalid data") and the store is bricked until
//! someone moves it away. [`open_or_create`] never creates in place: a missing file is made
//! whole as `NAME.new` (mode 0600), fsynced, renamed over `NAME` and the folder fsynced, so
//! `NAME` is either absent or a complete database. A `NAME.new` left by a kill is only a
//! half-made empty database and is removed. Every pwsync redb file (spool, journal, consumer
//! state, the agent's capture stores) is opened through here.
//!
//! An existing file is opened as it is (redb repairs what an unclean stop left), after its mode
//! is set to 0600: the files hold HMAC keys and, for some, passwords in transit.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// Opens `path`, creating it whole first when it does not exist; `cache_bytes` is redb's cache
/// (its default when `None`). Errors are redb's own, with a clear message for a file that is
/// not a redb database.
pub fn open_or_create(
    path: &Path,
    cache_bytes: Option<usize>,
) -> Result<redb::Database, redb::DatabaseError> {
    let io = |e: std::io::Error| redb::DatabaseError::Storage(redb::StorageError::Io(e));
    let builder = || {
        let mut b = redb::Builder::new();
        if let Some(c) = cache_bytes {
            b.set_cache_size(c);
        }
        b
    };
    if !path.exists() {
        let mut fresh = path.as_os_str().to_owned();
        fresh.push(".new");
        let fresh = std::path::PathBuf::from(fresh);
        match std::fs::remove_file(&fresh) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(e)),
        }
        {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&fresh)
                .map_err(io)?;
            file.set_permissions(std::fs::Permissions::from_mode(0o600))
                .map_err(io)?;
            // redb fsyncs the header it writes last; the database is complete when this ends.
            drop(builder().create_file(file)?);
        }
        std::fs::rename(&fresh, path).map_err(io)?;
        if let Some(dir) = path.parent() {
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io)?;
        }
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    builder().create(path).map_err(|e| match e {
        redb::DatabaseError::Storage(redb::StorageError::Io(e))
            if e.kind() == std::io::ErrorKind::InvalidData =>
        {
            io(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "{} is not a redb database (a creation cut short by an older version, or \
                     another file); move it aside and start again",
                    path.display()
                ),
            ))
        }
        other => other,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_whole_reopens_and_clears_a_half_made_leftover() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.redb");
        // A leftover of a kill during creation: a `.new` with no header.
        std::fs::write(dir.path().join("x.redb.new"), vec![0u8; 4096]).unwrap();
        let db = open_or_create(&path, None).unwrap();
        drop(db);
        assert!(!dir.path().join("x.redb.new").exists());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // Opening again opens the same database.
        open_or_create(&path, Some(1 << 20)).unwrap();
    }

    #[test]
    fn a_file_that_is_not_a_database_is_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.redb");
        std::fs::write(&path, vec![0u8; 8192]).unwrap();
        let e = open_or_create(&path, None).err().unwrap().to_string();
        assert!(e.contains("is not a redb database"), "{e}");
        assert!(e.contains("x.redb"), "{e}");
    }
}
