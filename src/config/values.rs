//! Typed reading of JSON configuration values, with errors that name the key.
//!
//! SAP destination exports carry every value as a string ("true", "10"), hand-written
//! configurations use JSON booleans and numbers: both are accepted.

use serde_json::Value;
use std::fmt;

/// A configuration problem: which key (a path such as `destinations[0].audience`) and
/// what is wrong with it. Never contains a secret value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub key: String,
    pub problem: String,
}

impl ConfigError {
    pub fn new(key: impl Into<String>, problem: impl Into<String>) -> Self {
        ConfigError {
            key: key.into(),
            problem: problem.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "configuration key `{}` {}", self.key, self.problem)
    }
}

/// A JSON object being read, with the path used in error messages.
pub struct Section<'a> {
    pub path: String,
    pub fields: &'a serde_json::Map<String, Value>,
}

impl<'a> Section<'a> {
    /// Treats `value` as an object, or explains that it must be one.
    pub fn new(path: impl Into<String>, value: &'a Value) -> Result<Self, ConfigError> {
        let path = path.into();
        match value {
            Value::Object(fields) => Ok(Section { path, fields }),
            _ => Err(ConfigError::new(path, "must be a JSON object")),
        }
    }

    /// The full path of a key of this section.
    pub fn key(&self, name: &str) -> String {
        if self.path.is_empty() {
            name.to_string()
        } else {
            format!("{}.{}", self.path, name)
        }
    }

    /// A non-empty string, if the key is present.
    pub fn string(&self, name: &str) -> Result<Option<String>, ConfigError> {
        match self.fields.get(name) {
            None => Ok(None),
            Some(Value::String(s)) if !s.trim().is_empty() => Ok(Some(s.clone())),
            Some(Value::String(_)) => Err(ConfigError::new(self.key(name), "must not be empty")),
            Some(_) => Err(ConfigError::new(self.key(name), "must be a string")),
        }
    }

    /// A non-empty string that must be present.
    pub fn required_string(&self, name: &str) -> Result<String, ConfigError> {
        self.string(name)?
            .ok_or_else(|| ConfigError::new(self.key(name), "is required"))
    }

    /// A value given inline under `field` or in the environment variable named by
    /// `<field>Env` (so secrets can stay out of the configuration, which Envoy prints in
    /// its config dump and debug logs); `None` if neither is set.
    pub fn inline_or_env(
        &self,
        field: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Option<String>, ConfigError> {
        let env_field = format!("{field}Env");
        match (self.string(field)?, self.string(&env_field)?) {
            (Some(value), None) => Ok(Some(value)),
            (None, Some(variable)) => env(&variable)
                .filter(|v| !v.trim().is_empty())
                .map(Some)
                .ok_or_else(|| {
                    ConfigError::new(
                        self.key(&env_field),
                        format!("names environment variable {variable:?}, which is not set in the Wasm VM"),
                    )
                }),
            (Some(_), Some(_)) => Err(ConfigError::new(
                self.key(field),
                format!("and {env_field} are both set; use one"),
            )),
            (None, None) => Ok(None),
        }
    }

    /// A boolean given as JSON `true`/`false` or the strings "true"/"false".
    pub fn boolean(&self, name: &str, default: bool) -> Result<bool, ConfigError> {
        match self.fields.get(name) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(Value::String(s)) if s.eq_ignore_ascii_case("true") => Ok(true),
            Some(Value::String(s)) if s.eq_ignore_ascii_case("false") => Ok(false),
            Some(_) => Err(ConfigError::new(self.key(name), "must be true or false")),
        }
    }

    /// A whole number in `range`, given as a JSON number or a decimal string.
    pub fn integer(
        &self,
        name: &str,
        range: std::ops::RangeInclusive<u64>,
        default: u64,
    ) -> Result<u64, ConfigError> {
        let parsed = match self.fields.get(name) {
            None => return Ok(default),
            Some(Value::Number(n)) => n.as_u64(),
            Some(Value::String(s)) => s.trim().parse::<u64>().ok(),
            Some(_) => None,
        };
        match parsed {
            Some(n) if range.contains(&n) => Ok(n),
            _ => Err(ConfigError::new(
                self.key(name),
                format!(
                    "must be a whole number from {} to {}",
                    range.start(),
                    range.end()
                ),
            )),
        }
    }

    /// A list given as a JSON array of strings or as one comma-separated string (the form
    /// of a property in a destination export); empty if the key is absent.
    pub fn string_list(&self, name: &str) -> Result<Vec<String>, ConfigError> {
        let items: Vec<String> = match self.fields.get(name) {
            None => return Ok(Vec::new()),
            Some(Value::String(s)) => s.split(',').map(|i| i.trim().to_string()).collect(),
            Some(Value::Array(items)) => items
                .iter()
                .map(|i| match i {
                    Value::String(s) => Ok(s.trim().to_string()),
                    Value::Number(n) => Ok(n.to_string()),
                    _ => Err(ConfigError::new(
                        self.key(name),
                        "must be a list of strings",
                    )),
                })
                .collect::<Result<_, _>>()?,
            Some(_) => {
                return Err(ConfigError::new(
                    self.key(name),
                    "must be a list of strings or a comma-separated string",
                ))
            }
        };
        if items.iter().any(String::is_empty) {
            return Err(ConfigError::new(
                self.key(name),
                "must not contain an empty item",
            ));
        }
        Ok(items)
    }
}
