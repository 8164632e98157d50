//! Python-compatible JSON: what `json.dumps(value, ensure_ascii=False,
//! separators=(",", ":"))` writes, byte for byte, so itsdangerous payloads sign the
//! same bytes as the Python side.

use serde_json::Value;

/// `json.dumps(value, ensure_ascii=False, separators=(",", ":"))`.
pub(super) fn py_json(value: &Value, out: &mut String) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(true) => out.push_str("true"),
        Value::Bool(false) => out.push_str("false"),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                out.push_str(&i.to_string());
            } else if let Some(u) = n.as_u64() {
                out.push_str(&u.to_string());
            } else if let Some(f) = n.as_f64() {
                py_float_repr(f, out);
            } else {
                out.push_str(&n.to_string());
            }
        }
        Value::String(s) => py_json_str(s, out),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                py_json(item, out);
            }
            out.push(']');
        }
        Value::Object(map) => {
            out.push('{');
            for (i, (key, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                py_json_str(key, out);
                out.push(':');
                py_json(item, out);
            }
            out.push('}');
        }
    }
}

/// Python's string escaping with `ensure_ascii=False`: `"` `\` and C0 controls only
/// (`\b \f \n \r \t` by name, the rest as lowercase `\u00XX`); DEL, U+2028 and `/` stay.
pub(super) fn py_json_str(s: &str, out: &mut String) {
    out.push('"');
    let mut start = 0;
    for (i, b) in s.bytes().enumerate() {
        let escape = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0x08 => "\\b",
            0x0c => "\\f",
            0x00..=0x1f => "",
            _ => continue,
        };
        out.push_str(&s[start..i]);
        if escape.is_empty() {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            out.push_str("\\u00");
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xf)]));
        } else {
            out.push_str(escape);
        }
        start = i + 1;
    }
    out.push_str(&s[start..]);
    out.push('"');
}

/// Python's `repr(float)`: the shortest round-tripping digits, in positional notation
/// when the decimal exponent is in -4..16, otherwise as `d.ddde+XX`.
fn py_float_repr(f: f64, out: &mut String) {
    if !f.is_finite() {
        // Python writes these (invalid JSON); a serde_json Value never holds them.
        out.push_str(if f.is_nan() {
            "NaN"
        } else if f > 0.0 {
            "Infinity"
        } else {
            "-Infinity"
        });
        return;
    }
    // Rust's `{:e}` is also the shortest round-tripping form: "-1.2345e-7".
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((sci.as_str(), "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (negative, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => (true, m),
        None => (false, mantissa),
    };
    let digits: String = mantissa.chars().filter(|&c| c != '.').collect();
    let ndigits = i32::try_from(digits.len()).unwrap_or(i32::MAX);
    // Position of the decimal point relative to the digits, as in Python's dtoa.
    let decpt = exp + 1;
    if negative {
        out.push('-');
    }
    if decpt <= -4 || decpt > 16 {
        out.push_str(&digits[..1]);
        if digits.len() > 1 {
            out.push('.');
            out.push_str(&digits[1..]);
        }
        let e = decpt - 1;
        out.push('e');
        out.push(if e < 0 { '-' } else { '+' });
        out.push_str(&format!("{:02}", e.unsigned_abs()));
    } else if decpt <= 0 {
        out.push_str("0.");
        out.extend(std::iter::repeat_n('0', decpt.unsigned_abs() as usize));
        out.push_str(&digits);
    } else if decpt >= ndigits {
        out.push_str(&digits);
        out.extend(std::iter::repeat_n('0', (decpt - ndigits) as usize));
        out.push_str(".0");
    } else {
        let (int, frac) = digits.split_at(decpt as usize);
        out.push_str(int);
        out.push('.');
        out.push_str(frac);
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_string_escapes_match_json_dumps() {
        let mut out = String::new();
        py_json_str(
            "a\"b\\c\n\r\t\u{8}\u{c}\u{0}\u{1f}\u{7f}\u{2028}/é用😀",
            &mut out,
        );
        assert_eq!(
            out,
            "\"a\\\"b\\\\c\\n\\r\\t\\b\\f\\u0000\\u001f\u{7f}\u{2028}/é用😀\""
        );
    }

    #[test]
    fn python_float_repr_matches_cpython() {
        // Expected strings from CPython 3.11's repr().
        let cases: &[(f64, &str)] = &[
            (0.0, "0.0"),
            (-0.0, "-0.0"),
            (1.0, "1.0"),
            (2.5, "2.5"),
            (0.1, "0.1"),
            (1e16, "1e+16"),
            (1e15, "1000000000000000.0"),
            (123456789012345680.0, "1.2345678901234568e+17"),
            (1e-5, "1e-05"),
            (0.0001, "0.0001"),
            (1.5e-7, "1.5e-07"),
            (1e300, "1e+300"),
            (-1.25e-300, "-1.25e-300"),
            (5e-324, "5e-324"),
            (f64::MAX, "1.7976931348623157e+308"),
            (123.456, "123.456"),
            (0.000123, "0.000123"),
        ];
        for &(f, expected) in cases {
            let mut out = String::new();
            py_float_repr(f, &mut out);
            assert_eq!(out, expected, "repr({f:?})");
        }
    }

    #[test]
    fn python_json_writes_compact_values() {
        let value = serde_json::json!({"a": [1, -2, 2.5, null, true, false], "b": {"c": "x"}, "d": u64::MAX});
        let mut out = String::new();
        py_json(&value, &mut out);
        assert_eq!(
            out,
            r#"{"a":[1,-2,2.5,null,true,false],"b":{"c":"x"},"d":18446744073709551615}"#
        );
    }
}
