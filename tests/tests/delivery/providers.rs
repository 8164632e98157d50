//! Postmark, SendGrid and Mailgun: stand-ins that check every field and header
//! their public APIs document and answer as they do; their answers decide the
//! outcome.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use serde_json::json;
use verimail_tests::api::{ApiSink, Received, Reply};

use crate::scripted::{case_of, first_time, run_cases, scripted};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postmark_gets_its_documented_request_and_its_answers_decide_the_outcome() {
    let seen = Arc::new(Mutex::new(HashSet::new()));
    let sink = ApiSink::start(move |r| {
        let body = r.json();
        let to = body["To"].as_str().unwrap_or_default().to_owned();
        let address = to.rsplit('<').next().unwrap_or_default().trim_end_matches('>').to_owned();
        let documented = r.method == "POST"
            && r.path == "/email"
            && r.header("content-type").is_some_and(|v| v.starts_with("application/json"))
            && r.header("accept") == Some("application/json")
            && body["From"] == "Verimail <no-reply@verimail.test>"
            && to.contains("Zoé Example")
            && body["Subject"].as_str().is_some_and(|s| !s.is_empty())
            && body["TextBody"].as_str().is_some_and(|s| s.contains("/confirm/"))
            && body["HtmlBody"].as_str().is_some_and(|s| s.contains("href="))
            && body["MessageStream"] == "outbound"
            && body["Headers"][0]["Name"] == "Message-ID"
            && body["Headers"][0]["Value"].as_str().is_some_and(|v| v.ends_with("@verimail.test>"))
            && body["Metadata"]["request_id"].as_str().is_some_and(|v| v.starts_with("postmark-"));
        if r.header("x-postmark-server-token") != Some("pm-token") {
            return Reply::json(401, json!({"ErrorCode": 10, "Message": "Bad or missing API token"}));
        }
        if !documented {
            return Reply::json(422, json!({"ErrorCode": 402, "Message": format!("test: undocumented request {body}")}));
        }
        let case = case_of(&address);
        let first = first_time(&seen, &address);
        scripted(
            case,
            first,
            Reply::json(200, json!({"To": to, "SubmittedAt": "2026-12-06T05:00:00Z", "MessageID": format!("pid-{}", uuid::Uuid::new_v4()), "ErrorCode": 0, "Message": "OK"})),
            Reply::json(422, json!({"ErrorCode": 406, "Message": "You tried to send to recipient(s) that have been marked as inactive. Found inactive addresses: gone@example.com."})),
            Reply::json(422, json!({"ErrorCode": 300, "Message": "Invalid 'From' address: 'no-reply@verimail.test'."})),
            Reply::json(401, json!({"ErrorCode": 10, "Message": "Bad or missing API token"})),
        )
    })
    .await
    .expect("the stand-in starts");
    let url = format!("postmark://pm-token@?endpoint={}", sink.base());
    run_cases("postmark", &sink, url, |r| {
        let to = r.json()["To"].as_str().unwrap_or_default().to_owned();
        to.rsplit('<')
            .next()
            .unwrap_or_default()
            .trim_end_matches('>')
            .to_owned()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sendgrid_gets_its_documented_request_and_its_answers_decide_the_outcome() {
    let seen = Arc::new(Mutex::new(HashSet::new()));
    let sink = ApiSink::start(move |r| {
        let body = r.json();
        let to = &body["personalizations"][0]["to"][0];
        let address = to["email"].as_str().unwrap_or_default().to_owned();
        let content = body["content"].as_array().cloned().unwrap_or_default();
        let documented = r.method == "POST"
            && r.path == "/v3/mail/send"
            && r.header("content-type").is_some_and(|v| v.starts_with("application/json"))
            && to["name"] == "Zoé Example"
            && body["from"]["email"] == "no-reply@verimail.test"
            && body["from"]["name"] == "Verimail"
            && body["subject"].as_str().is_some_and(|s| !s.is_empty())
            && content.len() == 2
            && content[0]["type"] == "text/plain"
            && content[1]["type"] == "text/html"
            && body["headers"]["Message-ID"].as_str().is_some_and(|v| v.ends_with("@verimail.test>"))
            && body["personalizations"][0]["custom_args"]["request_id"].as_str().is_some_and(|v| v.starts_with("sendgrid-"));
        if r.header("authorization") != Some("Bearer SG.key") {
            return Reply::json(401, json!({"errors": [{"message": "The provided authorization grant is invalid, expired, or revoked", "field": null, "help": null}]}));
        }
        if !documented {
            return Reply::json(400, json!({"errors": [{"message": format!("test: undocumented request {body}"), "field": null}]}));
        }
        let first = first_time(&seen, &address);
        scripted(
            case_of(&address),
            first,
            Reply { status: 202, headers: vec![("x-message-id".into(), format!("pid-{}", uuid::Uuid::new_v4().simple()))], body: String::new() },
            Reply::json(400, json!({"errors": [{"message": "Does not contain a valid address.", "field": "personalizations.0.to.0.email", "help": "http://sendgrid.com/docs/API_Reference/Web_API_v3/Mail/errors.html#message.personalizations.to"}]})),
            Reply::json(403, json!({"errors": [{"message": "The from address does not match a verified Sender Identity.", "field": "from", "help": null}]})),
            Reply::json(401, json!({"errors": [{"message": "The provided authorization grant is invalid, expired, or revoked", "field": null, "help": null}]})),
        )
    })
    .await
    .expect("the stand-in starts");
    let url = format!("sendgrid://SG.key@?endpoint={}", sink.base());
    run_cases("sendgrid", &sink, url, |r| {
        r.json()["personalizations"][0]["to"][0]["email"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    })
    .await;
}

/// The `to` field and the `message` file of a multipart/form-data body, read
/// with a MIME parser (a form is a MIME multipart).
fn mailgun_form(r: &Received) -> (String, Option<String>, Vec<u8>) {
    use mail_parser::MimeHeaders;
    let content_type = r.header("content-type").unwrap_or_default();
    let mut whole = format!("Content-Type: {content_type}\r\n\r\n").into_bytes();
    whole.extend_from_slice(&r.body);
    let Some(parsed) = mail_parser::MessageParser::default().parse(&whole) else {
        return (String::new(), None, Vec::new());
    };
    let (mut to, mut request_id, mut message) = (String::new(), None, Vec::new());
    for part in parsed.parts.iter().skip(1) {
        let disposition = part
            .content_disposition()
            .and_then(|d| d.attribute("name"))
            .unwrap_or_default()
            .to_owned();
        let contents = part.contents().to_vec();
        match disposition.as_str() {
            "to" => to = String::from_utf8_lossy(&contents).into_owned(),
            "v:request_id" => request_id = Some(String::from_utf8_lossy(&contents).into_owned()),
            "message" => message = contents,
            _ => {}
        }
    }
    (to, request_id, message)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mailgun_gets_the_mime_message_and_its_answers_decide_the_outcome() {
    let seen = Arc::new(Mutex::new(HashSet::new()));
    let sink = ApiSink::start(move |r| {
        let (to, request_id, message) = mailgun_form(r);
        let address = to.rsplit('<').next().unwrap_or_default().trim_end_matches('>').to_owned();
        let parsed = mail_parser::MessageParser::default().parse(&message);
        let documented = r.method == "POST"
            && r.path == "/v3/mg.example.com/messages.mime"
            && r.header("content-type").is_some_and(|v| v.starts_with("multipart/form-data; boundary="))
            && request_id.as_deref().is_some_and(|v| v.starts_with("mailgun-"))
            && parsed.as_ref().is_some_and(|m| {
                m.subject().is_some_and(|s| !s.is_empty())
                    && m.from().and_then(|f| f.first()).and_then(|a| a.address()) == Some("no-reply@verimail.test")
                    && m.to().and_then(|t| t.first()).and_then(|a| a.address()) == Some(address.as_str())
                    && m.message_id().is_some_and(|id| id.ends_with("@verimail.test"))
                    && m.body_text(0).is_some_and(|t| t.contains("/confirm/"))
                    && m.body_html(0).is_some_and(|h| h.contains("href="))
            });
        // HTTP basic, user `api`, password the key: "api:key-1".
        if r.header("authorization") != Some("Basic YXBpOmtleS0x") {
            return Reply { status: 401, headers: vec![], body: "Forbidden".into() };
        }
        if !documented {
            return Reply::json(400, json!({"message": "test: undocumented request"}));
        }
        let first = first_time(&seen, &address);
        scripted(
            case_of(&address),
            first,
            Reply::json(200, json!({"id": format!("<pid-{}@mg.example.com>", uuid::Uuid::new_v4().simple()), "message": "Queued. Thank you."})),
            Reply::json(400, json!({"message": "'to' parameter is not a valid address. please check documentation"})),
            Reply::json(400, json!({"message": "'from' parameter is not a valid address. please check documentation"})),
            Reply { status: 401, headers: vec![], body: "Forbidden".into() },
        )
    })
    .await
    .expect("the stand-in starts");
    let url = format!("mailgun://key-1@mg.example.com?endpoint={}", sink.base());
    run_cases("mailgun", &sink, url, |r| {
        let (to, _, _) = mailgun_form(r);
        to.rsplit('<')
            .next()
            .unwrap_or_default()
            .trim_end_matches('>')
            .to_owned()
    })
    .await;
}
