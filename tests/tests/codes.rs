//! End-to-end: one-time codes (issue 16). The real worker and gateway(s) as
//! processes, the real RabbitMQ and PostgreSQL, an SMTP server inside the
//! test; the app's backend is played by `POST /v1/codes/verify` calls with
//! an API key.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Value, json};
use time::OffsetDateTime;
use verimail_shared::token::Signer;
use verimail_tests::env::{TestEnv, free_port};
use verimail_tests::http::{self, Answer, header};
use verimail_tests::procs::{Proc, cli, migrate, ready_gateway, ready_worker};
use verimail_tests::smtp::{CapturedMail, SmtpServer};
use verimail_tests::tap::EventTap;

const WAIT: Duration = Duration::from_secs(45);
const API_KEY: &str = "test-api-key-0123456789";

/// A worker, one or more gateways, an SMTP server and a tap on every event.
struct Deployment {
    env: TestEnv,
    smtp: SmtpServer,
    tap: EventTap,
    worker: Proc,
    /// Each gateway with its base URL.
    gateways: Vec<(Proc, String)>,
}

impl Deployment {
    async fn start(label: &str, gateways: usize, tweak: impl FnOnce(&mut TestEnv)) -> Self {
        let mut env = TestEnv::new(label);
        let smtp = SmtpServer::start();
        env.set("MAIL_URL", smtp.mail_url());
        env.set(
            "GATEWAY_API_KEYS",
            format!("old-key-0123456789abc,{API_KEY}"),
        );
        // A new request for the same user may be mailed at once.
        env.set("THROTTLE_SECONDS", "0");
        tweak(&mut env);
        migrate(&env).await;
        let tap = EventTap::everything(&env).await;
        let worker = ready_worker(&env, WAIT).await;
        let mut started = Vec::new();
        for i in 0..gateways {
            let mut genv = env.clone();
            if i > 0 {
                // Every further gateway on ports of its own, same database and namespace.
                genv.set("GATEWAY_ADDR", format!("127.0.0.1:{}", free_port()));
                genv.gateway_ops_addr = format!("127.0.0.1:{}", free_port());
            }
            let gateway = ready_gateway(&genv, WAIT).await;
            let url = format!("http://{}", genv.get("GATEWAY_ADDR").unwrap_or_default());
            started.push((gateway, url));
        }
        Self {
            env,
            smtp,
            tap,
            worker,
            gateways: started,
        }
    }

    /// Publishes a request; returns its id.
    async fn publish(&self, args: &[&str]) -> String {
        let mut full = vec!["publish"];
        full.extend_from_slice(args);
        let (code, out, err) = cli(&full, &self.env).await;
        assert_eq!(code, 0, "verimail publish {args:?} failed: {err}");
        out.trim().to_owned()
    }

    /// Publishes a request and returns its id and the mail it produced (the
    /// `sent` outcome first, so the code's hash is stored by then).
    async fn request_mail(&self, args: &[&str]) -> (String, CapturedMail) {
        let before = self.smtp.count();
        let id = self.publish(args).await;
        let found = self
            .tap
            .wait_until(WAIT, |all| {
                all.iter().any(|e| {
                    e["data"]["request_id"] == id.as_str()
                        && e["type"] == "verimail.verification.sent"
                })
            })
            .await;
        assert!(
            found.iter().any(|e| e["data"]["request_id"] == id.as_str()
                && e["type"] == "verimail.verification.sent"),
            "no sent outcome for {id}; worker log:\n{}",
            self.worker.log()
        );
        let mails = self.smtp.wait_for_mails(before + 1, WAIT).await;
        let mail = mails
            .get(before)
            .cloned()
            .unwrap_or_else(|| panic!("no mail for {id}"));
        (id, mail)
    }

    /// `POST /v1/codes/verify` on gateway `g` with `body` and the API key.
    async fn check_on(&self, g: usize, body: &Value) -> (u16, Value) {
        let url = format!("{}/v1/codes/verify", self.gateways[g].1);
        let auth = format!("Bearer {API_KEY}");
        let answer = http::post_body(
            &url,
            &[
                ("Authorization", &auth),
                ("Content-Type", "application/json"),
            ],
            body.to_string().as_bytes(),
        )
        .await
        .expect("code check");
        decode(&answer)
    }

    async fn check(&self, body: &Value) -> (u16, Value) {
        self.check_on(0, body).await
    }

    /// The verified events of request `id`.
    fn verified_of(&self, id: &str) -> Vec<Value> {
        self.tap
            .of_type("verimail.email.verified")
            .into_iter()
            .filter(|e| e["data"]["request_id"] == id)
            .collect()
    }

    /// Waits for the verified event of request `id`.
    async fn wait_verified(&self, id: &str) -> Value {
        let all = self
            .tap
            .wait_until(WAIT, |all| {
                all.iter().any(|e| {
                    e["type"] == "verimail.email.verified" && e["data"]["request_id"] == id
                })
            })
            .await;
        all.into_iter()
            .find(|e| e["type"] == "verimail.email.verified" && e["data"]["request_id"] == id)
            .unwrap_or_else(|| {
                panic!(
                    "no verified event for {id}; gateway log:\n{}",
                    self.gateways[0].0.log()
                )
            })
    }

    /// A positive signal that every event published before now has reached
    /// the tap: a fresh request confirmed by its link, and its event seen.
    /// Events go out in order through one relay per gateway, so anything
    /// emitted earlier by gateway 0 is in the tap once this one is.
    async fn barrier(&self) {
        let user = format!("barrier-{}", uuid::Uuid::new_v4().simple());
        let (id, mail) = self
            .request_mail(&["--user-id", &user, "--email", "barrier@example.com"])
            .await;
        if let Some(link) = mail.link {
            let pressed = http::post(&link, &[]).await.expect("press");
            assert_eq!(pressed.0, 200, "{}", pressed.2);
        } else {
            let code = code_in(&mail.text).expect("a code in the barrier mail");
            let (status, body) = self.check(&json!({"user_id": user, "code": code})).await;
            assert_eq!(status, 200, "{body}");
        }
        self.wait_verified(&id).await;
    }

    async fn stop(self) {
        for event in self.tap.all() {
            if let Err(e) = verimail_producer::schema::validate_value(&event) {
                panic!("an emitted event breaks docs/schemas: {e}\n{event}");
            }
        }
        let logs: String = std::iter::once(self.worker.log())
            .chain(self.gateways.iter().map(|(g, _)| g.log()))
            .collect();
        self.codes_never_logged(&logs);
        assert_eq!(
            self.worker.stop(Duration::from_secs(30)).await,
            Some(0),
            "worker exits 0 on SIGTERM"
        );
        for (g, _) in self.gateways {
            assert_eq!(
                g.stop(Duration::from_secs(30)).await,
                Some(0),
                "gateway exits 0 on SIGTERM"
            );
        }
        self.env.cleanup().await;
    }

    /// No code mailed during the test appears in any log line, as a value
    /// of its own (a bare digit run could also be part of a timestamp).
    fn codes_never_logged(&self, logs: &str) {
        for mail in self.smtp.mails() {
            if let Some(code) = code_in(&mail.text) {
                for shape in [
                    format!("\"{code}\""),
                    format!("={code}"),
                    format!(" {code} "),
                ] {
                    assert!(!logs.contains(&shape), "the code {code} was logged");
                }
            }
        }
    }
}

fn decode(answer: &Answer) -> (u16, Value) {
    let body = serde_json::from_str(&answer.2)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {} {}", answer.0, answer.2));
    (answer.0, body)
}

/// The code in a mail's text part: a line of its own holding only 6-10 digits.
fn code_in(text: &str) -> Option<String> {
    text.lines()
        .map(str::trim)
        .find(|l| (6..=10).contains(&l.len()) && l.bytes().all(|b| b.is_ascii_digit()))
        .map(str::to_owned)
}

/// A code of the same length that is not `code`.
fn wrong(code: &str, n: u64) -> String {
    let len = code.len() as u32;
    let modulus = 10u64.pow(len);
    let right: u64 = code.parse().unwrap_or(0);
    let guess = (right + 1 + n % (modulus - 1)) % modulus;
    format!("{guess:0width$}", width = len as usize)
}

/// Whether the HTML part shows `code` large (a font of at least 24 px on the
/// element holding it).
fn shown_large(html: &str, code: &str) -> bool {
    html.lines().filter(|l| l.contains(code)).any(|l| {
        l.split("font-size:")
            .skip(1)
            .filter_map(|rest| rest.split("px").next()?.trim().parse::<u32>().ok())
            .any(|px| px >= 24)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mailed_code_verifies_once_and_wrong_codes_count_down_to_a_lock() {
    let d = Deployment::start("codes", 1, |env| {
        env.set("CODE_MAX_ATTEMPTS", "3");
    })
    .await;

    // The mail carries the link and, on a line of its own, the code; the
    // HTML part shows the same code large.
    let (id, mail) = d
        .request_mail(&[
            "--user-id",
            "42",
            "--email",
            "alice@example.com",
            "--name",
            "Alice",
            "--context",
            r#"{"signup_flow":"b"}"#,
        ])
        .await;
    let code = code_in(&mail.text).unwrap_or_else(|| panic!("no code line in:\n{}", mail.text));
    assert_eq!(code.len(), 6);
    assert!(shown_large(&mail.html, &code), "{}", mail.html);
    let link = mail
        .link
        .clone()
        .expect("CONFIRM_METHOD=both mails the link too");

    // The caller: no key, a wrong key, another scheme.
    let url = format!("{}/v1/codes/verify", d.gateways[0].1);
    let body = json!({"user_id": "42", "code": code}).to_string();
    for auth in [
        None,
        Some("Bearer wrong-key-0123456789"),
        Some("Basic dGVzdA=="),
    ] {
        let headers: Vec<(&str, &str)> = auth.map(|a| ("Authorization", a)).into_iter().collect();
        let answer = http::post_body(&url, &headers, body.as_bytes())
            .await
            .expect("unauthorized check");
        let (status, json) = decode(&answer);
        assert_eq!(status, 401, "{json}");
        assert_eq!(
            json,
            json!({"status": "unauthorized"}),
            "nothing else revealed"
        );
        assert_eq!(header(&answer, "www-authenticate"), Some("Bearer"));
    }
    // Every configured key works (rotation keeps the old one for a while).
    let answer = http::post_body(
        &url,
        &[("Authorization", "Bearer old-key-0123456789abc")],
        br#"{"user_id": "nobody", "code": "123456"}"#,
    )
    .await
    .expect("old key");
    assert_eq!(decode(&answer).0, 404);

    // Malformed bodies: 400 with what is wrong.
    for (bad, says) in [
        (json!("not an object"), "body"),
        (json!({"code": code}), "user_id"),
        (json!({"user_id": "42"}), "code"),
        (json!({"user_id": "42", "code": "12ab56"}), "code"),
        (
            json!({"user_id": "42", "code": code, "purpose": "welcome"}),
            "purpose",
        ),
    ] {
        let (status, json) = d.check(&bad).await;
        assert_eq!(status, 400, "{bad}: {json}");
        assert_eq!(json["status"], "invalid");
        assert!(
            json["detail"].as_str().is_some_and(|t| t.starts_with(says)),
            "{bad}: {json}"
        );
    }
    let answer = http::post_body(
        &url,
        &[("Authorization", &format!("Bearer {API_KEY}"))],
        b"{not json",
    )
    .await
    .expect("bad json");
    assert_eq!(decode(&answer).0, 400);

    // No mail for this user, or for this purpose: 404.
    let (status, json) = d.check(&json!({"user_id": 43, "code": code})).await;
    assert_eq!((status, json), (404, json!({"status": "no_code"})));
    let (status, _) = d
        .check(&json!({"user_id": "42", "purpose": "reset_password", "code": code}))
        .await;
    assert_eq!(status, 404);

    // Wrong codes count down; the body names the mail.
    for left in [2, 1] {
        let (status, json) = d
            .check(&json!({"user_id": 42, "code": wrong(&code, left)}))
            .await;
        assert_eq!(status, 422, "{json}");
        assert_eq!(json["status"], "wrong_code");
        assert_eq!(json["attempts_left"], left);
        assert_eq!(json["request_id"], id.as_str());
        assert_eq!(json["email"], "alice@example.com");
        assert_eq!(json["user_id"], "42");
        assert_eq!(json["purpose"], "verify_email");
    }

    // The right code (one try left) verifies, and the event says how.
    let (status, json) = d.check(&json!({"user_id": 42, "code": code})).await;
    assert_eq!(status, 200, "{json}");
    assert_eq!(
        json,
        json!({"status": "verified", "user_id": "42", "email": "alice@example.com",
               "purpose": "verify_email", "request_id": id})
    );
    let event = d.wait_verified(&id).await;
    assert_eq!(event["data"]["method"], "code");
    assert_eq!(event["data"]["user_id"], "42");
    assert_eq!(event["data"]["email"], "alice@example.com");
    assert_eq!(event["data"]["context"]["signup_flow"], "b");

    // Again by code, then by the link of the same mail: already verified.
    let (status, json) = d.check(&json!({"user_id": "42", "code": code})).await;
    assert_eq!((status, &json["status"]), (200, &json!("already_verified")));
    let pressed = http::post(&link, &[("Accept", "application/json")])
        .await
        .expect("press");
    assert_eq!(pressed.0, 200, "{}", pressed.2);
    assert!(pressed.2.contains("already_verified"), "{}", pressed.2);
    // One event for the mail, whatever came after.
    d.barrier().await;
    assert_eq!(d.verified_of(&id).len(), 1);

    // Another user: the last allowed wrong try answers 422 with nothing
    // left, then the code is dead even for the right digits.
    let (first_id, mail) = d
        .request_mail(&["--user-id", "45", "--email", "bob@example.com"])
        .await;
    let first_code = code_in(&mail.text).expect("a code");
    for left in [2, 1, 0] {
        let (status, json) = d
            .check(&json!({"user_id": "45", "code": wrong(&first_code, left)}))
            .await;
        assert_eq!(
            (status, &json["attempts_left"]),
            (422, &json!(left)),
            "{json}"
        );
    }
    let (status, json) = d
        .check(&json!({"user_id": "45", "code": wrong(&first_code, 7)}))
        .await;
    assert_eq!((status, &json["status"]), (410, &json!("locked")), "{json}");
    assert_eq!(json["request_id"], first_id.as_str());
    let (status, json) = d.check(&json!({"user_id": "45", "code": first_code})).await;
    assert_eq!((status, &json["status"]), (410, &json!("locked")), "{json}");

    // A new request mails a new code, which works.
    let (second_id, mail) = d
        .request_mail(&["--user-id", "45", "--email", "bob@example.com"])
        .await;
    let second_code = code_in(&mail.text).expect("a code");
    let (status, json) = d
        .check(&json!({"user_id": "45", "code": second_code}))
        .await;
    assert_eq!(status, 200, "{json}");
    assert_eq!(json["request_id"], second_id.as_str());
    assert_eq!(d.wait_verified(&second_id).await["data"]["method"], "code");
    assert!(d.verified_of(&first_id).is_empty());

    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_password_code_answers_a_proof_and_spends_the_link_and_the_other_way_round() {
    let d = Deployment::start("codes-reset", 1, |env| {
        env.set("RETURN_URL_ALLOWLIST", "https://app.example.com");
    })
    .await;
    let signer = Signer::new(
        &d.env.config().keys().expect("keys"),
        d.env.config().itsdangerous_digest,
    );
    let reset = |user: &'static str| {
        [
            "--user-id",
            user,
            "--email",
            "carol@example.com",
            "--purpose",
            "reset_password",
            "--return-url",
            "https://app.example.com/reset",
        ]
    };

    // Code first: 200 with the PROOF a redirect would carry; the link is spent.
    let (id, mail) = d.request_mail(&reset("50")).await;
    let code = code_in(&mail.text).expect("a code");
    let link = mail.link.clone().expect("a link");
    let (status, json) = d
        .check(&json!({"user_id": "50", "purpose": "reset_password", "code": code}))
        .await;
    assert_eq!(
        (status, &json["status"]),
        (200, &json!("verified")),
        "{json}"
    );
    let proof = json["proof"].as_str().expect("a proof");
    let payload = signer
        .verify_proof(proof, OffsetDateTime::now_utc())
        .expect("the proof verifies like a redirect's");
    assert_eq!(payload.request_id.as_deref(), Some(id.as_str()));
    assert_eq!(payload.user_id.as_deref(), Some("50"));
    assert_eq!(payload.email, "carol@example.com");
    assert_eq!(payload.purpose, "reset_password");
    assert_eq!(d.wait_verified(&id).await["data"]["method"], "code");
    let pressed = http::post(&link, &[]).await.expect("press");
    assert_eq!(pressed.0, 410, "the link of a used code is spent");
    assert!(header(&pressed, "location").is_none());
    // The code again (right or wrong): used, never a second proof.
    for try_code in [code.clone(), wrong(&code, 1)] {
        let (status, json) = d
            .check(&json!({"user_id": "50", "purpose": "reset_password", "code": try_code}))
            .await;
        assert_eq!((status, &json["status"]), (410, &json!("used")), "{json}");
        assert!(json.get("proof").is_none());
    }

    // Link first: the redirect carries the proof; the code is spent.
    let (other, mail) = d.request_mail(&reset("51")).await;
    let code = code_in(&mail.text).expect("a code");
    let pressed = http::post(&mail.link.clone().expect("a link"), &[])
        .await
        .expect("press");
    assert_eq!(pressed.0, 303, "{}", pressed.2);
    assert!(header(&pressed, "location").is_some_and(|l| l.contains("verimail_proof=")));
    let (status, json) = d
        .check(&json!({"user_id": "51", "purpose": "reset_password", "code": code}))
        .await;
    assert_eq!((status, &json["status"]), (410, &json!("used")), "{json}");
    assert!(json.get("proof").is_none());
    assert_eq!(d.wait_verified(&other).await["data"]["method"], "link");

    // Link and code at the same instant: one of them confirms, the other
    // hears `used`, and one event goes out.
    let (raced, mail) = d.request_mail(&reset("52")).await;
    let code = code_in(&mail.text).expect("a code");
    let link = mail.link.clone().expect("a link");
    let body = json!({"user_id": "52", "purpose": "reset_password", "code": code});
    let (pressed, (status, json)) = tokio::join!(http::post(&link, &[]), d.check(&body));
    let pressed = pressed.expect("press").0;
    let winners = usize::from(pressed == 303) + usize::from(status == 200);
    assert_eq!(winners, 1, "link {pressed}, code {status} {json}");
    assert!(
        pressed == 410 || status == 410,
        "link {pressed}, code {status}"
    );

    d.barrier().await;
    assert_eq!(d.verified_of(&id).len(), 1);
    assert_eq!(d.verified_of(&other).len(), 1);
    assert_eq!(d.verified_of(&raced).len(), 1);
    d.stop().await;
}

/// `examples/python/check_code.py`, run as its docstring says, against a
/// live gateway: a wrong code is refused with exit 1 and the right one
/// verifies with exit 0, as an app's backend would see it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_example_checks_a_mailed_code_as_an_app_backend_would() {
    let d = Deployment::start("codes-python", 1, |_| {}).await;
    let (id, mail) = d
        .request_mail(&["--user-id", "31", "--email", "eve@example.com"])
        .await;
    let code = code_in(&mail.text).unwrap_or_else(|| panic!("no code line in:\n{}", mail.text));
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/python/check_code.py"
    );
    let run = |typed: String| {
        let gateway = d.gateways[0].1.clone();
        async move {
            let out = tokio::process::Command::new("python3")
                .arg(script)
                .args(["31", &typed])
                .env("VERIMAIL_GATEWAY", gateway)
                .env("VERIMAIL_API_KEY", API_KEY)
                .output()
                .await
                .expect("python3 runs");
            (
                out.status.code(),
                String::from_utf8_lossy(&out.stdout).into_owned(),
            )
        }
    };
    let (exit, out) = run(wrong(&code, 1)).await;
    assert_eq!(exit, Some(1), "{out}");
    assert!(
        out.starts_with("422 ") && out.contains("wrong_code"),
        "{out}"
    );
    let (exit, out) = run(code.clone()).await;
    assert_eq!(exit, Some(0), "{out}");
    assert!(
        out.starts_with("200 ") && out.contains("\"verified\""),
        "{out}"
    );
    assert_eq!(d.wait_verified(&id).await["data"]["method"], "code");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_confirm_method_code_the_mail_has_a_code_and_no_link() {
    let d = Deployment::start("codes-only", 1, |env| {
        env.set("CONFIRM_METHOD", "code");
        env.set("CODE_LENGTH", "8");
    })
    .await;
    let (id, mail) = d
        .request_mail(&[
            "--user-id",
            "7",
            "--email",
            "dan@example.com",
            "--locale",
            "zh-CN",
        ])
        .await;
    let code = code_in(&mail.text).unwrap_or_else(|| panic!("no code line in:\n{}", mail.text));
    assert_eq!(code.len(), 8);
    assert!(mail.text.contains("验证码"), "{}", mail.text);
    assert!(shown_large(&mail.html, &code), "{}", mail.html);
    assert!(mail.link.is_none(), "{}", mail.text);
    for part in [&mail.text, &mail.html] {
        assert!(!part.contains("/confirm/"), "{part}");
        assert!(!part.contains("href"), "{part}");
    }

    // The same request published again: the worker sees the duplicate (its
    // metric is the signal to wait for), mails nothing, and the one code
    // mailed is still the one that works.
    let again = d
        .publish(&["--id", &id, "--user-id", "7", "--email", "dan@example.com"])
        .await;
    assert_eq!(again, id);
    let metrics = format!(
        "http://{}/metrics",
        d.env.get("METRICS_ADDR").unwrap_or_default()
    );
    let seen = verimail_tests::tap::eventually(WAIT, || async {
        let text = http::get(&metrics, &[]).await.ok()?.2;
        text.contains(r#"verimail_worker_duplicates_total{state="done"} 1"#)
            .then_some(())
    })
    .await;
    assert!(seen.is_some(), "the worker never saw the duplicate");
    assert_eq!(d.smtp.count(), 1, "a duplicate mails no second code");

    let (status, json) = d.check(&json!({"user_id": 7, "code": code})).await;
    assert_eq!(
        (status, &json["status"]),
        (200, &json!("verified")),
        "{json}"
    );
    assert_eq!(d.wait_verified(&id).await["data"]["method"], "code");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_guesses_through_three_gateways_count_at_most_the_limit() {
    const GUESSES: u64 = 10_000;
    const CONCURRENCY: u64 = 48;
    let d = Deployment::start("codes-brute", 3, |env| {
        env.set("CODE_MAX_ATTEMPTS", "5");
        // One client address makes every guess: the limit must not be
        // what stops them here, the attempt counter must.
        env.set("CONFIRM_RATE_LIMIT_PER_MINUTE", "10000000");
    })
    .await;
    let (id, mail) = d
        .request_mail(&["--user-id", "60", "--email", "eve-target@example.com"])
        .await;
    let code = code_in(&mail.text).expect("a code");

    // 48 workers share the guesses, each sending to the three gateways in turn.
    let d = std::sync::Arc::new(d);
    let mut tasks = Vec::new();
    for w in 0..CONCURRENCY {
        let d = d.clone();
        let code = code.clone();
        tasks.push(tokio::spawn(async move {
            let mut seen: Vec<(u16, String, Option<u64>)> = Vec::new();
            let mut n = w;
            while n < GUESSES {
                let g = usize::try_from(n % 3).unwrap_or(0);
                let (status, json) = d
                    .check_on(g, &json!({"user_id": "60", "code": wrong(&code, n)}))
                    .await;
                seen.push((
                    status,
                    json["status"].as_str().unwrap_or_default().to_owned(),
                    json["attempts_left"].as_u64(),
                ));
                n += CONCURRENCY;
            }
            seen
        }));
    }
    let mut by_answer: BTreeMap<(u16, String), u64> = BTreeMap::new();
    let mut left: Vec<u64> = Vec::new();
    for t in tasks {
        for (status, word, attempts_left) in t.await.expect("guessing task") {
            *by_answer.entry((status, word)).or_default() += 1;
            left.extend(attempts_left);
        }
    }
    // Exactly the allowed tries were counted, each remaining count once;
    // every other guess found the code locked.
    left.sort_unstable();
    assert_eq!(left, [0, 1, 2, 3, 4], "{by_answer:?}");
    assert_eq!(
        by_answer,
        BTreeMap::from([
            ((410, "locked".to_owned()), GUESSES - 5),
            ((422, "wrong_code".to_owned()), 5),
        ])
    );
    // The database agrees: five tries, not one more.
    let pool = sqlx::PgPool::connect(d.env.get("DATABASE_URL").unwrap_or_default())
        .await
        .expect("database");
    let tries: i32 = sqlx::query_scalar("SELECT code_attempts FROM requests WHERE id = $1")
        .bind(&id)
        .fetch_one(&pool)
        .await
        .expect("the request row");
    pool.close().await;
    assert_eq!(tries, 5);

    // The operator sees the guessing in the metrics, by status only.
    let metrics = http::get(&format!("{}/metrics", d.env.gateway_ops_url()), &[])
        .await
        .expect("metrics");
    assert!(
        metrics
            .2
            .contains(r#"verimail_gateway_code_checks_total{status="locked"}"#),
        "{}",
        metrics.2
    );
    assert!(
        !metrics.2.contains(&format!("\"{code}\"")),
        "the code is a metric label"
    );

    // The right code is dead now, on every gateway.
    for g in 0..3 {
        let (status, json) = d.check_on(g, &json!({"user_id": "60", "code": code})).await;
        assert_eq!((status, &json["status"]), (410, &json!("locked")), "{json}");
    }
    // A new request mails a new code that works.
    let (new_id, mail) = d
        .request_mail(&["--user-id", "60", "--email", "eve-target@example.com"])
        .await;
    let new_code = code_in(&mail.text).expect("a code");
    let (status, json) = d
        .check_on(2, &json!({"user_id": "60", "code": new_code}))
        .await;
    assert_eq!(
        (status, &json["request_id"]),
        (200, &json!(new_id)),
        "{json}"
    );
    assert_eq!(d.wait_verified(&new_id).await["data"]["method"], "code");
    assert!(d.verified_of(&id).is_empty());

    let d = std::sync::Arc::try_unwrap(d).unwrap_or_else(|_| panic!("tasks still hold it"));
    d.stop().await;
}
