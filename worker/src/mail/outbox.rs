//! The `file://` outbox: one `{request_id}.eml` file per mail, for
//! development and for deployments that hand mail files to another program.

use verimail_shared::config::outbox_file_name;

/// Writes `{request_id}.eml` (see `outbox_file_name`) into the outbox: to a
/// hidden temporary file first, renamed into place, so a reader never sees half
/// a mail and a redelivered request replaces its own file instead of adding one.
pub(super) async fn write_outbox(
    dir: &std::path::Path,
    request_id: &str,
    bytes: &[u8],
) -> std::io::Result<()> {
    let name = outbox_file_name(request_id);
    let temporary = dir.join(format!(".{name}.{}.tmp", uuid::Uuid::new_v4().simple()));
    tokio::fs::write(&temporary, bytes).await?;
    let renamed = tokio::fs::rename(&temporary, dir.join(name)).await;
    if renamed.is_err() {
        let _ = tokio::fs::remove_file(&temporary).await;
    }
    renamed
}

#[cfg(test)]
mod tests {
    use crate::mail::test_support::{TestResult, envelope, mail, mailer};
    use crate::mail::{Classification, SendError};

    #[tokio::test]
    async fn an_unwritable_outbox_is_transient_and_a_writable_one_gets_eml_files() -> TestResult {
        let dir = std::env::temp_dir().join(format!("verimail-outbox-{}", uuid::Uuid::new_v4()));
        let m = mailer(&format!("file://{}", dir.display()))?;
        m.send(&envelope(Some("Alice"), "alice@example.com"), &mail())
            .await?;
        // A redelivered request replaces its own file.
        m.send(&envelope(Some("Alice"), "alice@example.com"), &mail())
            .await?;
        let files: Vec<_> = std::fs::read_dir(&dir)?.collect::<Result<_, _>>()?;
        assert_eq!(files.len(), 1);
        // `{request_id}.eml`, the `/` of the id "5f1c-req/1" encoded.
        assert_eq!(files[0].file_name(), "5f1c-req%2F1.eml");
        let eml = std::fs::read(files[0].path())?;
        let parsed = mail_parser::MessageParser::default()
            .parse(&eml)
            .ok_or("unparsable .eml")?;
        assert_eq!(parsed.subject(), Some("请确认您的邮箱地址"));

        std::fs::remove_dir_all(&dir)?;
        std::fs::write(&dir, "a file where the outbox was")?;
        let err = m
            .send(&envelope(None, "alice@example.com"), &mail())
            .await
            .err()
            .ok_or("I/O error expected")?;
        assert!(matches!(err, SendError::File(_)), "{err:?}");
        assert_eq!(err.classification(), Classification::Transient);
        std::fs::remove_file(&dir)?;
        Ok(())
    }
}
