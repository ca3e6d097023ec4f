//! Values of the waypoint's config resources converted on receipt, refused (never panicking)
//! when out of range.

use std::time::Duration;

/// The longest `google.protobuf.Duration` (its documented range: about 10,000 years).
pub const MAX_PROTO_DURATION_SECONDS: i64 = 315_576_000_000;

/// A configured `google.protobuf.Duration` (`field` names it in the error) as a `std` one:
/// refused when negative or beyond the type's range. Checked by hand before any arithmetic:
/// prost's own conversion overflows on `i64::MIN` seconds.
pub fn duration_from_proto(d: prost_types::Duration, field: &str) -> Result<Duration, String> {
    let n = d.normalized();
    if n.seconds < 0 || n.nanos < 0 {
        return Err(format!("{field} is negative ({}s {}ns)", d.seconds, d.nanos));
    }
    if n.seconds > MAX_PROTO_DURATION_SECONDS {
        return Err(format!("{field} is too large ({}s)", d.seconds));
    }
    // Both in range now: seconds fits u64 and nanos is below a second.
    Ok(Duration::new(n.seconds as u64, n.nanos as u32))
}
