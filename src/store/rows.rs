//! The compact usage row (SPEC 15): what `usage_rows` stores for a
//! `UsageRecord`, and the `names` every repeated string becomes. The view
//! `usage` turns a row back into the SPEC 6 columns; this module is the
//! other direction, and the two must agree (`tests/rollups.rs` reads every
//! kind of row back through the view).

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use super::UsageRecord;
use crate::pricing::Line;
use crate::usage::meter::Meter;

/// A row's key: tollgate's own request ids (`req_` + 16 hex digits + a
/// counter of 8 to 10 hex digits) as their prefix and counter; any other
/// id (a batch line's `custom_id`, a realtime response's) as a name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RequestKey<'a> {
    Own { prefix: &'a str, counter: u64 },
    Text(String),
}

/// Counters above this are stored as names (2^40: a year at 30k req/s).
const COUNTER_BITS: u32 = 40;
/// Prefix name ids above this are stored as names (`id` must stay positive).
const MAX_PREFIX_ID: i64 = (1 << (63 - COUNTER_BITS)) - 1;
/// Between a request id and its batch id in a name (ASCII unit separator).
const SEPARATOR: char = '\u{1f}';

impl<'a> RequestKey<'a> {
    pub(crate) fn of(request_id: &'a str, batch_id: Option<&str>) -> RequestKey<'a> {
        let batch = batch_id.unwrap_or("");
        let own = || {
            let (prefix, counter) = (request_id.get(..20)?, request_id.get(20..)?);
            let hex = |s: &str| {
                s.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            };
            if !batch.is_empty()
                || !prefix.starts_with("req_")
                || !hex(&prefix[4..])
                || !hex(counter)
            {
                return None;
            }
            let n = u64::from_str_radix(counter, 16).ok()?;
            // Only what the view spells back exactly (`%08x`).
            (n < 1 << COUNTER_BITS && format!("{n:08x}") == counter)
                .then_some(RequestKey::Own { prefix, counter: n })
        };
        own().unwrap_or_else(|| RequestKey::Text(format!("{request_id}{SEPARATOR}{batch}")))
    }

    /// The name this key needs.
    pub(crate) fn name(&self) -> &str {
        match self {
            RequestKey::Own { prefix, .. } => prefix,
            RequestKey::Text(t) => t,
        }
    }

    /// The row's `id`, given its name's id.
    pub(crate) fn id(&self, name_id: i64) -> i64 {
        match self {
            RequestKey::Own { counter, .. } if name_id <= MAX_PREFIX_ID => {
                (name_id << COUNTER_BITS) | i64::try_from(*counter).unwrap_or(0)
            }
            _ => -name_id,
        }
    }

    /// Own ids whose prefix id would not fit are stored as text instead.
    pub(crate) fn fits(&self, name_id: i64) -> bool {
        !matches!(self, RequestKey::Own { .. }) || name_id <= MAX_PREFIX_ID
    }
}

/// The ids of names seen, kept so a batch resolves only new ones. Bounded:
/// past `LIMIT` entries it starts over.
#[derive(Debug, Default)]
pub(crate) struct Names(Mutex<HashMap<String, i64>>);

impl Names {
    const LIMIT: usize = 100_000;

    /// The ids known of `names` (each once), and the names not known.
    pub(crate) fn known(&self, names: HashSet<&str>) -> (HashMap<String, i64>, Vec<String>) {
        let cache = self.0.lock().ok();
        let mut found = HashMap::with_capacity(names.len());
        let mut missing = Vec::new();
        for n in names {
            match cache.as_ref().and_then(|c| c.get(n)) {
                Some(id) => {
                    found.insert(n.to_string(), *id);
                }
                None => missing.push(n.to_string()),
            }
        }
        (found, missing)
    }

    /// Remembers names resolved (request keys of other ids excepted: each
    /// is seen once).
    pub(crate) fn remember(&self, resolved: &HashMap<String, i64>) {
        if let Ok(mut cache) = self.0.lock() {
            if cache.len() + resolved.len() > Self::LIMIT {
                cache.clear();
            }
            for (n, id) in resolved {
                if !n.contains(SEPARATOR) {
                    cache.insert(n.clone(), *id);
                }
            }
        }
    }
}

/// Every name a row needs besides its key's.
fn names_of(r: &UsageRecord) -> [Option<&str>; 10] {
    [
        Some(&r.team),
        r.key_id.as_deref(),
        Some(&r.model),
        (r.base_model != r.model).then_some(r.base_model.as_str()),
        Some(&r.upstream),
        Some(r.endpoint),
        Some(r.provider),
        r.end_user.as_deref(),
        r.service_tier,
        r.tags.as_deref(),
    ]
}

/// A batch of rows on its way to `usage_rows`: their keys, and the ids of
/// the names they need as the store resolves them (`Batch::new` says which
/// it must look up; `add` takes what it found).
pub(crate) struct Batch<'r> {
    rows: Vec<&'r UsageRecord>,
    keys: Vec<RequestKey<'r>>,
    ids: HashMap<String, i64>,
}

impl<'r> Batch<'r> {
    /// The batch, and the names it needs that `cache` does not know.
    pub(crate) fn new(rows: Vec<&'r UsageRecord>, cache: &Names) -> (Batch<'r>, Vec<String>) {
        let keys: Vec<RequestKey<'r>> = rows
            .iter()
            .map(|r| RequestKey::of(&r.request_id, r.batch_id.as_deref()))
            .collect();
        let names: HashSet<&str> = rows
            .iter()
            .flat_map(|r| names_of(r).into_iter().flatten())
            .chain(keys.iter().map(RequestKey::name))
            .collect();
        let (ids, missing) = cache.known(names);
        (Batch { rows, keys, ids }, missing)
    }

    /// Takes the ids the store resolved (and remembers them in `cache`).
    pub(crate) fn add(&mut self, resolved: HashMap<String, i64>, cache: &Names) {
        cache.remember(&resolved);
        self.ids.extend(resolved);
    }

    /// Keys whose prefix id is too large for an own id become text keys;
    /// the names of those still to resolve (almost always none).
    pub(crate) fn overflowing(&mut self) -> Vec<String> {
        let mut missing = Vec::new();
        for (key, r) in self.keys.iter_mut().zip(&self.rows) {
            let id = self.ids.get(key.name()).copied().unwrap_or(0);
            if !key.fits(id) {
                let batch = r.batch_id.as_deref().unwrap_or("");
                *key = RequestKey::Text(format!("{}{SEPARATOR}{batch}", r.request_id));
                if !self.ids.contains_key(key.name()) {
                    missing.push(key.name().to_string());
                }
            }
        }
        missing
    }

    /// The rows as stored, in order (a row whose key has no id yet is
    /// impossible once the store resolved every name; it gets id 0).
    pub(crate) fn compact(&self) -> Vec<(&'r UsageRecord, Compact)> {
        self.rows
            .iter()
            .zip(&self.keys)
            .map(|(r, key)| {
                let id = key.id(self.ids.get(key.name()).copied().unwrap_or(0));
                (*r, Compact::of(r, id, &self.ids))
            })
            .collect()
    }
}

/// The column types of `usage_rows`, as both stores bind them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ColumnType {
    Int8,
    Int4,
    Int2,
    Json,
}

/// The `usage_rows` columns tollgate writes, in bind order; `true`: NULL
/// for a plain row (`Compact::plain`), left out of SQLite's plain inserts.
pub(crate) const COLUMNS: [(&str, ColumnType, bool); 31] = [
    ("id", ColumnType::Int8, false),
    ("created_ms", ColumnType::Int8, false),
    ("cost_nano_usd", ColumnType::Int8, false),
    ("cost_cached_input", ColumnType::Int8, false),
    ("cost_output", ColumnType::Int8, false),
    ("team", ColumnType::Int4, false),
    ("key_id", ColumnType::Int4, false),
    ("model", ColumnType::Int4, false),
    ("base_model", ColumnType::Int4, false),
    ("upstream", ColumnType::Int4, false),
    ("endpoint", ColumnType::Int4, false),
    ("provider", ColumnType::Int4, false),
    ("prompt_tokens", ColumnType::Int4, false),
    ("completion_tokens", ColumnType::Int4, false),
    ("cached_tokens", ColumnType::Int4, false),
    ("latency_ms", ColumnType::Int4, false),
    ("end_user", ColumnType::Int4, false),
    ("service_tier", ColumnType::Int4, true),
    ("reasoning_tokens", ColumnType::Int4, true),
    ("audio_prompt_tokens", ColumnType::Int4, true),
    ("audio_completion_tokens", ColumnType::Int4, true),
    ("cache_write_tokens", ColumnType::Int4, true),
    ("image_tokens", ColumnType::Int4, true),
    ("tool_calls", ColumnType::Int4, true),
    ("status", ColumnType::Int2, false),
    ("flags", ColumnType::Int2, false),
    ("attempts", ColumnType::Int2, true),
    ("choices", ColumnType::Int2, true),
    ("cost_breakdown", ColumnType::Json, true),
    ("meters", ColumnType::Json, true),
    ("tags", ColumnType::Int4, true),
];

/// One value of a compact row: an integer (NULL when `None`) or JSON text.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Value {
    Int(Option<i64>),
    Json(Option<String>),
}

/// A row as `usage_rows` stores it.
pub(crate) struct Compact {
    pub(crate) id: i64,
    pub(crate) values: [Value; COLUMNS.len()],
    /// No column of the `true` ones in `COLUMNS` is set.
    pub(crate) plain: bool,
}

/// True when the view rebuilds the row's breakdown and meters exactly from
/// its columns: only input, cached input and output, no tool calls, no
/// image size.
fn plain_lines(r: &UsageRecord) -> bool {
    let lines_plain = r.cost_breakdown.lines().all(|(l, _)| {
        matches!(
            l,
            Line::Meter(Meter::Input | Meter::CachedInput | Meter::Output)
        )
    });
    let input = r.prompt_tokens.checked_sub(r.cached_tokens);
    let meters_plain = Meter::ALL.iter().all(|&m| {
        let want = match m {
            Meter::Input => input,
            Meter::CachedInput => Some(r.cached_tokens),
            Meter::Output => Some(r.completion_tokens),
            _ => Some(0),
        };
        Some(r.meters.get(m)) == want
    });
    let total_input = r.cost_breakdown.get(Line::Meter(Meter::Input));
    // The view's input line is the rest of the cost: it must be this one.
    let rest = r.cost_nano_usd.checked_sub(
        r.cost_breakdown.get(Line::Meter(Meter::CachedInput))
            + r.cost_breakdown.get(Line::Meter(Meter::Output)),
    );
    lines_plain
        && meters_plain
        && rest == Some(total_input)
        && r.meters.calls == crate::usage::ToolCalls::default()
        && r.meters.image_spec.is_none()
}

impl Compact {
    pub(crate) fn of(r: &UsageRecord, id: i64, names: &HashMap<String, i64>) -> Compact {
        let name = |n: Option<&str>| n.and_then(|n| names.get(n).copied());
        let int = |v: u64| Value::Int(Some(super::to_i64(v)));
        let nonzero = |v: u64| Value::Int((v > 0).then(|| super::to_i64(v)));
        let plain_lines = plain_lines(r);
        let flags = i64::from(r.stream)
            | (i64::from(r.capped) << 1)
            | (i64::from(r.token_source == "estimated") << 2);
        let not = |v: u16, default: u16| Value::Int((v != default).then_some(i64::from(v)));
        let values = [
            Value::Int(Some(id)),
            Value::Int(Some(r.created_at.timestamp_millis())),
            int(r.cost_nano_usd),
            nonzero(r.cost_breakdown.get(Line::Meter(Meter::CachedInput))),
            nonzero(r.cost_breakdown.get(Line::Meter(Meter::Output))),
            Value::Int(name(Some(&r.team))),
            Value::Int(name(r.key_id.as_deref())),
            Value::Int(name(Some(&r.model))),
            Value::Int(name(
                (r.base_model != r.model).then_some(r.base_model.as_str()),
            )),
            Value::Int(name(Some(&r.upstream))),
            Value::Int(name(Some(r.endpoint))),
            Value::Int(name(Some(r.provider))),
            int(r.prompt_tokens.min(i32::MAX as u64)),
            int(r.completion_tokens.min(i32::MAX as u64)),
            nonzero(r.cached_tokens.min(i32::MAX as u64)),
            int(r.latency_ms.min(i32::MAX as u64)),
            Value::Int(name(r.end_user.as_deref())),
            Value::Int(name(r.service_tier)),
            nonzero(r.reasoning_tokens.min(i32::MAX as u64)),
            nonzero(r.audio_prompt_tokens.min(i32::MAX as u64)),
            nonzero(r.audio_completion_tokens.min(i32::MAX as u64)),
            nonzero(r.cache_write_tokens.min(i32::MAX as u64)),
            nonzero(r.image_tokens.min(i32::MAX as u64)),
            nonzero(r.tool_calls.min(i32::MAX as u64)),
            Value::Int(Some(i64::from(r.status))),
            Value::Int(Some(flags)),
            not(r.attempts, 1),
            not(r.choices, 1),
            Value::Json((!plain_lines).then(|| r.cost_breakdown.to_json())),
            Value::Json((!plain_lines).then(|| r.meters.to_json())),
            Value::Int(name(r.tags.as_deref())),
        ];
        let plain = COLUMNS.iter().zip(&values).all(|((_, _, detail), v)| {
            !detail || matches!(v, Value::Int(None) | Value::Json(None))
        });
        Compact { id, values, plain }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_request_ids_are_a_prefix_and_a_counter() {
        let ids = crate::app::RequestIds::new();
        for _ in 0..3 {
            let id = ids.next();
            match RequestKey::of(&id, None) {
                RequestKey::Own { prefix, counter } => {
                    assert_eq!(format!("{prefix}{counter:08x}"), id);
                }
                other => panic!("{id}: {other:?}"),
            }
        }
        let own = RequestKey::of("req_0123456789abcdef00000a1b", None);
        assert_eq!(
            own,
            RequestKey::Own {
                prefix: "req_0123456789abcdef",
                counter: 0xa1b
            }
        );
        assert_eq!(own.id(3), (3 << 40) | 0xa1b);
        // Not spelled back alike, or in a batch: kept as text.
        for (id, batch) in [
            ("req_0123456789abcdef0000a1b", None),
            ("req_0123456789abcdef000000000a1b", None),
            ("req_0123456789ABCDEF00000a1b", None),
            ("req_0123456789abcdef00000a1b", Some("batch_1")),
            ("request-7", None),
            ("", None),
        ] {
            let key = RequestKey::of(id, batch);
            assert_eq!(
                key,
                RequestKey::Text(format!("{id}\u{1f}{}", batch.unwrap_or(""))),
                "{id}"
            );
            assert_eq!(key.id(9), -9);
        }
        assert!(!own.fits(MAX_PREFIX_ID + 1));
    }
}
