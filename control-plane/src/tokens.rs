//! Bootstrap tokens: what a sidecar proves its workload with when it asks
//! for a certificate.
//!
//! A token is `ort1.<id>.<namespace>/<name>.<expiry>.<mac>`: an HMAC-SHA256
//! (key in `<data-dir>/token-key`, 0600) over the rest, so the server checks
//! it without a lookup, plus a record per token in `<data-dir>/tokens.json`
//! so a token can be revoked and listed. The token itself is shown once, at
//! creation, and never stored or logged: only its id is.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use outrigger_config::ResourceRef;
use ring::hmac;
use serde::{Deserialize, Serialize};

const KEY_FILE: &str = "token-key";
const RECORDS_FILE: &str = "tokens.json";
const PREFIX: &str = "ort1";

/// Why a token was refused. The texts go back to the sidecar, so they say
/// what is wrong without echoing the token.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("not an Outrigger bootstrap token")]
    Malformed,
    #[error("the token's signature is wrong (made by another control plane?)")]
    BadSignature,
    #[error("token {id} expired")]
    Expired { id: String },
    #[error("token {id} was revoked")]
    Revoked { id: String },
    #[error("token {id} is unknown to this control plane")]
    Unknown { id: String },
}

/// What is kept about a token: everything but the token.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct TokenRecord {
    pub id: String,
    pub workload: String,
    pub created_at_unix: u64,
    pub expires_at_unix: u64,
    pub created_by: String,
    pub revoked: bool,
}

/// A token just made: the secret, shown once, and its record.
#[derive(Debug)]
pub struct NewToken {
    pub token: String,
    pub record: TokenRecord,
}

/// The token key and records (backup and restore).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TokensExport {
    pub key: String,
    pub records: Vec<TokenRecord>,
}

impl TokensExport {
    /// Writes them into a data dir that has no token key yet; one with
    /// the same key is left alone, one with another is an error.
    pub fn restore_into(&self, data_dir: &Path) -> anyhow::Result<()> {
        let key_path = data_dir.join(KEY_FILE);
        match std::fs::read_to_string(&key_path) {
            Ok(existing) if existing.trim() == self.key => Ok(()),
            Ok(_) => anyhow::bail!(
                "{} holds another token key than the backup's; restore into a fresh data dir",
                key_path.display()
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                crate::auth::write_private(&key_path, format!("{}\n", self.key).as_bytes())?;
                crate::auth::write_private(
                    &data_dir.join(RECORDS_FILE),
                    &serde_json::to_vec_pretty(&self.records)?,
                )?;
                Ok(())
            }
            Err(e) => Err(e).with_context(|| format!("cannot read {}", key_path.display())),
        }
    }
}

pub struct Tokens {
    key: hmac::Key,
    key_hex: String,
    file: PathBuf,
    records: Mutex<Vec<TokenRecord>>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens").finish_non_exhaustive()
    }
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Tokens {
    pub fn open(data_dir: &Path) -> anyhow::Result<Self> {
        let key_path = data_dir.join(KEY_FILE);
        let key_hex = match std::fs::read_to_string(&key_path) {
            Ok(key) => key.trim().to_string(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = crate::auth::random_hex(32)?;
                crate::auth::write_private(&key_path, format!("{key}\n").as_bytes())?;
                key
            }
            Err(e) => {
                return Err(e).with_context(|| format!("cannot read {}", key_path.display()));
            }
        };
        anyhow::ensure!(
            key_hex.len() >= 64,
            "{}: the token key is too short",
            key_path.display()
        );
        let file = data_dir.join(RECORDS_FILE);
        let records = match std::fs::read(&file) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .with_context(|| format!("{} is damaged", file.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", file.display())),
        };
        Ok(Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, key_hex.as_bytes()),
            key_hex,
            file,
            records: Mutex::new(records),
        })
    }

    fn records(&self) -> std::sync::MutexGuard<'_, Vec<TokenRecord>> {
        self.records
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Makes a token for `workload`, valid for `ttl`; durable before it
    /// is returned.
    pub fn create(
        &self,
        workload: &ResourceRef,
        ttl: Duration,
        created_by: &str,
    ) -> anyhow::Result<NewToken> {
        let id = crate::auth::random_hex(8)?;
        let now = now_unix();
        let expires = now.saturating_add(ttl.as_secs());
        let body = format!("{PREFIX}.{id}.{workload}.{expires}");
        let mac = hmac::sign(&self.key, body.as_bytes());
        let token = format!("{body}.{}", hex(mac.as_ref()));
        let record = TokenRecord {
            id,
            workload: workload.to_string(),
            created_at_unix: now,
            expires_at_unix: expires,
            created_by: created_by.to_string(),
            revoked: false,
        };
        let mut records = self.records();
        let mut next = records.clone();
        // Forget tokens long expired, so the file does not grow forever.
        next.retain(|r| r.expires_at_unix.saturating_add(7 * 86_400) > now);
        next.push(record.clone());
        self.save(&next)?;
        *records = next;
        Ok(NewToken { token, record })
    }

    /// Revokes token `id`; false if there is no such token.
    pub fn revoke(&self, id: &str) -> anyhow::Result<bool> {
        let mut records = self.records();
        let mut next = records.clone();
        let Some(record) = next.iter_mut().find(|r| r.id == id) else {
            return Ok(false);
        };
        record.revoked = true;
        self.save(&next)?;
        *records = next;
        Ok(true)
    }

    pub fn list(&self) -> Vec<TokenRecord> {
        self.records().clone()
    }

    pub fn export(&self) -> TokensExport {
        TokensExport {
            key: self.key_hex.clone(),
            records: self.list(),
        }
    }

    /// The workload a valid token is for.
    pub fn verify(&self, token: &str) -> Result<ResourceRef, TokenError> {
        let (body, mac) = token.trim().rsplit_once('.').ok_or(TokenError::Malformed)?;
        let mac = unhex(mac).ok_or(TokenError::Malformed)?;
        let mut fields = body.split('.');
        let (Some(PREFIX), Some(id), Some(workload), Some(expires), None) = (
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
        ) else {
            return Err(TokenError::Malformed);
        };
        hmac::verify(&self.key, body.as_bytes(), &mac).map_err(|_| TokenError::BadSignature)?;
        let expires: u64 = expires.parse().map_err(|_| TokenError::Malformed)?;
        let id = id.to_string();
        if expires <= now_unix() {
            return Err(TokenError::Expired { id });
        }
        match self.records().iter().find(|r| r.id == id) {
            None => return Err(TokenError::Unknown { id }),
            Some(r) if r.revoked => return Err(TokenError::Revoked { id }),
            Some(_) => {}
        }
        outrigger_config::parse_workload_ref(workload).map_err(|_| TokenError::Malformed)
    }

    fn save(&self, records: &[TokenRecord]) -> anyhow::Result<()> {
        let tmp = self.file.with_extension("json.tmp");
        let _ = std::fs::remove_file(&tmp);
        crate::auth::write_private(&tmp, &serde_json::to_vec_pretty(records)?)?;
        std::fs::rename(&tmp, &self.file)
            .with_context(|| format!("cannot write {}", self.file.display()))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn tokens_verify_until_they_expire_or_are_revoked() {
        let dir = tempfile::tempdir().unwrap();
        let tokens = Tokens::open(dir.path()).unwrap();
        let web = ResourceRef::new("shop", "web");
        let new = tokens
            .create(&web, Duration::from_secs(3600), "admin")
            .unwrap();
        assert_eq!(tokens.verify(&new.token), Ok(web.clone()));

        // Tampering with any part breaks the signature.
        let forged = new.token.replace("shop/web", "shop/api");
        assert_eq!(tokens.verify(&forged), Err(TokenError::BadSignature));
        assert_eq!(tokens.verify("hello"), Err(TokenError::Malformed));

        // Another control plane's tokens do not pass.
        let other_dir = tempfile::tempdir().unwrap();
        let other = Tokens::open(other_dir.path()).unwrap();
        assert_eq!(other.verify(&new.token), Err(TokenError::BadSignature));

        // Expired.
        let short = tokens.create(&web, Duration::ZERO, "admin").unwrap();
        assert!(matches!(
            tokens.verify(&short.token),
            Err(TokenError::Expired { .. })
        ));

        // Revoked, and that survives a restart.
        assert!(tokens.revoke(&new.record.id).unwrap());
        assert!(!tokens.revoke("nope").unwrap());
        let reopened = Tokens::open(dir.path()).unwrap();
        assert!(matches!(
            reopened.verify(&new.token),
            Err(TokenError::Revoked { .. })
        ));
        // The file holds no token.
        let file = std::fs::read_to_string(dir.path().join(RECORDS_FILE)).unwrap();
        assert!(!file.contains(&new.token));
    }
}
