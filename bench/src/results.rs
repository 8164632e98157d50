//! The results file: figures appended as `key value` lines, read back by `report`.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::PathBuf;

use anyhow::{Context as _, Result};

#[derive(Debug)]
pub(crate) struct Results {
    pub(crate) path: Option<PathBuf>,
}

impl Results {
    pub(crate) fn put(&self, key: &str, value: impl std::fmt::Display) -> Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("results file {}", path.display()))?;
        writeln!(f, "{key} {value}")?;
        Ok(())
    }

    pub(crate) fn load(&self) -> Result<BTreeMap<String, String>> {
        let path = self
            .path
            .as_ref()
            .context("report needs --results or BENCH_RESULTS")?;
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("results file {}", path.display()))?;
        // Later lines win: a figure re-measured in the same run replaces the first.
        Ok(text
            .lines()
            .filter_map(|l| l.split_once(' '))
            .map(|(k, v)| (k.to_owned(), v.trim().to_owned()))
            .collect())
    }
}
