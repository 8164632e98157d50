//! Hostile input, end to end: requests published on the raw bus (the CLI and
//! the client library validate before publishing, an attacker or a buggy
//! upstream does not) and links fetched from the gateway, each with the one
//! answer the contract gives it, and nothing else: no mail for a refused
//! request, no outcome for a dead letter, no confirmation for a bad token,
//! never a 5xx.
//!
//! Each case prints one line (`cargo test --test hostile -- --nocapture`).

use std::time::{Duration, Instant};

use lapin::options::BasicGetOptions;
use serde_json::{Value, json};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;
use verimail_shared::Config;
use verimail_shared::bus::{Bus, Outgoing, Publisher, Topology, dead_letter_reason};
use verimail_shared::events::{VERIFICATION_FAILED, VERIFICATION_REQUESTED, VERIFICATION_SENT};
use verimail_shared::token::{Claims, Signer};
use verimail_tests::env::TestEnv;
use verimail_tests::http;
use verimail_tests::procs::{Proc, migrate, ready_gateway, ready_worker};
use verimail_tests::settle::settled;
use verimail_tests::smtp::{CapturedMail, SmtpServer};
use verimail_tests::tap::EventTap;

const WAIT: Duration = Duration::from_secs(45);
/// The only origin a `return_url` may point to here.
const APP: &str = "https://app.example.com";

/// A worker, a gateway, an SMTP server, a tap and a raw publisher.
struct Pipeline {
    env: TestEnv,
    smtp: SmtpServer,
    tap: EventTap,
    worker: Proc,
    gateway: Proc,
    topology: Topology,
    publisher: Publisher,
    bus_stop: CancellationToken,
}

impl Pipeline {
    async fn start(label: &str) -> Self {
        let mut env = TestEnv::new(label);
        let smtp = SmtpServer::start();
        env.set("MAIL_URL", smtp.mail_url());
        env.set("RETURN_URL_ALLOWLIST", APP);
        // Every click comes from 127.0.0.1: the rate limit is not under test.
        env.set("CONFIRM_RATE_LIMIT_PER_MINUTE", "1000000");
        migrate(&env).await;
        let tap = EventTap::everything(&env).await;
        let worker = ready_worker(&env, WAIT).await;
        let gateway = ready_gateway(&env, WAIT).await;
        let bus_stop = CancellationToken::new();
        let bus = Bus::connect(&env.config().amqp_urls, "hostile-publisher", &bus_stop)
            .await
            .expect("the test publisher connects");
        Self {
            topology: Topology::new(env.namespace.clone()),
            publisher: Publisher::new(bus),
            env,
            smtp,
            tap,
            worker,
            gateway,
            bus_stop,
        }
    }

    /// Publishes raw bytes as a request, with `message_id` = `id`, confirmed.
    async fn publish_raw(&self, id: &str, body: &[u8]) {
        let msg = Outgoing::event(&self.topology, VERIFICATION_REQUESTED, id, body);
        self.publisher
            .publish(&msg)
            .await
            .unwrap_or_else(|e| panic!("publishing {id} failed: {e}"));
    }

    async fn stop(self) {
        self.bus_stop.cancel();
        self.publisher.bus().close().await;
        let worker = self.worker.stop(Duration::from_secs(30)).await;
        let gateway = self.gateway.stop(Duration::from_secs(30)).await;
        self.env.cleanup().await;
        assert_eq!(worker, Some(0), "worker exits 0 on SIGTERM");
        assert_eq!(gateway, Some(0), "gateway exits 0 on SIGTERM");
    }
}

fn tail(log: &str, n: usize) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The request id a mail was sent for (the worker derives the `Message-ID`
/// from it: `<{request_id}.{hash}@{domain}>`, for ids without dots).
fn mail_request(mail: &CapturedMail) -> String {
    mail.message_id
        .as_deref()
        .and_then(|m| m.split('.').next())
        .unwrap_or_default()
        .to_owned()
}

/// Every letter in `{ns}.dead` as (AMQP message_id, reason, detail), read with
/// `basic.get` and handed back unacknowledged.
async fn peek_dead(env: &TestEnv) -> Vec<(String, String, String)> {
    let topology = Topology::new(env.namespace.clone());
    let conn = lapin::Connection::connect(
        env.get("AMQP_URL").unwrap_or_default(),
        lapin::ConnectionProperties::default(),
    )
    .await
    .expect("connects to read the dead letters");
    let ch = conn.create_channel().await.expect("a channel");
    let mut letters = Vec::new();
    let mut remaining: Option<u32> = None;
    while remaining != Some(0) {
        let Some(msg) = ch
            .basic_get(
                topology.dead_queue().as_str().into(),
                BasicGetOptions { no_ack: false },
            )
            .await
            .expect("basic.get on the dead-letter queue")
        else {
            break;
        };
        remaining = Some(match remaining {
            None => msg.message_count,
            Some(n) => n.saturating_sub(1),
        });
        let props = &msg.delivery.properties;
        let (reason, detail) = dead_letter_reason(props.headers().as_ref());
        letters.push((
            props
                .message_id()
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default(),
            reason.unwrap_or_default(),
            detail.unwrap_or_default(),
        ));
    }
    // Closing the channel hands every letter back.
    let _ = ch.close(200, "peeked".into()).await;
    let _ = conn.close(200, "peeked".into()).await;
    letters
}

// ---------------------------------------------------------------------------
// Hostile requests
// ---------------------------------------------------------------------------

/// A check on the mail and the `sent` outcome of a request that must go through.
type MailCheck = fn(&CapturedMail, &Value) -> Result<(), String>;

/// The one answer a hostile request must get.
enum Expect {
    /// Sent, and the mail passes the check.
    Sent(MailCheck),
    /// `verimail.verification.failed` with this reason, the detail naming this field.
    Failed(&'static str, &'static str),
    /// Dead-lettered with this reason (and its detail containing this text); no outcome.
    Dead(&'static str, &'static str),
}

struct Case {
    name: &'static str,
    id: String,
    body: Vec<u8>,
    expect: Expect,
}

/// A request event for case `name` (id `h-{name}`, its own user and address)
/// with `data` fields overriding the defaults; `null` removes one.
fn event(name: &str, data: Value) -> Value {
    let id = format!("h-{name}");
    let mut d = json!({"user_id": format!("u-{name}"), "email": format!("{name}@example.com")});
    if let (Some(base), Some(over)) = (d.as_object_mut(), data.as_object()) {
        for (k, v) in over {
            if v.is_null() {
                base.remove(k);
            } else {
                base.insert(k.clone(), v.clone());
            }
        }
    }
    json!({
        "specversion": "1.0", "id": id, "source": "/hostile", "type": VERIFICATION_REQUESTED,
        "datacontenttype": "application/json", "data": d,
    })
}

fn case(name: &'static str, body: Value, expect: Expect) -> Case {
    Case {
        name,
        id: body["id"]
            .as_str()
            .map_or_else(|| format!("h-{name}"), str::to_owned),
        body: body.to_string().into_bytes(),
        expect,
    }
}

fn raw_case(name: &'static str, body: Vec<u8>, expect: Expect) -> Case {
    Case {
        name,
        id: format!("h-{name}"),
        body,
        expect,
    }
}

/// A context with `depth` nested keys `a`: `{"a":{"a":…{}}}`.
fn nested(depth: usize) -> String {
    format!("{}{{}}{}", "{\"a\":".repeat(depth), "}".repeat(depth))
}

fn no_raw_markup(mail: &CapturedMail, _: &Value) -> Result<(), String> {
    if mail.html.contains("<script>") || mail.html.contains("<b>bold</b>") {
        return Err(format!(
            "markup in the name reached the HTML part raw: {}",
            mail.html
        ));
    }
    if !mail.html.contains("&lt;script&gt;") {
        return Err(format!("the name is not shown escaped: {}", mail.html));
    }
    Ok(())
}

fn template_syntax_literal(mail: &CapturedMail, _: &Value) -> Result<(), String> {
    for part in [&mail.text, &mail.html] {
        if !part.contains("{{7*7}}") || !part.contains("{% if true %}X{% endif %}") {
            return Err(format!(
                "template syntax in the name was not kept literal: {part}"
            ));
        }
    }
    Ok(())
}

fn one_recipient(mail: &CapturedMail, _: &Value) -> Result<(), String> {
    let parsed = mail_parser::MessageParser::default().parse(&mail.raw);
    let to: Vec<String> = parsed
        .as_ref()
        .and_then(|m| m.to())
        .map(|a| {
            a.iter()
                .filter_map(|x| x.address().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let bcc = parsed
        .as_ref()
        .is_some_and(|m| m.bcc().is_some() || m.cc().is_some());
    if mail.to != ["address_in_name@example.com"] || to != ["address_in_name@example.com"] || bcc {
        return Err(format!(
            "the name changed the recipients: envelope {:?}, To {to:?}, header {:?}",
            mail.to, mail.to_header
        ));
    }
    Ok(())
}

fn in_english(mail: &CapturedMail, _: &Value) -> Result<(), String> {
    (mail.subject == "Confirm your email address")
        .then_some(())
        .ok_or_else(|| format!("not the en mail: {:?}", mail.subject))
}

fn in_chinese(mail: &CapturedMail, _: &Value) -> Result<(), String> {
    (mail.subject == "请确认您的邮箱地址")
        .then_some(())
        .ok_or_else(|| format!("not the zh-CN mail: {:?}", mail.subject))
}

fn context_echoed(_: &CapturedMail, outcome: &Value) -> Result<(), String> {
    let mut depth = 0;
    let mut v = &outcome["data"]["context"];
    while let Some(inner) = v.get("a") {
        depth += 1;
        v = inner;
    }
    (depth == 100)
        .then_some(())
        .ok_or_else(|| format!("context not echoed whole (depth {depth})"))
}

fn big_user_id(_: &CapturedMail, outcome: &Value) -> Result<(), String> {
    (outcome["data"]["user_id"] == "18446744073709551615")
        .then_some(())
        .ok_or_else(|| {
            format!(
                "user_id not echoed as its decimal string: {}",
                outcome["data"]
            )
        })
}

fn fine(_: &CapturedMail, _: &Value) -> Result<(), String> {
    Ok(())
}

fn hostile_requests() -> Vec<Case> {
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
fn unstorable_requests() -> Vec<Case> {
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

/// Publishes `cases`, waits for each one's answer, and checks it is exactly
/// the expected one and that nothing else happened.
async fn run_cases(label: &str, cases: Vec<Case>) {
    let started = Instant::now();
    let p = Pipeline::start(label).await;
    for c in &cases {
        p.publish_raw(&c.id, &c.body).await;
    }
    let answered: Vec<&Case> = cases
        .iter()
        .filter(|c| !matches!(c.expect, Expect::Dead(..)))
        .collect();
    let dead_expected = cases.len() - answered.len();
    let outcome_of = |all: &[Value], id: &str| -> Vec<Value> {
        all.iter()
            .filter(|e| {
                e["data"]["request_id"] == id
                    && e["type"] != VERIFICATION_REQUESTED
                    && e["type"]
                        .as_str()
                        .is_some_and(|t| t.starts_with("verimail.verification."))
            })
            .cloned()
            .collect()
    };
    p.tap
        .wait_until(WAIT, |all| {
            answered.iter().all(|c| !outcome_of(all, &c.id).is_empty())
        })
        .await;
    let deadline = Instant::now() + WAIT;
    let mut dead = peek_dead(&p.env).await;
    while dead.len() < dead_expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        dead = peek_dead(&p.env).await;
    }
    let sent_expected = cases
        .iter()
        .filter(|c| matches!(c.expect, Expect::Sent(_)))
        .count();
    p.smtp.wait_for_mails(sent_expected, WAIT).await;
    // Late extras (a second outcome, a stray mail) would come from a message
    // still queued or held: wait until none is.
    assert!(
        settled(&p.env, &p.tap, WAIT).await,
        "the deployment settles"
    );
    let all = p.tap.all();
    let mails = p.smtp.mails();
    let dead = peek_dead(&p.env).await;
    let mut failures = Vec::new();
    for c in &cases {
        let outcomes = outcome_of(&all, &c.id);
        let its_mails: Vec<&CapturedMail> =
            mails.iter().filter(|m| mail_request(m) == c.id).collect();
        let letters: Vec<&(String, String, String)> = dead.iter().filter(|l| l.0 == c.id).collect();
        let verdict: Result<String, String> = match &c.expect {
            Expect::Sent(check) => match (outcomes.as_slice(), its_mails.as_slice(), letters.len())
            {
                ([o], [m], 0) if o["type"] == VERIFICATION_SENT => {
                    check(m, o).map(|()| "sent".to_owned())
                }
                _ => Err(format!(
                    "expected one sent outcome and one mail, got {outcomes:?}, {} mail(s), {} letter(s)",
                    its_mails.len(),
                    letters.len()
                )),
            },
            Expect::Failed(reason, field) => {
                match (outcomes.as_slice(), its_mails.len(), letters.len()) {
                    ([o], 0, 0)
                        if o["type"] == VERIFICATION_FAILED
                            && o["data"]["reason"] == *reason
                            && o["data"]["detail"]
                                .as_str()
                                .is_some_and(|d| d.starts_with(&format!("{field}:"))) =>
                    {
                        Ok(format!(
                            "failed/{reason}: {}",
                            o["data"]["detail"]
                                .as_str()
                                .unwrap_or_default()
                                .chars()
                                .take(80)
                                .collect::<String>()
                        ))
                    }
                    _ => Err(format!(
                        "expected failed/{reason} naming {field}, got {outcomes:?}, {} mail(s), {} letter(s)",
                        its_mails.len(),
                        letters.len()
                    )),
                }
            }
            Expect::Dead(reason, detail) => {
                match (outcomes.len(), its_mails.len(), letters.as_slice()) {
                    (0, 0, [l]) if l.1 == *reason && l.2.contains(detail) => Ok(format!(
                        "dead/{reason}: {}",
                        l.2.chars().take(80).collect::<String>()
                    )),
                    _ => Err(format!(
                        "expected one {reason} letter mentioning {detail:?}, got {outcomes:?}, {} mail(s), letters {letters:?}",
                        its_mails.len()
                    )),
                }
            }
        };
        match verdict {
            Ok(what) => println!("[hostile] {:<22} {what}", c.name),
            Err(why) => {
                println!("[hostile] {:<22} WRONG: {why}", c.name);
                failures.push(format!("{}: {why}", c.name));
            }
        }
    }
    let stray_mails: Vec<String> = mails
        .iter()
        .filter(|m| {
            !cases
                .iter()
                .any(|c| matches!(c.expect, Expect::Sent(_)) && mail_request(m) == c.id)
        })
        .map(|m| format!("{:?} to {:?}", m.message_id, m.to))
        .collect();
    let evil = mails
        .iter()
        .filter(|m| m.to.iter().any(|t| t.contains("evil")))
        .count();
    println!(
        "[hostile] {label}: cases={} sent={} failed={} dead={} mails={} stray_mails={} mails_to_evil={evil} total_s={:.1}",
        cases.len(),
        sent_expected,
        answered.len() - sent_expected,
        dead.len(),
        mails.len(),
        stray_mails.len(),
        started.elapsed().as_secs_f64()
    );
    let logs = tail(&p.worker.log(), 30);
    assert!(
        failures.is_empty(),
        "{} case(s) answered wrongly:\n{}\n{logs}",
        failures.len(),
        failures.join("\n")
    );
    assert!(
        stray_mails.is_empty() && evil == 0,
        "mails nobody should get: {stray_mails:?}"
    );
    assert_eq!(
        dead.len(),
        dead_expected,
        "only the expected dead letters: {dead:?}"
    );
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_each_get_their_specific_answer_and_nothing_else() {
    run_cases("hostile", hostile_requests()).await;
}

/// PostgreSQL refuses NUL in text and jsonb (SQLSTATE 22021, 22P05). Were such
/// values to reach the claim, the worker would take the refusal for an outage
/// and hand the delivery back until the delivery limit; `shared::events`
/// refuses them up front (a NUL in `id`, a control character in `user_id`, a
/// NUL anywhere in `context`), which this test proves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_the_database_cannot_store_are_answered_not_retried_forever() {
    run_cases("unstorable", unstorable_requests()).await;
}

// ---------------------------------------------------------------------------
// Hostile links
// ---------------------------------------------------------------------------

/// A signer for `env`'s secret, or for another one.
fn signer(env: &TestEnv, secret: Option<&str>) -> Signer {
    let mut vars = env.vars.clone();
    if let Some(s) = secret {
        vars.insert("VERIMAIL_SECRET_KEY".into(), s.into());
    }
    let config = Config::from_lookup(|k| vars.get(k).cloned()).expect("test configuration");
    Signer::new(
        &config.keys().expect("a secret is set"),
        config.itsdangerous_digest,
    )
}

fn claims(
    request_id: &str,
    email: &str,
    purpose: &str,
    issued_at: OffsetDateTime,
    ttl: i64,
) -> Claims {
    Claims {
        request_id: request_id.into(),
        user_id: "u-1".into(),
        email: email.into(),
        purpose: purpose.into(),
        locale: None,
        issued_at,
        expires_at: issued_at + time::Duration::seconds(ttl),
    }
}

/// Replaces the character at `i` (from the end when negative) with another
/// URL-safe one.
fn flip(token: &str, i: isize) -> String {
    let mut b = token.as_bytes().to_vec();
    let at = if i < 0 {
        b.len() - i.unsigned_abs()
    } else {
        i.unsigned_abs()
    };
    b[at] = if b[at] == b'A' { b'B' } else { b'A' };
    String::from_utf8(b).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_tokens_get_400_never_5xx_and_confirm_nothing() {
    let started = Instant::now();
    let p = Pipeline::start("tokens").await;
    let body = event("real", json!({})).to_string().into_bytes();
    p.publish_raw("h-real", &body).await;
    let mails = p.smtp.wait_for_mails(1, WAIT).await;
    let link = mails
        .first()
        .and_then(|m| m.link.clone())
        .expect("a mail with a link");
    let good = link.rsplit('/').next().unwrap_or_default().to_owned();
    let ours = signer(&p.env, None);
    let theirs = signer(&p.env, Some("another-secret"));
    let now = OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .unwrap_or(OffsetDateTime::now_utc());

    // (name, path after /confirm/ as sent on the wire, expected status)
    let tokens: Vec<(&str, String, u16)> = vec![
        ("one_char", "x".into(), 400),
        ("bare_v1", "v1".into(), 400),
        ("only_dots", "v1....".into(), 400),
        ("unknown_kid", "v1.AAAAAAAA.AAAA.AAAA".into(), 400),
        ("flipped_signature", flip(&good, -1), 400),
        ("flipped_payload", flip(&good, 15), 400),
        ("extra_char", format!("{good}A"), 400),
        ("extra_part", format!("{good}.x"), 400),
        ("truncated", good[..good.len() - 10].to_owned(), 400),
        (
            "other_secret",
            theirs.mint_v1(&claims(
                "h-real",
                "real@example.com",
                "verify_email",
                now,
                3600,
            )),
            400,
        ),
        (
            "unknown_purpose",
            ours.mint_v1(&claims("h-real", "real@example.com", "admin", now, 3600)),
            400,
        ),
        (
            "nul_in_email",
            ours.mint_v1(&claims(
                "h-x",
                "a\u{0}@example.com",
                "verify_email",
                now,
                3600,
            )),
            400,
        ),
        (
            "nul_in_request_id",
            ours.mint_v1(&claims("\u{0}", "a@example.com", "verify_email", now, 3600)),
            400,
        ),
        (
            "crlf_in_email",
            ours.mint_v1(&claims(
                "h-y",
                "a@example.com\r\nX: y",
                "verify_email",
                now,
                3600,
            )),
            400,
        ),
        (
            "oversized_claims",
            ours.mint_v1(&claims(
                &"r".repeat(3500),
                "a@example.com",
                "verify_email",
                now,
                3600,
            )),
            400,
        ),
        (
            "expired",
            ours.mint_v1(&claims(
                "h-old",
                "old@example.com",
                "verify_email",
                now - time::Duration::hours(2),
                3600,
            )),
            410,
        ),
        (
            "itsdangerous_not_accepted",
            ours.mint_itsdangerous("real@example.com", now),
            400,
        ),
        (
            "itsdangerous_shape",
            "ImFAZXhhbXBsZS5jb20i.aGVsbG8.c2lnbmF0dXJl".into(),
            400,
        ),
        ("long_4k", "A".repeat(5000), 400),
        (
            "long_v1",
            format!(
                "v1.{}.{}.{}",
                "A".repeat(8),
                "A".repeat(4000),
                "A".repeat(43)
            ),
            400,
        ),
        ("bad_percent", "%FF%FE".into(), 400),
        ("nul", "%00".into(), 400),
        ("traversal", "..%2F..%2Fetc%2Fpasswd".into(), 400),
        ("script", "%3Cscript%3Ealert(1)%3C%2Fscript%3E".into(), 400),
        ("rtl_override", "v1.%E2%80%AE.x.y".into(), 400),
        ("cyrillic", "%D1%82%D0%BE%D0%BA%D0%B5%D0%BD".into(), 400),
        ("space", "v1.a%20b.c.d".into(), 400),
        ("sql", "v1'%20OR%201%3D1--".into(), 400),
        // Not a token at all: the route does not match.
        ("empty", String::new(), 404),
        ("two_segments", format!("{good}/x"), 404),
    ];
    let base = format!("{}/confirm/", p.env.gateway_url());
    let mut failures = Vec::new();
    for (name, path, want) in &tokens {
        let url = format!("{base}{path}");
        let mut seen = Vec::new();
        for method in ["GET", "POST", "HEAD"] {
            let answer = http::request(method, &url, &[("Accept", "application/json")]).await;
            match answer {
                Ok((code, _, body)) => {
                    seen.push(code);
                    let json_ok = method == "HEAD"
                        || *want == 404
                        || serde_json::from_str::<Value>(&body).is_ok_and(|v| {
                            v["status"] == if *want == 410 { "expired" } else { "invalid" }
                        });
                    if code != *want || !json_ok {
                        failures.push(format!(
                            "{name} {method}: {code} {}",
                            body.chars().take(120).collect::<String>()
                        ));
                    }
                }
                Err(e) => failures.push(format!("{name} {method}: no answer ({e})")),
            }
        }
        // The HTML page never reflects the token.
        if let Ok((_, _, page)) = http::get(&url, &[]).await
            && (page.contains("<script>alert") || (path.len() > 20 && page.contains(path.as_str())))
        {
            failures.push(format!("{name}: the page reflects the token"));
        }
        println!("[hostile] token {name:<26} {seen:?} (want {want})");
    }
    // Hostile headers around a bad and a good token: never a 5xx.
    let junk_language = "zz-ZZZZZZZZZZ;q=abc, ".repeat(400);
    let headers: [(&str, &str); 5] = [
        ("Accept-Language", junk_language.as_str()),
        ("Accept-Language", "*;q=NaN, ;;, -"),
        ("X-Forwarded-For", "not-an-ip, 999.1.1.1, ::::"),
        ("Accept", "application/json;q=0, text/html;q=abc, */*"),
        ("Content-Type", "application/json"),
    ];
    for (name, value) in headers {
        let bad = http::get(&format!("{base}{}", flip(&good, -1)), &[(name, value)]).await;
        let code = bad.as_ref().map(|a| a.0).unwrap_or(0);
        println!("[hostile] header {name:<25} bad token: {code}");
        if code != 400 {
            failures.push(format!("header {name} with a bad token: {code}"));
        }
    }
    // A URL longer than any server should take: refused, not a 5xx.
    let huge = http::get(&format!("{base}{}", "A".repeat(64 * 1024)), &[]).await;
    let huge_code = huge.as_ref().map(|a| a.0).unwrap_or(0);
    println!(
        "[hostile] token {:<26} {huge_code} (want 4xx or a closed connection)",
        "url_64k"
    );
    if huge_code >= 500 {
        failures.push(format!("url_64k: {huge_code}"));
    }

    // Nothing was confirmed, no event went out; the real link still works.
    let pool = sqlx::PgPool::connect(p.env.get("DATABASE_URL").unwrap_or_default())
        .await
        .expect("the test reaches its database");
    let confirmations: i64 = sqlx::query_scalar("SELECT count(*) FROM confirmations")
        .fetch_one(&pool)
        .await
        .expect("count");
    let verified_early = p.tap.of_type("verimail.email.verified").len();
    let real = http::post(&link, &[("Accept", "application/json")])
        .await
        .map(|a| a.0)
        .unwrap_or(0);
    let verified = p.tap.wait_for("verimail.email.verified", 1, WAIT).await;
    pool.close().await;
    println!(
        "[hostile] tokens: cases={} confirmations_after_hostile={confirmations} verified_after_hostile={verified_early} real_link={real} total_s={:.1}",
        tokens.len() + 1,
        started.elapsed().as_secs_f64()
    );
    assert!(
        failures.is_empty(),
        "{} wrong answer(s):\n{}\n{}",
        failures.len(),
        failures.join("\n"),
        tail(&p.gateway.log(), 20)
    );
    assert_eq!(
        (confirmations, verified_early),
        (0, 0),
        "a hostile token confirmed something"
    );
    assert_eq!(real, 200, "the real link still confirms");
    assert_eq!(verified.len(), 1, "one verified event, for the real link");
    p.stop().await;
}
