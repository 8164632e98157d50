//! PostgreSQL: the pool, the database created when missing, embedded migrations.
//!
//! Tables (see `migrations/`): `requests` (one row per request id, the worker's
//! idempotency record), `throttle` (last mail per user and purpose),
//! `confirmations` (one row per confirmed link) and `outbox` (verified events
//! waiting for the broker's confirm).

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgConnection, PgPool};

/// The embedded migrations, applied at start when `VERIMAIL_AUTO_MIGRATE` is on.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Database failures at start.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// `DATABASE_URL` cannot be parsed.
    #[error("DATABASE_URL: {0}")]
    Url(#[source] sqlx::Error),
    /// The server did not answer or refused.
    #[error("cannot reach PostgreSQL: {0}")]
    Connect(#[source] sqlx::Error),
    /// Creating the missing database failed.
    #[error("cannot create database `{name}`: {source}")]
    Create {
        /// The database name.
        name: String,
        /// Why.
        #[source]
        source: sqlx::Error,
    },
    /// A migration failed.
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

/// Pool settings per service.
#[derive(Debug, Clone, Copy)]
pub struct PoolSettings {
    /// Most connections the pool opens.
    pub max_connections: u32,
    /// How long a query waits for a connection before failing; the gateway's
    /// 503-within-5-seconds promise rests on this.
    pub acquire_timeout: Duration,
}

impl Default for PoolSettings {
    fn default() -> Self {
        Self {
            max_connections: 10,
            acquire_timeout: Duration::from_secs(3),
        }
    }
}

/// Server-side deadlines of every statement on a pool's connections.
#[derive(Debug, Clone, Copy, Default)]
pub struct Deadlines {
    /// `statement_timeout`: longest a statement may run.
    pub statement: Option<Duration>,
    /// `lock_timeout`: longest a statement may wait for a lock.
    pub lock: Option<Duration>,
}

impl Deadlines {
    /// `options` with these deadlines as session settings (connections
    /// opened from them, a pool's or one of their own, carry them).
    pub fn apply(self, options: PgConnectOptions) -> PgConnectOptions {
        let ms = |d: Duration| d.as_millis().max(1).to_string();
        let mut settings = Vec::new();
        if let Some(d) = self.statement {
            settings.push(("statement_timeout", ms(d)));
        }
        if let Some(d) = self.lock {
            settings.push(("lock_timeout", ms(d)));
        }
        if settings.is_empty() {
            options
        } else {
            options.options(settings)
        }
    }
}

/// Opens the pool, creating the database if it is missing and applying the
/// migrations when `migrate` is set.
pub async fn connect(
    database_url: &str,
    migrate: bool,
    settings: PoolSettings,
) -> Result<PgPool, DbError> {
    connect_with_deadlines(database_url, migrate, settings, Deadlines::default()).await
}

/// [`connect`] with server-side deadlines on every statement of the pool.
/// Migrations run on a connection of their own, without them (a migration
/// may rightly take long).
pub async fn connect_with_deadlines(
    database_url: &str,
    migrate: bool,
    settings: PoolSettings,
    deadlines: Deadlines,
) -> Result<PgPool, DbError> {
    let options: PgConnectOptions = database_url.parse().map_err(DbError::Url)?;
    ensure_database(&options).await?;
    if migrate {
        let mut conn = options.connect().await.map_err(DbError::Connect)?;
        MIGRATOR.run(&mut conn).await?;
        let _ = conn.close().await;
    }
    let pool = PgPoolOptions::new()
        .max_connections(settings.max_connections)
        .min_connections(1.min(settings.max_connections))
        .acquire_timeout(settings.acquire_timeout)
        // Checking a connection before use costs a round trip; broken ones are
        // instead noticed by the failing query and replaced.
        .test_before_acquire(false)
        .connect_with(deadlines.apply(options))
        .await
        .map_err(DbError::Connect)?;
    Ok(pool)
}

/// Applies the migrations (`verimail migrate`).
pub async fn migrate(pool: &PgPool) -> Result<(), DbError> {
    MIGRATOR.run(pool).await.map_err(DbError::from)
}

/// Creates the database named in `options` when it does not exist yet.
pub async fn ensure_database(options: &PgConnectOptions) -> Result<(), DbError> {
    let Some(name) = options.get_database().map(str::to_owned) else {
        return Ok(());
    };
    // Connect to the maintenance database to look for (and create) ours.
    let admin = options.clone().database("postgres");
    let mut conn = admin.connect().await.map_err(DbError::Connect)?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(&name)
            .fetch_one(&mut conn)
            .await
            .map_err(DbError::Connect)?;
    if !exists {
        let quoted = format!("\"{}\"", name.replace('"', "\"\""));
        let create = format!("CREATE DATABASE {quoted}{}", byte_order(&mut conn).await?);
        match sqlx::raw_sql(sqlx::AssertSqlSafe(create))
            .execute(&mut conn)
            .await
        {
            Ok(_) => tracing::info!(database = %name, "created database"),
            // Another process created it between our check and our CREATE:
            // duplicate_database, or the catalog's unique index when both
            // CREATEs ran at the same instant.
            Err(sqlx::Error::Database(e))
                if matches!(e.code().as_deref(), Some("42P04") | Some("23505")) => {}
            Err(e) => return Err(DbError::Create { name, source: e }),
        }
    }
    let _ = conn.close().await;
    Ok(())
}

/// What `CREATE DATABASE` adds so that the new database compares text byte by
/// byte (`C`): every key verimail stores is an id, an address or a name it
/// only compares for equality, and under any other collation each index
/// search and insert on those keys goes through the locale's `strcoll`
/// (5-9 % of PostgreSQL's CPU per mail, docs/performance.md). Everything else
/// is template1's, as a plain `CREATE DATABASE` would have it: its encoding
/// and its LC_CTYPE (which `lower()` follows, as the suppression list's
/// index does); template0 is named because a collation other than the
/// template's needs it, so objects added to template1 are not copied (verimail
/// needs none). On a cluster whose default provider is not libc (ICU, or
/// PostgreSQL 17's builtin) LC_COLLATE would not set the collation and a
/// different provider would change what `lower()` does: nothing is added.
async fn byte_order(conn: &mut PgConnection) -> Result<String, DbError> {
    // `datlocprovider` exists from PostgreSQL 15; read through to_jsonb, an
    // older server answers NULL (libc was its only provider).
    let (encoding, ctype, provider): (String, String, Option<String>) = sqlx::query_as(
        "SELECT pg_encoding_to_char(encoding), datctype, to_jsonb(d) ->> 'datlocprovider' \
         FROM pg_database d WHERE datname = 'template1'",
    )
    .fetch_one(conn)
    .await
    .map_err(DbError::Connect)?;
    if provider.is_some_and(|p| p != "c") {
        return Ok(String::new());
    }
    let literal = |v: &str| format!("'{}'", v.replace('\'', "''"));
    Ok(format!(
        " TEMPLATE template0 ENCODING {} LC_CTYPE {} LC_COLLATE 'C'",
        literal(&encoding),
        literal(&ctype)
    ))
}

/// Whether the database answers a trivial query within `timeout`.
pub async fn is_reachable(pool: &PgPool, timeout: Duration) -> bool {
    let ping = sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(pool);
    matches!(tokio::time::timeout(timeout, ping).await, Ok(Ok(1)))
}
