//! `MAIL_URL`: how the worker delivers mail, and the file names of a `file://`
//! outbox (shared with `verimail outbox`, which reads them back).
//!
//! A `MAIL_URL` is one target or several separated by ` , ` (space, comma,
//! space: a comma alone may sit inside a URL's query), tried in order. A
//! target is SMTP, a `file://` outbox or an HTTP API ([`ApiTarget`]).

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
    /// An HTTP API: `ses://`, `postmark://`, `sendgrid://`, `mailgun://`,
    /// `https://` or `http://`.
    Api(ApiTarget),
    /// Several targets (` , `-separated), tried in order: a transient failure
    /// of one sends that mail through the next. Never nested, at least two.
    Failover(Vec<MailUrl>),
}

/// An HTTP API target of `MAIL_URL`.
#[derive(Clone)]
pub struct ApiTarget {
    /// Which API, with its credentials.
    pub provider: ApiProvider,
    /// `?endpoint=URL`: another base URL (a regional endpoint, an emulator)
    /// instead of the provider's own; `None` for the generic target, whose
    /// URL is its endpoint.
    pub endpoint: Option<Url>,
}

/// The provider an [`ApiTarget`] talks to.
#[derive(Clone)]
pub enum ApiProvider {
    /// `ses://REGION`: Amazon SES v2 `SendEmail`, signed with SigV4
    /// (credentials from `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
    /// `AWS_SESSION_TOKEN`, read by the worker).
    Ses {
        /// The AWS region, e.g. `eu-west-1`.
        region: String,
    },
    /// `postmark://SERVER_TOKEN@`.
    Postmark {
        /// The server token.
        token: SecretString,
    },
    /// `sendgrid://API_KEY@`.
    Sendgrid {
        /// The API key.
        key: SecretString,
    },
    /// `mailgun://API_KEY@DOMAIN[?region=eu]`.
    Mailgun {
        /// The API key.
        key: SecretString,
        /// The sending domain.
        domain: String,
        /// `?region=eu`: the EU API.
        eu: bool,
    },
    /// `https://HOST/PATH` or `http://HOST/PATH`: the rendered mail as signed JSON.
    Generic {
        /// Where to POST.
        url: Url,
    },
}

impl ApiProvider {
    /// The provider's name, as metrics, logs and details say it.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Ses { .. } => "ses",
            Self::Postmark { .. } => "postmark",
            Self::Sendgrid { .. } => "sendgrid",
            Self::Mailgun { .. } => "mailgun",
            Self::Generic { .. } => "http",
        }
    }

    /// The base URL requests go to when no `?endpoint=` is given.
    pub fn default_base(&self) -> String {
        match self {
            Self::Ses { region } => format!("https://email.{region}.amazonaws.com"),
            Self::Postmark { .. } => "https://api.postmarkapp.com".into(),
            Self::Sendgrid { .. } => "https://api.sendgrid.com".into(),
            Self::Mailgun { eu: false, .. } => "https://api.mailgun.net".into(),
            Self::Mailgun { eu: true, .. } => "https://api.eu.mailgun.net".into(),
            Self::Generic { url } => url.as_str().to_owned(),
        }
    }
}

impl std::fmt::Debug for ApiProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token or key.
        f.write_str(self.name())
    }
}

impl std::fmt::Debug for ApiTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token or key.
        let mut d = f.debug_struct("ApiTarget");
        d.field("provider", &self.provider.name());
        match &self.provider {
            ApiProvider::Ses { region } => d.field("region", region),
            ApiProvider::Mailgun { domain, eu, .. } => d.field("domain", domain).field("eu", eu),
            ApiProvider::Generic { url } => d.field("url", &url.as_str()),
            ApiProvider::Postmark { .. } | ApiProvider::Sendgrid { .. } => &mut d,
        };
        d.field("endpoint", &self.endpoint.as_ref().map(Url::as_str))
            .finish_non_exhaustive()
    }
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
            Self::Api(target) => target.fmt(f),
            Self::Failover(targets) => f.debug_tuple("Failover").field(targets).finish(),
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
        if raw.contains(" , ") {
            let targets = raw
                .split(" , ")
                .enumerate()
                .map(|(i, one)| {
                    parse_one(one.trim()).map_err(|e| format!("target {} of the list: {e}", i + 1))
                })
                .collect::<Result<Vec<_>, _>>()?;
            return Ok(Self::Failover(targets));
        }
        parse_one(raw)
    }
}

/// One target of a `MAIL_URL` list.
fn parse_one(raw: &str) -> Result<MailUrl, String> {
    if let Some(dir) = raw.strip_prefix("file://") {
        if dir.is_empty() {
            return Err("file:// needs a directory, e.g. file://./outbox".into());
        }
        return Ok(MailUrl::File(PathBuf::from(dir)));
    }
    if let Some((scheme @ ("ses" | "postmark" | "sendgrid" | "mailgun" | "https" | "http"), rest)) =
        raw.split_once("://")
    {
        return parse_api(scheme, rest, raw).map(MailUrl::Api);
    }
    let url = Url::parse(raw).map_err(|e| format!("not a URL ({e})"))?;
    let (security, default_port) = match url.scheme() {
        "smtp" => (SmtpSecurity::Opportunistic, 25),
        "smtps" => (SmtpSecurity::Implicit, 465),
        "smtp+plain" => (SmtpSecurity::None, 25),
        other => {
            return Err(format!(
                "unknown scheme `{other}` (expected smtp, smtps, smtp+plain, file, ses, \
                     postmark, sendgrid, mailgun, https or http)"
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
    Ok(MailUrl::Smtp {
        security,
        host,
        port: url.port().unwrap_or(default_port),
        credentials,
    })
}

/// `scheme://rest` of an HTTP API target (`raw` is the whole of it).
fn parse_api(scheme: &str, rest: &str, raw: &str) -> Result<ApiTarget, String> {
    if matches!(scheme, "https" | "http") {
        let url = Url::parse(raw).map_err(|e| format!("not a URL ({e})"))?;
        if url.host_str().is_none_or(str::is_empty) {
            return Err(format!("`{scheme}://` needs a host"));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(format!(
                "`{scheme}://` targets are authenticated by their signature, not user:pass in the URL"
            ));
        }
        return Ok(ApiTarget {
            provider: ApiProvider::Generic { url },
            endpoint: None,
        });
    }
    let (authority, query) = rest.split_once('?').unwrap_or((rest, ""));
    let mut endpoint = None;
    let mut eu = false;
    for (name, value) in url::form_urlencoded::parse(query.as_bytes()) {
        match (&*name, &*value) {
            ("endpoint", value) => {
                let url = Url::parse(value).map_err(|e| format!("?endpoint=: not a URL ({e})"))?;
                if !matches!(url.scheme(), "https" | "http") || url.host_str().is_none() {
                    return Err("?endpoint= must be an http(s) URL with a host".into());
                }
                endpoint = Some(url);
            }
            ("region", "eu") if scheme == "mailgun" => eu = true,
            ("region", "us") if scheme == "mailgun" => eu = false,
            ("region", other) if scheme == "mailgun" => {
                return Err(format!(
                    "mailgun: unknown ?region={other} (expected eu or us)"
                ));
            }
            (other, _) => return Err(format!("{scheme}: unknown parameter `{other}`")),
        }
    }
    let (secret, host) = match authority.rsplit_once('@') {
        Some((secret, host)) => (Some(percent_decode(secret)?), host),
        None => (None, authority),
    };
    let secret = secret.filter(|s| !s.is_empty());
    let provider = match (scheme, secret) {
        ("ses", None) => {
            let region = host.trim_end_matches('/');
            let valid = !region.is_empty()
                && region
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
            if !valid {
                return Err(
                    "ses:// needs a region, e.g. ses://eu-west-1 (credentials come from \
                     AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"
                        .into(),
                );
            }
            ApiProvider::Ses {
                region: region.to_owned(),
            }
        }
        ("ses", Some(_)) => {
            return Err("ses:// takes no credentials in the URL (they come from \
                 AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"
                .into());
        }
        ("postmark" | "sendgrid", Some(secret)) if host.trim_end_matches('/').is_empty() => {
            let secret = SecretString::from(secret);
            if scheme == "postmark" {
                ApiProvider::Postmark { token: secret }
            } else {
                ApiProvider::Sendgrid { key: secret }
            }
        }
        ("postmark", _) => return Err("expected postmark://SERVER_TOKEN@".into()),
        ("sendgrid", _) => return Err("expected sendgrid://API_KEY@".into()),
        ("mailgun", Some(key)) if !host.trim_end_matches('/').is_empty() => {
            let domain = host.trim_end_matches('/');
            if domain.contains('/') {
                return Err("expected mailgun://API_KEY@DOMAIN".into());
            }
            ApiProvider::Mailgun {
                key: SecretString::from(key),
                domain: domain.to_owned(),
                eu,
            }
        }
        _ => return Err("expected mailgun://API_KEY@DOMAIN".into()),
    };
    Ok(ApiTarget { provider, endpoint })
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
    fn http_api_mail_urls_parse_with_endpoints_regions_and_failover() -> Result<(), String> {
        let MailUrl::Api(ses) = "ses://eu-west-1?endpoint=http://127.0.0.1:8005".parse()? else {
            return Err("ses expected".into());
        };
        assert!(matches!(&ses.provider, ApiProvider::Ses { region } if region == "eu-west-1"));
        assert_eq!(
            ses.endpoint.as_ref().map(Url::as_str),
            Some("http://127.0.0.1:8005/")
        );
        let MailUrl::Api(pm) = "postmark://tok%2Fen@".parse()? else {
            return Err("postmark expected".into());
        };
        match &pm.provider {
            ApiProvider::Postmark { token } => assert_eq!(token.expose_secret(), "tok/en"),
            _ => return Err("postmark expected".into()),
        }
        assert!(!format!("{pm:?}").contains("tok"), "{pm:?}");
        let MailUrl::Api(mg) = "mailgun://key-1@mg.example.com?region=eu".parse()? else {
            return Err("mailgun expected".into());
        };
        assert!(
            matches!(&mg.provider, ApiProvider::Mailgun { domain, eu: true, .. } if domain == "mg.example.com")
        );
        assert_eq!(mg.provider.default_base(), "https://api.eu.mailgun.net");
        let MailUrl::Failover(list) =
            "https://relay.example.com/mail?x=1,2 , sendgrid://SG.key@ , smtp://mail.example.com"
                .parse()?
        else {
            return Err("failover expected".into());
        };
        assert_eq!(list.len(), 3);
        assert!(
            matches!(&list[0], MailUrl::Api(ApiTarget { provider: ApiProvider::Generic { url }, .. }) if url.query() == Some("x=1,2"))
        );
        assert!(matches!(&list[2], MailUrl::Smtp { .. }));
        Ok(())
    }

    #[test]
    fn bad_http_api_mail_urls_say_what_is_expected() {
        for (raw, expected) in [
            ("ses://", "needs a region"),
            ("ses://key@eu-west-1", "no credentials"),
            ("postmark://", "postmark://SERVER_TOKEN@"),
            ("sendgrid://@", "sendgrid://API_KEY@"),
            ("mailgun://key@", "mailgun://API_KEY@DOMAIN"),
            ("mailgun://key@mg.example.com?region=mars", "region"),
            ("postmark://t@?endpoint=ftp://x", "?endpoint="),
            ("postmark://t@?foo=1", "unknown parameter"),
            ("https://user:pass@relay.example.com/", "signature"),
            ("smtp://a:25 , ses://", "target 2 of the list"),
        ] {
            let err = raw.parse::<MailUrl>().err().unwrap_or_default();
            assert!(err.contains(expected), "{raw}: {err}");
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
            _ => return Err("expected smtp".into()),
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
