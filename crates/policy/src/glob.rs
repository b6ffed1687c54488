//! Globs on tool and server names: `*` matches any run of bytes, `?` exactly one
//! byte, everything else itself. Names are compared byte for byte: no case folding,
//! no Unicode normalisation, so `Refund` and `refund` (or a Cyrillic `е` in place of
//! a Latin `e`) are different names.

/// Whether `name` matches the glob `pattern` (`*`, `?`), byte for byte.
pub fn glob_matches(pattern: &str, name: &str) -> bool {
    Glob::new(pattern).matches(name)
}

/// Whether `pattern` contains a glob metacharacter (`*` or `?`).
pub fn is_glob(pattern: &str) -> bool {
    pattern.bytes().any(|b| b == b'*' || b == b'?')
}

/// A glob prepared for repeated matching: the common shapes (exact, `*`,
/// `prefix*`, `*suffix`) skip the general matcher.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Glob {
    pattern: String,
    shape: GlobShape,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum GlobShape {
    /// No metacharacter: equality.
    #[default]
    Exact,
    /// `*`: everything.
    Any,
    /// `abc*`: a prefix.
    Prefix,
    /// `*abc`: a suffix.
    Suffix,
    /// Anything else.
    General,
}

impl Glob {
    /// Prepares `pattern`.
    pub fn new(pattern: &str) -> Self {
        let bytes = pattern.as_bytes();
        let metas = bytes.iter().filter(|b| **b == b'*' || **b == b'?').count();
        let shape = if metas == 0 {
            GlobShape::Exact
        } else if pattern.bytes().all(|b| b == b'*') {
            GlobShape::Any
        } else if metas == 1 && bytes.last() == Some(&b'*') {
            GlobShape::Prefix
        } else if metas == 1 && bytes.first() == Some(&b'*') {
            GlobShape::Suffix
        } else {
            GlobShape::General
        };
        Self {
            pattern: pattern.to_owned(),
            shape,
        }
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.pattern
    }

    /// Whether the pattern has no metacharacter (matches one name only).
    pub fn is_exact(&self) -> bool {
        self.shape == GlobShape::Exact
    }

    /// Whether the pattern matches every name.
    pub fn is_any(&self) -> bool {
        self.shape == GlobShape::Any
    }

    /// Whether `name` matches, byte for byte.
    pub fn matches(&self, name: &str) -> bool {
        let pattern = self.pattern.as_bytes();
        let name = name.as_bytes();
        match self.shape {
            GlobShape::Exact => pattern == name,
            GlobShape::Any => true,
            GlobShape::Prefix => name.starts_with(&pattern[..pattern.len() - 1]),
            GlobShape::Suffix => name.ends_with(&pattern[1..]),
            GlobShape::General => general_match(pattern, name),
        }
    }
}

/// Iterative glob matching with single-star backtracking: linear in practice,
/// never exponential.
fn general_match(pattern: &[u8], name: &[u8]) -> bool {
    let (mut p, mut n) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, n));
                p += 1;
            }
            Some(b'?') => {
                p += 1;
                n += 1;
            }
            Some(c) if *c == name[n] => {
                p += 1;
                n += 1;
            }
            _ => match star {
                Some((star_p, star_n)) => {
                    p = star_p + 1;
                    n = star_n + 1;
                    star = Some((star_p, star_n + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|b| *b == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_names_compare_byte_for_byte() {
        assert!(glob_matches("refund", "refund"));
        assert!(!glob_matches("refund", "Refund"));
        assert!(!glob_matches("refund", "REFUND"));
        // Cyrillic 'е' (U+0435) instead of Latin 'e'.
        assert!(!glob_matches("refund", "r\u{0435}fund"));
        // Fullwidth letters are not folded.
        assert!(!glob_matches("refund", "ｒｅｆｕｎｄ"));
        // Composed vs decomposed é.
        assert!(!glob_matches("caf\u{e9}", "cafe\u{301}"));
        assert!(!glob_matches("refund", "refund "));
        assert!(!glob_matches("refund", "refund\0"));
    }

    #[test]
    fn stars_and_question_marks() {
        assert!(glob_matches("*", ""));
        assert!(glob_matches("*", "anything"));
        assert!(glob_matches("refund_*", "refund_order"));
        assert!(glob_matches("refund_*", "refund_"));
        assert!(!glob_matches("refund_*", "refun"));
        assert!(glob_matches("*_order", "get_order"));
        assert!(!glob_matches("*_order", "get_orders"));
        assert!(glob_matches("get_?rder", "get_order"));
        assert!(!glob_matches("get_?rder", "get_rder"));
        assert!(glob_matches("a*b*c", "aXXbYYc"));
        assert!(glob_matches("a*b*c", "abc"));
        assert!(!glob_matches("a*b*c", "acb"));
        assert!(glob_matches("**", "x"));
        assert!(glob_matches("*a*", "bab"));
    }

    #[test]
    fn question_mark_is_one_byte_not_one_character() {
        // 'é' is two bytes in UTF-8.
        assert!(!glob_matches("caf?", "café"));
        assert!(glob_matches("caf??", "café"));
    }

    #[test]
    fn pathological_patterns_stay_fast() {
        let name = "a".repeat(10_000);
        let pattern = format!("{}b", "*a".repeat(50));
        assert!(!glob_matches(&pattern, &name));
    }
}
