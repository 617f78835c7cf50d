//! Validation of identifiers and numbers taken from command arguments.
//!
//! Ids end up inside key names, so they must not carry the characters that shape a key
//! (`{`/`}` would change the cluster hash tag) and are bounded in length.

use super::error::{MarketError, MarketResult};

pub const MAX_REGION_LEN: usize = 64;
pub const MAX_ID_LEN: usize = 128;
/// One year: a booking longer than that is certainly a unit mistake.
pub const MAX_BOOKING_SECONDS: i64 = 366 * 24 * 3600;

/// Renders client input for an error message: printable ASCII as is, anything else as `\xHH`,
/// cut to `max` input bytes. Error replies must be plain ASCII: Redis and client libraries
/// treat them as text, and a stray byte would break a client's parser.
pub fn shown(text: &[u8], max: usize) -> String {
    let mut out = String::new();
    for &b in text.iter().take(max) {
        if (0x20..0x7f).contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    if text.len() > max {
        out.push_str("...");
    }
    out
}

fn id_byte_allowed(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':' | b'/' | b'@' | b'+' | b'=')
}

fn checked_name(what: &str, text: &[u8], max_len: usize) -> MarketResult<String> {
    if text.is_empty() {
        return Err(MarketError::syntax(format!("{what} must not be empty")));
    }
    if text.len() > max_len {
        return Err(MarketError::syntax(format!(
            "{what} is longer than {max_len} bytes"
        )));
    }
    if !text.iter().copied().all(id_byte_allowed) {
        return Err(MarketError::syntax(format!(
            "{what} '{}' may only contain letters, digits and _ - . : / @ + =",
            shown(text, 64)
        )));
    }
    // Only ASCII passed the filter above, so this cannot fail.
    Ok(String::from_utf8_lossy(text).into_owned())
}

/// A region name: it becomes the `{region}` hash tag, so `:` is not allowed either.
pub fn region(text: &[u8]) -> MarketResult<String> {
    let name = checked_name("region", text, MAX_REGION_LEN)?;
    if name.contains(':') {
        return Err(MarketError::syntax("region must not contain ':'"));
    }
    Ok(name)
}

/// A GPU, booking, user, provider or GPU type id.
pub fn id(what: &str, text: &[u8]) -> MarketResult<String> {
    checked_name(what, text, MAX_ID_LEN)
}

/// A whole number within `min..=max`.
pub fn integer(what: &str, text: &[u8], min: i64, max: i64) -> MarketResult<i64> {
    let value = std::str::from_utf8(text)
        .ok()
        .filter(|s| !s.starts_with('+'))
        .and_then(|s| s.parse::<i64>().ok())
        .ok_or_else(|| {
            MarketError::syntax(format!(
                "{what} must be an integer, got '{}'",
                shown(text, 64)
            ))
        })?;
    if value < min || value > max {
        return Err(MarketError::syntax(format!(
            "{what} must be between {min} and {max}"
        )));
    }
    Ok(value)
}

/// A finite, non-negative decimal (performance score) no larger than `max`.
pub fn non_negative_number(what: &str, text: &[u8], max: f64) -> MarketResult<f64> {
    let value = std::str::from_utf8(text)
        .ok()
        .filter(|s| s.bytes().all(|b| b.is_ascii_digit() || b == b'.'))
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|v| v.is_finite())
        .ok_or_else(|| {
            MarketError::syntax(format!(
                "{what} must be a non-negative decimal, got '{}'",
                shown(text, 64)
            ))
        })?;
    if value > max {
        return Err(MarketError::syntax(format!("{what} must be at most {max}")));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_accept_the_documented_alphabet() {
        assert_eq!(id("gpu id", b"gpu-01.a:b/c@d").unwrap(), "gpu-01.a:b/c@d");
        assert_eq!(region(b"us-east_1").unwrap(), "us-east_1");
    }

    #[test]
    fn ids_reject_empty_oversize_and_key_shaping_bytes() {
        assert!(id("gpu id", b"").is_err());
        assert!(id("gpu id", &[b'a'; MAX_ID_LEN + 1]).is_err());
        assert!(id("gpu id", &[b'a'; MAX_ID_LEN]).is_ok());
        for bad in [
            &b"a{b"[..],
            b"a}b",
            b"a b",
            b"a\nb",
            b"a\0b",
            "é".as_bytes(),
            b"*",
        ] {
            assert!(id("gpu id", bad).is_err(), "{bad:?}");
        }
        assert!(region(b"eu:west").is_err());
        assert!(region(&[b'r'; MAX_REGION_LEN + 1]).is_err());
    }

    #[test]
    fn shown_input_is_plain_ascii() {
        assert_eq!(shown(b"ok-1", 64), "ok-1");
        assert_eq!(
            shown(b"a\r\n\0\xff\xc3\xa9", 64),
            "a\\x0d\\x0a\\x00\\xff\\xc3\\xa9"
        );
        assert_eq!(shown(&[b'x'; 100], 4), "xxxx...");
        assert!(shown(&(0..=255).collect::<Vec<u8>>(), 256).is_ascii());
    }

    #[test]
    fn integers_are_range_checked() {
        assert_eq!(integer("n", b"42", 1, 100).unwrap(), 42);
        for bad in [
            &b"0"[..],
            b"101",
            b"-5",
            b"4.5",
            b"",
            b"+3",
            b"1e3",
            b"99999999999999999999",
        ] {
            assert!(integer("n", bad, 1, 100).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn scores_are_finite_and_non_negative() {
        assert_eq!(non_negative_number("score", b"12.5", 1e6).unwrap(), 12.5);
        for bad in [&b"-1"[..], b"nan", b"inf", b"1e400", b"", b"2000000"] {
            assert!(non_negative_number("score", bad, 1e6).is_err(), "{bad:?}");
        }
    }
}
