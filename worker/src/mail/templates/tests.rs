//! Templates: loading, overrides, locale choice, escaping, every variable.
use std::time::Duration;

use time::OffsetDateTime;

use super::load::parse_file_name;
use super::render::{valid_for, validity, write_html_escaped};
use super::*;

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn ctx<'a>(name: Option<&'a str>, purpose: Purpose) -> MailContext<'a> {
    MailContext {
        name,
        email: "alice@example.com",
        link: Some("http://127.0.0.1:8080/confirm/abc.DEF-123_x"),
        code: None,
        purpose,
        expires_at: OffsetDateTime::UNIX_EPOCH,
        ttl: Duration::from_secs(3600),
    }
}

/// A fresh folder under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(files: &[(&str, &str)]) -> Result<Self, std::io::Error> {
        let dir = std::env::temp_dir().join(format!("verimail-templates-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir)?;
        for (name, text) in files {
            std::fs::write(dir.join(name), text)?;
        }
        Ok(Self(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn both_built_in_locales_render_for_both_purposes() -> TestResult {
    let t = Templates::load(None)?;
    let en = t.render(Some("en"), &ctx(Some("Alice"), Purpose::VerifyEmail))?;
    assert_eq!(en.locale, "en");
    assert_eq!(en.subject, "Confirm your email address");
    assert!(en.text.contains("Hello Alice,"), "{}", en.text);
    assert!(en.text.contains("confirm your address"), "{}", en.text);
    assert!(en.text.contains("valid for 1 hour"), "{}", en.text);
    assert!(
        en.text
            .contains("http://127.0.0.1:8080/confirm/abc.DEF-123_x\n")
    );
    assert!(
        en.html
            .contains(r#"href="http://127.0.0.1:8080/confirm/abc.DEF-123_x""#)
    );

    let zh = t.render(Some("zh-CN"), &ctx(None, Purpose::VerifyEmail))?;
    assert_eq!(zh.locale, "zh-CN");
    assert_eq!(zh.subject, "请确认您的邮箱地址");
    assert!(zh.text.starts_with("您好："), "{}", zh.text);
    assert!(zh.text.contains("1 小时内有效"), "{}", zh.text);

    let reset = t.render(Some("en"), &ctx(None, Purpose::ResetPassword))?;
    assert_eq!(reset.subject, "Reset your password");
    assert!(reset.text.contains("reset your password"), "{}", reset.text);
    assert!(reset.html.contains("Reset your password"));
    let reset_zh = t.render(Some("zh-CN"), &ctx(Some("小明"), Purpose::ResetPassword))?;
    assert_eq!(reset_zh.subject, "重置您的密码");
    assert!(reset_zh.html.contains("小明，您好："));
    Ok(())
}

#[test]
fn the_code_stands_on_a_line_of_its_own_and_large_in_every_built_in_mail() -> TestResult {
    let t = Templates::load(None)?;
    for purpose in Purpose::ALL {
        for locale in ["en", "zh-CN"] {
            let mut c = ctx(Some("Alice"), purpose);
            c.code = Some("402917");
            let mail = t.render(Some(locale), &c)?;
            assert!(
                mail.text.lines().any(|l| l.trim() == "402917"),
                "{purpose:?} {locale}: {}",
                mail.text
            );
            let big = mail
                .html
                .lines()
                .find(|l| l.contains("402917"))
                .ok_or("no code in the HTML part")?;
            assert!(big.contains("font-size:32px"), "{big}");
            // Both: the link is there too.
            assert!(mail.text.contains("/confirm/abc.DEF-123_x"));
            assert!(
                mail.html
                    .contains(r#"href="http://127.0.0.1:8080/confirm/"#)
            );

            // Code alone: not a trace of a link.
            c.link = None;
            let mail = t.render(Some(locale), &c)?;
            assert!(mail.text.lines().any(|l| l.trim() == "402917"));
            for part in [&mail.text, &mail.html] {
                assert!(!part.contains("/confirm/"), "{part}");
                assert!(!part.contains("href"), "{part}");
                assert!(!part.contains("none"), "{part}");
            }

            // Link alone: no code, and no word about one.
            let mail = t.render(Some(locale), &ctx(None, purpose))?;
            assert!(!mail.text.contains("402917"));
            assert!(!mail.text.to_lowercase().contains("code"), "{}", mail.text);
            assert!(!mail.text.contains("验证码"), "{}", mail.text);
        }
    }
    Ok(())
}

#[test]
fn an_override_can_show_the_code() -> TestResult {
    let dir = TempDir::new(&[(
        "verify_email.en.txt",
        "{% if code %}Your code: [{{ code }}]{% endif %}{% if link %} or {{ link }}{% endif %}",
    )])?;
    let t = Templates::load(Some(&dir.0))?;
    let mut c = ctx(None, Purpose::VerifyEmail);
    c.code = Some("0123456789");
    c.link = None;
    let mail = t.render(Some("en"), &c)?;
    assert_eq!(mail.text, "Your code: [0123456789]\n");
    Ok(())
}

#[test]
fn the_name_is_escaped_in_html_and_verbatim_in_text() -> TestResult {
    let t = Templates::load(None)?;
    let mail = t.render(
        None,
        &ctx(Some("<script>alert(1)</script>"), Purpose::VerifyEmail),
    )?;
    assert!(mail.html.contains("&lt;script&gt;"), "{}", mail.html);
    assert!(!mail.html.contains("<script>"));
    assert!(mail.text.contains("Hello <script>alert(1)</script>,"));
    Ok(())
}

#[test]
fn template_syntax_in_a_name_is_shown_not_evaluated() -> TestResult {
    let t = Templates::load(None)?;
    let mail = t.render(
        None,
        &ctx(
            Some("{{ 7*7 }}{% if true %}x{% endif %}"),
            Purpose::VerifyEmail,
        ),
    )?;
    assert!(
        mail.text
            .contains("Hello {{ 7*7 }}{% if true %}x{% endif %},"),
        "{}",
        mail.text
    );
    assert!(!mail.text.contains("49"));
    assert!(mail.html.contains("{{ 7*7 }}"), "{}", mail.html);
    Ok(())
}

#[test]
fn locales_fall_back_by_subtag_then_to_english() -> TestResult {
    let t = Templates::load(None)?;
    let c = ctx(None, Purpose::VerifyEmail);
    assert_eq!(t.render(Some("zh-CN-x-private"), &c)?.locale, "zh-CN");
    assert_eq!(t.render(Some("zh-cn"), &c)?.locale, "zh-CN");
    assert_eq!(t.render(Some("zh-Hant-TW"), &c)?.locale, "en");
    assert_eq!(t.render(Some("en-GB"), &c)?.locale, "en");
    assert_eq!(t.render(Some("de"), &c)?.locale, "en");
    assert_eq!(t.render(None, &c)?.locale, "en");
    Ok(())
}

#[test]
fn validity_is_worded_in_the_largest_exact_unit() {
    let en = |s| {
        let (a, u) = validity(Duration::from_secs(s));
        valid_for("en", a, u)
    };
    assert_eq!(en(3600), "1 hour");
    assert_eq!(en(7200), "2 hours");
    assert_eq!(en(1800), "30 minutes");
    assert_eq!(en(5400), "90 minutes");
    assert_eq!(en(86_400), "1 day");
    assert_eq!(en(3 * 86_400), "3 days");
    assert_eq!(en(90_000), "25 hours");
    assert_eq!(en(61), "1 minute");
    assert_eq!(en(45), "45 seconds");
    let (a, u) = validity(Duration::from_secs(1800));
    assert_eq!(valid_for("zh-CN", a, u), "30 分钟");
    let (a, u) = validity(Duration::from_secs(2 * 86_400));
    assert_eq!(valid_for("zh", a, u), "2 天");
}

#[test]
fn a_broken_override_fails_loading_and_names_its_file() -> TestResult {
    let dir = TempDir::new(&[("verify_email.en.txt", "Hello {{ name \n")])?;
    let err = Templates::load(Some(&dir.0))
        .err()
        .ok_or("a broken template loaded")?;
    let message = err.to_string();
    assert!(
        message.contains(&dir.0.join("verify_email.en.txt").display().to_string()),
        "{message}"
    );
    assert!(message.contains("syntax error"), "{message}");

    let dir = TempDir::new(&[("verify_email.en.html", "{{ link | no_such_filter }}")])?;
    let message = Templates::load(Some(&dir.0))
        .err()
        .ok_or("unknown filter loaded")?
        .to_string();
    assert!(message.contains("verify_email.en.html"), "{message}");

    let dir = TempDir::new(&[("reset_password.zh-CN.subject.txt", "{{ nmae }}")])?;
    let message = Templates::load(Some(&dir.0))
        .err()
        .ok_or("typo loaded")?
        .to_string();
    assert!(
        message.contains("reset_password.zh-CN.subject.txt"),
        "{message}"
    );
    assert!(message.contains("undefined"), "{message}");
    Ok(())
}

#[test]
fn an_override_dir_can_add_a_locale_and_replace_a_part() -> TestResult {
    let dir = TempDir::new(&[
        ("verify_email.fr.subject.txt", "Confirmez votre adresse\n"),
        (
            "verify_email.fr.txt",
            "Bonjour{% if name %} {{ name }}{% endif %},\n{{ link }}\nValable {{ valid_for_amount }} {% if valid_for_unit == 'hour' %}heure(s){% else %}{{ valid_for_unit }}{% endif %}.",
        ),
        (
            "verify_email.fr.html",
            "<p>Bonjour {{ name }}</p><a href=\"{{ link }}\">{{ subject }}</a>",
        ),
        ("verify_email.en.subject.txt", "Please  confirm\n  now"),
        ("README.md", "not a template"),
    ])?;
    let t = Templates::load(Some(&dir.0))?;
    let fr = t.render(
        Some("fr-CA"),
        &ctx(Some("<b>Zoé</b>"), Purpose::VerifyEmail),
    )?;
    assert_eq!(fr.locale, "fr");
    assert_eq!(fr.subject, "Confirmez votre adresse");
    assert!(fr.text.contains("Bonjour <b>Zoé</b>,"), "{}", fr.text);
    assert!(fr.text.contains("Valable 1 heure(s)."), "{}", fr.text);
    assert!(fr.html.contains("&lt;b&gt;Zoé&lt;/b&gt;"), "{}", fr.html);
    // fr exists only for verify_email; the other purpose still falls back.
    assert_eq!(
        t.render(Some("fr"), &ctx(None, Purpose::ResetPassword))?
            .locale,
        "en"
    );
    // A single replaced part; the built-in text and HTML stay.
    let en = t.render(Some("en"), &ctx(None, Purpose::VerifyEmail))?;
    assert_eq!(en.subject, "Please confirm now");
    assert!(en.text.contains("confirm your address"));
    Ok(())
}

#[test]
fn an_incomplete_new_locale_or_a_misnamed_file_fails_loading() -> TestResult {
    let dir = TempDir::new(&[("verify_email.fr.txt", "Bonjour")])?;
    let message = Templates::load(Some(&dir.0))
        .err()
        .ok_or("incomplete loaded")?
        .to_string();
    assert!(
        message.contains("verify_email.fr.html") || message.contains("verify_email.fr.subject.txt"),
        "{message}"
    );

    let dir = TempDir::new(&[("verify-email.en.txt", "Hello")])?;
    let message = Templates::load(Some(&dir.0))
        .err()
        .ok_or("misnamed loaded")?
        .to_string();
    assert!(message.contains("verify-email.en.txt"), "{message}");

    let missing = std::env::temp_dir().join(format!("verimail-none-{}", uuid::Uuid::new_v4()));
    let message = Templates::load(Some(&missing))
        .err()
        .ok_or("missing dir loaded")?
        .to_string();
    assert!(message.contains("cannot read"), "{message}");
    Ok(())
}

#[test]
fn file_names_parse_and_locales_are_normalized() {
    assert!(matches!(
        parse_file_name("verify_email.zh-hant-tw.subject.txt"),
        Ok(Some((Purpose::VerifyEmail, ref l, Part::Subject))) if l == "zh-Hant-TW"
    ));
    assert!(matches!(parse_file_name("notes.md"), Ok(None)));
    assert!(parse_file_name("reset_password.html").is_err());
    assert!(parse_file_name("welcome.en.txt").is_err());
    assert!(parse_file_name("verify_email.e n.txt").is_err());
}

#[test]
fn html_escaping_replaces_the_five_characters_as_jinja2_does() {
    let reference = |s: &str| {
        s.chars()
            .map(|c| match c {
                '&' => "&amp;".to_owned(),
                '<' => "&lt;".to_owned(),
                '>' => "&gt;".to_owned(),
                '"' => "&quot;".to_owned(),
                '\'' => "&#39;".to_owned(),
                c => c.to_string(),
            })
            .collect::<String>()
    };
    let pieces = [
        "a",
        "&",
        "<",
        ">",
        "\"",
        "'",
        "é",
        "/",
        "请",
        "https://x.test/c?a=1",
    ];
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    for len in 0..300 {
        let mut input = String::new();
        for _ in 0..len % 60 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            input.push_str(pieces[(seed % pieces.len() as u64) as usize]);
        }
        let mut out = String::new();
        assert!(write_html_escaped(&mut out, &input).is_ok());
        assert_eq!(out, reference(&input), "{input:?}");
    }
}

#[test]
fn the_built_ins_render_without_minijinja_exactly_as_with_it() -> TestResult {
    let t = Templates::load(None)?;
    // Every built-in (two purposes, two locales) compiles as plain.
    assert_eq!(t.plain_count(), 4);
    let names = [
        None,
        Some("Alice"),
        Some("   "),
        Some("小明 <&> \"'"),
        Some("Zoë"),
    ];
    let links = [
        None,
        Some("http://127.0.0.1:8080/confirm/abc.DEF-123_x"),
        Some("https://a.example/c?t=1&u=<2>"),
    ];
    let codes = [None, Some("042917")];
    let ttls = [59, 60, 3600, 5400, 86_400, 90_061, 172_800];
    let mut compared = 0;
    for purpose in Purpose::ALL {
        for locale in ["en", "zh-CN"] {
            for name in names {
                for link in links {
                    for code in codes {
                        if link.is_none() && code.is_none() {
                            continue;
                        }
                        for ttl in ttls {
                            let ctx = MailContext {
                                name,
                                email: "o'neil+tag@example.com",
                                link,
                                code,
                                purpose,
                                expires_at: OffsetDateTime::UNIX_EPOCH
                                    + Duration::from_secs(1_900_000_000),
                                ttl: Duration::from_secs(ttl),
                            };
                            let plain = t.render_in(locale, &ctx)?;
                            let jinja = t.render_with_minijinja(locale, &ctx)?;
                            assert_eq!(plain.subject, jinja.subject);
                            assert_eq!(plain.text, jinja.text, "{purpose:?} {locale} {ctx:?}");
                            assert_eq!(plain.html, jinja.html, "{purpose:?} {locale} {ctx:?}");
                            compared += 1;
                        }
                    }
                }
            }
        }
    }
    assert_eq!(compared, 2 * 2 * 5 * 5 * 7);
    Ok(())
}

#[test]
fn an_override_that_is_not_plain_still_renders_with_minijinja() -> TestResult {
    let dir = TempDir::new(&[(
        "verify_email.en.txt",
        "{{ (name or 'friend')|upper }}: {{ link }}\n",
    )])?;
    let t = Templates::load(Some(&dir.0))?;
    // English verification is minijinja's now; the other three stay plain.
    assert_eq!(t.plain_count(), 3);
    let mail = t.render(Some("en"), &ctx(None, Purpose::VerifyEmail))?;
    assert_eq!(
        mail.text,
        "FRIEND: http://127.0.0.1:8080/confirm/abc.DEF-123_x\n"
    );
    assert_eq!(mail.subject, "Confirm your email address");

    // A plain override renders without minijinja, as minijinja would.
    let dir = TempDir::new(&[
        (
            "verify_email.fr.subject.txt",
            "  Confirmez\n   votre adresse  ",
        ),
        (
            "verify_email.fr.txt",
            "{% if name %}Bonjour {{ name }}{% else %}Bonjour{% endif %} : {{ link }} ({{ valid_for_amount }} {{ valid_for_unit }})",
        ),
        ("verify_email.fr.html", "<p>{{ subject }} {{ name }}</p>\n"),
    ])?;
    let t = Templates::load(Some(&dir.0))?;
    assert_eq!(t.plain_count(), 5);
    let mail = t.render(Some("fr"), &ctx(Some("<Zoé>"), Purpose::VerifyEmail))?;
    assert_eq!(mail.subject, "Confirmez votre adresse");
    assert_eq!(
        mail.text,
        "Bonjour <Zoé> : http://127.0.0.1:8080/confirm/abc.DEF-123_x (1 hour)\n"
    );
    assert_eq!(mail.html, "<p>Confirmez votre adresse &lt;Zoé&gt;</p>");
    Ok(())
}
