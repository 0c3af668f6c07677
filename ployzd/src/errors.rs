//! Constructors for the API errors every subsystem returns, and the
//! checks of names that reach the store (hostnames, KV keys).

use ployz_api::{ApiError, ErrorCode, Progress};

pub(crate) fn invalid(msg: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::InvalidArgument, msg)
}

pub(crate) fn internal(msg: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::Internal, msg)
}

pub(crate) fn refused(msg: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::Refused, msg)
}

/// Where live progress of a long request goes (the API connection).
pub type ProgressSink = tokio::sync::mpsc::UnboundedSender<Progress>;

/// Send one progress line; a caller that went away is not an error.
pub(crate) fn note(sink: &ProgressSink, target: &str, step: &str, message: impl Into<String>) {
    let _ = sink.send(Progress::line(target, step, message));
}

/// Send how far a transfer got (`done` of `total` bytes, when known).
pub(crate) fn note_bytes(
    sink: &ProgressSink,
    target: &str,
    step: &str,
    message: &str,
    done: u64,
    total: Option<u64>,
) {
    let _ = sink.send(Progress {
        done: Some(done),
        total,
        ..Progress::line(target, step, message)
    });
}

/// A DNS-label-like name of at most `max` bytes: lowercase letters, digits
/// and '-', not at either end. Fits hostnames and KV keys.
pub(crate) fn validate_label(what: &str, name: &str, max: usize) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= max
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(invalid(format!(
            "invalid {what} `{name}`: use 1-{max} lowercase letters, digits and '-', not starting or ending with '-'"
        )))
    }
}

/// Network names: DNS-label-like, so they fit in hostnames and KV keys.
pub fn validate_network_name(name: &str) -> Result<(), ApiError> {
    validate_label("network name", name, 63)
}

pub fn validate_region(region: &str) -> Result<(), ApiError> {
    let ok = !region.is_empty()
        && region.len() <= 63
        && region
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(invalid(format!(
            "invalid region `{region}`: use 1-63 letters, digits, '-' or '_'"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_names() {
        for ok in ["demo", "my-cluster", "a", "x1-2"] {
            validate_network_name(ok).unwrap();
        }
        for bad in ["", "-a", "a-", "My", "a_b", "a.b", &"a".repeat(64)] {
            let e = validate_network_name(bad).unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidArgument);
        }
    }

    #[test]
    fn regions() {
        validate_region("eu-west_1").unwrap();
        assert!(validate_region("eu west").is_err());
        assert!(validate_region("").is_err());
    }
}
