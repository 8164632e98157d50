//! Checking the `verimail_proof` a `reset_password` confirmation adds to the
//! `return_url`, so the page behind it can trust the redirect without calling
//! verimail.

use time::OffsetDateTime;
use verimail_shared::token::{Digest, Keys, Signer};
use verimail_shared::{Config, ConfigError};

pub use verimail_shared::token::{PROOF_MAX_AGE_SECONDS, ProofPayload, TokenError};

/// Verifies PROOFs with the deployment's secret (current and retired keys)
/// and salt. Build it once at start; verifying is cheap.
///
/// ```
/// use verimail_producer::ProofVerifier;
/// use verimail_producer::Config;
///
/// let config = Config::from_lookup(|name| match name {
///     "VERIMAIL_SECRET_KEY" => Some("correct horse battery staple".into()),
///     _ => None,
/// })
/// .expect("a valid configuration");
/// let verifier = ProofVerifier::from_config(&config).expect("the secret is set");
/// // `proof` comes from the `verimail_proof` query parameter.
/// let refused = verifier.verify("not-a-proof");
/// assert!(refused.is_err());
/// ```
#[derive(Debug, Clone)]
pub struct ProofVerifier {
    signer: Signer,
}

impl ProofVerifier {
    /// From the configuration (`VERIMAIL_SECRET_KEY`, `VERIMAIL_OLD_SECRET_KEYS`,
    /// `VERIMAIL_SALT`); fails when no secret is configured.
    pub fn from_config(config: &Config) -> Result<Self, ConfigError> {
        Ok(Self::new(&config.keys()?))
    }

    /// From keys built by hand.
    pub fn new(keys: &Keys) -> Self {
        // PROOFs are always SHA-256, whatever ITSDANGEROUS_DIGEST says.
        Self {
            signer: Signer::new(keys, Digest::Sha256),
        }
    }

    /// Checks `proof` now: authentic and at most [`PROOF_MAX_AGE_SECONDS`] old.
    pub fn verify(&self, proof: &str) -> Result<ProofPayload, TokenError> {
        self.verify_at(proof, OffsetDateTime::now_utc())
    }

    /// Checks `proof` as of `now`.
    pub fn verify_at(&self, proof: &str, now: OffsetDateTime) -> Result<ProofPayload, TokenError> {
        self.signer.verify_proof(proof, now)
    }
}

/// One-shot form of [`ProofVerifier::verify`].
pub fn verify_proof(config: &Config, proof: &str) -> Result<ProofPayload, ProofError> {
    Ok(ProofVerifier::from_config(config)?.verify(proof)?)
}

/// Why [`verify_proof`] refused.
#[derive(Debug, thiserror::Error)]
pub enum ProofError {
    /// No secret is configured.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The proof is malformed, tampered with, signed with another key, or too old.
    #[error(transparent)]
    Token(#[from] TokenError),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys_for(secret: &str) -> Keys {
        let secret = secret.to_owned();
        Config::from_lookup(move |name| (name == "VERIMAIL_SECRET_KEY").then(|| secret.clone()))
            .and_then(|c| c.keys())
            .expect("a secret makes keys")
    }

    #[test]
    fn a_proof_minted_by_the_gateway_verifies_until_it_is_too_old() {
        let keys = keys_for("s3cret");
        let now = time::macros::datetime!(2026-11-24 10:00:00 UTC);
        let payload = ProofPayload {
            request_id: Some("r-1".into()),
            user_id: Some("42".into()),
            email: "alice@example.com".into(),
            purpose: "reset_password".into(),
        };
        // The gateway mints with any digest setting: proofs are always SHA-256.
        let proof = Signer::new(&keys, Digest::Sha1).mint_proof(&payload, now);
        let verifier = ProofVerifier::new(&keys);
        assert_eq!(verifier.verify_at(&proof, now).ok(), Some(payload));
        let late = now + time::Duration::seconds(PROOF_MAX_AGE_SECONDS as i64 + 1);
        assert!(matches!(
            verifier.verify_at(&proof, late),
            Err(TokenError::Expired(_))
        ));
        let other = ProofVerifier::new(&keys_for("another"));
        assert!(other.verify_at(&proof, now).is_err());
    }
}
