//! Path hygiene: the raw `:path` is untrusted, and this module turns it into segments that
//! mean exactly one thing, or refuses it.
//!
//! The danger is a path that Portcullis reads one way and the upstream another (`/a/%2e%2e/admin`,
//! `/admin;x`, `//admin`, `/admin%2fx`): every such ambiguity is rejected outright, never
//! "fixed up", because guessing how a given upstream normalizes is how bypasses happen.
//! Pure: no allocation unless a segment carries a percent-escape.
//!
//! Decisions, and why:
//! - The query (`?...`) is split off first and not inspected here; a `#` anywhere is rejected
//!   (a fragment never belongs in a request line).
//! - Percent-escapes of ordinary printable ASCII (`%41`, `%20`) are decoded per segment, so a
//!   literal `/%61dmin` matches the route for `/admin` exactly as the upstream will see it.
//!   Rejecting them would be safe too, but decoding keeps legitimate clients working and
//!   cannot change which route a request reaches in a way the upstream disagrees with.
//! - Escapes that change structure or meaning are rejected: `%2F` (`/`), `%5C` (`\`), `%00`,
//!   `%25` (double encoding), `%3B` (`;`), `%3F` (`?`) and `%23` (`#`), control characters,
//!   and anything non-ASCII, raw or encoded (upstreams differ on Unicode normalization;
//!   refusing is the only safe answer). `%3F` and `%23` because an upstream that decodes the
//!   path and then parses it again reads `/admin%3Fx` as `/admin` with a query, where
//!   Portcullis would match a segment `admin?x` (to a wider route, e.g. a public `/**`).
//! - Dot segments (`.`, `..`, also encoded), and segments ending in `.` or a space (Windows
//!   servers strip them, so `/admin.` can reach `/admin`) are rejected.
//! - An empty segment (`//`) is rejected, except a single trailing `/`, which is kept as a
//!   final empty segment: `/orders/42/` then matches no `{id}` template (deny by default),
//!   while a trailing `/**` still covers it.

use std::borrow::Cow;

/// Why a path was refused. The message is safe to show the client: it never echoes the path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the path is empty")]
    Empty,
    #[error("the path must start with `/`")]
    NotAbsolute,
    #[error("the path contains a fragment (`#`)")]
    Fragment,
    #[error("the path contains an empty segment (`//`)")]
    EmptySegment,
    #[error("the path contains a backslash")]
    Backslash,
    #[error("the path contains `;` (matrix parameters are not accepted)")]
    Semicolon,
    #[error("the path contains a dot segment (`.` or `..`)")]
    DotSegment,
    #[error("a path segment ends with `.` or a space")]
    TrailingDot,
    #[error("the path contains an encoded slash (`%2F`)")]
    EncodedSlash,
    #[error("the path contains an encoded backslash (`%5C`)")]
    EncodedBackslash,
    #[error("the path contains an encoded NUL (`%00`)")]
    EncodedNul,
    #[error("the path contains an encoded `%` (`%25`, double encoding)")]
    DoubleEncoding,
    #[error("the path contains an encoded `;` (`%3B`)")]
    EncodedSemicolon,
    #[error("the path contains an encoded `?` or `#` (`%3F`, `%23`)")]
    EncodedDelimiter,
    #[error("the path contains an encoded control character")]
    EncodedControl,
    #[error("the path contains an encoded non-ASCII byte")]
    EncodedNonAscii,
    #[error("the path contains a malformed percent-escape")]
    MalformedEscape,
    #[error("the path contains a control character")]
    ControlChar,
    #[error("the path contains a non-ASCII character")]
    NonAscii,
    #[error("the path contains a character that must be percent-encoded")]
    Unencoded,
    #[error(
        "the query names `_method`, which frameworks (Laravel, Symfony) take as the request's \
         method: send the method itself"
    )]
    MethodOverride,
}

/// The cleaned path: decoded segments. `/` is no segments; a trailing `/` adds one final
/// empty segment.
pub type Segments<'a> = Vec<Cow<'a, str>>;

/// Splits a raw `:path` into its path and query parts (query without the `?`).
pub fn split_query(raw: &str) -> (&str, Option<&str>) {
    match raw.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (raw, None),
    }
}

/// Checks and splits a raw `:path` (query and all). The result is what route templates are
/// matched against and where path parameters are captured from.
pub fn clean(raw: &str) -> Result<Segments<'_>, PathError> {
    if raw.is_empty() {
        return Err(PathError::Empty);
    }
    // The whole request target is checked for a fragment, query included: a `#` never
    // legitimately reaches an authorization server.
    if raw.contains('#') {
        return Err(PathError::Fragment);
    }
    let (path, query) = split_query(raw);
    // Authorized as the request's own method, a `POST` must not become the `DELETE` its
    // query asks an upstream framework for (its header forms are removed by Envoy).
    if query.is_some() && any_query_name(raw, |name| name.eq_ignore_ascii_case("_method")) {
        return Err(PathError::MethodOverride);
    }
    let Some(rest) = path.strip_prefix('/') else {
        return Err(PathError::NotAbsolute);
    };
    let mut segments: Segments<'_> = Vec::with_capacity(8);
    if rest.is_empty() {
        return Ok(segments);
    }
    let mut parts = rest.split('/').peekable();
    while let Some(part) = parts.next() {
        let last = parts.peek().is_none();
        if part.is_empty() {
            if last {
                // INVARIANT: a single trailing `/` is kept as one final empty segment, which no
                // literal, `{param}` or `*` matches; only a trailing `/**` covers it.
                segments.push(Cow::Borrowed(""));
                break;
            }
            return Err(PathError::EmptySegment);
        }
        segments.push(clean_segment(part)?);
    }
    Ok(segments)
}

/// One non-empty raw segment: raw characters checked, escapes decoded, then the decoded text
/// checked for dot segments and trailing dots.
fn clean_segment(part: &str) -> Result<Cow<'_, str>, PathError> {
    let bytes = part.as_bytes();
    let mut has_escape = false;
    for &b in bytes {
        check_raw_byte(b)?;
        has_escape |= b == b'%';
    }
    let decoded: Cow<'_, str> = if has_escape {
        Cow::Owned(decode(bytes)?)
    } else {
        Cow::Borrowed(part)
    };
    if decoded == "." || decoded == ".." {
        return Err(PathError::DotSegment);
    }
    if decoded.ends_with('.') || decoded.ends_with(' ') {
        return Err(PathError::TrailingDot);
    }
    Ok(decoded)
}

/// A raw byte of the path (before decoding): RFC 3986 `pchar` or `%`, nothing else.
fn check_raw_byte(b: u8) -> Result<(), PathError> {
    match b {
        b'\\' => Err(PathError::Backslash),
        b';' => Err(PathError::Semicolon),
        0x00..=0x1f | 0x7f => Err(PathError::ControlChar),
        0x80..=0xff => Err(PathError::NonAscii),
        b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' => Ok(()),
        // unreserved, sub-delims (minus `;`), `:`, `@`, and `%` for escapes.
        b'-' | b'.' | b'_' | b'~' | b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+'
        | b',' | b'=' | b':' | b'@' | b'%' => Ok(()),
        _ => Err(PathError::Unencoded),
    }
}

/// Decodes the percent-escapes of one segment, refusing any that would change its meaning.
fn decode(bytes: &[u8]) -> Result<String, PathError> {
    let mut out = String::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b != b'%' {
            out.push(char::from(b));
            i += 1;
            continue;
        }
        let (Some(&h), Some(&l)) = (bytes.get(i + 1), bytes.get(i + 2)) else {
            return Err(PathError::MalformedEscape);
        };
        let (Some(h), Some(l)) = (hex(h), hex(l)) else {
            return Err(PathError::MalformedEscape);
        };
        let v = (h << 4) | l;
        match v {
            b'/' => return Err(PathError::EncodedSlash),
            b'\\' => return Err(PathError::EncodedBackslash),
            0x00 => return Err(PathError::EncodedNul),
            b'%' => return Err(PathError::DoubleEncoding),
            b';' => return Err(PathError::EncodedSemicolon),
            b'?' | b'#' => return Err(PathError::EncodedDelimiter),
            0x01..=0x1f | 0x7f => return Err(PathError::EncodedControl),
            0x80..=0xff => return Err(PathError::EncodedNonAscii),
            _ => out.push(char::from(v)),
        }
        i += 3;
    }
    Ok(out)
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// True when `pred` holds for a parameter name of the query string, read as the most lenient
/// upstream would: pairs split on `&` and on `;` (Rack 2, Go before 1.17, older Python), the
/// name percent-decoded (and split again, for a parser that decodes first), then both trimmed
/// and cut at `[` (`api_key[]`, `access_token[0]`: PHP's and Rack's arrays), and as PHP
/// spells it (`php_name`: `access.token` and `access token` are its `access_token`).
pub fn any_query_name(path: &str, mut pred: impl FnMut(&str) -> bool) -> bool {
    let Some((_, query)) = path.split_once('?') else {
        return false;
    };
    let query = query.split('#').next().unwrap_or_default();
    query.split(['&', ';']).any(|pair| {
        let name = pair.split('=').next().unwrap_or_default();
        let decoded = percent_encoding::percent_decode_str(name).decode_utf8_lossy();
        decoded.split(['&', ';']).any(|part| {
            let name = part.split('[').next().unwrap_or_default().trim();
            if !name.is_empty() && pred(name) {
                return true;
            }
            let php = php_name(part);
            !php.is_empty() && php != name && pred(&php)
        })
    })
}

/// A query parameter's name as PHP reads it into `$_GET`: leading spaces dropped, `.` and
/// spaces (a `+` in the query is one) made `_`, a `[` with a `]` after it the start of an
/// array index (cut there), a `[` without one made `_` (and the rest kept as it is). So
/// `access.token`, `access+token` and `access[token` all reach a PHP upstream as
/// `access_token`. Also made `_` here, to err towards refusing: every `.`, space and `+`
/// after that `[`, which PHP keeps.
fn php_name(raw: &str) -> String {
    let raw = raw.trim_start_matches([' ', '+']);
    let mut out = String::with_capacity(raw.len());
    for (i, c) in raw.char_indices() {
        match c {
            '.' | ' ' | '+' => out.push('_'),
            '[' if raw[i..].contains(']') => break,
            '[' => out.push('_'),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(raw: &str, want: &[&str]) {
        let got = clean(raw).unwrap_or_else(|e| panic!("`{raw}` rejected: {e}"));
        let got: Vec<&str> = got.iter().map(|s| s.as_ref()).collect();
        assert_eq!(got, want, "segments of `{raw}`");
    }

    fn bad(raw: &str, want: PathError) {
        assert_eq!(clean(raw), Err(want), "`{raw}`");
    }

    #[test]
    fn plain_paths_split_into_segments() {
        ok("/", &[]);
        ok("/orders/42", &["orders", "42"]);
        ok("/orders/42?x=1&y=/../", &["orders", "42"]);
        ok("/orders/42/", &["orders", "42", ""]);
        ok("/a:b@c/x-y_z~!$&'()*+,=", &["a:b@c", "x-y_z~!$&'()*+,="]);
        ok("/?", &[]);
    }

    #[test]
    fn harmless_escapes_are_decoded() {
        ok("/%61dmin/x", &["admin", "x"]);
        ok("/files/a%20b", &["files", "a b"]);
        ok("/x/%2e%2e%2ex", &["x", "...x"]);
    }

    #[test]
    fn structure_is_rejected() {
        bad("", PathError::Empty);
        bad("orders/42", PathError::NotAbsolute);
        bad("*", PathError::NotAbsolute);
        bad("?/admin", PathError::NotAbsolute);
        bad("/orders/42#frag", PathError::Fragment);
        bad("/orders/42?q=#x", PathError::Fragment);
        bad("//admin/x", PathError::EmptySegment);
        bad("/admin//x", PathError::EmptySegment);
        bad("/admin/x//", PathError::EmptySegment);
    }

    #[test]
    fn dot_segments_are_rejected_raw_and_encoded() {
        bad("/orders/../admin", PathError::DotSegment);
        bad("/orders/./admin", PathError::DotSegment);
        bad("/orders/..", PathError::DotSegment);
        bad("/orders/%2e%2e/admin", PathError::DotSegment);
        bad("/orders/%2E%2E/admin", PathError::DotSegment);
        bad("/orders/.%2e/admin", PathError::DotSegment);
        bad("/orders/%2e./admin", PathError::DotSegment);
        bad("/orders/%2e/admin", PathError::DotSegment);
        bad("/admin./x", PathError::TrailingDot);
        bad("/admin%2e/x", PathError::TrailingDot);
        bad("/admin%20/x", PathError::TrailingDot);
    }

    #[test]
    fn dangerous_characters_are_rejected() {
        bad("/admin\\x", PathError::Backslash);
        bad("/admin;x=1/y", PathError::Semicolon);
        bad("/admin/x;", PathError::Semicolon);
        bad("/admin x", PathError::Unencoded);
        bad("/admin/{x}", PathError::Unencoded);
        bad("/admin\u{0}", PathError::ControlChar);
        bad("/admin\t", PathError::ControlChar);
        bad("/adm\u{e9}n", PathError::NonAscii);
    }

    #[test]
    fn a_method_override_in_the_query_is_rejected() {
        bad("/orders?_method=DELETE", PathError::MethodOverride);
        bad("/orders?a=1;_METHOD=PUT", PathError::MethodOverride);
        bad("/orders?%5fmethod=PUT", PathError::MethodOverride);
        bad("/orders?_method[]=PUT", PathError::MethodOverride);
        bad("/orders?+_method=PUT", PathError::MethodOverride);
        assert!(clean("/orders?http_method=x&filter[_method]=y&method=z").is_ok());
        assert!(clean("/orders").is_ok());
    }

    #[test]
    fn dangerous_escapes_are_rejected() {
        bad("/admin%2fx", PathError::EncodedSlash);
        bad("/admin%2Fx", PathError::EncodedSlash);
        bad("/admin%5cx", PathError::EncodedBackslash);
        bad("/admin%5Cx", PathError::EncodedBackslash);
        bad("/admin%00", PathError::EncodedNul);
        bad("/admin%252e%252e", PathError::DoubleEncoding);
        bad("/admin%3bx", PathError::EncodedSemicolon);
        bad("/admin%3fx", PathError::EncodedDelimiter);
        bad("/admin%3Fx", PathError::EncodedDelimiter);
        bad("/admin%23x", PathError::EncodedDelimiter);
        bad("/admin%0a", PathError::EncodedControl);
        bad("/admin%7F", PathError::EncodedControl);
        bad("/adm%C3%A9n", PathError::EncodedNonAscii);
        bad("/admin%", PathError::MalformedEscape);
        bad("/admin%2", PathError::MalformedEscape);
        bad("/admin%zz", PathError::MalformedEscape);
        bad("/admin%%41", PathError::MalformedEscape);
    }

    /// Every path built from up to five risky pieces (~580k paths): whatever `clean` accepts must be a path
    /// that a decoding, dot-removing, slash-merging server would leave exactly as it is.
    #[test]
    fn accepted_paths_are_already_normal() {
        const PIECES: &[&str] = &[
            "/", ".", "%2e", "%2f", "a", ";", "%", "%41", "\\", "?", "%25", "%5c", "%00", " ",
        ];
        let mut accepted = 0usize;
        let mut stack: Vec<(String, usize)> = vec![(String::new(), 0)];
        while let Some((prefix, depth)) = stack.pop() {
            if depth < 5 {
                for p in PIECES {
                    stack.push((format!("{prefix}{p}"), depth + 1));
                }
            }
            let raw = format!("/{prefix}");
            let Ok(segs) = clean(&raw) else { continue };
            accepted += 1;
            let (path, _) = split_query(&raw);
            let decoded = percent_encoding::percent_decode_str(path).decode_utf8_lossy();
            let parts: Vec<&str> = decoded.split('/').skip(1).collect();
            let n = parts.len();
            let got: Vec<&str> = segs.iter().map(|s| s.as_ref()).collect();
            // A server that decodes first sees the same segments (no hidden `/`), none of them
            // a dot segment, none empty except a final one, and nothing it would strip.
            let want: Vec<&str> = if decoded == "/" {
                vec![]
            } else {
                parts.clone()
            };
            assert_eq!(got, want, "`{raw}`");
            for (i, s) in got.iter().enumerate() {
                assert!(*s != "." && *s != "..", "`{raw}`");
                assert!(!s.is_empty() || i + 1 == n, "`{raw}`");
                assert!(!s.contains(['\\', ';', '%', '\0']), "`{raw}`");
                assert!(!s.ends_with('.') && !s.ends_with(' '), "`{raw}`");
            }
        }
        assert!(
            accepted > 100,
            "the generator must exercise accepted paths too"
        );
    }

    #[test]
    fn query_is_split_off_first() {
        assert_eq!(split_query("/a?b?c"), ("/a", Some("b?c")));
        assert_eq!(split_query("/a"), ("/a", None));
        // A `;` or `..` in the query is the upstream's business, not a path ambiguity.
        ok("/a?x=;../", &["a"]);
    }
}
