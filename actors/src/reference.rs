//! Repository names and references (tags or digests), validated by the grammars of the OCI
//! distribution spec. Inline tests cover the grammar; the HTTP layer turns the errors into
//! `NAME_INVALID`, `TAG_INVALID` and `DIGEST_INVALID`.

use std::fmt;

use crate::digest::{Digest, DigestError};

/// Longest repository name accepted (Distribution's limit).
pub const MAX_NAME_LEN: usize = 255;
/// Longest tag accepted.
pub const MAX_TAG_LEN: usize = 128;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReferenceError {
    #[error("invalid repository name")]
    NameInvalid,
    #[error("repository name longer than {MAX_NAME_LEN} characters")]
    NameTooLong,
    #[error("invalid tag")]
    TagInvalid,
    #[error(transparent)]
    Digest(#[from] DigestError),
}

/// Checks a repository name against
/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(\/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*`.
pub fn validate_name(name: &str) -> Result<(), ReferenceError> {
    if name.len() > MAX_NAME_LEN {
        return Err(ReferenceError::NameTooLong);
    }
    if name.is_empty() || !name.split('/').all(valid_component) {
        return Err(ReferenceError::NameInvalid);
    }
    Ok(())
}

fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        // A separator run: one '.', one '_', exactly "__", or any number of '-'.
        let start = i;
        let sep = b[i];
        while i < b.len() && b[i] == sep {
            i += 1;
        }
        let run = i - start;
        let ok = match sep {
            b'.' => run == 1,
            b'_' => run == 1 || run == 2,
            b'-' => true,
            _ => false,
        };
        if !ok || i >= b.len() || !alnum(b[i]) {
            return false;
        }
    }
    true
}

/// Checks a tag against `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`.
pub fn validate_tag(tag: &str) -> Result<(), ReferenceError> {
    let b = tag.as_bytes();
    if b.is_empty() || b.len() > MAX_TAG_LEN {
        return Err(ReferenceError::TagInvalid);
    }
    let first_ok = b[0].is_ascii_alphanumeric() || b[0] == b'_';
    let rest_ok = b[1..]
        .iter()
        .all(|&x| x.is_ascii_alphanumeric() || matches!(x, b'.' | b'_' | b'-'));
    if first_ok && rest_ok {
        Ok(())
    } else {
        Err(ReferenceError::TagInvalid)
    }
}

/// A manifest reference: a tag (mutable) or a digest (immutable).
#[derive(Clone, PartialEq, Eq, Hash)]
pub enum Reference {
    Tag(String),
    Digest(Digest),
}

impl Reference {
    /// A reference containing ':' is a digest; anything else must be a valid tag.
    pub fn parse(s: &str) -> Result<Reference, ReferenceError> {
        if s.contains(':') {
            Ok(Reference::Digest(Digest::parse(s)?))
        } else {
            validate_tag(s)?;
            Ok(Reference::Tag(s.to_string()))
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Tag(t) => f.write_str(t),
            Reference::Digest(d) => fmt::Display::fmt(d, f),
        }
    }
}

impl fmt::Debug for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in [
            "alpine",
            "library/alpine",
            "a/b/c/d",
            "my-org/my.app",
            "a__b",
            "a_b",
            "a---b",
            "0",
            "x/manifests/blobs",
        ] {
            assert_eq!(validate_name(ok), Ok(()), "{ok}");
        }
        for bad in [
            "", "Alpine", "a//b", "/a", "a/", "..", "a/../b", "a/./b", "a..b", "a___b", "-a", "a-",
            "a_", ".a", "a b", "a%2fb", "_catalog", "a:b",
        ] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
        assert_eq!(
            validate_name(&"a".repeat(256)),
            Err(ReferenceError::NameTooLong)
        );
        assert_eq!(validate_name(&"a".repeat(255)), Ok(()));
    }

    #[test]
    fn tags() {
        for ok in ["latest", "3.20", "_x", "v1.2.3-rc.1", "A_b"] {
            assert_eq!(validate_tag(ok), Ok(()), "{ok}");
        }
        for bad in ["", ".x", "-x", "a/b", "a b", "a+b"] {
            assert!(validate_tag(bad).is_err(), "{bad}");
        }
        assert!(validate_tag(&"a".repeat(128)).is_ok());
        assert!(validate_tag(&"a".repeat(129)).is_err());
    }

    #[test]
    fn references() {
        assert_eq!(
            Reference::parse("latest").unwrap(),
            Reference::Tag("latest".into())
        );
        assert!(matches!(
            Reference::parse(
                "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
            ),
            Ok(Reference::Digest(_))
        ));
        assert!(Reference::parse("sha256:xyz").is_err());
        assert!(Reference::parse("../x").is_err());
    }
}
