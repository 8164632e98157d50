//! How a hostile case is written down: its body, the one answer it must get
//! ([`Expect`]), and the checks a mail that must go through is held to.

use serde_json::Value;
use verimail_tests::smtp::CapturedMail;

/// A check on the mail and the `sent` outcome of a request that must go through.
pub type MailCheck = fn(&CapturedMail, &Value) -> Result<(), String>;

/// The one answer a hostile request must get.
pub enum Expect {
    /// Sent, and the mail passes the check.
    Sent(MailCheck),
    /// `verimail.verification.failed` with this reason, the detail naming this field.
    Failed(&'static str, &'static str),
    /// Dead-lettered with this reason (and its detail containing this text); no outcome.
    Dead(&'static str, &'static str),
}

pub struct Case {
    pub name: &'static str,
    pub id: String,
    pub body: Vec<u8>,
    pub expect: Expect,
}

pub fn case(name: &'static str, body: Value, expect: Expect) -> Case {
    Case {
        name,
        id: body["id"]
            .as_str()
            .map_or_else(|| format!("h-{name}"), str::to_owned),
        body: body.to_string().into_bytes(),
        expect,
    }
}

pub fn raw_case(name: &'static str, body: Vec<u8>, expect: Expect) -> Case {
    Case {
        name,
        id: format!("h-{name}"),
        body,
        expect,
    }
}

/// A context with `depth` nested keys `a`: `{"a":{"a":…{}}}`.
pub fn nested(depth: usize) -> String {
    format!("{}{{}}{}", "{\"a\":".repeat(depth), "}".repeat(depth))
}

pub fn no_raw_markup(mail: &CapturedMail, _: &Value) -> Result<(), String> {
    if mail.html.contains("<script>") || mail.html.contains("<b>bold</b>") {
        return Err(format!(
            "markup in the name reached the HTML part raw: {}",
            mail.html
        ));
    }
    if !mail.html.contains("&lt;script&gt;") {
        return Err(format!("the name is not shown escaped: {}", mail.html));
    }
    Ok(())
}

pub fn template_syntax_literal(mail: &CapturedMail, _: &Value) -> Result<(), String> {
    for part in [&mail.text, &mail.html] {
        if !part.contains("{{7*7}}") || !part.contains("{% if true %}X{% endif %}") {
            return Err(format!(
                "template syntax in the name was not kept literal: {part}"
            ));
        }
    }
    Ok(())
}

pub fn one_recipient(mail: &CapturedMail, _: &Value) -> Result<(), String> {
    let parsed = mail_parser::MessageParser::default().parse(&mail.raw);
    let to: Vec<String> = parsed
        .as_ref()
        .and_then(|m| m.to())
        .map(|a| {
            a.iter()
                .filter_map(|x| x.address().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let bcc = parsed
        .as_ref()
        .is_some_and(|m| m.bcc().is_some() || m.cc().is_some());
    if mail.to != ["address_in_name@example.com"] || to != ["address_in_name@example.com"] || bcc {
        return Err(format!(
            "the name changed the recipients: envelope {:?}, To {to:?}, header {:?}",
            mail.to, mail.to_header
        ));
    }
    Ok(())
}

pub fn in_english(mail: &CapturedMail, _: &Value) -> Result<(), String> {
    (mail.subject == "Confirm your email address")
        .then_some(())
        .ok_or_else(|| format!("not the en mail: {:?}", mail.subject))
}

pub fn in_chinese(mail: &CapturedMail, _: &Value) -> Result<(), String> {
    (mail.subject == "请确认您的邮箱地址")
        .then_some(())
        .ok_or_else(|| format!("not the zh-CN mail: {:?}", mail.subject))
}

pub fn context_echoed(_: &CapturedMail, outcome: &Value) -> Result<(), String> {
    let mut depth = 0;
    let mut v = &outcome["data"]["context"];
    while let Some(inner) = v.get("a") {
        depth += 1;
        v = inner;
    }
    (depth == 100)
        .then_some(())
        .ok_or_else(|| format!("context not echoed whole (depth {depth})"))
}

pub fn big_user_id(_: &CapturedMail, outcome: &Value) -> Result<(), String> {
    (outcome["data"]["user_id"] == "18446744073709551615")
        .then_some(())
        .ok_or_else(|| {
            format!(
                "user_id not echoed as its decimal string: {}",
                outcome["data"]
            )
        })
}

pub fn fine(_: &CapturedMail, _: &Value) -> Result<(), String> {
    Ok(())
}
