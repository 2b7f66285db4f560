//! The `key=value,key=value` option parser and the helpers the option types
//! share.

use std::collections::BTreeMap;

use super::ConfigError;

/// `key=value,key=value` with a fixed set of keys.
pub(super) struct OptionParser {
    option: &'static str,
    values: BTreeMap<String, String>,
}

/// The keys an option's syntax text names, in order: every name
/// (lowercase letters, digits, `_`) that starts the text or follows `[`,
/// `,` or `|` and stands right before an `=`.
/// `--help` prints the same text, so what it lists and what the parser
/// accepts cannot drift apart.
fn keys_in(syntax: &str) -> Vec<&str> {
    let is_key_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_';
    let mut keys = Vec::new();
    for (at, _) in syntax.match_indices('=') {
        let before = &syntax[..at];
        let start = before.rfind(|c: char| !is_key_char(c)).map_or(0, |i| i + 1);
        let key = &before[start..];
        let separated = start == 0 || before[..start].ends_with(['[', ',', '|']);
        if separated && !key.is_empty() && !keys.contains(&key) {
            keys.push(key);
        }
    }
    keys
}

impl OptionParser {
    /// Parses `text` against the keys `syntax` names (`keys_in`).
    pub(super) fn parse(
        option: &'static str,
        text: &str,
        syntax: &str,
    ) -> Result<Self, ConfigError> {
        let keys = keys_in(syntax);
        let mut values = BTreeMap::new();
        for item in text.split(',').filter(|i| !i.is_empty()) {
            let (key, value) = item
                .split_once('=')
                .ok_or_else(|| ConfigError::NotKeyValue {
                    option,
                    item: item.to_string(),
                })?;
            if !keys.contains(&key) {
                return Err(ConfigError::UnknownKey {
                    option,
                    key: key.to_string(),
                    expected: keys.join(", "),
                });
            }
            if values.insert(key.to_string(), value.to_string()).is_some() {
                return Err(ConfigError::DuplicateKey {
                    option,
                    key: key.to_string(),
                });
            }
        }
        Ok(OptionParser { option, values })
    }

    pub(super) fn get(&self, key: &str) -> Option<&str> {
        self.values.get(key).map(String::as_str)
    }

    pub(super) fn invalid(&self, key: &'static str, why: &'static str) -> ConfigError {
        ConfigError::Invalid {
            option: self.option,
            key,
            value: self.get(key).unwrap_or_default().to_string(),
            why,
        }
    }

    pub(super) fn toggle(&self, key: &'static str, default: bool) -> Result<bool, ConfigError> {
        match self.get(key) {
            None => Ok(default),
            Some("on" | "true") => Ok(true),
            Some("off" | "false") => Ok(false),
            Some(_) => Err(self.invalid(key, "expected on or off")),
        }
    }
}

/// `512M`, `2G`, `4096`, `0x1000`: bytes with an optional binary suffix.
pub fn parse_size(text: &str) -> Option<u64> {
    const SUFFIXES: [(char, u32); 4] = [('K', 10), ('M', 20), ('G', 30), ('T', 40)];
    let upper = text.trim().to_ascii_uppercase();
    let (number, shift) = SUFFIXES
        .iter()
        .find_map(|(c, s)| upper.strip_suffix(*c).map(|n| (n.to_string(), *s)))
        .unwrap_or((upper, 0));
    let value = match number.strip_prefix("0X") {
        Some(hex) => u64::from_str_radix(hex, 16).ok()?,
        None => number.parse::<u64>().ok()?,
    };
    value.checked_mul(1 << shift)
}

pub(super) fn is_zero(n: &u16) -> bool {
    *n == 0
}

pub(super) fn is_false(b: &bool) -> bool {
    !*b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_keys_are_the_names_before_each_equals_sign() {
        for (syntax, keys) in [
            (
                "size=SIZE[,guest_memfd=on|off]",
                &["size", "guest_memfd"][..],
            ),
            (
                "[tdx=on|sev_snp=on][,num_pci_segments=1]",
                &["tdx", "sev_snp", "num_pci_segments"],
            ),
            ("boot=N (1..=32)[,max=M (M >= N)]", &["boot", "max"]),
            ("tty|off|file=PATH|socket=PATH", &["file", "socket"]),
            ("path=/sys/BDF/[,id=ID][,path=P]", &["path", "id"]),
            ("=x,Upper=1,a-b=2,c d=3,e=4", &["e"]),
            ("no keys at all", &[]),
        ] {
            assert_eq!(keys_in(syntax), keys, "{syntax}");
        }
    }

    #[test]
    fn a_key_the_syntax_does_not_name_is_refused_with_the_ones_it_does() {
        let err = OptionParser::parse("--x", "a=1,c=2", "a=N[,b=M]")
            .err()
            .unwrap();
        assert_eq!(
            err.to_string(),
            ConfigError::UnknownKey {
                option: "--x",
                key: "c".into(),
                expected: "a, b".into(),
            }
            .to_string()
        );
        let p = OptionParser::parse("--x", "b=2,a=1", "a=N[,b=M]").unwrap();
        assert_eq!((p.get("a"), p.get("b")), (Some("1"), Some("2")));
    }
}
