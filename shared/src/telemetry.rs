//! Logging set-up shared by every binary: `LOG_FORMAT=json|pretty`, `RUST_LOG`.

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the global subscriber, writing to stderr (stdout is the CLI's
/// results). `RUST_LOG` filters; without it, `info` for verimail and `warn`
/// for libraries.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| {
            EnvFilter::new(
                "warn,verimail=info,verimail_shared=info,verimail_worker=info,verimail_gateway=info,verimail_producer=info",
            )
        })
        // lapin logs every returned (mandatory, unroutable) message at warn
        // with its whole body, addresses included; verimail reports returns
        // itself, without the body. Whatever RUST_LOG says, keep those quiet.
        .add_directive(quiet_returns());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second init (tests starting several services in one process) is harmless.
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Pretty => builder.try_init(),
    };
}

/// The directive that keeps lapin from logging returned message bodies.
pub fn quiet_returns() -> tracing_subscriber::filter::Directive {
    "lapin::returned_messages=error"
        .parse()
        .unwrap_or_else(|_| tracing_subscriber::filter::LevelFilter::ERROR.into())
}

/// The first characters of a token, enough to correlate log lines without
/// handing anyone a working link.
pub fn token_prefix(token: &str) -> String {
    let shown: String = token.chars().take(12).collect();
    format!("{shown}…")
}
