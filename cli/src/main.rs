//! `verimail`: the command line for people operating verimail. Results go to
//! stdout, logs and errors to stderr; exit 0 done, 1 failed or negative,
//! 2 usage error (see `verimail --help`).

mod cli;
mod demo;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // Before parsing, so `.env` values fill the `env`-backed flags too.
    if let Err(e) = verimail_shared::config::load_dotenv() {
        eprintln!("error: {e}");
        return ExitCode::from(cli::EXIT_FAILED);
    }
    // Clap exits by itself: 0 for --help/--version, 2 for usage errors.
    let args = cli::Cli::parse();
    cli::main(args)
}
