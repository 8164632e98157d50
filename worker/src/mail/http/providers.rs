//! The send calls of Postmark, SendGrid, Mailgun and the generic target,
//! each as its public API documents it, and how each answers.
//!
//! - Postmark `POST /email`: JSON fields, `X-Postmark-Server-Token`; our
//!   request id in `Metadata` (it comes back in bounce webhooks).
//! - SendGrid `POST /v3/mail/send`: JSON, `Authorization: Bearer`; 202 with
//!   `X-Message-Id`; our request id in `custom_args`.
//! - Mailgun `POST /v3/{domain}/messages.mime`: the raw MIME message as a
//!   file part, HTTP basic auth `api:KEY`; our request id as `v:request_id`.
//! - Generic: `POST` JSON `{request_id,to,from,subject,text,html,headers}`
//!   with `Verimail-Signature: t=UNIX,v1=HEX`, HMAC-SHA256 of `"{t}.{body}"`.

use hmac::{Hmac, Mac};
use reqwest::header::HeaderMap;
use reqwest::multipart::{Form, Part};
use reqwest::{Client, RequestBuilder};
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};
use sha2::Sha256;
use url::Url;

use super::{ApiMail, join};
use crate::mail::SendError;

/// Postmark's send call.
pub fn postmark(
    client: &Client,
    base: &Url,
    token: &SecretString,
    mail: &ApiMail<'_>,
) -> RequestBuilder {
    let body = json!({
        "From": mail.from,
        "To": mail.to,
        "Subject": mail.subject,
        "TextBody": mail.text,
        "HtmlBody": mail.html,
        "Headers": [{"Name": "Message-ID", "Value": mail.message_id}],
        "Metadata": {"request_id": mail.request_id},
        "MessageStream": "outbound",
    });
    client
        .post(join(base, "email"))
        .header("accept", "application/json")
        .header("x-postmark-server-token", token.expose_secret())
        .json(&body)
}

/// SendGrid's v3 send call.
pub fn sendgrid(
    client: &Client,
    base: &Url,
    key: &SecretString,
    mail: &ApiMail<'_>,
) -> RequestBuilder {
    let mut to = json!({"email": mail.to_email});
    if let Some(name) = mail.to_name {
        to["name"] = json!(name);
    }
    let mut from = json!({"email": mail.from_email});
    if let Some(name) = mail.from_name {
        from["name"] = json!(name);
    }
    let body = json!({
        "personalizations": [{"to": [to], "custom_args": {"request_id": mail.request_id}}],
        "from": from,
        "subject": mail.subject,
        "content": [
            {"type": "text/plain", "value": mail.text},
            {"type": "text/html", "value": mail.html},
        ],
        "headers": {"Message-ID": mail.message_id},
    });
    client
        .post(join(base, "v3/mail/send"))
        .bearer_auth(key.expose_secret())
        .json(&body)
}

/// Mailgun's MIME send call.
pub fn mailgun(
    client: &Client,
    base: &Url,
    key: &SecretString,
    domain: &str,
    mail: &ApiMail<'_>,
) -> RequestBuilder {
    let message = Part::bytes(mail.raw.to_vec()).file_name("message.mime");
    let form = Form::new()
        .text("to", mail.to.to_owned())
        .text("v:request_id", mail.request_id.to_owned())
        .part("message", message);
    client
        .post(join(base, &format!("v3/{domain}/messages.mime")))
        .basic_auth("api", Some(key.expose_secret()))
        .multipart(form)
}

/// The generic target's signed JSON.
pub fn generic(
    client: &Client,
    url: &Url,
    secret: &SecretString,
    mail: &ApiMail<'_>,
) -> RequestBuilder {
    let body = json!({
        "request_id": mail.request_id,
        "to": mail.to,
        "from": mail.from,
        "subject": mail.subject,
        "text": mail.text,
        "html": mail.html,
        "headers": {"Message-ID": mail.message_id},
    })
    .to_string();
    let t = time::OffsetDateTime::now_utc().unix_timestamp();
    let signature = sign(secret.expose_secret(), t, body.as_bytes());
    client
        .post(url.clone())
        .header("content-type", "application/json")
        .header("verimail-signature", format!("t={t},v1={signature}"))
        .body(body)
}

/// Hex HMAC-SHA256 of `"{t}.{body}"` under `secret`.
pub fn sign(secret: &str, t: i64, body: &[u8]) -> String {
    // HMAC takes a key of any length: `new_from_slice` cannot fail.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else {
        return String::new();
    };
    mac.update(format!("{t}.").as_bytes());
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

/// The message id in an accepted answer; an answer of Mailgun or SES
/// without one is no answer to a send (a wrong endpoint).
pub fn message_id(
    provider: &'static str,
    headers: &HeaderMap,
    json: Option<&Value>,
    status: u16,
    body: &[u8],
) -> Result<Option<String>, SendError> {
    let field = |name: &str| {
        json.and_then(|j| j.get(name))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    let id = match provider {
        "ses" => field("MessageId"),
        "postmark" => {
            // Postmark reports some refusals in a 200 with a non-zero code.
            let code = json
                .and_then(|j| j.get("ErrorCode"))
                .and_then(Value::as_i64)
                .unwrap_or(0);
            if code != 0 {
                let (detail, recipient) = error(provider, headers, json, body);
                return Err(SendError::HttpStatus {
                    provider,
                    status,
                    detail,
                    recipient,
                    retry_after: None,
                });
            }
            field("MessageID")
        }
        "sendgrid" => headers
            .get("x-message-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        // Mailgun's id is our Message-ID in angle brackets; its webhooks
        // name it without them.
        "mailgun" => {
            field("id").map(|id| id.trim_start_matches('<').trim_end_matches('>').to_owned())
        }
        _ => field("message_id").or_else(|| field("id")),
    };
    if id.is_none() && matches!(provider, "ses" | "mailgun") {
        return Err(SendError::HttpUnexpected {
            provider,
            status,
            body: String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned(),
        });
    }
    Ok(id)
}

/// The provider's error in its words, and whether it names the recipient as
/// invalid or inactive.
pub fn error(
    provider: &'static str,
    headers: &HeaderMap,
    json: Option<&Value>,
    body: &[u8],
) -> (String, bool) {
    let text = |v: Option<&Value>| v.and_then(Value::as_str).unwrap_or_default().to_owned();
    let raw = || {
        String::from_utf8_lossy(&body[..body.len().min(500)])
            .trim()
            .to_owned()
    };
    match (provider, json) {
        ("postmark", Some(j)) => {
            let code = j.get("ErrorCode").and_then(Value::as_i64).unwrap_or(0);
            let message = text(j.get("Message"));
            // 406: the recipient is inactive (bounced or complained before);
            // 300 is every validation error, the recipient's only when it
            // names the To field (as django-anymail reads it).
            let recipient = code == 406
                || (code == 300
                    && (message.starts_with("Invalid 'To'")
                        || message.starts_with("Error parsing 'To'")));
            (format!("ErrorCode {code}: {message}"), recipient)
        }
        ("sendgrid", Some(j)) => {
            let errors = j
                .get("errors")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            let recipient = errors.iter().any(|e| {
                let field = text(e.get("field"));
                field.starts_with("personalizations") && field.contains(".to")
            });
            let words: Vec<String> = errors
                .iter()
                .map(|e| match e.get("field").and_then(Value::as_str) {
                    Some(field) => format!("{}: {}", field, text(e.get("message"))),
                    None => text(e.get("message")),
                })
                .collect();
            (
                if words.is_empty() {
                    raw()
                } else {
                    words.join("; ")
                },
                recipient,
            )
        }
        ("mailgun", Some(j)) => {
            let message = text(j.get("message"));
            let recipient = message.contains("'to' parameter is not a valid address")
                || message.contains("to parameter is not a valid address");
            (message, recipient)
        }
        ("ses", _) => {
            // The error's name: `x-amzn-ErrorType` (`Name:http://...`) or
            // `__type`/`code` in the body (`namespace#Name`).
            let name = headers
                .get("x-amzn-errortype")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
                .or_else(|| {
                    json.and_then(|j| j.get("__type").or_else(|| j.get("code")))
                        .and_then(Value::as_str)
                        .map(str::to_owned)
                })
                .map(|n| {
                    let n = n.split(':').next().unwrap_or_default();
                    n.rsplit('#').next().unwrap_or(n).to_owned()
                })
                .unwrap_or_default();
            let message = json
                .and_then(|j| j.get("message").or_else(|| j.get("Message")))
                .and_then(Value::as_str)
                .map(str::to_owned)
                .unwrap_or_else(raw);
            (
                format!("{name}: {message}")
                    .trim_start_matches(": ")
                    .to_owned(),
                false,
            )
        }
        _ => (raw(), false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_generic_signature_is_hmac_sha256_of_time_dot_body() {
        // printf '1700000000.{"a":1}' | openssl dgst -sha256 -hmac secret
        assert_eq!(
            sign("secret", 1_700_000_000, br#"{"a":1}"#),
            "49f24e537407743fa4a0242bb63b94b9a47ee99cbbe071ccd8a22550ae411686"
        );
    }

    #[test]
    fn recipient_answers_are_told_apart_from_other_refusals() {
        let none = HeaderMap::new();
        let pm = |code: i64, m: &str| {
            error(
                "postmark",
                &none,
                Some(&json!({"ErrorCode": code, "Message": m})),
                b"",
            )
        };
        assert!(
            pm(
                406,
                "You tried to send to recipient(s) that have been marked as inactive."
            )
            .1
        );
        assert!(pm(300, "Invalid 'To' address: 'nobody'.").1);
        assert!(!pm(300, "Invalid 'From' address: 'x'.").1);
        assert!(!pm(10, "Bad or missing API token").1);
        let sg = error(
            "sendgrid",
            &none,
            Some(
                &json!({"errors": [{"message": "Does not contain a valid address.", "field": "personalizations.0.to.0.email"}]}),
            ),
            b"",
        );
        assert!(sg.1, "{}", sg.0);
        assert!(sg.0.contains("personalizations.0.to.0.email: Does not contain a valid address."));
        let mg = error(
            "mailgun",
            &none,
            Some(
                &json!({"message": "'to' parameter is not a valid address. please check documentation"}),
            ),
            b"",
        );
        assert!(mg.1);
        let mut h = HeaderMap::new();
        h.insert(
            "x-amzn-errortype",
            reqwest::header::HeaderValue::from_static(
                "MessageRejected:http://internal.amazon.com/coral/com.amazon.coral.service/",
            ),
        );
        let ses = error(
            "ses",
            &h,
            Some(&json!({"message": "Email address is not verified."})),
            b"",
        );
        assert_eq!(
            ses,
            (
                "MessageRejected: Email address is not verified.".to_owned(),
                false
            )
        );
    }
}
