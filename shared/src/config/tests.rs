//! The configuration as a whole: defaults, errors naming their variable.

use super::*;
use std::collections::HashMap;

fn config(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
    let map: HashMap<String, String> = vars
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    Config::from_lookup(|name| map.get(name).cloned())
}

#[test]
fn defaults_match_the_contract() -> Result<(), ConfigError> {
    let c = config(&[])?;
    assert_eq!(c.amqp_urls, vec![defaults::AMQP_URL.to_owned()]);
    assert_eq!(c.database_url, defaults::DATABASE_URL);
    assert!(c.auto_migrate);
    assert_eq!(c.namespace, "verimail");
    assert_eq!(c.salt, "email-confirm");
    assert_eq!(c.token_format, TokenFormat::V1);
    assert!(!c.accept_itsdangerous);
    assert_eq!(c.itsdangerous_digest, Digest::Sha1);
    assert_eq!(c.token_ttl, Duration::from_secs(3600));
    assert_eq!(c.throttle, Duration::from_secs(60));
    assert_eq!(c.public_base_url, "http://127.0.0.1:8080");
    assert!(c.return_url_allowlist.is_empty());
    assert!(matches!(&c.mail_url, MailUrl::File(d) if d == &PathBuf::from("./outbox")));
    assert!(c.mail_url_is_default);
    assert_eq!(c.mail_rate_limit, None);
    assert_eq!(c.mail_from, "verimail <no-reply@localhost>");
    assert_eq!(c.worker_concurrency, 256);
    assert_eq!(c.worker_threads, 1);
    assert_eq!(c.mail_retry_window, Duration::from_secs(900));
    assert_eq!(c.gateway_addr.to_string(), "127.0.0.1:8080");
    assert_eq!(c.metrics_addr.to_string(), "127.0.0.1:9464");
    assert_eq!(c.gateway_metrics_addr.to_string(), "127.0.0.1:9465");
    assert_eq!(c.confirm_rate_limit_per_minute, 30);
    assert!(!c.confirm_on_get);
    assert_eq!(c.confirm_method, ConfirmMethod::Both);
    assert_eq!(c.code_length, 6);
    assert_eq!(c.code_max_attempts, 5);
    assert!(c.gateway_api_keys.is_empty());
    assert!(c.trusted_proxies.is_empty());
    assert_eq!(c.retention, Duration::from_secs(168 * 3600));
    Ok(())
}

#[test]
fn code_settings_are_read_and_bounded() -> Result<(), ConfigError> {
    let c = config(&[
        ("CONFIRM_METHOD", "Code"),
        ("CODE_LENGTH", "10"),
        ("CODE_MAX_ATTEMPTS", "3"),
        (
            "GATEWAY_API_KEYS",
            " key-one-0123456789 , ,key-two-0123456789",
        ),
    ])?;
    assert_eq!(c.confirm_method, ConfirmMethod::Code);
    assert!(c.confirm_method.mails_code() && !c.confirm_method.mails_link());
    assert!(ConfirmMethod::Both.mails_code() && ConfirmMethod::Both.mails_link());
    assert!(!ConfirmMethod::Link.mails_code());
    assert_eq!(c.code_length, 10);
    assert_eq!(c.code_max_attempts, 3);
    let keys: Vec<&str> = c
        .gateway_api_keys
        .iter()
        .map(ExposeSecret::expose_secret)
        .collect();
    assert_eq!(keys, ["key-one-0123456789", "key-two-0123456789"]);
    assert_eq!(config(&[("CODE_LENGTH", "6")])?.code_length, 6);
    Ok(())
}

#[test]
fn a_bad_api_key_is_named_by_position_never_by_value() {
    let line = config(&[("GATEWAY_API_KEYS", "a-long-enough-key-1,tiny-secret")])
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(line.starts_with("GATEWAY_API_KEYS: key 2 "), "{line}");
    assert!(!line.contains("tiny-secret"), "{line}");
    let line = config(&[("CODE_LENGTH", "12")])
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert_eq!(line, "CODE_LENGTH: 12 digits: must be 6 to 10");
}

#[test]
fn metrics_addr_when_set_serves_the_gateway_too() -> Result<(), ConfigError> {
    let c = config(&[("METRICS_ADDR", "0.0.0.0:9999")])?;
    assert_eq!(c.metrics_addr.to_string(), "0.0.0.0:9999");
    assert_eq!(c.gateway_metrics_addr.to_string(), "0.0.0.0:9999");
    Ok(())
}

#[test]
fn a_missing_secret_is_named_when_keys_are_needed() -> Result<(), ConfigError> {
    let c = config(&[])?;
    let err = c.keys().err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.starts_with("VERIMAIL_SECRET_KEY: required"), "{err}");
    Ok(())
}

#[test]
fn itsdangerous_minting_turns_on_accepting_it() -> Result<(), ConfigError> {
    assert!(config(&[("TOKEN_FORMAT", "itsdangerous")])?.accept_itsdangerous);
    assert!(
        !config(&[
            ("TOKEN_FORMAT", "itsdangerous"),
            ("ACCEPT_ITSDANGEROUS", "false")
        ])?
        .accept_itsdangerous
    );
    Ok(())
}

#[test]
fn each_bad_value_names_its_variable() {
    let cases: &[(&str, &str)] = &[
        ("AMQP_URL", "http://x"),
        ("VERIMAIL_AUTO_MIGRATE", "maybe"),
        ("VERIMAIL_NAMESPACE", "a b"),
        ("TOKEN_FORMAT", "jwt"),
        ("ACCEPT_ITSDANGEROUS", "2"),
        ("ITSDANGEROUS_DIGEST", "md5"),
        ("TOKEN_TTL_SECONDS", "-1"),
        ("TOKEN_TTL_SECONDS", "0"),
        ("THROTTLE_SECONDS", "soon"),
        ("PUBLIC_BASE_URL", "ftp://x"),
        ("RETURN_URL_ALLOWLIST", "https://app.example.com/path"),
        ("MAIL_URL", "imap://x"),
        ("MAIL_FROM", "nobody"),
        ("WORKER_CONCURRENCY", "0"),
        ("WORKER_THREADS", "0"),
        ("WORKER_THREADS", "257"),
        ("WORKER_THREADS", "two"),
        ("MAIL_RETRY_WINDOW_SECONDS", "x"),
        ("GATEWAY_ADDR", "localhost"),
        ("METRICS_ADDR", "9464"),
        ("CONFIRM_RATE_LIMIT_PER_MINUTE", "0"),
        ("CONFIRM_ON_GET", "maybe"),
        ("CONFIRM_METHOD", "sms"),
        ("CODE_LENGTH", "5"),
        ("CODE_LENGTH", "11"),
        ("CODE_LENGTH", "six"),
        ("CODE_MAX_ATTEMPTS", "0"),
        ("CODE_MAX_ATTEMPTS", "1001"),
        ("GATEWAY_API_KEYS", "short"),
        ("GATEWAY_API_KEYS", "a-long-enough-key-1,has a space in it!"),
        ("TRUSTED_PROXIES", "10.0.0.0/33"),
        ("RETENTION_HOURS", "1"),
        ("LOG_FORMAT", "xml"),
        ("VERIMAIL_SECRET_KEY_FILE", "/nonexistent/verimail-key"),
    ];
    for (name, value) in cases {
        let err = config(&[(name, value)]).err();
        let line = err.as_ref().map(ToString::to_string).unwrap_or_default();
        assert!(
            line.starts_with(&format!("{name}: ")),
            "{name}={value} gave {line:?}"
        );
        assert!(!line.contains('\n'), "one line: {line:?}");
    }
}

#[test]
fn secrets_never_show_in_debug_output() -> Result<(), ConfigError> {
    let c = config(&[
        ("VERIMAIL_SECRET_KEY", "hunter2-very-secret"),
        ("VERIMAIL_OLD_SECRET_KEYS", "old-secret-1,old-secret-2"),
        ("GATEWAY_API_KEYS", "api-key-secret-0123456789"),
        ("MAIL_URL", "smtp://user:mail-password@smtp.example.com:587"),
    ])?;
    let debug = format!("{c:?}");
    for secret in [
        "hunter2-very-secret",
        "old-secret-1",
        "mail-password",
        "api-key-secret",
    ] {
        assert!(!debug.contains(secret), "{secret} leaked: {debug}");
    }
    Ok(())
}

#[test]
fn the_secret_file_loses_its_trailing_newline() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::temp_dir().join(format!("verimail-key-{}", std::process::id()));
    std::fs::write(&path, "from-a-file\n")?;
    let c = config(&[(
        "VERIMAIL_SECRET_KEY_FILE",
        path.to_str().unwrap_or_default(),
    )])?;
    std::fs::remove_file(&path)?;
    assert_eq!(c.expose_current_secret(), Some("from-a-file"));
    Ok(())
}

#[test]
fn several_amqp_urls_name_a_cluster() -> Result<(), ConfigError> {
    let c = config(&[(
        "AMQP_URL",
        "amqp://g:g@127.0.0.1:5673/%2f, amqp://g:g@127.0.0.1:5674/%2f",
    )])?;
    assert_eq!(c.amqp_urls.len(), 2);
    Ok(())
}

#[test]
fn return_urls_are_checked_by_origin() -> Result<(), Box<dyn std::error::Error>> {
    let c = config(&[("RETURN_URL_ALLOWLIST", "https://app.example.com")])?;
    assert!(c.return_url_allowed(&Url::parse("https://app.example.com/welcome?x=1")?));
    assert!(!c.return_url_allowed(&Url::parse("https://app.example.com.evil.io/")?));
    assert!(!c.return_url_allowed(&Url::parse("http://app.example.com/")?));
    Ok(())
}

#[test]
fn mail_rate_limit_is_read_and_a_bad_one_names_the_variable() -> Result<(), ConfigError> {
    assert_eq!(config(&[])?.mail_rate_limit, None);
    let c = config(&[("MAIL_RATE_LIMIT", "600/min")])?;
    assert_eq!(c.mail_rate_limit.map(MailRateLimit::per_second), Some(10.0));
    let err = config(&[("MAIL_RATE_LIMIT", "lots")])
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.starts_with("MAIL_RATE_LIMIT: `lots`: "), "{err}");
    assert!(!err.contains('\n'), "{err}");
    let err = config(&[("MAIL_URL", "postmark://")])
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.starts_with("MAIL_URL: "), "{err}");
    Ok(())
}

#[test]
fn deliverability_settings_default_and_name_their_variable() -> Result<(), ConfigError> {
    let c = config(&[])?;
    assert!(c.suppress_on_reject);
    assert!(!c.webhook_secrets.enabled("mailgun") && !c.webhook_secrets.enabled("ses"));
    let c = config(&[
        ("SUPPRESS_ON_REJECT", "false"),
        ("WEBHOOK_SECRETS", "ses=*"),
    ])?;
    assert!(!c.suppress_on_reject);
    assert!(c.webhook_secrets.enabled("ses"));
    let line = config(&[("SUPPRESS_ON_REJECT", "maybe")])
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(line.starts_with("SUPPRESS_ON_REJECT: "), "{line}");
    let line = config(&[("WEBHOOK_SECRETS", "mailgun=key-secret-123,postmark=nocolon")])
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert_eq!(line, "WEBHOOK_SECRETS: postmark: expected USER:PASSWORD");
    Ok(())
}
