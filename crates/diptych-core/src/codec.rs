//! From typed events to stored events and back, with upcasting on the way in.
//!
//! An application's events are one Rust enum per aggregate, in serde's default
//! (externally tagged) representation: the variant name is the stored event type and
//! the variant's content is the payload. Renaming a variant or changing its fields
//! is a schema change: old events keep their old shape in storage forever, and an
//! [`Upcasters`] chain rewrites them on read, step by step, until they fit today's
//! enum. Storage is never rewritten, so the audit trail stays exactly as it was.

use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::Arc;

use serde::de::{DeserializeOwned, Visitor};
use serde::{Deserializer, Serialize};
use serde_json::Value;

use crate::envelope::{NewEvent, RecordedEvent};
use crate::error::DecodeError;

/// A typed event: any serde enum in the default, externally tagged representation.
pub trait DomainEvent: Serialize + DeserializeOwned + Send + Sync + 'static {}

impl<T: Serialize + DeserializeOwned + Send + Sync + 'static> DomainEvent for T {}

type Transform = dyn Fn(Value) -> Result<Value, String> + Send + Sync;

struct UpcastStep {
    to_type: String,
    to_version: u32,
    transform: Box<Transform>,
}

/// A chain of payload transforms keyed by (event type, schema version).
///
/// Each step takes a payload at one schema version to the next (or renames the
/// type). The current schema version of a type is the highest version any step
/// produces for it, or 1 when it has never changed; new events are written at the
/// current version.
#[derive(Default)]
pub struct Upcasters {
    steps: HashMap<(String, u32), UpcastStep>,
    current: HashMap<String, u32>,
}

/// Longest chain followed before declaring a cycle.
const MAX_UPCAST_STEPS: usize = 64;

impl Upcasters {
    /// No transforms: every type is at schema version 1.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a step taking `event_type` from `from_version` to `from_version + 1`.
    pub fn add(
        self,
        event_type: &str,
        from_version: u32,
        transform: impl Fn(Value) -> Result<Value, String> + Send + Sync + 'static,
    ) -> Self {
        self.add_renaming(
            event_type,
            from_version,
            event_type,
            from_version + 1,
            transform,
        )
    }

    /// Registers a step that also renames the type: `(event_type, from_version)`
    /// becomes `(to_type, to_version)`.
    pub fn add_renaming(
        mut self,
        event_type: &str,
        from_version: u32,
        to_type: &str,
        to_version: u32,
        transform: impl Fn(Value) -> Result<Value, String> + Send + Sync + 'static,
    ) -> Self {
        let current = self.current.entry(to_type.to_owned()).or_insert(1);
        *current = (*current).max(to_version);
        self.steps.insert(
            (event_type.to_owned(), from_version),
            UpcastStep {
                to_type: to_type.to_owned(),
                to_version,
                transform: Box::new(transform),
            },
        );
        self
    }

    /// Whether a stored event of this type and schema version needs upcasting.
    fn has_step(&self, event_type: &str, schema_version: u32) -> bool {
        !self.steps.is_empty()
            && self
                .steps
                .contains_key(&(event_type.to_owned(), schema_version))
    }

    /// The stored type names these upcasters read (old names included), so that
    /// a handler's interest still takes events written under a former name.
    pub fn source_types(&self) -> impl Iterator<Item = &str> {
        self.steps.keys().map(|(event_type, _)| event_type.as_str())
    }

    /// The schema version new events of this type are written with.
    pub fn current_version(&self, event_type: &str) -> u32 {
        self.current.get(event_type).copied().unwrap_or(1)
    }

    /// Brings a stored payload up to the current schema version of its (possibly
    /// renamed) type. Returns the type name and payload to decode.
    pub fn upcast(
        &self,
        event_type: &str,
        schema_version: u32,
        payload: Value,
    ) -> Result<(String, Value), DecodeError> {
        let mut event_type = event_type.to_owned();
        let mut version = schema_version;
        let mut payload = payload;
        for _ in 0..MAX_UPCAST_STEPS {
            let Some(step) = self.steps.get(&(event_type.clone(), version)) else {
                let current = self.current_version(&event_type);
                if version < current {
                    return Err(DecodeError::UpcastFailed {
                        event_type,
                        from_version: version,
                        reason: format!(
                            "no upcaster registered from schema version {version} (current is {current})"
                        ),
                    });
                }
                return Ok((event_type, payload));
            };
            payload = (step.transform)(payload).map_err(|reason| DecodeError::UpcastFailed {
                event_type: event_type.clone(),
                from_version: version,
                reason,
            })?;
            event_type.clone_from(&step.to_type);
            version = step.to_version;
        }
        Err(DecodeError::UpcastFailed {
            event_type,
            from_version: version,
            reason: format!("more than {MAX_UPCAST_STEPS} steps: the upcasters form a cycle"),
        })
    }
}

/// Encodes typed events for storage and decodes stored ones, upcasting old versions.
pub struct EventCodec<E> {
    upcasters: Arc<Upcasters>,
    variants: Option<&'static [&'static str]>,
    _event: PhantomData<fn() -> E>,
}

impl<E> Clone for EventCodec<E> {
    fn clone(&self) -> Self {
        Self {
            upcasters: Arc::clone(&self.upcasters),
            variants: self.variants,
            _event: PhantomData,
        }
    }
}

impl<E: DomainEvent> Default for EventCodec<E> {
    fn default() -> Self {
        Self::new(Upcasters::new())
    }
}

impl<E: DomainEvent> EventCodec<E> {
    /// A codec for `E` with these upcasters.
    pub fn new(upcasters: Upcasters) -> Self {
        Self {
            upcasters: Arc::new(upcasters),
            variants: variant_names::<E>(),
            _event: PhantomData,
        }
    }

    /// The event type names `E` can decode, when `E` is an enum.
    pub fn event_types(&self) -> &'static [&'static str] {
        self.variants.unwrap_or(&[])
    }

    /// The upcasters in use.
    pub fn upcasters(&self) -> &Upcasters {
        &self.upcasters
    }

    /// Turns a typed event into a new stored event at its current schema version.
    pub fn encode(&self, event: &E) -> Result<NewEvent, DecodeError> {
        let value = serde_json::to_value(event).map_err(|error| DecodeError::Encode {
            reason: error.to_string(),
        })?;
        let (event_type, payload) = match value {
            Value::String(unit_variant) => (unit_variant, Value::Null),
            Value::Object(map) if map.len() == 1 => {
                let (name, payload) = map.into_iter().next().unwrap_or_default();
                (name, payload)
            }
            _ => {
                return Err(DecodeError::Encode {
                    reason: "events must be an enum in serde's default externally tagged \
                             representation (no #[serde(tag = ...)] or untagged)"
                        .to_owned(),
                });
            }
        };
        let schema_version = self.upcasters.current_version(&event_type);
        Ok(NewEvent::new(event_type, payload).with_schema_version(schema_version))
    }

    /// Turns a stored event into a typed one, upcasting it first.
    pub fn decode(&self, recorded: &RecordedEvent) -> Result<E, DecodeError> {
        let current = self.upcasters.current_version(&recorded.event_type);
        if recorded.schema_version > current {
            return Err(DecodeError::FutureSchemaVersion {
                event_type: recorded.event_type.clone(),
                stream: recorded.stream_id.clone(),
                version: recorded.stream_version,
                found: recorded.schema_version,
                current,
            });
        }
        if self.variants.is_some()
            && recorded.schema_version == current
            && !self
                .upcasters
                .has_step(&recorded.event_type, recorded.schema_version)
        {
            // Already in today's shape: decode from the stored payload in place,
            // without copying it into a tagged object first.
            return self.decode_tagged(recorded, &recorded.event_type, &recorded.payload);
        }
        let (event_type, payload) = self.upcasters.upcast(
            &recorded.event_type,
            recorded.schema_version,
            recorded.payload.clone(),
        )?;
        self.decode_tagged(recorded, &event_type, &payload)
    }

    /// Decodes `payload` as the variant `event_type` of the enum.
    fn decode_tagged(
        &self,
        recorded: &RecordedEvent,
        event_type: &str,
        payload: &Value,
    ) -> Result<E, DecodeError> {
        if let Some(variants) = self.variants {
            if !variants.contains(&event_type) {
                return Err(DecodeError::UnknownEventType {
                    event_type: event_type.to_owned(),
                    stream: recorded.stream_id.clone(),
                    version: recorded.stream_version,
                });
            }
        }
        E::deserialize(Tagged {
            name: event_type,
            payload,
        })
        .map_err(|error| DecodeError::InvalidPayload {
            event_type: event_type.to_owned(),
            stream: recorded.stream_id.clone(),
            version: recorded.stream_version,
            reason: error.to_string(),
        })
    }
}

/// The variant names of a serde enum, read from its derived `Deserialize`.
///
/// A derived enum deserializer calls `deserialize_enum` with the list of its
/// variants; this deserializer records that list and stops. For anything that is
/// not an enum it returns `None`, and decoding then leaves unknown names to serde.
fn variant_names<E: DeserializeOwned>() -> Option<&'static [&'static str]> {
    let mut captured = None;
    let _ = E::deserialize(VariantNameProbe {
        captured: &mut captured,
    });
    captured
}

struct VariantNameProbe<'a> {
    captured: &'a mut Option<&'static [&'static str]>,
}

impl<'de> Deserializer<'de> for VariantNameProbe<'_> {
    type Error = serde::de::value::Error;

    fn deserialize_any<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, Self::Error> {
        Err(serde::de::Error::custom("not an enum"))
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        variants: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, Self::Error> {
        *self.captured = Some(variants);
        Err(serde::de::Error::custom("variant names captured"))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
        byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map
        struct identifier ignored_any
    }
}

/// A stored event seen as the externally tagged enum value `{name: payload}`,
/// borrowed: what serde would read from that one-entry object, without building it.
struct Tagged<'a> {
    name: &'a str,
    payload: &'a Value,
}

impl<'de> Deserializer<'de> for Tagged<'de> {
    type Error = serde_json::Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        visitor.visit_map(serde::de::value::MapDeserializer::new(std::iter::once((
            self.name,
            self.payload,
        ))))
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        visitor.visit_enum(self)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
        byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map
        struct identifier ignored_any
    }
}

impl<'de> serde::de::EnumAccess<'de> for Tagged<'de> {
    type Error = serde_json::Error;
    type Variant = TaggedContent<'de>;

    fn variant_seed<S: serde::de::DeserializeSeed<'de>>(
        self,
        seed: S,
    ) -> Result<(S::Value, Self::Variant), Self::Error> {
        let name = seed.deserialize(serde::de::value::BorrowedStrDeserializer::<
            serde_json::Error,
        >::new(self.name))?;
        Ok((name, TaggedContent(self.payload)))
    }
}

/// The content of a [`Tagged`] variant.
struct TaggedContent<'a>(&'a Value);

impl<'de> serde::de::VariantAccess<'de> for TaggedContent<'de> {
    type Error = serde_json::Error;

    fn unit_variant(self) -> Result<(), Self::Error> {
        serde::Deserialize::deserialize(self.0)
    }

    fn newtype_variant_seed<S: serde::de::DeserializeSeed<'de>>(
        self,
        seed: S,
    ) -> Result<S::Value, Self::Error> {
        seed.deserialize(self.0)
    }

    fn tuple_variant<V: Visitor<'de>>(
        self,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        self.0.deserialize_seq(visitor)
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        self.0.deserialize_struct("", fields, visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::{Position, StreamId, Timestamp};
    use serde::Deserialize;
    use serde_json::json;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    enum Shape {
        Circle { radius: u32 },
        Nothing,
    }

    fn stored(event_type: &str, schema_version: u32, payload: Value) -> RecordedEvent {
        RecordedEvent {
            event_id: uuid::Uuid::now_v7(),
            stream_id: StreamId::new("shape-1").unwrap(),
            stream_version: 3,
            position: Position(7),
            recorded_at: Timestamp::now(),
            event_type: event_type.to_owned(),
            schema_version,
            payload,
            metadata: Default::default(),
        }
    }

    #[test]
    fn variant_names_come_from_the_derive() {
        let codec = EventCodec::<Shape>::default();
        assert_eq!(codec.event_types(), &["Circle", "Nothing"]);
    }

    #[test]
    fn encode_then_decode_round_trips_struct_and_unit_variants() {
        let codec = EventCodec::<Shape>::default();
        for shape in [Shape::Circle { radius: 4 }, Shape::Nothing] {
            let new = codec.encode(&shape).unwrap();
            let back = codec
                .decode(&stored(&new.event_type, new.schema_version, new.payload))
                .unwrap();
            assert_eq!(back, shape);
        }
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    enum Every {
        Unit,
        Newtype(String),
        Tuple(u8, bool),
        Struct {
            #[serde(rename = "n")]
            number: i64,
            tags: Vec<String>,
        },
    }

    #[test]
    fn every_kind_of_variant_decodes_as_it_was_encoded() {
        let codec = EventCodec::<Every>::default();
        for event in [
            Every::Unit,
            Every::Newtype("ada".into()),
            Every::Tuple(7, true),
            Every::Struct {
                number: -3,
                tags: vec!["a".into(), "b".into()],
            },
        ] {
            let new = codec.encode(&event).unwrap();
            let back = codec
                .decode(&stored(&new.event_type, new.schema_version, new.payload))
                .unwrap();
            assert_eq!(back, event);
        }
    }

    #[test]
    fn a_payload_of_the_wrong_kind_for_its_variant_is_invalid() {
        let codec = EventCodec::<Every>::default();
        for (event_type, payload) in [
            ("Unit", json!({"n": 1})),
            ("Newtype", json!(3)),
            ("Tuple", json!([1])),
            ("Struct", json!({"n": "x", "tags": []})),
        ] {
            let error = codec
                .decode(&stored(event_type, 1, payload.clone()))
                .unwrap_err();
            assert!(
                matches!(&error, DecodeError::InvalidPayload { event_type: named, .. } if named == event_type),
                "{event_type} {payload}: {error:?}"
            );
        }
    }

    #[test]
    fn unknown_event_type_is_named_with_its_stream_and_version() {
        let codec = EventCodec::<Shape>::default();
        let error = codec
            .decode(&stored("Square", 1, json!({"side": 2})))
            .unwrap_err();
        assert_eq!(
            error,
            DecodeError::UnknownEventType {
                event_type: "Square".into(),
                stream: StreamId::new("shape-1").unwrap(),
                version: 3,
            }
        );
    }

    #[test]
    fn payload_that_does_not_fit_its_type_is_an_invalid_payload_error() {
        let codec = EventCodec::<Shape>::default();
        let error = codec
            .decode(&stored("Circle", 1, json!({"radius": "big"})))
            .unwrap_err();
        assert!(
            matches!(&error, DecodeError::InvalidPayload { event_type, version: 3, .. } if event_type == "Circle"),
            "{error:?}"
        );
    }

    #[test]
    fn upcasters_rename_and_reshape_old_events() {
        let upcasters = Upcasters::new()
            .add_renaming("Round", 1, "Circle", 1, |payload| {
                Ok(json!({ "diameter": payload["d"] }))
            })
            .add("Circle", 1, |payload| {
                let diameter = payload["diameter"].as_u64().ok_or("diameter missing")?;
                Ok(json!({ "radius": diameter / 2 }))
            });
        let codec = EventCodec::<Shape>::new(upcasters);
        assert_eq!(codec.upcasters().current_version("Circle"), 2);
        let decoded = codec.decode(&stored("Round", 1, json!({"d": 10}))).unwrap();
        assert_eq!(decoded, Shape::Circle { radius: 5 });
        let new = codec.encode(&Shape::Circle { radius: 1 }).unwrap();
        assert_eq!(new.schema_version, 2);
    }

    #[test]
    fn an_upcaster_refusal_is_reported_with_the_version_it_started_from() {
        let upcasters = Upcasters::new().add("Circle", 1, |_| Err("no radius".to_owned()));
        let codec = EventCodec::<Shape>::new(upcasters);
        let error = codec.decode(&stored("Circle", 1, json!({}))).unwrap_err();
        assert!(matches!(
            error,
            DecodeError::UpcastFailed {
                from_version: 1,
                ..
            }
        ));
    }

    #[test]
    fn a_gap_in_the_upcaster_chain_is_reported_not_skipped() {
        // Steps from 2 to 3 exist, but nothing takes version 1 to 2.
        let upcasters = Upcasters::new().add("Circle", 2, Ok);
        let codec = EventCodec::<Shape>::new(upcasters);
        let error = codec
            .decode(&stored("Circle", 1, json!({"radius": 1})))
            .unwrap_err();
        match error {
            DecodeError::UpcastFailed {
                from_version: 1,
                reason,
                ..
            } => assert!(reason.contains("no upcaster registered"), "{reason}"),
            other => panic!("expected UpcastFailed, got {other:?}"),
        }
    }

    #[test]
    fn events_from_newer_code_are_refused_not_misread() {
        let codec = EventCodec::<Shape>::default();
        let error = codec
            .decode(&stored("Circle", 3, json!({"radius": 1})))
            .unwrap_err();
        assert!(matches!(
            error,
            DecodeError::FutureSchemaVersion {
                found: 3,
                current: 1,
                ..
            }
        ));
    }

    #[test]
    fn a_cycle_of_upcasters_is_an_error_not_a_hang() {
        let upcasters = Upcasters::new()
            .add_renaming("A", 1, "B", 1, Ok)
            .add_renaming("B", 1, "A", 1, Ok);
        let error = upcasters.upcast("A", 1, Value::Null).unwrap_err();
        assert!(matches!(error, DecodeError::UpcastFailed { .. }));
    }

    #[test]
    fn a_struct_is_not_an_event_enum() {
        #[derive(Serialize, Deserialize)]
        struct NotAnEnum {
            a: u32,
            b: u32,
        }
        let codec = EventCodec::<NotAnEnum>::default();
        let error = codec.encode(&NotAnEnum { a: 1, b: 2 }).unwrap_err();
        assert!(matches!(error, DecodeError::Encode { .. }));
    }
}
