//! Name rules, as JetStream KV enforces them.

/// A bucket name: non-empty, only `[A-Za-z0-9_-]`.
pub fn validate_bucket_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("bucket name is empty".to_string());
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-'))
    {
        return Err(format!(
            "bucket name {name:?} contains {c:?}; allowed are A-Z a-z 0-9 _ -"
        ));
    }
    Ok(())
}

/// A key: `.`-separated non-empty tokens of `[-/_=A-Za-z0-9]`.
pub fn validate_key(key: &str) -> Result<(), String> {
    if key.is_empty() {
        return Err("key is empty".to_string());
    }
    if let Some(c) = key
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '/' | '_' | '=' | '.')))
    {
        return Err(format!(
            "key {key:?} contains {c:?}; allowed are A-Z a-z 0-9 - / _ = ."
        ));
    }
    if key.starts_with('.') || key.ends_with('.') {
        return Err(format!("key {key:?} starts or ends with '.'"));
    }
    if key.contains("..") {
        return Err(format!("key {key:?} has an empty token ('..')"));
    }
    Ok(())
}
