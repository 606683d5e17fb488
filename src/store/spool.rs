//! The spool: usage rows on local disk, in append-only segment files of
//! JSON lines, for rows the database cannot take yet (an outage past the
//! writer's memory) and, with `durability = "spool"`, for every row until it
//! is in the database.
//!
//! Owned by the usage writer's task alone. A segment is deleted only when
//! every row in it is known to be in the database; segments left by an
//! earlier process are replayed at start. Replays are idempotent (the
//! database skips request ids it holds), so a row lands exactly once.
//! Total size is capped (`database.spool_max_bytes`).

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};

use super::UsageRecord;

/// A segment is closed (and a new one started) past this size.
const SEGMENT_BYTES: u64 = 8 << 20;

/// One usage row as a spool line.
#[derive(Serialize, Deserialize)]
struct SpoolRow {
    created_at: String,
    request_id: String,
    team: String,
    key_id: Option<String>,
    model: String,
    base_model: String,
    upstream: String,
    endpoint: String,
    stream: bool,
    status: u16,
    prompt_tokens: u64,
    completion_tokens: u64,
    cached_tokens: u64,
    cost_nano_usd: u64,
    token_source: String,
    latency_ms: u64,
    end_user: Option<String>,
    #[serde(default)]
    service_tier: Option<String>,
    #[serde(default)]
    reasoning_tokens: u64,
    #[serde(default)]
    audio_prompt_tokens: u64,
    #[serde(default)]
    audio_completion_tokens: u64,
    #[serde(default)]
    cache_write_tokens: u64,
    #[serde(default)]
    image_tokens: u64,
    #[serde(default)]
    tool_calls: u64,
    #[serde(default)]
    provider: String,
    /// Nano-USD per breakdown line, by name (the `cost_breakdown` column).
    #[serde(default)]
    breakdown: Option<String>,
    /// Rows spooled before `breakdown`: nano-USD per line, in `LEGACY_LINES` order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    cost_breakdown: Vec<u64>,
    #[serde(default = "one")]
    attempts: u16,
    #[serde(default = "one")]
    choices: u16,
    #[serde(default)]
    capped: bool,
    /// The `meters` column's JSON (absent in rows spooled before it).
    #[serde(default)]
    meters: Option<String>,
    /// The team's shared budget period (rows spooled before `leases`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    budget_period: Option<String>,
    /// The shared budgets (account, period) whose leases paid.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    leases: Vec<(String, String)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tags: Option<String>,
    lease_node: Option<String>,
    /// A batch result line's batch (absent in rows spooled before it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    batch_id: Option<String>,
}

fn one() -> u16 {
    1
}

/// The breakdown lines of rows spooled before breakdowns were spooled by
/// name (the 1-hour cache writes were then on `cache_write`).
const LEGACY_LINES: [&str; 10] = [
    "input",
    "cached_input",
    "cache_write",
    "output",
    "audio_input",
    "audio_output",
    "image_input",
    "image_output",
    "tool_calls",
    "gpu",
];

fn legacy_breakdown(positional: &[u64]) -> crate::pricing::Breakdown {
    let mut b = crate::pricing::Breakdown::default();
    for (name, n) in LEGACY_LINES.iter().zip(positional) {
        if let Some(line) = crate::pricing::Line::from_name(name) {
            b.0[line.index()] = *n;
        }
    }
    b
}

impl SpoolRow {
    fn from_record(r: &UsageRecord, node: Option<&str>) -> SpoolRow {
        SpoolRow {
            created_at: r.created_at.to_rfc3339_opts(SecondsFormat::Nanos, true),
            request_id: r.request_id.clone(),
            team: r.team.clone(),
            key_id: r.key_id.clone(),
            model: r.model.clone(),
            base_model: r.base_model.clone(),
            upstream: r.upstream.clone(),
            endpoint: r.endpoint.to_string(),
            stream: r.stream,
            status: r.status,
            prompt_tokens: r.prompt_tokens,
            completion_tokens: r.completion_tokens,
            cached_tokens: r.cached_tokens,
            cost_nano_usd: r.cost_nano_usd,
            token_source: r.token_source.to_string(),
            latency_ms: r.latency_ms,
            end_user: r.end_user.clone(),
            service_tier: r.service_tier.map(str::to_string),
            reasoning_tokens: r.reasoning_tokens,
            audio_prompt_tokens: r.audio_prompt_tokens,
            audio_completion_tokens: r.audio_completion_tokens,
            cache_write_tokens: r.cache_write_tokens,
            image_tokens: r.image_tokens,
            tool_calls: r.tool_calls,
            provider: r.provider.to_string(),
            breakdown: Some(r.cost_breakdown.to_json()),
            cost_breakdown: Vec::new(),
            attempts: r.attempts,
            choices: r.choices,
            capped: r.capped,
            meters: Some(r.meters.to_json()),
            budget_period: None,
            leases: r.budget_leases.clone(),
            tags: r.tags.clone(),
            lease_node: r.lease_node.clone().or_else(|| {
                (!r.budget_leases.is_empty())
                    .then(|| node.map(str::to_string))
                    .flatten()
            }),
            batch_id: r.batch_id.clone(),
        }
    }

    fn into_record(self) -> UsageRecord {
        let endpoint = crate::usage::Endpoint::from_label(&self.endpoint)
            .unwrap_or(crate::usage::Endpoint::Other)
            .label();
        let token_source = if self.token_source == "upstream" {
            "upstream"
        } else {
            "estimated"
        };
        let team = self.team;
        let budget_leases = match self.budget_period {
            Some(period) => vec![(team.clone(), period)],
            None => self.leases,
        };
        UsageRecord {
            created_at: DateTime::parse_from_rfc3339(&self.created_at)
                .map(|t| t.with_timezone(&Utc))
                .unwrap_or_else(|_| Utc::now()),
            request_id: self.request_id,
            team,
            key_id: self.key_id,
            model: self.model,
            base_model: self.base_model,
            upstream: self.upstream,
            endpoint,
            stream: self.stream,
            status: self.status,
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.completion_tokens,
            cached_tokens: self.cached_tokens,
            cost_nano_usd: self.cost_nano_usd,
            token_source,
            latency_ms: self.latency_ms,
            end_user: self.end_user,
            service_tier: self
                .service_tier
                .as_deref()
                .and_then(|t| crate::usage::ServiceTier::parse(t).label()),
            reasoning_tokens: self.reasoning_tokens,
            audio_prompt_tokens: self.audio_prompt_tokens,
            audio_completion_tokens: self.audio_completion_tokens,
            cache_write_tokens: self.cache_write_tokens,
            image_tokens: self.image_tokens,
            tool_calls: self.tool_calls,
            provider: crate::pricing::price::intern(&self.provider),
            cost_breakdown: match self.breakdown.as_deref() {
                Some(text) => crate::pricing::Breakdown::parse(text).unwrap_or_default(),
                None => legacy_breakdown(&self.cost_breakdown),
            },
            attempts: self.attempts,
            choices: self.choices,
            capped: self.capped,
            meters: self
                .meters
                .as_deref()
                .and_then(crate::usage::meter::Meters::parse)
                .unwrap_or_default(),
            budget_leases,
            tags: self.tags,
            lease_node: self.lease_node,
            batch_id: self.batch_id,
            served_model: None,
            trace_parent: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool {dir}: {reason}")]
    Io { dir: String, reason: String },
    #[error("spool {dir} is full ({max} bytes, database.spool_max_bytes)")]
    Full { dir: String, max: u64 },
}

#[derive(Debug)]
struct Segment {
    path: PathBuf,
    bytes: u64,
    /// Rows of this segment the writer still holds in memory, not yet in
    /// the database.
    unwritten: u64,
    /// Some of its rows are no longer in memory: only a replay of the file
    /// can bring them to the database.
    orphaned: bool,
    closed: bool,
    /// How far a replay has read (bytes).
    replayed_to: u64,
    replay_done: bool,
}

impl Segment {
    fn removable(&self) -> bool {
        self.closed && self.unwritten == 0 && (!self.orphaned || self.replay_done)
    }
}

pub struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    /// This replica's name (Postgres), written into rows a lease paid for.
    node: Option<String>,
    segments: BTreeMap<u64, Segment>,
    active: Option<(u64, File)>,
    next_id: u64,
}

/// Rows read back from a segment, and where the read stopped.
pub struct ReplayBatch {
    pub segment: u64,
    pub rows: Vec<UsageRecord>,
    pub end: u64,
    pub eof: bool,
}

impl Spool {
    /// Opens the spool directory (creating it) and takes every segment an
    /// earlier process left as needing replay. Fails when the directory
    /// cannot be created or written.
    pub fn open(dir: &Path, max_bytes: u64, node: Option<String>) -> Result<Spool, SpoolError> {
        let io = |e: std::io::Error| SpoolError::Io {
            dir: dir.display().to_string(),
            reason: e.to_string(),
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        // Prove it is writable now, not at the first outage.
        let probe = dir.join(".probe");
        std::fs::write(&probe, b"ok").map_err(io)?;
        std::fs::remove_file(&probe).map_err(io)?;
        let mut segments = BTreeMap::new();
        for entry in std::fs::read_dir(dir).map_err(io)? {
            let Ok(entry) = entry else { continue };
            let name = entry.file_name();
            let Some(id) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".jsonl"))
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            let bytes = entry.metadata().map(|m| m.len()).unwrap_or(0);
            segments.insert(
                id,
                Segment {
                    path: entry.path(),
                    bytes,
                    unwritten: 0,
                    orphaned: true,
                    closed: true,
                    replayed_to: 0,
                    replay_done: false,
                },
            );
        }
        let next_id = segments.keys().next_back().map_or(1, |id| id + 1);
        Ok(Spool {
            dir: dir.to_path_buf(),
            max_bytes,
            node,
            segments,
            active: None,
            next_id,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Bytes on disk.
    pub fn bytes(&self) -> u64 {
        self.segments.values().map(|s| s.bytes).sum()
    }

    /// Rows waiting in segments that only a replay can bring in.
    pub fn needs_replay(&self) -> bool {
        self.segments
            .values()
            .any(|s| s.closed && s.orphaned && !s.replay_done)
    }

    fn io(&self, e: std::io::Error) -> SpoolError {
        SpoolError::Io {
            dir: self.dir.display().to_string(),
            reason: e.to_string(),
        }
    }

    fn encode(&self, rows: &[&UsageRecord]) -> Vec<u8> {
        let mut buf = Vec::with_capacity(rows.len() * 400);
        for r in rows {
            if serde_json::to_writer(&mut buf, &SpoolRow::from_record(r, self.node.as_deref()))
                .is_ok()
            {
                buf.push(b'\n');
            }
        }
        buf
    }

    fn new_segment(&mut self) -> Result<(u64, File), SpoolError> {
        // The directory may have been removed under us: make it again.
        std::fs::create_dir_all(&self.dir).map_err(|e| self.io(e))?;
        let id = self.next_id;
        self.next_id += 1;
        let path = self.dir.join(format!("{id:016}.jsonl"));
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| self.io(e))?;
        self.segments.insert(
            id,
            Segment {
                path,
                bytes: 0,
                unwritten: 0,
                orphaned: false,
                closed: false,
                replayed_to: 0,
                replay_done: false,
            },
        );
        Ok((id, file))
    }

    fn check_room(&self, len: u64) -> Result<(), SpoolError> {
        if self.bytes() + len > self.max_bytes {
            return Err(SpoolError::Full {
                dir: self.dir.display().to_string(),
                max: self.max_bytes,
            });
        }
        Ok(())
    }

    /// Appends rows the writer keeps in memory too (durable mode); returns
    /// the segment they are in. One `write` for the whole group.
    pub fn append(&mut self, rows: &[&UsageRecord]) -> Result<u64, SpoolError> {
        let buf = self.encode(rows);
        self.check_room(buf.len() as u64)?;
        let (id, mut file) = match self.active.take() {
            Some(active) => active,
            None => self.new_segment()?,
        };
        if let Err(e) = file.write_all(&buf) {
            // A torn line is skipped by the replay; the rows stay in memory.
            self.active = Some((id, file));
            self.orphan(id);
            return Err(self.io(e));
        }
        let full = match self.segments.get_mut(&id) {
            Some(seg) => {
                seg.bytes += buf.len() as u64;
                seg.unwritten += rows.len() as u64;
                seg.bytes >= SEGMENT_BYTES
            }
            None => false,
        };
        if full {
            let _ = file.sync_data();
            self.close(id);
        } else {
            self.active = Some((id, file));
        }
        Ok(id)
    }

    /// Writes rows the writer will no longer hold in memory to a segment of
    /// their own, replayed when the database is back.
    pub fn spill(&mut self, rows: &[&UsageRecord]) -> Result<(), SpoolError> {
        let buf = self.encode(rows);
        self.check_room(buf.len() as u64)?;
        let (id, mut file) = self.new_segment()?;
        let written = file.write_all(&buf).and_then(|()| file.sync_data());
        if let Some(seg) = self.segments.get_mut(&id) {
            seg.bytes = buf.len() as u64;
            seg.orphaned = true;
            seg.closed = true;
        }
        written.map_err(|e| self.io(e))
    }

    fn close(&mut self, id: u64) {
        if self.active.as_ref().is_some_and(|(a, _)| *a == id) {
            self.active = None;
        }
        if let Some(seg) = self.segments.get_mut(&id) {
            seg.closed = true;
        }
        self.remove_if_done(id);
    }

    /// Rows of segment `id` were dropped from memory: a replay must read them.
    pub fn orphan(&mut self, id: u64) {
        if let Some(seg) = self.segments.get_mut(&id) {
            seg.orphaned = true;
        }
        self.close(id);
    }

    /// `n` in-memory rows of segment `id` are in the database.
    pub fn written(&mut self, id: u64, n: u64) {
        if let Some(seg) = self.segments.get_mut(&id) {
            seg.unwritten = seg.unwritten.saturating_sub(n);
        }
        self.remove_if_done(id);
    }

    fn remove_if_done(&mut self, id: u64) {
        if self.segments.get(&id).is_some_and(Segment::removable) {
            if let Some(seg) = self.segments.remove(&id) {
                if let Err(e) = std::fs::remove_file(&seg.path) {
                    if e.kind() != std::io::ErrorKind::NotFound {
                        tracing::warn!(error = %e, path = %seg.path.display(), "could not remove a written spool segment");
                    }
                }
            }
        }
    }

    /// Up to `max_rows` rows of the first segment that needs a replay.
    pub fn next_replay(&mut self, max_rows: usize) -> Result<Option<ReplayBatch>, SpoolError> {
        let Some((&id, seg)) = self
            .segments
            .iter()
            .find(|(_, s)| s.closed && s.orphaned && !s.replay_done)
        else {
            return Ok(None);
        };
        let (path, from) = (seg.path.clone(), seg.replayed_to);
        let mut reader = match File::open(&path) {
            Ok(f) => BufReader::new(f),
            // Gone (removed by hand): nothing left to replay in it.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Some(ReplayBatch {
                    segment: id,
                    rows: Vec::new(),
                    end: from,
                    eof: true,
                }))
            }
            Err(e) => return Err(self.io(e)),
        };
        reader.seek(SeekFrom::Start(from)).map_err(|e| self.io(e))?;
        let (mut rows, mut end, mut line) = (Vec::new(), from, String::new());
        let mut eof = false;
        while rows.len() < max_rows {
            line.clear();
            let n = reader.read_line(&mut line).map_err(|e| self.io(e))?;
            if n == 0 {
                eof = true;
                break;
            }
            end += n as u64;
            match serde_json::from_str::<SpoolRow>(line.trim_end()) {
                Ok(row) => rows.push(row.into_record()),
                // A line torn by a crash or a full disk.
                Err(e) => {
                    tracing::warn!(error = %e, segment = id, "skipping an unreadable spool line")
                }
            }
        }
        Ok(Some(ReplayBatch {
            segment: id,
            rows,
            end,
            eof,
        }))
    }

    /// A replay batch is in the database.
    pub fn replayed(&mut self, batch_segment: u64, end: u64, eof: bool) {
        if let Some(seg) = self.segments.get_mut(&batch_segment) {
            seg.replayed_to = end;
            seg.replay_done = eof;
        }
        self.remove_if_done(batch_segment);
    }

    /// At shutdown: the active segment is closed; it stays on disk only if
    /// some of its rows are not in the database.
    pub fn close_active(&mut self) {
        if let Some((id, file)) = self.active.take() {
            let _ = file.sync_data();
            if let Some(seg) = self.segments.get_mut(&id) {
                if seg.unwritten > 0 {
                    seg.orphaned = true;
                }
            }
            self.close(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str) -> UsageRecord {
        UsageRecord {
            key_id: Some("key_1".into()),
            stream: true,
            status: 499,
            prompt_tokens: 1,
            completion_tokens: 2,
            cost_nano_usd: 3,
            token_source: "estimated",
            latency_ms: 4,
            service_tier: Some("flex"),
            reasoning_tokens: 1,
            tool_calls: 2,
            cost_breakdown: {
                use crate::pricing::{Line, Meter};
                let mut b = crate::pricing::Breakdown::default();
                b.0[Line::of(Meter::Input).index()] = 1;
                b.0[Line::of(Meter::CacheWrite1h).index()] = 5;
                b.0[Line::of(Meter::Output).index()] = 2;
                b
            },
            meters: crate::usage::meter::Meters::of(&crate::usage::Usage::tokens(1, 2)),
            budget_leases: vec![
                ("t".into(), "total".into()),
                ("key:k".into(), "total".into()),
            ],
            tags: Some(r#"["a","b"]"#.into()),
            ..UsageRecord::plain(id, "t", "gpt-4o", Utc::now())
        }
    }

    #[test]
    fn a_row_spooled_with_the_positional_breakdown_reads_back_by_line() {
        let mut line: serde_json::Value =
            serde_json::to_value(SpoolRow::from_record(&row("old"), None))
                .unwrap_or_else(|e| panic!("{e}"));
        line["breakdown"] = serde_json::Value::Null;
        line["cost_breakdown"] = serde_json::json!([10, 20, 30, 40, 0, 0, 0, 0, 50, 60]);
        let old: SpoolRow = serde_json::from_value(line).unwrap_or_else(|e| panic!("{e}"));
        let b = old.into_record().cost_breakdown;
        use crate::pricing::{Line, Meter};
        let lines = [
            (Line::Meter(Meter::Input), 10),
            (Line::Meter(Meter::CachedInput), 20),
            (Line::Meter(Meter::CacheWrite), 30),
            (Line::Meter(Meter::Output), 40),
            (Line::ToolCalls, 50),
            (Line::Gpu, 60),
        ];
        for (l, n) in lines {
            assert_eq!(b.get(l), n, "{l:?}");
        }
        assert_eq!(b.get(Line::Meter(Meter::CacheWrite1h)), 0);
        assert_eq!(b.total(), 210);
    }

    #[test]
    fn a_row_spooled_with_the_team_period_only_pays_the_team_lease() {
        let mut line: serde_json::Value =
            serde_json::to_value(SpoolRow::from_record(&row("old"), Some("n")))
                .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(line["lease_node"], "n");
        if let Some(fields) = line.as_object_mut() {
            fields.remove("leases");
        }
        line["budget_period"] = "2026-12-01T00:00:00Z".into();
        let old: SpoolRow = serde_json::from_value(line).unwrap_or_else(|e| panic!("{e}"));
        let r = old.into_record();
        assert_eq!(
            r.budget_leases,
            [("t".to_string(), "2026-12-01T00:00:00Z".to_string())]
        );
        assert_eq!(r.tags.as_deref(), Some(r#"["a","b"]"#));
    }

    #[test]
    fn spilled_rows_come_back_whole_and_the_segment_goes_when_replayed() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let mut spool = Spool::open(dir.path(), 1 << 20, Some("node-a".into()))
            .unwrap_or_else(|e| panic!("{e}"));
        let rows: Vec<UsageRecord> = (0..5).map(|i| row(&format!("r{i}"))).collect();
        spool
            .spill(&rows.iter().collect::<Vec<_>>())
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(spool.needs_replay());
        let a = spool
            .next_replay(3)
            .ok()
            .flatten()
            .unwrap_or_else(|| panic!("no batch"));
        assert_eq!(a.rows.len(), 3);
        assert!(!a.eof);
        assert_eq!(a.rows[0].endpoint, "chat.completions");
        assert_eq!(a.rows[0].created_at, rows[0].created_at);
        assert_eq!(a.rows[0].lease_node.as_deref(), Some("node-a"));
        assert_eq!(a.rows[0].service_tier, Some("flex"));
        assert_eq!(a.rows[0].cost_breakdown, rows[0].cost_breakdown);
        assert_eq!((a.rows[0].tool_calls, a.rows[0].reasoning_tokens), (2, 1));
        spool.replayed(a.segment, a.end, a.eof);
        let b = spool
            .next_replay(3)
            .ok()
            .flatten()
            .unwrap_or_else(|| panic!("no batch"));
        assert_eq!(b.rows.len(), 2);
        let b2 = spool
            .next_replay(3)
            .ok()
            .flatten()
            .unwrap_or_else(|| panic!("no batch"));
        assert!(
            b2.eof && b2.rows.len() == 2,
            "not yet confirmed: read again"
        );
        spool.replayed(b.segment, b.end, true);
        assert!(!spool.needs_replay());
        assert_eq!(spool.bytes(), 0);
        assert_eq!(
            std::fs::read_dir(dir.path())
                .map(|d| d.count())
                .unwrap_or(9),
            0
        );
    }

    #[test]
    fn appended_segments_are_removed_once_written_and_kept_for_a_restart_if_not() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let mut spool = Spool::open(dir.path(), 1 << 20, None).unwrap_or_else(|e| panic!("{e}"));
        let a = row("a");
        let id = spool.append(&[&a]).unwrap_or_else(|e| panic!("{e}"));
        spool.written(id, 1);
        spool.close_active();
        assert_eq!(spool.bytes(), 0);
        let b = row("b");
        spool.append(&[&b]).unwrap_or_else(|e| panic!("{e}"));
        spool.close_active(); // "b" never reached the database
        drop(spool);
        let mut again = Spool::open(dir.path(), 1 << 20, None).unwrap_or_else(|e| panic!("{e}"));
        let batch = again
            .next_replay(10)
            .ok()
            .flatten()
            .unwrap_or_else(|| panic!("no batch"));
        assert_eq!(batch.rows.len(), 1);
        assert_eq!(batch.rows[0].request_id, "b");
    }

    #[test]
    fn the_spool_is_capped() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let mut spool = Spool::open(dir.path(), 1_000, None).unwrap_or_else(|e| panic!("{e}"));
        let a = row("a");
        assert!(spool.spill(&[&a]).is_ok());
        assert!(matches!(
            spool.spill(&[&a, &a]),
            Err(SpoolError::Full { .. })
        ));
    }
}
