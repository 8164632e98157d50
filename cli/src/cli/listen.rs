//! `verimail listen`: a temporary queue bound to the exchange, each event
//! printed as one JSON line.

use anyhow::Context as _;
use clap::Args;
use futures_util::StreamExt;
use lapin::options::BasicConsumeOptions;
use lapin::types::FieldTable;
use lapin::{Channel, Consumer};
use serde_json::Value;
use tokio::signal::unix::{SignalKind, signal};
use verimail_shared::Config;
use verimail_shared::bus::{Bus, SETUP_TIMEOUT, Topology};

use super::Outcome;

pub const LONG_ABOUT: &str = "\
Bind a temporary queue (exclusive, deleted when verimail exits) to the namespace's
exchange with each PATTERN, and print every event it receives, the CloudEvent itself,
as one compact JSON line on stdout. Ctrl-C (or SIGTERM) ends it with exit status 0.

Patterns are AMQP topic patterns over the event type: `*` matches one word, `#` any
number. Events published before listen started are not shown.";

pub const EXAMPLES: &str = "\
Examples:
  verimail listen                                  # everything: verimail.#
  verimail listen verimail.email.verified          # confirmations only
  verimail listen 'verimail.verification.*'        # requests and outcomes
  verimail listen | jq -r 'select(.type == \"verimail.verification.failed\") | .data.detail'";

/// Arguments of `verimail listen`.
#[derive(Debug, Args)]
pub struct ListenArgs {
    /// Routing-key patterns over event types.
    #[arg(value_name = "PATTERN", default_value = "verimail.#")]
    patterns: Vec<String>,
}

/// Runs `verimail listen`.
pub async fn run(config: &Config, args: ListenArgs) -> Outcome {
    // Signal handlers first, so a signal arriving while we connect ends
    // the command cleanly instead of killing it.
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;

    let topology = Topology::new(config.namespace.clone());
    let bus = Bus::connect_once(&config.amqp_urls, "verimail-listen")
        .await
        .context("cannot listen")?;
    let patterns: Vec<&str> = args.patterns.iter().map(String::as_str).collect();
    // Printing is all we do with an event: nothing to acknowledge.
    let options = BasicConsumeOptions {
        no_ack: true,
        exclusive: true,
        ..BasicConsumeOptions::default()
    };
    // The channel is held while the consumer runs.
    let (_channel, mut consumer) =
        temporary_consumer(&bus, &topology, &patterns, options, "starting to listen").await?;
    eprintln!(
        "listening on exchange `{}` for {} (Ctrl-C to stop)",
        topology.exchange(),
        args.patterns.join(", ")
    );

    let outcome = loop {
        tokio::select! {
            _ = term.recv() => break Ok(()),
            _ = int.recv() => break Ok(()),
            item = consumer.next() => match item {
                Some(Ok(delivery)) => print_event(&delivery.data),
                Some(Err(e)) => break Err(anyhow::Error::from(e).context("lost the connection to RabbitMQ")),
                None => break Err(anyhow::anyhow!("the broker cancelled the subscription")),
            },
        }
    };
    bus.close().await;
    outcome.map_err(Into::into)
}

fn print_event(body: &[u8]) {
    match serde_json::from_slice::<Value>(body) {
        // Re-serialized so every event is one compact line, whatever its layout.
        Ok(event) => println!("{event}"),
        Err(e) => {
            tracing::warn!(error = %e, bytes = body.len(), "skipping a message that is not JSON")
        }
    }
}

/// A consumer on a temporary queue (server-named, exclusive, deleted when
/// its connection goes) bound to the namespace's exchange with each of
/// `patterns`, the topology declared first; with its channel, to be held
/// while the consumer runs. Bounded, as every wait on the broker: a node that
/// stops answering ends the command with an error instead of a silent hang.
pub(crate) async fn temporary_consumer(
    bus: &Bus,
    topology: &Topology,
    patterns: &[&str],
    options: BasicConsumeOptions,
    what: &'static str,
) -> anyhow::Result<(Channel, Consumer)> {
    let start = async {
        let channel = bus.channel().await?;
        verimail_shared::bus::declare(&channel, topology)
            .await
            .context("declaring the topology failed")?;
        let queue =
            verimail_shared::bus::bind_temporary_queue(&channel, topology.exchange(), patterns)
                .await?;
        let consumer = channel
            .basic_consume(queue, "".into(), options, FieldTable::default())
            .await?;
        Ok::<_, anyhow::Error>((channel, consumer))
    };
    bus.within(what, SETUP_TIMEOUT, start).await
}
