//! The pure parts of human approval: checking a requireApproval rule's
//! [`ApprovalSettings`], and [`redact`]ing the arguments a person is shown.
//! The decision itself (deny > requireApproval > allow) is the engine's.

use serde_json::Value;
use thiserror::Error;

use crate::model::{ApprovalSettings, MAX_APPROVAL_SECONDS, MAX_REDACT_ARGUMENTS};

/// What a redacted argument is replaced with in the arguments a person is
/// shown.
pub const REDACTED: &str = "[redacted]";

/// Longest `redactArguments` pointer, as the CRD schema allows.
const MAX_POINTER_LEN: usize = 512;

/// Why a requireApproval rule's `approval` settings are invalid.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum ApprovalError {
    /// `timeoutSeconds` or `validForSeconds` outside 1..=86400.
    #[error("approval.{field} is {value}: it must be between 1 and 86400 seconds")]
    OutOfRange {
        /// `timeoutSeconds` or `validForSeconds`.
        field: &'static str,
        /// The value.
        value: u32,
    },
    /// More `redactArguments` than allowed.
    #[error("approval.redactArguments lists {count} pointers: at most 32 are allowed")]
    TooManyRedactions {
        /// How many.
        count: usize,
    },
    /// A `redactArguments` entry is not a JSON pointer to an argument.
    #[error(
        "approval.redactArguments entry {pointer:?} is not a JSON pointer to an argument (RFC 6901): it must start with '/', write '~' as ~0 and '/' inside a name as ~1, and be at most 512 characters"
    )]
    InvalidPointer {
        /// The entry.
        pointer: String,
    },
}

/// Checks approval settings: both durations in 1..=86400 seconds, at most 32
/// redaction pointers, each a non-empty RFC 6901 pointer. An invalid pointer
/// is refused rather than ignored: [`redact`] skips what it cannot find, so a
/// typo would show the approver the value it was meant to hide.
pub fn check_approval_settings(settings: &ApprovalSettings) -> Result<(), ApprovalError> {
    for (field, value) in [
        ("timeoutSeconds", settings.timeout_seconds),
        ("validForSeconds", settings.valid_for_seconds),
    ] {
        if !(1..=MAX_APPROVAL_SECONDS).contains(&value) {
            return Err(ApprovalError::OutOfRange { field, value });
        }
    }
    let count = settings.redact_arguments.len();
    if count > MAX_REDACT_ARGUMENTS {
        return Err(ApprovalError::TooManyRedactions { count });
    }
    match settings
        .redact_arguments
        .iter()
        .find(|p| !is_argument_pointer(p))
    {
        Some(pointer) => Err(ApprovalError::InvalidPointer {
            pointer: pointer.clone(),
        }),
        None => Ok(()),
    }
}

/// A JSON pointer below the document root: `/` then tokens, `~` only as `~0`
/// or `~1` (the CRD schema's pattern).
fn is_argument_pointer(pointer: &str) -> bool {
    if !pointer.starts_with('/') || pointer.len() > MAX_POINTER_LEN {
        return false;
    }
    let mut bytes = pointer.bytes();
    while let Some(b) = bytes.next() {
        if b == b'~' && !matches!(bytes.next(), Some(b'0' | b'1')) {
            return false;
        }
    }
    true
}

/// The arguments with the value at each of `pointers` (RFC 6901, `~0` for
/// `~` and `~1` for `/`) replaced by `"[redacted]"` ([`REDACTED`]). Pointers
/// that name nothing in `arguments` are ignored; `""` names the whole value.
pub fn redact(arguments: &Value, pointers: &[String]) -> Value {
    let mut redacted = arguments.clone();
    for pointer in pointers {
        if let Some(value) = redacted.pointer_mut(pointer) {
            *value = Value::String(REDACTED.to_owned());
        }
    }
    redacted
}

#[cfg(test)]
#[path = "approval_tests.rs"]
mod tests;
