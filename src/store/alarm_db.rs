//! The alarm stage's database, `<data>/alarms/`: every alarm that is not cleared (its state,
//! acknowledgement and history), each subject's NEWS2 state and settings, and whom the silence
//! rules watch, so that a restart neither forgets an alarm nor raises it a second time.
//!
//! Apart from the store: it changes with acknowledgements and scores, not with batches, and
//! losing it loses no reading.

use std::fs::File;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::alarm::lifecycle::AlarmRecord;
use crate::alarm::news2::SubjectState;

#[derive(Debug, thiserror::Error)]
#[error("alarm database {path}: {reason}")]
pub struct AlarmDbError {
    pub path: String,
    pub reason: String,
}

/// A silence rule's watch on someone, as kept.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WatchRecord {
    pub rule: String,
    pub who: String,
    pub raised: bool,
}

pub struct AlarmDb {
    path: String,
    db: sled::Db,
    alarms: sled::Tree,
    subjects: sled::Tree,
    watches: sled::Tree,
    log: File,
}

impl std::fmt::Debug for AlarmDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlarmDb").field("path", &self.path).finish()
    }
}

/// `subject NUL rule`: NUL cannot appear in a rule name.
fn alarm_key(subject: &str, rule: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(subject.len() + rule.len() + 1);
    k.extend_from_slice(subject.as_bytes());
    k.push(0);
    k.extend_from_slice(rule.as_bytes());
    k
}

impl AlarmDb {
    pub fn open(path: &Path) -> Result<Self, AlarmDbError> {
        let name = path.display().to_string();
        let err = |e: &dyn std::fmt::Display| AlarmDbError {
            path: name.clone(),
            reason: e.to_string(),
        };
        let db = super::open_sled(sled::Config::new().path(path).cache_capacity(2 << 20))
            .map_err(|e| err(&e))?;
        let log = super::sled_log(path).map_err(|e| err(&e))?;
        Ok(AlarmDb {
            alarms: db.open_tree("alarms").map_err(|e| err(&e))?,
            subjects: db.open_tree("subjects").map_err(|e| err(&e))?,
            watches: db.open_tree("watches").map_err(|e| err(&e))?,
            path: name.clone(),
            db,
            log,
        })
    }

    fn err(&self, e: impl std::fmt::Display) -> AlarmDbError {
        AlarmDbError {
            path: self.path.clone(),
            reason: e.to_string(),
        }
    }

    /// Keeps an alarm (a cleared one is removed).
    pub fn put_alarm(&self, r: &AlarmRecord) -> Result<(), AlarmDbError> {
        let key = alarm_key(r.subject(), r.rule());
        if r.state == crate::alarm::lifecycle::AlarmState::Cleared {
            self.alarms.remove(key).map_err(|e| self.err(e))?;
        } else {
            let v = serde_json::to_vec(r).expect("a record serialises");
            self.alarms.insert(key, v).map_err(|e| self.err(e))?;
        }
        Ok(())
    }

    /// Every alarm kept. A record that does not parse (a damaged file) is logged and skipped,
    /// not a reason to refuse to start: a ward without alarm monitoring is worse than one alarm
    /// lost. Its key names a patient, so the log says only where the record failed.
    pub fn alarms(&self) -> Result<Vec<AlarmRecord>, AlarmDbError> {
        let mut out = Vec::new();
        for kv in self.alarms.iter() {
            let (_, v) = kv.map_err(|e| self.err(e))?;
            match serde_json::from_slice(&v) {
                Ok(r) => out.push(r),
                Err(e) => tracing::error!(
                    path = %self.path,
                    line = e.line(),
                    column = e.column(),
                    "an alarm record could not be read and is skipped"
                ),
            }
        }
        Ok(out)
    }

    pub fn put_subject(&self, subject: &str, s: &SubjectState) -> Result<(), AlarmDbError> {
        let v = serde_json::to_vec(s).expect("a state serialises");
        self.subjects
            .insert(subject.as_bytes(), v)
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    pub fn subjects(&self) -> Result<Vec<(String, SubjectState)>, AlarmDbError> {
        self.subjects
            .iter()
            .map(|kv| {
                let (k, v) = kv.map_err(|e| self.err(e))?;
                let subject = String::from_utf8_lossy(&k).into_owned();
                let s = serde_json::from_slice(&v).map_err(|e| {
                    self.err(format!(
                        "a subject's NEWS2 state does not parse (line {}, column {})",
                        e.line(),
                        e.column()
                    ))
                })?;
                Ok((subject, s))
            })
            .collect()
    }

    /// Replaces the silence watches kept.
    pub fn put_watches(&self, watches: &[WatchRecord]) -> Result<(), AlarmDbError> {
        self.watches.clear().map_err(|e| self.err(e))?;
        for (i, w) in watches.iter().enumerate() {
            let v = serde_json::to_vec(w).expect("a watch serialises");
            self.watches
                .insert((i as u64).to_be_bytes(), v)
                .map_err(|e| self.err(e))?;
        }
        Ok(())
    }

    pub fn watches(&self) -> Result<Vec<WatchRecord>, AlarmDbError> {
        self.watches
            .iter()
            .map(|kv| {
                let (_, v) = kv.map_err(|e| self.err(e))?;
                serde_json::from_slice(&v).map_err(|e| {
                    self.err(format!(
                        "a silence watch does not parse (line {}, column {})",
                        e.line(),
                        e.column()
                    ))
                })
            })
            .collect()
    }

    /// Makes every change so far durable.
    pub fn flush(&self) -> Result<(), AlarmDbError> {
        super::make_durable(&self.db, &self.log).map_err(|e| self.err(e))
    }
}
