//! The durable revision log.
//!
//! Every accepted change is one [`Revision`] appended to the log: who made
//! it, when, why (apply, delete, rollback, restore) and what changed, each
//! change carrying the resource's YAML before and after. The current state
//! is derived by replaying the log (see `resources.rs`); nothing else is
//! stored, so the log cannot disagree with the state.
//!
//! The [`Store`] trait is what the server uses, so a shared database can
//! back several control-plane replicas later. [`RedbStore`] is the default:
//! one file in the data dir, written with redb, whose commits are atomic
//! and fsynced before they return (a change is durable before the operator
//! hears "ok", and a crash mid-write leaves the previous revision intact).

use std::path::Path;

use serde::{Deserialize, Serialize};

/// One entry in the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Revision {
    /// 1, 2, 3, ... without gaps.
    pub number: u64,
    /// Milliseconds since the Unix epoch.
    pub at_unix_ms: u64,
    /// Who asked for it (the operator's name as the CLI reports it, or
    /// the token's).
    pub author: String,
    /// `apply`, `delete`, `rollback to 3`, ...
    pub action: String,
    pub changes: Vec<Change>,
}

/// One resource's change within a revision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Change {
    pub kind: String,
    /// Empty for the Mesh.
    pub namespace: String,
    pub name: String,
    /// The document before; `None` when this change created it.
    pub before: Option<String>,
    /// The document after; `None` when this change deleted it.
    pub after: Option<String>,
}

impl Change {
    pub fn op(&self) -> &'static str {
        match (&self.before, &self.after) {
            (None, _) => "created",
            (Some(_), None) => "deleted",
            (Some(_), Some(_)) => "updated",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Another writer appended first; the caller's view is stale.
    #[error("the store moved on: expected to append revision {expected}, but the last is {last}")]
    Conflict { expected: u64, last: u64 },
    #[error("store: {0}")]
    Backend(String),
    #[error("store: revision {number} is corrupt: {reason}")]
    Corrupt { number: u64, reason: String },
}

/// A log of revisions. Implementations must make `append` atomic and
/// durable before it returns.
pub trait Store: Send + Sync + 'static {
    /// Every revision, oldest first, read in one consistent view.
    fn all(&self) -> Result<Vec<Revision>, StoreError>;

    /// Appends `revision`, which must be numbered one past the last.
    fn append(&self, revision: &Revision) -> Result<(), StoreError>;

    /// Appends many revisions at once (a restore): all or nothing, and only
    /// into an empty store.
    fn import(&self, revisions: &[Revision]) -> Result<(), StoreError>;
}

const REVISIONS: redb::TableDefinition<'static, u64, &'static [u8]> =
    redb::TableDefinition::new("revisions");

/// The embedded store: one redb file.
pub struct RedbStore {
    db: redb::Database,
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

impl RedbStore {
    /// Opens the store at `path`, creating it if needed.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = redb::Database::create(path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => StoreError::Backend(format!(
                "{} is in use by another process (is a control plane already running on this data dir?)",
                path.display()
            )),
            e => StoreError::Backend(format!("cannot open {}: {e}", path.display())),
        })?;
        // Create the table up front so that readers of a fresh store see
        // an empty log rather than an error.
        let tx = db.begin_write().map_err(backend)?;
        tx.open_table(REVISIONS).map_err(backend)?;
        tx.commit().map_err(backend)?;
        Ok(Self { db })
    }

    fn last_number(
        table: &impl redb::ReadableTable<u64, &'static [u8]>,
    ) -> Result<u64, StoreError> {
        Ok(table
            .last()
            .map_err(backend)?
            .map(|(k, _)| k.value())
            .unwrap_or(0))
    }
}

impl Store for RedbStore {
    fn all(&self) -> Result<Vec<Revision>, StoreError> {
        use redb::{ReadableDatabase, ReadableTable};
        let tx = self.db.begin_read().map_err(backend)?;
        let table = tx.open_table(REVISIONS).map_err(backend)?;
        let mut out = Vec::new();
        for row in table.iter().map_err(backend)? {
            let (number, bytes) = row.map_err(backend)?;
            let number = number.value();
            let revision: Revision =
                serde_json::from_slice(bytes.value()).map_err(|e| StoreError::Corrupt {
                    number,
                    reason: e.to_string(),
                })?;
            out.push(revision);
        }
        Ok(out)
    }

    fn append(&self, revision: &Revision) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(revision).map_err(backend)?;
        let tx = self.db.begin_write().map_err(backend)?;
        {
            let mut table = tx.open_table(REVISIONS).map_err(backend)?;
            let last = Self::last_number(&table)?;
            if revision.number != last + 1 {
                return Err(StoreError::Conflict {
                    expected: revision.number,
                    last,
                });
            }
            table
                .insert(revision.number, bytes.as_slice())
                .map_err(backend)?;
        }
        // Durability::Immediate (redb's default): fsynced on commit.
        tx.commit().map_err(backend)
    }

    fn import(&self, revisions: &[Revision]) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(backend)?;
        {
            let mut table = tx.open_table(REVISIONS).map_err(backend)?;
            let last = Self::last_number(&table)?;
            if last != 0 {
                return Err(StoreError::Backend(format!(
                    "cannot restore into a store that already holds {last} revisions; use a fresh data dir"
                )));
            }
            for (i, revision) in revisions.iter().enumerate() {
                if revision.number != i as u64 + 1 {
                    return Err(StoreError::Corrupt {
                        number: revision.number,
                        reason: format!("expected revision {} at this place", i + 1),
                    });
                }
                let bytes = serde_json::to_vec(revision).map_err(backend)?;
                table
                    .insert(revision.number, bytes.as_slice())
                    .map_err(backend)?;
            }
        }
        tx.commit().map_err(backend)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn revision(number: u64) -> Revision {
        Revision {
            number,
            at_unix_ms: 1,
            author: "test".into(),
            action: "apply".into(),
            changes: vec![Change {
                kind: "Service".into(),
                namespace: "shop".into(),
                name: "api".into(),
                before: None,
                after: Some(format!("rev: {number}\n")),
            }],
        }
    }

    #[test]
    fn appends_in_order_and_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        {
            let store = RedbStore::open(&path).unwrap();
            assert!(store.all().unwrap().is_empty());
            store.append(&revision(1)).unwrap();
            store.append(&revision(2)).unwrap();
            // A gap or a replay is refused.
            assert!(matches!(
                store.append(&revision(2)),
                Err(StoreError::Conflict { last: 2, .. })
            ));
            assert!(matches!(
                store.append(&revision(4)),
                Err(StoreError::Conflict { .. })
            ));
        }
        let store = RedbStore::open(&path).unwrap();
        assert_eq!(store.all().unwrap(), vec![revision(1), revision(2)]);
    }

    #[test]
    fn a_second_opener_is_refused_with_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        let _first = RedbStore::open(&path).unwrap();
        let err = RedbStore::open(&path).err().unwrap().to_string();
        assert!(err.contains("in use by another process"), "{err}");
    }

    #[test]
    fn import_only_into_an_empty_store_and_all_or_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(&dir.path().join("a.redb")).unwrap();
        // Numbering with a gap: nothing is imported.
        assert!(store.import(&[revision(1), revision(3)]).is_err());
        assert!(store.all().unwrap().is_empty());
        store.import(&[revision(1), revision(2)]).unwrap();
        assert_eq!(store.all().unwrap().len(), 2);
        assert!(store.import(&[revision(1)]).is_err());
    }
}
