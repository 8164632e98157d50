//! The deployment every hostile case runs against (a worker, a gateway, an
//! SMTP server, a tap and a raw publisher), and a look at the dead letters
//! that leaves them in place.

use std::time::Duration;

use lapin::options::BasicGetOptions;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use verimail_shared::bus::{Bus, Outgoing, Publisher, Topology, dead_letter_reason};
use verimail_shared::events::VERIFICATION_REQUESTED;
use verimail_tests::env::TestEnv;
use verimail_tests::procs::{Proc, migrate, ready_gateway, ready_worker};
use verimail_tests::smtp::SmtpServer;
use verimail_tests::tap::EventTap;

use crate::{APP, WAIT};

/// A worker, a gateway, an SMTP server, a tap and a raw publisher.
pub struct Pipeline {
    pub env: TestEnv,
    pub smtp: SmtpServer,
    pub tap: EventTap,
    pub worker: Proc,
    pub gateway: Proc,
    pub topology: Topology,
    pub publisher: Publisher,
    pub bus_stop: CancellationToken,
}

impl Pipeline {
    pub async fn start(label: &str) -> Self {
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
    pub async fn publish_raw(&self, id: &str, body: &[u8]) {
        let msg = Outgoing::event(&self.topology, VERIFICATION_REQUESTED, id, body);
        self.publisher
            .publish(&msg)
            .await
            .unwrap_or_else(|e| panic!("publishing {id} failed: {e}"));
    }

    pub async fn stop(self) {
        self.bus_stop.cancel();
        self.publisher.bus().close().await;
        let worker = self.worker.stop(Duration::from_secs(30)).await;
        let gateway = self.gateway.stop(Duration::from_secs(30)).await;
        self.env.cleanup().await;
        assert_eq!(worker, Some(0), "worker exits 0 on SIGTERM");
        assert_eq!(gateway, Some(0), "gateway exits 0 on SIGTERM");
    }
}

/// Every letter in `{ns}.dead` as (AMQP message_id, reason, detail), read with
/// `basic.get` and handed back unacknowledged.
pub async fn peek_dead(env: &TestEnv) -> Vec<(String, String, String)> {
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

/// A request event for case `name` (id `h-{name}`, its own user and address)
/// with `data` fields overriding the defaults; `null` removes one.
pub fn event(name: &str, data: Value) -> Value {
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
