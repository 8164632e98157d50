//! The published JSON Schemas (docs/schemas) against the examples in docs and
//! against what the shared event types actually serialize.

use std::path::PathBuf;

use serde_json::{Value, json};
use time::macros::datetime;
use verimail_producer::schema::{SCHEMAS, validate_event, validate_value};
use verimail_shared::events::{
    CloudEvent, EMAIL_VERIFIED, FailedData, FailureReason, OutcomeFields, SentData, ThrottledData,
    VERIFICATION_FAILED, VERIFICATION_SENT, VERIFICATION_THROTTLED, VerifiedData,
};

fn docs() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs")
}

#[test]
fn every_schema_is_draft_2020_12_and_named_after_its_type() {
    for (ty, text) in SCHEMAS {
        let schema: Value = serde_json::from_str(text).expect("schema is JSON");
        assert_eq!(
            schema["$schema"],
            "https://json-schema.org/draft/2020-12/schema"
        );
        assert_eq!(schema["properties"]["type"]["const"], ty);
        let file = docs().join(format!("schemas/{ty}.json"));
        assert!(file.exists(), "{} exists", file.display());
    }
}

#[test]
fn every_example_file_matches_its_schema() {
    let dir = docs().join("schemas/examples");
    let mut seen = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("examples folder") {
        let path = entry.expect("an entry").path();
        let body = std::fs::read(&path).expect("readable");
        assert_eq!(validate_event(&body), Ok(()), "{}", path.display());
        let event: Value = serde_json::from_slice(&body).expect("JSON");
        let name = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default()
            .to_owned();
        assert_eq!(
            event["type"],
            name.as_str(),
            "an example file is named after its type"
        );
        seen.push(name);
    }
    seen.sort();
    let mut all: Vec<String> = SCHEMAS.iter().map(|(ty, _)| (*ty).to_owned()).collect();
    all.sort();
    assert_eq!(seen, all, "one example per event type");
}

#[test]
fn every_asyncapi_example_matches_its_schema() {
    let text = std::fs::read_to_string(docs().join("asyncapi.yaml")).expect("asyncapi.yaml");
    let doc: Value = serde_yaml::from_str(&text).expect("asyncapi.yaml is YAML");
    assert_eq!(doc["asyncapi"], "3.0.0");
    let messages = doc["components"]["messages"].as_object().expect("messages");
    let mut checked = 0;
    for (key, message) in messages {
        let Some(payload_ref) = message["payload"]["$ref"].as_str() else {
            continue;
        };
        let ty = message["name"].as_str().expect("a message name");
        assert_eq!(payload_ref, format!("./schemas/{ty}.json"), "{key}");
        let examples = message["examples"].as_array().expect("examples");
        assert!(!examples.is_empty(), "{key} has examples");
        for example in examples {
            let payload = &example["payload"];
            assert_eq!(payload["type"], ty, "{key}: {}", example["name"]);
            assert_eq!(
                validate_value(payload),
                Ok(()),
                "{key}: {}",
                example["name"]
            );
            checked += 1;
        }
        // Every routing-key channel names its message and the topic exchange.
        let channel = doc["channels"]
            .as_object()
            .and_then(|c| c.values().find(|c| c["address"] == ty))
            .expect("a channel per event type");
        assert_eq!(channel["bindings"]["amqp"]["exchange"]["type"], "topic");
    }
    assert!(checked >= 5);
}

#[test]
fn the_contract_example_request_matches() {
    let body = json!({"specversion":"1.0","id":"5f1c…","source":"/accounts","type":"verimail.verification.requested",
        "time":"2026-11-24T10:00:00Z","datacontenttype":"application/json",
        "data":{"user_id":"42","email":"alice@example.com","name":"Alice","locale":"zh-CN",
                "purpose":"verify_email","return_url":"https://app.example.com/welcome",
                "context":{"signup_flow":"b"}}});
    assert_eq!(validate_value(&body), Ok(()));
}

fn fields() -> OutcomeFields {
    OutcomeFields {
        request_id: "r-1".into(),
        user_id: Some("42".into()),
        email: Some("alice@example.com".into()),
        purpose: Some("verify_email".into()),
        context: json!({"k": "v"}).as_object().cloned(),
    }
}

#[test]
fn events_serialized_by_the_shared_types_match_the_schemas() {
    let t = datetime!(2026-11-24 10:00:00.25 UTC);
    let sent = CloudEvent::new(
        VERIFICATION_SENT,
        "/verimail/worker",
        SentData {
            fields: fields(),
            sent_at: t,
            expires_at: t,
        },
    );
    let throttled = CloudEvent::new(
        VERIFICATION_THROTTLED,
        "/verimail/worker",
        ThrottledData {
            fields: OutcomeFields {
                context: None,
                ..fields()
            },
            retry_after_seconds: 1,
        },
    );
    let failed = CloudEvent::new(
        VERIFICATION_FAILED,
        "/verimail/worker",
        FailedData {
            fields: OutcomeFields {
                user_id: None,
                email: None,
                purpose: None,
                context: None,
                ..fields()
            },
            reason: FailureReason::InvalidRequest,
            detail: "email: missing".into(),
        },
    );
    let verified = CloudEvent::new(
        EMAIL_VERIFIED,
        "/verimail/gateway",
        VerifiedData {
            request_id: None,
            user_id: None,
            email: "alice@example.com".into(),
            purpose: "verify_email".into(),
            context: None,
            verified_at: t,
            method: verimail_shared::events::VerifyMethod::Code,
        },
    );
    let bounced = CloudEvent::new(
        verimail_shared::events::EMAIL_BOUNCED,
        "/verimail/gateway",
        verimail_shared::events::BouncedData {
            notice: verimail_shared::events::NoticeData {
                email: "alice@example.com".into(),
                provider: verimail_shared::events::MailProvider::Ses,
                occurred_at: t,
                detail: "smtp; 550 5.1.1".into(),
                request_id: Some("r-1".into()),
                user_id: None,
            },
            kind: verimail_shared::events::BounceKind::Hard,
        },
    );
    let complained = CloudEvent::new(
        verimail_shared::events::EMAIL_COMPLAINED,
        "/verimail/gateway",
        verimail_shared::events::ComplainedData {
            notice: verimail_shared::events::NoticeData {
                email: "alice@example.com".into(),
                provider: verimail_shared::events::MailProvider::Postmark,
                occurred_at: t,
                detail: "SpamComplaint".into(),
                request_id: None,
                user_id: None,
            },
        },
    );
    let suppressed = CloudEvent::new(
        VERIFICATION_FAILED,
        "/verimail/worker",
        FailedData {
            fields: fields(),
            reason: FailureReason::Suppressed,
            detail: "the address is on the suppression list: bounce".into(),
        },
    );
    for body in [
        sent.to_bytes(),
        throttled.to_bytes(),
        failed.to_bytes(),
        verified.to_bytes(),
        bounced.to_bytes(),
        complained.to_bytes(),
        suppressed.to_bytes(),
    ] {
        assert_eq!(
            validate_event(&body),
            Ok(()),
            "{}",
            String::from_utf8_lossy(&body)
        );
    }
    let request = verimail_producer::VerificationRequest::new("42", "alice@example.com")
        .context(json!({"a": 1}))
        .to_cloudevent("/accounts", t);
    assert_eq!(validate_value(&request), Ok(()));
}

#[test]
fn events_breaking_the_contract_are_refused_naming_where() {
    let good: Value = serde_json::from_str(
        &std::fs::read_to_string(
            docs().join("schemas/examples/verimail.verification.throttled.json"),
        )
        .expect("example"),
    )
    .expect("JSON");
    let broken = |edit: &dyn Fn(&mut Value)| {
        let mut event = good.clone();
        edit(&mut event);
        validate_value(&event).expect_err("refused")
    };
    assert!(
        broken(&|e| e["data"]["retry_after_seconds"] = json!(0))
            .contains("/data/retry_after_seconds")
    );
    assert!(
        broken(&|e| {
            e["data"].as_object_mut().map(|d| d.remove("request_id"));
        })
        .contains("request_id")
    );
    assert!(broken(&|e| e["time"] = json!("2026-11-24T11:00:00+01:00")).contains("/time"));
    assert!(broken(&|e| e["data"]["user_id"] = json!(42)).contains("/data/user_id"));
    assert!(broken(&|e| e["specversion"] = json!("0.3")).contains("/specversion"));
    assert!(validate_event(b"{\"type\":\"verimail.unknown\"}").is_err());
    assert!(validate_event(b"not json").is_err());
}
