//! Virtual keys and the admin token: generation, hashing, and the in-memory
//! directory every request is checked against (refreshed from the database,
//! so a key revoked anywhere is refused within a second).
//!
//! Never stores or logs a key in the clear; compares secrets in constant time.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::glob::Glob;

/// A newly minted key: the secret (shown once) and what is stored.
pub struct NewKey {
    pub id: String,
    pub secret: String,
    pub hash: String,
    pub prefix: String,
}

fn random_hex(bytes: usize) -> Result<String, String> {
    let mut buf = vec![0u8; bytes];
    getrandom::getrandom(&mut buf).map_err(|e| format!("no randomness: {e}"))?;
    Ok(hex(&buf))
}

/// Lower-case hex of `bytes` (a lookup table, no formatting machinery: it
/// runs on every authenticated request).
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    out
}

/// `tg-` + 256 random bits.
pub fn generate_key() -> Result<NewKey, String> {
    let secret = format!("tg-{}", random_hex(32)?);
    Ok(NewKey {
        id: format!("key_{}", random_hex(8)?),
        hash: hash_key(&secret),
        prefix: secret.chars().take(10).collect(),
        secret,
    })
}

pub fn hash_key(secret: &str) -> String {
    hex(&key_digest(secret))
}

/// SHA-256 of a key: the stored hash is its hex form.
pub type KeyDigest = [u8; 32];

pub fn key_digest(secret: &str) -> KeyDigest {
    Sha256::digest(secret.as_bytes()).into()
}

/// A stored hash (64 hex digits) back to its digest; `None` if malformed.
pub fn parse_key_hash(hash: &str) -> Option<KeyDigest> {
    fn nibble(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        }
    }
    let hex = hash.as_bytes();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (o, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
        *o = nibble(pair[0])? << 4 | nibble(pair[1])?;
    }
    Some(out)
}

/// Constant-time comparison of the presented bearer token with the admin token.
pub fn admin_token_matches(configured: &str, presented: &str) -> bool {
    let a = Sha256::digest(configured.as_bytes());
    let b = Sha256::digest(presented.as_bytes());
    bool::from(a.ct_eq(&b))
}

/// Team names become metric labels and header values: 1-64 letters,
/// digits, '-', '_' or '.'.
pub fn is_valid_team_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// The bearer token of an `Authorization` header value.
pub fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// A credential header value that is a tollgate key. Such a key never
/// leaves tollgate, in any mode.
pub fn is_tollgate_key(value: &str) -> bool {
    let token = bearer(value).unwrap_or(value).trim();
    token.starts_with("tg-")
}

/// Headers a client may carry a credential in (OpenAI, Azure, Anthropic,
/// Gemini style).
pub const CREDENTIAL_HEADERS: [&str; 4] =
    ["authorization", "api-key", "x-api-key", "x-goog-api-key"];

/// The query parameter a Gemini client may carry its key in (`?key=`).
pub const CREDENTIAL_PARAM: &str = "key";

/// The value of `?key=` in a query, if any.
pub fn query_key(query: Option<&str>) -> Option<&str> {
    query?
        .split('&')
        .find_map(|pair| pair.strip_prefix(CREDENTIAL_PARAM)?.strip_prefix('='))
}

/// How clients authenticate, decided by configuration and never loosened at
/// run time: `auth.mode` when set; otherwise `virtual-keys` as soon as any
/// team or key exists or any upstream has an `api_key`, else `passthrough`
/// (clients bring their own provider key; the server's is never attached).
/// An unset mode that started as passthrough tightens to virtual-keys when
/// the first team or key appears; nothing turns it back.
pub struct AuthPolicy {
    configured: Option<crate::config::AuthMode>,
    virtual_keys: std::sync::atomic::AtomicBool,
    /// `(method or any, path glob)` of unmetered paths budgeted teams may use.
    allow_unmetered: Vec<(Option<http::Method>, Glob)>,
}

impl AuthPolicy {
    /// `has_accounts`: the database holds a team or a key (revoked ones too).
    pub fn new(
        config: &crate::config::AuthConfig,
        any_upstream_key: bool,
        has_accounts: bool,
    ) -> AuthPolicy {
        use crate::config::AuthMode;
        let virtual_keys = match config.mode {
            Some(mode) => mode == AuthMode::VirtualKeys,
            None => any_upstream_key || has_accounts,
        };
        let allow_unmetered = config
            .allow_unmetered
            .iter()
            .map(|entry| match entry.trim().split_once(' ') {
                Some((method, path)) => (
                    http::Method::from_bytes(method.trim().to_ascii_uppercase().as_bytes()).ok(),
                    Glob::new(path.trim()),
                ),
                None => (None, Glob::new(entry.trim())),
            })
            .collect();
        AuthPolicy {
            configured: config.mode,
            virtual_keys: std::sync::atomic::AtomicBool::new(virtual_keys),
            allow_unmetered,
        }
    }

    pub fn mode(&self) -> crate::config::AuthMode {
        if self.virtual_keys.load(std::sync::atomic::Ordering::Relaxed) {
            crate::config::AuthMode::VirtualKeys
        } else {
            crate::config::AuthMode::Passthrough
        }
    }

    /// Called on every refresh: a team or key appearing ends an automatic
    /// passthrough for good. Returns true when it did so now.
    pub fn accounts_seen(&self, has_accounts: bool) -> bool {
        if self.configured.is_none() && has_accounts {
            return !self
                .virtual_keys
                .swap(true, std::sync::atomic::Ordering::Relaxed);
        }
        false
    }

    /// A budgeted team may use this unmetered path (`auth.allow_unmetered`).
    pub fn allows_unmetered(&self, method: &http::Method, path: &str) -> bool {
        self.allow_unmetered
            .iter()
            .any(|(m, glob)| m.as_ref().is_none_or(|m| m == method) && glob.matches(path))
    }
}

#[derive(Debug, Clone)]
pub struct KeyEntry {
    pub id: String,
    pub team: String,
    pub models: Vec<Glob>,
}

impl KeyEntry {
    /// The key named in a stored row (a parked response, a batch): its id
    /// and team, no model limits (the request was admitted already).
    pub fn of_row(id: String, team: String) -> Arc<KeyEntry> {
        Arc::new(KeyEntry {
            id,
            team,
            models: Vec::new(),
        })
    }

    pub fn allows(&self, model: &str) -> bool {
        self.models.is_empty() || self.models.iter().any(|g| g.matches(model))
    }
}

#[derive(Debug, Clone, Default)]
pub struct TeamSettings {
    pub max_output_tokens: Option<u64>,
}

/// Live keys by hash and team settings, swapped whole on refresh.
#[derive(Default)]
pub struct Directory {
    /// By digest: a request hashes its key and looks it up without hex text.
    keys: RwLock<Arc<HashMap<KeyDigest, Arc<KeyEntry>>>>,
    teams: RwLock<Arc<HashMap<String, TeamSettings>>>,
}

impl Directory {
    pub fn replace(
        &self,
        keys: HashMap<KeyDigest, Arc<KeyEntry>>,
        teams: HashMap<String, TeamSettings>,
    ) {
        if let Ok(mut k) = self.keys.write() {
            *k = Arc::new(keys);
        }
        if let Ok(mut t) = self.teams.write() {
            *t = Arc::new(teams);
        }
    }

    pub fn key(&self, secret: &str) -> Option<Arc<KeyEntry>> {
        let digest = key_digest(secret);
        self.keys.read().ok()?.get(&digest).cloned()
    }

    /// Forgets a key at once (the periodic refresh would too, within a second).
    pub fn revoke(&self, id: &str) {
        if let Ok(mut k) = self.keys.write() {
            let mut map = (**k).clone();
            map.retain(|_, e| e.id != id);
            *k = Arc::new(map);
        }
    }

    pub fn team(&self, name: &str) -> Option<TeamSettings> {
        self.teams.read().ok()?.get(name).cloned()
    }

    pub fn key_count(&self) -> usize {
        self.keys.read().map(|k| k.len()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_long_random_and_hashed() {
        let a = generate_key().unwrap_or_else(|e| panic!("{e}"));
        let b = generate_key().unwrap_or_else(|e| panic!("{e}"));
        assert!(a.secret.starts_with("tg-") && a.secret.len() == 3 + 64);
        assert_ne!(a.secret, b.secret);
        assert_eq!(a.hash, hash_key(&a.secret));
        assert!(!a.hash.contains(&a.secret[3..]));
        assert_eq!(hex(&[0x00, 0x9f, 0xa0, 0xff]), "009fa0ff");
        assert_eq!(parse_key_hash(&a.hash), Some(key_digest(&a.secret)));
        assert_eq!(
            parse_key_hash(&a.hash.to_uppercase()),
            Some(key_digest(&a.secret))
        );
        assert_eq!(parse_key_hash(&a.hash[1..]), None);
        assert_eq!(parse_key_hash(&format!("{}g", &a.hash[1..])), None);
        // The SHA-256 of "abc" from FIPS 180-2.
        assert_eq!(
            hash_key("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn auth_mode_is_never_passthrough_with_a_server_key_or_accounts() {
        use crate::config::{AuthConfig, AuthMode};
        let unset = AuthConfig::default();
        let mode = |key, accounts| AuthPolicy::new(&unset, key, accounts).mode();
        assert_eq!(mode(false, false), AuthMode::Passthrough);
        assert_eq!(mode(true, false), AuthMode::VirtualKeys);
        assert_eq!(mode(false, true), AuthMode::VirtualKeys);
        // An automatic passthrough tightens when the first team appears...
        let p = AuthPolicy::new(&unset, false, false);
        assert!(p.accounts_seen(true));
        assert_eq!(p.mode(), AuthMode::VirtualKeys);
        // ...and nothing loosens it again.
        assert!(!p.accounts_seen(false));
        assert_eq!(p.mode(), AuthMode::VirtualKeys);
        // An explicit mode is what it says.
        let explicit = AuthConfig {
            mode: Some(AuthMode::Passthrough),
            ..AuthConfig::default()
        };
        let p = AuthPolicy::new(&explicit, true, true);
        assert!(!p.accounts_seen(true));
        assert_eq!(p.mode(), AuthMode::Passthrough);
    }

    #[test]
    fn unmetered_allow_list_matches_method_and_path() {
        let p = AuthPolicy::new(&crate::config::AuthConfig::default(), false, false);
        let get = http::Method::GET;
        let post = http::Method::POST;
        assert!(p.allows_unmetered(&get, "/v1/models"));
        assert!(p.allows_unmetered(&get, "/v1/models/gpt-4o"));
        assert!(!p.allows_unmetered(&post, "/v1/models"));
        assert!(p.allows_unmetered(&post, "/v1/files"));
        assert!(p.allows_unmetered(&get, "/v1/files/file-1/content"));
        assert!(!p.allows_unmetered(&post, "/v1/batches"));
        assert!(!p.allows_unmetered(&post, "/v1/images/generations"));
        assert!(is_tollgate_key("Bearer tg-abc"));
        assert!(is_tollgate_key("tg-abc"));
        assert!(!is_tollgate_key("Bearer sk-abc"));
    }

    #[test]
    fn admin_token_comparison() {
        assert!(admin_token_matches("s3cret", "s3cret"));
        assert!(!admin_token_matches("s3cret", "s3cre"));
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer  abc "), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert!(is_valid_team_name("search-team_1.eu"));
        assert!(!is_valid_team_name(""));
        assert!(!is_valid_team_name("bad team!"));
        assert!(!is_valid_team_name(&"x".repeat(65)));
    }
}
