//! OTLP/JSON (`Content-Type: application/json`, as the JavaScript SDK's `otlp-http` exporters
//! and `curl` send it): read into the OTLP messages and written as the protobuf the stores read.
//!
//! The mapping is protobuf's JSON mapping with OTLP's two exceptions: trace and span ids are hex,
//! not base64, and enums are numbers. Senders differ, so this reads both key spellings
//! (`traceId` and `trace_id`), 64-bit integers as numbers or strings, and enums as numbers or
//! names; unknown keys are skipped, as OTLP asks. An id that is not hex, or a value of the
//! wrong type, is an error naming the field's path.

use prost::Message;
use serde_json::Value;
use trellis_telemetry::otlp;

/// A malformed export: where, and what is wrong there.
pub type Error = String;

/// An `ExportTraceServiceRequest` in OTLP/JSON, as protobuf.
pub fn traces(body: &[u8]) -> Result<Vec<u8>, Error> {
    let doc: Value = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    let mut req = otlp::ExportTraceServiceRequest::default();
    for (i, rs) in list(&doc, &["resourceSpans", "resource_spans"], "")?.iter().enumerate() {
        let at = format!("resourceSpans[{i}]");
        let mut out = otlp::ResourceSpans { resource: resource(rs, &at)?, ..Default::default() };
        for (j, ss) in list(rs, &["scopeSpans", "scope_spans"], &at)?.iter().enumerate() {
            let at = format!("{at}.scopeSpans[{j}]");
            let mut scope_spans = otlp::ScopeSpans { scope: scope(ss, &at)?, ..Default::default() };
            for (k, s) in list(ss, &["spans"], &at)?.iter().enumerate() {
                scope_spans.spans.push(span(s, &format!("{at}.spans[{k}]"))?);
            }
            out.scope_spans.push(scope_spans);
        }
        req.resource_spans.push(out);
    }
    Ok(req.encode_to_vec())
}

/// An `ExportLogsServiceRequest` in OTLP/JSON, as protobuf.
pub fn logs(body: &[u8]) -> Result<Vec<u8>, Error> {
    let doc: Value = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    let mut req = otlp::ExportLogsServiceRequest::default();
    for (i, rl) in list(&doc, &["resourceLogs", "resource_logs"], "")?.iter().enumerate() {
        let at = format!("resourceLogs[{i}]");
        let mut out = otlp::ResourceLogs { resource: resource(rl, &at)?, ..Default::default() };
        for (j, sl) in list(rl, &["scopeLogs", "scope_logs"], &at)?.iter().enumerate() {
            let at = format!("{at}.scopeLogs[{j}]");
            let mut scope_logs = otlp::ScopeLogs { scope: scope(sl, &at)?, ..Default::default() };
            for (k, r) in list(sl, &["logRecords", "log_records"], &at)?.iter().enumerate() {
                scope_logs.log_records.push(log_record(r, &format!("{at}.logRecords[{k}]"))?);
            }
            out.scope_logs.push(scope_logs);
        }
        req.resource_logs.push(out);
    }
    Ok(req.encode_to_vec())
}

fn span(v: &Value, at: &str) -> Result<otlp::Span, Error> {
    let status = match field(v, &["status"]) {
        Some(s) => Some(otlp::Status {
            message: string(s, &["message"], at)?,
            code: enumeration(s, &["code"], &format!("{at}.status"), |n| {
                otlp::status::StatusCode::from_str_name(n).map(|c| c as i32)
            })?,
        }),
        None => None,
    };
    Ok(otlp::Span {
        trace_id: hex_id(v, &["traceId", "trace_id"], 16, at)?,
        span_id: hex_id(v, &["spanId", "span_id"], 8, at)?,
        trace_state: string(v, &["traceState", "trace_state"], at)?,
        parent_span_id: hex_id(v, &["parentSpanId", "parent_span_id"], 8, at)?,
        name: string(v, &["name"], at)?,
        kind: enumeration(v, &["kind"], at, |n| otlp::span::SpanKind::from_str_name(n).map(|k| k as i32))?,
        start_time_unix_nano: uint(v, &["startTimeUnixNano", "start_time_unix_nano"], at)?,
        end_time_unix_nano: uint(v, &["endTimeUnixNano", "end_time_unix_nano"], at)?,
        attributes: attributes(v, at)?,
        dropped_attributes_count: uint(v, &["droppedAttributesCount", "dropped_attributes_count"], at)? as u32,
        status,
        flags: uint(v, &["flags"], at)? as u32,
    })
}

fn log_record(v: &Value, at: &str) -> Result<otlp::LogRecord, Error> {
    Ok(otlp::LogRecord {
        time_unix_nano: uint(v, &["timeUnixNano", "time_unix_nano"], at)?,
        observed_time_unix_nano: uint(v, &["observedTimeUnixNano", "observed_time_unix_nano"], at)?,
        severity_number: enumeration(v, &["severityNumber", "severity_number"], at, severity)?,
        severity_text: string(v, &["severityText", "severity_text"], at)?,
        body: field(v, &["body"]).map(|b| any_value(b, &format!("{at}.body"), 0)).transpose()?,
        attributes: attributes(v, at)?,
        dropped_attributes_count: uint(v, &["droppedAttributesCount", "dropped_attributes_count"], at)? as u32,
        flags: uint(v, &["flags"], at)? as u32,
        trace_id: hex_id(v, &["traceId", "trace_id"], 16, at)?,
        span_id: hex_id(v, &["spanId", "span_id"], 8, at)?,
        event_name: string(v, &["eventName", "event_name"], at)?,
    })
}

/// `SEVERITY_NUMBER_INFO` and the like, as numbers (1-24, by OTLP's table).
fn severity(name: &str) -> Option<i32> {
    const NAMES: [&str; 6] = ["TRACE", "DEBUG", "INFO", "WARN", "ERROR", "FATAL"];
    let rest = name.strip_prefix("SEVERITY_NUMBER_")?;
    if rest == "UNSPECIFIED" {
        return Some(0);
    }
    let level = rest.trim_end_matches(|c: char| c.is_ascii_digit());
    let step: i32 = match &rest[level.len()..] {
        "" => 1,
        n => n.parse().ok().filter(|n| (2..=4).contains(n))?,
    };
    let base = NAMES.iter().position(|n| *n == level)? as i32;
    Some(base * 4 + step)
}

fn resource(v: &Value, at: &str) -> Result<Option<otlp::Resource>, Error> {
    field(v, &["resource"])
        .map(|r| {
            let at = format!("{at}.resource");
            Ok(otlp::Resource {
                attributes: attributes(r, &at)?,
                dropped_attributes_count: uint(r, &["droppedAttributesCount", "dropped_attributes_count"], &at)? as u32,
            })
        })
        .transpose()
}

fn scope(v: &Value, at: &str) -> Result<Option<otlp::InstrumentationScope>, Error> {
    field(v, &["scope"])
        .map(|s| {
            let at = format!("{at}.scope");
            Ok(otlp::InstrumentationScope {
                name: string(s, &["name"], &at)?,
                version: string(s, &["version"], &at)?,
                attributes: attributes(s, &at)?,
                dropped_attributes_count: uint(s, &["droppedAttributesCount", "dropped_attributes_count"], &at)? as u32,
            })
        })
        .transpose()
}

/// How deep arrays and maps may nest in an attribute's value.
const MAX_DEPTH: usize = 32;

fn attributes(v: &Value, at: &str) -> Result<Vec<otlp::KeyValue>, Error> {
    key_values(list(v, &["attributes"], at)?, &format!("{at}.attributes"), 0)
}

fn key_values(items: &[Value], at: &str, depth: usize) -> Result<Vec<otlp::KeyValue>, Error> {
    items
        .iter()
        .enumerate()
        .map(|(i, kv)| {
            let at = format!("{at}[{i}]");
            Ok(otlp::KeyValue {
                key: string(kv, &["key"], &at)?,
                value: field(kv, &["value"]).map(|v| any_value(v, &format!("{at}.value"), depth)).transpose()?,
            })
        })
        .collect()
}

fn any_value(v: &Value, at: &str, depth: usize) -> Result<otlp::AnyValue, Error> {
    use otlp::any_value::Value as V;
    if depth > MAX_DEPTH {
        return Err(format!("{at}: nested deeper than {MAX_DEPTH} levels"));
    }
    let Some(obj) = v.as_object() else {
        return Err(format!("{at}: an AnyValue is an object (such as {{\"stringValue\": \"x\"}})"));
    };
    let value = if let Some(s) = field(v, &["stringValue", "string_value"]) {
        Some(V::StringValue(s.as_str().ok_or_else(|| format!("{at}.stringValue: not a string"))?.to_string()))
    } else if let Some(b) = field(v, &["boolValue", "bool_value"]) {
        Some(V::BoolValue(b.as_bool().ok_or_else(|| format!("{at}.boolValue: not a boolean"))?))
    } else if field(v, &["intValue", "int_value"]).is_some() {
        Some(V::IntValue(int(v, &["intValue", "int_value"], at)?))
    } else if let Some(d) = field(v, &["doubleValue", "double_value"]) {
        let n = match d {
            Value::Number(n) => n.as_f64(),
            Value::String(s) => match s.as_str() {
                "NaN" => Some(f64::NAN),
                "Infinity" => Some(f64::INFINITY),
                "-Infinity" => Some(f64::NEG_INFINITY),
                s => s.parse().ok(),
            },
            _ => None,
        };
        Some(V::DoubleValue(n.ok_or_else(|| format!("{at}.doubleValue: not a number"))?))
    } else if let Some(a) = field(v, &["arrayValue", "array_value"]) {
        let at = format!("{at}.arrayValue");
        let values = list(a, &["values"], &at)?
            .iter()
            .enumerate()
            .map(|(i, x)| any_value(x, &format!("{at}.values[{i}]"), depth + 1))
            .collect::<Result<_, _>>()?;
        Some(V::ArrayValue(otlp::ArrayValue { values }))
    } else if let Some(m) = field(v, &["kvlistValue", "kvlist_value"]) {
        let at = format!("{at}.kvlistValue");
        let values = key_values(list(m, &["values"], &at)?, &format!("{at}.values"), depth + 1)?;
        Some(V::KvlistValue(otlp::KeyValueList { values }))
    } else if let Some(b) = field(v, &["bytesValue", "bytes_value"]) {
        use base64::Engine as _;
        let s = b.as_str().ok_or_else(|| format!("{at}.bytesValue: not a string"))?;
        Some(V::BytesValue(
            base64::engine::general_purpose::STANDARD
                .decode(s)
                .map_err(|e| format!("{at}.bytesValue: not base64: {e}"))?,
        ))
    } else if obj.is_empty() {
        None
    } else {
        let keys: Vec<_> = obj.keys().map(String::as_str).collect();
        return Err(format!("{at}: no value of a known type (keys: {})", keys.join(", ")));
    };
    Ok(otlp::AnyValue { value })
}

fn field<'a>(v: &'a Value, names: &[&str]) -> Option<&'a Value> {
    names.iter().find_map(|n| v.get(n)).filter(|v| !v.is_null())
}

fn list<'a>(v: &'a Value, names: &[&str], at: &str) -> Result<&'a [Value], Error> {
    match field(v, names) {
        None => Ok(&[]),
        Some(Value::Array(a)) => Ok(a),
        Some(_) => Err(format!("{}: not an array", path(at, names[0]))),
    }
}

fn string(v: &Value, names: &[&str], at: &str) -> Result<String, Error> {
    match field(v, names) {
        None => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(format!("{}: not a string", path(at, names[0]))),
    }
}

/// An unsigned 64-bit integer: a number or a decimal string.
fn uint(v: &Value, names: &[&str], at: &str) -> Result<u64, Error> {
    match field(v, names) {
        None => Some(0),
        Some(Value::Number(n)) => n.as_u64(),
        Some(Value::String(s)) => s.parse().ok(),
        Some(_) => None,
    }
    .ok_or_else(|| format!("{}: not an unsigned integer", path(at, names[0])))
}

fn int(v: &Value, names: &[&str], at: &str) -> Result<i64, Error> {
    match field(v, names) {
        None => Some(0),
        Some(Value::Number(n)) => n.as_i64(),
        Some(Value::String(s)) => s.parse().ok(),
        Some(_) => None,
    }
    .ok_or_else(|| format!("{}: not an integer", path(at, names[0])))
}

/// An enum: its number, or its name as the proto spells it.
fn enumeration(v: &Value, names: &[&str], at: &str, by_name: impl Fn(&str) -> Option<i32>) -> Result<i32, Error> {
    match field(v, names) {
        None => Some(0),
        Some(Value::Number(n)) => n.as_i64().and_then(|n| i32::try_from(n).ok()),
        Some(Value::String(s)) => by_name(s),
        Some(_) => None,
    }
    .ok_or_else(|| format!("{}: not one of the enum's numbers or names", path(at, names[0])))
}

/// A trace or span id: `len` bytes as hex (OTLP/JSON's one departure from base64 for bytes);
/// empty when absent.
fn hex_id(v: &Value, names: &[&str], len: usize, at: &str) -> Result<Vec<u8>, Error> {
    let s = string(v, names, at)?;
    if s.is_empty() {
        return Ok(Vec::new());
    }
    let bad = || format!("{}: not {len} bytes of hex ({s:?})", path(at, names[0]));
    if s.len() != len * 2 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad());
    }
    (0..len).map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| bad())).collect()
}

fn path(at: &str, name: &str) -> String {
    if at.is_empty() {
        name.to_string()
    } else {
        format!("{at}.{name}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The trace example of the OTLP specification's repository (opentelemetry-proto
    /// `examples/trace.json`), in its shape.
    const TRACE: &str = r#"{
      "resourceSpans": [{
        "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "my.service"}}]},
        "scopeSpans": [{
          "scope": {"name": "my.library", "version": "1.0.0",
                    "attributes": [{"key": "my.scope.attribute", "value": {"stringValue": "some scope attribute"}}]},
          "spans": [{
            "traceId": "5B8EFFF798038103D269B633813FC60C",
            "spanId": "EEE19B7EC3C1B174",
            "parentSpanId": "EEE19B7EC3C1B173",
            "name": "I'm a server span",
            "startTimeUnixNano": "1544712660000000000",
            "endTimeUnixNano": 1544712661000000000,
            "kind": 2,
            "attributes": [
              {"key": "my.span.attr", "value": {"stringValue": "some value"}},
              {"key": "count", "value": {"intValue": "42"}},
              {"key": "ratio", "value": {"doubleValue": 0.5}},
              {"key": "ok", "value": {"boolValue": true}},
              {"key": "list", "value": {"arrayValue": {"values": [{"intValue": 1}, {"stringValue": "two"}]}}},
              {"key": "map", "value": {"kvlistValue": {"values": [{"key": "k", "value": {"bytesValue": "AQI="}}]}}}
            ],
            "status": {"code": "STATUS_CODE_ERROR", "message": "boom"}
          }]
        }]
      }]
    }"#;

    #[test]
    fn the_specifications_example_reads_as_its_protobuf() {
        let bytes = traces(TRACE.as_bytes()).expect("valid");
        let req = otlp::ExportTraceServiceRequest::decode(bytes.as_slice()).expect("protobuf");
        let rs = &req.resource_spans[0];
        let service = &rs.resource.as_ref().expect("resource").attributes[0];
        assert_eq!(service.key, "service.name");
        let s = &rs.scope_spans[0].spans[0];
        assert_eq!(rs.scope_spans[0].scope.as_ref().map(|s| s.name.as_str()), Some("my.library"));
        assert_eq!(
            s.trace_id,
            [0x5b, 0x8e, 0xff, 0xf7, 0x98, 0x03, 0x81, 0x03, 0xd2, 0x69, 0xb6, 0x33, 0x81, 0x3f, 0xc6, 0x0c]
        );
        assert_eq!(s.span_id, [0xee, 0xe1, 0x9b, 0x7e, 0xc3, 0xc1, 0xb1, 0x74]);
        assert_eq!(s.parent_span_id[7], 0x73);
        assert_eq!((s.start_time_unix_nano, s.end_time_unix_nano), (1544712660000000000, 1544712661000000000));
        assert_eq!(s.kind, otlp::span::SpanKind::Server as i32);
        assert_eq!(s.status.as_ref().map(|s| (s.code, s.message.as_str())), Some((2, "boom")));
        use otlp::any_value::Value as V;
        let values: Vec<_> = s.attributes.iter().map(|kv| kv.value.as_ref().and_then(|v| v.value.clone())).collect();
        assert_eq!(values[1], Some(V::IntValue(42)));
        assert_eq!(values[2], Some(V::DoubleValue(0.5)));
        assert_eq!(values[3], Some(V::BoolValue(true)));
        let Some(V::ArrayValue(a)) = &values[4] else { panic!("array: {:?}", values[4]) };
        assert_eq!(a.values[0].value, Some(V::IntValue(1)));
        let Some(V::KvlistValue(m)) = &values[5] else { panic!("map: {:?}", values[5]) };
        assert_eq!(m.values[0].value.as_ref().and_then(|v| v.value.clone()), Some(V::BytesValue(vec![1, 2])));
    }

    #[test]
    fn snake_case_keys_and_enum_names_read_too() {
        let body = r#"{"resource_logs": [{"scope_logs": [{"log_records": [{
            "time_unix_nano": 7, "severity_number": "SEVERITY_NUMBER_WARN2", "body": {"string_value": "a line"},
            "trace_id": "0102030405060708090a0b0c0d0e0f10", "span_id": "0102030405060708"}]}]}]}"#;
        let req =
            otlp::ExportLogsServiceRequest::decode(logs(body.as_bytes()).expect("valid").as_slice()).expect("protobuf");
        let r = &req.resource_logs[0].scope_logs[0].log_records[0];
        assert_eq!((r.time_unix_nano, r.severity_number), (7, 14));
        assert_eq!(r.trace_id[15], 0x10);
        assert_eq!(
            r.body.as_ref().and_then(|b| b.value.clone()),
            Some(otlp::any_value::Value::StringValue("a line".into()))
        );
        assert_eq!(severity("SEVERITY_NUMBER_TRACE"), Some(1));
        assert_eq!(severity("SEVERITY_NUMBER_FATAL4"), Some(24));
        assert_eq!(severity("SEVERITY_NUMBER_INFO5"), None);
    }

    #[test]
    fn errors_name_the_field() {
        let bad_id = TRACE.replace("EEE19B7EC3C1B174", "EEE19B7EC3C1B1");
        let e = traces(bad_id.as_bytes()).expect_err("short id");
        assert!(e.starts_with("resourceSpans[0].scopeSpans[0].spans[0].spanId: not 8 bytes of hex"), "{e}");
        let bad_int = TRACE.replace(r#""intValue": "42""#, r#""intValue": "forty""#);
        let e = traces(bad_int.as_bytes()).expect_err("not an integer");
        assert!(
            e.starts_with("resourceSpans[0].scopeSpans[0].spans[0].attributes[1].value.intValue: not an integer"),
            "{e}"
        );
        assert!(traces(b"{\"resourceSpans\": 3}").expect_err("not a list").starts_with("resourceSpans: not an array"));
        assert!(traces(b"[1").expect_err("not JSON").starts_with("not JSON"));
        let deep = format!("{}{{\"intValue\": 1}}{}", "{\"arrayValue\": {\"values\": [".repeat(35), "]}}".repeat(35));
        let nested = TRACE.replace(r#"{"intValue": "42"}"#, &deep);
        let e = traces(nested.as_bytes()).expect_err("too deep");
        assert!(e.contains("nested deeper than 32 levels"), "{e}");
    }
}
