//! Loading: the built-in templates, `TEMPLATES_DIR`'s files over them (a
//! file name says purpose, locale and part), the minijinja environment, and
//! the start-up check that renders every template with sample data.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use minijinja::{AutoEscape, Environment, UndefinedBehavior};
use time::OffsetDateTime;
use verimail_shared::events::{Purpose, validate_locale};

use super::plain::Plain;
use super::render::{render_plain, write_html_escaped};
use super::{MailContext, Part, TemplateError, Templates, template_name};

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
pub(super) enum Origin {
    BuiltIn,
    File(PathBuf),
}

struct Source {
    text: String,
    origin: Origin,
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

        let mut env = environment();
        let mut locales: HashMap<Purpose, BTreeSet<String>> = HashMap::new();
        let mut origins = HashMap::new();
        let mut parts: HashMap<(Purpose, String), [Option<Plain>; 3]> = HashMap::new();
        let mut names: Vec<_> = sources.into_iter().collect();
        // Deterministic order: the first broken file reported is always the same one.
        names.sort_by_key(|((p, l, part), _)| template_name(*p, l, *part));
        for ((purpose, locale, part), source) in names {
            let name = template_name(purpose, &locale, part);
            parts.entry((purpose, locale.clone())).or_default()[part as usize] =
                Plain::compile(&source.text, part == Part::Html, part != Part::Subject);
            env.add_template_owned(name.clone(), source.text)
                .map_err(|e| TemplateError::Template {
                    file: describe(&name, &source.origin),
                    source: e,
                })?;
            origins.insert(name, source.origin);
            locales.entry(purpose).or_default().insert(locale);
        }
        let mut templates = Self {
            env,
            locales: locales
                .into_iter()
                .map(|(p, set)| (p, set.into_iter().collect()))
                .collect(),
            origins,
            plain: HashMap::new(),
        };
        templates.check(parts)?;
        Ok(templates)
    }

    /// Renders every template with sample data, with and without a name, so
    /// runtime errors (unknown filter, undefined variable) show at start; and
    /// keeps the `parts` compiled as plain templates of a purpose and locale
    /// where all three are and render every sample exactly as minijinja
    /// renders their sources (one minijinja render per sample serves both).
    fn check(
        &mut self,
        mut parts: HashMap<(Purpose, String), [Option<Plain>; 3]>,
    ) -> Result<(), TemplateError> {
        let mut alike = Vec::new();
        for purpose in Purpose::ALL {
            for locale in self.locales_for(purpose).iter().map(String::as_str) {
                let mut plain = match parts.remove(&(purpose, locale.to_owned())) {
                    Some([Some(subject), Some(text), Some(html)]) => Some([subject, text, html]),
                    _ => None,
                };
                for sample in samples(purpose) {
                    let jinja = self.render_with_minijinja(locale, &sample)?;
                    if let Some(fast) = plain.as_ref().map(|p| render_plain(p, locale, &sample))
                        && (&jinja.subject, &jinja.text, &jinja.html)
                            != (&fast.subject, &fast.text, &fast.html)
                    {
                        tracing::warn!(
                            purpose = purpose.as_str(),
                            locale,
                            "a template renders differently without minijinja; minijinja renders it"
                        );
                        plain = None;
                    }
                }
                if let Some(plain) = plain {
                    alike.push((purpose, locale.to_owned(), plain));
                }
            }
        }
        for (purpose, locale, plain) in alike {
            self.plain.entry(purpose).or_default().insert(locale, plain);
        }
        Ok(())
    }
}

/// The start-up check's mails: with a name, a blank one, one to escape and
/// none; with a link and a code, only a link and only a code.
fn samples(purpose: Purpose) -> Vec<MailContext<'static>> {
    let expires_at = OffsetDateTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let link = Some("https://verify.example.com/confirm/sample-token?a=1&b=\"2\"");
    let code = Some("123456");
    let mut samples = Vec::new();
    for name in [Some("Alice"), Some(" "), Some("O'Neil & <Co>"), None] {
        for (link, code) in [(link, code), (link, None), (None, code)] {
            samples.push(MailContext {
                name,
                email: "alice+x@example.com",
                link,
                code,
                purpose,
                expires_at,
                ttl: Duration::from_secs(5400),
            });
        }
    }
    samples
}

/// The minijinja environment the templates are added to: strict about
/// undefined variables, `.html` templates HTML-escaped.
pub(super) fn environment() -> Environment<'static> {
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
    env
}

pub(super) fn describe(name: &str, origin: &Origin) -> String {
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
pub(super) fn parse_file_name(name: &str) -> Result<Option<(Purpose, String, Part)>, String> {
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
