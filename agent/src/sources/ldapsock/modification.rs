//! What an LDAP MODIFY does to `userPassword`, and the pwsync operations that carry it.
//!
//! This is the model the capture is built on, and it has no I/O. [`effect`] takes a MODIFY's
//! modifications of `userPassword` in the order the client sent them and applies them with
//! LDAP's semantics (RFC 4511 §4.6): `add` adds values, `delete` with values removes those,
//! `delete` with none removes every value, `replace` sets exactly its values (none: every value
//! gone). The entry's values before the operation are not known to the overlay, so the result
//! is one of:
//!
//! - [`Effect::Exactly`]: a `replace` or a `delete` of all came first (or later), so what the
//!   directory holds afterwards is known whole;
//! - [`Effect::OwnChange`]: exactly a delete of one value and an add of another (either order):
//!   the form of a person's own change, carried as a replace (which, where the entry holds other
//!   values besides, leaves the targets with the new one alone);
//! - [`Effect::Delta`]: only values were added and deleted. LDAP refuses an add of a value the
//!   entry has and a delete of one it has not, so a value's first modification tells whether it
//!   was there before and its last whether it is there afterwards; only values whose presence
//!   changed are carried (`add X` then `delete X` changes nothing, and carrying a delete of X
//!   would cost a target that cannot compare values, Kerberos, its password). With slapd's
//!   permissive-modify control a client can break that rule; such a change may then be missed.
//!
//! [`Effect::carry`] turns the effect into the operations that leave every target holding what
//! the directory holds after the commit:
//!
//! | effect | operations |
//! |---|---|
//! | exactly some values | `replace` with them |
//! | exactly none | `delete` with no value (every password gone) |
//! | one value deleted, one added (either order): the person's own change | `replace` with the new one, the deleted one as its previous password |
//! | other values deleted and added | `delete` of the deleted ones, then `add` of the added ones |
//! | no password modified | nothing |
//!
//! What pwsync cannot carry whole is a [`Refusal`], never a guess: a value sent already hashed
//! (`{SSHA}…`) that the directory will hold, or a hashed value deleted outside the person's own
//! change (which password it was cannot be told), and a modification kind LDAP does not define
//! for passwords (`increment`). The one hashed value pwsync can do without is the deleted half
//! of a delete-old/add-new: the change is then a replace with no previous password.

use pwsync_proto::{Op, Secret};
use zeroize::Zeroizing;

/// One value of a modification, wiped when dropped.
pub type Value = Zeroizing<Vec<u8>>;

/// A modification's kind, as LDAP defines it for a multi-valued attribute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Add,
    Delete,
    Replace,
    /// Any other kind a message names (`increment`): never a password change pwsync can carry.
    Other,
}

impl Kind {
    /// The kind a sock message's line names (`add:`, `delete:`, `replace:`, `increment:`).
    pub fn from_line(key: &str) -> Option<Kind> {
        match key {
            "add" => Some(Kind::Add),
            "delete" => Some(Kind::Delete),
            "replace" => Some(Kind::Replace),
            "increment" => Some(Kind::Other),
            _ => None,
        }
    }
}

/// One modification of `userPassword`.
pub struct Modification {
    pub kind: Kind,
    pub values: Vec<Value>,
}

/// What the directory holds after the modifications, as far as they tell. (No `Debug`: it
/// holds passwords.)
#[derive(PartialEq, Eq)]
pub enum Effect {
    /// Exactly these values (none: the entry has no password left).
    Exactly(Vec<Value>),
    /// The person's own change: exactly one value deleted and one other added, in one
    /// modification each, either order.
    OwnChange { old: Value, new: Value },
    /// These values deleted and these added; every other value as it was.
    Delta {
        deleted: Vec<Value>,
        added: Vec<Value>,
    },
}

/// Why a modification cannot be carried whole; its text is what the person is shown.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("userPassword was sent already hashed ({{SCHEME}}...): pwsync cannot set a hash on the other systems; send the password itself")]
    HashedValue,
    #[error("a hashed userPassword value is deleted: pwsync cannot tell which password that is; replace the password instead")]
    HashedDelete,
    #[error("a userPassword modification other than add, delete or replace")]
    UnknownKind,
}

/// One pwsync operation that carries (part of) a modification.
pub struct Carried {
    pub op: Op,
    pub values: Vec<Secret>,
    /// The password being replaced (a person's own change), when known.
    pub previous: Option<Secret>,
}

/// A value written as `{SCHEME}…`: a hash, not a password.
pub fn is_hashed(v: &[u8]) -> bool {
    v.first() == Some(&b'{') && v.iter().position(|b| *b == b'}').is_some_and(|i| i > 1)
}

/// Applies `mods` in order with LDAP's semantics.
pub fn effect(mods: &[Modification]) -> Result<Effect, Refusal> {
    // Known whole (after a replace or a delete of all), or values touched since the start:
    // (value, present before, present afterwards). LDAP refuses an add of a value present and a
    // delete of one absent, so a value's first touch tells whether it was there before, and its
    // last touch whether it is there afterwards.
    let mut whole: Option<Vec<Value>> = None;
    let mut touched: Vec<(Value, bool, bool)> = vec![];
    for m in mods {
        match (m.kind, &mut whole) {
            (Kind::Other, _) => return Err(Refusal::UnknownKind),
            (Kind::Replace, w) => {
                let mut values: Vec<Value> = vec![];
                for v in &m.values {
                    if !values.contains(v) {
                        values.push(v.clone());
                    }
                }
                *w = Some(values);
                touched.clear();
            }
            (Kind::Delete, w) if m.values.is_empty() => {
                *w = Some(vec![]);
                touched.clear();
            }
            (Kind::Add, Some(values)) => {
                for v in &m.values {
                    if !values.contains(v) {
                        values.push(v.clone());
                    }
                }
            }
            (Kind::Delete, Some(values)) => values.retain(|v| !m.values.contains(v)),
            (kind, None) => {
                let present = kind == Kind::Add;
                for v in &m.values {
                    match touched.iter_mut().find(|(t, _, _)| t == v) {
                        Some((_, _, after)) => *after = present,
                        None => touched.push((v.clone(), !present, present)),
                    }
                }
            }
        }
    }
    if let [a, b] = mods {
        let one = |m: &Modification, kind| m.kind == kind && m.values.len() == 1;
        let (del, add) = if one(a, Kind::Delete) && one(b, Kind::Add) {
            (a, b)
        } else {
            (b, a)
        };
        if one(del, Kind::Delete) && one(add, Kind::Add) && del.values[0] != add.values[0] {
            return Ok(Effect::OwnChange {
                old: del.values[0].clone(),
                new: add.values[0].clone(),
            });
        }
    }
    Ok(match whole {
        Some(values) => Effect::Exactly(values),
        None => {
            let changed = touched
                .into_iter()
                .filter(|(_, before, after)| before != after);
            let (added, deleted): (Vec<_>, Vec<_>) = changed.partition(|(_, _, after)| *after);
            Effect::Delta {
                deleted: deleted.into_iter().map(|(v, _, _)| v).collect(),
                added: added.into_iter().map(|(v, _, _)| v).collect(),
            }
        }
    })
}

fn secrets(values: &[Value]) -> Vec<Secret> {
    values.iter().map(|v| Secret::new(v.to_vec())).collect()
}

impl Effect {
    /// Every value the directory holds after the commit that this modification sets: what the
    /// password policy must pass before slapd goes on.
    pub fn new_values(&self) -> &[Value] {
        match self {
            Effect::Exactly(values) => values,
            Effect::OwnChange { new, .. } => std::slice::from_ref(new),
            Effect::Delta { added, .. } => added,
        }
    }

    /// The pwsync operations, in order, that leave every target holding what the directory
    /// holds after the commit (none when nothing changes), or why that cannot be done.
    pub fn carry(&self) -> Result<Vec<Carried>, Refusal> {
        if self.new_values().iter().any(|v| is_hashed(v)) {
            return Err(Refusal::HashedValue);
        }
        Ok(match self {
            Effect::Exactly(values) if values.is_empty() => vec![Carried {
                op: Op::Delete,
                values: vec![],
                previous: None,
            }],
            Effect::Exactly(values) => vec![Carried {
                op: Op::Replace,
                values: secrets(values),
                previous: None,
            }],
            Effect::OwnChange { old, new } => vec![Carried {
                op: Op::Replace,
                values: secrets(std::slice::from_ref(new)),
                previous: (!is_hashed(old)).then(|| Secret::new(old.to_vec())),
            }],
            Effect::Delta { deleted, added } => {
                if deleted.iter().any(|v| is_hashed(v)) {
                    return Err(Refusal::HashedDelete);
                }
                let mut out = vec![];
                if !deleted.is_empty() {
                    out.push(Carried {
                        op: Op::Delete,
                        values: secrets(deleted),
                        previous: None,
                    });
                }
                if !added.is_empty() {
                    out.push(Carried {
                        op: Op::Add,
                        values: secrets(added),
                        previous: None,
                    });
                }
                out
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn m(kind: Kind, values: &[&str]) -> Modification {
        Modification {
            kind,
            values: values
                .iter()
                .map(|v| Zeroizing::new(v.as_bytes().to_vec()))
                .collect(),
        }
    }

    /// An operation as text: (op, values, previous).
    type Shown = (Op, Vec<String>, Option<String>);

    fn ops(mods: &[Modification]) -> Result<Vec<Shown>, Refusal> {
        let text = |s: &Secret| String::from_utf8_lossy(s.expose()).to_string();
        Ok(effect(mods)?
            .carry()?
            .into_iter()
            .map(|c| {
                (
                    c.op,
                    c.values.iter().map(text).collect(),
                    c.previous.as_ref().map(text),
                )
            })
            .collect())
    }

    fn own(new: &str, old: Option<&str>) -> Vec<Shown> {
        vec![(Op::Replace, vec![new.into()], old.map(Into::into))]
    }

    #[test]
    fn the_persons_own_change_is_a_replace_with_its_previous_value_in_either_order() {
        use Kind::*;
        let want = own("New", Some("Old"));
        assert_eq!(ops(&[m(Delete, &["Old"]), m(Add, &["New"])]), Ok(want));
        let want = own("New", Some("Old"));
        assert_eq!(ops(&[m(Add, &["New"]), m(Delete, &["Old"])]), Ok(want));
        // An administrator's rotation of a stored hash: a replace without a previous value.
        let rotation = [m(Delete, &["{SSHA}c2FsdA=="]), m(Add, &["New"])];
        assert_eq!(ops(&rotation), Ok(own("New", None)));
    }

    #[test]
    fn the_deleted_value_is_never_the_new_password() {
        use Kind::*;
        // What the last modification held was the old fallback's pick: here the deleted value.
        for mods in [
            vec![m(Add, &["New"]), m(Delete, &["Old"])],
            vec![m(Add, &["A"]), m(Add, &["B"]), m(Delete, &["Old"])],
        ] {
            for (op, values, _) in ops(&mods).unwrap() {
                assert!(
                    !(matches!(op, Op::Replace | Op::Add) && values.contains(&"Old".to_string()))
                );
            }
        }
    }

    #[test]
    fn deleting_every_value_is_a_delete_with_no_value() {
        use Kind::*;
        let all_gone = vec![(Op::Delete, vec![], None)];
        assert_eq!(ops(&[m(Delete, &[])]), Ok(all_gone.clone()));
        assert_eq!(ops(&[m(Replace, &[])]), Ok(all_gone.clone()));
        assert_eq!(ops(&[m(Add, &["X"]), m(Delete, &[])]), Ok(all_gone));
        // Then something added: known whole.
        assert_eq!(
            ops(&[m(Delete, &[]), m(Add, &["X"])]),
            Ok(vec![(Op::Replace, vec!["X".into()], None)])
        );
    }

    #[test]
    fn other_mixes_are_adds_and_deletes_of_what_changed() {
        use Kind::*;
        assert_eq!(
            ops(&[m(Add, &["A"]), m(Add, &["B"])]),
            Ok(vec![(Op::Add, vec!["A".into(), "B".into()], None)])
        );
        assert_eq!(
            ops(&[m(Delete, &["A", "B"])]),
            Ok(vec![(Op::Delete, vec!["A".into(), "B".into()], None)])
        );
        assert_eq!(
            ops(&[m(Delete, &["A", "B"]), m(Add, &["C"])]),
            Ok(vec![
                (Op::Delete, vec!["A".into(), "B".into()], None),
                (Op::Add, vec!["C".into()], None)
            ])
        );
        // Added then deleted again (so absent before and after), or deleted and added again:
        // nothing changed.
        assert_eq!(ops(&[m(Add, &["A"]), m(Delete, &["A"])]), Ok(vec![]));
        assert_eq!(ops(&[m(Delete, &["A"]), m(Add, &["A"])]), Ok(vec![]));
        assert_eq!(
            ops(&[m(Replace, &["A", "B"]), m(Delete, &["A"])]),
            Ok(vec![(Op::Replace, vec!["B".into()], None)])
        );
    }

    #[test]
    fn what_cannot_be_carried_whole_is_refused() {
        use Kind::*;
        assert_eq!(ops(&[m(Replace, &["{SSHA}x"])]), Err(Refusal::HashedValue));
        assert_eq!(
            ops(&[m(Add, &["{CRYPT}x"]), m(Delete, &["Old"])]),
            Err(Refusal::HashedValue)
        );
        assert_eq!(ops(&[m(Delete, &["{SSHA}x"])]), Err(Refusal::HashedDelete));
        assert_eq!(ops(&[m(Other, &["1"])]), Err(Refusal::UnknownKind));
        // A value added and deleted again is no person's own change.
        assert_eq!(
            ops(&[m(Add, &["X"]), m(Add, &["W"]), m(Delete, &["X"])]),
            Ok(vec![(Op::Add, vec!["W".into()], None)])
        );
        // A hashed value replaced away later is no part of the result.
        assert_eq!(
            ops(&[m(Add, &["{SSHA}x"]), m(Replace, &["New"])]),
            Ok(vec![(Op::Replace, vec!["New".into()], None)])
        );
    }

    /// A directory entry's values under LDAP's semantics, written apart from [`effect`].
    fn apply_ldap(before: &BTreeSet<String>, mods: &[(u8, Vec<String>)]) -> BTreeSet<String> {
        let mut s = before.clone();
        for (kind, values) in mods {
            match kind {
                0 => s.extend(values.iter().cloned()),
                1 if values.is_empty() => s.clear(),
                1 => s.retain(|v| !values.contains(v)),
                _ => s = values.iter().cloned().collect(),
            }
        }
        s
    }

    /// What a multi-valued target holds after the carried operations.
    fn apply_target(before: &BTreeSet<String>, ops: &[Shown]) -> BTreeSet<String> {
        let mut s = before.clone();
        for (op, values, _previous) in ops {
            match op {
                // A replace sets exactly its values, with a previous password or without.
                Op::Replace => s = values.iter().cloned().collect(),
                Op::Add => s.extend(values.iter().cloned()),
                Op::Delete if values.is_empty() => s.clear(),
                Op::Delete => s.retain(|v| !values.contains(v)),
                _ => unreachable!("no account operation is carried"),
            }
        }
        s
    }

    proptest! {
        /// Whatever the entry held before (so long as a delete-old/add-new deletes the one
        /// value it held, as a person's own change does), a multi-valued target given the
        /// carried operations holds what the directory holds.
        #[test]
        fn carried_operations_leave_a_target_as_the_directory(
            before in proptest::collection::btree_set("[abc]", 0..3),
            mods in proptest::collection::vec(
                (0u8..3, proptest::collection::vec("[abcd]", 0..3)), 1..5),
        ) {
            let model: Vec<Modification> = mods.iter().map(|(k, vs)| Modification {
                kind: [Kind::Add, Kind::Delete, Kind::Replace][*k as usize],
                values: vs.iter().map(|v| Zeroizing::new(v.as_bytes().to_vec())).collect(),
            }).collect();
            let carried = ops(&model).expect("no hashes here");
            let own_change = matches!(carried.as_slice(), [(Op::Replace, _, Some(_))]);
            if own_change {
                // The form holds only for an entry whose one value is the deleted one.
                let (_, _, old) = &carried[0];
                prop_assume!(before.len() == 1 && before.contains(old.as_ref().unwrap()));
            }
            // Values LDAP refuses (adding one present, deleting one absent) fail the whole
            // operation in the directory: no result to compare.
            let mut s = before.clone();
            let mut valid = true;
            for (kind, values) in &mods {
                match kind {
                    0 => valid &= values.iter().all(|v| !s.contains(v)),
                    1 => valid &= values.iter().all(|v| s.contains(v)),
                    _ => {}
                }
                s = apply_ldap(&s, std::slice::from_ref(&(*kind, values.clone())));
            }
            prop_assume!(valid);
            prop_assert_eq!(apply_target(&before, &carried), apply_ldap(&before, &mods));
        }
    }
}
