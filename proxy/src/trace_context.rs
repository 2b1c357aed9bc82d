//! Trace context propagation: W3C Trace Context, and B3 for apps that
//! speak Zipkin's headers.
//!
//! Each sidecar hop is a span. A request that arrives with a valid
//! context keeps its trace id and its sampled flag; the sidecar makes a
//! child span (a new span id) and writes the context back in the same
//! format, its own span id as the parent the next hop sees. A request
//! without one (or with an invalid one) starts a new trace, sampled at the
//! mesh's rate, in W3C format.
//!
//! - `traceparent` (W3C): `00-<32 hex trace id>-<16 hex parent id>-<2 hex
//!   flags>`, lowercase. Version `ff`, all-zero ids, wrong lengths and
//!   upper case make it invalid. A later version may append fields after a
//!   `-`, which are ignored. `tracestate` passes unchanged, and is dropped
//!   with an invalid `traceparent`, whose vendor state it was.
//! - B3, read only when there is no valid `traceparent`: the single `b3`
//!   header (`<trace id>-<span id>[-<sampling>[-<parent id>]]`) or the
//!   `x-b3-*` headers. A 16-hex (64-bit) trace id keeps its length. The
//!   `d` (debug) sampling state is passed on and counts as sampled.

use http::header::{HeaderMap, HeaderName, HeaderValue};

use crate::random::random_u64;

pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
pub const B3: HeaderName = HeaderName::from_static("b3");
pub const B3_TRACE_ID: HeaderName = HeaderName::from_static("x-b3-traceid");
pub const B3_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-spanid");
pub const B3_PARENT_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-parentspanid");
pub const B3_SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");
pub const B3_FLAGS: HeaderName = HeaderName::from_static("x-b3-flags");

/// How the context came in, and so how it goes out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    W3c,
    B3Single,
    B3Multi,
}

/// A trace id: 128 bits (B3 may carry 64, kept as the low half).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceId {
    pub bytes: [u8; 16],
    /// Came in as 16 hex digits (B3): goes out so.
    short: bool,
}

/// The context a request carries into a hop.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parent {
    pub trace_id: TraceId,
    pub span_id: [u8; 8],
    pub sampled: bool,
    /// B3 debug (`d`, or `x-b3-flags: 1`).
    debug: bool,
    pub format: Format,
}

/// This hop's span: what it writes downstream and what it exports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpanContext {
    pub trace_id: TraceId,
    pub span_id: [u8; 8],
    /// `None`: this span starts the trace.
    pub parent_span_id: Option<[u8; 8]>,
    pub sampled: bool,
    debug: bool,
    pub format: Format,
}

impl SpanContext {
    /// A child of `parent`, or the root of a new trace sampled at
    /// `sampling_percent` (0..=100).
    pub fn start(parent: Option<&Parent>, sampling_percent: f64) -> Self {
        match parent {
            Some(p) => Self {
                trace_id: p.trace_id,
                span_id: new_span_id(),
                parent_span_id: Some(p.span_id),
                sampled: p.sampled,
                debug: p.debug,
                format: p.format,
            },
            None => {
                let hi = random_u64().to_be_bytes();
                let lo = random_u64().to_be_bytes();
                let mut bytes = [0; 16];
                bytes[..8].copy_from_slice(&hi);
                bytes[8..].copy_from_slice(&lo);
                Self {
                    trace_id: TraceId {
                        bytes,
                        short: false,
                    },
                    span_id: new_span_id(),
                    parent_span_id: None,
                    sampled: sample(sampling_percent),
                    debug: false,
                    format: Format::W3c,
                }
            }
        }
    }

    pub fn trace_id_hex(&self) -> String {
        hex(&self.trace_id.bytes)
    }
}

fn new_span_id() -> [u8; 8] {
    random_u64().to_be_bytes()
}

/// Whether a new trace is sampled at `percent` (0..=100).
fn sample(percent: f64) -> bool {
    if percent >= 100.0 {
        return true;
    }
    if percent <= 0.0 || percent.is_nan() {
        return false;
    }
    // 53 random bits as a fraction in [0, 1).
    let fraction = (random_u64() >> 11) as f64 / (1u64 << 53) as f64;
    fraction * 100.0 < percent
}

/// The context a request carries, if it is valid: W3C first, else B3.
pub fn extract(headers: &HeaderMap) -> Option<Parent> {
    if let Some(value) = headers.get(&TRACEPARENT)
        && let Some(parent) = parse_traceparent(value.as_bytes())
    {
        return Some(parent);
    }
    if let Some(value) = headers.get(&B3)
        && let Some(parent) = parse_b3_single(value.as_bytes())
    {
        return Some(parent);
    }
    parse_b3_multi(headers)
}

/// Writes `span` into `headers` for the next hop, in its format, and
/// removes what the other formats or an invalid context left.
pub fn inject(headers: &mut HeaderMap, span: &SpanContext) {
    if span.format != Format::W3c {
        // Written back as B3: whatever B3 headers came in go first. (With
        // W3C, B3 headers a caller also sent pass through untouched: the
        // next hop reads W3C first too.)
        for name in [
            &B3,
            &B3_TRACE_ID,
            &B3_SPAN_ID,
            &B3_PARENT_SPAN_ID,
            &B3_SAMPLED,
            &B3_FLAGS,
        ] {
            headers.remove(name);
        }
    }
    let trace_id = || {
        if span.trace_id.short {
            hex(&span.trace_id.bytes[8..])
        } else {
            hex(&span.trace_id.bytes)
        }
    };
    let span_id = || hex(&span.span_id);
    let sampling = match (span.debug, span.sampled) {
        (true, _) => "d",
        (false, true) => "1",
        (false, false) => "0",
    };
    let put = |headers: &mut HeaderMap, name: &HeaderName, value: String| {
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(name.clone(), value);
        }
    };
    match span.format {
        Format::W3c => {
            // Written in place: the one header every request gets.
            let mut value = *b"00-00000000000000000000000000000000-0000000000000000-00";
            write_hex(&mut value[3..35], &span.trace_id.bytes);
            write_hex(&mut value[36..52], &span.span_id);
            if span.sampled {
                value[54] = b'1';
            }
            if let Ok(mut value) = HeaderValue::from_bytes(&value) {
                // New on every request: HPACK indexing it would only churn
                // the table.
                value.set_sensitive(true);
                headers.insert(TRACEPARENT, value);
            }
        }
        Format::B3Single => {
            let parent = span
                .parent_span_id
                .map(|p| format!("-{}", hex(&p)))
                .unwrap_or_default();
            let value = format!("{}-{}-{sampling}{parent}", trace_id(), span_id());
            put(headers, &B3, value);
        }
        Format::B3Multi => {
            put(headers, &B3_TRACE_ID, trace_id());
            put(headers, &B3_SPAN_ID, span_id());
            if let Some(parent) = span.parent_span_id {
                put(headers, &B3_PARENT_SPAN_ID, hex(&parent));
            }
            if span.debug {
                put(headers, &B3_FLAGS, "1".to_string());
            } else {
                put(headers, &B3_SAMPLED, sampling.to_string());
            }
        }
    }
    let w3c_parent = span.format == Format::W3c && span.parent_span_id.is_some();
    if span.format != Format::W3c {
        // B3 won, so any traceparent there was invalid.
        headers.remove(&TRACEPARENT);
    }
    if !w3c_parent {
        // Any tracestate belonged to a W3C context we did not continue.
        headers.remove(&TRACESTATE);
    }
}

fn parse_traceparent(value: &[u8]) -> Option<Parent> {
    // version "-" trace-id "-" parent-id "-" flags: 2+1+32+1+16+1+2.
    if value.len() < 55 {
        return None;
    }
    let mut version = [0u8; 1];
    decode_hex(&mut version, value.get(0..2)?)?;
    if version == [0xff] {
        return None;
    }
    // Version 00 is exactly 55 bytes; later versions may add "-..." fields.
    if (version == [0x00] && value.len() != 55) || (value.len() > 55 && value[55] != b'-') {
        return None;
    }
    if value[2] != b'-' || value[35] != b'-' || value[52] != b'-' {
        return None;
    }
    let mut trace_id = [0u8; 16];
    let mut span_id = [0u8; 8];
    let mut flags = [0u8; 1];
    decode_hex(&mut trace_id, &value[3..35])?;
    decode_hex(&mut span_id, &value[36..52])?;
    decode_hex(&mut flags, &value[53..55])?;
    if trace_id == [0; 16] || span_id == [0; 8] {
        return None;
    }
    Some(Parent {
        trace_id: TraceId {
            bytes: trace_id,
            short: false,
        },
        span_id,
        sampled: flags[0] & 1 == 1,
        debug: false,
        format: Format::W3c,
    })
}

fn parse_b3_single(value: &[u8]) -> Option<Parent> {
    let text = std::str::from_utf8(value).ok()?;
    let mut parts = text.split('-');
    let trace_id = b3_trace_id(parts.next()?)?;
    let span_id = b3_span_id(parts.next()?)?;
    let (sampled, debug) = match parts.next() {
        None => (true, false),
        Some("1") => (true, false),
        Some("0") => (false, false),
        Some("d") => (true, true),
        Some(_) => return None,
    };
    if let Some(parent) = parts.next() {
        b3_span_id(parent)?;
    }
    if parts.next().is_some() {
        return None;
    }
    Some(Parent {
        trace_id,
        span_id,
        sampled,
        debug,
        format: Format::B3Single,
    })
}

fn parse_b3_multi(headers: &HeaderMap) -> Option<Parent> {
    let get = |name: &HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
    let trace_id = b3_trace_id(get(&B3_TRACE_ID)?)?;
    let span_id = b3_span_id(get(&B3_SPAN_ID)?)?;
    let debug = get(&B3_FLAGS) == Some("1");
    let sampled = debug
        || match get(&B3_SAMPLED) {
            // "true" is an old spelling some clients still send.
            Some("1" | "true") | None => true,
            Some(_) => false,
        };
    Some(Parent {
        trace_id,
        span_id,
        sampled,
        debug,
        format: Format::B3Multi,
    })
}

fn b3_trace_id(s: &str) -> Option<TraceId> {
    let bytes = lower_hex(s.as_bytes())?;
    let (id, short) = match bytes.len() {
        8 => {
            let mut id = [0; 16];
            id[8..].copy_from_slice(&bytes);
            (id, true)
        }
        16 => (bytes.try_into().ok()?, false),
        _ => return None,
    };
    (id != [0; 16]).then_some(TraceId { bytes: id, short })
}

fn b3_span_id(s: &str) -> Option<[u8; 8]> {
    let id: [u8; 8] = lower_hex(s.as_bytes())?.try_into().ok()?;
    (id != [0; 8]).then_some(id)
}

/// Lowercase hex `digits` into `out` (exactly twice as many digits as
/// bytes); `None` for anything else, upper case included.
fn decode_hex(out: &mut [u8], digits: &[u8]) -> Option<()> {
    if digits.len() != out.len() * 2 {
        return None;
    }
    for (byte, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
        *byte = nibble(pair[0])? << 4 | nibble(pair[1])?;
    }
    Some(())
}

fn nibble(d: u8) -> Option<u8> {
    match d {
        b'0'..=b'9' => Some(d - b'0'),
        b'a'..=b'f' => Some(d - b'a' + 10),
        _ => None,
    }
}

/// Lowercase hex digits to bytes; `None` for anything else (upper case
/// included) or an odd length. (B3 ids, which come in two lengths.)
fn lower_hex(digits: &[u8]) -> Option<Vec<u8>> {
    if !digits.len().is_multiple_of(2) {
        return None;
    }
    let nibble = |d: u8| match d {
        b'0'..=b'9' => Some(d - b'0'),
        b'a'..=b'f' => Some(d - b'a' + 10),
        _ => None,
    };
    digits
        .chunks(2)
        .map(|pair| Some(nibble(pair[0])? << 4 | nibble(pair[1])?))
        .collect()
}

const DIGITS: &[u8; 16] = b"0123456789abcdef";

pub fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    out
}

/// Lowercase hex of `bytes` into `out` (twice as long).
pub fn write_hex(out: &mut [u8], bytes: &[u8]) {
    for (pair, b) in out.chunks_exact_mut(2).zip(bytes) {
        pair[0] = DIGITS[usize::from(b >> 4)];
        pair[1] = DIGITS[usize::from(b & 0xf)];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const SPAN: &str = "00f067aa0ba902b7";

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(
                HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        map
    }

    /// One hop: extract, start a span, inject.
    fn hop(pairs: &[(&str, &str)], percent: f64) -> (HeaderMap, SpanContext) {
        let mut map = headers(pairs);
        let parent = extract(&map);
        let span = SpanContext::start(parent.as_ref(), percent);
        inject(&mut map, &span);
        (map, span)
    }

    fn value<'a>(map: &'a HeaderMap, name: &str) -> &'a str {
        map.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
    }

    #[test]
    fn a_valid_traceparent_keeps_its_trace_and_flags_and_gets_a_child() {
        let incoming = format!("00-{TRACE}-{SPAN}-01");
        let (map, span) = hop(
            &[
                ("traceparent", &incoming),
                ("tracestate", "congo=t61rcWkgMzE"),
            ],
            0.0,
        );
        let out = value(&map, "traceparent");
        assert!(out.starts_with(&format!("00-{TRACE}-")), "{out}");
        assert!(out.ends_with("-01"), "sampled stays: {out}");
        assert_ne!(&out[36..52], SPAN, "a new span id");
        assert_eq!(&out[36..52], hex(&span.span_id));
        assert_eq!(span.parent_span_id.map(|p| hex(&p)).as_deref(), Some(SPAN));
        assert_eq!(value(&map, "tracestate"), "congo=t61rcWkgMzE", "kept as is");

        let (map, span) = hop(&[("traceparent", &format!("00-{TRACE}-{SPAN}-00"))], 100.0);
        assert!(
            value(&map, "traceparent").ends_with("-00"),
            "not sampled stays"
        );
        assert!(!span.sampled, "the rate only applies to new traces");
    }

    #[test]
    fn invalid_traceparents_are_treated_as_absent() {
        for bad in [
            format!("ff-{TRACE}-{SPAN}-01"),
            format!("00-{}-{SPAN}-01", "0".repeat(32)),
            format!("00-{TRACE}-{}-01", "0".repeat(16)),
            format!("00-{}-{SPAN}-01", TRACE.to_uppercase()),
            format!("00-{TRACE}-{SPAN}-1"),
            format!("00-{TRACE}-{SPAN}-01-extra"),
            format!("00-{}-{SPAN}-01", &TRACE[1..]),
            format!("00_{TRACE}_{SPAN}_01"),
            "garbage".to_string(),
        ] {
            assert_eq!(extract(&headers(&[("traceparent", &bad)])), None, "{bad}");
            let (map, span) = hop(&[("traceparent", &bad), ("tracestate", "a=b")], 100.0);
            assert!(span.parent_span_id.is_none(), "a new trace for {bad}");
            assert_ne!(span.trace_id_hex(), TRACE);
            assert!(map.get("tracestate").is_none(), "its vendor state goes too");
        }
        // A later version may add fields.
        let future = format!("01-{TRACE}-{SPAN}-01-what-comes-next");
        assert!(extract(&headers(&[("traceparent", &future)])).is_some());
    }

    #[test]
    fn without_context_a_new_trace_is_sampled_at_the_rate() {
        let (map, span) = hop(&[], 100.0);
        let out = value(&map, "traceparent");
        assert_eq!(out.len(), 55);
        assert!(out.ends_with("-01"));
        assert_eq!(span.parent_span_id, None);
        assert!(!hop(&[], 0.0).1.sampled);
        let sampled = (0..10_000).filter(|_| hop(&[], 10.0).1.sampled).count();
        assert!((700..1300).contains(&sampled), "{sampled} of 10000 at 10%");
    }

    #[test]
    fn b3_single_is_read_and_written_back_as_b3() {
        let (map, span) = hop(&[("b3", &format!("{TRACE}-{SPAN}-1"))], 0.0);
        let out = value(&map, "b3");
        assert!(out.starts_with(&format!("{TRACE}-")), "{out}");
        assert!(
            out.ends_with(&format!("-1-{SPAN}")),
            "parent is the caller's span: {out}"
        );
        assert!(map.get("traceparent").is_none());
        assert!(span.sampled);

        // 64-bit trace ids stay 64-bit; debug stays debug.
        let (map, _) = hop(&[("b3", &format!("{}-{SPAN}-d", &TRACE[16..]))], 0.0);
        assert!(value(&map, "b3").starts_with(&format!("{}-", &TRACE[16..])));
        assert!(value(&map, "b3").contains("-d-"));
        // Not sampled.
        let (_, span) = hop(&[("b3", &format!("{TRACE}-{SPAN}-0"))], 100.0);
        assert!(!span.sampled);
        // Malformed: a new W3C trace (the bad header passes through).
        let (map, span) = hop(&[("b3", "nonsense-x")], 100.0);
        assert!(span.parent_span_id.is_none() && map.get("traceparent").is_some());
    }

    #[test]
    fn b3_multi_is_read_and_written_back_as_b3_multi() {
        let (map, span) = hop(
            &[
                ("x-b3-traceid", TRACE),
                ("x-b3-spanid", SPAN),
                ("x-b3-sampled", "1"),
            ],
            0.0,
        );
        assert_eq!(value(&map, "x-b3-traceid"), TRACE);
        assert_eq!(value(&map, "x-b3-parentspanid"), SPAN);
        assert_eq!(value(&map, "x-b3-spanid"), hex(&span.span_id));
        assert_eq!(value(&map, "x-b3-sampled"), "1");
        let (map, span) = hop(
            &[
                ("x-b3-traceid", TRACE),
                ("x-b3-spanid", SPAN),
                ("x-b3-flags", "1"),
            ],
            0.0,
        );
        assert!(span.sampled);
        assert_eq!(value(&map, "x-b3-flags"), "1");
    }

    #[test]
    fn w3c_wins_over_b3_when_both_are_valid() {
        let (map, span) = hop(
            &[
                ("traceparent", &format!("00-{TRACE}-{SPAN}-01")),
                ("b3", &format!("{}-{SPAN}-1", "a".repeat(32))),
            ],
            0.0,
        );
        assert_eq!(span.format, Format::W3c);
        assert_eq!(span.trace_id_hex(), TRACE);
        assert!(value(&map, "traceparent").starts_with(&format!("00-{TRACE}-")));
    }
}
