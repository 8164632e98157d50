//! `verimail-worker`: parse arguments, read the configuration, start logging,
//! build the worker and run it until SIGINT/SIGTERM.
//!
//! Exit codes: 0 after a clean shutdown; 1 when the configuration is wrong
//! (one line `error: VARIABLE: problem` on stderr) or the worker could not
//! start or failed; 2 for a bad command-line argument (clap's own).

use std::process::ExitCode;

use clap::Parser;
use verimail_shared::config::{self, Config};
use verimail_shared::{shutdown, telemetry};
use verimail_worker::Worker;

/// Consumes verimail.verification.requested, throttles, signs, renders, sends
/// the mail and publishes exactly one outcome per request.
///
/// Configured entirely by environment variables (and a .env file in the
/// working directory): AMQP_URL, DATABASE_URL, VERIMAIL_NAMESPACE,
/// VERIMAIL_SECRET_KEY, MAIL_URL, WORKER_CONCURRENCY, WORKER_THREADS, METRICS_ADDR, SUPPRESS_ON_REJECT, ...
/// (see the README). /metrics, /healthz and /readyz answer on METRICS_ADDR.
#[derive(Debug, Parser)]
#[command(name = "verimail-worker", version, about, long_about)]
struct Cli {}

fn main() -> ExitCode {
    let _cli = Cli::parse();
    let config = match load_config() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    telemetry::init(config.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.worker_threads)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "worker failed");
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

/// The configuration, with the secret key required (the worker signs links).
fn load_config() -> Result<Config, verimail_shared::ConfigError> {
    config::load_dotenv()?;
    let config = Config::from_env()?;
    config.keys()?;
    Ok(config)
}

async fn run(config: Config) -> Result<(), verimail_worker::Error> {
    let stop = shutdown::on_signal();
    if config.mail_url_is_default {
        tracing::warn!("MAIL_URL is not set: mails are written to ./outbox as .eml files");
    }
    // Building waits for RabbitMQ; a signal meanwhile ends the program cleanly.
    let worker = tokio::select! {
        worker = Worker::build(config) => worker?,
        () = stop.cancelled() => return Ok(()),
    };
    worker.run(stop).await
}
