//! The deployment every code test runs (a worker, one or more gateways, an
//! SMTP server, a tap on every event), the app backend's check call, and the
//! code helpers: find it in a mail, make a wrong one, see it shown large.

use std::time::Duration;

use serde_json::{Value, json};
use verimail_tests::env::{TestEnv, free_port};
use verimail_tests::http::{self, Answer};
use verimail_tests::procs::{Proc, cli, migrate, ready_gateway, ready_worker};
use verimail_tests::smtp::{CapturedMail, SmtpServer};
use verimail_tests::tap::EventTap;

use crate::{API_KEY, WAIT};

/// A worker, one or more gateways, an SMTP server and a tap on every event.
pub struct Deployment {
    pub env: TestEnv,
    pub smtp: SmtpServer,
    pub tap: EventTap,
    pub worker: Proc,
    /// Each gateway with its base URL.
    pub gateways: Vec<(Proc, String)>,
}

impl Deployment {
    pub async fn start(label: &str, gateways: usize, tweak: impl FnOnce(&mut TestEnv)) -> Self {
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
    pub async fn publish(&self, args: &[&str]) -> String {
        let mut full = vec!["publish"];
        full.extend_from_slice(args);
        let (code, out, err) = cli(&full, &self.env).await;
        assert_eq!(code, 0, "verimail publish {args:?} failed: {err}");
        out.trim().to_owned()
    }

    /// Publishes a request and returns its id and the mail it produced (the
    /// `sent` outcome first, so the code's hash is stored by then).
    pub async fn request_mail(&self, args: &[&str]) -> (String, CapturedMail) {
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
    pub async fn check_on(&self, g: usize, body: &Value) -> (u16, Value) {
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

    pub async fn check(&self, body: &Value) -> (u16, Value) {
        self.check_on(0, body).await
    }

    /// The verified events of request `id`.
    pub fn verified_of(&self, id: &str) -> Vec<Value> {
        self.tap
            .of_type("verimail.email.verified")
            .into_iter()
            .filter(|e| e["data"]["request_id"] == id)
            .collect()
    }

    /// Waits for the verified event of request `id`.
    pub async fn wait_verified(&self, id: &str) -> Value {
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
    pub async fn barrier(&self) {
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

    pub async fn stop(self) {
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

pub fn decode(answer: &Answer) -> (u16, Value) {
    let body = serde_json::from_str(&answer.2)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {} {}", answer.0, answer.2));
    (answer.0, body)
}

/// The code in a mail's text part: a line of its own holding only 6-10 digits.
pub fn code_in(text: &str) -> Option<String> {
    text.lines()
        .map(str::trim)
        .find(|l| (6..=10).contains(&l.len()) && l.bytes().all(|b| b.is_ascii_digit()))
        .map(str::to_owned)
}

/// A code of the same length that is not `code`.
pub fn wrong(code: &str, n: u64) -> String {
    let len = code.len() as u32;
    let modulus = 10u64.pow(len);
    let right: u64 = code.parse().unwrap_or(0);
    let guess = (right + 1 + n % (modulus - 1)) % modulus;
    format!("{guess:0width$}", width = len as usize)
}

/// Whether the HTML part shows `code` large (a font of at least 24 px on the
/// element holding it).
pub fn shown_large(html: &str, code: &str) -> bool {
    html.lines().filter(|l| l.contains(code)).any(|l| {
        l.split("font-size:")
            .skip(1)
            .filter_map(|rest| rest.split("px").next()?.trim().parse::<u32>().ok())
            .any(|px| px >= 24)
    })
}
