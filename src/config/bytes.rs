//! Byte sizes in config files: a plain integer (bytes) or a number with a unit, `64MiB`,
//! `512KiB`, `1GiB` (binary units; `KB`/`MB`/`GB` are accepted as the same binary units).

use std::fmt;

use serde::{Deserialize, Deserializer};

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub const fn mib(n: u64) -> Self {
        Self(n * 1024 * 1024)
    }

    pub const fn get(self) -> u64 {
        self.0
    }

    /// Parses `123`, `123B`, `64KiB`, `64MiB`, `2GiB` (case-insensitive, optional space).
    pub fn parse(text: &str) -> Result<Self, String> {
        let t = text.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("invalid size `{text}` (use e.g. `64MiB`, `512KiB`)"))?;
        let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" | "kib" => 1 << 10,
            "m" | "mb" | "mib" => 1 << 20,
            "g" | "gb" | "gib" => 1 << 30,
            other => {
                return Err(format!(
                    "invalid size `{text}`: unknown unit `{other}` (use B, KiB, MiB or GiB)"
                ));
            }
        };
        n.checked_mul(mult)
            .map(ByteSize)
            .ok_or_else(|| format!("invalid size `{text}`: too large"))
    }
}

impl fmt::Debug for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        if n >= 1 << 20 && n.is_multiple_of(1 << 20) {
            write!(f, "{}MiB", n >> 20)
        } else if n >= 1 << 10 && n.is_multiple_of(1 << 10) {
            write!(f, "{}KiB", n >> 10)
        } else {
            write!(f, "{n}B")
        }
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        /// A visitor rather than an untagged enum: a list or a map in a size's place was
        /// refused as "data did not match any variant of untagged enum Raw".
        struct Size;
        impl serde::de::Visitor<'_> for Size {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(
                    "a size: a number of bytes, or a number with a unit (`64MiB`, `512KiB`)",
                )
            }
            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(n))
            }
            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<ByteSize, E> {
                u64::try_from(n)
                    .map(ByteSize)
                    .map_err(|_| E::custom(format!("invalid size `{n}`: it cannot be negative")))
            }
            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<ByteSize, E> {
                ByteSize::parse(text).map_err(E::custom)
            }
        }
        d.deserialize_any(Size)
    }
}

#[cfg(test)]
mod tests {
    use super::ByteSize;

    #[test]
    fn parses_units_and_plain_numbers() {
        assert_eq!(ByteSize::parse("123"), Ok(ByteSize(123)));
        assert_eq!(ByteSize::parse("64MiB"), Ok(ByteSize::mib(64)));
        assert_eq!(ByteSize::parse(" 512 KiB "), Ok(ByteSize(512 * 1024)));
        assert_eq!(ByteSize::parse("1gib"), Ok(ByteSize(1 << 30)));
        assert_eq!(ByteSize::parse("2MB"), Ok(ByteSize::mib(2)));
    }

    #[test]
    fn refuses_what_it_cannot_read() {
        for bad in [
            "",
            "MiB",
            "12 parsecs",
            "-1",
            "1.5MiB",
            "99999999999999999999GiB",
        ] {
            let e = ByteSize::parse(bad).expect_err(bad);
            assert!(e.contains("invalid size"), "{bad}: {e}");
        }
    }

    /// serde_yaml hands a size over as a number or a string; anything else is refused saying
    /// what a size is.
    #[test]
    fn a_value_that_is_not_a_size_says_what_a_size_is() {
        for (yaml, want) in [
            ("123", Ok(ByteSize(123))),
            ("64MiB", Ok(ByteSize::mib(64))),
            ("'1KiB'", Ok(ByteSize(1024))),
        ] {
            assert_eq!(serde_yaml::from_str::<ByteSize>(yaml).map_err(|_| ()), want);
        }
        for yaml in ["[1]", "{a: 1}", "true", "1.5"] {
            let e = serde_yaml::from_str::<ByteSize>(yaml)
                .unwrap_err()
                .to_string();
            assert!(e.contains("expected a size"), "{yaml}: {e}");
        }
        let e = serde_yaml::from_str::<ByteSize>("-1")
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot be negative"), "{e}");
    }

    #[test]
    fn displays_in_the_largest_exact_unit() {
        assert_eq!(ByteSize::mib(64).to_string(), "64MiB");
        assert_eq!(ByteSize(3 * 1024).to_string(), "3KiB");
        assert_eq!(ByteSize(1000).to_string(), "1000B");
    }
}
