//! What the transports' unit tests share: a configuration from pairs, a
//! mailer for a `MAIL_URL`, a rendered mail and an envelope.

use std::collections::HashMap;

use verimail_shared::config::Config;

use super::{Envelope, Mailer, RenderedMail};

pub type TestResult = Result<(), Box<dyn std::error::Error>>;

pub fn config(vars: &[(&str, &str)]) -> Result<Config, verimail_shared::ConfigError> {
    let map: HashMap<String, String> = vars
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    Config::from_lookup(|name| map.get(name).cloned())
}

pub fn mailer(mail_url: &str) -> Result<Mailer, Box<dyn std::error::Error>> {
    Ok(Mailer::from_config(&config(&[
        ("MAIL_URL", mail_url),
        ("MAIL_FROM", "verimail <no-reply@verimail.test>"),
    ])?)?)
}

pub fn mail() -> RenderedMail {
    RenderedMail {
        subject: "请确认您的邮箱地址".into(),
        text: "Hello,\n\nhttp://127.0.0.1:8080/confirm/abc.def-ghi\n".into(),
        html: "<p><a href=\"http://127.0.0.1:8080/confirm/abc.def-ghi\">go</a></p>".into(),
        locale: "zh-CN".into(),
    }
}

pub fn envelope<'a>(name: Option<&'a str>, email: &'a str) -> Envelope<'a> {
    Envelope {
        to_name: name,
        to_email: email,
        request_id: "5f1c-req/1",
    }
}

/// A port nothing listens on (bound, then released).
pub fn closed_port() -> Result<u16, std::io::Error> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}
