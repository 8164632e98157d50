//! Binds (or deletes) a subscriber queue `{ns}.sub.bench` to
//! `verimail.email.verified`, so the relay has somewhere to publish during a
//! load test; `count` prints how many events it holds.
//!
//! ```sh
//! VERIMAIL_NAMESPACE=bench cargo run -p verimail-gateway --example bench_queue -- bind
//! ```

use lapin::options::{QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use verimail_shared::Config;
use verimail_shared::bus::declare_exchange;
use verimail_shared::bus::{Bus, Topology};
use verimail_shared::events::EMAIL_VERIFIED;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let action = std::env::args().nth(1).unwrap_or_else(|| "bind".into());
    let config = Config::from_env()?;
    let topology = Topology::new(config.namespace.clone());
    let queue = topology.subscriber_queue("bench");
    let bus = Bus::connect_once(&config.amqp_urls, "verimail-bench").await?;
    let channel = bus.channel().await?;
    match action.as_str() {
        "bind" => {
            declare_exchange(&channel, &topology).await?;
            channel
                .queue_declare(
                    queue.as_str().into(),
                    QueueDeclareOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            channel
                .queue_bind(
                    queue.as_str().into(),
                    topology.exchange().into(),
                    EMAIL_VERIFIED.into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            println!("bound {queue}");
        }
        "count" => {
            let q = channel
                .queue_declare(
                    queue.as_str().into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await?;
            println!("{}", q.message_count());
        }
        "delete" => {
            channel
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await?;
            println!("deleted {queue}");
        }
        other => anyhow::bail!("unknown action `{other}` (bind, count or delete)"),
    }
    bus.close().await;
    Ok(())
}
