//! `verimail outbox`: the mail of one request in the `file://` outbox, with
//! its link already decoded, for trying verimail locally without a mail server.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, anyhow};
use clap::Args;
use serde_json::json;
use verimail_shared::Config;
use verimail_shared::config::{MailUrl, outbox_file_name};

use super::{Exit, Outcome};

pub const LONG_ABOUT: &str = "\
Print the mail the worker wrote for REQUEST_ID (the event id `verimail publish` printed)
into the file:// outbox of MAIL_URL (default ./outbox, one {request_id}.eml file per mail),
or the latest mail when REQUEST_ID is left out, as one JSON object:

  {\"request_id\", \"to\", \"subject\", \"link\", \"code\", \"file\"}

The link is read from the decoded message (its parts are base64 or quoted-printable
in the file); `code` is null when the mail carries none. Exit status 1 when there is
no such mail (yet: the worker writes it once it has handled the request).";

pub const EXAMPLES: &str = "\
Examples:
  verimail outbox                                   # the latest mail
  verimail outbox 01a21640-4fb6-70fa-914f-d9ee93bee104
  id=$(verimail publish --user-id 7 --email you@example.com) && verimail outbox \"$id\" --wait 10
  curl -s \"$(verimail outbox | jq -r .link)\" -H 'Accept: application/json'";

/// Arguments of `verimail outbox`.
#[derive(Debug, Args)]
pub struct OutboxArgs {
    /// The request's id (the event id of its `verimail.verification.requested`);
    /// the latest mail when left out.
    #[arg(value_name = "REQUEST_ID")]
    request_id: Option<String>,
    /// Wait up to SECONDS for the mail of REQUEST_ID to be written (the worker
    /// writes it moments after `verimail publish` returns).
    #[arg(
        long,
        value_name = "SECONDS",
        requires = "request_id",
        default_value_t = 0
    )]
    wait: u64,
}

/// One mail of the outbox, as `verimail outbox` prints it.
#[derive(Debug)]
pub struct Mail {
    pub request_id: String,
    pub to: Option<String>,
    pub subject: Option<String>,
    pub link: Option<String>,
    /// The one-time code (`CONFIRM_METHOD` `code` or `both`).
    pub code: Option<String>,
    pub file: PathBuf,
}

/// Runs `verimail outbox`.
pub fn run(config: &Config, args: OutboxArgs) -> Outcome {
    let MailUrl::File(dir) = &config.mail_url else {
        return Err(Exit::Failed(anyhow!(
            "MAIL_URL: `verimail outbox` reads a file:// outbox, and this MAIL_URL sends mail"
        )));
    };
    let path = match &args.request_id {
        Some(id) => {
            let path = dir.join(outbox_file_name(id));
            let deadline = Instant::now() + Duration::from_secs(args.wait);
            while !path.is_file() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
            if !path.is_file() {
                return Err(Exit::Failed(anyhow!(
                    "no mail for request {id} in {} (yet?)",
                    dir.display()
                )));
            }
            path
        }
        None => {
            latest(dir)?.ok_or_else(|| Exit::Failed(anyhow!("no mail in {}", dir.display())))?
        }
    };
    let mail = read(&path)?;
    println!(
        "{}",
        json!({
            "request_id": mail.request_id,
            "to": mail.to,
            "subject": mail.subject,
            "link": mail.link,
            "code": mail.code,
            "file": mail.file.display().to_string(),
        })
    );
    Ok(())
}

/// The `.eml` file modified last, if any.
fn latest(dir: &Path) -> Result<Option<PathBuf>, Exit> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(anyhow!(e)
                .context(format!("cannot read {}", dir.display()))
                .into());
        }
    };
    let mut newest: Option<(SystemTime, PathBuf)> = None;
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(modified) = entry.metadata().and_then(|m| m.modified()) else {
            continue;
        };
        if path.extension().is_some_and(|e| e == "eml")
            && newest.as_ref().is_none_or(|(t, _)| modified > *t)
        {
            newest = Some((modified, path));
        }
    }
    Ok(newest.map(|(_, path)| path))
}

/// Parses the `.eml` at `path` and finds the confirm link in its decoded parts.
pub fn read(path: &Path) -> anyhow::Result<Mail> {
    let raw = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let message = mail_parser::MessageParser::default()
        .parse(&raw)
        .with_context(|| format!("{} is not a mail", path.display()))?;
    let to = message
        .to()
        .and_then(|to| to.first())
        .and_then(|a| a.address())
        .map(str::to_owned);
    let link = message
        .body_text(0)
        .and_then(|text| confirm_link(&text))
        .or_else(|| message.body_html(0).and_then(|html| confirm_link(&html)));
    let code = message.body_text(0).and_then(|text| code_line(&text));
    Ok(Mail {
        request_id: request_id(path),
        to,
        subject: message.subject().map(str::to_owned),
        link,
        code,
        file: path.to_owned(),
    })
}

/// The one-time code in a mail's text part: the built-in templates put it on
/// a line of its own, 6 to 10 digits (`CODE_LENGTH`).
fn code_line(text: &str) -> Option<String> {
    text.lines()
        .map(str::trim)
        .find(|l| verimail_shared::token::code_well_formed(l))
        .map(str::to_owned)
}

/// The first `http(s)://…/confirm/…` in `text`.
fn confirm_link(text: &str) -> Option<String> {
    text.match_indices("http")
        .map(|(start, _)| {
            text[start..]
                .chars()
                .take_while(|c| !c.is_whitespace() && !matches!(c, '>' | '<' | '"' | '\''))
                .collect::<String>()
        })
        .find(|url| url.contains("://") && url.contains("/confirm/"))
        .map(|url| url.replace("&amp;", "&"))
}

/// The request id a file is named after: its stem with the percent-encoding
/// of [`outbox_file_name`] undone.
fn request_id(path: &Path) -> String {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let bytes = stem.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = (bytes[i] == b'%')
            .then(|| stem.get(i + 1..i + 3))
            .flatten()
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match hex {
            Some(b) => {
                out.push(b);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_decode_back_to_their_request_id() {
        for id in ["01a2-b_c.d", "signup/42%", "..", "邮件"] {
            let path = PathBuf::from("outbox").join(outbox_file_name(id));
            assert_eq!(request_id(&path), id);
        }
    }

    #[test]
    fn the_code_is_the_line_of_digits() {
        let text = "Hello,\n\nOr type this code:\n\n  402917\n\nValid for 1 hour (3600 s).\n";
        assert_eq!(code_line(text).as_deref(), Some("402917"));
        assert_eq!(code_line("12345\n12345678901\nno code 123456\n"), None);
    }

    #[test]
    fn the_confirm_link_is_found_among_other_urls() {
        let text = "See https://example.com/help\n\nhttp://127.0.0.1:8080/confirm/v1.a.b.c\n";
        assert_eq!(
            confirm_link(text).as_deref(),
            Some("http://127.0.0.1:8080/confirm/v1.a.b.c")
        );
        let html = r#"<a href="https://x.io/confirm/t?a=1&amp;b=2">go</a>"#;
        assert_eq!(
            confirm_link(html).as_deref(),
            Some("https://x.io/confirm/t?a=1&b=2")
        );
        assert_eq!(confirm_link("no link"), None);
    }
}
