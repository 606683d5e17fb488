//! Model-id globs (`*` any run, `?` one character) used to route models to
//! upstreams and, later, to restrict keys.

use serde::Deserialize;

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(from = "String")]
pub struct Glob(String);

impl From<String> for Glob {
    fn from(s: String) -> Self {
        Glob(s)
    }
}

impl Glob {
    pub fn new(pattern: &str) -> Self {
        Glob(pattern.to_string())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn matches(&self, text: &str) -> bool {
        let p = self.0.as_bytes();
        let t = text.as_bytes();
        // Iterative wildcard match with single-star backtracking: O(p * t) worst case.
        let (mut pi, mut ti) = (0, 0);
        let mut star: Option<(usize, usize)> = None;
        while ti < t.len() {
            if pi < p.len() && (p[pi] == b'?' || p[pi] == t[ti]) {
                pi += 1;
                ti += 1;
            } else if pi < p.len() && p[pi] == b'*' {
                star = Some((pi, ti));
                pi += 1;
            } else if let Some((sp, st)) = star {
                pi = sp + 1;
                ti = st + 1;
                star = Some((sp, st + 1));
            } else {
                return false;
            }
        }
        p[pi..].iter().all(|&c| c == b'*')
    }
}

#[cfg(test)]
mod tests {
    use super::Glob;

    #[test]
    fn globs_match_model_ids() {
        assert!(Glob::new("*").matches("gpt-4o"));
        assert!(Glob::new("*").matches(""));
        assert!(Glob::new("gpt-4o*").matches("gpt-4o-mini"));
        assert!(!Glob::new("gpt-4o*").matches("gpt-4"));
        assert!(Glob::new("ft:*:acme:*").matches("ft:gpt-4o-mini:acme::abc"));
        assert!(Glob::new("gpt-?").matches("gpt-4"));
        assert!(!Glob::new("gpt-?").matches("gpt-4o"));
        assert!(Glob::new("*mini*").matches("o4-mini-2025"));
        assert!(!Glob::new("llama*").matches("gpt-4o"));
    }
}
