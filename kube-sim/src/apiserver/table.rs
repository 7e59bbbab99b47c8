//! `Table` responses (`Accept: application/json;as=Table;g=meta.k8s.io;v=v1`), which kubectl
//! asks for to print `kubectl get`: custom resources use their `additionalPrinterColumns`.

use serde_json::{Value, json};

use crate::apiserver::resources::{PrinterColumn, ResourceType};
use crate::json::scalar_string;
use crate::time::{human_age, parse_rfc3339};

/// Evaluates the simple JSONPath subset CRDs use in printer columns:
/// `.a.b`, `.a[0]`, `.a[*].b`, `.a['b.c']` and `.a.b\.c`.
pub fn jsonpath(obj: &Value, path: &str) -> Vec<Value> {
    let path = path.trim().trim_start_matches('{').trim_end_matches('}');
    let path = path.strip_prefix('$').unwrap_or(path);
    let mut steps: Vec<Step> = Vec::new();
    let chars: Vec<char> = path.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        match chars[i] {
            '.' => {
                let mut name = String::new();
                i += 1;
                while i < chars.len() && chars[i] != '.' && chars[i] != '[' {
                    if chars[i] == '\\' && i + 1 < chars.len() {
                        i += 1;
                    }
                    name.push(chars[i]);
                    i += 1;
                }
                if !name.is_empty() {
                    steps.push(Step::Field(name));
                }
            }
            '[' => {
                let end = chars[i..]
                    .iter()
                    .position(|c| *c == ']')
                    .map(|p| p + i)
                    .unwrap_or(chars.len());
                let inner: String = chars[i + 1..end.min(chars.len())].iter().collect();
                let inner = inner.trim();
                if inner == "*" {
                    steps.push(Step::All);
                } else if let Ok(n) = inner.parse::<usize>() {
                    steps.push(Step::Index(n));
                } else {
                    steps.push(Step::Field(
                        inner.trim_matches(|c| c == '\'' || c == '"').to_string(),
                    ));
                }
                i = end + 1;
            }
            _ => {
                let mut name = String::new();
                while i < chars.len() && chars[i] != '.' && chars[i] != '[' {
                    name.push(chars[i]);
                    i += 1;
                }
                steps.push(Step::Field(name));
            }
        }
    }
    let mut cur = vec![obj.clone()];
    for s in steps {
        cur = cur
            .into_iter()
            .flat_map(|v| match &s {
                Step::Field(f) => v.get(f).cloned().into_iter().collect::<Vec<_>>(),
                Step::Index(n) => v.get(*n).cloned().into_iter().collect(),
                Step::All => match v {
                    Value::Array(a) => a,
                    Value::Object(m) => m.into_iter().map(|(_, v)| v).collect(),
                    _ => Vec::new(),
                },
            })
            .collect();
    }
    cur
}

enum Step {
    Field(String),
    Index(usize),
    All,
}

fn col(name: &str, type_: &str, format: &str, description: &str, priority: i64) -> Value {
    json!({"name": name, "type": type_, "format": format, "description": description, "priority": priority})
}

fn age_cell(obj: &Value) -> Value {
    obj.pointer("/metadata/creationTimestamp")
        .and_then(Value::as_str)
        .and_then(parse_rfc3339)
        .map(|t| Value::String(human_age(t)))
        .unwrap_or(Value::String("<unknown>".into()))
}

fn name_cell(obj: &Value) -> Value {
    obj.pointer("/metadata/name")
        .cloned()
        .unwrap_or(Value::Null)
}

fn custom_cell(obj: &Value, c: &PrinterColumn) -> Value {
    let vals = jsonpath(obj, &c.json_path);
    if vals.is_empty() {
        return Value::Null;
    }
    if c.type_ == "date" {
        return vals[0]
            .as_str()
            .and_then(parse_rfc3339)
            .map(|t| Value::String(human_age(t)))
            .unwrap_or(Value::Null);
    }
    if vals.len() == 1 {
        return match (&vals[0], c.type_.as_str()) {
            (v @ (Value::Number(_) | Value::Bool(_) | Value::String(_)), _) => v.clone(),
            (v, _) => Value::String(v.to_string()),
        };
    }
    Value::String(vals.iter().map(scalar_string).collect::<Vec<_>>().join(","))
}

fn pod_cells(obj: &Value) -> Vec<Value> {
    let statuses = obj
        .pointer("/status/containerStatuses")
        .and_then(Value::as_array);
    let total = obj
        .pointer("/spec/containers")
        .and_then(Value::as_array)
        .map_or(0, Vec::len);
    let ready = statuses.map_or(0, |s| {
        s.iter().filter(|c| c["ready"] == Value::Bool(true)).count()
    });
    let restarts: i64 = statuses.map_or(0, |s| {
        s.iter().filter_map(|c| c["restartCount"].as_i64()).sum()
    });
    let mut status = obj
        .pointer("/status/phase")
        .and_then(Value::as_str)
        .unwrap_or("Pending")
        .to_string();
    if let Some(r) = obj.pointer("/status/reason").and_then(Value::as_str) {
        status = r.to_string();
    }
    let all = obj
        .pointer("/status/initContainerStatuses")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .chain(statuses.into_iter().flatten());
    let mut any_running = false;
    for c in all {
        if let Some(r) = c.pointer("/state/waiting/reason").and_then(Value::as_str)
            && r != "PodInitializing"
            && r != "ContainerCreating"
        {
            status = r.to_string();
        } else if let Some(t) = c.pointer("/state/terminated") {
            status = match t["reason"].as_str() {
                Some(r) => r.to_string(),
                None => format!("ExitCode:{}", t["exitCode"]),
            };
        } else if c.pointer("/state/running").is_some() {
            any_running = true;
        }
    }
    if any_running && status == "Completed" {
        status = "Running".into();
    }
    if obj.pointer("/metadata/deletionTimestamp").is_some() {
        status = "Terminating".into();
    }
    vec![
        name_cell(obj),
        Value::String(format!("{ready}/{total}")),
        Value::String(status),
        json!(restarts),
        age_cell(obj),
    ]
}

/// Column definitions and the cells of one object.
fn columns(t: &ResourceType) -> Vec<Value> {
    let name = col(
        "Name",
        "string",
        "name",
        "Name must be unique within a namespace.",
        0,
    );
    let age = col(
        "Age",
        "string",
        "",
        "CreationTimestamp is a timestamp representing the server time when this object was created.",
        0,
    );
    if t.custom {
        if t.printer_columns.is_empty() {
            return vec![name, age];
        }
        let mut v = vec![name];
        v.extend(
            t.printer_columns
                .iter()
                .map(|c| col(&c.name, &c.type_, &c.format, &c.description, c.priority)),
        );
        return v;
    }
    match (t.group.as_str(), t.plural.as_str()) {
        ("", "pods") => vec![
            name,
            col(
                "Ready",
                "string",
                "",
                "The aggregate readiness state of this pod for accepting traffic.",
                0,
            ),
            col(
                "Status",
                "string",
                "",
                "The aggregate status of the containers in this pod.",
                0,
            ),
            col(
                "Restarts",
                "string",
                "",
                "The number of times the containers in this pod have been restarted.",
                0,
            ),
            age,
        ],
        ("", "namespaces") => vec![
            name,
            col("Status", "string", "", "The status of the namespace", 0),
            age,
        ],
        _ => vec![name, age],
    }
}

fn cells(t: &ResourceType, obj: &Value) -> Vec<Value> {
    if t.custom {
        if t.printer_columns.is_empty() {
            return vec![name_cell(obj), age_cell(obj)];
        }
        let mut v = vec![name_cell(obj)];
        v.extend(t.printer_columns.iter().map(|c| custom_cell(obj, c)));
        return v;
    }
    match (t.group.as_str(), t.plural.as_str()) {
        ("", "pods") => pod_cells(obj),
        ("", "namespaces") => vec![
            name_cell(obj),
            obj.pointer("/status/phase").cloned().unwrap_or(Value::Null),
            age_cell(obj),
        ],
        _ => vec![name_cell(obj), age_cell(obj)],
    }
}

fn row_object(obj: &Value, include: &str) -> Value {
    match include {
        "None" => Value::Null,
        "Object" => obj.clone(),
        _ => json!({
            "kind": "PartialObjectMetadata",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": obj.get("metadata").cloned().unwrap_or(json!({})),
        }),
    }
}

/// A Table of `objs`.
pub fn table(t: &ResourceType, objs: &[Value], rv: u64, include: &str) -> Value {
    let rows: Vec<Value> = objs
        .iter()
        .map(|o| json!({"cells": cells(t, o), "object": row_object(o, include)}))
        .collect();
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": rv.to_string()},
        "columnDefinitions": columns(t),
        "rows": rows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsonpath_subset() {
        let o = json!({"status": {"phase": "Running", "vars": [{"name": "a"}, {"name": "b"}]},
                       "metadata": {"labels": {"app.kubernetes.io/name": "x"}}});
        assert_eq!(jsonpath(&o, ".status.phase"), vec![json!("Running")]);
        assert_eq!(
            jsonpath(&o, ".status.vars[*].name"),
            vec![json!("a"), json!("b")]
        );
        assert_eq!(jsonpath(&o, ".status.vars[1].name"), vec![json!("b")]);
        assert_eq!(
            jsonpath(&o, ".metadata.labels['app.kubernetes.io/name']"),
            vec![json!("x")]
        );
        assert_eq!(
            jsonpath(&o, ".metadata.labels.app\\.kubernetes\\.io/name"),
            vec![json!("x")]
        );
        assert!(jsonpath(&o, ".spec.none").is_empty());
    }
}
