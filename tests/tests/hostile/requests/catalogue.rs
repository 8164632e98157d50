//! The hostile requests and the one answer each must get: header injection,
//! markup and template syntax, sizes, bytes that are not UTF-8, purposes and
//! locales, return URLs, ids and envelope; and the values PostgreSQL cannot
//! store.

use serde_json::{Value, json};

use super::cases::{
    Case, Expect, big_user_id, case, context_echoed, fine, in_chinese, in_english, nested,
    no_raw_markup, one_recipient, raw_case, template_syntax_literal,
};
use crate::support::event;

pub fn hostile_requests() -> Vec<Case> {
    use Expect::{Dead, Failed, Sent};
    const INVALID: &str = "invalid_request";
    const NOT_ALLOWED: &str = "return_url_not_allowed";
    let long_email = format!("{}@{}.example.com", "a".repeat(64), "b".repeat(190));
    let mut big = event("big_body", json!({}));
    big["padding"] = json!("p".repeat(70 * 1024));
    let mut huge = event("huge_body", json!({}));
    huge["padding"] = json!("p".repeat(1536 * 1024));
    let non_utf8_string = [
        br#"{"specversion":"1.0","id":"h-non_utf8_string","source":"/hostile","type":"verimail.verification.requested","data":{"user_id":"u","email":"nu@example.com","name":""#.as_slice(),
        &[0xff, 0xfe, 0xc3],
        br#""}}"#.as_slice(),
    ]
    .concat();
    let context_ok: Value = serde_json::from_str(&nested(100)).unwrap_or(Value::Null);
    let deep = format!(
        r#"{{"specversion":"1.0","id":"h-deep_context","source":"/hostile","type":"verimail.verification.requested","data":{{"user_id":"u","email":"deep@example.com","context":{}}}}}"#,
        nested(200)
    );
    let mut no_data = event("no_data", json!({}));
    if let Some(o) = no_data.as_object_mut() {
        o.remove("data");
    }
    let mut spec = event("specversion", json!({}));
    spec["specversion"] = json!("0.3");
    let mut ty = event("wrong_type", json!({}));
    ty["type"] = json!("verimail.email.verified");
    let mut tp = event("traceparent", json!({}));
    tp["traceparent"] = json!("00-zz-01");
    let mut tm = event("time", json!({}));
    tm["time"] = json!("yesterday");
    let mut long_id = event("x", json!({}));
    long_id["id"] = json!("h".repeat(129));
    let mut num_id = event("x", json!({}));
    num_id["id"] = json!(12345);

    vec![
        // Header injection through the address: refused, nothing sent anywhere.
        case(
            "crlf_email",
            event(
                "crlf_email",
                json!({"email": "crlf@example.com\r\nBcc: evil@example.net"}),
            ),
            Failed(INVALID, "email"),
        ),
        case(
            "lf_email",
            event(
                "lf_email",
                json!({"email": "lf@example.com\nX-Injected: 1"}),
            ),
            Failed(INVALID, "email"),
        ),
        case(
            "display_name_email",
            event(
                "display_name_email",
                json!({"email": "Evil <evil@example.net>"}),
            ),
            Failed(INVALID, "email"),
        ),
        case(
            "two_addresses",
            event(
                "two_addresses",
                json!({"email": "a@example.com, evil@example.net"}),
            ),
            Failed(INVALID, "email"),
        ),
        case(
            "long_email",
            event("long_email", json!({"email": long_email})),
            Failed(INVALID, "email"),
        ),
        // ... and through the name.
        case(
            "crlf_name",
            event(
                "crlf_name",
                json!({"name": "Alice\r\nBcc: evil@example.net"}),
            ),
            Failed(INVALID, "name"),
        ),
        case(
            "nul_name",
            event("nul_name", json!({"name": "Al\u{0}ice"})),
            Failed(INVALID, "name"),
        ),
        case(
            "long_name",
            event("long_name", json!({"name": "n".repeat(257)})),
            Failed(INVALID, "name"),
        ),
        case(
            "address_in_name",
            event(
                "address_in_name",
                json!({"name": "\"Mallory\" <evil@example.net>, x"}),
            ),
            Sent(one_recipient),
        ),
        // Markup and template syntax in the name: shown, escaped, never run.
        case(
            "html_name",
            event(
                "html_name",
                json!({"name": "<script>alert(1)</script><b>bold</b>"}),
            ),
            Sent(no_raw_markup),
        ),
        case(
            "template_name",
            event(
                "template_name",
                json!({"name": "{{7*7}} {% if true %}X{% endif %} {{ link }}"}),
            ),
            Sent(template_syntax_literal),
        ),
        // Sizes.
        case("big_body", big, Failed(INVALID, "body")),
        raw_case(
            "huge_body",
            huge.to_string().into_bytes(),
            Dead("undecodable", "too large"),
        ),
        case(
            "big_context",
            event("big_context", json!({"context": {"k": "v".repeat(5000)}})),
            Failed(INVALID, "context"),
        ),
        case(
            "context_array",
            event("context_array", json!({"context": [1, 2, 3]})),
            Failed(INVALID, "context"),
        ),
        case(
            "nested_context",
            event("nested_context", json!({"context": context_ok})),
            Sent(context_echoed),
        ),
        raw_case(
            "deep_context",
            deep.into_bytes(),
            Dead("undecodable", "recursion"),
        ),
        // Bytes that are not UTF-8.
        raw_case(
            "non_utf8",
            vec![0xff, 0xfe, 0xfd, b'{', 0x80],
            Dead("undecodable", "not JSON"),
        ),
        raw_case(
            "non_utf8_string",
            non_utf8_string,
            Dead("undecodable", "not JSON"),
        ),
        // Purposes and locales.
        case(
            "unknown_purpose",
            event("unknown_purpose", json!({"purpose": "delete_account"})),
            Failed(INVALID, "purpose"),
        ),
        case(
            "purpose_case",
            event("purpose_case", json!({"purpose": "VERIFY_EMAIL"})),
            Failed(INVALID, "purpose"),
        ),
        case(
            "reset_without_return",
            event("reset_without_return", json!({"purpose": "reset_password"})),
            Failed(INVALID, "return_url"),
        ),
        case(
            "unknown_locale",
            event("unknown_locale", json!({"locale": "fr-CA"})),
            Sent(in_english),
        ),
        case(
            "locale_case",
            event("locale_case", json!({"locale": "ZH-cn"})),
            Sent(in_chinese),
        ),
        case(
            "locale_path",
            event("locale_path", json!({"locale": "../../etc/passwd"})),
            Failed(INVALID, "locale"),
        ),
        case(
            "locale_underscore",
            event("locale_underscore", json!({"locale": "en_US"})),
            Failed(INVALID, "locale"),
        ),
        case(
            "locale_template",
            event("locale_template", json!({"locale": "{{x}}"})),
            Failed(INVALID, "locale"),
        ),
        case(
            "locale_long",
            event("locale_long", json!({"locale": "a".repeat(100)})),
            Failed(INVALID, "locale"),
        ),
        // Where the user is sent after the click.
        case(
            "foreign_return_url",
            event(
                "foreign_return_url",
                json!({"return_url": "https://evil.example.net/welcome"}),
            ),
            Failed(NOT_ALLOWED, "return_url"),
        ),
        case(
            "userinfo_return_url",
            event(
                "userinfo_return_url",
                json!({"return_url": "https://app.example.com@evil.example.net/"}),
            ),
            Failed(NOT_ALLOWED, "return_url"),
        ),
        case(
            "port_return_url",
            event(
                "port_return_url",
                json!({"return_url": "https://app.example.com:8443/"}),
            ),
            Failed(NOT_ALLOWED, "return_url"),
        ),
        case(
            "http_return_url",
            event(
                "http_return_url",
                json!({"return_url": "http://app.example.com/"}),
            ),
            Failed(NOT_ALLOWED, "return_url"),
        ),
        case(
            "javascript_return_url",
            event(
                "javascript_return_url",
                json!({"return_url": "javascript:alert(1)"}),
            ),
            Failed(INVALID, "return_url"),
        ),
        case(
            "data_return_url",
            event(
                "data_return_url",
                json!({"return_url": "data:text/html,<script>alert(1)</script>"}),
            ),
            Failed(INVALID, "return_url"),
        ),
        case(
            "allowed_return_url",
            event(
                "allowed_return_url",
                json!({"return_url": "https://app.example.com/welcome?x=<y>"}),
            ),
            Sent(fine),
        ),
        // Ids and envelope.
        case(
            "float_user_id",
            event("float_user_id", json!({"user_id": 1.5})),
            Failed(INVALID, "user_id"),
        ),
        case(
            "object_user_id",
            event("object_user_id", json!({"user_id": {"$gt": ""}})),
            Failed(INVALID, "user_id"),
        ),
        case(
            "long_user_id",
            event("long_user_id", json!({"user_id": "u".repeat(129)})),
            Failed(INVALID, "user_id"),
        ),
        case(
            "big_user_id",
            event("big_user_id", json!({"user_id": u64::MAX})),
            Sent(big_user_id),
        ),
        case("no_data", no_data, Failed(INVALID, "data")),
        case("specversion", spec, Failed(INVALID, "specversion")),
        case("wrong_type", ty, Failed(INVALID, "type")),
        case("traceparent", tp, Failed(INVALID, "traceparent")),
        case("time", tm, Failed(INVALID, "time")),
        raw_case(
            "long_id",
            long_id.to_string().into_bytes(),
            Dead("undecodable", "id"),
        ),
        raw_case(
            "number_id",
            num_id.to_string().into_bytes(),
            Dead("undecodable", "id"),
        ),
    ]
}

/// Values PostgreSQL cannot store (NUL in text, `\u0000` in jsonb) that pass
/// today's field rules: each must still get its answer, like any broken rule
/// (an id that cannot be stored is as unusable as a missing one).
pub fn unstorable_requests() -> Vec<Case> {
    use Expect::{Dead, Failed};
    let mut nul_id = event("nul_id", json!({}));
    nul_id["id"] = json!("h-nul_id\u{0}");
    vec![
        raw_case(
            "nul_id",
            nul_id.to_string().into_bytes(),
            Dead("undecodable", "id"),
        ),
        case(
            "nul_user_id",
            event("nul_user_id", json!({"user_id": "u\u{0}x"})),
            Failed("invalid_request", "user_id"),
        ),
        case(
            "nul_context",
            event("nul_context", json!({"context": {"k": "a\u{0}b"}})),
            Failed("invalid_request", "context"),
        ),
    ]
}
