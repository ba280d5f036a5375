//! YAML documents as trees that remember where every node came from.
//!
//! Istio users debug config by file and line, so nothing here loses positions: the parser's
//! marked events build a [`Node`] tree, and [`Node`] is itself a serde `Deserializer`, so typed
//! resources are decoded straight from it with errors that carry the offending node's position.
//! Decoding is lenient where Kubernetes tooling is (a plain scalar `2` is accepted where a string
//! is expected, `null` where a list or map is) and strict everywhere else.
//!
//! This module must not know about Istio kinds; it only reads YAML.

use std::fmt;

use serde::de::{self, DeserializeSeed, Error as _, IntoDeserializer, Visitor};
use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

/// A 1-based line and column in a source file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct Pos {
    pub line: u32,
    pub column: u32,
}

impl fmt::Display for Pos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}

impl From<Marker> for Pos {
    fn from(m: Marker) -> Self {
        // yaml-rust2 markers: line is 1-based, column 0-based.
        Pos { line: m.line() as u32, column: m.col() as u32 + 1 }
    }
}

/// One YAML node with its position.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub pos: Pos,
    pub value: Value,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Null,
    /// A scalar with its text; `plain` scalars may be numbers or booleans, quoted ones never are.
    Scalar {
        text: String,
        plain: bool,
    },
    Seq(Vec<Node>),
    Map(Vec<(Node, Node)>),
}

/// A path segment inside a document, used to point findings at nodes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Seg {
    Key(String),
    Index(usize),
}

impl From<&str> for Seg {
    fn from(s: &str) -> Self {
        Seg::Key(s.to_string())
    }
}

impl From<usize> for Seg {
    fn from(i: usize) -> Self {
        Seg::Index(i)
    }
}

/// Renders a path as `spec.http[0].route[1].weight`.
pub fn path_string(path: &[Seg]) -> String {
    let mut out = String::new();
    for seg in path {
        match seg {
            Seg::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(k);
            }
            Seg::Index(i) => {
                out.push_str(&format!("[{i}]"));
            }
        }
    }
    out
}

/// A YAML syntax error with its position.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{message}")]
pub struct SyntaxError {
    pub pos: Pos,
    pub message: String,
}

/// Parses every document of a multi-document YAML stream. Empty documents (a lone `---`) are
/// skipped.
pub fn parse_documents(text: &str) -> Result<Vec<Node>, SyntaxError> {
    let mut builder = Builder::default();
    let mut parser = Parser::new_from_str(text);
    parser
        .load(&mut builder, true)
        .map_err(|e| SyntaxError { pos: Pos::from(*e.marker()), message: e.info().to_string() })?;
    if let Some(err) = builder.error {
        return Err(err);
    }
    Ok(builder.docs.into_iter().filter(|d| d.value != Value::Null).collect())
}

#[derive(Default)]
struct Builder {
    docs: Vec<Node>,
    stack: Vec<(Node, Option<usize>)>,
    /// A mapping key waiting for its value, per open mapping (by stack depth).
    pending_keys: Vec<Option<Node>>,
    anchors: std::collections::HashMap<usize, Node>,
    error: Option<SyntaxError>,
}

impl Builder {
    fn push_value(&mut self, node: Node, anchor: usize) {
        if anchor > 0 {
            self.anchors.insert(anchor, node.clone());
        }
        let depth = self.stack.len().saturating_sub(1);
        match self.stack.last_mut() {
            None => self.docs.push(node),
            Some((parent, _)) => match &mut parent.value {
                Value::Seq(items) => items.push(node),
                Value::Map(entries) => match self.pending_keys[depth].take() {
                    None => self.pending_keys[depth] = Some(node),
                    Some(key) => {
                        if let Some((dup, _)) = entries.iter().find(|(k, _)| k.value == key.value) {
                            if self.error.is_none() {
                                self.error = Some(SyntaxError {
                                    pos: key.pos,
                                    message: format!(
                                        "duplicate key {} (first at line {})",
                                        key.describe(),
                                        dup.pos.line
                                    ),
                                });
                            }
                        }
                        entries.push((key, node));
                    }
                },
                _ => {}
            },
        }
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        let pos = Pos::from(mark);
        match ev {
            Event::Scalar(text, style, anchor, tag) => {
                let plain = style == TScalarStyle::Plain;
                let is_str_tag = tag.as_ref().is_some_and(|t| t.suffix == "str");
                let value = if plain && !is_str_tag && matches!(text.as_str(), "" | "~" | "null" | "Null" | "NULL") {
                    Value::Null
                } else {
                    Value::Scalar { text, plain: plain && !is_str_tag }
                };
                self.push_value(Node { pos, value }, anchor);
            }
            Event::SequenceStart(anchor, _) => {
                self.stack.push((Node { pos, value: Value::Seq(Vec::new()) }, Some(anchor)));
                self.pending_keys.push(None);
            }
            Event::MappingStart(anchor, _) => {
                self.stack.push((Node { pos, value: Value::Map(Vec::new()) }, Some(anchor)));
                self.pending_keys.push(None);
            }
            Event::SequenceEnd | Event::MappingEnd => {
                self.pending_keys.pop();
                if let Some((node, anchor)) = self.stack.pop() {
                    self.push_value(node, anchor.unwrap_or(0));
                }
            }
            Event::Alias(id) => {
                let node = match self.anchors.get(&id) {
                    Some(n) => Node { pos, value: n.value.clone() },
                    None => Node { pos, value: Value::Null },
                };
                self.push_value(node, 0);
            }
            Event::DocumentStart | Event::DocumentEnd | Event::StreamStart | Event::StreamEnd | Event::Nothing => {}
        }
    }
}

// === impl Node ===

impl Node {
    /// A short description for messages: `"text"`, `a list`, `a map`, `null`.
    pub fn describe(&self) -> String {
        match &self.value {
            Value::Null => "null".into(),
            Value::Scalar { text, .. } => format!("{text:?}"),
            Value::Seq(_) => "a list".into(),
            Value::Map(_) => "a map".into(),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match &self.value {
            Value::Scalar { text, .. } => Some(text),
            _ => None,
        }
    }

    /// The value under `key` if this node is a map.
    /// A sequence's items (none for any other node).
    pub fn items(&self) -> &[Node] {
        match &self.value {
            Value::Seq(items) => items,
            _ => &[],
        }
    }

    pub fn get(&self, key: &str) -> Option<&Node> {
        match &self.value {
            Value::Map(entries) => entries.iter().find(|(k, _)| k.as_str() == Some(key)).map(|(_, v)| v),
            _ => None,
        }
    }

    /// The key node (not the value) under `key`, whose position is where the field is written.
    pub fn get_key(&self, key: &str) -> Option<&Node> {
        match &self.value {
            Value::Map(entries) => entries.iter().find(|(k, _)| k.as_str() == Some(key)).map(|(k, _)| k),
            _ => None,
        }
    }

    /// The deepest node along `path`, and whether the whole path was found. Keys resolve to the
    /// key node for the last segment, so a finding points at the field name.
    pub fn locate(&self, path: &[Seg]) -> (Pos, bool) {
        let mut node = self;
        for (i, seg) in path.iter().enumerate() {
            let last = i + 1 == path.len();
            let next = match (seg, &node.value) {
                (Seg::Key(k), Value::Map(_)) => {
                    if last {
                        node.get_key(k)
                    } else {
                        node.get(k)
                    }
                }
                (Seg::Index(idx), Value::Seq(items)) => items.get(*idx),
                _ => None,
            };
            match next {
                Some(n) => node = n,
                None => return (node.pos, false),
            }
        }
        (node.pos, true)
    }

    /// The path from this node to the node at `pos`, if one is there (used to name the field of
    /// a decoding error).
    pub fn path_to(&self, pos: Pos) -> Option<Vec<Seg>> {
        if self.pos == pos {
            return Some(Vec::new());
        }
        match &self.value {
            Value::Seq(items) => items.iter().enumerate().find_map(|(i, n)| {
                n.path_to(pos).map(|mut p| {
                    p.insert(0, Seg::Index(i));
                    p
                })
            }),
            Value::Map(entries) => entries.iter().find_map(|(k, v)| {
                let key = Seg::Key(k.as_str().unwrap_or_default().to_string());
                if k.pos == pos {
                    return Some(vec![key]);
                }
                v.path_to(pos).map(|mut p| {
                    p.insert(0, key);
                    p
                })
            }),
            _ => None,
        }
    }

    fn invalid_type<E: de::Error>(&self, exp: &dyn de::Expected) -> E {
        let unexp = match &self.value {
            Value::Null => de::Unexpected::Unit,
            Value::Scalar { text, .. } => de::Unexpected::Str(text),
            Value::Seq(_) => de::Unexpected::Seq,
            Value::Map(_) => de::Unexpected::Map,
        };
        E::invalid_type(unexp, exp)
    }
}

/// A decoding error, positioned at the node that caused it.
#[derive(Clone, Debug, PartialEq)]
pub struct DeError {
    pub message: String,
    pub pos: Option<Pos>,
}

impl fmt::Display for DeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for DeError {}

impl de::Error for DeError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        DeError { message: msg.to_string(), pos: None }
    }
}

impl DeError {
    fn at(mut self, pos: Pos) -> Self {
        self.pos.get_or_insert(pos);
        self
    }
}

fn parse_int<T: std::str::FromStr>(text: &str) -> Option<T> {
    let t = text.trim();
    let t = t.strip_prefix('+').unwrap_or(t);
    if let Some(hex) = t.strip_prefix("0x") {
        return i128::from_str_radix(hex, 16).ok().and_then(|v| v.to_string().parse().ok());
    }
    t.replace('_', "").parse().ok()
}

macro_rules! deserialize_int {
    ($($name:ident => $visit:ident : $ty:ty),*) => {$(
        fn $name<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
            let r = match &self.value {
                Value::Scalar { text, .. } => match parse_int::<$ty>(text) {
                    Some(v) => visitor.$visit(v),
                    None => Err(DeError::custom(format!(
                        "expected an integer in the range of {}, found {}", stringify!($ty), self.describe()
                    ))),
                },
                _ => Err(self.invalid_type(&visitor)),
            };
            r.map_err(|e: DeError| e.at(self.pos))
        }
    )*};
}

impl<'de> de::Deserializer<'de> for &'de Node {
    type Error = DeError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let r = match &self.value {
            Value::Null => visitor.visit_unit(),
            Value::Scalar { text, plain: true } => {
                if let Some(b) = parse_bool(text) {
                    visitor.visit_bool(b)
                } else if let Ok(i) = text.parse::<i64>() {
                    visitor.visit_i64(i)
                } else if let Ok(f) = text.parse::<f64>() {
                    if text.chars().any(|c| c.is_ascii_digit()) {
                        visitor.visit_f64(f)
                    } else {
                        visitor.visit_str(text)
                    }
                } else {
                    visitor.visit_str(text)
                }
            }
            Value::Scalar { text, plain: false } => visitor.visit_str(text),
            Value::Seq(items) => visitor.visit_seq(SeqAccess { iter: items.iter() }),
            Value::Map(entries) => visitor.visit_map(MapAccess { iter: entries.iter(), value: None }),
        };
        r.map_err(|e| e.at(self.pos))
    }

    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let r = match &self.value {
            Value::Scalar { text, .. } => match parse_bool(text) {
                Some(b) => visitor.visit_bool(b),
                None => Err(DeError::custom(format!("expected true or false, found {}", self.describe()))),
            },
            _ => Err(self.invalid_type(&visitor)),
        };
        r.map_err(|e| e.at(self.pos))
    }

    deserialize_int!(
        deserialize_i8 => visit_i8: i8, deserialize_i16 => visit_i16: i16,
        deserialize_i32 => visit_i32: i32, deserialize_i64 => visit_i64: i64,
        deserialize_u8 => visit_u8: u8, deserialize_u16 => visit_u16: u16,
        deserialize_u32 => visit_u32: u32, deserialize_u64 => visit_u64: u64
    );

    fn deserialize_f32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_f64(visitor)
    }

    fn deserialize_f64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let r = match &self.value {
            Value::Scalar { text, .. } => match text.trim().parse::<f64>() {
                Ok(v) => visitor.visit_f64(v),
                Err(_) => Err(DeError::custom(format!("expected a number, found {}", self.describe()))),
            },
            _ => Err(self.invalid_type(&visitor)),
        };
        r.map_err(|e| e.at(self.pos))
    }

    fn deserialize_char<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let r = match &self.value {
            Value::Scalar { text, .. } => visitor.visit_str(text),
            _ => Err(self.invalid_type(&visitor)),
        };
        r.map_err(|e: DeError| e.at(self.pos))
    }

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_bytes<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_byte_buf<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match &self.value {
            Value::Null => visitor.visit_none(),
            _ => visitor.visit_some(self),
        }
    }

    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match &self.value {
            Value::Null => visitor.visit_unit(),
            _ => Err(self.invalid_type::<DeError>(&visitor).at(self.pos)),
        }
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(self, _name: &'static str, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_unit(visitor)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(self, _name: &'static str, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        static EMPTY: Vec<Node> = Vec::new();
        let r = match &self.value {
            Value::Seq(items) => visitor.visit_seq(SeqAccess { iter: items.iter() }),
            Value::Null => visitor.visit_seq(SeqAccess { iter: EMPTY.iter() }),
            _ => Err(DeError::custom(format!("expected a list, found {}", self.describe()))),
        };
        r.map_err(|e| e.at(self.pos))
    }

    fn deserialize_tuple<V: Visitor<'de>>(self, _len: usize, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        static EMPTY: Vec<(Node, Node)> = Vec::new();
        let r = match &self.value {
            Value::Map(entries) => visitor.visit_map(MapAccess { iter: entries.iter(), value: None }),
            Value::Null => visitor.visit_map(MapAccess { iter: EMPTY.iter(), value: None }),
            _ => Err(DeError::custom(format!("expected a map, found {}", self.describe()))),
        };
        r.map_err(|e| e.at(self.pos))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        self.deserialize_map(visitor)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        let r = match &self.value {
            Value::Scalar { text, .. } => {
                if variants.contains(&text.as_str()) {
                    visitor.visit_enum(text.as_str().into_deserializer())
                } else {
                    Err(DeError::custom(format!("unknown value {:?}, expected one of {}", text, variants.join(", "))))
                }
            }
            Value::Map(entries) if entries.len() == 1 => {
                visitor.visit_enum(EnumAccess { key: &entries[0].0, value: &entries[0].1 })
            }
            _ => Err(DeError::custom(format!("expected one of {}, found {}", variants.join(", "), self.describe()))),
        };
        r.map_err(|e| e.at(self.pos))
    }

    fn deserialize_identifier<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_unit()
    }
}

fn parse_bool(text: &str) -> Option<bool> {
    match text {
        "true" | "True" | "TRUE" => Some(true),
        "false" | "False" | "FALSE" => Some(false),
        _ => None,
    }
}

struct SeqAccess<'de> {
    iter: std::slice::Iter<'de, Node>,
}

impl<'de> de::SeqAccess<'de> for SeqAccess<'de> {
    type Error = DeError;

    fn next_element_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<Option<T::Value>, DeError> {
        match self.iter.next() {
            Some(node) => seed.deserialize(node).map(Some).map_err(|e| e.at(node.pos)),
            None => Ok(None),
        }
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.iter.len())
    }
}

struct MapAccess<'de> {
    iter: std::slice::Iter<'de, (Node, Node)>,
    value: Option<&'de Node>,
}

impl<'de> de::MapAccess<'de> for MapAccess<'de> {
    type Error = DeError;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, DeError> {
        match self.iter.next() {
            Some((k, v)) => {
                self.value = Some(v);
                seed.deserialize(k).map(Some).map_err(|e| e.at(k.pos))
            }
            None => Ok(None),
        }
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, DeError> {
        match self.value.take() {
            Some(v) => seed.deserialize(v).map_err(|e| e.at(v.pos)),
            None => Err(DeError::custom("value requested before key")),
        }
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.iter.len())
    }
}

struct EnumAccess<'de> {
    key: &'de Node,
    value: &'de Node,
}

impl<'de> de::EnumAccess<'de> for EnumAccess<'de> {
    type Error = DeError;
    type Variant = VariantAccess<'de>;

    fn variant_seed<V: DeserializeSeed<'de>>(self, seed: V) -> Result<(V::Value, Self::Variant), DeError> {
        let v = seed.deserialize(self.key)?;
        Ok((v, VariantAccess { value: self.value }))
    }
}

struct VariantAccess<'de> {
    value: &'de Node,
}

impl<'de> de::VariantAccess<'de> for VariantAccess<'de> {
    type Error = DeError;

    fn unit_variant(self) -> Result<(), DeError> {
        Ok(())
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, DeError> {
        seed.deserialize(self.value)
    }

    fn tuple_variant<V: Visitor<'de>>(self, _len: usize, visitor: V) -> Result<V::Value, DeError> {
        de::Deserializer::deserialize_seq(self.value, visitor)
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        de::Deserializer::deserialize_map(self.value, visitor)
    }
}

/// Decodes `node` into `T`, calling `unknown` with the path of every field `T` does not know.
pub fn decode<'de, T: serde::Deserialize<'de>>(
    node: &'de Node,
    mut unknown: impl FnMut(Vec<Seg>),
) -> Result<T, DeError> {
    serde_ignored::deserialize(node, |path| unknown(ignored_path(&path)))
}

fn ignored_path(path: &serde_ignored::Path<'_>) -> Vec<Seg> {
    fn walk(path: &serde_ignored::Path<'_>, out: &mut Vec<Seg>) {
        use serde_ignored::Path;
        match path {
            Path::Root => {}
            Path::Seq { parent, index } => {
                walk(parent, out);
                out.push(Seg::Index(*index));
            }
            Path::Map { parent, key } => {
                walk(parent, out);
                out.push(Seg::Key(key.clone()));
            }
            Path::Some { parent } | Path::NewtypeStruct { parent } | Path::NewtypeVariant { parent } => {
                walk(parent, out)
            }
        }
    }
    let mut out = Vec::new();
    walk(path, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    #[serde(rename_all = "camelCase")]
    struct T {
        name: String,
        #[serde(default)]
        port: Option<u16>,
        #[serde(default)]
        items: Vec<String>,
    }

    #[test]
    fn positions_and_multi_docs() {
        let docs = parse_documents("a: 1\n---\n\n---\nb:\n  - x\n  - y\n").expect("parse");
        assert_eq!(docs.len(), 2);
        let (pos, found) = docs[1].locate(&["b".into(), 1usize.into()]);
        assert!(found);
        assert_eq!(pos, Pos { line: 7, column: 5 });
        let (pos, _) = docs[1].locate(&["b".into()]);
        assert_eq!(pos, Pos { line: 5, column: 1 });
    }

    #[test]
    fn lenient_strings_and_unknown_fields() {
        let docs = parse_documents("name: 2\nitems:\nextra: 1\n").expect("parse");
        let mut unknown = Vec::new();
        let t: T = decode(&docs[0], |p| unknown.push(p)).expect("decode");
        assert_eq!(t.name, "2");
        assert_eq!(t.port, None);
        assert!(t.items.is_empty());
        assert_eq!(unknown, vec![vec![Seg::Key("extra".into())]]);
    }

    #[test]
    fn errors_carry_positions() {
        let docs = parse_documents("name: a\nport: 99999\n").expect("parse");
        let err = decode::<T>(&docs[0], |_| {}).expect_err("must fail");
        assert_eq!(err.pos, Some(Pos { line: 2, column: 7 }));
        let docs = parse_documents("port: 1\n").expect("parse");
        let err = decode::<T>(&docs[0], |_| {}).expect_err("must fail");
        assert!(err.message.contains("missing field `name`"), "{}", err.message);
    }

    #[test]
    fn syntax_errors_and_duplicate_keys() {
        let err = parse_documents("a: [1,\n").expect_err("must fail");
        assert!(err.pos.line >= 1);
        let err = parse_documents("a: 1\na: 2\n").expect_err("must fail");
        assert_eq!(err.pos.line, 2);
        assert!(err.message.contains("duplicate key"));
    }
}
