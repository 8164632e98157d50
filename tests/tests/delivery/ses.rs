//! SES through `aws-ses-v2-local`, an SES v2 emulator by others (`npm ci` in
//! `tests/node`): the mail arrives whole and SES's message id is kept.

use serde_json::Value;
use verimail_tests::env::free_port;

use crate::WAIT;
use crate::support::{Deployment, kind};

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
