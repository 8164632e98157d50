//! Checks event bodies against the JSON Schemas in `docs/schemas/` (feature
//! `schema-check`), so tests can assert that every event the system emits
//! keeps the published contract.
//!
//! ```
//! let body = br#"{"specversion":"1.0","id":"e-1","source":"/verimail/gateway",
//!   "type":"verimail.email.verified","time":"2026-11-24T10:05:00Z",
//!   "datacontenttype":"application/json",
//!   "data":{"request_id":"r-1","user_id":"42","email":"alice@example.com",
//!           "purpose":"verify_email","context":null,"verified_at":"2026-11-24T10:05:00Z",
//!           "method":"link"}}"#;
//! assert_eq!(verimail_producer::schema::validate_event(body), Ok(()));
//! ```

use std::sync::OnceLock;

use jsonschema::Validator;
use serde_json::Value;

/// Each event type with its schema, as published in `docs/schemas/`.
pub const SCHEMAS: [(&str, &str); 7] = [
    (
        "verimail.verification.requested",
        include_str!("../../docs/schemas/verimail.verification.requested.json"),
    ),
    (
        "verimail.verification.sent",
        include_str!("../../docs/schemas/verimail.verification.sent.json"),
    ),
    (
        "verimail.verification.throttled",
        include_str!("../../docs/schemas/verimail.verification.throttled.json"),
    ),
    (
        "verimail.verification.failed",
        include_str!("../../docs/schemas/verimail.verification.failed.json"),
    ),
    (
        "verimail.email.verified",
        include_str!("../../docs/schemas/verimail.email.verified.json"),
    ),
    (
        "verimail.email.bounced",
        include_str!("../../docs/schemas/verimail.email.bounced.json"),
    ),
    (
        "verimail.email.complained",
        include_str!("../../docs/schemas/verimail.email.complained.json"),
    ),
];

type Compiled = Vec<(&'static str, Result<Validator, String>)>;

fn validators() -> &'static Compiled {
    static VALIDATORS: OnceLock<Compiled> = OnceLock::new();
    VALIDATORS.get_or_init(|| {
        SCHEMAS
            .iter()
            .map(|(ty, text)| {
                let compiled = serde_json::from_str::<Value>(text)
                    .map_err(|e| format!("schema of {ty} is not JSON: {e}"))
                    .and_then(|schema| {
                        jsonschema::options()
                            .should_validate_formats(true)
                            .build(&schema)
                            .map_err(|e| format!("schema of {ty} does not compile: {e}"))
                    });
                (*ty, compiled)
            })
            .collect()
    })
}

/// Validates one event body (a CloudEvent in structured JSON mode) against
/// the schema of its `type`; the error lists every violation with its JSON
/// pointer.
pub fn validate_event(body: &[u8]) -> Result<(), String> {
    let event: Value = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    validate_value(&event)
}

/// [`validate_event`] for an already parsed event.
pub fn validate_value(event: &Value) -> Result<(), String> {
    let ty = event
        .get("type")
        .and_then(Value::as_str)
        .ok_or("no string `type`")?;
    let validator = validators()
        .iter()
        .find(|(known, _)| *known == ty)
        .map(|(_, v)| v)
        .ok_or_else(|| format!("`{ty}` is not a verimail event type"))?
        .as_ref()
        .map_err(Clone::clone)?;
    let problems: Vec<String> = validator
        .iter_errors(event)
        .map(|e| format!("{ty} at `{}`: {e}", e.instance_path()))
        .collect();
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}
