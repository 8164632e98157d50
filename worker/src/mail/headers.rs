//! The `To` and `Subject` lines of a message: written as they are when
//! lettre would write them unchanged (ASCII that needs no encoding, on a line
//! short enough never to be folded), through lettre's encoders otherwise
//! (RFC 2047 for non-ASCII, quoting with escapes, folding).
//!
//! Why: lettre builds each header as a `HeaderValue` holding both a raw and
//! an encoded copy (for `To`, a second rendering of the mailbox), then formats
//! the set; the plain case is a few copies.

use std::io::Write as _;

use lettre::Address;
use lettre::message::header::{self, Headers};
use lettre::message::{Mailbox, Mailboxes};

/// Longest line lettre leaves unfolded (email-encoding's `MAX_LINE_LEN`).
const MAX_LINE: usize = 76;

/// `To: name <address>` (or just the address) with CRLF; `name` is trimmed
/// and not empty.
pub(super) fn write_to(out: &mut Vec<u8>, name: Option<&str>, address: &Address) {
    let email: &str = address.as_ref();
    let fits = |len: usize| "To: ".len() + len <= MAX_LINE;
    match name {
        None if fits(email.len()) => {
            put(out, &["To: ", email, "\r\n"]);
        }
        // As lettre's quoted-string encoder: an atom as it is, words quoted.
        Some(name) if fits(name.len() + " <>".len() + email.len()) && name.bytes().all(atom) => {
            put(out, &["To: ", name, " <", email, ">\r\n"]);
        }
        Some(name)
            if fits(name.len() + "\"\" <>".len() + email.len())
                && name.bytes().all(|b| atom(b) || b == b' ') =>
        {
            put(out, &["To: \"", name, "\" <", email, ">\r\n"]);
        }
        _ => {
            let mailbox = Mailbox::new(name.map(str::to_owned), address.clone());
            via_lettre(out, header::To::from(Mailboxes::from(mailbox)));
        }
    }
}

/// `Subject: subject` with CRLF.
pub(super) fn write_subject(out: &mut Vec<u8>, subject: &str) {
    // lettre encodes words with other bytes than these (RFC 2047).
    let plain = |b: u8| matches!(b, 1..=9 | 11 | 12 | 14..=127);
    if "Subject: ".len() + subject.len() <= MAX_LINE && subject.bytes().all(plain) {
        put(out, &["Subject: ", subject, "\r\n"]);
    } else {
        via_lettre(out, header::Subject::from(subject.to_owned()));
    }
}

/// A byte lettre writes in a name without quotes.
fn atom(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')
}

/// Appends `parts` (the `fmt` machinery costs more than the copies).
pub(super) fn put(out: &mut Vec<u8>, parts: &[&str]) {
    for part in parts {
        out.extend_from_slice(part.as_bytes());
    }
}

fn via_lettre(out: &mut Vec<u8>, value: impl header::Header) {
    let mut headers = Headers::with_capacity(1);
    headers.set(value);
    // Writing into a Vec cannot fail.
    let _ = write!(out, "{headers}");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ours(write: impl FnOnce(&mut Vec<u8>)) -> String {
        let mut out = Vec::new();
        write(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    }

    fn lettre(value: impl header::Header) -> String {
        ours(|out| via_lettre(out, value))
    }

    fn names() -> Vec<String> {
        let mut names: Vec<String> = [
            "Alice",
            "User 42",
            "J.-P._Smith",
            "Zoé",
            "请确认",
            "Rogue \" User",
            "back\\slash",
            "O'Brien",
            "a  b",
            "Doe, John",
            "x@y",
            "<z@evil.test>, Bcc: x@evil.test",
            "tab\there",
        ]
        .map(str::to_owned)
        .to_vec();
        // Around the folding limit, with and without spaces.
        for len in 40..80 {
            names.push("n".repeat(len));
            names.push(format!("{} {}", "n".repeat(len / 2), "m".repeat(len / 2)));
        }
        names
    }

    #[test]
    fn to_lines_are_lettres() -> Result<(), lettre::address::AddressError> {
        let long = format!("alice@{}.example.com", "d".repeat(60));
        for email in ["alice@example.com", "b@x.io", long.as_str()] {
            let address: Address = email.parse()?;
            let mut all: Vec<Option<String>> = names().into_iter().map(Some).collect();
            all.push(None);
            for name in all {
                let mailbox = Mailbox::new(name.clone(), address.clone());
                assert_eq!(
                    ours(|out| write_to(out, name.as_deref(), &address)),
                    lettre(header::To::from(Mailboxes::from(mailbox))),
                    "{name:?} <{email}>"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn subject_lines_are_lettres() {
        let mut subjects = names();
        subjects.extend(
            [
                "",
                "Confirm your email address",
                "请确认您的邮箱地址",
                "Bestätigen Sie Ihre E-Mail-Adresse",
                " leading and trailing ",
                "=?utf-8?b?eA==?=",
            ]
            .map(str::to_owned),
        );
        for len in 60..75 {
            subjects.push(format!("{} {}", "s".repeat(len - 10), "t".repeat(9)));
        }
        for subject in subjects {
            assert_eq!(
                ours(|out| write_subject(out, &subject)),
                lettre(header::Subject::from(subject.clone())),
                "{subject:?}"
            );
        }
    }
}
