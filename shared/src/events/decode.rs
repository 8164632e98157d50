//! Strict decoding of a `verimail.verification.requested` body: the envelope's
//! rules, then each field's, the first broken rule winning.

use serde::Deserialize;
use serde_json::{Map, Value};
use time::OffsetDateTime;

use super::fields::{self, DataFields, ObjectOr};
use super::outcome::FailureReason;
use super::request::{DecodeError, Echo, Policy, Purpose, RequestData, RuleBroken, ValidRequest};
use super::validate::{
    field_context, field_email, field_locale, field_return_url, field_user_id, optional_text,
    valid_traceparent,
};
use super::{MAX_BODY_BYTES, MAX_PARSED_BODY_BYTES, VERIFICATION_REQUESTED};

/// Reads the id of a message, however broken the rest: the dead-letter tools
/// and the undecodable path use it.
pub fn peek_id(body: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct IdOnly {
        id: Value,
    }
    if body.len() > MAX_PARSED_BODY_BYTES {
        return None;
    }
    match serde_json::from_slice::<IdOnly>(body).ok()?.id {
        Value::String(s) if !s.is_empty() && s.chars().count() <= 128 => Some(s),
        _ => None,
    }
}

/// Decodes and validates a `verimail.verification.requested` body.
pub fn decode_request(body: &[u8], policy: Policy<'_>) -> Result<ValidRequest, DecodeError> {
    if body.len() > MAX_PARSED_BODY_BYTES {
        return Err(DecodeError::Undecodable(format!(
            "body of {} bytes, too large to read its id",
            body.len()
        )));
    }
    let event = match fields::read(body) {
        Ok(ObjectOr::Object(event)) => event,
        Ok(ObjectOr::Other) => {
            return Err(DecodeError::Undecodable(
                "not a JSON object, so not a CloudEvent".into(),
            ));
        }
        Err(e) => return Err(DecodeError::Undecodable(format!("not JSON: {e}"))),
    };
    let request_id = match event.id {
        // PostgreSQL text cannot hold NUL: such an id could never be recorded.
        Some(Value::String(s)) if s.contains('\0') => {
            return Err(DecodeError::Undecodable(
                "id: contains a NUL character".into(),
            ));
        }
        Some(Value::String(s)) if !s.is_empty() && s.chars().count() <= 128 => s,
        Some(Value::String(_)) => {
            return Err(DecodeError::Undecodable(
                "id: must be 1-128 characters".into(),
            ));
        }
        Some(_) => return Err(DecodeError::Undecodable("id: not a string".into())),
        None => return Err(DecodeError::Undecodable("id: missing".into())),
    };
    let mut problems = Problems::default();

    if body.len() > MAX_BODY_BYTES {
        problems.broke(
            "body",
            format!("{} bytes, more than {MAX_BODY_BYTES}", body.len()),
        );
    }
    match &event.specversion {
        Some(Value::String(v)) if v == "1.0" => {}
        Some(_) => problems.broke("specversion", "must be \"1.0\"".into()),
        None => problems.broke("specversion", "missing".into()),
    }
    let source = match event.source {
        Some(Value::String(s)) if !s.is_empty() => Some(s),
        Some(_) => {
            problems.broke("source", "must be a non-empty string".into());
            None
        }
        None => {
            problems.broke("source", "missing".into());
            None
        }
    };
    match &event.ty {
        Some(Value::String(t)) if t == VERIFICATION_REQUESTED => {}
        Some(_) => problems.broke("type", format!("must be {VERIFICATION_REQUESTED}")),
        None => problems.broke("type", "missing".into()),
    }
    if let Some(t) = &event.time {
        let ok = t.as_str().is_some_and(|s| {
            OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).is_ok()
        });
        if !ok {
            problems.broke("time", "must be an RFC 3339 timestamp".into());
        }
    }
    let traceparent = match event.traceparent {
        None | Some(Value::Null) => None,
        Some(Value::String(tp)) if valid_traceparent(&tp) => Some(tp),
        Some(_) => {
            problems.broke("traceparent", "must be a W3C traceparent".into());
            None
        }
    };
    match &event.datacontenttype {
        None | Some(Value::Null) => {}
        Some(Value::String(ct)) if ct.starts_with("application/json") => {}
        Some(_) => problems.broke("datacontenttype", "must be application/json".into()),
    }

    let data = match event.data {
        Some(ObjectOr::Object(data)) => data,
        Some(ObjectOr::Other) => {
            problems.broke("data", "must be a JSON object".into());
            DataFields::default()
        }
        None => {
            problems.broke("data", "missing".into());
            DataFields::default()
        }
    };

    let user_id = field_user_id(data.user_id.as_ref());
    let email = field_email(data.email.as_ref());
    let name = optional_text(data.name.as_ref(), 256);
    let locale = field_locale(data.locale.as_ref());
    let purpose = match &data.purpose {
        None | Some(Value::Null) => Ok(Purpose::VerifyEmail),
        Some(Value::String(p)) => p.parse(),
        Some(_) => Err("must be a string".into()),
    };
    let context = field_context(data.context.as_ref());
    // What a `failed` outcome echoes: every field that was valid. Built
    // only when the request is refused.
    let echo = |user_id: Option<String>,
                email: Option<String>,
                purpose: Option<Purpose>,
                context: Option<Map<String, Value>>| {
        Box::new(Echo {
            request_id: request_id.clone(),
            source: source.clone(),
            traceparent: traceparent.clone(),
            user_id,
            email,
            purpose,
            context,
        })
    };

    let purpose_ok = purpose.as_ref().ok().copied();
    let user_id = user_id.map_err(|r| problems.broke("user_id", r));
    let email = email.map_err(|r| problems.broke("email", r));
    let name = name.map_err(|r| problems.broke("name", r)).ok().flatten();
    let locale = locale
        .map_err(|r| problems.broke("locale", r))
        .ok()
        .flatten();
    let purpose = purpose.map_err(|r| problems.broke("purpose", r)).ok();
    let context = context
        .map_err(|r| problems.broke("context", r))
        .ok()
        .flatten();
    let return_url = match field_return_url(data.return_url.as_ref()) {
        Ok(url) => url,
        Err(rule) => {
            problems.broke("return_url", rule);
            None
        }
    };
    if let (Some(p), None) = (purpose, &return_url)
        && p.requires_return_url()
        && problems.first.is_none()
    {
        problems.broke("return_url", format!("required for purpose {p}"));
    }

    if let Some(p) = purpose
        && p.single_use()
        && !policy.single_use_links
    {
        problems.broke(
            "purpose",
            format!(
                "{p} needs TOKEN_FORMAT=v1 (itsdangerous tokens carry only the address, so the link could not be single-use)"
            ),
        );
    }
    if let Some(failure) = problems.first {
        return Err(DecodeError::Invalid {
            echo: echo(user_id.ok(), email.ok(), purpose_ok, context),
            failure,
        });
    }
    // Checked last: a request that is otherwise fine but points elsewhere gets
    // its own reason, so upstream can tell a config gap from a bug.
    if let Some(url) = &return_url
        && !policy.return_url_allowlist.contains(&url.origin())
    {
        return Err(DecodeError::Invalid {
            echo: echo(user_id.ok(), email.ok(), purpose_ok, context),
            failure: RuleBroken {
                reason: FailureReason::ReturnUrlNotAllowed,
                field: "return_url",
                rule: format!(
                    "origin {} is not in RETURN_URL_ALLOWLIST",
                    url.origin().ascii_serialization()
                ),
            },
        });
    }
    let (Ok(user_id), Ok(email), Some(purpose), Some(source)) = (user_id, email, purpose, source)
    else {
        // Every failure above recorded a broken rule, handled before; kept total anyway.
        return Err(DecodeError::Undecodable("incomplete request".into()));
    };
    Ok(ValidRequest {
        id: request_id,
        source,
        traceparent,
        data: RequestData {
            user_id,
            email,
            name,
            locale,
            purpose,
            return_url: return_url.as_ref().map(|u| u.as_str().to_owned()),
            context,
        },
        return_url,
    })
}

/// The first broken rule wins: it is what the `detail` names.
#[derive(Default)]
struct Problems {
    first: Option<RuleBroken>,
}

impl Problems {
    fn broke(&mut self, field: &'static str, rule: String) {
        if self.first.is_none() {
            self.first = Some(RuleBroken {
                reason: FailureReason::InvalidRequest,
                field,
                rule,
            });
        }
    }
}
#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use url::Url;

    fn allow() -> Vec<url::Origin> {
        vec![
            Url::parse("https://app.example.com")
                .expect("a literal URL")
                .origin(),
        ]
    }

    fn request(data: Value) -> Vec<u8> {
        json!({"specversion":"1.0","id":"req-1","source":"/accounts",
               "type":"verimail.verification.requested","data":data})
        .to_string()
        .into_bytes()
    }

    fn decode(body: &[u8]) -> Result<ValidRequest, DecodeError> {
        let allow = allow();
        decode_request(
            body,
            Policy {
                return_url_allowlist: &allow,
                single_use_links: true,
            },
        )
    }

    fn failure(data: Value) -> (String, FailureReason, Echo) {
        match decode(&request(data)) {
            Err(DecodeError::Invalid { echo, failure }) => {
                (failure.detail(), failure.reason, *echo)
            }
            other => panic!("expected invalid, got {other:?}"),
        }
    }

    #[test]
    fn the_contract_example_decodes() -> Result<(), DecodeError> {
        let body = json!({"specversion":"1.0","id":"5f1c","source":"/accounts",
            "type":"verimail.verification.requested","time":"2026-11-24T10:00:00Z",
            "datacontenttype":"application/json",
            "data":{"user_id":"42","email":"alice@example.com","name":"Alice","locale":"zh-CN",
                    "purpose":"verify_email","return_url":"https://app.example.com/welcome",
                    "context":{"signup_flow":"b"}}});
        let r = decode(body.to_string().as_bytes())?;
        assert_eq!(r.id, "5f1c");
        assert_eq!(r.data.user_id, "42");
        assert_eq!(r.data.locale.as_deref(), Some("zh-CN"));
        assert_eq!(r.data.purpose, Purpose::VerifyEmail);
        assert_eq!(
            r.data.context,
            Some(
                json!({"signup_flow":"b"})
                    .as_object()
                    .cloned()
                    .unwrap_or_default()
            )
        );
        Ok(())
    }

    #[test]
    fn an_integer_user_id_becomes_its_decimal_string() -> Result<(), DecodeError> {
        let r = decode(&request(json!({"user_id": 42, "email": "a@example.com"})))?;
        assert_eq!(r.data.user_id, "42");
        assert_eq!(r.data.purpose, Purpose::VerifyEmail);
        Ok(())
    }

    #[test]
    fn each_broken_rule_is_named() {
        let long_email = format!("{}@example.com", "a".repeat(250));
        let cases = [
            (json!({"email":"a@example.com"}), "user_id: missing"),
            (
                json!({"user_id":"","email":"a@example.com"}),
                "user_id: empty",
            ),
            (
                json!({"user_id":"x".repeat(129),"email":"a@example.com"}),
                "user_id: 129 characters, more than 128",
            ),
            (
                json!({"user_id":1.5,"email":"a@example.com"}),
                "user_id: a number must be an integer",
            ),
            (
                json!({"user_id":true,"email":"a@example.com"}),
                "user_id: must be a string or an integer",
            ),
            (json!({"user_id":"1"}), "email: missing"),
            (
                json!({"user_id":"1","email":long_email}),
                "email: more than 254 characters",
            ),
            (
                json!({"user_id":"1","email":"a@example.com\r\nBcc: x@evil.io"}),
                "email: contains a control character",
            ),
            (
                json!({"user_id":"1","email":"not-an-address"}),
                "email: not a valid address (RFC 5322 addr-spec)",
            ),
            (
                json!({"user_id":"1","email":"Alice <a@example.com>"}),
                "email: must be a bare address, without a display name",
            ),
            (
                json!({"user_id":"1","email":"a@example.com","name":"x".repeat(257)}),
                "name: 257 characters, more than 256",
            ),
            (
                json!({"user_id":"1","email":"a@example.com","name":"Eve\r\nBcc: x@evil.io"}),
                "name: contains a control character",
            ),
            (
                json!({"user_id":"1","email":"a@example.com","locale":"not a tag"}),
                "locale: `not a tag` is not a BCP 47 tag",
            ),
            (
                json!({"user_id":"1","email":"a@example.com","purpose":"delete_account"}),
                "purpose: unknown purpose `delete_account` (expected verify_email or reset_password)",
            ),
            (
                json!({"user_id":"1","email":"a@example.com","return_url":"/relative"}),
                "return_url: not an absolute URL (relative URL without a base)",
            ),
            (
                json!({"user_id":"1","email":"a@example.com","return_url":"javascript:alert(1)"}),
                "return_url: must be an http or https URL",
            ),
            (
                json!({"user_id":"1","email":"a@example.com","purpose":"reset_password"}),
                "return_url: required for purpose reset_password",
            ),
            (
                json!({"user_id":"1","email":"a@example.com","context":[1]}),
                "context: must be a JSON object",
            ),
            (
                json!({"user_id":"1","email":"a@example.com","context":{"k":"v".repeat(5000)}}),
                "context: 5008 bytes serialized, more than 4096",
            ),
        ];
        for (data, expected) in cases {
            let (detail, reason, _) = failure(data.clone());
            assert_eq!(detail, expected, "for {data}");
            assert_eq!(reason, FailureReason::InvalidRequest);
        }
    }

    #[test]
    fn a_valid_field_is_echoed_even_when_another_breaks() {
        let (_, _, echo) = failure(json!({"user_id":"7","email":"bad","context":{"k":1}}));
        assert_eq!(echo.user_id.as_deref(), Some("7"));
        assert_eq!(echo.email, None);
        assert_eq!(echo.purpose, Some(Purpose::VerifyEmail));
        assert_eq!(echo.context.map(Value::Object), Some(json!({"k":1})));
    }

    #[test]
    fn single_use_purposes_need_v1_links() {
        let allow = allow();
        let body = request(
            json!({"user_id":"1","email":"a@example.com","purpose":"reset_password",
                                  "return_url":"https://app.example.com/reset"}),
        );
        let policy = Policy {
            return_url_allowlist: &allow,
            single_use_links: false,
        };
        match decode_request(&body, policy) {
            Err(DecodeError::Invalid { failure, .. }) => {
                assert_eq!(failure.field, "purpose");
                assert!(failure.rule.contains("TOKEN_FORMAT=v1"), "{}", failure.rule);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_foreign_return_url_has_its_own_reason() {
        let (detail, reason, _) = failure(
            json!({"user_id":"1","email":"a@example.com","return_url":"https://evil.example.net/x"}),
        );
        assert_eq!(reason, FailureReason::ReturnUrlNotAllowed);
        assert!(
            detail.starts_with("return_url: origin https://evil.example.net"),
            "{detail}"
        );
    }

    #[test]
    fn envelope_rules_are_named() {
        let cases = [
            (
                json!({"specversion":"0.3","id":"x","source":"/a","type":VERIFICATION_REQUESTED,"data":{}}),
                "specversion",
            ),
            (
                json!({"specversion":"1.0","id":"x","type":VERIFICATION_REQUESTED,"data":{}}),
                "source",
            ),
            (
                json!({"specversion":"1.0","id":"x","source":"/a","type":"other","data":{}}),
                "type",
            ),
            (
                json!({"specversion":"1.0","id":"x","source":"/a","type":VERIFICATION_REQUESTED}),
                "data",
            ),
            (
                json!({"specversion":"1.0","id":"x","source":"/a","type":VERIFICATION_REQUESTED,"time":"yesterday","data":{}}),
                "time",
            ),
        ];
        for (body, field) in cases {
            match decode(body.to_string().as_bytes()) {
                Err(DecodeError::Invalid { failure, .. }) => assert_eq!(failure.field, field),
                other => panic!("{body}: {other:?}"),
            }
        }
    }

    #[test]
    fn bodies_that_are_not_cloudevents_are_undecodable() {
        for body in [
            &b"not json"[..],
            b"[1,2]",
            b"{}",
            b"{\"id\":7}",
            b"{\"id\":\"\"}",
            b"\xff\xfe",
        ] {
            assert!(
                matches!(decode(body), Err(DecodeError::Undecodable(_))),
                "{body:?}"
            );
        }
    }

    #[test]
    fn an_oversized_body_names_body_but_keeps_its_id() {
        let big = request(json!({"user_id":"1","email":"a@example.com","pad":"x".repeat(70_000)}));
        match decode(&big) {
            Err(DecodeError::Invalid { echo, failure }) => {
                assert_eq!(failure.field, "body");
                assert_eq!(echo.request_id, "req-1");
            }
            other => panic!("{other:?}"),
        }
    }
}
