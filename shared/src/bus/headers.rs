//! Headers of dead letters and replayed copies, and reading them back.

use lapin::types::{AMQPValue, FieldTable};

use super::topology::table;
use super::{HEADER_DETAIL, HEADER_REASON, HEADER_REPLAYED};

/// Reads a string header (`x-verimail-reason`, `x-first-death-reason`...).
pub fn header_str(headers: Option<&FieldTable>, name: &str) -> Option<String> {
    let value = headers?.inner().get(name)?;
    match value {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

/// Headers for a letter the worker moves to `{ns}.dead` itself.
pub fn dead_letter_headers(reason: &str, detail: &str) -> FieldTable {
    // Header values are bounded so a huge detail cannot bloat every letter.
    let detail: String = detail.chars().take(1024).collect();
    table(&[
        (HEADER_REASON, AMQPValue::LongString(reason.into())),
        (HEADER_DETAIL, AMQPValue::LongString(detail.as_str().into())),
    ])
}

/// Headers for a dead letter's replayed copy: the letter's own headers (the
/// worker reads `x-verimail-failed-outcome` from them to reopen a request that
/// failed with `delivery_failed`) without the dead-lettering ones, plus
/// [`HEADER_REPLAYED`].
pub fn replay_headers(letter: Option<&FieldTable>) -> FieldTable {
    let mut headers = FieldTable::default();
    if let Some(original) = letter {
        for (key, value) in original.inner() {
            let k = key.as_str();
            let dead_lettering = k == HEADER_REASON
                || k == HEADER_DETAIL
                || k.starts_with("x-death")
                || k.starts_with("x-first-death")
                || k.starts_with("x-last-death");
            if !dead_lettering {
                headers.insert(key.clone(), value.clone());
            }
        }
    }
    headers.insert(HEADER_REPLAYED.into(), AMQPValue::Boolean(true));
    headers
}

/// Why a dead letter is in `{ns}.dead`: our header, or the broker's own
/// `x-first-death-reason` (e.g. `delivery_limit`) when the broker moved it.
pub fn dead_letter_reason(headers: Option<&FieldTable>) -> (Option<String>, Option<String>) {
    let reason =
        header_str(headers, HEADER_REASON).or_else(|| header_str(headers, "x-first-death-reason"));
    let detail = header_str(headers, HEADER_DETAIL).or_else(|| {
        header_str(headers, "x-first-death-queue").map(|q| format!("moved by the broker from {q}"))
    });
    (reason, detail)
}
