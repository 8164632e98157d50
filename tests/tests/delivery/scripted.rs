//! Scripted recipients: the local part of an address tells a stand-in how to
//! answer (accept, refuse the recipient, refuse the mail, revoked key, busy
//! once, failing once), and the runner that sends every case through a worker
//! and checks the outcome and how many requests it cost.

use std::collections::HashSet;
use std::sync::Mutex;

use serde_json::json;
use verimail_tests::api::{ApiSink, Received, Reply};

use crate::support::{Deployment, kind};

/// What each scripted recipient makes a stand-in answer: the local part of
/// the address names the case.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Case {
    Ok,
    Recipient,
    Refuse,
    Revoked,
    Busy,
    Flaky,
}

pub const CASES: [(Case, &str); 6] = [
    (Case::Ok, "ok"),
    (Case::Recipient, "gone"),
    (Case::Refuse, "refuse"),
    (Case::Revoked, "revoked"),
    (Case::Busy, "busy"),
    (Case::Flaky, "flaky"),
];

pub fn case_of(address: &str) -> Case {
    CASES
        .iter()
        .find(|(_, local)| address.starts_with(&format!("{local}@")))
        .map(|(c, _)| *c)
        .unwrap_or(Case::Ok)
}

/// Answers for the case, `first` telling whether this address was seen before:
/// 429 with Retry-After and 500 come once, then the mail is accepted.
pub fn scripted(
    case: Case,
    first: bool,
    ok: Reply,
    recipient: Reply,
    refuse: Reply,
    unauthorized: Reply,
) -> Reply {
    match case {
        Case::Ok => ok,
        Case::Recipient => recipient,
        Case::Refuse => refuse,
        Case::Revoked => unauthorized,
        Case::Busy if first => {
            Reply::json(429, json!({"message": "slow down"})).with_header("retry-after", "1")
        }
        Case::Flaky if first => Reply::json(500, json!({"message": "internal error"})),
        Case::Busy | Case::Flaky => ok,
    }
}

/// Runs every case through a worker whose `MAIL_URL` is `mail_url`, and checks
/// the outcomes and the number of requests each case cost.
pub async fn run_cases(
    label: &str,
    sink: &ApiSink,
    mail_url: String,
    recipient_of: fn(&Received) -> String,
) {
    let d = Deployment::start(label, 1, |env| {
        env.set("MAIL_URL", mail_url);
    })
    .await;
    for (case, local) in CASES {
        d.publish(&format!("{label}-{local}"), &format!("{local}@example.com"))
            .await;
        let outcome = d.outcome(&format!("{label}-{local}")).await;
        let got = kind(&outcome);
        let expected = match case {
            Case::Ok | Case::Busy | Case::Flaky => ("sent", ""),
            Case::Recipient => ("failed", "recipient_rejected"),
            Case::Refuse | Case::Revoked => ("failed", "provider_rejected"),
        };
        assert_eq!(
            (got.0.as_str(), got.1.as_str()),
            expected,
            "{case:?}: {outcome}\n{}",
            d.logs()
        );
        let tries = sink
            .received()
            .iter()
            .filter(|r| recipient_of(r).starts_with(&format!("{local}@")))
            .count();
        let expected_tries = if matches!(case, Case::Busy | Case::Flaky) {
            2
        } else {
            1
        };
        assert_eq!(tries, expected_tries, "{case:?}: requests to the API");
        if expected.0 == "failed" {
            let detail = outcome["data"]["detail"].as_str().unwrap_or_default();
            assert!(
                detail.starts_with(label.split('-').next().unwrap_or_default()),
                "{detail}"
            );
        }
        if case == Case::Ok {
            let id = d.provider_message_id(&format!("{label}-{local}")).await;
            assert!(
                id.as_deref().is_some_and(|i| i.starts_with("pid-")),
                "{id:?}"
            );
        }
    }
    d.stop().await;
}

/// First time an address is seen by a stand-in.
pub fn first_time(seen: &Mutex<HashSet<String>>, address: &str) -> bool {
    seen.lock()
        .map(|mut s| s.insert(address.to_owned()))
        .unwrap_or(false)
}
