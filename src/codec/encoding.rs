//! Binary payloads written as text: hex and base64, as gateways relay BLE values and as a user
//! pastes a payload into `iomt-edge decode`. Both decode into a caller's buffer, so the BLE hot
//! path never allocates, and refuse input that would not fit.

use base64::Engine as _;

use super::{DecodeError, Reason};

/// Hex as gateways write it: optional `0x`, either case, bytes optionally separated by `:`,
/// `-` or whitespace. Hand-written for the separators, which the `hex` crate does not take.
pub fn hex_to_bytes<'b>(text: &[u8], buf: &'b mut [u8]) -> Result<&'b [u8], DecodeError> {
    let bad = |what: String| DecodeError::new(Reason::Syntax, format!("hex payload: {what}"));
    let text = text.trim_ascii();
    let text = text
        .strip_prefix(b"0x")
        .or_else(|| text.strip_prefix(b"0X"))
        .unwrap_or(text);
    let mut n = 0;
    let mut high: Option<u8> = None;
    for &c in text {
        let digit = match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            b'A'..=b'F' => c - b'A' + 10,
            b':' | b'-' if high.is_none() => continue,
            c if c.is_ascii_whitespace() && high.is_none() => continue,
            _ => return Err(bad("not a hex digit".into())),
        };
        match high.take() {
            None => high = Some(digit),
            Some(h) => {
                let len = buf.len();
                *buf.get_mut(n)
                    .ok_or_else(|| bad(format!("longer than {len} bytes")))? = (h << 4) | digit;
                n += 1;
            }
        }
    }
    if high.is_some() {
        return Err(bad("an odd number of hex digits".into()));
    }
    Ok(&buf[..n])
}

/// Standard-alphabet base64, padded or not (gateways differ on padding); line breaks and
/// spaces, as in a pasted or wrapped payload, are skipped.
pub fn base64_to_bytes<'b>(text: &[u8], buf: &'b mut [u8]) -> Result<&'b [u8], DecodeError> {
    use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
    use std::borrow::Cow;
    const ENGINE: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    let text = text.trim_ascii();
    let text: Cow<[u8]> = if text.iter().any(u8::is_ascii_whitespace) {
        Cow::Owned(
            text.iter()
                .copied()
                .filter(|c| !c.is_ascii_whitespace())
                .collect(),
        )
    } else {
        Cow::Borrowed(text)
    };
    match ENGINE.decode_slice(&*text, buf) {
        Ok(n) => Ok(&buf[..n]),
        Err(base64::DecodeSliceError::OutputSliceTooSmall) => Err(DecodeError::new(
            Reason::Syntax,
            format!("base64 payload: longer than {} bytes", buf.len()),
        )),
        Err(base64::DecodeSliceError::DecodeError(_)) => Err(DecodeError::new(
            Reason::Syntax,
            "base64 payload: not valid base64",
        )),
    }
}

/// [`hex_to_bytes`] or [`base64_to_bytes`].
pub type TextDecoder = for<'b> fn(&[u8], &'b mut [u8]) -> Result<&'b [u8], DecodeError>;

/// Decodes hex or base64 text of any length into a new vector.
pub fn text_to_vec(text: &[u8], decode: TextDecoder) -> Result<Vec<u8>, DecodeError> {
    // Hex holds at most one byte per two characters, base64 three per four.
    let mut buf = vec![0u8; text.len()];
    let n = decode(text, &mut buf)?.len();
    buf.truncate(n);
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_and_base64_as_gateways_write_them() {
        let want = [0x1e, 0x55, 0x32, 0x00, 0x21, 0x00];
        for h in [
            "1e5532002100",
            "0x1E5532002100",
            "1e:55:32:00:21:00",
            " 1e 55 32-00 21 00\n",
        ] {
            assert_eq!(
                text_to_vec(h.as_bytes(), hex_to_bytes).unwrap(),
                want,
                "{h}"
            );
        }
        for b in ["HlUyACEA", "HlUy\nACEA\n"] {
            assert_eq!(
                text_to_vec(b.as_bytes(), base64_to_bytes).unwrap(),
                want,
                "{b}"
            );
        }
        assert_eq!(text_to_vec(b"AA", base64_to_bytes).unwrap(), [0]);
        let long: Vec<u8> = (0..=255).collect();
        use base64::engine::general_purpose::STANDARD;
        let b64 = STANDARD.encode(&long);
        assert_eq!(text_to_vec(b64.as_bytes(), base64_to_bytes).unwrap(), long);
        assert_eq!(text_to_vec(b"AA==", base64_to_bytes).unwrap(), [0]);
        for bad in ["1e5", "1g", "1:e"] {
            let e = text_to_vec(bad.as_bytes(), hex_to_bytes).unwrap_err();
            assert_eq!(e.reason, Reason::Syntax, "{bad}");
        }
        assert!(text_to_vec(b"***", base64_to_bytes).is_err());
        let mut small = [0u8; 2];
        assert!(hex_to_bytes(b"010203", &mut small).is_err());
        assert!(base64_to_bytes(b"AQID", &mut small).is_err());
    }
}
