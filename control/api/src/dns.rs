//! Mesh DNS naming rules, shared by the coordinator (which validates `--dns-domain`) and
//! the joiner (which serves the names and re-checks the domain the coordinator sends).
//!
//! * The mesh domain is an ordinary DNS name of LDH labels (letters, digits, hyphens; 1-63
//!   bytes each, no hyphen at either end), at most 253 bytes, kept lowercase without the
//!   trailing dot. The root (`.`) and the empty name are not domains.
//! * A member's name is `<label>.<domain>` where `label` is its display name lowercased,
//!   if that is one valid LDH label and not the reserved `app`. Display names that are not
//!   (dots, `*`, spaces, underscores, non-ASCII, more than 63 bytes) get no DNS name: the
//!   mesh never rewrites one name into another (no IDNA or punycode mapping), so no crafted
//!   name can be folded onto someone else's.
//! * An app's name is `<uuid>.app.<domain>` (the UUID in lowercase hyphenated form).

use std::fmt;

/// The mesh domain when the coordinator names none.
pub const DEFAULT_DOMAIN: &str = "mesh";

/// The label under the mesh domain that holds app names (`<uuid>.app.<domain>`); never a
/// member's name.
pub const APP_LABEL: &str = "app";

/// Longest DNS name in presentation form without the trailing dot (RFC 1035 §2.3.4).
const MAX_NAME: usize = 253;
/// Longest DNS label (RFC 1035 §2.3.4).
const MAX_LABEL: usize = 63;

/// Why a string is not a usable mesh domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadDomain(String);

impl fmt::Display for BadDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BadDomain {}

/// The domain `s` in normal form (lowercase, no trailing dot), or why it is not one.
pub fn normalize_domain(s: &str) -> Result<String, BadDomain> {
    let trimmed = s.strip_suffix('.').unwrap_or(s);
    if trimmed.is_empty() {
        return Err(BadDomain(format!(
            "{s:?} is not a domain (the root and the empty name cannot hold mesh names)"
        )));
    }
    if trimmed.len() > MAX_NAME {
        return Err(BadDomain(format!(
            "{s:?} is {} bytes long; a DNS name has at most {MAX_NAME}",
            trimmed.len()
        )));
    }
    let lower = trimmed.to_ascii_lowercase();
    for label in lower.split('.') {
        if !is_ldh_label(label) {
            return Err(BadDomain(format!(
                "{s:?}: label {label:?} is not 1-{MAX_LABEL} letters, digits or inner hyphens"
            )));
        }
    }
    Ok(lower)
}

/// The DNS label of a member with this display name, or `None` when the name is not one
/// valid label (see the module docs) or is the reserved [`APP_LABEL`].
pub fn member_label(display_name: &str) -> Option<String> {
    let label = display_name.to_ascii_lowercase();
    (is_ldh_label(&label) && label != APP_LABEL).then_some(label)
}

/// Whether `label` is 1-63 bytes of `[a-z0-9-]` (either case) without a hyphen at an end.
pub fn is_ldh_label(label: &str) -> bool {
    !label.is_empty()
        && label.len() <= MAX_LABEL
        && label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !label.starts_with('-')
        && !label.ends_with('-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domains_are_normalized_and_bad_ones_named() {
        assert_eq!(normalize_domain("mesh").unwrap(), "mesh");
        assert_eq!(normalize_domain("Corp.Example.").unwrap(), "corp.example");
        for bad in ["", ".", "..", "a..b", "-a", "a-", "a_b", "*", "ä", "a b"] {
            let e = normalize_domain(bad).unwrap_err().to_string();
            assert!(e.contains(&format!("{bad:?}")), "{bad}: {e}");
        }
        let long = [
            "a".repeat(63),
            "b".repeat(63),
            "c".repeat(63),
            "d".repeat(63),
        ]
        .join(".");
        assert!(normalize_domain(&long).is_err());
        assert!(normalize_domain(&"a".repeat(64)).is_err());
    }

    #[test]
    fn member_labels_refuse_rather_than_rewrite() {
        assert_eq!(member_label("Sup1").as_deref(), Some("sup1"));
        assert_eq!(member_label("web-2").as_deref(), Some("web-2"));
        for bad in [
            "x.app",
            "*",
            "",
            "app",
            "APP",
            "a_b",
            "näme",
            "-x",
            &"x".repeat(64),
        ] {
            assert_eq!(member_label(bad), None, "{bad}");
        }
        assert!(member_label(&"x".repeat(63)).is_some());
    }
}
