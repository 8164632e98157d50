//! Rendering: one mail's subject, text and HTML parts in a chosen locale,
//! the variables the templates see, the link's validity in words, and HTML
//! escaping as Jinja2 does it.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use minijinja::Value;
use minijinja::value::{Enumerator, Object};
use verimail_shared::events::{Purpose, resolve_locale, rfc3339};

use super::load::describe;
use super::plain::{Plain, Values};
use super::{
    DEFAULT_LOCALE, MailContext, Part, RenderedMail, TemplateError, Templates, template_name,
};

impl Templates {
    /// Renders the mail for `purpose` in the best locale for `locale`.
    pub fn render(
        &self,
        locale: Option<&str>,
        ctx: &MailContext<'_>,
    ) -> Result<RenderedMail, TemplateError> {
        let chosen = resolve_locale(locale, self.locales_for(ctx.purpose), DEFAULT_LOCALE);
        self.render_in(chosen, ctx)
    }

    /// Renders in exactly `locale` (the start-up check renders every locale
    /// this way).
    pub(super) fn render_in(
        &self,
        locale: &str,
        ctx: &MailContext<'_>,
    ) -> Result<RenderedMail, TemplateError> {
        match self.plain_for(ctx.purpose, locale) {
            Some(plain) => Ok(render_plain(plain, locale, ctx)),
            None => self.render_with_minijinja(locale, ctx),
        }
    }

    /// Renders in exactly `locale` with minijinja, whatever the templates
    /// are: the reference the plain path is checked against at load, and the
    /// render bench's baseline (`cargo bench -p verimail-worker --bench render`).
    pub fn render_with_minijinja(
        &self,
        locale: &str,
        ctx: &MailContext<'_>,
    ) -> Result<RenderedMail, TemplateError> {
        let (amount, unit) = validity(ctx.ttl);
        // One object both renders read (its values built once, looked up by
        // a match), rather than a map built for the subject and a second one
        // merged over it for the bodies.
        let mut vars = MailVars {
            // A blank name greets like no name.
            name: Value::from(ctx.name.filter(|n| !n.trim().is_empty())),
            email: Value::from(ctx.email),
            link: Value::from(ctx.link),
            code: Value::from(ctx.code),
            purpose: Value::from(ctx.purpose.as_str()),
            locale: Value::from(locale),
            expires_at: Value::from(rfc3339::format(ctx.expires_at)),
            ttl_seconds: Value::from(ctx.ttl.as_secs()),
            valid_for: Value::from(valid_for(locale, amount, unit)),
            valid_for_amount: Value::from(amount),
            valid_for_unit: Value::from(unit.key()),
            subject: None,
        };
        let raw_subject = self.render_part(
            ctx.purpose,
            locale,
            Part::Subject,
            Value::from_object(vars.clone()),
        )?;
        let subject = one_line(raw_subject);
        vars.subject = Some(Value::from(subject.as_str()));
        let full = Value::from_object(vars);
        let mut text = self.render_part(ctx.purpose, locale, Part::Text, full.clone())?;
        if !text.ends_with('\n') {
            text.push('\n');
        }
        let html = self.render_part(ctx.purpose, locale, Part::Html, full)?;
        Ok(RenderedMail {
            subject,
            text,
            html,
            locale: locale.to_owned(),
        })
    }

    fn render_part(
        &self,
        purpose: Purpose,
        locale: &str,
        part: Part,
        ctx: Value,
    ) -> Result<String, TemplateError> {
        let name = template_name(purpose, locale, part);
        let error = |source| TemplateError::Template {
            file: match self.origins.get(&name) {
                Some(origin) => describe(&name, origin),
                None => name.clone(),
            },
            source,
        };
        self.env
            .get_template(&name)
            .map_err(error)?
            .render(ctx)
            .map_err(error)
    }
}

/// Renders with the compiled plain templates (subject, text, HTML): the same
/// values as [`MailVars`], without minijinja's.
pub(super) fn render_plain(
    plain: &[Plain; 3],
    locale: &str,
    ctx: &MailContext<'_>,
) -> RenderedMail {
    let (amount, unit) = validity(ctx.ttl);
    let expires_at = rfc3339::format(ctx.expires_at);
    let valid_for = valid_for(locale, amount, unit);
    let mut values = Values {
        name: ctx.name.filter(|n| !n.trim().is_empty()),
        email: ctx.email,
        link: ctx.link,
        code: ctx.code,
        purpose: ctx.purpose.as_str(),
        locale,
        expires_at: &expires_at,
        ttl_seconds: ctx.ttl.as_secs(),
        valid_for: &valid_for,
        valid_for_amount: amount,
        valid_for_unit: unit.key(),
        // The subject template cannot name it (compiling refuses it there).
        subject: "",
    };
    let [subject, text, html] = plain;
    let subject = one_line(subject.render(&values));
    values.subject = &subject;
    let mut text = text.render(&values);
    if !text.ends_with('\n') {
        text.push('\n');
    }
    let html = html.render(&values);
    RenderedMail {
        subject,
        text,
        html,
        locale: locale.to_owned(),
    }
}

/// The subject on one line whatever the template's white space (lettre
/// encodes the rest); most subjects are already, and are kept as they are.
fn one_line(raw: String) -> String {
    let single = !raw.starts_with(char::is_whitespace)
        && !raw.ends_with(char::is_whitespace)
        && !raw
            .split(' ')
            .any(|word| word.is_empty() || word.contains(char::is_whitespace));
    if single {
        return raw;
    }
    raw.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The variables a mail's templates see (module docs, "Variables"), each
/// built once per mail; `subject` only once the subject is rendered, so the
/// subject template cannot use it (strict mode: an error, as any undefined
/// variable).
#[derive(Debug, Clone)]
struct MailVars {
    name: Value,
    email: Value,
    link: Value,
    code: Value,
    purpose: Value,
    locale: Value,
    expires_at: Value,
    ttl_seconds: Value,
    valid_for: Value,
    valid_for_amount: Value,
    valid_for_unit: Value,
    subject: Option<Value>,
}

/// [`MailVars`]' names, `subject` last.
pub(super) static MAIL_VARS: [&str; 12] = [
    "name",
    "email",
    "link",
    "code",
    "purpose",
    "locale",
    "expires_at",
    "ttl_seconds",
    "valid_for",
    "valid_for_amount",
    "valid_for_unit",
    "subject",
];

impl Object for MailVars {
    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        let value = match key.as_str()? {
            "name" => &self.name,
            "email" => &self.email,
            "link" => &self.link,
            "code" => &self.code,
            "purpose" => &self.purpose,
            "locale" => &self.locale,
            "expires_at" => &self.expires_at,
            "ttl_seconds" => &self.ttl_seconds,
            "valid_for" => &self.valid_for,
            "valid_for_amount" => &self.valid_for_amount,
            "valid_for_unit" => &self.valid_for_unit,
            "subject" => self.subject.as_ref()?,
            _ => return None,
        };
        Some(value.clone())
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        let names = if self.subject.is_some() {
            &MAIL_VARS[..]
        } else {
            &MAIL_VARS[..11]
        };
        Enumerator::Str(names)
    }
}

pub(super) fn write_html_escaped(out: &mut impl fmt::Write, mut s: &str) -> fmt::Result {
    // The five characters are ASCII, so every cut falls on a character
    // boundary.
    while let Some(i) = next_to_escape(s.as_bytes()) {
        let entity = match s.as_bytes()[i] {
            b'&' => "&amp;",
            b'<' => "&lt;",
            b'>' => "&gt;",
            b'"' => "&quot;",
            _ => "&#39;",
        };
        out.write_str(&s[..i])?;
        out.write_str(entity)?;
        s = &s[i + 1..];
    }
    out.write_str(s)
}

/// Where the first of `& < > " '` is: two vectorized scans (the quotes only
/// up to the first of the others), where a byte at a time cost seven
/// instructions a byte on the links and addresses of every mail, which
/// mostly have none.
fn next_to_escape(bytes: &[u8]) -> Option<usize> {
    let markup = memchr::memchr3(b'&', b'<', b'>', bytes);
    let quote = memchr::memchr2(b'"', b'\'', &bytes[..markup.unwrap_or(bytes.len())]);
    quote.or(markup)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Unit {
    Second,
    Minute,
    Hour,
    Day,
}

impl Unit {
    fn key(self) -> &'static str {
        match self {
            Unit::Second => "second",
            Unit::Minute => "minute",
            Unit::Hour => "hour",
            Unit::Day => "day",
        }
    }
}

/// The link's lifetime in the largest unit that states it exactly, else
/// rounded down (a mail never promises more time than the token gives).
pub(super) fn validity(ttl: Duration) -> (u64, Unit) {
    const MINUTE: u64 = 60;
    const HOUR: u64 = 3600;
    const DAY: u64 = 86_400;
    let s = ttl.as_secs();
    if s >= DAY && s.is_multiple_of(DAY) {
        (s / DAY, Unit::Day)
    } else if s >= HOUR && (s.is_multiple_of(HOUR) || s >= DAY) {
        (s / HOUR, Unit::Hour)
    } else if s >= MINUTE {
        (s / MINUTE, Unit::Minute)
    } else {
        (s, Unit::Second)
    }
}

/// "1 hour" / "30 minutes"; "1 小时" for Chinese (the template adds "内有效").
/// Other locales get the English form; their templates can use
/// `valid_for_amount` and `valid_for_unit` instead.
pub(super) fn valid_for(locale: &str, amount: u64, unit: Unit) -> String {
    let primary = locale.split('-').next().unwrap_or(locale);
    if primary.eq_ignore_ascii_case("zh") {
        let word = match unit {
            Unit::Second => "秒",
            Unit::Minute => "分钟",
            Unit::Hour => "小时",
            Unit::Day => "天",
        };
        return format!("{amount} {word}");
    }
    let plural = if amount == 1 { "" } else { "s" };
    format!("{amount} {}{plural}", unit.key())
}
