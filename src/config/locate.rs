//! Where a field is written in a block-style YAML file, for error messages.
//!
//! serde_yaml places an error raised by a value's own parser (an invalid duration or size,
//! an empty value) at the start of the mapping that holds it, so `issuers[0].leeway: invalid
//! duration` said "at line 62", the issuer's `- name:` line, where `leeway:` was on line
//! 76. The field's path is known exactly (serde_path_to_error), so its line is found here by
//! following the path through the file's indentation. Only block style is followed: inside
//! a flow collection (`{a: 1}`, `[a, b]`) the line of the key that holds it is the answer,
//! and a path that cannot be followed gives `None`.

use serde_path_to_error::{Path, Segment};

/// One line with content: 1-based number, indentation, and the text after it.
#[derive(Clone, Copy)]
struct Line<'a> {
    number: usize,
    indent: usize,
    text: &'a str,
}

/// The 1-based line and column where `path` (its last key or item that block style can
/// reach) is written in `yaml`.
pub(super) fn locate(yaml: &str, path: &Path) -> Option<(usize, usize)> {
    let mut region: Vec<Line<'_>> = yaml
        .lines()
        .enumerate()
        .filter_map(|(n, line)| {
            let text = line.trim_start_matches(' ');
            let comment_or_blank = text.is_empty() || text.starts_with('#');
            let marker = text == "---" && line.len() == 3;
            (!comment_or_blank && !marker).then_some(Line {
                number: n + 1,
                indent: line.len() - text.len(),
                text,
            })
        })
        .collect();
    let mut found = None;
    for segment in path.iter() {
        let Some(first) = region.first().filter(|l| !l.text.starts_with(['{', '['])) else {
            // The value is on its key's line, or a flow collection: that line it is.
            return found;
        };
        let indent = first.indent;
        let at = match segment {
            Segment::Map { key } => region
                .iter()
                .position(|l| l.indent == indent && key_of(l.text) == Some(key.as_str()))?,
            Segment::Seq { index } => region
                .iter()
                .enumerate()
                .filter(|(_, l)| l.indent == indent && item_of(l.text).is_some())
                .map(|(i, _)| i)
                .nth(*index)?,
            _ => return found,
        };
        let line = region[at];
        found = Some((line.number, line.indent + 1));
        // What the key or item holds: the lines indented further, and for a key, a list
        // written at its own indentation (`issuers:` then `- name: a` under the `i`).
        let list_below = matches!(segment, Segment::Map { .. })
            && region
                .get(at + 1)
                .is_some_and(|l| l.indent == line.indent && item_of(l.text).is_some());
        let nested = region[at + 1..]
            .iter()
            .take_while(|l| {
                l.indent > line.indent
                    || (list_below && l.indent == line.indent && item_of(l.text).is_some())
            })
            .copied();
        region = match segment {
            // `- name: dev`: the item's first key is on the dash's line, two columns in.
            Segment::Seq { .. } => match item_of(line.text) {
                Some(rest) if !rest.is_empty() => {
                    let column = line.text.len() - rest.len();
                    std::iter::once(Line {
                        number: line.number,
                        indent: line.indent + column,
                        text: rest,
                    })
                    .chain(nested)
                    .collect()
                }
                _ => nested.collect(),
            },
            _ => nested.collect(),
        };
    }
    found
}

/// The key of a `key: value` (or `key:`) line, unquoted.
fn key_of(text: &str) -> Option<&str> {
    let (key, rest) = match text.as_bytes().first()? {
        q @ (b'"' | b'\'') => {
            let end = text[1..].find(char::from(*q))? + 1;
            (&text[1..end], &text[end + 1..])
        }
        _ => {
            let colon = text
                .find(": ")
                .or_else(|| text.ends_with(':').then(|| text.len() - 1))?;
            (text[..colon].trim_end(), &text[colon..])
        }
    };
    rest.trim_start().starts_with(':').then_some(key)
}

/// What follows the dash of a sequence item (`- x` or a lone `-`).
fn item_of(text: &str) -> Option<&str> {
    if text == "-" {
        return Some("");
    }
    text.strip_prefix("- ")
        .map(|rest| rest.trim_start_matches(' '))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The path serde_path_to_error reports for a failure at `field` of the value below.
    fn path_of(yaml: &str) -> Path {
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct Issuer {
            name: String,
            #[serde(default)]
            keys: Option<serde_yaml::Value>,
            leeway: Option<crate::config::duration::HumanDuration>,
        }
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct Doc {
            #[serde(default)]
            server: Option<serde_yaml::Value>,
            issuers: Vec<Issuer>,
        }
        let de = serde_yaml::Deserializer::from_str(yaml);
        match serde_path_to_error::deserialize::<_, Doc>(de) {
            Ok(doc) => panic!("parsed: {doc:?}"),
            Err(e) => e.path().clone(),
        }
    }

    #[test]
    fn a_field_of_a_list_item_is_found_on_its_own_line() {
        let yaml = "server:\n  listen: x\n\n# issuers\nissuers:\n  - name: a\n    leeway: 1s\n  - name: b\n    keys:\n      file: k.json\n    # skew\n    leeway: 30 parsecs\n";
        let path = path_of(yaml);
        assert_eq!(path.to_string(), "issuers[1].leeway");
        assert_eq!(locate(yaml, &path), Some((12, 5)));
    }

    #[test]
    fn the_first_key_of_an_item_is_on_the_dash_line() {
        let yaml = "issuers:\n- leeway: soon\n  name: a\n";
        let path = path_of(yaml);
        assert_eq!(locate(yaml, &path), Some((2, 3)));
        // A lone dash, quoted keys, and a key written with spaces before its colon.
        let yaml = "issuers:\n  -\n    name: a\n    \"leeway\"  : never\n";
        let path = path_of(yaml);
        assert_eq!(locate(yaml, &path), Some((4, 5)));
    }

    #[test]
    fn inside_a_flow_collection_the_line_of_its_key_is_the_answer() {
        let yaml = "issuers:\n  - {name: a, leeway: soon}\n";
        let path = path_of(yaml);
        assert_eq!(path.to_string(), "issuers[0].leeway");
        assert_eq!(locate(yaml, &path), Some((2, 3)));
        let yaml = "issuers: [{name: a, leeway: soon}]\n";
        let path = path_of(yaml);
        assert_eq!(locate(yaml, &path), Some((1, 1)));
    }

    #[test]
    fn a_path_that_cannot_be_followed_is_none() {
        let path = path_of("issuers:\n  - name: a\n    leeway: soon\n");
        // The same path looked up in files that do not hold it.
        assert_eq!(locate("server: {}\n", &path), None);
        assert_eq!(locate("issuers:\n  - name: a\n", &path), None);
        assert_eq!(locate("issuers:\n  name: a\n", &path), None);
    }
}
