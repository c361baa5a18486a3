//! X-Road style identifiers: `INSTANCE/CLASS/MEMBER/SUBSYSTEM` names a client subsystem and a
//! service (a mailbox) adds `/SERVICE[/VERSION]`.
//!
//! Every part is 1..=[`MAX_PART_LEN`] characters from X-Road's set `A-Za-z0-9'()+,-.=?`.
//! Validation is strict ASCII on purpose: unicode look-alikes and separators smuggled into a
//! part must never produce two spellings of one identity.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Longest accepted identifier part, in bytes.
pub const MAX_PART_LEN: usize = 64;

/// Why an identifier was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("identifier {input:?} has {found} parts, expected {expected}")]
    PartCount { input: String, found: usize, expected: &'static str },
    #[error("identifier {input:?}: part {index} is empty")]
    EmptyPart { input: String, index: usize },
    #[error("identifier {input:?}: part {index} is longer than {MAX_PART_LEN} characters")]
    PartTooLong { input: String, index: usize },
    #[error(
        "identifier {input:?}: part {index} contains {bad:?}, allowed are A-Za-z0-9 and '()+,-.=?"
    )]
    BadCharacter { input: String, index: usize, bad: char },
}

fn is_allowed(c: char) -> bool {
    c.is_ascii_alphanumeric() || "'()+,-.=?".contains(c)
}

fn split_parts<'a>(input: &'a str, expected: &'static str, allowed: &[usize]) -> Result<Vec<&'a str>, IdError> {
    let parts: Vec<&str> = input.split('/').collect();
    if !allowed.contains(&parts.len()) {
        return Err(IdError::PartCount { input: input.to_owned(), found: parts.len(), expected });
    }
    for (index, part) in parts.iter().enumerate() {
        if part.is_empty() {
            return Err(IdError::EmptyPart { input: input.to_owned(), index });
        }
        if part.len() > MAX_PART_LEN {
            return Err(IdError::PartTooLong { input: input.to_owned(), index });
        }
        if let Some(bad) = part.chars().find(|c| !is_allowed(*c)) {
            return Err(IdError::BadCharacter { input: input.to_owned(), index, bad });
        }
    }
    Ok(parts)
}

/// A client subsystem: `INSTANCE/CLASS/MEMBER/SUBSYSTEM`, e.g. `TM/GOV/MINCOM/smev-registry`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SubsystemId {
    pub instance: String,
    pub member_class: String,
    pub member_code: String,
    pub subsystem: String,
}

impl FromStr for SubsystemId {
    type Err = IdError;
    fn from_str(input: &str) -> Result<Self, IdError> {
        let p = split_parts(input, "4 (INSTANCE/CLASS/MEMBER/SUBSYSTEM)", &[4])?;
        Ok(Self {
            instance: p[0].to_owned(),
            member_class: p[1].to_owned(),
            member_code: p[2].to_owned(),
            subsystem: p[3].to_owned(),
        })
    }
}

impl fmt::Display for SubsystemId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}/{}", self.instance, self.member_class, self.member_code, self.subsystem)
    }
}

/// A service of a subsystem, which is also the name of its mailbox:
/// `INSTANCE/CLASS/MEMBER/SUBSYSTEM/SERVICE[/VERSION]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ServiceId {
    pub subsystem: SubsystemId,
    pub service: String,
    pub version: Option<String>,
}

impl FromStr for ServiceId {
    type Err = IdError;
    fn from_str(input: &str) -> Result<Self, IdError> {
        let p = split_parts(input, "5 or 6 (INSTANCE/CLASS/MEMBER/SUBSYSTEM/SERVICE[/VERSION])", &[5, 6])?;
        Ok(Self {
            subsystem: SubsystemId {
                instance: p[0].to_owned(),
                member_class: p[1].to_owned(),
                member_code: p[2].to_owned(),
                subsystem: p[3].to_owned(),
            },
            service: p[4].to_owned(),
            version: p.get(5).map(|v| (*v).to_owned()),
        })
    }
}

impl fmt::Display for ServiceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.subsystem, self.service)?;
        if let Some(v) = &self.version {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_service_ids() {
        let id: ServiceId = "TM/GOV/MINCOM/smev-registry/taxReport/v1".parse().unwrap();
        assert_eq!(id.subsystem.member_code, "MINCOM");
        assert_eq!(id.version.as_deref(), Some("v1"));
        assert_eq!(id.to_string(), "TM/GOV/MINCOM/smev-registry/taxReport/v1");
        let id: ServiceId = "EE/COM/12345/sub/svc".parse().unwrap();
        assert_eq!(id.version, None);
    }

    #[test]
    fn rejects_malformed_ids() {
        for bad in [
            "",
            "TM/GOV/MINCOM",
            "TM/GOV/MINCOM/sub",
            "TM/GOV//sub/svc",
            "TM/GOV/MIN COM/sub/svc",
            "TM/GOV/MINCOM/sub/svc/v1/extra",
            "TM/GOV/MINСOM/sub/svc", // Cyrillic С
            "TM/GOV/MINCOM/sub/svc\n",
            "TM/GOV/MINCOM/sub/s\\vc",
        ] {
            assert!(bad.parse::<ServiceId>().is_err(), "{bad:?} must be rejected");
        }
        let long = format!("TM/GOV/{}/sub/svc", "x".repeat(MAX_PART_LEN + 1));
        assert!(matches!(long.parse::<ServiceId>(), Err(IdError::PartTooLong { index: 2, .. })));
    }
}
