//! Mail templates (minijinja): built in per purpose and locale, overridable
//! from `TEMPLATES_DIR`.
//!
//! # Layout
//!
//! Each mail is three templates, named `{purpose}.{locale}.{part}`:
//!
//! | file | what | escaping |
//! |---|---|---|
//! | `verify_email.en.subject.txt` | the subject (white space, newlines included, collapses to single spaces) | none |
//! | `verify_email.en.txt` | the plain-text part | none |
//! | `verify_email.en.html` | the HTML part | HTML autoescape |
//!
//! `purpose` is `verify_email` or `reset_password`; `locale` a BCP 47 tag
//! (`en`, `zh-CN`, `fr`, `pt-BR`; case is normalized). The built-ins live in
//! `worker/templates/` (en and zh-CN) and are compiled into the binary.
//! `TEMPLATES_DIR` is one flat folder of such files: a file replaces the
//! built-in of the same name (any single part may be replaced), and a locale the
//! built-ins lack (`fr`) needs all three parts of a purpose. Other `.txt` and
//! `.html` files are an error (a misspelt name would otherwise be ignored
//! silently); files with other extensions and hidden files are ignored.
//!
//! # Variables
//!
//! `name` (string or none: test it with `{% if name %}`), `email`, `link`
//! (none with `CONFIRM_METHOD=code`), `code` (the one-time code's digits;
//! none with `CONFIRM_METHOD=link`), `purpose`, `locale` (the one chosen),
//! `expires_at` (RFC 3339, UTC), `ttl_seconds`, `valid_for` ("1 hour", "30 minutes"; "1 小时" for `zh*`),
//! `valid_for_amount` and `valid_for_unit` (`second`/`minute`/`hour`/`day`, to
//! word it in another language), and in the text and HTML parts `subject`.
//! Undefined variables are errors (strict mode), so a typo fails at start:
//! [`Templates::load`] renders every template with sample data, with and
//! without a name, and with a link and a code, only a link, and only a code.
//!
//! # Locale choice
//!
//! The request's `locale` falls back by subtags (`zh-Hant-TW` → `zh-Hant` →
//! `zh`) to [`DEFAULT_LOCALE`], among the locales available for the purpose.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use minijinja::value::{Enumerator, Object};
use minijinja::{AutoEscape, Environment, UndefinedBehavior, Value};
use time::OffsetDateTime;
use verimail_shared::events::{Purpose, resolve_locale, rfc3339, validate_locale};

use super::{MailContext, RenderedMail};

/// The locale used when nothing closer to the request's is available.
pub const DEFAULT_LOCALE: &str = "en";

/// A template failed to load or render (a startup error when loading).
///
/// The worker prefixes it with `TEMPLATES_DIR: `; each variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// The folder or a file in it could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// The folder or file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A `.txt` or `.html` file whose name is not `{purpose}.{locale}.{part}`.
    #[error(
        "{}: {problem} (expected {{purpose}}.{{locale}}.subject.txt, .txt or .html)",
        path.display()
    )]
    FileName {
        /// The file.
        path: PathBuf,
        /// What is wrong with its name.
        problem: String,
    },
    /// A locale the built-ins lack was given without all three parts.
    #[error("{} is missing: a new locale needs its subject, text and html templates", path.display())]
    Missing {
        /// The file that should exist.
        path: PathBuf,
    },
    /// A template failed to compile or to render.
    #[error("{file}: {source}")]
    Template {
        /// The template file (its path, or `built-in NAME`).
        file: String,
        /// minijinja's error (syntax error, unknown filter, undefined variable…).
        #[source]
        source: minijinja::Error,
    },
}

/// One of a mail's three templates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Part {
    Subject,
    Text,
    Html,
}

impl Part {
    const ALL: [Part; 3] = [Part::Subject, Part::Text, Part::Html];

    fn suffix(self) -> &'static str {
        match self {
            Part::Subject => "subject.txt",
            Part::Text => "txt",
            Part::Html => "html",
        }
    }
}

/// The template (and file) name, e.g. `verify_email.zh-CN.html`.
fn template_name(purpose: Purpose, locale: &str, part: Part) -> String {
    format!("{}.{locale}.{}", purpose.as_str(), part.suffix())
}

macro_rules! builtin {
    ($($name:literal),* $(,)?) => {
        [$(($name, include_str!(concat!("../../../templates/", $name)))),*]
    };
}

/// The built-in templates, compiled in.
const BUILTIN: [(&str, &str); 12] = builtin![
    "verify_email.en.subject.txt",
    "verify_email.en.txt",
    "verify_email.en.html",
    "verify_email.zh-CN.subject.txt",
    "verify_email.zh-CN.txt",
    "verify_email.zh-CN.html",
    "reset_password.en.subject.txt",
    "reset_password.en.txt",
    "reset_password.en.html",
    "reset_password.zh-CN.subject.txt",
    "reset_password.zh-CN.txt",
    "reset_password.zh-CN.html",
];

/// Where a template came from, for error messages.
#[derive(Debug, Clone)]
enum Origin {
    BuiltIn,
    File(PathBuf),
}

struct Source {
    text: String,
    origin: Origin,
}

/// Built-in templates plus overrides from `TEMPLATES_DIR`.
pub struct Templates {
    env: Environment<'static>,
    /// Locales available per purpose, for the fallback.
    locales: HashMap<Purpose, Vec<String>>,
    /// Template name → where it came from (for runtime error messages).
    origins: HashMap<String, Origin>,
}

impl fmt::Debug for Templates {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Templates")
            .field("locales", &self.locales)
            .finish_non_exhaustive()
    }
}

impl Templates {
    /// Loads and checks every template (a broken one is a startup error).
    pub fn load(dir: Option<&Path>) -> Result<Self, TemplateError> {
        let mut sources: HashMap<(Purpose, String, Part), Source> = HashMap::new();
        for (name, text) in BUILTIN {
            // The built-in names are fixed above and covered by tests.
            if let Ok(Some(key)) = parse_file_name(name) {
                sources.insert(
                    key,
                    Source {
                        text: text.to_owned(),
                        origin: Origin::BuiltIn,
                    },
                );
            }
        }
        let builtin_keys: BTreeSet<(&'static str, String)> = sources
            .keys()
            .map(|(p, l, _)| (p.as_str(), l.clone()))
            .collect();
        if let Some(dir) = dir {
            read_overrides(dir, &mut sources)?;
            // A new locale must come whole: a missing part would otherwise
            // surface only when a user with that locale signs up.
            let mut keys: Vec<(Purpose, String)> =
                sources.keys().map(|(p, l, _)| (*p, l.clone())).collect();
            keys.sort_by(|a, b| (a.0.as_str(), &a.1).cmp(&(b.0.as_str(), &b.1)));
            keys.dedup();
            for (purpose, locale) in keys {
                if builtin_keys.contains(&(purpose.as_str(), locale.clone())) {
                    continue;
                }
                for part in Part::ALL {
                    if !sources.contains_key(&(purpose, locale.clone(), part)) {
                        return Err(TemplateError::Missing {
                            path: dir.join(template_name(purpose, &locale, part)),
                        });
                    }
                }
            }
        }

        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.set_auto_escape_callback(|name| {
            if name.ends_with(".html") {
                AutoEscape::Html
            } else {
                AutoEscape::None
            }
        });
        // HTML escaping as in Jinja2/markupsafe (`& < > " '`): minijinja also
        // escapes `/`, which would turn every link into `http:&#x2f;&#x2f;…`.
        env.set_formatter(|out, state, value| {
            if matches!(state.auto_escape(), AutoEscape::Html)
                && !value.is_safe()
                && let Some(s) = value.as_str()
            {
                return write_html_escaped(out, s).map_err(minijinja::Error::from);
            }
            minijinja::escape_formatter(out, state, value)
        });
        let mut locales: HashMap<Purpose, BTreeSet<String>> = HashMap::new();
        let mut origins = HashMap::new();
        let mut names: Vec<_> = sources.into_iter().collect();
        // Deterministic order: the first broken file reported is always the same one.
        names.sort_by_key(|((p, l, part), _)| template_name(*p, l, *part));
        for ((purpose, locale, part), source) in names {
            let name = template_name(purpose, &locale, part);
            env.add_template_owned(name.clone(), source.text)
                .map_err(|e| TemplateError::Template {
                    file: describe(&name, &source.origin),
                    source: e,
                })?;
            origins.insert(name, source.origin);
            locales.entry(purpose).or_default().insert(locale);
        }
        let templates = Self {
            env,
            locales: locales
                .into_iter()
                .map(|(p, set)| (p, set.into_iter().collect()))
                .collect(),
            origins,
        };
        templates.check()?;
        Ok(templates)
    }

    /// Renders every template with sample data, with and without a name, so
    /// runtime errors (unknown filter, undefined variable) show at start.
    fn check(&self) -> Result<(), TemplateError> {
        let expires_at = OffsetDateTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        for purpose in Purpose::ALL {
            for locale in self.locales_for(purpose) {
                let link = Some("https://verify.example.com/confirm/sample-token");
                let code = Some("123456");
                for name in [Some("Alice"), None] {
                    for (link, code) in [(link, code), (link, None), (None, code)] {
                        let sample = MailContext {
                            name,
                            email: "alice@example.com",
                            link,
                            code,
                            purpose,
                            expires_at,
                            ttl: Duration::from_secs(3600),
                        };
                        self.render_in(locale, &sample)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// The locales available for `purpose`, sorted.
    pub fn locales_for(&self, purpose: Purpose) -> Vec<&str> {
        self.locales
            .get(&purpose)
            .map(|l| l.iter().map(String::as_str).collect())
            .unwrap_or_default()
    }

    /// Renders the mail for `purpose` in the best locale for `locale`.
    pub fn render(
        &self,
        locale: Option<&str>,
        ctx: &MailContext<'_>,
    ) -> Result<RenderedMail, TemplateError> {
        let available = self.locales_for(ctx.purpose);
        let chosen = resolve_locale(locale, &available, DEFAULT_LOCALE);
        self.render_in(chosen, ctx)
    }

    fn render_in(
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
        // One line whatever the template's white space (lettre encodes the rest).
        let subject = raw_subject.split_whitespace().collect::<Vec<_>>().join(" ");
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
static MAIL_VARS: [&str; 12] = [
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

fn write_html_escaped(out: &mut impl fmt::Write, s: &str) -> fmt::Result {
    // A byte scan: the five characters are ASCII, so every cut falls on a
    // character boundary (`str::find` with a set of chars decodes each char,
    // several times slower on the links and addresses of every mail).
    let mut start = 0;
    for (i, byte) in s.bytes().enumerate() {
        let entity = match byte {
            b'&' => "&amp;",
            b'<' => "&lt;",
            b'>' => "&gt;",
            b'"' => "&quot;",
            b'\'' => "&#39;",
            _ => continue,
        };
        out.write_str(&s[start..i])?;
        out.write_str(entity)?;
        start = i + 1;
    }
    out.write_str(&s[start..])
}

fn describe(name: &str, origin: &Origin) -> String {
    match origin {
        Origin::BuiltIn => format!("built-in {name}"),
        Origin::File(path) => path.display().to_string(),
    }
}

/// Reads `dir`'s templates over the built-ins.
fn read_overrides(
    dir: &Path,
    sources: &mut HashMap<(Purpose, String, Part), Source>,
) -> Result<(), TemplateError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| TemplateError::Io { path, source }
    };
    let mut entries = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(io(dir))?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        if name.starts_with('.') || !path.is_file() {
            continue;
        }
        let key = match parse_file_name(&name) {
            Ok(Some(key)) => key,
            Ok(None) => continue,
            Err(problem) => return Err(TemplateError::FileName { path, problem }),
        };
        let text = std::fs::read_to_string(&path).map_err(io(&path))?;
        sources.insert(
            key,
            Source {
                text,
                origin: Origin::File(path),
            },
        );
    }
    Ok(())
}

/// `verify_email.zh-cn.html` → (VerifyEmail, "zh-CN", Html); `Ok(None)` for
/// files that are not templates (other extensions).
fn parse_file_name(name: &str) -> Result<Option<(Purpose, String, Part)>, String> {
    let (stem, part) = if let Some(stem) = name.strip_suffix(".subject.txt") {
        (stem, Part::Subject)
    } else if let Some(stem) = name.strip_suffix(".txt") {
        (stem, Part::Text)
    } else if let Some(stem) = name.strip_suffix(".html") {
        (stem, Part::Html)
    } else {
        return Ok(None);
    };
    let (purpose, locale) = stem
        .split_once('.')
        .ok_or_else(|| "no locale in the name".to_owned())?;
    let purpose: Purpose = purpose.parse()?;
    validate_locale(locale)?;
    Ok(Some((purpose, canonical_locale(locale), part)))
}

/// BCP 47 case conventions (`zh-hant-tw` → `zh-Hant-TW`), so a file named
/// `zh-cn` overrides the built-in `zh-CN` instead of adding a twin.
fn canonical_locale(tag: &str) -> String {
    tag.split('-')
        .enumerate()
        .map(|(i, sub)| match (i, sub.len()) {
            (0, _) => sub.to_ascii_lowercase(),
            (_, 2) => sub.to_ascii_uppercase(),
            (_, 4) => {
                let lower = sub.to_ascii_lowercase();
                let mut chars = lower.chars();
                chars
                    .next()
                    .map(|c| c.to_ascii_uppercase().to_string() + chars.as_str())
                    .unwrap_or_default()
            }
            _ => sub.to_ascii_lowercase(),
        })
        .collect::<Vec<_>>()
        .join("-")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unit {
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
fn validity(ttl: Duration) -> (u64, Unit) {
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
fn valid_for(locale: &str, amount: u64, unit: Unit) -> String {
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

#[cfg(test)]
mod tests;
