//! Pagination shared by the list endpoints (devices, incidents, quarantine, inspections):
//! `limit` (checked, never silently clamped) and an opaque `cursor` — the sort key of a page's
//! last item, hex-encoded so it is URL-safe and says nothing a client should parse. A page
//! answers `count` (its items), `total` (all matching) and `next_cursor` (null on the last page).

use super::ApiError;

/// Items per page when `limit` is not given.
pub const DEFAULT_LIMIT: usize = 100;
/// Largest `limit`.
pub const MAX_LIMIT: usize = 1000;

/// `limit`: `default` when absent, 1–`max` else.
pub fn limit(requested: Option<usize>, default: usize, max: usize) -> Result<usize, ApiError> {
    match requested {
        None => Ok(default),
        Some(n) if (1..=max).contains(&n) => Ok(n),
        Some(n) => Err(ApiError::BadRequest(format!("limit={n}: 1–{max}"))),
    }
}

/// The cursor of a sort key.
pub fn encode(key: &str) -> String {
    hex::encode(key.as_bytes())
}

/// The sort key of a cursor this API handed out.
pub fn decode(cursor: &str) -> Result<String, ApiError> {
    hex::decode(cursor)
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .ok_or_else(|| ApiError::BadRequest(format!("cursor={cursor:?} is not a cursor this API handed out (take next_cursor of the previous page)")))
}

/// A sort key of several parts (incidents: updated time and id), and back.
pub fn join(parts: &[&str]) -> String {
    parts.join("\u{1f}")
}

pub fn split(key: &str, n: usize) -> Result<Vec<&str>, ApiError> {
    let parts: Vec<&str> = key.split('\u{1f}').collect();
    if parts.len() == n {
        Ok(parts)
    } else {
        Err(ApiError::BadRequest("cursor is not a cursor of this list (take next_cursor of the previous page)".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_bad_ones_are_refused() {
        let key = join(&["1800000000000", "inc-1"]);
        let cursor = encode(&key);
        assert!(cursor.bytes().all(|b| b.is_ascii_hexdigit()), "URL-safe: {cursor}");
        assert_eq!(decode(&cursor).ok().as_deref(), Some(key.as_str()));
        assert_eq!(split(&key, 2).ok(), Some(vec!["1800000000000", "inc-1"]));
        assert!(decode("zz").is_err());
        assert!(split("gas-1", 2).is_err());
        assert!(limit(Some(0), 100, 1000).is_err());
        assert!(limit(Some(1001), 100, 1000).is_err());
        assert_eq!(limit(None, 100, 1000).ok(), Some(100));
    }
}
