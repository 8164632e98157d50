//! Delivery through HTTP APIs (issue 18) with the real worker binary, RabbitMQ
//! and PostgreSQL: SES through `aws-ses-v2-local` (an SES v2 emulator by
//! others, installed by `npm ci` in `tests/node`), Postmark, SendGrid,
//! Mailgun and the generic target against stand-ins in the test that check
//! every field and header their public APIs document and answer as they do;
//! pauses seen by a second worker, failover, and `MAIL_RATE_LIMIT` shared by
//! several workers.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use verimail_producer::{Producer, VerificationRequest};
use verimail_tests::api::{ApiSink, Received, Reply};
use verimail_tests::env::{TestEnv, free_port};
use verimail_tests::procs::{Proc, migrate, ready_worker};
use verimail_tests::tap::EventTap;

const WAIT: Duration = Duration::from_secs(45);

/// Workers on a fresh namespace and database, a tap on every event, a producer.
struct Deployment {
    env: TestEnv,
    tap: EventTap,
    workers: Vec<Proc>,
    /// Each worker's `/metrics` address.
    metrics: Vec<String>,
    producer: Producer,
}

impl Deployment {
    async fn start(label: &str, workers: usize, tweak: impl FnOnce(&mut TestEnv)) -> Self {
        let mut env = TestEnv::new(label);
        env.set("THROTTLE_SECONDS", "0");
        env.set("MAIL_FROM", "Verimail <no-reply@verimail.test>");
        tweak(&mut env);
        migrate(&env).await;
        let tap = EventTap::everything(&env).await;
        let producer = Producer::connect(&env.config())
            .await
            .expect("the producer connects");
        let mut d = Self {
            env,
            tap,
            workers: Vec::new(),
            metrics: Vec::new(),
            producer,
        };
        for _ in 0..workers {
            d.add_worker().await;
        }
        d
    }

    async fn add_worker(&mut self) {
        let mut wenv = self.env.clone();
        let addr = format!("127.0.0.1:{}", free_port());
        wenv.set("METRICS_ADDR", addr.clone());
        self.workers.push(ready_worker(&wenv, WAIT).await);
        self.metrics.push(addr);
    }

    async fn publish(&self, id: &str, email: &str) {
        let request = VerificationRequest::new(format!("user-{id}"), email.to_owned())
            .name("Zoé Example")
            .id(id.to_owned());
        self.producer
            .request_verification(request)
            .await
            .expect("the request is published");
    }

    /// The outcome event of request `id`.
    async fn outcome(&self, id: &str) -> Value {
        let is_outcome = |e: &Value| {
            e["data"]["request_id"] == id
                && e["type"].as_str().is_some_and(|t| {
                    t.starts_with("verimail.verification.") && !t.ends_with("requested")
                })
        };
        self.tap
            .wait_until(WAIT, |all| all.iter().any(is_outcome))
            .await
            .into_iter()
            .find(is_outcome)
            .unwrap_or_else(|| panic!("no outcome for {id}; worker logs:\n{}", self.logs()))
    }

    fn logs(&self) -> String {
        self.workers
            .iter()
            .map(Proc::log)
            .collect::<Vec<_>>()
            .join("\n---\n")
    }

    async fn provider_message_id(&self, id: &str) -> Option<String> {
        let pool = sqlx::PgPool::connect(self.env.get("DATABASE_URL").unwrap_or_default())
            .await
            .expect("the database answers");
        let row: Option<(Option<String>,)> =
            sqlx::query_as("SELECT provider_message_id FROM requests WHERE id = $1")
                .bind(id)
                .fetch_optional(&pool)
                .await
                .expect("the request row is read");
        pool.close().await;
        row.and_then(|r| r.0)
    }

    async fn stop(self) {
        for event in self.tap.all() {
            if let Err(e) = verimail_producer::schema::validate_value(&event) {
                panic!("an emitted event breaks docs/schemas: {e}\n{event}");
            }
        }
        for w in self.workers {
            assert_eq!(
                w.stop(Duration::from_secs(30)).await,
                Some(0),
                "worker exits 0"
            );
        }
        self.env.cleanup().await;
    }
}

fn kind(outcome: &Value) -> (String, String) {
    let ty = outcome["type"].as_str().unwrap_or_default();
    let short = ty.rsplit('.').next().unwrap_or_default().to_owned();
    (
        short,
        outcome["data"]["reason"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    )
}

/// What each scripted recipient makes a stand-in answer: the local part of
/// the address names the case.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Case {
    Ok,
    Recipient,
    Refuse,
    Revoked,
    Busy,
    Flaky,
}

const CASES: [(Case, &str); 6] = [
    (Case::Ok, "ok"),
    (Case::Recipient, "gone"),
    (Case::Refuse, "refuse"),
    (Case::Revoked, "revoked"),
    (Case::Busy, "busy"),
    (Case::Flaky, "flaky"),
];

fn case_of(address: &str) -> Case {
    CASES
        .iter()
        .find(|(_, local)| address.starts_with(&format!("{local}@")))
        .map(|(c, _)| *c)
        .unwrap_or(Case::Ok)
}

/// Answers for the case, `first` telling whether this address was seen before:
/// 429 with Retry-After and 500 come once, then the mail is accepted.
fn scripted(
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
async fn run_cases(
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
fn first_time(seen: &Mutex<HashSet<String>>, address: &str) -> bool {
    seen.lock()
        .map(|mut s| s.insert(address.to_owned()))
        .unwrap_or(false)
}

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

/// HMAC-SHA256 of `"{t}.{body}"`, hex, computed here with openssl (not our code).
fn openssl_hmac(secret: &str, t: &str, body: &[u8]) -> String {
    use std::io::Write;
    let mut child = std::process::Command::new("openssl")
        .args(["dgst", "-sha256", "-hmac", secret, "-r"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("openssl runs");
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(format!("{t}.").as_bytes());
        let _ = stdin.write_all(body);
    }
    let out = child.wait_with_output().expect("openssl answers");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_generic_target_gets_signed_json_and_its_answers_decide_the_outcome() {
    let seen = Arc::new(Mutex::new(HashSet::new()));
    let signatures = Arc::new(Mutex::new(Vec::new()));
    let sigs = signatures.clone();
    let sink = ApiSink::start(move |r| {
        let body = r.json();
        let to = body["to"].as_str().unwrap_or_default().to_owned();
        let address = to
            .rsplit('<')
            .next()
            .unwrap_or_default()
            .trim_end_matches('>')
            .to_owned();
        if let Ok(mut s) = sigs.lock() {
            s.push((
                r.header("verimail-signature")
                    .unwrap_or_default()
                    .to_owned(),
                r.body.clone(),
            ));
        }
        let documented = r.method == "POST"
            && r.path == "/hooks/mail?via=test"
            && body["request_id"]
                .as_str()
                .is_some_and(|v| v.starts_with("http-"))
            && body["from"] == "Verimail <no-reply@verimail.test>"
            && to.contains("Zoé Example")
            && body["subject"].as_str().is_some_and(|s| !s.is_empty())
            && body["text"]
                .as_str()
                .is_some_and(|s| s.contains("/confirm/"))
            && body["html"].as_str().is_some_and(|s| s.contains("href="))
            && body["headers"]["Message-ID"]
                .as_str()
                .is_some_and(|v| v.ends_with("@verimail.test>"));
        if !documented {
            return Reply::json(
                400,
                json!({"error": format!("test: undocumented request {body}")}),
            );
        }
        let first = first_time(&seen, &address);
        scripted(
            case_of(&address),
            first,
            Reply::json(
                200,
                json!({"id": format!("pid-{}", uuid::Uuid::new_v4().simple())}),
            ),
            // The generic target has no recipient answer: a 4xx is the relay's refusal.
            Reply::json(422, json!({"error": "recipient unknown"})),
            Reply::json(422, json!({"error": "refused"})),
            Reply::json(401, json!({"error": "bad signature"})),
        )
    })
    .await
    .expect("the stand-in starts");
    let url = format!("{}/hooks/mail?via=test", sink.base());
    let d = Deployment::start("http", 1, |env| {
        env.set("MAIL_URL", url);
    })
    .await;
    let secret = d
        .env
        .get("VERIMAIL_SECRET_KEY")
        .unwrap_or_default()
        .to_owned();
    for (case, local) in CASES {
        let id = format!("http-{local}");
        d.publish(&id, &format!("{local}@example.com")).await;
        let got = kind(&d.outcome(&id).await);
        let expected = match case {
            Case::Ok | Case::Busy | Case::Flaky => ("sent", ""),
            Case::Recipient | Case::Refuse | Case::Revoked => ("failed", "provider_rejected"),
        };
        assert_eq!((got.0.as_str(), got.1.as_str()), expected, "{case:?}");
    }
    // Every request carries `t=UNIX,v1=HEX`, HMAC-SHA256(secret, "{t}.{body}"), recent.
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let signed = signatures.lock().map(|s| s.clone()).unwrap_or_default();
    assert!(signed.len() >= CASES.len());
    for (header, body) in signed {
        let (t, v1) = header
            .strip_prefix("t=")
            .and_then(|rest| rest.split_once(",v1="))
            .unwrap_or_else(|| panic!("malformed Verimail-Signature: {header}"));
        assert!(
            (now - t.parse::<i64>().unwrap_or(0)).abs() < 120,
            "{header}"
        );
        assert_eq!(v1, openssl_hmac(&secret, t, &body), "{header}");
    }
    d.stop().await;
}

/// `aws-ses-v2-local` on a free port, killed when dropped.
struct SesEmulator {
    port: u16,
    _child: tokio::process::Child,
}

impl SesEmulator {
    async fn start() -> Self {
        let cli = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/node/node_modules/aws-ses-v2-local/dist/cli.js"
        );
        assert!(
            std::path::Path::new(cli).exists(),
            "{cli} is missing: run `npm ci` in tests/node (scripts/test.sh does)"
        );
        let port = free_port();
        let child = tokio::process::Command::new("node")
            .args([cli, "--host", "127.0.0.1", "--port", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("node starts aws-ses-v2-local");
        let health = format!("http://127.0.0.1:{port}/health-check");
        assert!(
            verimail_tests::procs::wait_http_ok(&health, WAIT).await,
            "aws-ses-v2-local never answered"
        );
        Self {
            port,
            _child: child,
        }
    }

    async fn store(&self) -> Value {
        let answer =
            verimail_tests::http::get(&format!("http://127.0.0.1:{}/store", self.port), &[])
                .await
                .expect("GET /store");
        serde_json::from_str(&answer.2).unwrap_or_default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ses_delivers_through_aws_ses_v2_local_and_its_message_id_is_kept() {
    let ses = SesEmulator::start().await;
    let url = format!("ses://eu-west-1?endpoint=http://127.0.0.1:{}", ses.port);
    let d = Deployment::start("ses", 1, |env| {
        env.set("MAIL_URL", url);
        env.set("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE");
        env.set(
            "AWS_SECRET_ACCESS_KEY",
            "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
        );
    })
    .await;
    d.publish("ses-1", "alice@example.com").await;
    let outcome = d.outcome("ses-1").await;
    assert_eq!(kind(&outcome).0, "sent", "{outcome}\n{}", d.logs());
    let store = ses.store().await;
    let emails = store["emails"].as_array().cloned().unwrap_or_default();
    assert_eq!(emails.len(), 1, "{store}");
    let mail = &emails[0];
    assert!(
        mail["from"]
            .as_str()
            .is_some_and(|f| f.contains("no-reply@verimail.test")),
        "{mail}"
    );
    assert!(
        mail["destination"]["to"]
            .to_string()
            .contains("alice@example.com"),
        "{mail}"
    );
    assert!(
        mail["subject"].as_str().is_some_and(|s| !s.is_empty()),
        "{mail}"
    );
    assert!(
        mail["body"]["text"]
            .as_str()
            .is_some_and(|t| t.contains("/confirm/")),
        "{mail}"
    );
    assert!(
        mail["body"]["html"]
            .as_str()
            .is_some_and(|h| h.contains("href=")),
        "{mail}"
    );
    // The id SES answered (and names in its notifications) is kept with the request.
    let stored = d.provider_message_id("ses-1").await;
    assert_eq!(stored.as_deref(), mail["messageId"].as_str(), "{mail}");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_pauses_the_target_for_every_worker_of_the_namespace() {
    // The first request is answered 429 with Retry-After: 3; the rest 200.
    let first = Arc::new(Mutex::new(None::<Instant>));
    let f = first.clone();
    let sink = ApiSink::start(move |_| {
        let mut first = f.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if first.is_none() {
            *first = Some(Instant::now());
            return Reply::json(429, json!({"error": "slow down"})).with_header("retry-after", "3");
        }
        Reply::json(200, json!({"id": "pid-ok"}))
    })
    .await
    .expect("the stand-in starts");
    let d = Deployment::start("pause", 2, |env| {
        env.set("MAIL_URL", format!("{}/mail", sink.base()));
        env.set("WORKER_CONCURRENCY", "4");
    })
    .await;
    d.publish("pause-0", "first@example.com").await;
    let paused_at = verimail_tests::tap::eventually(WAIT, || async {
        *first
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    })
    .await
    .expect("the stand-in saw the first request");
    // Both workers take some of these (round robin over two consumers).
    tokio::time::sleep(Duration::from_millis(500)).await;
    for i in 1..=12 {
        d.publish(&format!("pause-{i}"), &format!("user{i}@example.com"))
            .await;
    }
    for i in 0..=12 {
        assert_eq!(kind(&d.outcome(&format!("pause-{i}")).await).0, "sent");
    }
    let received = sink.received();
    assert_eq!(
        received.len(),
        14,
        "one 429, then each of the 13 mails once"
    );
    for r in &received[1..] {
        let after = r.at.duration_since(paused_at);
        assert!(
            after >= Duration::from_millis(2900),
            "a mail went out {after:?} into a 3 s pause"
        );
    }
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_sends_each_mail_once_through_the_second_target_and_returns_to_the_first() {
    let primary = ApiSink::start(|_| Reply::json(503, json!({"error": "maintenance"})))
        .await
        .expect("the stand-in starts");
    let secondary = ApiSink::accepting().await.expect("the stand-in starts");
    let closed = free_port();
    let d = Deployment::start("failover", 1, |env| {
        env.set(
            "MAIL_URL",
            format!(
                "{}/mail , http://127.0.0.1:{closed}/mail , {}/mail",
                primary.base(),
                secondary.base()
            ),
        );
    })
    .await;
    let ids = |from: usize, to: usize| (from..to).map(|i| format!("fo-{i}")).collect::<Vec<_>>();
    for id in ids(0, 20) {
        d.publish(&id, &format!("{id}@example.com")).await;
    }
    for id in ids(0, 20) {
        assert_eq!(kind(&d.outcome(&id).await).0, "sent", "{id}");
    }
    let by_id = |sink: &ApiSink| {
        let mut counts: HashMap<String, usize> = HashMap::new();
        for r in sink.received() {
            *counts
                .entry(
                    r.json()["request_id"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                )
                .or_default() += 1;
        }
        counts
    };
    let through_second = by_id(&secondary);
    assert_eq!(
        through_second.len(),
        20,
        "every mail went through the last target"
    );
    assert!(
        through_second.values().all(|n| *n == 1),
        "exactly one mail each: {through_second:?}"
    );

    // The first target comes back: it is used again, the others no more.
    primary.answer(|_| Reply::json(200, json!({"id": "pid-primary"})));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before = secondary.count();
    for id in ids(20, 30) {
        d.publish(&id, &format!("{id}@example.com")).await;
    }
    for id in ids(20, 30) {
        assert_eq!(kind(&d.outcome(&id).await).0, "sent", "{id}");
    }
    assert_eq!(
        secondary.count(),
        before,
        "no mail through the fallback once the first is back"
    );
    let through_first = by_id(&primary);
    for id in ids(20, 30) {
        assert_eq!(through_first.get(&id), Some(&1), "{id}");
    }
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_share_one_rate_limit_and_a_fourth_does_not_raise_it() {
    const N: usize = 3000;
    const RATE: f64 = 50.0;
    let sink = ApiSink::accepting().await.expect("the stand-in starts");
    let mut d = Deployment::start("rate", 0, |env| {
        env.set("MAIL_URL", format!("{}/mail", sink.base()));
        env.set("MAIL_RATE_LIMIT", "50/s");
        env.set("WORKER_CONCURRENCY", "64");
    })
    .await;
    for i in 0..N {
        d.publish(&format!("rate-{i}"), &format!("r{i}@example.com"))
            .await;
    }
    for _ in 0..3 {
        d.add_worker().await;
    }
    // A fourth worker joins half-way.
    let joined = loop {
        if sink.count() >= N / 2 {
            d.add_worker().await;
            break Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // Counted at the sink (cheap), then the outcomes once.
    let all_sent = verimail_tests::tap::eventually(Duration::from_secs(120), || async {
        (sink.count() >= N).then_some(())
    })
    .await;
    let all_done = d
        .tap
        .wait_for("verimail.verification.sent", N, WAIT)
        .await
        .len()
        >= N;
    let arrivals: Vec<Instant> = sink.received().iter().map(|r| r.at).collect();
    assert!(
        all_sent.is_some() && all_done,
        "{} of {N} sent",
        arrivals.len()
    );
    assert_eq!(arrivals.len(), N, "each mail once");
    assert!(d.tap.of_type("verimail.verification.failed").is_empty());
    assert!(d.tap.of_type("verimail.verification.throttled").is_empty());
    let rate =
        |a: &[Instant]| (a.len() - 1) as f64 / a[a.len() - 1].duration_since(a[0]).as_secs_f64();
    let overall = rate(&arrivals);
    assert!(
        (RATE * 0.9..=RATE * 1.1).contains(&overall),
        "{overall:.1} mails/s over the run"
    );
    let after: Vec<Instant> = arrivals
        .iter()
        .copied()
        .filter(|t| *t > joined + Duration::from_secs(2))
        .collect();
    let with_four = rate(&after);
    assert!(
        with_four <= RATE * 1.1,
        "{with_four:.1} mails/s with four workers"
    );
    // No burst: over any 2 s, at most twice the rate plus 10 %.
    let (mut most, mut worst) = (0, 0);
    let mut start = 0;
    for end in 0..arrivals.len() {
        while arrivals[end].duration_since(arrivals[start]) > Duration::from_secs(2) {
            start += 1;
        }
        if end - start + 1 > most {
            (most, worst) = (end - start + 1, start);
        }
    }
    let gaps: Vec<u128> = arrivals[worst..(worst + most).min(arrivals.len())]
        .windows(2)
        .map(|w| w[1].duration_since(w[0]).as_millis())
        .collect();
    assert!(
        most as f64 <= 2.0 * RATE * 1.1,
        "{most} mails within 2 s, {:.1} s into the run; gaps (ms): {gaps:?}",
        arrivals[worst].duration_since(arrivals[0]).as_secs_f64()
    );
    eprintln!(
        "{overall:.1} mails/s overall, {with_four:.1} with four workers, at most {most} in 2 s"
    );
    // /metrics shows the time mails waited for the budget.
    let metrics = verimail_tests::http::get(&format!("http://{}/metrics", d.metrics[0]), &[])
        .await
        .expect("GET /metrics");
    let text = &metrics.2;
    let waited = text
        .lines()
        .find(|l| l.starts_with("verimail_worker_mail_rate_limit_wait_seconds_count"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|n| n.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(waited > 0.0, "no rate-limit wait in /metrics:\n{text}");
    d.stop().await;
}
