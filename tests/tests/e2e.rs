//! End-to-end: the three real binaries as processes, the real RabbitMQ and
//! PostgreSQL, and an SMTP server inside the test. Each test has its own
//! namespace, database and ports, so they run in parallel.

use std::time::Duration;

use serde_json::Value;
use verimail_tests::env::TestEnv;
use verimail_tests::http::{self, header};
use verimail_tests::procs::{Proc, cli, migrate, ready_extra_worker, ready_gateway};
use verimail_tests::settle::settled;
use verimail_tests::smtp::SmtpServer;
use verimail_tests::tap::EventTap;

const WAIT: Duration = Duration::from_secs(45);

/// A running deployment: worker(s), gateway, SMTP server and a tap on every event.
struct Pipeline {
    env: TestEnv,
    smtp: SmtpServer,
    tap: EventTap,
    workers: Vec<Proc>,
    gateway: Proc,
}

impl Pipeline {
    async fn start(label: &str, workers: usize, tweak: impl FnOnce(&mut TestEnv)) -> Self {
        let mut env = TestEnv::new(label);
        let smtp = SmtpServer::start();
        env.set("MAIL_URL", smtp.mail_url());
        tweak(&mut env);
        migrate(&env).await;
        let tap = EventTap::everything(&env).await;
        let mut procs = Vec::new();
        for _ in 0..workers {
            // Each worker needs its own metrics port.
            procs.push(ready_extra_worker(&env, WAIT).await.0);
        }
        let gateway = ready_gateway(&env, WAIT).await;
        Self {
            env,
            smtp,
            tap,
            workers: procs,
            gateway,
        }
    }

    async fn publish(&self, args: &[&str]) -> String {
        let mut full = vec!["publish"];
        full.extend_from_slice(args);
        let (code, out, err) = cli(&full, &self.env).await;
        assert_eq!(code, 0, "verimail publish {args:?} failed: {err}");
        out.trim().to_owned()
    }

    async fn outcome_of(&self, request_id: &str) -> Value {
        let found = self
            .tap
            .wait_until(WAIT, |all| {
                all.iter().any(|e| {
                    e["data"]["request_id"] == request_id
                        && e["type"]
                            .as_str()
                            .is_some_and(|t| t.starts_with("verimail.verification."))
                        && e["type"] != "verimail.verification.requested"
                })
            })
            .await;
        found
            .into_iter()
            .find(|e| {
                e["data"]["request_id"] == request_id
                    && e["type"] != "verimail.verification.requested"
            })
            .unwrap_or_else(|| {
                panic!(
                    "no outcome for {request_id}; worker log:\n{}",
                    self.worker_logs()
                )
            })
    }

    fn worker_logs(&self) -> String {
        self.workers
            .iter()
            .map(Proc::log)
            .collect::<Vec<_>>()
            .join("\n---\n")
    }

    async fn stop(self) {
        // Every event the pipeline emitted keeps the published contract.
        for event in self.tap.all() {
            if let Err(e) = verimail_producer::schema::validate_value(&event) {
                panic!("an emitted event breaks docs/schemas: {e}\n{event}");
            }
        }
        for w in self.workers {
            assert_eq!(
                w.stop(Duration::from_secs(30)).await,
                Some(0),
                "worker exits 0 on SIGTERM"
            );
        }
        assert_eq!(
            self.gateway.stop(Duration::from_secs(30)).await,
            Some(0),
            "gateway exits 0 on SIGTERM"
        );
        self.env.cleanup().await;
    }
}

fn link_path(link: &str) -> String {
    // Links point at PUBLIC_BASE_URL, which is the gateway's address here.
    link.to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_travels_from_publish_to_mail_to_click_to_verified_event() {
    let p = Pipeline::start("loop", 1, |_| {}).await;
    let id = p
        .publish(&[
            "--user-id",
            "42",
            "--email",
            "alice@example.com",
            "--name",
            "Alice",
            "--locale",
            "zh-CN",
            "--context",
            r#"{"signup_flow":"b"}"#,
        ])
        .await;

    let sent = p.outcome_of(&id).await;
    assert_eq!(sent["type"], "verimail.verification.sent", "{sent}");
    assert_eq!(sent["data"]["user_id"], "42");
    assert_eq!(sent["data"]["context"]["signup_flow"], "b");

    let mails = p.smtp.wait_for_mails(1, WAIT).await;
    assert_eq!(mails.len(), 1);
    assert_eq!(mails[0].to, vec!["alice@example.com".to_owned()]);
    assert!(mails[0].html.contains("Alice"));
    let link = mails[0].link.clone().expect("a /confirm/ link in the mail");

    // Opening the link (as a mail scanner would) only shows the button.
    let page = http::get(&link_path(&link), &[]).await.expect("open");
    assert_eq!(page.0, 200, "{}", page.2);
    assert_eq!(header(&page, "referrer-policy"), Some("no-referrer"));
    assert!(
        page.2.contains("<form") && page.2.contains("method=\"post\""),
        "{}",
        page.2
    );
    assert!(
        settled(&p.env, &p.tap, WAIT).await,
        "the deployment settles"
    );
    assert!(p.tap.of_type("verimail.email.verified").is_empty());

    // Pressing the button confirms.
    let pressed = http::post(&link_path(&link), &[]).await.expect("press");
    assert_eq!(pressed.0, 200, "{}", pressed.2);

    let verified = p.tap.wait_for("verimail.email.verified", 1, WAIT).await;
    assert_eq!(verified.len(), 1);
    let v = &verified[0]["data"];
    assert_eq!(v["request_id"], id.as_str());
    assert_eq!(v["user_id"], "42");
    assert_eq!(v["email"], "alice@example.com");
    assert_eq!(v["purpose"], "verify_email");
    assert_eq!(v["context"]["signup_flow"], "b");

    // A second click: already verified, and no second event.
    let again = http::get(&link, &[("Accept", "application/json")])
        .await
        .expect("click");
    assert_eq!(again.0, 200);
    let body: Value = serde_json::from_str(&again.2).expect("JSON answer");
    assert_eq!(body["status"], "already_verified");
    assert!(
        settled(&p.env, &p.tap, WAIT).await,
        "the deployment settles"
    );
    assert_eq!(p.tap.of_type("verimail.email.verified").len(), 1);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_send_one_mail_for_simultaneous_requests_of_one_user() {
    let p = Pipeline::start("throttle", 3, |_| {}).await;
    let mut handles = Vec::new();
    for _ in 0..20 {
        let env = p.env.clone();
        handles.push(tokio::spawn(async move {
            let (code, out, err) = cli(
                &["publish", "--user-id", "7", "--email", "bob@example.com"],
                &env,
            )
            .await;
            assert_eq!(code, 0, "{err}");
            out.trim().to_owned()
        }));
    }
    let mut ids = Vec::new();
    for h in handles {
        ids.push(h.await.expect("publisher task"));
    }
    let all = p
        .tap
        .wait_until(WAIT, |all| {
            all.iter()
                .filter(|e| {
                    e["type"] == "verimail.verification.sent"
                        || e["type"] == "verimail.verification.throttled"
                })
                .count()
                >= ids.len()
        })
        .await;
    let sent = all
        .iter()
        .filter(|e| e["type"] == "verimail.verification.sent")
        .count();
    let throttled: Vec<&Value> = all
        .iter()
        .filter(|e| e["type"] == "verimail.verification.throttled")
        .collect();
    assert_eq!(sent, 1, "exactly one mail goes out");
    assert_eq!(throttled.len(), ids.len() - 1);
    assert!(
        throttled
            .iter()
            .all(|e| e["data"]["retry_after_seconds"].as_u64() >= Some(1))
    );
    assert!(
        settled(&p.env, &p.tap, WAIT).await,
        "the deployment settles"
    );
    assert_eq!(p.smtp.mails().len(), 1);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_event_id_published_twice_sends_one_mail_and_one_outcome() {
    let p = Pipeline::start("dup", 1, |_| {}).await;
    let args = [
        "--user-id",
        "9",
        "--email",
        "carol@example.com",
        "--id",
        "fixed-id-1",
    ];
    assert_eq!(p.publish(&args).await, "fixed-id-1");
    p.outcome_of("fixed-id-1").await;
    assert_eq!(p.publish(&args).await, "fixed-id-1");
    // Once every message is handled (none ready or unacknowledged), count.
    assert!(
        settled(&p.env, &p.tap, WAIT).await,
        "the deployment settles"
    );
    let outcomes = p
        .tap
        .all()
        .into_iter()
        .filter(|e| {
            e["data"]["request_id"] == "fixed-id-1"
                && e["type"] != "verimail.verification.requested"
        })
        .count();
    assert_eq!(outcomes, 1, "one outcome for one id");
    assert_eq!(p.smtp.mails().len(), 1, "one mail for one id");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_link_answers_410_and_a_tampered_one_400() {
    let p = Pipeline::start("expiry", 1, |env| {
        env.set("TOKEN_TTL_SECONDS", "2");
    })
    .await;
    let id = p
        .publish(&["--user-id", "5", "--email", "dave@example.com"])
        .await;
    p.outcome_of(&id).await;
    let link = p.smtp.wait_for_mails(1, WAIT).await[0]
        .link
        .clone()
        .expect("link");

    // Flip one character of the signature part.
    let mut tampered = link.clone().into_bytes();
    let last = tampered.len() - 1;
    tampered[last] = if tampered[last] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).expect("ascii");
    let bad = http::get(&tampered, &[]).await.expect("click");
    assert_eq!(bad.0, 400);

    tokio::time::sleep(Duration::from_secs(3)).await;
    let expired = http::get(&link, &[("Accept", "application/json")])
        .await
        .expect("click");
    assert_eq!(expired.0, 410);
    let body: Value = serde_json::from_str(&expired.2).expect("JSON");
    assert_eq!(body["status"], "expired");
    assert!(p.tap.of_type("verimail.email.verified").is_empty());
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_confirmed_link_redirects_to_an_allowlisted_return_url() {
    let p = Pipeline::start("redirect", 1, |env| {
        env.set("RETURN_URL_ALLOWLIST", "https://app.example.com");
    })
    .await;
    let id = p
        .publish(&[
            "--user-id",
            "11",
            "--email",
            "erin@example.com",
            "--return-url",
            "https://app.example.com/welcome?step=2",
        ])
        .await;
    p.outcome_of(&id).await;
    let link = p.smtp.wait_for_mails(1, WAIT).await[0]
        .link
        .clone()
        .expect("link");
    let answer = http::post(&link, &[]).await.expect("press");
    assert_eq!(answer.0, 303);
    let location = header(&answer, "location").unwrap_or_default();
    assert!(
        location.starts_with("https://app.example.com/welcome?"),
        "{location}"
    );
    assert!(
        location.contains("step=2") && location.contains("verimail=verified"),
        "{location}"
    );
    p.stop().await;
}

fn python(code: &str, args: &[&str]) -> String {
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(code)
        .args(args)
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn itsdangerous_links_work_in_both_directions() {
    let p = Pipeline::start("legacy", 1, |env| {
        env.set("TOKEN_FORMAT", "itsdangerous");
    })
    .await;
    let secret = p
        .env
        .get("VERIMAIL_SECRET_KEY")
        .unwrap_or_default()
        .to_owned();

    // verimail mints, Flask's itsdangerous accepts.
    let id = p
        .publish(&["--user-id", "21", "--email", "frank@example.com"])
        .await;
    p.outcome_of(&id).await;
    let link = p.smtp.wait_for_mails(1, WAIT).await[0]
        .link
        .clone()
        .expect("link");
    let token = link.rsplit('/').next().unwrap_or_default().to_owned();
    let loaded = python(
        "import sys; from itsdangerous import URLSafeTimedSerializer as S; \
         print(S(sys.argv[1]).loads(sys.argv[2], salt='email-confirm', max_age=3600))",
        &[&secret, &token],
    );
    assert_eq!(loaded, "frank@example.com");

    // Flask's itsdangerous mints, verimail's gateway accepts, and resolves the
    // address to the latest mail sent to it.
    let minted = python(
        "import sys; from itsdangerous import URLSafeTimedSerializer as S; \
         print(S(sys.argv[1]).dumps('frank@example.com', salt='email-confirm'))",
        &[&secret],
    );
    let answer = http::post(
        &format!("{}/confirm/{minted}", p.env.gateway_url()),
        &[("Accept", "application/json")],
    )
    .await
    .expect("click");
    assert_eq!(answer.0, 200, "{}", answer.2);
    let verified = p.tap.wait_for("verimail.email.verified", 1, WAIT).await;
    assert_eq!(verified[0]["data"]["email"], "frank@example.com");
    assert_eq!(verified[0]["data"]["user_id"], "21");
    assert_eq!(verified[0]["data"]["request_id"], id.as_str());
    p.stop().await;
}

/// The deliverability loop: a mail goes out, the provider reports a hard
/// bounce through its signed webhook (signed here with Python's hmac, as
/// Mailgun documents), the gateway suppresses the address and publishes the
/// bounce tied to the mail by our Message-ID; the next request for the
/// address ends `failed`/`suppressed` and nothing reaches the mail server;
/// once lifted with the CLI, the address is mailed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bounce_reported_by_webhook_suppresses_the_address_for_the_next_request() {
    const SIGNING_KEY: &str = "e2e-mailgun-signing-key-0123456789";
    let p = Pipeline::start("bounce", 1, |env| {
        env.set("WEBHOOK_SECRETS", format!("mailgun={SIGNING_KEY}"));
    })
    .await;
    let id = p
        .publish(&["--user-id", "77", "--email", "Dora@Example.com"])
        .await;
    assert_eq!(
        p.outcome_of(&id).await["type"],
        "verimail.verification.sent"
    );
    let mails = p.smtp.wait_for_mails(1, WAIT).await;
    let message_id = mails[0].message_id.clone().expect("our Message-ID");

    // Mailgun's "failed"/"permanent" event, as its webhook posts it.
    let token = "e2e0123456789abcdef0123456789abcdef0123456789abcd";
    // Signed now: the gateway refuses a signature more than 15 minutes old.
    let timestamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs().to_string())
        .unwrap_or_default();
    let timestamp = timestamp.as_str();
    let signature = python(
        "import sys, hmac, hashlib; \
         print(hmac.new(sys.argv[1].encode(), (sys.argv[2] + sys.argv[3]).encode(), hashlib.sha256).hexdigest())",
        &[SIGNING_KEY, timestamp, token],
    );
    let body = serde_json::json!({
        "signature": {"timestamp": timestamp, "token": token, "signature": signature},
        "event-data": {"event": "failed", "severity": "permanent", "reason": "bounce",
            "recipient": "dora@example.com", "timestamp": 1764950399.5, "log-level": "error",
            "id": "G9Bn5sl1TC6nu79C8C0bwg",
            "delivery-status": {"code": 550, "attempt-no": 1,
                "message": "550 5.1.1 The email account that you tried to reach does not exist",
                "description": ""},
            "message": {"headers": {"to": "dora@example.com", "message-id": message_id,
                "from": "no-reply@example.com", "subject": "Confirm"}}}
    })
    .to_string();
    let url = format!("{}/v1/webhooks/mailgun", p.env.gateway_url());
    let json = [("Content-Type", "application/json")];
    let forged = body.replace(&signature, &"0".repeat(64));
    let refused = http::post_body(&url, &json, forged.as_bytes())
        .await
        .expect("post");
    assert_eq!(refused.0, 401, "{}", refused.2);
    let answer = http::post_body(&url, &json, body.as_bytes())
        .await
        .expect("post");
    assert_eq!(answer.0, 200, "{}", answer.2);
    // The provider retries: one effect.
    let again = http::post_body(&url, &json, body.as_bytes())
        .await
        .expect("post");
    assert_eq!(again.0, 200, "{}", again.2);

    let bounced = p.tap.wait_for("verimail.email.bounced", 1, WAIT).await;
    assert_eq!(bounced.len(), 1);
    let b = &bounced[0]["data"];
    assert_eq!(b["email"], "dora@example.com");
    assert_eq!(b["provider"], "mailgun");
    assert_eq!(b["kind"], "hard");
    assert_eq!(b["request_id"], id.as_str(), "tied by our Message-ID");
    assert_eq!(b["user_id"], "77");

    let (code, out, err) = cli(
        &["suppression", "list", "--email", "DORA@example.com"],
        &p.env,
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let entry: Value = serde_json::from_str(out.trim()).expect("one JSON line");
    assert_eq!(
        (entry["reason"].as_str(), entry["source"].as_str()),
        (Some("bounce"), Some("mailgun"))
    );

    // The next request for the address: failed/suppressed, no mail.
    let next = p
        .publish(&["--user-id", "78", "--email", "dora@example.com"])
        .await;
    let failed = p.outcome_of(&next).await;
    assert_eq!(failed["type"], "verimail.verification.failed", "{failed}");
    assert_eq!(failed["data"]["reason"], "suppressed", "{failed}");
    assert!(
        failed["data"]["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("bounce")
    );
    assert!(
        settled(&p.env, &p.tap, WAIT).await,
        "the deployment settles"
    );
    assert_eq!(
        p.smtp.mails().len(),
        1,
        "nothing more reached the mail server"
    );
    assert_eq!(p.tap.of_type("verimail.email.bounced").len(), 1);

    // Lifted: mailed again.
    let (code, _, err) = cli(&["suppression", "remove", "dora@example.com"], &p.env).await;
    assert_eq!(code, 0, "{err}");
    let third = p
        .publish(&["--user-id", "79", "--email", "dora@example.com"])
        .await;
    assert_eq!(
        p.outcome_of(&third).await["type"],
        "verimail.verification.sent"
    );
    assert_eq!(p.smtp.wait_for_mails(2, WAIT).await.len(), 2);
    p.stop().await;
}

/// `WORKER_THREADS` sets the worker's runtime threads (one by default); a
/// bad value stops it at start with a message naming the variable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_runs_the_runtime_threads_worker_threads_asks_for() {
    let env = TestEnv::new("threads");
    migrate(&env).await;
    for (threads, expected) in [(None, 1), (Some("3"), 3)] {
        let mut wenv = env.clone();
        if let Some(n) = threads {
            wenv.set("WORKER_THREADS", n);
        }
        let (worker, _) = ready_extra_worker(&wenv, WAIT).await;
        let log = worker.log();
        let ready = log
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|l| l["message"] == "worker ready");
        assert_eq!(
            ready.map(|l| l["runtime_threads"].clone()),
            Some(Value::from(expected)),
            "{log}"
        );
        assert_eq!(worker.stop(Duration::from_secs(30)).await, Some(0));
    }
    let mut bad = env.clone();
    bad.set("WORKER_THREADS", "0");
    let mut worker = Proc::start("verimail-worker", &[], &bad);
    let deadline = std::time::Instant::now() + WAIT;
    while worker.is_running() {
        assert!(
            std::time::Instant::now() < deadline,
            "a bad WORKER_THREADS must stop the worker"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = worker.log();
    assert!(log.contains("WORKER_THREADS: must be at least 1"), "{log}");
    env.cleanup().await;
}
