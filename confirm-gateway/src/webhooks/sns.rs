//! Amazon SNS message authentication: the signing certificate (fetched only
//! from `https://sns.<region>.amazonaws.com/….pem`, cached in memory and in
//! PostgreSQL, see [`cache`]) and the signature over the documented string to sign
//! (`SignatureVersion` 1: RSA PKCS#1 v1.5 with SHA-1; 2: with SHA-256).
//!
//! Sources: <https://docs.aws.amazon.com/sns/latest/dg/sns-verify-signature-of-message.html>
//! and aws-php-sns-message-validator (`getStringToSign`, `validateUrl`).

use std::fmt;
use std::time::Duration;

use futures_util::future::BoxFuture;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{
    AlgorithmIdentifier, CertificateDer, InvalidSignature, SignatureVerificationAlgorithm, alg_id,
};
use serde_json::{Map, Value};
use url::Url;

pub mod cache;

pub use cache::{CertCache, CertError};

/// Largest certificate accepted from a fetch.
pub const MAX_CERT_BYTES: usize = 64 * 1024;
/// A fetch (certificate, subscription confirmation) gives up after this.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether `url` may be fetched for SNS: `https`, no user or port, host
/// `sns.<region>.amazonaws.com` (the contract's rule: no `.cn`, no other
/// host), and for a certificate a path ending in `.pem`.
pub fn allowed_sns_url(url: &str, pem: bool) -> Option<Url> {
    let url = Url::parse(url).ok()?;
    if url.scheme() != "https"
        || !url.username().is_empty()
        || url.password().is_some()
        || url.port().is_some()
    {
        return None;
    }
    let host = url.host_str()?;
    let region = host.strip_prefix("sns.")?.strip_suffix(".amazonaws.com")?;
    let region_ok = region.len() >= 3
        && region
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !region_ok || (pem && !url.path().ends_with(".pem")) {
        return None;
    }
    Some(url)
}

/// The string SNS signs: each of these keys present in the message, in
/// this order, as `key\nvalue\n` (values as decoded JSON strings).
pub fn string_to_sign(message: &Map<String, Value>) -> Option<String> {
    let ty = message.get("Type")?.as_str()?;
    let keys: &[&str] = if ty == "Notification" {
        &[
            "Message",
            "MessageId",
            "Subject",
            "Timestamp",
            "TopicArn",
            "Type",
        ]
    } else {
        &[
            "Message",
            "MessageId",
            "SubscribeURL",
            "Timestamp",
            "Token",
            "TopicArn",
            "Type",
        ]
    };
    let mut out = String::new();
    for key in keys {
        match message.get(*key) {
            Some(Value::String(v)) => {
                out.push_str(key);
                out.push('\n');
                out.push_str(v);
                out.push('\n');
            }
            // Subject is optional (absent or null); every other key is required.
            None | Some(Value::Null) if *key == "Subject" => {}
            _ => return None,
        }
    }
    Some(out)
}

/// RSA PKCS#1 v1.5 with SHA-1 or SHA-256, for webpki's signature check of
/// the certificate's key (webpki itself offers no SHA-1).
#[derive(Debug)]
struct SnsRsa(&'static ring::signature::RsaParameters);

impl SignatureVerificationAlgorithm for SnsRsa {
    fn verify_signature(
        &self,
        public_key: &[u8],
        message: &[u8],
        signature: &[u8],
    ) -> Result<(), InvalidSignature> {
        ring::signature::UnparsedPublicKey::new(self.0, public_key)
            .verify(message, signature)
            .map_err(|_| InvalidSignature)
    }

    fn public_key_alg_id(&self) -> AlgorithmIdentifier {
        alg_id::RSA_ENCRYPTION
    }

    fn signature_alg_id(&self) -> AlgorithmIdentifier {
        alg_id::RSA_PKCS1_SHA256
    }
}

static SHA1: SnsRsa = SnsRsa(&ring::signature::RSA_PKCS1_2048_8192_SHA1_FOR_LEGACY_USE_ONLY);
static SHA256: SnsRsa = SnsRsa(&ring::signature::RSA_PKCS1_2048_8192_SHA256);

/// Checks `signature_b64` (version `version`) over `text` with the
/// certificate `der`.
pub fn verify(der: &[u8], version: &str, text: &str, signature_b64: &str) -> bool {
    use base64::Engine;
    let alg: &SnsRsa = match version {
        "1" => &SHA1,
        "2" => &SHA256,
        _ => return false,
    };
    let Ok(signature) = base64::engine::general_purpose::STANDARD.decode(signature_b64) else {
        return false;
    };
    let der = CertificateDer::from(der);
    let Ok(cert) = webpki::EndEntityCert::try_from(&der) else {
        return false;
    };
    cert.verify_signature(alg, text.as_bytes(), &signature)
        .is_ok()
}

/// The one outgoing HTTP call the gateway makes (GET of an SNS URL that
/// passed [`allowed_sns_url`]), behind a trait so tests can watch it.
pub trait Fetch: Send + Sync + fmt::Debug {
    /// GETs `url`; the body on a 2xx, else why not.
    fn get(&self, url: Url) -> BoxFuture<'_, Result<Vec<u8>, String>>;
}

/// [`Fetch`] over HTTPS (rustls on ring, the system's roots), no redirects.
#[derive(Debug, Default)]
pub struct HttpsFetch {
    client: std::sync::OnceLock<Result<reqwest::Client, String>>,
}

impl HttpsFetch {
    fn client(&self) -> Result<&reqwest::Client, String> {
        self.client
            .get_or_init(|| {
                // ring is the only provider compiled in; installing it as the
                // process default is what reqwest's rustls needs (an error
                // means one is installed already, which is as good).
                let _ = rustls::crypto::ring::default_provider().install_default();
                reqwest::Client::builder()
                    .timeout(FETCH_TIMEOUT)
                    .redirect(reqwest::redirect::Policy::none())
                    .build()
                    .map_err(|e| format!("HTTP client: {e}"))
            })
            .as_ref()
            .map_err(Clone::clone)
    }
}

impl Fetch for HttpsFetch {
    fn get(&self, url: Url) -> BoxFuture<'_, Result<Vec<u8>, String>> {
        Box::pin(async move {
            let client = self.client()?;
            let mut response = client
                .get(url.as_str())
                .send()
                .await
                .map_err(|e| format!("GET {url}: {e}"))?;
            if !response.status().is_success() {
                return Err(format!("GET {url}: {}", response.status()));
            }
            let mut body = Vec::new();
            while let Some(chunk) = response
                .chunk()
                .await
                .map_err(|e| format!("GET {url}: {e}"))?
            {
                body.extend_from_slice(&chunk);
                if body.len() > MAX_CERT_BYTES {
                    return Err(format!(
                        "GET {url}: answer larger than {MAX_CERT_BYTES} bytes"
                    ));
                }
            }
            Ok(body)
        })
    }
}

/// The DER bytes of a PEM certificate, refused unless it is one X.509
/// certificate webpki can read (what [`verify`] will need).
fn der_of(pem: &str) -> Result<Vec<u8>, String> {
    let der = CertificateDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| format!("the certificate is not PEM: {e}"))?;
    webpki::EndEntityCert::try_from(&der)
        .map_err(|e| format!("the certificate is not a certificate: {e}"))?;
    Ok(der.as_ref().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_sns_hosts_over_https_are_fetched() {
        for ok in [
            "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-abc.pem",
            "https://sns.eu-west-3.amazonaws.com/a/b.pem",
        ] {
            assert!(allowed_sns_url(ok, true).is_some(), "{ok}");
        }
        for bad in [
            "http://sns.us-east-1.amazonaws.com/x.pem",
            "https://sns.us-east-1.amazonaws.com.evil.com/x.pem",
            "https://sns.us-east-1.amazonaws.com:8443/x.pem",
            "https://user@sns.us-east-1.amazonaws.com/x.pem",
            "https://evil.com/sns.us-east-1.amazonaws.com/x.pem",
            "https://sns.cn-north-1.amazonaws.com.cn/x.pem",
            "https://sqs.us-east-1.amazonaws.com/x.pem",
            "https://sns.us-east-1.amazonaws.com/x.txt",
            "https://sns.a.amazonaws.com/x.pem",
            "https://sns..amazonaws.com/x.pem",
            "not a url",
        ] {
            assert!(allowed_sns_url(bad, true).is_none(), "{bad}");
        }
        assert!(
            allowed_sns_url(
                "https://sns.us-west-2.amazonaws.com/?Action=ConfirmSubscription&Token=x",
                false
            )
            .is_some()
        );
    }

    #[test]
    fn the_string_to_sign_follows_the_documented_order() {
        let msg: Map<String, Value> = serde_json::from_str(
            r#"{"Type":"Notification","MessageId":"m","TopicArn":"t","Message":"a\nb",
                "Timestamp":"2026-01-01T00:00:00.000Z","SignatureVersion":"1","Signature":"x",
                "SigningCertURL":"u","UnsubscribeURL":"v"}"#,
        )
        .unwrap_or_default();
        assert_eq!(
            string_to_sign(&msg).as_deref(),
            Some(
                "Message\na\nb\nMessageId\nm\nTimestamp\n2026-01-01T00:00:00.000Z\nTopicArn\nt\nType\nNotification\n"
            )
        );
        let sub: Map<String, Value> = serde_json::from_str(
            r#"{"Type":"SubscriptionConfirmation","MessageId":"m","Token":"k","TopicArn":"t",
                "Message":"hi","SubscribeURL":"s","Timestamp":"ts"}"#,
        )
        .unwrap_or_default();
        assert_eq!(
            string_to_sign(&sub).as_deref(),
            Some(
                "Message\nhi\nMessageId\nm\nSubscribeURL\ns\nTimestamp\nts\nToken\nk\nTopicArn\nt\nType\nSubscriptionConfirmation\n"
            )
        );
    }
}
