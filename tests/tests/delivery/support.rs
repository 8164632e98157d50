//! The deployment every delivery test runs: workers on a fresh namespace and
//! database, a tap on every event, a producer; and the outcome in short.

use std::time::Duration;

use serde_json::Value;
use verimail_producer::{Producer, VerificationRequest};
use verimail_tests::env::TestEnv;
use verimail_tests::procs::{Proc, migrate, ready_extra_worker};
use verimail_tests::tap::EventTap;

use crate::WAIT;

/// Workers on a fresh namespace and database, a tap on every event, a producer.
pub struct Deployment {
    pub env: TestEnv,
    pub tap: EventTap,
    pub workers: Vec<Proc>,
    /// Each worker's `/metrics` address.
    pub metrics: Vec<String>,
    pub producer: Producer,
}

impl Deployment {
    pub async fn start(label: &str, workers: usize, tweak: impl FnOnce(&mut TestEnv)) -> Self {
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

    pub async fn add_worker(&mut self) {
        let (worker, addr) = ready_extra_worker(&self.env, WAIT).await;
        self.workers.push(worker);
        self.metrics.push(addr);
    }

    pub async fn publish(&self, id: &str, email: &str) {
        let request = VerificationRequest::new(format!("user-{id}"), email.to_owned())
            .name("Zoé Example")
            .id(id.to_owned());
        self.producer
            .request_verification(request)
            .await
            .expect("the request is published");
    }

    /// The outcome event of request `id`.
    pub async fn outcome(&self, id: &str) -> Value {
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

    pub fn logs(&self) -> String {
        self.workers
            .iter()
            .map(Proc::log)
            .collect::<Vec<_>>()
            .join("\n---\n")
    }

    pub async fn provider_message_id(&self, id: &str) -> Option<String> {
        let pool = sqlx::PgPool::connect(self.env.get("DATABASE_URL").unwrap_or_default())
            .await
            .expect("the database answers");
        let row: Option<(String,)> = sqlx::query_as(
            "SELECT provider_message_id FROM provider_messages WHERE request_id = $1",
        )
        .bind(id)
        .fetch_optional(&pool)
        .await
        .expect("the provider's id is read");
        pool.close().await;
        row.map(|r| r.0)
    }

    pub async fn stop(self) {
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

pub fn kind(outcome: &Value) -> (String, String) {
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
