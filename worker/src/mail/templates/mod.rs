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
//!
//! # Code map
//!
//! - `load`: the built-ins, `TEMPLATES_DIR`'s files and their names, the
//!   minijinja environment, and the start-up check that renders everything.
//! - `render`: one mail's three parts, the variables they see, the validity
//!   wording and the HTML escaping.

mod load;
mod plain;
mod render;

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;

use minijinja::Environment;
use verimail_shared::events::Purpose;

use load::Origin;

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

/// Built-in templates plus overrides from `TEMPLATES_DIR`.
pub struct Templates {
    env: Environment<'static>,
    /// Locales available per purpose, for the fallback.
    locales: HashMap<Purpose, Vec<String>>,
    /// Template name → where it came from (for runtime error messages).
    origins: HashMap<String, Origin>,
    /// Purpose → locale → its subject, text and HTML compiled as plain
    /// templates, where all three are and render as minijinja does
    /// (`plain`'s module docs).
    plain: HashMap<Purpose, HashMap<String, [plain::Plain; 3]>>,
}

impl fmt::Debug for Templates {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Templates")
            .field("locales", &self.locales)
            .finish_non_exhaustive()
    }
}

impl Templates {
    /// The locales available for `purpose`, sorted.
    pub fn locales_for(&self, purpose: Purpose) -> &[String] {
        self.locales.get(&purpose).map_or(&[], Vec::as_slice)
    }

    /// The plain templates of `purpose` in `locale`, if it has them.
    fn plain_for(&self, purpose: Purpose, locale: &str) -> Option<&[plain::Plain; 3]> {
        self.plain.get(&purpose)?.get(locale)
    }

    /// How many (purpose, locale) pairs render without minijinja (for tests).
    #[cfg(test)]
    fn plain_count(&self) -> usize {
        self.plain.values().map(HashMap::len).sum()
    }
}

#[cfg(test)]
mod tests;
