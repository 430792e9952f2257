//! `Obj<T>`: a struct read from a JSON object, and only from an object.

use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;

/// A JSON object, and only an object: serde's derived structs also read arrays (fields in
/// order), which would make `[null, [...]]` a configuration.
#[derive(Debug)]
pub struct Obj<T>(pub T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Obj<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct ObjVisitor<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for ObjVisitor<T> {
            type Value = Obj<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object")
            }
            // Each object's reader a function of its own: inlined into their parents', the
            // configuration's made functions that Envoy's V8 needs much memory to compile at
            // start-up (docs/performance.md, "Footprint").
            #[inline(never)]
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Obj<T>, A::Error> {
                T::deserialize(de::value::MapAccessDeserializer::new(map)).map(Obj)
            }
        }
        d.deserialize_map(ObjVisitor(PhantomData))
    }
}
