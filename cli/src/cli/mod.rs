//! The `verimail` command line: arguments, exit codes, configuration, dispatch.

mod dead;
pub(crate) mod listen;
mod migrate;
pub(crate) mod outbox;
mod publish;
mod suppression;
mod token;

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use tracing_subscriber::EnvFilter;
use verimail_shared::Config;
use verimail_shared::config::LogFormat;

/// Exit code: the operation failed or the answer is negative.
pub const EXIT_FAILED: u8 = 1;
/// Exit code: a bad or missing argument.
pub const EXIT_USAGE: u8 = 2;

const LONG_ABOUT: &str = "\
verimail: operate the email-verification pipeline from a shell.

Ask for a verification mail, watch the events, inspect and replay dead letters,
mint and inspect link tokens, read the local outbox, keep the suppression list,
migrate the database.

Results go to stdout (an id, a token, one JSON object or one JSON line per item);
logs and errors go to stderr, so `verimail listen | jq` and `id=$(verimail publish ...)`
just work.

Configuration comes from the environment, as for the services (a .env file in the
working directory is read too): AMQP_URL, VERIMAIL_NAMESPACE, DATABASE_URL,
VERIMAIL_SECRET_KEY, VERIMAIL_SALT, TOKEN_FORMAT, TOKEN_TTL_SECONDS,
ITSDANGEROUS_DIGEST, RETURN_URL_ALLOWLIST, MAIL_URL, LOG_FORMAT, RUST_LOG.
Each command reads and checks only the variables it uses (a wrong THROTTLE_SECONDS,
which only the worker reads, never stops `verimail publish`).
--amqp-url and --namespace override the first two.

Exit status:
  0  done (for `token inspect`: the token is valid)
  1  the operation failed or the answer is negative: broker or database unreachable,
     token invalid or expired, a dead letter that could not be replayed, or a
     configuration variable with a wrong value (the message names it)
  2  usage error: a bad or missing argument (the message names it, e.g. `--email`)";

const AFTER_LONG_HELP: &str = "\
Examples:
  # Ask for a verification mail; prints the event id (the request id of every outcome)
  verimail publish --user-id 42 --email alice@example.com --locale zh-CN

  # Watch every event of the namespace, one JSON line each
  verimail listen | jq -c '{type, id, data}'

  # Only the confirmations
  verimail listen verimail.email.verified

  # What is in the dead-letter queue, and replay one letter or all of them
  verimail dead list
  verimail dead replay --id 5f1c2a7e-6b1d-4a57-9d0e-2f4b8e1c9a10
  verimail dead replay --all

  # Why was this link refused?
  verimail token inspect 'v1.AbCdEfGh.....'

  # The link and code of the latest mail in a file:// outbox (MAIL_URL's default)
  verimail outbox

  # The suppression list: who is not mailed, and why; lift one
  verimail suppression list
  verimail suppression remove alice@example.com

  # Apply database migrations
  verimail migrate";

/// The `verimail` command line.
#[derive(Debug, Parser)]
#[command(
    name = "verimail",
    version,
    about = "Operate verimail: publish requests, watch events, replay dead letters, inspect tokens, read the outbox.",
    long_about = LONG_ABOUT,
    after_long_help = AFTER_LONG_HELP,
    propagate_version = true
)]
pub struct Cli {
    /// RabbitMQ URL(s), comma-separated for the nodes of one cluster.
    #[arg(
        long,
        global = true,
        env = "AMQP_URL",
        hide_env_values = true,
        value_name = "URL"
    )]
    amqp_url: Option<String>,

    /// Prefix of the exchange and every queue [default: verimail].
    // The value is hidden so an unset variable does not show as `VERIMAIL_NAMESPACE=`.
    #[arg(
        long,
        global = true,
        env = "VERIMAIL_NAMESPACE",
        hide_env_values = true,
        value_name = "NS"
    )]
    namespace: Option<String>,

    /// More logs on stderr (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Publish one verification request and print its event id.
    #[command(long_about = publish::LONG_ABOUT, after_long_help = publish::EXAMPLES)]
    Publish(publish::PublishArgs),
    /// Print every event matching PATTERN as one JSON line, until Ctrl-C.
    #[command(long_about = listen::LONG_ABOUT, after_long_help = listen::EXAMPLES)]
    Listen(listen::ListenArgs),
    /// Inspect and replay the dead-letter queue `{ns}.dead`.
    #[command(subcommand)]
    Dead(dead::DeadCommand),
    /// Mint and inspect link tokens.
    #[command(subcommand)]
    Token(token::TokenCommand),
    /// Apply the database migrations and exit.
    #[command(
        long_about = "Apply the embedded database migrations to DATABASE_URL (the database \
                      is created if missing) and exit. What was applied is written to stderr."
    )]
    Migrate(migrate::MigrateArgs),
    /// List, add and remove suppressed addresses (in PostgreSQL).
    #[command(subcommand, long_about = suppression::LONG_ABOUT, after_long_help = suppression::EXAMPLES)]
    Suppression(suppression::SuppressionCommand),
    /// Print the mail of a request from the file:// outbox (link, code, file).
    #[command(long_about = outbox::LONG_ABOUT, after_long_help = outbox::EXAMPLES)]
    Outbox(outbox::OutboxArgs),
    /// The quickstart walk-through.
    Demo(DemoArgs),
}

#[derive(Debug, Args)]
struct DemoArgs {}

/// How a command ended, when not with success.
#[derive(Debug)]
pub enum Exit {
    /// A bad argument: `--flag: rule` (exit 2).
    Usage(String),
    /// The operation failed (exit 1).
    Failed(anyhow::Error),
    /// The answer is negative and was already printed (exit 1).
    Negative,
}

impl<E: Into<anyhow::Error>> From<E> for Exit {
    fn from(e: E) -> Self {
        Self::Failed(e.into())
    }
}

/// A command's result.
pub type Outcome = Result<(), Exit>;

/// The flag a request field is given with (`return_url` → `--return-url`).
pub fn flag(field: &str) -> String {
    format!("--{}", field.replace('_', "-"))
}

/// Runs the parsed command line and turns its outcome into an exit code.
pub fn main(cli: Cli) -> ExitCode {
    let config = match load_config(&cli) {
        Ok(config) => config,
        Err(exit) => return report(exit),
    };
    init_logging(config.log_format, cli.verbose);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return report(Exit::Failed(e.into())),
    };
    let outcome = runtime.block_on(run(cli.command, &config));
    // Do not wait for lingering I/O tasks (a half-closed connection) to end.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(exit) => report(exit),
    }
}

fn report(exit: Exit) -> ExitCode {
    match exit {
        Exit::Usage(message) => {
            eprintln!("error: {message}");
            eprintln!();
            eprintln!("For more information, try '--help'.");
            ExitCode::from(EXIT_USAGE)
        }
        Exit::Failed(e) => {
            eprintln!("error: {}", chain(&e));
            ExitCode::from(EXIT_FAILED)
        }
        Exit::Negative => ExitCode::from(EXIT_FAILED),
    }
}

/// The error and its causes on one line, leaving out a cause whose text the
/// previous message already ends with (many errors print their source too).
fn chain(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.ends_with(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

async fn run(command: Command, config: &Config) -> Outcome {
    match command {
        Command::Publish(args) => publish::run(config, args).await,
        Command::Listen(args) => listen::run(config, args).await,
        Command::Dead(command) => dead::run(config, command).await,
        Command::Token(command) => token::run(config, command),
        Command::Migrate(args) => migrate::run(config, args).await,
        Command::Suppression(command) => suppression::run(config, command).await,
        Command::Outbox(args) => outbox::run(config, args),
        Command::Demo(DemoArgs {}) => crate::demo::run(config).await.map_err(Exit::Failed),
    }
}

/// The variables each command reads: every other one keeps its default, so a
/// wrong `THROTTLE_SECONDS` (the worker's) never stops `verimail publish`.
/// `None`: all of them (the demo starts the services, which read everything).
fn variables(command: &Command) -> Option<&'static [&'static str]> {
    const BUS: &[&str] = &["AMQP_URL", "VERIMAIL_NAMESPACE", "LOG_FORMAT"];
    // RETENTION_HOURS is checked against TOKEN_TTL_SECONDS, so it is read with it.
    const TOKENS: &[&str] = &[
        "VERIMAIL_SECRET_KEY",
        "VERIMAIL_SECRET_KEY_FILE",
        "VERIMAIL_OLD_SECRET_KEYS",
        "VERIMAIL_SALT",
        "TOKEN_FORMAT",
        "TOKEN_TTL_SECONDS",
        "RETENTION_HOURS",
        "ITSDANGEROUS_DIGEST",
        "LOG_FORMAT",
    ];
    match command {
        Command::Publish(_) => Some(&[
            "AMQP_URL",
            "VERIMAIL_NAMESPACE",
            "RETURN_URL_ALLOWLIST",
            "LOG_FORMAT",
        ]),
        Command::Listen(_) | Command::Dead(_) => Some(BUS),
        Command::Token(_) => Some(TOKENS),
        Command::Migrate(_) => Some(&["DATABASE_URL", "LOG_FORMAT"]),
        Command::Suppression(_) => Some(&["DATABASE_URL", "VERIMAIL_AUTO_MIGRATE", "LOG_FORMAT"]),
        Command::Outbox(_) => Some(&["MAIL_URL", "LOG_FORMAT"]),
        Command::Demo(_) => None,
    }
}

/// Reads the variables the command uses (see [`variables`]), with the values
/// of `--amqp-url`, `--namespace` and `--database-url` in place of theirs. A
/// wrong value given as a flag is a usage error; one from the environment
/// makes the command fail.
fn load_config(cli: &Cli) -> Result<Config, Exit> {
    let database_url = match &cli.command {
        Command::Migrate(args) => args.database_url.clone(),
        _ => None,
    };
    let overrides: Vec<(&str, &str, Option<String>)> = vec![
        ("AMQP_URL", "--amqp-url", cli.amqp_url.clone()),
        ("VERIMAIL_NAMESPACE", "--namespace", cli.namespace.clone()),
        ("DATABASE_URL", "--database-url", database_url),
    ];
    let used = variables(&cli.command);
    let lookup = |name: &str| {
        if used.is_some_and(|used| !used.contains(&name)) {
            return None;
        }
        overrides
            .iter()
            .find(|(var, _, value)| *var == name && value.is_some())
            .and_then(|(_, _, value)| value.clone())
            .or_else(|| std::env::var(name).ok())
    };
    Config::from_lookup(lookup).map_err(|e| {
        // Clap fills these flags from the environment too: only a value that
        // differs from the variable's came from the command line.
        let from_flag = overrides.iter().find(|(var, _, value)| {
            *var == e.variable
                && value.is_some()
                && value.as_deref() != std::env::var(var).ok().as_deref()
        });
        match from_flag {
            Some((_, flag, _)) => Exit::Usage(format!("{flag}: {}", e.problem)),
            None => Exit::Failed(e.into()),
        }
    })
}

/// Logs go to stderr; quiet by default (warnings only) because stdout is
/// the result and stderr is read by people.
fn init_logging(format: LogFormat, verbose: u8) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| {
            EnvFilter::new(match verbose {
                // lapin logs at error level what we report ourselves.
                0 => "warn,lapin=off",
                1 => "warn,verimail=info,verimail_shared=info,verimail_producer=info",
                _ => "info,verimail=debug,verimail_shared=debug,verimail_producer=debug",
            })
        })
        .add_directive(verimail_shared::telemetry::quiet_returns());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Pretty => builder.try_init(),
    };
}
