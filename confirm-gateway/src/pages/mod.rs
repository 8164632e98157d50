//! The HTML pages of `/confirm`: one self-contained template (inline CSS, no
//! scripts, nothing loaded from elsewhere) and its texts in each built-in locale.

use minijinja::{Environment, context};
use verimail_shared::events::resolve_locale;

use crate::answer::{Reply, Status};

/// Locales the pages ship in; `en` is the fallback.
pub const LOCALES: [&str; 2] = ["en", "zh-CN"];
/// The fallback locale.
pub const DEFAULT_LOCALE: &str = "en";

const TEMPLATE: &str = include_str!("templates/page.html");

/// The template environment, built once (autoescape on: the name ends in `.html`).
#[derive(Debug)]
pub struct Pages {
    env: Environment<'static>,
}

impl Default for Pages {
    fn default() -> Self {
        Self::new()
    }
}

impl Pages {
    /// Loads the embedded template.
    pub fn new() -> Self {
        let mut env = Environment::new();
        // The template is a compile-time constant covered by tests: it parses.
        if let Err(e) = env.add_template("page.html", TEMPLATE) {
            tracing::error!(error = %e, "the built-in page template does not parse");
        }
        Self { env }
    }

    /// The page for `reply` in `locale` (one of [`LOCALES`]).
    pub fn render(&self, reply: &Reply, locale: &'static str) -> String {
        let mut t = texts(reply.status, locale);
        if reply.status == Status::ConfirmRequired && !reply.single_use {
            // "This link works only once" is true of single-use links only.
            t.detail = None;
        }
        let (tone, icon) = match reply.status {
            Status::Verified | Status::AlreadyVerified => ("ok", "check"),
            Status::ConfirmRequired => ("info", "key"),
            Status::Expired | Status::RateLimited => ("warn", "clock"),
            Status::Used | Status::Invalid | Status::Unavailable => ("bad", "cross"),
        };
        // Only the outcomes that confirmed, or are about to, show the address.
        let email = match reply.status {
            Status::Verified | Status::AlreadyVerified | Status::ConfirmRequired => {
                reply.email.as_deref()
            }
            _ => None,
        };
        let ctx = context! {
            lang => locale,
            t => context! {
                title => t.title,
                heading => t.heading,
                lead => t.lead,
                detail => t.detail,
                button => t.button,
            },
            tone => tone,
            icon => icon,
            email => email,
            form => reply.status == Status::ConfirmRequired,
        };
        match self
            .env
            .get_template("page.html")
            .and_then(|tmpl| tmpl.render(ctx))
        {
            Ok(html) => html,
            Err(e) => {
                tracing::error!(error = %e, "page rendering failed");
                // Still an answer: the status code carries the meaning.
                format!("<!doctype html><title>{0}</title><h1>{0}</h1>", t.heading)
            }
        }
    }
}

/// The page locale: the token's own locale when it names one we ship (the mail
/// was in it), else the `Accept-Language` choice.
pub fn locale_for(token_locale: Option<&str>, accept_locale: &'static str) -> &'static str {
    match token_locale {
        Some(tag) => {
            let found = resolve_locale(Some(tag), &LOCALES, "");
            if found.is_empty() {
                accept_locale
            } else {
                found
            }
        }
        None => accept_locale,
    }
}

/// The best shipped locale for an `Accept-Language` header: tags in order of
/// their `q` weight, each resolved as the contract says (`zh-Hant-TW` → `zh-Hant`
/// → `zh`); the first that resolves wins, else `en`.
pub fn locale_from_accept_language(header: Option<&str>) -> &'static str {
    let Some(header) = header else {
        return DEFAULT_LOCALE;
    };
    let mut tags: Vec<(&str, f32)> = header
        .split(',')
        .take(32)
        .filter_map(|part| {
            let mut pieces = part.split(';');
            let tag = pieces.next()?.trim();
            if tag.is_empty() || tag == "*" {
                return None;
            }
            let q = pieces
                .find_map(|p| p.trim().strip_prefix("q="))
                .and_then(|q| q.trim().parse::<f32>().ok())
                .unwrap_or(1.0);
            (q > 0.0).then_some((tag, q))
        })
        .collect();
    // Stable: equal weights keep the header's order.
    tags.sort_by(|a, b| b.1.total_cmp(&a.1));
    tags.iter()
        .map(|(tag, _)| resolve_locale(Some(tag), &LOCALES, ""))
        .find(|found| !found.is_empty())
        .unwrap_or(DEFAULT_LOCALE)
}

struct Texts {
    title: &'static str,
    heading: &'static str,
    lead: &'static str,
    detail: Option<&'static str>,
    button: Option<&'static str>,
}

const fn t(
    title: &'static str,
    heading: &'static str,
    lead: &'static str,
    detail: Option<&'static str>,
) -> Texts {
    Texts {
        title,
        heading,
        lead,
        detail,
        button: None,
    }
}

fn texts(status: Status, locale: &str) -> Texts {
    if locale == "zh-CN" {
        return match status {
            Status::Verified => t(
                "邮箱已验证",
                "邮箱已验证",
                "您的邮箱地址已确认：",
                Some("现在可以关闭此页面。"),
            ),
            Status::AlreadyVerified => t(
                "邮箱已验证",
                "邮箱此前已验证",
                "该邮箱地址已经确认过了：",
                Some("无需再次操作，可以关闭此页面。"),
            ),
            Status::ConfirmRequired => Texts {
                button: Some("确认并继续"),
                ..t(
                    "请确认",
                    "请确认是您本人",
                    "为保护您的账户，请点击下方按钮以继续：",
                    Some("此链接只能使用一次。"),
                )
            },
            Status::Used => t(
                "链接已使用",
                "此链接已被使用",
                "该链接只能使用一次，且已经用过了。",
                Some("如需继续，请重新申请新的链接。"),
            ),
            Status::Expired => t(
                "链接已过期",
                "此链接已过期",
                "出于安全考虑，链接在一段时间后失效。",
                Some("请回到原网站或应用，重新申请新的链接。"),
            ),
            Status::Invalid => t(
                "链接无效",
                "此链接无效",
                "链接不完整或已损坏。",
                Some("请从邮件中完整复制链接，或重新申请新的链接。"),
            ),
            Status::RateLimited => t(
                "请稍后再试",
                "请求过于频繁",
                "请稍等片刻再打开此链接。",
                None,
            ),
            Status::Unavailable => t(
                "暂时无法处理",
                "服务暂时不可用",
                "我们暂时无法确认您的链接。",
                Some("请稍后重试，链接仍然有效直到过期。"),
            ),
        };
    }
    match status {
        Status::Verified => t(
            "Address confirmed",
            "Address confirmed",
            "Thank you, this address is now confirmed:",
            Some("You can close this page."),
        ),
        Status::AlreadyVerified => t(
            "Address already confirmed",
            "Already confirmed",
            "This address was confirmed before:",
            Some("Nothing more to do; you can close this page."),
        ),
        Status::ConfirmRequired => Texts {
            button: Some("Confirm and continue"),
            ..t(
                "Please confirm",
                "Is this you?",
                "To protect your account, press the button below to continue with:",
                Some("This link works only once."),
            )
        },
        Status::Used => t(
            "Link already used",
            "This link was already used",
            "The link works only once and has been used.",
            Some("If you still need to continue, please ask for a new link."),
        ),
        Status::Expired => t(
            "Link expired",
            "This link has expired",
            "For your security, links stop working after a while.",
            Some("Please go back to the site or app and ask for a new link."),
        ),
        Status::Invalid => t(
            "Invalid link",
            "This link is not valid",
            "The link is incomplete or damaged.",
            Some("Copy the whole link from the mail, or ask for a new one."),
        ),
        Status::RateLimited => t(
            "Too many attempts",
            "Too many attempts",
            "Please wait a moment before opening this link again.",
            None,
        ),
        Status::Unavailable => t(
            "Temporarily unavailable",
            "Temporarily unavailable",
            "We cannot confirm your link right now.",
            Some("Please try again in a few minutes; the link stays valid until it expires."),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_page_renders_in_every_locale_without_scripts_or_external_assets() {
        let pages = Pages::new();
        for locale in LOCALES {
            for status in Status::ALL {
                let mut reply = Reply::new(status);
                reply.email = Some("alice@example.com".into());
                let html = pages.render(&reply, locale);
                assert!(html.starts_with("<!doctype html>"), "{status:?} {locale}");
                assert!(html.contains(&format!("lang=\"{locale}\"")));
                for banned in ["<script", "src=", "href=", "http://", "https://"] {
                    assert!(!html.contains(banned), "{status:?} {locale} has {banned}");
                }
                assert_eq!(
                    html.contains("<form method=\"post\">"),
                    status == Status::ConfirmRequired
                );
            }
        }
    }

    #[test]
    fn addresses_are_escaped_and_hidden_on_refusals() {
        let pages = Pages::new();
        let mut reply = Reply::new(Status::Verified);
        reply.email = Some("<b>x</b>@example.com".into());
        let html = pages.render(&reply, "en");
        assert!(html.contains("&lt;b&gt;x&lt;"), "{html}");
        assert!(!html.contains("<b>"));
        reply.status = Status::Expired;
        assert!(!pages.render(&reply, "en").contains("example.com"));
    }

    #[test]
    fn accept_language_picks_the_heaviest_shipped_locale() {
        assert_eq!(locale_from_accept_language(None), "en");
        assert_eq!(
            locale_from_accept_language(Some("zh-CN,zh;q=0.9,en;q=0.8")),
            "zh-CN"
        );
        assert_eq!(
            locale_from_accept_language(Some("fr-FR, zh-cn;q=0.5")),
            "zh-CN"
        );
        assert_eq!(
            locale_from_accept_language(Some("en;q=0.1, zh-CN;q=0.9")),
            "zh-CN"
        );
        assert_eq!(locale_from_accept_language(Some("zh-CN;q=0, de")), "en");
        assert_eq!(locale_from_accept_language(Some("*")), "en");
    }

    #[test]
    fn the_token_locale_wins_when_shipped() {
        assert_eq!(locale_for(Some("zh-CN"), "en"), "zh-CN");
        assert_eq!(locale_for(Some("fr"), "zh-CN"), "zh-CN");
        assert_eq!(locale_for(None, "zh-CN"), "zh-CN");
    }
}
