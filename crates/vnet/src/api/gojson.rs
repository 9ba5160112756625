//! Go's `encoding/json` as gvproxy's handlers use it, for byte-identical
//! answers: `json.NewDecoder(body).Decode(&req)` into a struct of string
//! fields (its error texts, its case-insensitive field names, its habit of
//! reading only the first value) and `json.NewEncoder(w).Encode(v)` (HTML
//! characters escaped, a final newline).
//!
//! How this works: [`first_value`] runs Go's scanner state machine over the
//! body until the first JSON value is complete, so every syntax error has
//! Go's wording ("invalid character 'x' looking for beginning of value",
//! "unexpected EOF", "EOF"), and builds a small tree with object members in
//! document order. [`decode_strings`] then assigns members to string fields
//! as Go's decoder does: exact name first, then a case-insensitive match,
//! later duplicates win, `null` leaves a field alone, and the first value of
//! the wrong type is reported as an `UnmarshalTypeError`.

use serde::Serialize;

/// A decoded JSON value; numbers keep their text.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Number(String),
    String(String),
    Array(Vec<Value>),
    Object(Vec<(String, Value)>),
}

impl Value {
    /// The word Go's `UnmarshalTypeError` uses for this kind of value.
    fn kind(&self) -> &'static str {
        match self {
            Value::Null => "null",
            Value::Bool(_) => "bool",
            Value::Number(_) => "number",
            Value::String(_) => "string",
            Value::Array(_) => "array",
            Value::Object(_) => "object",
        }
    }
}

/// Nesting deeper than this is refused (Go allows 10000; a request needs 3,
/// and the parser recurses, so stay well inside the thread's stack).
const MAX_DEPTH: usize = 1000;

/// Reads the first JSON value of `input` as Go's `json.Decoder` does.
/// Returns the value and the byte range it occupied.
pub fn first_value(input: &[u8]) -> Result<(Value, std::ops::Range<usize>), String> {
    let mut p = Parser { s: input, i: 0, depth: 0 };
    p.skip_space();
    if p.i >= input.len() {
        return Err("EOF".to_string());
    }
    let start = p.i;
    let v = p.value()?;
    Ok((v, start..p.i))
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
    depth: usize,
}

fn is_space(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\r' | b'\n')
}

/// Go's `quoteChar`: how the scanner names an offending byte.
fn quote_char(c: u8) -> String {
    match c {
        b'\'' => "'\\''".to_string(),
        b'"' => "'\"'".to_string(),
        _ => format!("'{}'", go_quote_rune(char::from(c))),
    }
}

/// The inside of Go's `strconv.Quote` for one rune.
fn go_quote_rune(c: char) -> String {
    match c {
        '\u{7}' => "\\a".into(),
        '\u{8}' => "\\b".into(),
        '\u{c}' => "\\f".into(),
        '\n' => "\\n".into(),
        '\r' => "\\r".into(),
        '\t' => "\\t".into(),
        '\u{b}' => "\\v".into(),
        '\\' => "\\\\".into(),
        c if (c as u32) < 0x20 || c as u32 == 0x7f => format!("\\x{:02x}", c as u32),
        // C1 controls, NBSP and the soft hyphen are not "printable" to Go.
        c if (0x80..0xa1).contains(&(c as u32)) || c as u32 == 0xad => format!("\\u{:04x}", c as u32),
        c => c.to_string(),
    }
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn skip_space(&mut self) {
        while self.peek().is_some_and(is_space) {
            self.i += 1;
        }
    }

    /// The error for byte `c` in `context`, or "unexpected EOF" at the end.
    fn err_at(&self, context: &str) -> String {
        match self.peek() {
            Some(c) => format!("invalid character {} {context}", quote_char(c)),
            None => "unexpected EOF".to_string(),
        }
    }

    fn value(&mut self) -> Result<Value, String> {
        self.skip_space();
        match self.peek() {
            Some(b'{') => self.object(),
            Some(b'[') => self.array(),
            Some(b'"') => self.string().map(Value::String),
            Some(b'-' | b'0'..=b'9') => self.number(),
            Some(b't') => self.literal("true", Value::Bool(true)),
            Some(b'f') => self.literal("false", Value::Bool(false)),
            Some(b'n') => self.literal("null", Value::Null),
            _ => Err(self.err_at("looking for beginning of value")),
        }
    }

    fn nest(&mut self) -> Result<(), String> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err("exceeded max depth".to_string());
        }
        Ok(())
    }

    fn object(&mut self) -> Result<Value, String> {
        self.nest()?;
        self.i += 1;
        let mut members = Vec::new();
        self.skip_space();
        if self.peek() == Some(b'}') {
            self.i += 1;
            self.depth -= 1;
            return Ok(Value::Object(members));
        }
        loop {
            self.skip_space();
            if self.peek() != Some(b'"') {
                return Err(self.err_at("looking for beginning of object key string"));
            }
            let key = self.string()?;
            self.skip_space();
            if self.peek() != Some(b':') {
                return Err(self.err_at("after object key"));
            }
            self.i += 1;
            let v = self.value()?;
            members.push((key, v));
            self.skip_space();
            match self.peek() {
                Some(b',') => self.i += 1,
                Some(b'}') => {
                    self.i += 1;
                    self.depth -= 1;
                    return Ok(Value::Object(members));
                }
                _ => return Err(self.err_at("after object key:value pair")),
            }
        }
    }

    fn array(&mut self) -> Result<Value, String> {
        self.nest()?;
        self.i += 1;
        let mut items = Vec::new();
        self.skip_space();
        if self.peek() == Some(b']') {
            self.i += 1;
            self.depth -= 1;
            return Ok(Value::Array(items));
        }
        loop {
            items.push(self.value()?);
            self.skip_space();
            match self.peek() {
                Some(b',') => self.i += 1,
                Some(b']') => {
                    self.i += 1;
                    self.depth -= 1;
                    return Ok(Value::Array(items));
                }
                _ => return Err(self.err_at("after array element")),
            }
        }
    }

    fn literal(&mut self, word: &str, v: Value) -> Result<Value, String> {
        self.i += 1;
        for expected in word.bytes().skip(1) {
            if self.peek() != Some(expected) {
                return Err(self.err_at(&format!("in literal {word} (expecting '{}')", char::from(expected))));
            }
            self.i += 1;
        }
        Ok(v)
    }

    fn digits(&mut self) -> usize {
        let start = self.i;
        while self.peek().is_some_and(|c| c.is_ascii_digit()) {
            self.i += 1;
        }
        self.i - start
    }

    fn number(&mut self) -> Result<Value, String> {
        let start = self.i;
        if self.peek() == Some(b'-') {
            self.i += 1;
            if !self.peek().is_some_and(|c| c.is_ascii_digit()) {
                return Err(self.err_at("in numeric literal"));
            }
        }
        if self.peek() == Some(b'0') {
            self.i += 1;
        } else {
            self.digits();
        }
        if self.peek() == Some(b'.') {
            self.i += 1;
            if self.digits() == 0 {
                return Err(self.err_at("after decimal point in numeric literal"));
            }
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.i += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.i += 1;
            }
            if self.digits() == 0 {
                return Err(self.err_at("in exponent of numeric literal"));
            }
        }
        Ok(Value::Number(String::from_utf8_lossy(&self.s[start..self.i]).into_owned()))
    }

    /// A string literal, unescaped as Go does (bad UTF-8 and lone
    /// surrogates become U+FFFD).
    fn string(&mut self) -> Result<String, String> {
        self.i += 1;
        let mut raw: Vec<u8> = Vec::new();
        let mut out = String::new();
        let flush = |raw: &mut Vec<u8>, out: &mut String| {
            out.push_str(&String::from_utf8_lossy(raw));
            raw.clear();
        };
        loop {
            let Some(c) = self.peek() else { return Err("unexpected EOF".to_string()) };
            match c {
                b'"' => {
                    self.i += 1;
                    flush(&mut raw, &mut out);
                    return Ok(out);
                }
                b'\\' => {
                    self.i += 1;
                    let Some(e) = self.peek() else { return Err("unexpected EOF".to_string()) };
                    let simple = match e {
                        b'"' => Some('"'),
                        b'\\' => Some('\\'),
                        b'/' => Some('/'),
                        b'b' => Some('\u{8}'),
                        b'f' => Some('\u{c}'),
                        b'n' => Some('\n'),
                        b'r' => Some('\r'),
                        b't' => Some('\t'),
                        b'u' => None,
                        _ => return Err(self.err_at("in string escape code")),
                    };
                    self.i += 1;
                    flush(&mut raw, &mut out);
                    match simple {
                        Some(ch) => out.push(ch),
                        None => {
                            let hi = self.hex4()?;
                            let ch = if (0xd800..0xdc00).contains(&hi) {
                                // A pair only if a low surrogate escape follows.
                                let save = self.i;
                                let lo = if self.s.get(self.i) == Some(&b'\\') && self.s.get(self.i + 1) == Some(&b'u')
                                {
                                    self.i += 2;
                                    Some(self.hex4()?)
                                } else {
                                    None
                                };
                                match lo {
                                    Some(lo) if (0xdc00..0xe000).contains(&lo) => {
                                        char::from_u32(0x10000 + ((hi - 0xd800) << 10) + (lo - 0xdc00))
                                    }
                                    _ => {
                                        self.i = save;
                                        None
                                    }
                                }
                            } else {
                                char::from_u32(hi)
                            };
                            out.push(ch.unwrap_or('\u{fffd}'));
                        }
                    }
                }
                c if c < 0x20 => return Err(self.err_at("in string literal")),
                c => {
                    raw.push(c);
                    self.i += 1;
                }
            }
        }
    }

    fn hex4(&mut self) -> Result<u32, String> {
        let mut v = 0u32;
        for _ in 0..4 {
            let Some(c) = self.peek() else { return Err("unexpected EOF".to_string()) };
            let d = char::from(c).to_digit(16).ok_or_else(|| self.err_at("in \\u hexadecimal character escape"))?;
            v = v * 16 + d;
            self.i += 1;
        }
        Ok(v)
    }
}

/// One string field of a Go struct: its JSON name and its Go type's name.
pub struct Field {
    pub name: &'static str,
    pub go_type: &'static str,
}

/// Decodes `body` into a Go struct of string fields as
/// `json.NewDecoder(body).Decode(&v)` would. `go_struct` is the struct's
/// name (`ExposeRequest`), `go_type` its qualified type name
/// (`types.ExposeRequest`). Missing and `null` fields are empty.
pub fn decode_strings(body: &[u8], go_struct: &str, go_type: &str, fields: &[Field]) -> Result<Vec<String>, String> {
    let (value, _) = first_value(body)?;
    let mut out = vec![String::new(); fields.len()];
    let members = match value {
        Value::Null => return Ok(out),
        Value::Object(m) => m,
        other => return Err(format!("json: cannot unmarshal {} into Go value of type {go_type}", other.kind())),
    };
    let mut first_error = None;
    for (key, v) in members {
        let idx =
            fields.iter().position(|f| f.name == key).or_else(|| fields.iter().position(|f| fold_eq(f.name, &key)));
        let Some(idx) = idx else { continue };
        match v {
            Value::Null => {}
            Value::String(s) => out[idx] = s,
            other => {
                if first_error.is_none() {
                    first_error = Some(format!(
                        "json: cannot unmarshal {} into Go struct field {go_struct}.{} of type {}",
                        other.kind(),
                        fields[idx].name,
                        fields[idx].go_type
                    ));
                }
            }
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(out),
    }
}

/// Go's case-insensitive field-name match (Unicode simple folding; for the
/// ASCII names used here, ASCII case-insensitivity plus the Kelvin sign and
/// long s, which fold to `k` and `s`).
fn fold_eq(name: &str, key: &str) -> bool {
    let fold = |c: char| match c {
        '\u{212a}' => 'k',
        '\u{17f}' => 's',
        c => c.to_ascii_lowercase(),
    };
    name.chars().map(fold).eq(key.chars().map(fold))
}

/// `json.NewEncoder(w).Encode(v)`: compact JSON with `<`, `>`, `&`,
/// U+2028 and U+2029 escaped, and a final newline.
pub fn encode<T: Serialize + ?Sized>(v: &T) -> Vec<u8> {
    let text = serde_json::to_string(v).unwrap_or_else(|_| "null".to_string());
    let mut out = String::with_capacity(text.len() + 1);
    for c in text.chars() {
        match c {
            '<' => out.push_str("\\u003c"),
            '>' => out.push_str("\\u003e"),
            '&' => out.push_str("\\u0026"),
            '\u{2028}' => out.push_str("\\u2028"),
            '\u{2029}' => out.push_str("\\u2029"),
            c => out.push(c),
        }
    }
    out.push('\n');
    out.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXPOSE: &[Field] = &[
        Field { name: "local", go_type: "string" },
        Field { name: "remote", go_type: "string" },
        Field { name: "protocol", go_type: "types.TransportProtocol" },
    ];

    fn expose(body: &str) -> Result<Vec<String>, String> {
        decode_strings(body.as_bytes(), "ExposeRequest", "types.ExposeRequest", EXPOSE)
    }

    #[test]
    fn decodes_like_go() {
        assert_eq!(
            expose(r#"{"local":"127.0.0.1:1","remote":"192.168.127.2:2","protocol":"udp"}"#).unwrap(),
            vec!["127.0.0.1:1", "192.168.127.2:2", "udp"]
        );
        // Case-insensitive names, unknown fields ignored, trailing bytes unread.
        assert_eq!(expose(r#" {"LOCAL":"a","x":[1,{}],"Remote":null} garbage"#).unwrap(), vec!["a", "", ""]);
        assert_eq!(expose(r#"{"Local":"a","local":"b"}"#).unwrap(), vec!["b", "", ""]);
        assert_eq!(expose("null").unwrap(), vec!["", "", ""]);
        assert_eq!(expose(r#"{"local":"\u00e9\ud83d\ude00\ud800x"}"#).unwrap()[0], "é😀\u{fffd}x");
    }

    #[test]
    fn go_error_texts() {
        let cases = [
            ("", "EOF"),
            ("  \n", "EOF"),
            ("{", "unexpected EOF"),
            (r#"{"local":"#, "unexpected EOF"),
            ("not json", "invalid character 'o' in literal null (expecting 'u')"),
            ("{not json}", "invalid character 'n' looking for beginning of object key string"),
            ("hello", "invalid character 'h' looking for beginning of value"),
            (r#"{"local" 1}"#, "invalid character '1' after object key"),
            (r#"{"local":"a" "#, "unexpected EOF"),
            (r#"{"local":"a" x"#, "invalid character 'x' after object key:value pair"),
            ("[1 2]", "invalid character '2' after array element"),
            ("{\"a\n\"}", "invalid character '\\n' in string literal"),
            (r#"{"a\q"}"#, "invalid character 'q' in string escape code"),
            ("-x", "invalid character 'x' in numeric literal"),
            ("1.x", "invalid character 'x' after decimal point in numeric literal"),
            ("1ex", "invalid character 'x' in exponent of numeric literal"),
            ("{'a':1}", "invalid character '\\'' looking for beginning of object key string"),
            (r#"{"local":5}"#, "json: cannot unmarshal number into Go struct field ExposeRequest.local of type string"),
            (
                r#"{"protocol":true}"#,
                "json: cannot unmarshal bool into Go struct field ExposeRequest.protocol of type types.TransportProtocol",
            ),
            ("[]", "json: cannot unmarshal array into Go value of type types.ExposeRequest"),
            ("\"x\"", "json: cannot unmarshal string into Go value of type types.ExposeRequest"),
            ("12x", "json: cannot unmarshal number into Go value of type types.ExposeRequest"),
        ];
        for (body, want) in cases {
            assert_eq!(expose(body).unwrap_err(), want, "body {body:?}");
        }
    }

    #[test]
    fn encodes_like_go() {
        assert_eq!(encode(&Vec::<String>::new()), b"[]\n");
        assert_eq!(encode(&["a<b>&c"]), b"[\"a\\u003cb\\u003e\\u0026c\"]\n");
    }
}
