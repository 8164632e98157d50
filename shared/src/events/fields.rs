//! A request body's fields, read in one pass over the bytes: the envelope
//! attributes and the `data` members the rules look at, each kept as the
//! JSON value it was; everything else is checked as JSON (as a whole `Value` would be) and
//! dropped.
//!
//! Reading the body into a whole `serde_json::Value` first built a map with
//! an owned key for every member and a string for every attribute only
//! compared and dropped: a tenth of the worker's instructions per mail went
//! to decoding (docs/performance.md). What the rules see is unchanged: each
//! field's value, or its absence; a key given twice counts with its last
//! value, as it did in the map; a body or `data` that is not an object is
//! told apart from one that is.

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

/// A JSON value that is an object, read into `T`, or something else.
pub(super) enum ObjectOr<T> {
    /// An object: its members of interest.
    Object(T),
    /// Any other JSON value (`null` included).
    Other,
}

/// The envelope attributes a request's rules read.
#[derive(Default)]
pub(super) struct Envelope {
    pub id: Option<Value>,
    pub specversion: Option<Value>,
    pub source: Option<Value>,
    pub ty: Option<Value>,
    pub time: Option<Value>,
    pub traceparent: Option<Value>,
    pub datacontenttype: Option<Value>,
    pub data: Option<ObjectOr<DataFields>>,
}

/// The members of `data` a request's rules read.
#[derive(Default)]
pub(super) struct DataFields {
    pub user_id: Option<Value>,
    pub email: Option<Value>,
    pub name: Option<Value>,
    pub locale: Option<Value>,
    pub purpose: Option<Value>,
    pub return_url: Option<Value>,
    pub context: Option<Value>,
}

/// Reads `body`: `Ok(Other)` when it is JSON but not an object.
pub(super) fn read(body: &[u8]) -> Result<ObjectOr<Envelope>, serde_json::Error> {
    serde_json::from_slice(body)
}

/// An object's members, taken one key at a time.
trait Members: Default {
    /// The field the value of `key` is kept in, if a rule reads it.
    fn slot(&mut self, key: &str) -> Option<&mut Option<Value>>;

    /// Reads the value of `key` into its field, or reads it through.
    fn member<'de, A: MapAccess<'de>>(&mut self, key: &str, map: &mut A) -> Result<(), A::Error> {
        keep(self.slot(key), map)
    }
}

/// The next value of `map`, into `slot`, or read through when there is none.
fn keep<'de, A: MapAccess<'de>>(
    slot: Option<&mut Option<Value>>,
    map: &mut A,
) -> Result<(), A::Error> {
    match slot {
        Some(slot) => *slot = Some(map.next_value()?),
        None => {
            map.next_value::<Skip>()?;
        }
    }
    Ok(())
}

impl Members for Envelope {
    fn slot(&mut self, key: &str) -> Option<&mut Option<Value>> {
        Some(match key {
            "id" => &mut self.id,
            "specversion" => &mut self.specversion,
            "source" => &mut self.source,
            "type" => &mut self.ty,
            "time" => &mut self.time,
            "traceparent" => &mut self.traceparent,
            "datacontenttype" => &mut self.datacontenttype,
            _ => return None,
        })
    }

    fn member<'de, A: MapAccess<'de>>(&mut self, key: &str, map: &mut A) -> Result<(), A::Error> {
        if key == "data" {
            self.data = Some(map.next_value()?);
            return Ok(());
        }
        keep(self.slot(key), map)
    }
}

impl Members for DataFields {
    fn slot(&mut self, key: &str) -> Option<&mut Option<Value>> {
        Some(match key {
            "user_id" => &mut self.user_id,
            "email" => &mut self.email,
            "name" => &mut self.name,
            "locale" => &mut self.locale,
            "purpose" => &mut self.purpose,
            "return_url" => &mut self.return_url,
            "context" => &mut self.context,
            _ => return None,
        })
    }
}

/// No member kept: an object read only to be checked.
#[derive(Default)]
struct NoMembers;

impl Members for NoMembers {
    fn slot(&mut self, _: &str) -> Option<&mut Option<Value>> {
        None
    }
}

/// A value no rule reads, read through and dropped. Not serde's
/// `IgnoredAny`: serde_json skips that without checking it (strings not for
/// UTF-8 or lone surrogates, numbers not for range, nesting not for depth),
/// so a body the whole-tree reader refused would pass. Read as any value (an
/// object whose members are all read through in turn), it gets every check a
/// `Value` got, and allocates nothing but the rare escaped key.
type Skip = ObjectOr<NoMembers>;

impl<'de, T: Members> Deserialize<'de> for ObjectOr<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ObjectOrVisitor(PhantomData))
    }
}

struct ObjectOrVisitor<T>(PhantomData<T>);

impl<'de, T: Members> Visitor<'de> for ObjectOrVisitor<T> {
    type Value = ObjectOr<T>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut members = T::default();
        while let Some(Key(key)) = map.next_key()? {
            members.member(&key, &mut map)?;
        }
        Ok(ObjectOr::Object(members))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<Skip>()?.is_some() {}
        Ok(ObjectOr::Other)
    }

    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(ObjectOr::Other)
    }

    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(ObjectOr::Other)
    }

    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(ObjectOr::Other)
    }

    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(ObjectOr::Other)
    }

    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Ok(ObjectOr::Other)
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(ObjectOr::Other)
    }

    fn visit_none<E>(self) -> Result<Self::Value, E> {
        Ok(ObjectOr::Other)
    }
}

/// A member's key, borrowed from the body unless it had escapes.
struct Key<'de>(Cow<'de, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a member name")
            }

            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Borrowed(v)))
            }

            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
        }
        deserializer.deserialize_str(KeyVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope(body: &str) -> Envelope {
        match read(body.as_bytes()) {
            Ok(ObjectOr::Object(e)) => e,
            Ok(ObjectOr::Other) => panic!("read {body} as not an object"),
            Err(e) => panic!("{body}: {e}"),
        }
    }

    #[test]
    fn a_key_given_twice_counts_with_its_last_value_as_in_a_map() {
        let e = envelope(r#"{"id":"a","id":"b","data":{"email":1,"email":"x@example.com"}}"#);
        assert_eq!(e.id, Some(Value::from("b")));
        let Some(ObjectOr::Object(data)) = e.data else {
            panic!("data is an object")
        };
        assert_eq!(data.email, Some(Value::from("x@example.com")));
    }

    #[test]
    fn escaped_keys_and_unknown_members_are_read_like_any_other() {
        let e = envelope(r#"{"\u0069d":"a","extra":{"deep":[1,{"x":null}]},"data":null}"#);
        assert_eq!(e.id, Some(Value::from("a")));
        assert!(matches!(e.data, Some(ObjectOr::Other)));
        assert_eq!(e.source, None);
    }

    #[test]
    fn bodies_that_are_not_objects_are_told_apart_from_broken_json() {
        for body in ["[1,2]", "\"x\"", "null", "1.5", "true"] {
            assert!(
                matches!(read(body.as_bytes()), Ok(ObjectOr::Other)),
                "{body}"
            );
        }
        assert!(read(b"{\"id\":").is_err());
        assert!(read(b"{\"id\":\"a\"} trailing").is_err());
        assert!(
            read(b"{\"extra\":[1,}").is_err(),
            "skipped members are checked as JSON"
        );
    }

    #[test]
    fn skipped_values_are_checked_as_a_whole_tree_would_be() {
        let deep = format!("{}{}", "[".repeat(130), "]".repeat(130));
        let bad: [Vec<u8>; 6] = [
            br#"{"id":"a","extra":"\ud800"}"#.to_vec(),
            br#"{"id":"a","extra":1e400}"#.to_vec(),
            format!(r#"{{"id":"a","extra":{deep}}}"#).into_bytes(),
            b"{\"id\":\"a\",\"extra\":\"\xff\"}".to_vec(),
            br#"{"id":"a","data":{"extra":{"\udc00":1}}}"#.to_vec(),
            br#"{"id":"a","data":[1e400]}"#.to_vec(),
        ];
        for body in bad {
            let whole = serde_json::from_slice::<Value>(&body);
            assert!(whole.is_err(), "a Value refuses {body:?}");
            assert!(
                read(&body).is_err(),
                "so does the one-pass reader: {body:?}"
            );
        }
    }
}
