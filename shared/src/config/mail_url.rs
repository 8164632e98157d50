//! `MAIL_URL`: how the worker delivers mail, and the file names of a `file://`
//! outbox (shared with `verimail outbox`, which reads them back).

use std::path::PathBuf;
use std::str::FromStr;

use secrecy::SecretString;
use url::Url;

/// How the worker delivers mail, parsed from `MAIL_URL`.
#[derive(Clone)]
pub enum MailUrl {
    /// `smtp://`, `smtps://` or `smtp+plain://`.
    Smtp {
        /// Which kind of TLS the connection uses.
        security: SmtpSecurity,
        /// Server host name or address.
        host: String,
        /// Server port (25 for `smtp`/`smtp+plain`, 465 for `smtps` when absent).
        port: u16,
        /// `user:pass` from the URL, percent-decoded.
        credentials: Option<(String, SecretString)>,
    },
    /// `file://DIR`: one `.eml` file per mail.
    File(PathBuf),
}

impl std::fmt::Debug for MailUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Smtp {
                security,
                host,
                port,
                credentials,
            } => f
                .debug_struct("Smtp")
                .field("security", security)
                .field("host", host)
                .field("port", port)
                .field("user", &credentials.as_ref().map(|(u, _)| u))
                .finish_non_exhaustive(),
            Self::File(dir) => f.debug_tuple("File").field(dir).finish(),
        }
    }
}

/// TLS on an SMTP connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmtpSecurity {
    /// `smtp://`: STARTTLS when the server offers it.
    Opportunistic,
    /// `smtps://`: TLS from the first byte.
    Implicit,
    /// `smtp+plain://`: never TLS (local sinks and tests).
    None,
}

impl FromStr for MailUrl {
    type Err = String;

    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        if let Some(dir) = raw.strip_prefix("file://") {
            if dir.is_empty() {
                return Err("file:// needs a directory, e.g. file://./outbox".into());
            }
            return Ok(Self::File(PathBuf::from(dir)));
        }
        // The contract's HTTP API targets (`postmark://TOKEN@` is no valid URL
        // to the parser): say plainly that this build lacks them rather than
        // calling a documented scheme unknown.
        if let Some((api @ ("ses" | "postmark" | "sendgrid" | "mailgun" | "https" | "http"), _)) =
            raw.split_once("://")
        {
            return Err(format!(
                "`{api}://` (delivery through an HTTP API) is not built into this \
                 version yet; use smtp, smtps, smtp+plain or file"
            ));
        }
        let url = Url::parse(raw).map_err(|e| format!("not a URL ({e})"))?;
        let (security, default_port) = match url.scheme() {
            "smtp" => (SmtpSecurity::Opportunistic, 25),
            "smtps" => (SmtpSecurity::Implicit, 465),
            "smtp+plain" => (SmtpSecurity::None, 25),
            other => {
                return Err(format!(
                    "unknown scheme `{other}` (expected smtp, smtps, smtp+plain or file)"
                ));
            }
        };
        let host = url
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or("no host")?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let credentials = if url.username().is_empty() {
            None
        } else {
            let user = percent_decode(url.username())?;
            let pass = percent_decode(url.password().unwrap_or(""))?;
            Some((user, SecretString::from(pass)))
        };
        Ok(Self::Smtp {
            security,
            host,
            port: url.port().unwrap_or(default_port),
            credentials,
        })
    }
}

/// The name of a request's mail in a `file://` outbox: `{request_id}.eml`.
///
/// What a file name cannot hold is percent-encoded (`/`, `\\`, `%`, control
/// characters, a leading `.`), so every id gets a file of its own inside the
/// folder and the worker and `verimail outbox` agree on it. An id too long for
/// a file name keeps its first 200 bytes and gains a hash of the whole.
pub fn outbox_file_name(request_id: &str) -> String {
    let mut name = String::with_capacity(request_id.len() + 4);
    for (i, c) in request_id.char_indices() {
        if matches!(c, '/' | '\\' | '%') || c.is_control() || (i == 0 && c == '.') {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                name.push_str(&format!("%{b:02X}"));
            }
        } else {
            name.push(c);
        }
    }
    if name.len() > 240 {
        let mut cut = 200;
        while !name.is_char_boundary(cut) {
            cut -= 1;
        }
        // FNV-1a: stable across Rust versions, unlike std's hasher.
        let hash = request_id.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        name = format!("{}~{hash:016x}", &name[..cut]);
    }
    name.push_str(".eml");
    name
}

/// Decodes the `user` or `pass` of a mail URL, which `url` hands over still
/// percent-encoded. Stricter than [`percent_encoding::percent_decode_str`],
/// which passes a malformed `%` through: a `%` not followed by two hex digits
/// is an error here, as a typo in a password should be.
fn percent_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let well_formed = bytes.iter().enumerate().all(|(i, &b)| {
        b != b'%'
            || bytes
                .get(i + 1..i + 3)
                .is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit))
    });
    if !well_formed {
        return Err("bad percent-encoding in credentials".into());
    }
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .map(|decoded| decoded.into_owned())
        .map_err(|_| "credentials are not UTF-8".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    #[test]
    fn http_api_mail_urls_say_they_are_not_built_yet() {
        for raw in [
            "ses://eu-west-1",
            "postmark://token@",
            "https://relay.example.com/mail",
        ] {
            let err = raw.parse::<MailUrl>().err().unwrap_or_default();
            assert!(err.contains("not built into this version"), "{raw}: {err}");
        }
    }

    #[test]
    fn mail_urls_of_every_scheme_parse() -> Result<(), String> {
        let smtp: MailUrl = "smtp://u%40x:p%2Cw@mail.example.com:587".parse()?;
        match smtp {
            MailUrl::Smtp {
                security,
                host,
                port,
                credentials,
            } => {
                assert_eq!(security, SmtpSecurity::Opportunistic);
                assert_eq!(host, "mail.example.com");
                assert_eq!(port, 587);
                let (user, pass) = credentials.ok_or("no credentials")?;
                assert_eq!(user, "u@x");
                assert_eq!(pass.expose_secret(), "p,w");
            }
            MailUrl::File(_) => return Err("expected smtp".into()),
        }
        assert!(matches!(
            "smtps://mail.example.com".parse::<MailUrl>()?,
            MailUrl::Smtp {
                security: SmtpSecurity::Implicit,
                port: 465,
                ..
            }
        ));
        assert!(matches!(
            "smtp+plain://127.0.0.1:2525".parse::<MailUrl>()?,
            MailUrl::Smtp {
                security: SmtpSecurity::None,
                port: 2525,
                ..
            }
        ));
        Ok(())
    }

    #[test]
    fn outbox_file_names_are_the_request_id_kept_inside_the_folder() {
        assert_eq!(outbox_file_name("01a2-b_c.d"), "01a2-b_c.d.eml");
        assert_eq!(outbox_file_name("signup/42%"), "signup%2F42%25.eml");
        assert_eq!(outbox_file_name(".."), "%2E..eml");
        assert_eq!(outbox_file_name("邮件"), "邮件.eml");
        let long = outbox_file_name(&"é".repeat(128));
        assert!(long.len() <= 255 && long.ends_with(".eml"), "{long}");
        assert_ne!(long, outbox_file_name(&format!("{}x", "é".repeat(127))));
    }

    #[test]
    fn credentials_are_percent_decoded_strictly() {
        assert_eq!(percent_decode("u%40x").as_deref(), Ok("u@x"));
        assert_eq!(percent_decode("%E9t%C3%A9").ok(), None, "not UTF-8");
        assert_eq!(percent_decode("%C3%A9t%C3%A9").as_deref(), Ok("été"));
        assert_eq!(percent_decode("plain").as_deref(), Ok("plain"));
        for bad in ["%", "a%4", "%zz", "%+1", "50%"] {
            assert!(percent_decode(bad).is_err(), "{bad}");
        }
        assert!("smtp://u:p%zz@mail.example.com".parse::<MailUrl>().is_err());
    }
}
