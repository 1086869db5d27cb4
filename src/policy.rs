//! Which roles a connection allows: the allowed and denied role globs of an
//! `AppConnection` or `ClusterAppConnection` policy.
//!
//! Globs are matched against the whole role name, case-sensitively: `*` matches
//! any run of characters (including none), `?` exactly one character, and every
//! other character itself.

use std::fmt;

use crate::api::{ConnectionKind, ConnectionPolicy};

/// A compiled role glob.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Glob {
    pattern: String,
    tokens: Vec<Token>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Token {
    /// `*`: any run of characters, including none.
    Star,
    /// `?`: exactly one character.
    One,
    /// Any other character, matched as is.
    Literal(char),
}

impl Glob {
    /// Compiles `pattern`. Every string is a valid glob.
    pub fn new(pattern: &str) -> Self {
        let mut tokens = Vec::with_capacity(pattern.len());
        for c in pattern.chars() {
            let token = match c {
                '*' => Token::Star,
                '?' => Token::One,
                other => Token::Literal(other),
            };
            // Consecutive stars match exactly what one star matches.
            if token == Token::Star && tokens.last() == Some(&Token::Star) {
                continue;
            }
            tokens.push(token);
        }
        Self { pattern: pattern.to_owned(), tokens }
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.pattern
    }

    /// Whether the whole of `text` matches the pattern.
    ///
    /// Iterative, with a single backtracking point (the most recent `*`), so
    /// the cost is at most proportional to the pattern length times the text
    /// length, never exponential.
    pub fn matches(&self, text: &str) -> bool {
        let text: Vec<char> = text.chars().collect();
        let tokens = &self.tokens;
        let (mut t, mut p) = (0usize, 0usize);
        // After the most recent `*`: the pattern position following it, and
        // the text position it is currently assumed to stop at.
        let mut backtrack: Option<(usize, usize)> = None;
        while t < text.len() {
            match tokens.get(p) {
                Some(Token::Star) => {
                    p += 1;
                    backtrack = Some((p, t));
                }
                Some(Token::One) => {
                    p += 1;
                    t += 1;
                }
                Some(Token::Literal(c)) if *c == text[t] => {
                    p += 1;
                    t += 1;
                }
                _ => match backtrack {
                    // Let the last `*` swallow one more character, and retry.
                    Some((after_star, star_end)) => {
                        let star_end = star_end + 1;
                        backtrack = Some((after_star, star_end));
                        p = after_star;
                        t = star_end;
                    }
                    None => return false,
                },
            }
        }
        // The text is used up: what is left of the pattern must match nothing.
        tokens[p.min(tokens.len())..].iter().all(|token| *token == Token::Star)
    }
}

impl fmt::Display for Glob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.pattern)
    }
}

/// Whether a role may be granted through a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The role matches an allowed pattern (or none are set) and no denied one.
    Allowed,
    /// The role matches this denied pattern (the first one, in spec order).
    Denied {
        /// The denied pattern, as written in the policy.
        pattern: String,
    },
    /// Allowed patterns are set and the role matches none of them.
    NotAllowed,
    /// The connection allows no role at all: a ClusterAppConnection whose
    /// `allowedRoles` is empty.
    NoneAllowed,
}

impl Verdict {
    /// Whether the role may be granted.
    pub fn is_allowed(&self) -> bool {
        matches!(self, Verdict::Allowed)
    }
}

/// The role policy of a connection, compiled.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RolePolicy {
    allowed: Vec<Glob>,
    denied: Vec<Glob>,
    /// Whether an empty allowed list allows nothing (ClusterAppConnections).
    empty_allows_none: bool,
}

impl RolePolicy {
    /// Compiles a connection's policy; no policy allows every role.
    pub fn new(policy: Option<&ConnectionPolicy>) -> Self {
        let compile = |patterns: &[String]| patterns.iter().map(|p| Glob::new(p)).collect();
        match policy {
            Some(policy) => Self {
                allowed: compile(&policy.allowed_roles),
                denied: compile(&policy.denied_roles),
                empty_allows_none: false,
            },
            None => Self::default(),
        }
    }

    /// The policy of a connection of `kind`: a ClusterAppConnection, which
    /// acts with keysmith's own rights, allows no role until its
    /// `allowedRoles` names some; an AppConnection, which acts as a
    /// ServiceAccount the apiserver limits, allows every role not denied.
    pub fn for_connection(kind: ConnectionKind, policy: Option<&ConnectionPolicy>) -> Self {
        Self { empty_allows_none: kind == ConnectionKind::ClusterAppConnection, ..Self::new(policy) }
    }

    /// Allowed when `role` matches an allowed pattern (or there are none) and
    /// no denied pattern; denied wins.
    pub fn check(&self, role: &str) -> Verdict {
        if let Some(glob) = self.denied.iter().find(|glob| glob.matches(role)) {
            return Verdict::Denied { pattern: glob.as_str().to_owned() };
        }
        if self.allowed.is_empty() && self.empty_allows_none {
            Verdict::NoneAllowed
        } else if self.allowed.is_empty() || self.allowed.iter().any(|glob| glob.matches(role)) {
            Verdict::Allowed
        } else {
            Verdict::NotAllowed
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    fn glob(pattern: &str, text: &str) -> bool {
        Glob::new(pattern).matches(text)
    }

    fn policy(allowed: &[&str], denied: &[&str]) -> RolePolicy {
        let spec = ConnectionPolicy {
            allowed_roles: allowed.iter().map(|s| s.to_string()).collect(),
            denied_roles: denied.iter().map(|s| s.to_string()).collect(),
            ..ConnectionPolicy::default()
        };
        RolePolicy::new(Some(&spec))
    }

    #[test]
    fn exact_patterns_match_only_themselves() {
        assert!(glob("view", "view"));
        assert!(!glob("view", "views"));
        assert!(!glob("view", "vie"));
        assert!(!glob("view", "View"), "matching is case-sensitive");
        assert!(!glob("view", ""));
        assert!(glob("", ""));
        assert!(!glob("", "a"));
        assert!(glob("Modify All Data", "Modify All Data"));
        // Regex metacharacters are literal.
        assert!(glob("a.b+[c]", "a.b+[c]"));
        assert!(!glob("a.b", "axb"));
    }

    #[test]
    fn star_matches_any_run_including_none() {
        assert!(glob("*", ""));
        assert!(glob("*", "anything at all"));
        assert!(glob("**", "x"));
        assert!(glob("db-*", "db-"));
        assert!(glob("db-*", "db-reader"));
        assert!(!glob("db-*", "db"));
        assert!(!glob("db-*", "xdb-reader"));
        assert!(glob("*-reader", "db-reader"));
        assert!(!glob("*-reader", "db-reader-2"));
        assert!(glob("a*b*c", "abc"));
        assert!(glob("a*b*c", "aXXbYYc"));
        assert!(glob("a*b*c", "abcbc"));
        assert!(!glob("a*b*c", "aXXbYY"));
        assert!(glob("*ab", "aab"));
        assert!(glob("a*a*a", "aaaa"));
        assert!(!glob("a*a*a", "aa"));
    }

    #[test]
    fn question_mark_matches_exactly_one_character() {
        assert!(glob("role-?", "role-1"));
        assert!(!glob("role-?", "role-"));
        assert!(!glob("role-?", "role-12"));
        assert!(glob("??", "ab"));
        assert!(!glob("??", "a"));
        assert!(glob("?*", "a"));
        assert!(!glob("?*", ""));
        // One character, not one byte.
        assert!(glob("caf?", "café"));
        assert!(glob("?", "ß"));
    }

    #[test]
    fn pathological_patterns_finish_fast() {
        let text = "a".repeat(40);
        let start = Instant::now();
        assert!(!glob("a*a*a*a*a*a*b", &text));
        assert!(!glob("*a*a*a*a*a*a*a*a*a*a*a*a*b", &"a".repeat(4000)));
        assert!(glob("a*a*a*a*a*a*a", &text));
        assert!(start.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn no_policy_and_empty_policy_allow_everything() {
        assert_eq!(RolePolicy::new(None).check("cluster-admin"), Verdict::Allowed);
        assert_eq!(policy(&[], &[]).check("anything"), Verdict::Allowed);
        assert!(RolePolicy::new(None).check("").is_allowed());
    }

    #[test]
    fn empty_allowed_list_allows_all_but_denied() {
        let p = policy(&[], &["cluster-admin", "*:write"]);
        assert_eq!(p.check("view"), Verdict::Allowed);
        assert_eq!(p.check("cluster-admin"), Verdict::Denied { pattern: "cluster-admin".into() });
        assert_eq!(p.check("billing:write"), Verdict::Denied { pattern: "*:write".into() });
    }

    #[test]
    fn allowed_list_restricts() {
        let p = policy(&["view", "db-*", "team-?"], &[]);
        assert_eq!(p.check("view"), Verdict::Allowed);
        assert_eq!(p.check("db-reader"), Verdict::Allowed);
        assert_eq!(p.check("team-a"), Verdict::Allowed);
        assert_eq!(p.check("team-ab"), Verdict::NotAllowed);
        assert_eq!(p.check("edit"), Verdict::NotAllowed);
        assert_eq!(p.check("View"), Verdict::NotAllowed);
        assert!(!p.check("edit").is_allowed());
    }

    #[test]
    fn denied_wins_over_allowed() {
        let p = policy(&["*"], &["cluster-admin", "admin-*"]);
        assert_eq!(p.check("view"), Verdict::Allowed);
        assert_eq!(p.check("cluster-admin"), Verdict::Denied { pattern: "cluster-admin".into() });
        assert_eq!(p.check("admin-users"), Verdict::Denied { pattern: "admin-*".into() });
        // The same pattern in both lists: denied still wins.
        let p = policy(&["Modify All Data"], &["Modify All Data"]);
        assert_eq!(p.check("Modify All Data"), Verdict::Denied { pattern: "Modify All Data".into() });
    }

    #[test]
    fn first_matching_denied_pattern_is_reported() {
        let p = policy(&[], &["admin-*", "*-users", "*"]);
        assert_eq!(p.check("admin-users"), Verdict::Denied { pattern: "admin-*".into() });
        assert_eq!(p.check("x"), Verdict::Denied { pattern: "*".into() });
    }

    #[test]
    fn a_cluster_connection_allows_no_role_until_it_names_some() {
        let cluster = |allowed: &[&str]| {
            let spec = ConnectionPolicy {
                allowed_roles: allowed.iter().map(|s| s.to_string()).collect(),
                ..ConnectionPolicy::default()
            };
            RolePolicy::for_connection(ConnectionKind::ClusterAppConnection, Some(&spec))
        };
        assert_eq!(cluster(&[]).check("view"), Verdict::NoneAllowed);
        assert_eq!(
            RolePolicy::for_connection(ConnectionKind::ClusterAppConnection, None).check("view"),
            Verdict::NoneAllowed
        );
        assert_eq!(cluster(&["*"]).check("view"), Verdict::Allowed);
        assert_eq!(cluster(&["view"]).check("edit"), Verdict::NotAllowed);
        assert_eq!(RolePolicy::for_connection(ConnectionKind::AppConnection, None).check("view"), Verdict::Allowed);
    }

    #[test]
    fn glob_keeps_its_pattern() {
        let g = Glob::new("db-**");
        assert_eq!(g.as_str(), "db-**");
        assert_eq!(g.to_string(), "db-**");
        assert!(g.matches("db-x"));
    }
}
