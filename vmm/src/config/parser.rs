//! The `key=value,key=value` option parser and the helpers the option types
//! share.

use std::collections::BTreeMap;

use super::ConfigError;

/// `key=value,key=value` with a fixed set of keys.
pub(super) struct OptionParser {
    option: &'static str,
    values: BTreeMap<String, String>,
}

impl OptionParser {
    pub(super) fn parse(
        option: &'static str,
        text: &str,
        keys: &[&str],
    ) -> Result<Self, ConfigError> {
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
