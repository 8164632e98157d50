//! `verimail dead list | replay`.

use anyhow::{Context as _, anyhow};
use clap::{Args, Subcommand};
use verimail_producer::dead::{self, DeadLetter, Selection};
use verimail_shared::Config;
use verimail_shared::bus::{Bus, Publisher, Topology};

use super::{Exit, Outcome};

/// `verimail dead ...`
#[derive(Debug, Subcommand)]
pub enum DeadCommand {
    /// Print one JSON line per dead letter, oldest first, without consuming any.
    #[command(long_about = "\
Print one JSON line per letter in the dead-letter queue `{ns}.dead`, oldest first:
  {\"id\": CloudEvent id or null, \"type\": ..., \"reason\": ..., \"detail\": ..., \"bytes\": ...}
No letter is consumed: each is read and handed back in its place.

reason/detail come from the worker's x-verimail-reason / x-verimail-detail headers, or,
for letters the broker moved itself (a delivery limit reached), from its
x-first-death-reason (e.g. delivery_limit) and the queue it came from.

Example:
  verimail dead list | jq -r 'select(.reason == \"delivery_failed\") | .id'")]
    List,
    /// Re-publish dead letters (one by id, or all) and remove each once confirmed.
    #[command(long_about = "\
Re-publish dead letters to the namespace's exchange, with their CloudEvent type as
routing key and the header x-verimail-replayed: true, and remove each from `{ns}.dead`
only once the broker has confirmed its copy. Prints one JSON line per replayed letter
(the same fields as `dead list`).

Undecodable letters (no readable id or type, or dead-lettered as `undecodable`) cannot be
replayed: --all leaves them in place and says how many on stderr; --id naming one fails.
Exit status 1 when a selected letter could not be replayed (it stays in place).

Examples:
  verimail dead replay --id 5f1c2a7e-6b1d-4a57-9d0e-2f4b8e1c9a10
  verimail dead replay --all")]
    Replay(ReplayArgs),
}

/// Which letters `dead replay` takes.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct ReplayArgs {
    /// The CloudEvent id (also the AMQP message_id) of the letter(s) to replay.
    #[arg(long, value_name = "ID")]
    id: Option<String>,
    /// Every replayable letter.
    #[arg(long)]
    all: bool,
}

/// Runs `verimail dead ...`.
pub async fn run(config: &Config, command: DeadCommand) -> Outcome {
    let topology = Topology::new(config.namespace.clone());
    let bus = Bus::connect_once(&config.amqp_urls, "verimail-dead")
        .await
        .context("cannot reach the dead-letter queue")?;
    let outcome = match command {
        DeadCommand::List => list(&bus, &topology).await,
        DeadCommand::Replay(args) => {
            let selection = match args.id {
                Some(id) => Selection::Id(id),
                None => Selection::All,
            };
            let publisher = Publisher::new(bus.clone());
            replay(&publisher, &topology, &selection).await
        }
    };
    bus.close().await;
    outcome
}

fn print(letter: &DeadLetter) {
    match serde_json::to_string(letter) {
        Ok(line) => println!("{line}"),
        Err(e) => tracing::error!(error = %e, "cannot serialize a dead letter"),
    }
}

async fn list(bus: &Bus, topology: &Topology) -> Outcome {
    let letters = dead::list(bus, topology)
        .await
        .context("listing the dead letters failed")?;
    for letter in &letters {
        print(letter);
    }
    Ok(())
}

async fn replay(publisher: &Publisher, topology: &Topology, selection: &Selection) -> Outcome {
    let report = dead::replay(publisher, topology, selection, print)
        .await
        .context("replaying the dead letters failed")?;
    let queue = topology.dead_queue();
    for (letter, error) in &report.failed {
        eprintln!(
            "error: letter {} was not replayed ({error}); it stays in {queue}",
            letter.id.as_deref().unwrap_or("?")
        );
    }
    match selection {
        Selection::Id(id) => {
            if report.matched == 0 {
                return Err(Exit::Failed(anyhow!("no letter in {queue} has id `{id}`")));
            }
            if !report.unreplayable.is_empty() {
                return Err(Exit::Failed(anyhow!(
                    "letter `{id}` is undecodable (reason {}) and cannot be replayed; it stays in {queue}",
                    report.unreplayable[0]
                        .reason
                        .as_deref()
                        .unwrap_or("unknown")
                )));
            }
        }
        Selection::All => {
            if !report.unreplayable.is_empty() {
                eprintln!(
                    "{} undecodable letter(s) cannot be replayed and stay in {queue}",
                    report.unreplayable.len()
                );
            }
        }
    }
    eprintln!("replayed {} letter(s)", report.replayed.len());
    if report.failed.is_empty() {
        Ok(())
    } else {
        Err(Exit::Failed(anyhow!(
            "{} letter(s) could not be replayed",
            report.failed.len()
        )))
    }
}
