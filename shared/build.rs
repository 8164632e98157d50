//! `sqlx::migrate!` embeds `migrations/` at compile time, but Cargo does not
//! know the macro read that directory: without this, a new migration file is
//! left out of an incremental build (sqlx's documented fix).

fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
