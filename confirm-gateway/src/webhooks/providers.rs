//! Each provider's notification payload → [`Notice`]s, per its documentation
//! (samples: django-anymail's tests, the providers' pages; see
//! `docs/design/providers.md` §2). What a provider reports that is neither a
//! bounce nor a complaint (deliveries, opens, deferrals) yields no notice.

use serde_json::{Map, Value};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use verimail_shared::events::BounceKind;

use super::{Notice, What};

fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter()
        .try_fold(v, |v, k| v.get(k))
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
}

/// Seconds since the epoch, as a number or a numeric string (read as
/// decimal text: `1534110422.25` is exactly that, not a float's neighbour).
fn epoch(v: Option<&Value>) -> Option<OffsetDateTime> {
    let text = match v? {
        Value::Number(n) => n.to_string(),
        Value::String(s) => s.trim().to_owned(),
        _ => return None,
    };
    let (secs, frac) = text.split_once('.').unwrap_or((&text, ""));
    let secs: i64 = secs.parse().ok()?;
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let nanos: i64 = format!("{:0<9}", &frac[..frac.len().min(9)]).parse().ok()?;
    OffsetDateTime::from_unix_timestamp(secs)
        .ok()?
        .checked_add(time::Duration::nanoseconds(nanos))
}

fn rfc3339(v: Option<&str>) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(v?, &Rfc3339).ok()
}

fn request_id_in(v: Option<&Value>) -> Option<String> {
    v?.get("request_id")?
        .as_str()
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

/// Mailgun's `event-data` (the signature was checked by the caller);
/// `token` is the signature's token, unique per notification.
pub fn mailgun(event: &Value, token: &str) -> Option<Notice> {
    let what = match str_at(event, &["event"])? {
        "failed" => match str_at(event, &["severity"]) {
            Some("permanent") => What::Bounce(BounceKind::Hard),
            _ => What::Bounce(BounceKind::Soft),
        },
        "complained" => What::Complaint,
        _ => return None,
    };
    let detail = str_at(event, &["delivery-status", "message"])
        .or_else(|| str_at(event, &["delivery-status", "description"]))
        .or_else(|| str_at(event, &["reason"]))
        .unwrap_or(match what {
            What::Complaint => "complained",
            What::Bounce(_) => "failed",
        });
    Some(Notice {
        key: token.to_owned(),
        email: str_at(event, &["recipient"])?.to_owned(),
        what,
        occurred_at: epoch(event.get("timestamp")),
        detail: detail.to_owned(),
        request_id: request_id_in(event.get("user-variables")),
        message_ids: str_at(event, &["message", "headers", "message-id"])
            .map(|id| vec![id.to_owned()])
            .unwrap_or_default(),
    })
}

/// One event of SendGrid's batch.
pub fn sendgrid(event: &Value) -> Option<Notice> {
    let reason = str_at(event, &["reason"]);
    let what = match str_at(event, &["event"])? {
        "bounce" => match str_at(event, &["type"]) {
            // "Blocks happen when your email is rejected because of an issue
            // with the message itself rather than the recipient's address."
            Some("blocked") => What::Bounce(BounceKind::Soft),
            _ => What::Bounce(BounceKind::Hard),
        },
        "dropped" => match reason {
            Some("Bounced Address" | "Invalid") => What::Bounce(BounceKind::Hard),
            Some("Spam Reporting Address") => What::Complaint,
            _ => return None,
        },
        "spamreport" => What::Complaint,
        _ => return None,
    };
    let detail = reason
        .or_else(|| str_at(event, &["response"]))
        .or_else(|| str_at(event, &["status"]))
        .or_else(|| str_at(event, &["event"]))
        .unwrap_or_default();
    let email = str_at(event, &["email"])?.to_owned();
    // sg_event_id is unique per event; an event without one (never seen in
    // SendGrid's samples) is keyed by what identifies it.
    let key = str_at(event, &["sg_event_id"]).map_or_else(
        || {
            format!(
                "{}:{}:{}:{}",
                str_at(event, &["sg_message_id"]).unwrap_or_default(),
                str_at(event, &["event"]).unwrap_or_default(),
                email.to_lowercase(),
                event
                    .get("timestamp")
                    .map(Value::to_string)
                    .unwrap_or_default()
            )
        },
        str::to_owned,
    );
    let mut message_ids = Vec::new();
    if let Some(sg) = str_at(event, &["sg_message_id"]) {
        // `X-Message-Id` of the send answer is the part before the first dot.
        message_ids.push(sg.split('.').next().unwrap_or(sg).to_owned());
    }
    if let Some(smtp) = str_at(event, &["smtp-id"]) {
        message_ids.push(smtp.to_owned());
    }
    Some(Notice {
        key,
        email,
        what,
        occurred_at: epoch(event.get("timestamp")),
        detail: detail.to_owned(),
        request_id: request_id_in(Some(event)),
        message_ids,
    })
}

/// A Postmark Bounce or SpamComplaint webhook (a missing `RecordType` with a
/// `Type`, as in Postmark's own bounce sample, is a bounce).
pub fn postmark(record: &Map<String, Value>) -> Option<Notice> {
    let v = Value::Object(record.clone());
    let record_type = str_at(&v, &["RecordType"]).unwrap_or("Bounce");
    let what = match (record_type, str_at(&v, &["Type"])) {
        ("SpamComplaint", _) | ("Bounce", Some("SpamComplaint" | "SpamNotification")) => {
            What::Complaint
        }
        ("Bounce", Some("HardBounce" | "BadEmailAddress")) => What::Bounce(BounceKind::Hard),
        ("Bounce", Some("SoftBounce" | "Transient" | "DnsError")) => What::Bounce(BounceKind::Soft),
        _ => return None,
    };
    let id = match v.get("ID") {
        Some(Value::Number(n)) => n.to_string(),
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        _ => return None,
    };
    let detail = str_at(&v, &["Details"])
        .or_else(|| str_at(&v, &["Description"]))
        .or_else(|| str_at(&v, &["Type"]))
        .unwrap_or(record_type);
    Some(Notice {
        key: format!("{record_type}:{id}"),
        email: str_at(&v, &["Email"])?.to_owned(),
        what,
        occurred_at: rfc3339(str_at(&v, &["BouncedAt"])),
        detail: detail.to_owned(),
        request_id: request_id_in(v.get("Metadata")),
        message_ids: str_at(&v, &["MessageID"])
            .map(|id| vec![id.to_owned()])
            .unwrap_or_default(),
    })
}

/// The SES notification inside an SNS `Message` (one notice per recipient);
/// `sns_id` is the SNS MessageId, the same on SNS's retries.
pub fn ses(message: &Value, sns_id: &str) -> Vec<Notice> {
    let kind = str_at(message, &["notificationType"]).or_else(|| str_at(message, &["eventType"]));
    let mail_ids: Vec<String> = str_at(message, &["mail", "messageId"])
        .map(|id| vec![id.to_owned()])
        .unwrap_or_default();
    let (what, recipients, section) = match kind {
        Some("Bounce") => {
            let hard = str_at(message, &["bounce", "bounceType"]) == Some("Permanent");
            let what = What::Bounce(if hard {
                BounceKind::Hard
            } else {
                BounceKind::Soft
            });
            (what, "bouncedRecipients", "bounce")
        }
        Some("Complaint") => (What::Complaint, "complainedRecipients", "complaint"),
        _ => return Vec::new(),
    };
    let Some(body) = message.get(section) else {
        return Vec::new();
    };
    let occurred_at = rfc3339(str_at(body, &["timestamp"]));
    let general = match what {
        What::Complaint => str_at(body, &["complaintFeedbackType"])
            .map_or_else(|| "complaint".to_owned(), |t| format!("complaint: {t}")),
        What::Bounce(_) => format!(
            "{} bounce ({})",
            str_at(body, &["bounceType"]).unwrap_or("Undetermined"),
            str_at(body, &["bounceSubType"]).unwrap_or("General")
        ),
    };
    body.get(recipients)
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|r| {
            let email = str_at(r, &["emailAddress"])?;
            let detail =
                str_at(r, &["diagnosticCode"]).map_or_else(|| general.clone(), str::to_owned);
            Some(Notice {
                key: format!("{sns_id}:{}", email.to_lowercase()),
                email: email.to_owned(),
                what,
                occurred_at,
                detail,
                request_id: None,
                message_ids: mail_ids.clone(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn mailgun_permanent_failures_are_hard_and_temporary_ones_soft() {
        let event = json!({"event": "failed", "severity": "permanent", "recipient": "a@x.test",
            "timestamp": 1534110422.5, "delivery-status": {"message": "550 5.1.1 no such user"},
            "message": {"headers": {"message-id": "m@x"}}, "user-variables": {"request_id": "r1"}});
        let n = mailgun(&event, "tok").expect("a notice");
        assert_eq!(n.what, What::Bounce(BounceKind::Hard));
        assert_eq!(
            (n.key.as_str(), n.detail.as_str()),
            ("tok", "550 5.1.1 no such user")
        );
        assert_eq!(n.request_id.as_deref(), Some("r1"));
        assert_eq!(n.message_ids, ["m@x"]);
        let soft = json!({"event": "failed", "severity": "temporary", "recipient": "a@x.test"});
        assert_eq!(
            mailgun(&soft, "t").map(|n| n.what),
            Some(What::Bounce(BounceKind::Soft))
        );
        let complaint = json!({"event": "complained", "recipient": "a@x.test"});
        assert_eq!(
            mailgun(&complaint, "t").map(|n| n.what),
            Some(What::Complaint)
        );
        assert!(mailgun(&json!({"event": "delivered", "recipient": "a@x.test"}), "t").is_none());
    }

    #[test]
    fn sendgrid_blocks_are_soft_and_dropped_spam_addresses_complaints() {
        let kinds = [
            (
                json!({"event": "bounce", "type": "bounce"}),
                Some(What::Bounce(BounceKind::Hard)),
            ),
            (
                json!({"event": "bounce", "type": "blocked"}),
                Some(What::Bounce(BounceKind::Soft)),
            ),
            (
                json!({"event": "dropped", "reason": "Bounced Address"}),
                Some(What::Bounce(BounceKind::Hard)),
            ),
            (
                json!({"event": "dropped", "reason": "Spam Reporting Address"}),
                Some(What::Complaint),
            ),
            (
                json!({"event": "dropped", "reason": "Unsubscribed Address"}),
                None,
            ),
            (json!({"event": "spamreport"}), Some(What::Complaint)),
            (json!({"event": "deferred"}), None),
            (json!({"event": "delivered"}), None),
        ];
        for (mut event, expected) in kinds {
            event["email"] = json!("a@x.test");
            event["sg_event_id"] = json!("e1");
            event["sg_message_id"] = json!("LRzX.filter-1");
            assert_eq!(sendgrid(&event).map(|n| n.what), expected, "{event}");
        }
        let n = sendgrid(
            &json!({"event": "spamreport", "email": "a@x.test", "sg_event_id": "e",
            "sg_message_id": "LRzX.filter-1", "request_id": "r9"}),
        )
        .expect("a notice");
        assert_eq!(n.message_ids, ["LRzX"]);
        assert_eq!(n.request_id.as_deref(), Some("r9"));
    }

    #[test]
    fn postmark_types_map_as_anymail_maps_them() {
        let record = |v: Value| v.as_object().cloned().unwrap_or_default();
        let hard = record(
            json!({"RecordType": "Bounce", "ID": 42, "Type": "HardBounce",
            "Email": "a@x.test", "Details": "smtp;550 5.1.1", "BouncedAt": "2026-11-24T10:00:00.1234567-05:00",
            "MessageID": "uuid-1", "Metadata": {"request_id": "r1"}}),
        );
        let n = postmark(&hard).expect("a notice");
        assert_eq!(
            (n.key.as_str(), n.what),
            ("Bounce:42", What::Bounce(BounceKind::Hard))
        );
        assert!(n.occurred_at.is_some());
        let untyped = record(json!({"ID": 1, "Type": "SoftBounce", "Email": "a@x.test"}));
        assert_eq!(
            postmark(&untyped).map(|n| n.what),
            Some(What::Bounce(BounceKind::Soft))
        );
        let spam = record(
            json!({"RecordType": "SpamComplaint", "ID": 2, "Type": "SpamComplaint", "Email": "a@x.test"}),
        );
        assert_eq!(postmark(&spam).map(|n| n.what), Some(What::Complaint));
        let delivery = record(json!({"RecordType": "Delivery", "ID": 3, "Email": "a@x.test"}));
        assert!(postmark(&delivery).is_none());
    }

    #[test]
    fn one_ses_notification_names_every_recipient() {
        let msg = json!({"notificationType": "Bounce", "mail": {"messageId": "ses-1"},
            "bounce": {"bounceType": "Permanent", "bounceSubType": "General", "timestamp": "2026-11-24T10:00:00.000Z",
              "bouncedRecipients": [{"emailAddress": "a@x.test", "diagnosticCode": "smtp; 550 5.1.1"},
                                    {"emailAddress": "B@x.test"}]}});
        let notices = ses(&msg, "sns-1");
        assert_eq!(notices.len(), 2);
        assert_eq!(notices[1].key, "sns-1:b@x.test");
        assert_eq!(notices[1].detail, "Permanent bounce (General)");
        assert!(
            notices
                .iter()
                .all(|n| n.what == What::Bounce(BounceKind::Hard))
        );
        let transient = json!({"eventType": "Bounce", "bounce": {"bounceType": "Transient",
            "bouncedRecipients": [{"emailAddress": "a@x.test"}]}});
        assert_eq!(ses(&transient, "s")[0].what, What::Bounce(BounceKind::Soft));
        assert!(ses(&json!({"notificationType": "Delivery"}), "s").is_empty());
    }
}
