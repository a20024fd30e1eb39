//! Names, glob patterns and server addresses, checked once at the edge.
//!
//! A name is a `/`-separated path of elements. Elements use a small
//! character set (letters, digits and `-_.:@+=,~`) so that a name can go in
//! a URL path without escaping and in an etcd key next to a `\0` separator
//! without ambiguity. `*` and `...` are reserved for patterns: `*` matches
//! within one element (`*` alone matches any one element, `n*` any element
//! starting with `n`), `...` matches any number of elements, zero included.

use flotilla_api::names::{MAX_NAME_BYTES, MAX_NAME_ELEMENTS, MAX_SERVER_BYTES, MAX_TTL};
use std::time::Duration;

/// Why a name, pattern, server or TTL was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum NameError {
    #[error("the name is empty")]
    Empty,
    #[error("{what} is longer than {max} bytes")]
    TooLong { what: &'static str, max: usize },
    #[error("the name has more than {MAX_NAME_ELEMENTS} elements")]
    TooDeep,
    #[error("{input:?} has an empty element (`//`)")]
    EmptyElement { input: String },
    #[error("element {element:?} is not allowed in a name")]
    ReservedElement { element: String },
    #[error("character {ch:?} is not allowed in {input:?} (use letters, digits and -_.:@+=,~)")]
    BadChar { input: String, ch: char },
    #[error("the server address is empty or has control characters")]
    BadServer,
    #[error("TTL {ttl_s} s is not in (0, {}] s", MAX_TTL.as_secs())]
    BadTtl { ttl_s: f64 },
}

fn allowed(c: char) -> bool {
    c.is_ascii_alphanumeric() || "-_.:@+=,~".contains(c)
}

/// Splits and checks the common shape of names and patterns; `wild` allows
/// `*` inside elements and `...` as an element.
fn elements(input: &str, wild: bool) -> Result<Vec<&str>, NameError> {
    if input.len() > MAX_NAME_BYTES {
        return Err(NameError::TooLong { what: "the name", max: MAX_NAME_BYTES });
    }
    let trimmed = input.trim_matches('/');
    if trimmed.is_empty() {
        return Err(NameError::Empty);
    }
    let elems: Vec<&str> = trimmed.split('/').collect();
    if elems.len() > MAX_NAME_ELEMENTS {
        return Err(NameError::TooDeep);
    }
    for e in &elems {
        if e.is_empty() {
            return Err(NameError::EmptyElement { input: input.into() });
        }
        if *e == "..." && wild {
            continue;
        }
        if *e == "." || *e == ".." || *e == "..." {
            return Err(NameError::ReservedElement { element: (*e).into() });
        }
        if let Some(ch) = e.chars().find(|&c| !(allowed(c) || (wild && c == '*'))) {
            return Err(NameError::BadChar { input: input.into(), ch });
        }
    }
    Ok(elems)
}

/// A checked, normalised name: no leading or trailing `/`, no empty
/// elements, no wildcards.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Name(String);

impl Name {
    pub fn parse(input: &str) -> Result<Name, NameError> {
        Ok(Name(elements(input, false)?.join("/")))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Every (prefix, suffix) split at an element boundary, longest prefix
    /// first: `a/b/c` gives `(a/b/c, "")`, `(a/b, c)`, `(a, b/c)`. Resolve
    /// walks these and stops at the first prefix with live mounts.
    pub fn prefixes(&self) -> impl Iterator<Item = (&str, &str)> {
        let s = self.0.as_str();
        std::iter::once((s, "")).chain(s.rmatch_indices('/').map(move |(i, _)| (&s[..i], &s[i + 1..])))
    }
}

impl std::fmt::Display for Name {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Checks a server address: non-empty, bounded, no control characters (it
/// ends up in logs, keys and terminals).
pub fn check_server(server: &str) -> Result<(), NameError> {
    if server.len() > MAX_SERVER_BYTES {
        return Err(NameError::TooLong { what: "the server address", max: MAX_SERVER_BYTES });
    }
    if server.is_empty() || server.chars().any(char::is_control) {
        return Err(NameError::BadServer);
    }
    Ok(())
}

/// Checks a TTL in seconds from the wire and turns it into a duration.
pub fn check_ttl(ttl_s: f64) -> Result<Duration, NameError> {
    if !(ttl_s.is_finite() && ttl_s > 0.0 && ttl_s <= MAX_TTL.as_secs_f64()) {
        return Err(NameError::BadTtl { ttl_s });
    }
    Ok(Duration::from_secs_f64(ttl_s))
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Elem {
    /// An element with no `*`: compared as is.
    Literal(String),
    /// An element with `*` in it: `*` matches any run of characters.
    Wild(String),
    /// `...`: any number of elements.
    Rest,
}

/// A checked glob pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    elems: Vec<Elem>,
    source: String,
}

impl Pattern {
    pub fn parse(input: &str) -> Result<Pattern, NameError> {
        let elems: Vec<Elem> = elements(input, true)?
            .into_iter()
            .map(|e| match e {
                "..." => Elem::Rest,
                w if w.contains('*') => Elem::Wild(w.into()),
                l => Elem::Literal(l.into()),
            })
            .collect();
        Ok(Pattern { source: input.trim_matches('/').into(), elems })
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// The literal elements before the first wildcard, joined: every
    /// matching name starts with it, so stores scan only that range.
    pub fn literal_prefix(&self) -> String {
        let lits: Vec<&str> = self
            .elems
            .iter()
            .map_while(|e| match e {
                Elem::Literal(l) => Some(l.as_str()),
                Elem::Wild(_) | Elem::Rest => None,
            })
            .collect();
        lits.join("/")
    }

    /// Whether the whole pattern is literal (it names one name).
    pub fn is_literal(&self) -> bool {
        self.elems.iter().all(|e| matches!(e, Elem::Literal(_)))
    }

    /// Whether `name` (normalised) matches.
    pub fn matches(&self, name: &str) -> bool {
        let names: Vec<&str> = name.split('/').collect();
        // reach[j]: the pattern elements consumed so far can match the
        // first j name elements. One row per pattern element keeps `...`
        // linear instead of backtracking.
        let mut reach = vec![false; names.len() + 1];
        reach[0] = true;
        for e in &self.elems {
            let mut next = vec![false; names.len() + 1];
            match e {
                Elem::Rest => {
                    let mut any = false;
                    for j in 0..=names.len() {
                        any |= reach[j];
                        next[j] = any;
                    }
                }
                Elem::Literal(l) => {
                    for j in 0..names.len() {
                        next[j + 1] = reach[j] && names[j] == l;
                    }
                }
                Elem::Wild(w) => {
                    for j in 0..names.len() {
                        next[j + 1] = reach[j] && wildcard(w, names[j]);
                    }
                }
            }
            reach = next;
        }
        reach[names.len()]
    }
}

/// `*` matches any run of characters (greedy with one backtrack point, the
/// classic linear algorithm).
fn wildcard(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut i, mut j) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while j < t.len() {
        if i < p.len() && p[i] == b'*' {
            star = Some((i, j));
            i += 1;
        } else if i < p.len() && p[i] == t[j] {
            i += 1;
            j += 1;
        } else if let Some((si, sj)) = star {
            i = si + 1;
            j = sj + 1;
            star = Some((si, sj + 1));
        } else {
            return false;
        }
    }
    p[i..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_normalise_and_refuse_bad_input() {
        assert_eq!(Name::parse("/nodes/n1/").unwrap().as_str(), "nodes/n1");
        assert_eq!(Name::parse("a//b"), Err(NameError::EmptyElement { input: "a//b".into() }));
        assert_eq!(Name::parse("/"), Err(NameError::Empty));
        assert!(matches!(Name::parse("a/../b"), Err(NameError::ReservedElement { .. })));
        assert!(matches!(Name::parse("a/*"), Err(NameError::BadChar { ch: '*', .. })));
        assert!(matches!(Name::parse("a b"), Err(NameError::BadChar { ch: ' ', .. })));
        assert!(matches!(Name::parse("a/..."), Err(NameError::ReservedElement { .. })));
        assert_eq!(Name::parse(&"a/".repeat(40)), Err(NameError::TooDeep));
        assert!(matches!(Name::parse(&"x".repeat(600)), Err(NameError::TooLong { .. })));
        assert!(Name::parse("apps/web:8080/i-1@n2").is_ok());
    }

    #[test]
    fn prefixes_longest_first() {
        let n = Name::parse("a/b/c").unwrap();
        let p: Vec<_> = n.prefixes().collect();
        assert_eq!(p, vec![("a/b/c", ""), ("a/b", "c"), ("a", "b/c")]);
        let one = Name::parse("a").unwrap();
        assert_eq!(one.prefixes().collect::<Vec<_>>(), vec![("a", "")]);
    }

    #[test]
    fn globs() {
        let m = |p: &str, n: &str| Pattern::parse(p).unwrap().matches(n);
        assert!(m("nodes/*", "nodes/n1"));
        assert!(!m("nodes/*", "nodes"));
        assert!(!m("nodes/*", "nodes/n1/x"));
        assert!(m("nodes/...", "nodes"));
        assert!(m("nodes/...", "nodes/a/b/c"));
        assert!(m("...", "x/y"));
        assert!(m(".../c", "a/b/c"));
        assert!(m("a/.../c/...", "a/c"));
        assert!(!m(".../c", "a/b/cd"));
        assert!(m("n*/*-2", "nodes/linux-2"));
        assert!(!m("n*/*-2", "apps/linux-2"));
        assert!(m("a*b*c", "abbbc"));
        assert!(!m("a*b*c", "abbbcd"));
        assert!(m("*", "x"));
        assert!(Pattern::parse("a/ b").is_err());
    }

    #[test]
    fn literal_prefixes() {
        assert_eq!(Pattern::parse("nodes/*").unwrap().literal_prefix(), "nodes");
        assert_eq!(Pattern::parse("a/b/.../c").unwrap().literal_prefix(), "a/b");
        assert_eq!(Pattern::parse("...").unwrap().literal_prefix(), "");
        assert!(Pattern::parse("a/b").unwrap().is_literal());
    }

    #[test]
    fn servers_and_ttls() {
        assert!(check_server("http://127.0.0.1:7000").is_ok());
        assert_eq!(check_server(""), Err(NameError::BadServer));
        assert_eq!(check_server("a\nb"), Err(NameError::BadServer));
        assert_eq!(check_ttl(1.5).unwrap(), Duration::from_millis(1500));
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY, 1e9] {
            assert!(check_ttl(bad).is_err(), "{bad}");
        }
    }
}
