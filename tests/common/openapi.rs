//! Checks JSON answers against the schemas of our OpenAPI spec, the way a
//! client generated from it would read them: types, required fields,
//! enums, item and property schemas, `$ref`. A field the schema does not
//! list is allowed (generated clients ignore them), a listed one must match.

use serde_json::Value;
use yaml_rust2::{Yaml, YamlLoader};

const SPEC: &str = include_str!("../../vmm/openapi/cloud-hypervisor.yaml");

pub struct Spec(Yaml);

impl Spec {
    pub fn load() -> Self {
        Spec(
            YamlLoader::load_from_str(SPEC)
                .expect("the spec is YAML")
                .remove(0),
        )
    }

    /// Checks `value` against `components/schemas/<name>`.
    pub fn check(&self, name: &str, value: &Value) -> Result<(), String> {
        let schema = &self.0["components"]["schemas"][name];
        assert!(!schema.is_badvalue(), "no schema {name}");
        self.check_schema(schema, value, name)
    }

    fn check_schema(&self, schema: &Yaml, value: &Value, at: &str) -> Result<(), String> {
        if let Some(reference) = schema["$ref"].as_str() {
            let name = reference.rsplit('/').next().unwrap();
            return self.check_schema(&self.0["components"]["schemas"][name], value, at);
        }
        if value.is_null() {
            return if schema["nullable"].as_bool() == Some(true) {
                Ok(())
            } else {
                Err(format!("{at}: null where the schema allows none"))
            };
        }
        if let Some(kind) = schema["type"].as_str() {
            let fits = match kind {
                "object" => value.is_object(),
                "array" => value.is_array(),
                "string" => value.is_string(),
                "integer" => value.is_i64() || value.is_u64(),
                "number" => value.is_number(),
                "boolean" => value.is_boolean(),
                other => return Err(format!("{at}: unknown schema type {other}")),
            };
            if !fits {
                return Err(format!("{at}: {value} is not a {kind}"));
            }
        }
        if let Some(allowed) = schema["enum"].as_vec() {
            let matches = allowed.iter().any(|a| match (a, value) {
                (Yaml::String(a), Value::String(v)) => a == v,
                (Yaml::Integer(a), Value::Number(v)) => v.as_i64() == Some(*a),
                (Yaml::Boolean(a), Value::Bool(v)) => a == v,
                _ => false,
            });
            if !matches {
                return Err(format!("{at}: {value} is not one of the enum's values"));
            }
        }
        if let Some(required) = schema["required"].as_vec() {
            for field in required {
                let field = field.as_str().unwrap();
                if value.get(field).is_none() {
                    return Err(format!("{at}: required field {field} missing in {value}"));
                }
            }
        }
        if let (Some(properties), Some(object)) =
            (schema["properties"].as_hash(), value.as_object())
        {
            for (name, property) in properties {
                let name = name.as_str().unwrap();
                if let Some(field) = object.get(name) {
                    self.check_schema(property, field, &format!("{at}.{name}"))?;
                }
            }
        }
        let extra = &schema["additionalProperties"];
        if let (Some(_), Some(object)) = (extra.as_hash(), value.as_object()) {
            for (name, field) in object {
                self.check_schema(extra, field, &format!("{at}.{name}"))?;
            }
        }
        if let (false, Some(items)) = (schema["items"].is_badvalue(), value.as_array()) {
            for (i, item) in items.iter().enumerate() {
                self.check_schema(&schema["items"], item, &format!("{at}[{i}]"))?;
            }
        }
        Ok(())
    }
}
