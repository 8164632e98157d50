//! `GET`/`POST`/`HEAD /confirm/{token}`: verify the link, record the
//! confirmation with its event, and answer with a page, JSON or a redirect.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::str::FromStr;
use std::time::{Duration, Instant};

use axum::Extension;
use axum::extract::rejection::PathRejection;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::header::{ACCEPT, ACCEPT_LANGUAGE};
use axum::http::{HeaderMap, Method};
use axum::response::Response;
use time::OffsetDateTime;
use url::Url;
use verimail_shared::events::{Purpose, VerifyMethod};
use verimail_shared::token::{self, MAX_TOKEN_LEN, ProofPayload};

use crate::AppState;
use crate::answer::{ConfirmError, Reply, Status, View};
use crate::client::{Decision, client_ip};
use crate::pages::locale_from_accept_language;
use crate::store;
use crate::writer::{Confirmation, Recorded};

/// The CloudEvents `source` of the verified event.
pub use crate::writer::EVENT_SOURCE;

/// Every database step of one confirm must finish within this, so a database
/// outage answers 503 within the contract's 5 seconds. A confirmation whose
/// batch began before it is the exception: its result is awaited (bounded by
/// the statement timeout), since the batch may commit it.
pub const DB_DEADLINE: Duration = Duration::from_secs(4);

/// What a verified link says, whatever its format.
#[derive(Debug)]
struct Subject {
    /// What recording the click writes.
    confirmation: Confirmation,
    /// From a `v1` token.
    locale: Option<String>,
}

/// The handler of every method on `/confirm/{token}`.
pub async fn confirm(
    State(state): State<AppState>,
    method: Method,
    headers: HeaderMap,
    // Set by `into_make_service_with_connect_info`; absent under `oneshot` tests.
    connect: Option<Extension<ConnectInfo<SocketAddr>>>,
    token: Result<Path<String>, PathRejection>,
) -> Response {
    let started = Instant::now();
    let accept = headers
        .get(ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let view = View {
        json: accept.to_ascii_lowercase().contains("application/json"),
        accept_locale: locale_from_accept_language(
            headers.get(ACCEPT_LANGUAGE).and_then(|v| v.to_str().ok()),
        ),
        pages: &state.inner.pages,
    };
    // A path that does not decode (bad percent-encoding) is no token at all.
    let token = token.map(|Path(t)| t).unwrap_or_default();
    let peer = connect.map_or(
        IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        |Extension(ConnectInfo(a))| a.ip(),
    );
    let client = client_ip(peer, &headers, &state.inner.config.trusted_proxies);

    let result = match state.inner.limiter.check(client) {
        Decision::Limit { retry_after } => Err(ConfirmError::RateLimited { retry_after }),
        Decision::Allow => handle(&state, &method, &token).await,
    };
    let reply = result.unwrap_or_else(|e| {
        e.log(&token);
        e.into_reply()
    });
    state
        .inner
        .metrics
        .answered(reply.status, started.elapsed());
    view.render(&reply)
}

/// The confirm logic proper, free of HTTP details.
async fn handle(state: &AppState, method: &Method, token: &str) -> Result<Reply, ConfirmError> {
    let now = OffsetDateTime::now_utc();
    let Subject {
        confirmation: subject,
        locale,
    } = verify(state, token, now)?;
    let mut reply = Reply::new(Status::Verified);
    reply.locale = locale;
    reply.user_id.clone_from(&subject.user_id);
    reply.email = Some(subject.email.clone());

    // HEAD never changes anything (link checkers and scanners send it).
    if *method == Method::HEAD {
        reply.status = Status::ConfirmRequired;
        return Ok(reply);
    }
    reply.single_use = subject.purpose.single_use();
    // A GET only shows the button (mail scanners fetch links and must not
    // spend them), unless CONFIRM_ON_GET lets it confirm a verify_email link
    // (the seed's behaviour, which legacy links were mailed for).
    let get_confirms = state.inner.config.confirm_on_get && !subject.purpose.single_use();
    if *method != Method::POST && !get_confirms {
        let used = deadline(store::is_confirmed(&state.inner.pool, &subject.key)).await?;
        reply.status = match (used, subject.purpose.single_use()) {
            (false, _) => Status::ConfirmRequired,
            (true, true) => Status::Used,
            (true, false) => Status::AlreadyVerified,
        };
        return Ok(reply);
    }

    let Recorded {
        first,
        user_id,
        return_url,
    } = state
        .inner
        .writer
        .record_within(subject.clone(), Instant::now() + DB_DEADLINE)
        .await?;
    if subject.legacy {
        reply.user_id = user_id;
    }
    let return_url = return_url
        .as_deref()
        .and_then(|u| Url::parse(u).ok())
        .filter(|u| state.inner.config.return_url_allowed(u));

    if subject.purpose.single_use() {
        if !first {
            reply.status = Status::Used;
            return Ok(reply);
        }
        if let Some(mut url) = return_url {
            let proof = state.inner.signer.mint_proof(
                &ProofPayload {
                    request_id: subject.request_id,
                    user_id: subject.user_id,
                    email: subject.email,
                    purpose: subject.purpose.as_str().to_owned(),
                },
                now,
            );
            set_params(
                &mut url,
                &[("verimail", "verified"), ("verimail_proof", &proof)],
            );
            reply.redirect = Some(url.into());
        }
        return Ok(reply);
    }

    reply.status = if first {
        Status::Verified
    } else {
        Status::AlreadyVerified
    };
    if let Some(mut url) = return_url {
        set_params(&mut url, &[("verimail", reply.status.as_str())]);
        reply.redirect = Some(url.into());
    }
    Ok(reply)
}

/// Checks the token's signature, key and expiry; no database involved.
fn verify(state: &AppState, token: &str, now: OffsetDateTime) -> Result<Subject, ConfirmError> {
    // Refused before any decoding: nothing we mint comes close.
    if token.len() > MAX_TOKEN_LEN {
        return Err(ConfirmError::TooLong(MAX_TOKEN_LEN));
    }
    let signer = &state.inner.signer;
    let config = &state.inner.config;
    if token::looks_like_v1(token) {
        let claims = signer.verify_v1(token, now)?;
        let purpose = Purpose::from_str(&claims.purpose)
            .map_err(|_| ConfirmError::UnknownPurpose(claims.purpose.clone()))?;
        for field in [&claims.request_id, &claims.user_id, &claims.email] {
            usable(field)?;
        }
        return Ok(Subject {
            confirmation: Confirmation {
                key: format!("r:{}", claims.request_id),
                request_id: Some(claims.request_id),
                user_id: Some(claims.user_id),
                email: claims.email,
                purpose,
                legacy: false,
                at: now,
                method: VerifyMethod::Link,
            },
            locale: claims.locale,
        });
    }
    if !config.accept_itsdangerous {
        return Err(ConfirmError::FormatNotAccepted);
    }
    let legacy = signer.verify_itsdangerous(token, config.token_ttl.as_secs(), now)?;
    let email = legacy
        .email
        .ok_or_else(|| ConfirmError::Content("the payload is not a string".into()))?;
    usable(&email)?;
    Ok(Subject {
        confirmation: Confirmation {
            key: format!("e:{email}"),
            request_id: None,
            user_id: None,
            email,
            purpose: Purpose::VerifyEmail,
            legacy: true,
            at: now,
            method: VerifyMethod::Link,
        },
        locale: None,
    })
}

/// PostgreSQL text cannot hold NUL, and no address holds a control character.
fn usable(value: &str) -> Result<(), ConfirmError> {
    if value.chars().any(char::is_control) {
        return Err(ConfirmError::Content(
            "a control character in a claim".into(),
        ));
    }
    Ok(())
}

/// Bounds a database step by [`DB_DEADLINE`].
pub(crate) async fn deadline<T, E: Into<ConfirmError>>(
    step: impl Future<Output = Result<T, E>>,
) -> Result<T, ConfirmError> {
    match tokio::time::timeout(DB_DEADLINE, step).await {
        Ok(result) => result.map_err(Into::into),
        Err(_) => Err(ConfirmError::DatabaseTimeout),
    }
}

/// Sets our query parameters on the return URL, replacing any of the same
/// name already there (only verimail says what verimail verified).
pub(crate) fn set_params(url: &mut Url, params: &[(&str, &str)]) {
    let kept: Vec<(String, String)> = url
        .query_pairs()
        .filter(|(k, _)| !k.starts_with("verimail"))
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    url.set_query(None);
    let mut query = url.query_pairs_mut();
    for (k, v) in &kept {
        query.append_pair(k, v);
    }
    for (k, v) in params {
        query.append_pair(k, v);
    }
    drop(query);
    if url.query() == Some("") {
        url.set_query(None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_parameters_replace_spoofed_ones_and_keep_the_rest() -> Result<(), url::ParseError> {
        let mut url = Url::parse("https://app.example.com/done?a=1&verimail_proof=fake#top")?;
        set_params(&mut url, &[("verimail", "verified")]);
        assert_eq!(
            url.as_str(),
            "https://app.example.com/done?a=1&verimail=verified#top"
        );
        let mut url = Url::parse("https://app.example.com/")?;
        set_params(&mut url, &[("verimail", "already_verified")]);
        assert_eq!(
            url.as_str(),
            "https://app.example.com/?verimail=already_verified"
        );
        Ok(())
    }
}
