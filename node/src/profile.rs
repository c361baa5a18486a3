//! Client profiles: where the cluster is and which certificate the CLI (and the load
//! generator) present, so commands work without flags. `kerwen dev` writes one; operators
//! write their own (TOML):
//!
//! ```toml
//! endpoints = "kerwen-0.kerwen:7001,kerwen-1.kerwen:7001"
//! ca = "/etc/kerwen/ca.pem"
//! cert = "/etc/kerwen/me.pem"
//! key = "/etc/kerwen/me.key"
//! # Optional: a directory with the CA's key, where `--as SUBSYSTEM` finds or issues
//! # client certificates (development only).
//! pki_dir = "/tmp/kerwen-dev/pki"
//! ```
//!
//! Lookup order: `--profile` / `KERWEN_PROFILE`, then `$XDG_CONFIG_HOME/kerwen/profile.toml`,
//! then `~/.config/kerwen/profile.toml`.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::tls::TlsFiles;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// Comma-separated client endpoints.
    pub endpoints: String,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pki_dir: Option<PathBuf>,
}

impl Profile {
    pub fn tls_files(&self) -> TlsFiles {
        TlsFiles { ca: self.ca.clone(), cert: self.cert.clone(), key: self.key.clone() }
    }

    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading the profile {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("parsing the profile {}", path.display()))
    }

    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let text = toml::to_string(self).context("encoding the profile")?;
        crate::pki::write_file(path, text.as_bytes(), 0o600)
    }
}

/// Where the profile is looked for when none is named.
pub fn default_path() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("XDG_CONFIG_HOME").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(dir).join("kerwen").join("profile.toml"));
    }
    std::env::var_os("HOME").filter(|d| !d.is_empty()).map(|home| PathBuf::from(home).join(".config").join("kerwen").join("profile.toml"))
}
