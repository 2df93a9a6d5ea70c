//! Document type names: app-defined (`posts`, `notes`, `chat.messages`), validated everywhere a
//! name enters, with the same pattern the database enforces in a CHECK constraint.

/// Longest accepted name, in bytes.
pub const MAX_LEN: usize = 64;

/// `^[a-z][a-z0-9_.-]{0,63}$`
pub fn is_valid(name: &str) -> bool {
    let bytes = name.as_bytes();
    matches!(bytes.first(), Some(b'a'..=b'z'))
        && bytes.len() <= MAX_LEN
        && bytes[1..]
            .iter()
            .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'.' | b'-'))
}

/// Types the server alone writes (`vibe.` prefix, e.g. certificates): readable through the
/// document API under their ACLs, never written through it.
pub fn is_reserved(name: &str) -> bool {
    name.starts_with("vibe.")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_and_rejects() {
        for ok in ["posts", "a", "chat.messages", "x_1-2", &"a".repeat(64)] {
            assert!(is_valid(ok), "{ok}");
        }
        for bad in [
            "",
            "Posts",
            "1posts",
            "_x",
            "po sts",
            "pöst",
            "a/b",
            &"a".repeat(65),
        ] {
            assert!(!is_valid(bad), "{bad}");
        }
    }
}
