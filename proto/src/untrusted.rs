//! Strings a peer chose, made safe to put in a log line.
//!
//! Anything a client sends (an MQTT topic or filter, a client id, a login name, a user name on
//! the agent's socket) may hold a newline that would start a forged log line, terminal escape
//! sequences, or 60 KB of text. Such a string is logged only through [`Untrusted`] (or
//! [`UntrustedBytes`] for bytes that may not be UTF-8): its `Display` shows control characters,
//! quotes and backslashes as Rust escapes (`\n`, `\u{1b}`, `\"`, via [`char::escape_debug`]),
//! and at most [`MAX_SHOWN_BYTES`] bytes of that, cut between characters, followed by
//! `…(N bytes)` with the length of the whole input. So one logged field is always one line of
//! bounded length, and what was cut off is visible. Nothing here is for secrets: a password is
//! never logged, escaped or not.

use std::fmt::{self, Write};

/// At most this many bytes of an untrusted string's escaped form are shown.
pub const MAX_SHOWN_BYTES: usize = 128;

/// At most this many bytes of an [`UntrustedReason`] are shown.
pub const MAX_SHOWN_REASON_BYTES: usize = 1024;

/// A reason a target or a peer gave (a dead letter's, a refusal's), displayed like
/// [`Untrusted`] but bounded at [`MAX_SHOWN_REASON_BYTES`]: such a text names the way out at its
/// end ("…use a target that stores another scheme"), which a cut at 128 bytes would lose.
#[derive(Clone, Copy)]
pub struct UntrustedReason<'a>(pub &'a str);

/// A client-supplied string, displayed escaped and length-bounded (see the module docs).
#[derive(Clone, Copy)]
pub struct Untrusted<'a>(pub &'a str);

/// Client-supplied bytes, displayed like [`Untrusted`]; bytes that are not UTF-8 show as `\xNN`.
#[derive(Clone, Copy)]
pub struct UntrustedBytes<'a>(pub &'a [u8]);

/// Writes escaped pieces while they fit in [`MAX_SHOWN_BYTES`]; remembers whether one did not.
struct Bounded<'f, 'g> {
    out: &'f mut fmt::Formatter<'g>,
    limit: usize,
    shown: usize,
    cut: bool,
}

impl Bounded<'_, '_> {
    /// Writes `piece` whole if it fits; false (and nothing written) once the budget is spent.
    fn piece(&mut self, piece: &str) -> Result<bool, fmt::Error> {
        if self.cut || self.shown + piece.len() > self.limit {
            self.cut = true;
            return Ok(false);
        }
        self.shown += piece.len();
        self.out.write_str(piece)?;
        Ok(true)
    }

    fn chars(&mut self, s: &str) -> Result<bool, fmt::Error> {
        let mut buf = String::with_capacity(12);
        for c in s.chars() {
            buf.clear();
            // escape_debug leaves printable characters (any script) as they are, and escapes
            // controls, quotes, backslashes and unprintable ones.
            write!(buf, "{}", c.escape_debug())?;
            if !self.piece(&buf)? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    fn finish(self, total: usize) -> fmt::Result {
        if self.cut {
            write!(self.out, "…({total} bytes)")?;
        }
        Ok(())
    }
}

impl fmt::Display for Untrusted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut b = Bounded {
            out: f,
            limit: MAX_SHOWN_BYTES,
            shown: 0,
            cut: false,
        };
        b.chars(self.0)?;
        b.finish(self.0.len())
    }
}

impl fmt::Display for UntrustedReason<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut b = Bounded {
            out: f,
            limit: MAX_SHOWN_REASON_BYTES,
            shown: 0,
            cut: false,
        };
        b.chars(self.0)?;
        b.finish(self.0.len())
    }
}

impl fmt::Debug for Untrusted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{self}\"")
    }
}

impl fmt::Display for UntrustedBytes<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut b = Bounded {
            out: f,
            limit: MAX_SHOWN_BYTES,
            shown: 0,
            cut: false,
        };
        for chunk in self.0.utf8_chunks() {
            if !b.chars(chunk.valid())? {
                break;
            }
            let mut all = true;
            for byte in chunk.invalid() {
                if !b.piece(&format!("\\x{byte:02x}"))? {
                    all = false;
                    break;
                }
            }
            if !all {
                break;
            }
        }
        b.finish(self.0.len())
    }
}

impl fmt::Debug for UntrustedBytes<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{self}\"")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reason_is_shown_whole_up_to_its_own_bound_and_still_escaped() {
        let reason = format!(
            "{} use a target that stores another scheme\nforged",
            "x".repeat(300)
        );
        let shown = UntrustedReason(&reason).to_string();
        assert!(shown.ends_with("another scheme\\nforged"), "{shown}");
        let long = "y".repeat(5000);
        assert!(UntrustedReason(&long)
            .to_string()
            .ends_with("…(5000 bytes)"));
        assert!(Untrusted(&reason)
            .to_string()
            .ends_with(&format!("…({} bytes)", reason.len())));
    }

    #[test]
    fn a_newline_quote_or_escape_sequence_stays_on_one_line_escaped() {
        let forged = "pwsync/v1/up/a\n2026-01-01T00:00:00Z  INFO relay ready \"x\" \u{1b}[31m\\";
        let shown = Untrusted(forged).to_string();
        assert!(
            !shown.contains('\n') && !shown.contains('\u{1b}'),
            "{shown}"
        );
        assert_eq!(
            shown,
            "pwsync/v1/up/a\\n2026-01-01T00:00:00Z  INFO relay ready \\\"x\\\" \\u{1b}[31m\\\\"
        );
        assert_eq!(Untrusted("host-a").to_string(), "host-a");
        assert_eq!(format!("{:?}", Untrusted("a\tb")), "\"a\\tb\"");
        // Printable non-ASCII stays readable.
        assert_eq!(Untrusted("Jürgen").to_string(), "Jürgen");
    }

    #[test]
    fn a_60_kb_string_is_cut_to_the_bound_and_says_how_long_it_was() {
        let long = "x".repeat(60 * 1024);
        let shown = Untrusted(&long).to_string();
        assert_eq!(
            shown,
            format!("{}…({} bytes)", "x".repeat(MAX_SHOWN_BYTES), 60 * 1024)
        );
        // Exactly at the bound: shown whole, no marker.
        let exact = "y".repeat(MAX_SHOWN_BYTES);
        assert_eq!(Untrusted(&exact).to_string(), exact);
        // Escapes count toward the bound: 100 newlines are 200 bytes shown, so they are cut.
        let lines = "\n".repeat(100);
        let shown = Untrusted(&lines).to_string();
        assert_eq!(shown, format!("{}…(100 bytes)", "\\n".repeat(64)));
    }

    #[test]
    fn the_cut_never_splits_a_multibyte_character() {
        // 127 ASCII bytes, then 'é' (2 bytes) straddles the 128-byte bound; a 4-byte emoji too.
        for tail in ["é", "😀", "€"] {
            let s = format!("{}{tail}{tail}", "a".repeat(MAX_SHOWN_BYTES - 1));
            let shown = Untrusted(&s).to_string();
            assert_eq!(
                shown,
                format!("{}…({} bytes)", "a".repeat(MAX_SHOWN_BYTES - 1), s.len()),
                "{tail}"
            );
        }
        let all = "ü".repeat(100); // 200 bytes: 64 whole characters fit
        let shown = Untrusted(&all).to_string();
        assert!(shown.starts_with(&"ü".repeat(64)) && shown.ends_with("…(200 bytes)"));
    }

    #[test]
    fn bytes_that_are_not_utf8_show_as_hex_escapes() {
        assert_eq!(
            UntrustedBytes(b"up/\xff\xfe\nz").to_string(),
            "up/\\xff\\xfe\\nz"
        );
        let long = vec![0xffu8; 1000];
        let shown = UntrustedBytes(&long).to_string();
        assert_eq!(shown, format!("{}…(1000 bytes)", "\\xff".repeat(32)));
    }
}
