//! Keyed fingerprints: how pwsync remembers a password without keeping it. A fingerprint is an
//! HMAC-SHA256 of an account name and its password under a random 32-byte key kept beside the
//! fingerprints (in the same redb file, under `hmac` in a `&str → bytes` table), so a copied
//! store tells nothing without that file's own key, and two stores never share fingerprints.
//! The agent's backfill gate, the Samba hook's record of each account and the consumer's
//! echo record all take their key and fingerprints from here.
//!
//! The encodings are fixed: fingerprints already stored stay comparable across upgrades.

use pwsync_proto::Secret;
use redb::ReadableTable;
use zeroize::Zeroizing;

/// Where the key is kept in its table.
const KEY_NAME: &str = "hmac";

/// Why a store's fingerprint key could not be read or made.
#[derive(Debug, thiserror::Error)]
pub enum FingerprintKeyError {
    #[error("reading or storing the fingerprint key: {0}")]
    Storage(#[from] redb::StorageError),
    #[error("the system's random source failed while making a fingerprint key")]
    Random,
}

/// The key a store's fingerprints are made under. Never printed; a clone stays in the process
/// (the consumer's audit thread holds one).
#[derive(Clone)]
pub struct FingerprintKey(aws_lc_rs::hmac::Key);

impl std::fmt::Debug for FingerprintKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FingerprintKey(..)")
    }
}

impl FingerprintKey {
    /// The key kept in `table`, made and stored there (in the caller's write transaction) the
    /// first time.
    pub fn load_or_create(
        table: &mut redb::Table<&str, &[u8]>,
    ) -> Result<FingerprintKey, FingerprintKeyError> {
        let stored = table
            .get(KEY_NAME)?
            .map(|v| Zeroizing::new(v.value().to_vec()));
        let secret = match stored {
            Some(s) => s,
            None => {
                let mut s = Zeroizing::new(vec![0u8; 32]);
                aws_lc_rs::rand::fill(&mut s[..]).map_err(|_| FingerprintKeyError::Random)?;
                table.insert(KEY_NAME, &s[..])?;
                s
            }
        };
        Ok(FingerprintKey(aws_lc_rs::hmac::Key::new(
            aws_lc_rs::hmac::HMAC_SHA256,
            &secret,
        )))
    }

    /// The fingerprint of one password of the account `name`: HMAC(name · NUL · password).
    pub fn of_password(&self, name: &str, password: &[u8]) -> [u8; 32] {
        let mut ctx = aws_lc_rs::hmac::Context::with_key(&self.0);
        ctx.update(name.as_bytes());
        ctx.update(&[0]);
        ctx.update(password);
        finish(ctx)
    }

    /// The fingerprint of the account `name`'s whole set of values, in order:
    /// HMAC(name · for each value (NUL · its length as u32 LE · the value)).
    pub fn of_values(&self, name: &str, values: &[Secret]) -> [u8; 32] {
        let mut ctx = aws_lc_rs::hmac::Context::with_key(&self.0);
        ctx.update(name.as_bytes());
        for v in values {
            ctx.update(&[0]);
            ctx.update(&(v.len() as u32).to_le_bytes());
            ctx.update(v.expose());
        }
        finish(ctx)
    }
}

impl FingerprintKey {
    /// The fingerprint of what a target stores for `account` at `target` (a hash or verifier,
    /// read back for the account audit): HMAC(`verifier` · NUL · target · NUL · account · NUL ·
    /// stored), apart from every password fingerprint by its prefix.
    pub fn of_verifier(&self, target: &str, account: &str, stored: &[u8]) -> [u8; 32] {
        let mut ctx = aws_lc_rs::hmac::Context::with_key(&self.0);
        for part in [
            b"verifier".as_slice(),
            target.as_bytes(),
            account.as_bytes(),
        ] {
            ctx.update(part);
            ctx.update(&[0]);
        }
        ctx.update(stored);
        finish(ctx)
    }
}

fn finish(ctx: aws_lc_rs::hmac::Context) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.sign().as_ref());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const META: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("meta");

    fn key_in(db: &redb::Database) -> FingerprintKey {
        let txn = db.begin_write().unwrap();
        let key = FingerprintKey::load_or_create(&mut txn.open_table(META).unwrap()).unwrap();
        txn.commit().unwrap();
        key
    }

    #[test]
    fn a_store_keeps_its_key_and_two_stores_never_share_fingerprints() {
        let dir = tempfile::tempdir().unwrap();
        let a = redb::Database::create(dir.path().join("a.redb")).unwrap();
        let b = redb::Database::create(dir.path().join("b.redb")).unwrap();
        let first = key_in(&a).of_password("alice", b"pw-1");
        assert_eq!(key_in(&a).of_password("alice", b"pw-1"), first);
        assert_ne!(key_in(&b).of_password("alice", b"pw-1"), first);
        assert_ne!(key_in(&a).of_password("alice", b"pw-2"), first);
        assert_ne!(key_in(&a).of_password("alicf", b"pw-1"), first);
        // The name and password are separated: ("ab", "c") is not ("a", "bc").
        let k = key_in(&a);
        assert_ne!(k.of_password("ab", b"c"), k.of_password("a", b"bc"));
        let v = |s: &str| Secret::new(s.as_bytes().to_vec());
        assert_ne!(
            k.of_values("a", &[v("b"), v("c")]),
            k.of_values("a", &[v("bc")])
        );
        assert_eq!(format!("{k:?}"), "FingerprintKey(..)");
    }
}
