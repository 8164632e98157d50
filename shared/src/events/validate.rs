//! The rules of each request field (address, name, locale, return URL, context,
//! trace context), shared by the worker's decoding and the CLI's checks, and the
//! locale fallback.

use serde_json::{Map, Value};
use url::Url;

use super::MAX_CONTEXT_BYTES;

/// A request's `user_id` rule: a string of 1-128 characters without control
/// characters, or a JSON integer (taken as its decimal string). The gateway's
/// code check reads `user_id` by the same rule.
pub fn parse_user_id(v: Option<&Value>) -> Result<String, String> {
    field_user_id(v)
}

pub(super) fn field_user_id(v: Option<&Value>) -> Result<String, String> {
    match v {
        None | Some(Value::Null) => Err("missing".into()),
        Some(Value::String(s)) => {
            let n = s.chars().count();
            if n == 0 {
                Err("empty".into())
            } else if n > 128 {
                Err(format!("{n} characters, more than 128"))
            } else if s.chars().any(char::is_control) {
                Err("contains a control character".into())
            } else {
                Ok(s.clone())
            }
        }
        Some(Value::Number(n)) if n.is_i64() || n.is_u64() => Ok(n.to_string()),
        Some(Value::Number(_)) => Err("a number must be an integer".into()),
        Some(_) => Err("must be a string or an integer".into()),
    }
}

/// Checks one RFC 5322 addr-spec, as the worker and the CLI both must.
pub fn validate_email(s: &str) -> Result<(), String> {
    let n = s.chars().count();
    if n == 0 {
        return Err("empty".into());
    }
    if s.len() > 254 {
        return Err("more than 254 characters".into());
    }
    if s.chars().any(char::is_control) {
        return Err("contains a control character".into());
    }
    if s.trim() != s {
        return Err("has leading or trailing white space".into());
    }
    if !email_address::EmailAddress::is_valid(s) {
        return Err("not a valid address (RFC 5322 addr-spec)".into());
    }
    // A display name or angle brackets would make this a mailbox, not an addr-spec.
    if s.contains('<') || s.contains('>') {
        return Err("must be a bare address, without a display name".into());
    }
    Ok(())
}

pub(super) fn field_email(v: Option<&Value>) -> Result<String, String> {
    match v {
        None | Some(Value::Null) => Err("missing".into()),
        Some(Value::String(s)) => validate_email(s).map(|()| s.clone()),
        Some(_) => Err("must be a string".into()),
    }
}

pub(super) fn optional_text(v: Option<&Value>, max_chars: usize) -> Result<Option<String>, String> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => validate_name(s, max_chars).map(|()| Some(s.clone())),
        Some(_) => Err("must be a string".into()),
    }
}

/// Checks a display name: bounded, and no control characters (a CR/LF in a
/// name is a header-injection attempt, never a real name).
pub fn validate_name(s: &str, max_chars: usize) -> Result<(), String> {
    let n = s.chars().count();
    if n > max_chars {
        return Err(format!("{n} characters, more than {max_chars}"));
    }
    if s.chars().any(char::is_control) {
        return Err("contains a control character".into());
    }
    Ok(())
}

/// Checks the syntax of a BCP 47 tag (`zh-Hant-TW`); unknown but well-formed
/// tags are fine, they fall back to the default locale.
pub fn validate_locale(s: &str) -> Result<(), String> {
    let ok = s.len() <= 35
        && !s.is_empty()
        && s.split('-').enumerate().all(|(i, part)| {
            (1..=8).contains(&part.len())
                && if i == 0 {
                    part.chars().all(|c| c.is_ascii_alphabetic())
                } else {
                    part.chars().all(|c| c.is_ascii_alphanumeric())
                }
        });
    if ok {
        Ok(())
    } else {
        Err(format!("`{}` is not a BCP 47 tag", truncate(s, 40)))
    }
}

pub(super) fn field_locale(v: Option<&Value>) -> Result<Option<String>, String> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => validate_locale(s).map(|()| Some(s.clone())),
        Some(_) => Err("must be a string".into()),
    }
}

pub(super) fn field_return_url(v: Option<&Value>) -> Result<Option<Url>, String> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => parse_return_url(s).map(Some),
        Some(_) => Err("must be a string".into()),
    }
}

/// Parses a `return_url`: an absolute http(s) URL of at most 2048 characters.
pub fn parse_return_url(s: &str) -> Result<Url, String> {
    if s.len() > 2048 {
        return Err("more than 2048 characters".into());
    }
    if s.chars().any(char::is_control) {
        return Err("contains a control character".into());
    }
    let url = Url::parse(s).map_err(|e| format!("not an absolute URL ({e})"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err("must be an http or https URL".into());
    }
    Ok(url)
}

pub(super) fn field_context(v: Option<&Value>) -> Result<Option<Map<String, Value>>, String> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(m)) => {
            let size = serde_json::to_vec(m).map(|b| b.len()).unwrap_or(usize::MAX);
            if size > MAX_CONTEXT_BYTES {
                Err(format!(
                    "{size} bytes serialized, more than {MAX_CONTEXT_BYTES}"
                ))
            } else if m.iter().any(|(k, v)| k.contains('\0') || has_nul(v)) {
                // PostgreSQL's jsonb cannot store \u0000.
                Err("contains a NUL character".into())
            } else {
                Ok(Some(m.clone()))
            }
        }
        Some(_) => Err("must be a JSON object".into()),
    }
}

fn has_nul(v: &Value) -> bool {
    match v {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(has_nul),
        Value::Object(m) => m.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
        _ => false,
    }
}

/// Parses a `--context`-style JSON string into a context object with the same rules.
pub fn parse_context(raw: &str) -> Result<Map<String, Value>, String> {
    let value: Value = serde_json::from_str(raw).map_err(|e| format!("not JSON ({e})"))?;
    field_context(Some(&value))?.ok_or_else(|| "must be a JSON object".into())
}

pub(super) fn valid_traceparent(tp: &str) -> bool {
    // version-traceid-parentid-flags, lowercase hex: 2-32-16-2.
    let parts: Vec<&str> = tp.split('-').collect();
    parts.len() == 4
        && [2, 32, 16, 2]
            .iter()
            .zip(&parts)
            .all(|(len, p)| p.len() == *len && p.chars().all(|c| c.is_ascii_hexdigit()))
}

pub(super) fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_owned()
    } else {
        let cut: String = s.chars().take(max).collect();
        format!("{cut}…")
    }
}

/// Picks the best available locale for `tag`: the exact tag, then shorter
/// prefixes (`zh-Hant-TW` → `zh-Hant` → `zh`), then `default`. Case-insensitive.
pub fn resolve_locale<'a, S: AsRef<str>>(
    tag: Option<&str>,
    available: &'a [S],
    default: &'a str,
) -> &'a str {
    let Some(tag) = tag else { return default };
    let mut candidate = tag;
    loop {
        if let Some(found) = available
            .iter()
            .map(AsRef::as_ref)
            .find(|a| a.eq_ignore_ascii_case(candidate))
        {
            return found;
        }
        match candidate.rfind('-') {
            Some(cut) => candidate = &candidate[..cut],
            None => return default,
        }
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locales_fall_back_along_their_subtags() {
        let available = ["en", "zh-CN", "zh-Hant"];
        assert_eq!(
            resolve_locale(Some("zh-Hant-TW"), &available, "en"),
            "zh-Hant"
        );
        assert_eq!(resolve_locale(Some("zh-cn"), &available, "en"), "zh-CN");
        assert_eq!(resolve_locale(Some("zh"), &available, "en"), "en");
        assert_eq!(resolve_locale(Some("fr-CA"), &available, "en"), "en");
        assert_eq!(resolve_locale(None, &available, "en"), "en");
    }
}
