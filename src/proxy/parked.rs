//! What the proxy keeps between requests (`Proxy`): the shared state, and
//! the work it holds budget for until it is billed, background responses
//! (`background`) and batches (`batch`). Those modules read and write the
//! registries here; nothing here imports them.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use http::HeaderMap;

use super::settle::Ticket;
use crate::app::AppState;

/// What the proxy keeps between requests, beside the shared state: the
/// background responses and batches it holds budget for until they are
/// billed. Derefs to the `AppState`, so every stage reads `state.config`,
/// `state.ledger`... as before.
pub struct Proxy {
    pub app: Arc<AppState>,
    pub background: Responses,
    pub batches: Batches,
}

impl Proxy {
    pub fn new(app: Arc<AppState>) -> Proxy {
        Proxy {
            app,
            background: Default::default(),
            batches: Default::default(),
        }
    }
}

impl std::ops::Deref for Proxy {
    type Target = AppState;

    fn deref(&self) -> &AppState {
        &self.app
    }
}

/// The background responses this replica created and still holds the
/// ticket of.
#[derive(Default)]
pub struct Responses {
    pub(super) waiting: Mutex<HashMap<String, Waiting>>,
    /// Responses already reported overdue (logged once each).
    pub(super) reported: Mutex<HashSet<String>>,
}

pub(super) struct Waiting {
    pub(super) ticket: Ticket,
    pub(super) upstream: String,
    /// Passthrough mode: the client's credentials, to poll with. Memory
    /// only, never stored.
    pub(super) credentials: HeaderMap,
    /// The `pending_usage` row was written (else only this process can bill it).
    pub(super) stored: bool,
    pub(super) last_polled: Instant,
}

impl Responses {
    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Waiting>> {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn take(&self, id: &str) -> Option<Waiting> {
        self.lock().remove(id)
    }

    /// The team and upstream of a response this replica waits for.
    pub(super) fn owner(&self, id: &str) -> Option<(String, String)> {
        self.lock()
            .get(id)
            .map(|w| (w.ticket.who.team.clone(), w.upstream.clone()))
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The budget holds of the batches this replica created, until billed.
#[derive(Default)]
pub struct Batches {
    pub(super) held: Mutex<HashMap<String, Held>>,
}

pub(super) struct Held {
    pub(super) reservation: crate::budget::Reservation,
    /// Passthrough mode: the client's credentials (memory only).
    pub(super) credentials: HeaderMap,
}

impl Batches {
    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Held>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn credentials(&self, id: &str) -> Option<HeaderMap> {
        self.lock().get(id).map(|h| h.credentials.clone())
    }
}

/// The client's credentials as a poll needs them (passthrough mode only:
/// in virtual-keys mode tollgate polls with the upstream's own key).
pub fn poll_credentials(state: &Proxy, headers: &HeaderMap) -> Option<Box<HeaderMap>> {
    if state.auth.mode() != crate::config::AuthMode::Passthrough {
        return None;
    }
    let mut out = HeaderMap::new();
    for name in crate::auth::CREDENTIAL_HEADERS
        .iter()
        .chain(&["openai-organization", "openai-project"])
    {
        if let Some(v) = headers.get(*name) {
            if let Ok(name) = http::HeaderName::from_bytes(name.as_bytes()) {
                out.insert(name, v.clone());
            }
        }
    }
    Some(Box::new(out))
}
