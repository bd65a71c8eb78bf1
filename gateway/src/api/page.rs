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

/// A cursor part: the hex of a text (any hex decodes to a position; not valid UTF-8 is
/// read lossily, still a position in the order).
pub fn hex_part(text: &str) -> String {
    hex::encode(text.as_bytes())
}

fn unhex(part: &str) -> Option<String> {
    if part.is_empty() || !part.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    hex::decode(part).ok().map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
}

fn bad(cursor: &str) -> ApiError {
    ApiError::BadRequest(format!("cursor={cursor:?} is not a cursor of this list (take next_cursor of the previous page)"))
}

/// The device id in a devices cursor (pattern [`DEVICE_CURSOR`]).
pub fn device_after(cursor: &str) -> Result<String, ApiError> {
    unhex(cursor).ok_or_else(|| bad(cursor))
}

/// `(updated_ms, id)` in an incidents cursor (pattern [`INCIDENT_CURSOR`]).
pub fn incident_after(cursor: &str) -> Result<(i64, String), ApiError> {
    let (ms, id) = cursor.split_once('-').ok_or_else(|| bad(cursor))?;
    Ok((digits(ms, 15).ok_or_else(|| bad(cursor))?, unhex(id).ok_or_else(|| bad(cursor))?))
}

pub fn incident_cursor(updated_ms: i64, id: &str) -> String {
    format!("{updated_ms}-{}", hex_part(id))
}

/// The entry id in a quarantine cursor (pattern [`QUARANTINE_CURSOR`]).
pub fn quarantine_before(cursor: &str) -> Result<i64, ApiError> {
    digits(cursor, 18).ok_or_else(|| bad(cursor))
}

/// `(due, device, task)` in a work-orders cursor (pattern [`WORK_ORDER_CURSOR`]).
pub fn work_order_after(cursor: &str) -> Result<(String, String, String), ApiError> {
    let mut parts = cursor.splitn(3, '-');
    let (Some(due), Some(device), Some(task)) = (parts.next(), parts.next(), parts.next()) else { return Err(bad(cursor)) };
    Ok((unhex(due).ok_or_else(|| bad(cursor))?, unhex(device).ok_or_else(|| bad(cursor))?, task.to_owned()))
}

pub fn work_order_cursor(due: &str, device: &str, task: &str) -> String {
    format!("{}-{}-{task}", hex_part(due), hex_part(device))
}

/// Up to `max` decimal digits, nothing else (no sign).
pub fn digits(text: &str, max: usize) -> Option<i64> {
    if text.is_empty() || text.len() > max || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// The cursors' patterns, as the OpenAPI document states them.
pub const DEVICE_CURSOR: &str = "^([0-9a-f]{2})+$";
pub const INCIDENT_CURSOR: &str = "^[0-9]{1,15}-([0-9a-f]{2})+$";
pub const QUARANTINE_CURSOR: &str = "^[0-9]{1,18}$";
pub const WORK_ORDER_CURSOR: &str = "^([0-9a-f]{2})+-([0-9a-f]{2})+-(inspection|calibration|cleaning|replacement|siren_season)$";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_bad_ones_are_refused() {
        let c = incident_cursor(1_800_000_000_000, "inc-1");
        assert_eq!(incident_after(&c).ok(), Some((1_800_000_000_000, "inc-1".to_owned())));
        assert_eq!(device_after(&hex_part("gas-1")).ok().as_deref(), Some("gas-1"));
        let w = work_order_cursor("2026-12-01T00:00:00+08:00", "gas-1", "inspection");
        assert_eq!(work_order_after(&w).ok(), Some(("2026-12-01T00:00:00+08:00".to_owned(), "gas-1".to_owned(), "inspection".to_owned())));
        for bad in ["", "zz", "0", "ABC"] {
            assert!(device_after(bad).is_err(), "{bad}");
        }
        for bad in ["", "12", "-6161", "x-6161", "+1-6161", "1-"] {
            assert!(incident_after(bad).is_err(), "{bad}");
        }
        for bad in ["", "-1", "+1", "1234567890123456789"] {
            assert!(quarantine_before(bad).is_err(), "{bad}");
        }
        assert!(limit(Some(0), 100, 1000).is_err());
        assert!(limit(Some(1001), 100, 1000).is_err());
        assert_eq!(limit(None, 100, 1000).ok(), Some(100));
    }
}
