//! Files an operator edits while a daemon runs (credentials, a revocation list), re-read only
//! when they change.

use std::path::{Path, PathBuf};

/// What identifies one version of a file that is replaced by renames or edited in place: its
/// inode, modification time and size (the time alone can repeat within the clock's granularity).
type FileVersion = (u64, i64, i64, u64);

fn file_version(path: &Path) -> Option<FileVersion> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .ok()
        .map(|m| (m.ino(), m.mtime(), m.mtime_nsec(), m.size()))
}

/// A small file an operator edits while a daemon runs (logins, a revocation list): parsed once
/// per version of the file and shared, re-read only when it has changed. A missing file is
/// parsed too (as the parser decides: usually "empty").
pub struct ReloadedFile<T> {
    path: PathBuf,
    cache: std::sync::Mutex<Option<(Option<FileVersion>, std::sync::Arc<T>)>>,
}

impl<T> ReloadedFile<T> {
    pub fn new(path: &Path) -> Self {
        ReloadedFile {
            path: path.to_path_buf(),
            cache: std::sync::Mutex::new(None),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file's current contents, parsed by `parse` if the file changed since the last call.
    pub fn get<E>(
        &self,
        parse: impl FnOnce(&Path) -> Result<T, E>,
    ) -> Result<std::sync::Arc<T>, E> {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        let now = file_version(&self.path);
        match cache.as_ref() {
            Some((seen, value)) if *seen == now => Ok(value.clone()),
            _ => {
                let value = std::sync::Arc::new(parse(&self.path)?);
                *cache = Some((now, value.clone()));
                Ok(value)
            }
        }
    }
}
