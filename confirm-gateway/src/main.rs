//! `verimail-gateway`: the confirm-link HTTP server. Configuration comes from
//! the environment (see the README); this file only wires it up.

use std::process::ExitCode;

use clap::Parser;
use verimail_gateway::Gateway;
use verimail_shared::{Config, config, shutdown, telemetry};

/// Serves /confirm/{token}: records confirmations and emits verimail.email.verified.
///
/// Configured by environment variables (and a .env file): DATABASE_URL, AMQP_URL,
/// VERIMAIL_SECRET_KEY, GATEWAY_ADDR, RETURN_URL_ALLOWLIST, TRUSTED_PROXIES,
/// GATEWAY_API_KEYS, WEBHOOK_SECRETS, ...
#[derive(Debug, Parser)]
#[command(name = "verimail-gateway", version, about, long_about)]
struct Cli {}

#[tokio::main]
async fn main() -> ExitCode {
    let _cli = Cli::parse();
    let config = match config::load_dotenv().and_then(|()| Config::from_env()) {
        Ok(config) => config,
        Err(e) => return fail(&e),
    };
    if let Err(e) = config.keys() {
        return fail(&e);
    }
    telemetry::init(config.log_format);
    let gateway = match Gateway::build(config).await {
        Ok(gateway) => gateway,
        Err(e) => return fail(&e),
    };
    match gateway.run(shutdown::on_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

fn fail(e: &dyn std::fmt::Display) -> ExitCode {
    // One line, naming the variable at fault when it is a configuration error.
    eprintln!("error: {}", e.to_string().replace('\n', " "));
    ExitCode::FAILURE
}
