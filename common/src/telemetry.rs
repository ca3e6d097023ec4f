//! Logging setup shared by both binaries: `tracing` to stderr through a bounded in-memory
//! buffer ([`sink`]), text or JSON, filter from `RUST_LOG` (default `info`).

mod sink;

pub use sink::{LOG_BUFFER, LOG_EXIT_FLUSH, LOG_FLUSH, LOG_PANIC_FLUSH, Sink, dropped_lines, flush};

use std::fmt::{self, Write as _};

use tracing::field::{Field, Visit};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::FormatFields;
use tracing_subscriber::fmt::format::Writer;

/// Log output format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(format!("unknown log format {other:?} (expected text or json)")),
        }
    }
}

/// Installs the global subscriber. Calling it twice is harmless (the second call is ignored).
/// Lines reach stderr from a writer thread within [`LOG_FLUSH`]: call [`flush`] before the
/// process exits (a panic flushes by itself).
pub fn init(format: LogFormat) {
    sink::install();
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            // The lines before the panic first, then its message (a panic in a task is caught
            // and the process goes on: a stuck output holds this thread up only briefly).
            sink::flush_within(LOG_PANIC_FLUSH);
            previous(info)
        }));
    });
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only on a terminal: logs redirected to a file stay greppable.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(sink::SinkWriter)
        .with_ansi(ansi)
        .with_timer(UtcMicros);
    let _ = match format {
        // Without colours, fields are written by `PlainFields`: the same text as the default
        // formatter's, at about half the cost (ztunnel writes one access line per connection).
        LogFormat::Text if !ansi => builder.fmt_fields(PlainFields).try_init(),
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// The time of a log line as `tracing_subscriber`'s default timer writes it (RFC 3339 in UTC
/// with microseconds: `2026-12-06T07:45:28.268599Z`), written digit by digit instead of through
/// `write!` with padding, which cost about 2k instructions per line (ztunnel writes one line
/// per connection). Times outside 1970-9999 are left to the default timer.
#[derive(Clone, Copy, Debug, Default)]
pub struct UtcMicros;

impl tracing_subscriber::fmt::time::FormatTime for UtcMicros {
    fn format_time(&self, w: &mut Writer<'_>) -> fmt::Result {
        let now = std::time::SystemTime::now();
        match now
            .duration_since(std::time::UNIX_EPOCH)
            .ok()
            .and_then(|d| utc_micros(d.as_secs(), d.subsec_micros()))
        {
            Some(text) => w.write_str(std::str::from_utf8(&text).map_err(|_| fmt::Error)?),
            None => tracing_subscriber::fmt::time::SystemTime.format_time(w),
        }
    }
}

/// `secs` after the Unix epoch and `micros` as `YYYY-MM-DDTHH:MM:SS.uuuuuuZ`, or `None` past
/// the year 9999.
fn utc_micros(secs: u64, micros: u32) -> Option<[u8; 27]> {
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Days to a civil date (proleptic Gregorian), counting eras of 400 years from 0000-03-01.
    let z = days + 719_468;
    let (era, doe) = (z / 146_097, z % 146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    if year > 9999 || micros >= 1_000_000 {
        return None;
    }
    let mut out = *b"0000-00-00T00:00:00.000000Z";
    let mut put = |at: usize, width: usize, mut v: u64| {
        for i in (at..at + width).rev() {
            out[i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(0, 4, year);
    put(5, 2, month);
    put(8, 2, day);
    put(11, 2, rem / 3_600);
    put(14, 2, rem / 60 % 60);
    put(17, 2, rem % 60);
    put(20, 6, u64::from(micros));
    Some(out)
}

/// Formats an event's fields as `tracing_subscriber`'s default formatter does without colours
/// (the message first and unquoted, with terminal control characters escaped; then
/// `name=value` separated by spaces, `r#` dropped from names, strings quoted, `log.` metadata
/// left out), but writes names and values straight to the line instead of through the
/// terminal-styling wrappers that formatter puts around every name and `=` even when colours
/// are off: those were half of the cost of ztunnel's access line, itself a fifth of the
/// instructions of a short proxied connection.
#[derive(Clone, Copy, Debug, Default)]
pub struct PlainFields;

impl<'w> FormatFields<'w> for PlainFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'w>, fields: R) -> fmt::Result {
        let mut visitor = PlainVisitor { writer, first: true, result: Ok(()) };
        fields.record(&mut visitor);
        visitor.result
    }
}

struct PlainVisitor<'w> {
    writer: Writer<'w>,
    first: bool,
    result: fmt::Result,
}

impl PlainVisitor<'_> {
    /// `name=` (or the separating space and nothing else for the message); false to skip.
    fn start(&mut self, name: &str) -> Result<bool, fmt::Error> {
        if name.starts_with("log.") {
            return Ok(false);
        }
        if self.first {
            self.first = false;
        } else {
            self.writer.write_char(' ')?;
        }
        if name != "message" {
            self.writer.write_str(name.strip_prefix("r#").unwrap_or(name))?;
            self.writer.write_char('=')?;
        }
        Ok(true)
    }

    fn record(&mut self, field: &Field, write: impl FnOnce(&mut Self) -> fmt::Result) {
        if self.result.is_ok() {
            self.result = match self.start(field.name()) {
                Ok(true) => write(self),
                Ok(false) => Ok(()),
                Err(e) => Err(e),
            };
        }
    }
}

impl Visit for PlainVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.record_debug(field, &format_args!("{value}"));
        } else {
            self.record(field, |v| write!(v.writer, "{value:?}"));
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.record(field, |v| v.writer.write_str(itoa::Buffer::new().format(value)));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.record(field, |v| v.writer.write_str(itoa::Buffer::new().format(value)));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.record(field, |v| v.writer.write_str(if value { "true" } else { "false" }));
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        let sanitize = self.writer.sanitizes_ansi_escapes();
        match value.source() {
            Some(source) => self.record_debug(
                field,
                &format_args!(
                    "{} {}.sources={}",
                    Sanitized(format_args!("{value}"), sanitize),
                    field.name(),
                    Sources(source, sanitize)
                ),
            ),
            None => {
                self.record_debug(field, &format_args!("{}", Sanitized(format_args!("{value}"), sanitize)))
            }
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let message = field.name() == "message";
        self.record(field, |v| {
            if message && v.writer.sanitizes_ansi_escapes() {
                write!(Escaping(&mut v.writer), "{value:?}")
            } else {
                write!(v.writer, "{value:?}")
            }
        });
    }
}

/// A socket address, displayed exactly as `SocketAddr` displays it; an IPv4 one is written
/// piece by piece (an access line carries three addresses, and the standard library formats
/// each octet through the formatting machinery).
pub struct LogAddr<'a>(pub &'a std::net::SocketAddr);

impl fmt::Display for LogAddr<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            std::net::SocketAddr::V4(a) if f.width().is_none() && f.precision().is_none() => {
                let mut n = itoa::Buffer::new();
                let [a1, a2, a3, a4] = a.ip().octets();
                for (octet, after) in [(a1, "."), (a2, "."), (a3, "."), (a4, ":")] {
                    f.write_str(n.format(octet))?;
                    f.write_str(after)?;
                }
                f.write_str(n.format(a.port()))
            }
            other => fmt::Display::fmt(other, f),
        }
    }
}

/// Writes through to `W`, escaping the control characters a terminal would act on (ESC, BEL,
/// BS, FF, DEL and the C1 codes), so a logged message cannot drive the reader's terminal.
struct Escaping<'a, W>(&'a mut W);

impl<W: fmt::Write> fmt::Write for Escaping<'_, W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut rest = s;
        while let Some(at) = rest.find(|c: char| is_terminal_control(c)) {
            self.0.write_str(&rest[..at])?;
            let c = rest[at..].chars().next().unwrap_or_default();
            match c {
                '\x1b' | '\x07' | '\x08' | '\x0c' | '\x7f' => write!(self.0, "\\x{:02x}", c as u32)?,
                _ => write!(self.0, "\\u{{{:x}}}", c as u32)?,
            }
            rest = &rest[at + c.len_utf8()..];
        }
        self.0.write_str(rest)
    }
}

fn is_terminal_control(c: char) -> bool {
    matches!(c, '\x1b' | '\x07' | '\x08' | '\x0c' | '\x7f' | '\u{80}'..='\u{9f}')
}

/// `T` displayed, escaped as [`Escaping`] does when `.1` is set.
struct Sanitized<T>(T, bool);

impl<T: fmt::Display> fmt::Display for Sanitized<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.1 { write!(Escaping(f), "{}", self.0) } else { write!(f, "{}", self.0) }
    }
}

/// An error and its sources as a list: `["outer", "inner"]`.
struct Sources<'a>(&'a (dyn std::error::Error + 'static), bool);

impl fmt::Display for Sources<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut list = f.debug_list();
        let mut next = Some(self.0);
        while let Some(e) = next {
            list.entry(&format_args!("{}", Sanitized(format_args!("{e}"), self.1)));
            next = e.source();
        }
        list.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tracing_subscriber::fmt::MakeWriter;

    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Lines {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Lines {
        type Writer = Lines;
        fn make_writer(&'a self) -> Lines {
            self.clone()
        }
    }

    #[derive(Debug, thiserror::Error)]
    #[error("outer \x1b[31mfailure")]
    struct Outer(#[source] std::io::Error);

    /// Events with every kind of field, and text a terminal would act on.
    fn events() {
        let addr: std::net::SocketAddr = "10.0.0.1:8080".parse().unwrap();
        let id = Some("spiffe://cluster.local/ns/demo/sa/client");
        tracing::info!(target: "access", conn = 7u64, direction = "outbound", src.addr = %addr,
            dst.identity = ?id, bytes_sent = 0u64, bytes_recv = u64::MAX, delta = -5i64,
            ok = true, ratio = 0.25f64, big = u128::MAX, "connection complete");
        tracing::warn!(reason = %"denied by \"policy\" x", response_flags = "-", "connection refused");
        tracing::info!("a message with \x1b[2J an escape, a bell \x07, DEL \x7f and a C1 \u{9b} code");
        tracing::info!(
            r#type = "raw name",
            quoted = "tab\tand \x1b and \u{85}",
            "{} formatted {}",
            1,
            "args"
        );
        tracing::info!(message = "message given as a field", after = 1u64);
        tracing::info!(empty = "", "");
        tracing::debug!(only = 1u64);
        let e = Outer(std::io::Error::other("inner \x1b cause"));
        tracing::error!(error = &e as &(dyn std::error::Error + 'static), "failed");
        let leaf = std::io::Error::other("leaf");
        tracing::error!(r#err = &leaf as &(dyn std::error::Error + 'static));
        tracing::info!(bytes = tracing::field::debug(b"\x00\xff"), "bytes");
        let span = tracing::info_span!("conn", id = 3u64, peer = %addr);
        let _in = span.enter();
        tracing::info!(inside = "a span", "scoped");
    }

    fn capture(plain: bool) -> String {
        let lines = Lines::default();
        let builder = tracing_subscriber::fmt()
            .with_writer(lines.clone())
            .with_ansi(false)
            .without_time()
            .with_max_level(tracing::Level::TRACE);
        if plain {
            tracing::subscriber::with_default(builder.fmt_fields(PlainFields).finish(), events);
        } else {
            tracing::subscriber::with_default(builder.finish(), events);
        }
        String::from_utf8(lines.0.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn utc_micros_writes_rfc3339_dates() {
        // Expected text from Python's datetime, leap days and century years included.
        for (secs, micros, text) in [
            (0, 0, "1970-01-01T00:00:00.000000Z"),
            (951_782_400, 1, "2000-02-29T00:00:00.000001Z"),
            (951_868_799, 999_999, "2000-02-29T23:59:59.999999Z"),
            (4_107_542_400, 500_000, "2100-03-01T00:00:00.500000Z"),
            (1_796_543_128, 268_599, "2026-12-06T07:45:28.268599Z"),
            (1_709_164_800, 42, "2024-02-29T00:00:00.000042Z"),
            (1_234_567_890, 123_456, "2009-02-13T23:31:30.123456Z"),
            (253_402_300_799, 999_999, "9999-12-31T23:59:59.999999Z"),
        ] {
            let out = utc_micros(secs, micros).expect("in range");
            assert_eq!(std::str::from_utf8(&out).unwrap(), text);
        }
        assert_eq!(utc_micros(253_402_300_800, 0), None, "year 10000 goes to the default timer");
        assert_eq!(utc_micros(0, 1_000_000), None);
    }

    #[test]
    fn utc_micros_agrees_with_the_default_timer() {
        use tracing_subscriber::fmt::time::FormatTime;
        let format = |t: &dyn Fn(&mut Writer<'_>) -> fmt::Result| {
            let mut s = String::new();
            t(&mut Writer::new(&mut s)).unwrap();
            s
        };
        // The two read the clock apart: retried if a second boundary fell between them.
        for _ in 0..10 {
            let ours = format(&|w| UtcMicros.format_time(w));
            let theirs = format(&|w| tracing_subscriber::fmt::time::SystemTime.format_time(w));
            assert_eq!(ours.len(), theirs.len(), "{ours} / {theirs}");
            if ours[..19] == theirs[..19] {
                assert_eq!(ours.as_bytes()[19..20], *b".");
                assert!(ours.ends_with('Z') && theirs.ends_with('Z'));
                return;
            }
        }
        panic!("the two timers never agreed on the second");
    }

    #[test]
    fn log_addresses_read_as_the_standard_display() {
        for a in [
            "0.0.0.0:0",
            "10.42.1.2:15008",
            "255.255.255.255:65535",
            "1.20.199.9:80",
            "[::1]:443",
            "[fe80::1%2]:8080",
        ] {
            let addr: std::net::SocketAddr = a.parse().unwrap();
            assert_eq!(LogAddr(&addr).to_string(), addr.to_string());
            assert_eq!(format!("{:>24}", LogAddr(&addr)), format!("{addr:>24}"));
        }
    }

    #[test]
    fn plain_fields_write_the_default_formatters_text() {
        let (plain, default) = (capture(true), capture(false));
        assert_eq!(plain.lines().count(), 11, "{plain}");
        for (p, d) in plain.lines().zip(default.lines()) {
            assert_eq!(p, d);
        }
        assert_eq!(plain, default);
        // The escape in the message is written escaped; a field's value is written as given.
        assert!(
            plain.contains(r"with \x1b[2J an escape, a bell \x07, DEL \x7f and a C1 \u{9b} code"),
            "{plain}"
        );
        assert!(plain.contains(r#"quoted="tab\tand \u{1b} and \u{85}""#), "{plain}");
    }
}
