//! `adapter_config.json` and `head_config.json`: reading and validating the adapter config, and
//! writing both files byte for byte as the library's `json.dump` does.

use std::path::Path;

use serde_json::Value;

use super::{LIBRARY_VERSION, MAX_CONFIG_BYTES};
use crate::config::{validate_adapter_name, AdapterConfig, HeadConfig, HeadConfigFile, ModelType};
use crate::error::{Error, Result};

/// What `adapter_config.json` says about the adapter.
#[derive(Clone, Debug)]
pub struct AdapterConfigFile {
    pub name: String,
    pub config: AdapterConfig,
    pub hidden_size: Option<usize>,
    /// The base model's `name_or_path` when it was saved ("" when unknown).
    pub model_name: String,
    /// The base model's `model_type` (`bert`, `roberta`, `xlm-roberta`), when the file names one.
    /// The library loads an adapter into any model whatever it says, and so do we.
    pub model_type: Option<ModelType>,
}

/// Read and validate `adapter_config.json`.
pub fn read_adapter_config(path: &Path) -> Result<AdapterConfigFile> {
    parse_adapter_config(&crate::io::read_capped(path, MAX_CONFIG_BYTES, "a config file")?, path)
}

/// Parse the bytes of an `adapter_config.json`; `path` names it in errors.
pub fn parse_adapter_config(bytes: &[u8], path: &Path) -> Result<AdapterConfigFile> {
    if bytes.is_empty() {
        return Err(Error::malformed(path, "empty file (expected the adapter's JSON config)"));
    }
    let text = std::str::from_utf8(bytes)
        .map_err(|e| Error::malformed(path, format!("not UTF-8 (invalid byte at offset {})", e.valid_up_to())))?;
    let json: Value = serde_json::from_str(text).map_err(|e| Error::malformed(path, format!("not valid JSON: {e}")))?;
    let Value::Object(top) = json else {
        return Err(Error::malformed(path, "expected a JSON object"));
    };
    let name = match top.get("name") {
        Some(Value::String(n)) => n.clone(),
        Some(other) => return Err(Error::config(path, "name", format!("expected a string, got {other}"))),
        None => return Err(Error::config(path, "name", "missing (the adapter's name is read from it)")),
    };
    validate_adapter_name(&name).map_err(|e| Error::config(path, "name", e.to_string()))?;
    let model_type = match top.get("model_type") {
        None | Some(Value::Null) => None,
        Some(Value::String(t)) => Some(
            ModelType::parse(t).ok_or_else(|| Error::config(path, "model_type", format!("`{t}` is not supported (only bert, roberta and xlm-roberta)")))?,
        ),
        Some(other) => return Err(Error::config(path, "model_type", format!("expected a string, got {other}"))),
    };
    let hidden_size = match top.get("hidden_size") {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_u64().and_then(|h| usize::try_from(h).ok()) {
            Some(h) if h > 0 => Some(h),
            _ => return Err(Error::config(path, "hidden_size", format!("expected a positive integer, got {v}"))),
        },
    };
    let model_name = match top.get("model_name") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => return Err(Error::config(path, "model_name", format!("expected a string, got {other}"))),
    };
    let mut config = top.get("config").cloned().ok_or_else(|| Error::config(path, "config", "missing"))?;
    if !top.contains_key("version") {
        // Written by the older adapter-transformers: activation names were renamed since.
        if let Some(Value::String(act)) = config.get_mut("non_linearity") {
            match act.as_str() {
                "gelu" => *act = "gelu_new".into(),
                "gelu_orig" => *act = "gelu".into(),
                _ => {}
            }
        }
    }
    let config = AdapterConfig::from_json(&config, path)?;
    Ok(AdapterConfigFile { name, config, hidden_size, model_name, model_type })
}

/// `adapter_config.json` as the library writes it for adapter `name` on the bare model of
/// `model_type` (`BertModel`, `RobertaModel`, `XLMRobertaModel`).
pub fn adapter_config_json(name: &str, config: &AdapterConfig, hidden_size: usize, model_name: &str, model_type: ModelType) -> String {
    let v = serde_json::json!({
        "config": config.to_json(),
        "hidden_size": hidden_size,
        "model_class": model_type.model_class(),
        "model_name": model_name,
        "model_type": model_type.as_str(),
        "name": name,
        "version": LIBRARY_VERSION,
    });
    to_python_json(&v)
}

/// `head_config.json` as the library writes it for classification head `name` (of `config`, on
/// hidden size `hidden_size`) of the flexible-heads model of `model_type` (`BertAdapterModel`,
/// `RobertaAdapterModel`, `XLMRobertaAdapterModel`).
pub fn head_config_json(name: &str, config: &HeadConfig, hidden_size: usize, model_name: &str, model_type: ModelType) -> Result<String> {
    let file = HeadConfigFile {
        config: config.clone(),
        hidden_size,
        model_class: model_type.adapter_model_class().into(),
        model_name: model_name.into(),
        model_type: model_type.as_str().into(),
        name: name.into(),
        version: LIBRARY_VERSION.into(),
    };
    let v = serde_json::to_value(&file).map_err(|e| Error::internal(format!("head `{name}`: {e}")))?;
    Ok(to_python_json(&v))
}

/// JSON exactly as Python's `json.dump(v, indent=2, sort_keys=True)` writes it: two-space
/// indents, `": "` and `","` separators, keys sorted by code point, non-ASCII escaped as
/// `\uXXXX`, floats in `repr` form (`1.0`, `0.0001`, `1e-05`), no trailing newline.
pub fn to_python_json(v: &Value) -> String {
    let mut out = String::new();
    write_python_json(v, 0, &mut out);
    out
}

fn write_python_json(v: &Value, depth: usize, out: &mut String) {
    let indent = |out: &mut String, d: usize| {
        out.push('\n');
        out.extend(std::iter::repeat_n(' ', 2 * d));
    };
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) if !n.is_f64() => out.push_str(&i.to_string()),
            (_, Some(u), _) if !n.is_f64() => out.push_str(&u.to_string()),
            (_, _, Some(f)) => out.push_str(&python_float_repr(f)),
            _ => out.push_str(&n.to_string()),
        },
        Value::String(s) => python_string(s, out),
        Value::Array(a) if a.is_empty() => out.push_str("[]"),
        Value::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                indent(out, depth + 1);
                write_python_json(x, depth + 1, out);
            }
            indent(out, depth);
            out.push(']');
        }
        Value::Object(m) if m.is_empty() => out.push_str("{}"),
        Value::Object(m) => {
            // Sorted here whatever order the map keeps (serde_json may preserve insertion order).
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                indent(out, depth + 1);
                python_string(k, out);
                out.push_str(": ");
                write_python_json(&m[k], depth + 1, out);
            }
            indent(out, depth);
            out.push('}');
        }
    }
}

/// `json.dumps` string escaping with `ensure_ascii=True`.
fn python_string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            ' '..='~' => out.push(c),
            _ => {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{u:04x}"));
                }
            }
        }
    }
    out.push('"');
}

/// Python's `repr(float)`: the shortest round-tripping digits, positional for exponents in
/// [-4, 16), scientific (`1e-05`, `1.5e+16`) otherwise.
pub fn python_float_repr(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity".into() } else { "-Infinity".into() };
    }
    if x == 0.0 {
        return if x.is_sign_negative() { "-0.0".into() } else { "0.0".into() };
    }
    // Rust's `{:e}` prints the shortest round-tripping digits, e.g. "-1.2345e-7".
    let s = format!("{x:e}");
    let (mantissa, exp) = s.split_once('e').unwrap_or((&s, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    if (-4..16).contains(&exp) {
        if exp >= 0 {
            let int_len = exp as usize + 1;
            let (int, frac) = if digits.len() > int_len {
                (digits[..int_len].to_string(), digits[int_len..].to_string())
            } else {
                (format!("{digits:0<int_len$}"), "0".to_string())
            };
            format!("{sign}{int}.{frac}")
        } else {
            format!("{sign}0.{}{digits}", "0".repeat((-exp - 1) as usize))
        }
    } else {
        let m = if digits.len() > 1 { format!("{}.{}", &digits[..1], &digits[1..]) } else { digits };
        format!("{sign}{m}e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_float_repr_matches_cpython() {
        let cases = [
            (1.0, "1.0"),
            (0.0, "0.0"),
            (0.0001, "0.0001"),
            (1e-5, "1e-05"),
            (2.5, "2.5"),
            (16.0, "16.0"),
            (1e15, "1000000000000000.0"),
            (1e16, "1e+16"),
            (1.5e16, "1.5e+16"),
            (123456.789, "123456.789"),
            (-0.5, "-0.5"),
            (0.1, "0.1"),
            (1.0 / 3.0, "0.3333333333333333"),
            (1e-300, "1e-300"),
            (6.02e23, "6.02e+23"),
            (0.00012345, "0.00012345"),
        ];
        for (x, want) in cases {
            assert_eq!(python_float_repr(x), want, "{x}");
        }
    }

    #[test]
    fn config_floats_survive_a_write_and_read_bit_for_bit() {
        // Found by the adapter_config fuzz target: without correctly rounded float parsing the
        // value read back was one ulp off the value written.
        let path = Path::new("adapter_config.json");
        let text = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/adapters/pfeiffer/adapter_config.json")).unwrap();
        let text = String::from_utf8(text).unwrap().replace("\"scaling\": 1.0", "\"scaling\": 1.077777777777777777");
        let cfg = parse_adapter_config(text.as_bytes(), path).unwrap();
        let written = adapter_config_json(&cfg.name, &cfg.config, 48, &cfg.model_name, ModelType::Bert);
        assert!(written.contains("\"scaling\": 1.0777777777777777,"), "{written}");
        assert_eq!(parse_adapter_config(written.as_bytes(), path).unwrap().config, cfg.config);
    }

    #[test]
    fn python_json_escapes_like_ensure_ascii() {
        let v = serde_json::json!({"b": [], "a": {"é": "tab\there \u{7f} 😀 \"q\""}, "c": [1, 2.0, null, true]});
        assert_eq!(
            to_python_json(&v),
            "{\n  \"a\": {\n    \"\\u00e9\": \"tab\\there \\u007f \\ud83d\\ude00 \\\"q\\\"\"\n  },\n  \"b\": [],\n  \"c\": [\n    1,\n    2.0,\n    null,\n    true\n  ]\n}"
        );
    }
}
