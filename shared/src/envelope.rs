//! The versioned bus record (docs/architecture.md, "Contracts"): one record per device per request, keyed by
//! device id, carrying that device's readings in the order the device sent them.

use serde::{Deserialize, Serialize};

use crate::model::Reading;
use crate::ports::BusRecord;
use crate::EpochMillis;

/// The envelope version this build writes and reads.
pub const ENVELOPE_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    pub v: u32,
    pub device_id: String,
    /// When the gateway received the request; consumers measure end-to-end latency from it.
    pub received_at: EpochMillis,
    pub readings: Vec<Reading>,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EnvelopeError {
    #[error("record is not a GeoStream envelope: {0}")]
    Malformed(String),
    #[error("envelope version {0} is not supported; this build reads version {ENVELOPE_VERSION}")]
    UnsupportedVersion(u32),
    #[error("envelope of device {envelope:?} holds a reading of device {reading:?}")]
    MixedDevices { envelope: String, reading: String },
}

impl Envelope {
    pub fn encode(&self) -> Vec<u8> {
        // Serializing plain structs of strings and numbers into a Vec cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn decode(data: &[u8]) -> Result<Envelope, EnvelopeError> {
        #[derive(Deserialize)]
        struct VersionOnly {
            v: u32,
        }
        let envelope: Envelope = match serde_json::from_slice(data) {
            Ok(envelope) => envelope,
            Err(error) => {
                // Name the version problem rather than the field mismatch it causes.
                if let Ok(VersionOnly { v }) = serde_json::from_slice(data) {
                    if v != ENVELOPE_VERSION {
                        return Err(EnvelopeError::UnsupportedVersion(v));
                    }
                }
                return Err(EnvelopeError::Malformed(error.to_string()));
            }
        };
        if envelope.v != ENVELOPE_VERSION {
            return Err(EnvelopeError::UnsupportedVersion(envelope.v));
        }
        if let Some(stray) = envelope
            .readings
            .iter()
            .find(|r| r.device_id != envelope.device_id)
        {
            return Err(EnvelopeError::MixedDevices {
                envelope: envelope.device_id.clone(),
                reading: stray.device_id.clone(),
            });
        }
        Ok(envelope)
    }

    /// The record that carries this envelope: its encoding, and the envelope itself for a
    /// bus that can hand it on as it is.
    pub fn into_bus_record(self) -> BusRecord {
        BusRecord {
            partition_key: self.device_id.clone(),
            data: self.encode(),
            decoded: Some(std::sync::Arc::new(self)),
        }
    }
}

/// The largest bus record an envelope may become: under Kinesis's 1 MiB per record (data and
/// key) and Kafka's default 1 MB per message, with room for the key and framing.
pub const MAX_RECORD_BYTES: usize = 900 * 1024;

/// Splits an envelope whose record would exceed `max_bytes` into consecutive envelopes of the
/// same device, each within it, readings in their order (a request of 1 MiB for one device,
/// re-encoded with default event ids, can outgrow the bus's limit). A single reading is far
/// below any limit a bus has, so every part fits.
pub fn split_to_fit(envelope: Envelope, max_bytes: usize) -> Vec<Envelope> {
    if envelope.readings.len() <= 1 || envelope.encode().len() <= max_bytes {
        return vec![envelope];
    }
    let mut first = envelope;
    let second_half = first.readings.split_off(first.readings.len() / 2);
    let second = Envelope {
        readings: second_half,
        ..first.clone_without_readings()
    };
    let mut parts = split_to_fit(first, max_bytes);
    parts.extend(split_to_fit(second, max_bytes));
    parts
}

impl Envelope {
    fn clone_without_readings(&self) -> Envelope {
        Envelope {
            v: self.v,
            device_id: self.device_id.clone(),
            received_at: self.received_at,
            readings: Vec::new(),
        }
    }
}

/// Groups the readings of one request into one envelope per device, devices in order of first
/// appearance and each device's readings in the order they were sent.
pub fn envelopes_by_device(readings: Vec<Reading>, received_at: EpochMillis) -> Vec<Envelope> {
    let mut envelopes: Vec<Envelope> = Vec::new();
    let mut slot_of_device: std::collections::HashMap<String, usize> = Default::default();
    for reading in readings {
        match slot_of_device.get(&reading.device_id) {
            Some(&slot) => envelopes[slot].readings.push(reading),
            None => {
                slot_of_device.insert(reading.device_id.clone(), envelopes.len());
                envelopes.push(Envelope {
                    v: ENVELOPE_VERSION,
                    device_id: reading.device_id.clone(),
                    received_at,
                    readings: vec![reading],
                });
            }
        }
    }
    envelopes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validation::{validate_item, ValidationPolicy};
    use proptest::prelude::*;

    const NOW: EpochMillis = 1_763_900_000_000;

    fn reading(device: &str, ts: EpochMillis) -> Reading {
        Reading {
            device_id: device.into(),
            ts,
            event_id: format!("{device}@{ts}"),
            ..Default::default()
        }
    }

    #[test]
    fn an_envelope_over_the_limit_splits_in_order_into_parts_within_it() {
        let readings: Vec<Reading> = (0..500)
            .map(|n| reading("truck-1", NOW - 500 + n))
            .collect();
        let envelope = envelopes_by_device(readings.clone(), NOW).remove(0);
        let whole = envelope.encode().len();
        let max = whole / 5;
        let parts = split_to_fit(envelope.clone(), max);
        assert!(parts.len() >= 5, "{} parts", parts.len());
        assert!(parts.iter().all(|p| p.encode().len() <= max));
        assert!(parts
            .iter()
            .all(|p| p.device_id == "truck-1" && p.received_at == NOW));
        let rejoined: Vec<Reading> = parts.into_iter().flat_map(|p| p.readings).collect();
        assert_eq!(rejoined, readings);
        assert_eq!(split_to_fit(envelope.clone(), whole), vec![envelope]);
    }

    #[test]
    fn one_envelope_per_device_in_order() {
        let envelopes =
            envelopes_by_device(vec![reading("a", 1), reading("b", 2), reading("a", 3)], NOW);
        assert_eq!(envelopes.len(), 2);
        assert_eq!(envelopes[0].device_id, "a");
        assert_eq!(
            envelopes[0]
                .readings
                .iter()
                .map(|r| r.ts)
                .collect::<Vec<_>>(),
            [1, 3]
        );
        assert_eq!(envelopes[1].clone().into_bus_record().partition_key, "b");
    }

    #[test]
    fn decode_names_what_is_wrong() {
        assert!(matches!(
            Envelope::decode(b"garbage"),
            Err(EnvelopeError::Malformed(_))
        ));
        assert_eq!(
            Envelope::decode(br#"{"v":2,"something":"else"}"#),
            Err(EnvelopeError::UnsupportedVersion(2))
        );
        let mut envelope = envelopes_by_device(vec![reading("a", 1)], NOW).remove(0);
        envelope.readings.push(reading("b", 2));
        assert!(matches!(
            Envelope::decode(&envelope.encode()),
            Err(EnvelopeError::MixedDevices { .. })
        ));
    }

    fn arb_device() -> impl Strategy<Value = String> {
        "[A-Za-z0-9_.:-]{1,64}"
    }

    fn arb_item() -> impl Strategy<Value = serde_json::Value> {
        (
            arb_device(),
            (NOW - 1_000_000)..(NOW + 1_000),
            proptest::option::of((-90.0..=90.0f64, -180.0..=180.0f64)),
            proptest::option::of(0.0..=400.0f64),
            proptest::option::of(-60.0..=200.0f64),
            proptest::collection::btree_map("[a-z_]{1,10}", -1e12..1e12f64, 0..4),
            proptest::option::of("[ -~]{1,20}"),
        )
            .prop_map(|(device, ts, position, speed, engine, metrics, event_id)| {
                let mut item = serde_json::json!({"device_id": device, "ts": ts});
                if let Some((lat, lon)) = position {
                    item["lat"] = lat.into();
                    item["lon"] = lon.into();
                }
                if let Some(speed) = speed {
                    item["speed_kmh"] = speed.into();
                }
                if let Some(engine) = engine {
                    item["engine_temp_c"] = engine.into();
                }
                if !metrics.is_empty() {
                    item["metrics"] = serde_json::to_value(metrics).unwrap();
                }
                if let Some(event_id) = event_id {
                    item["event_id"] = event_id.into();
                }
                item
            })
    }

    proptest! {
        /// Every valid item survives validation, the envelope codec and decoding unchanged.
        #[test]
        fn validation_and_codec_round_trip(items in proptest::collection::vec(arb_item(), 1..40)) {
            let policy = ValidationPolicy::default();
            let readings: Vec<Reading> = items
                .iter()
                .map(|item| validate_item(item, NOW, &policy).expect("generated items are valid"))
                .collect();
            for (item, reading) in items.iter().zip(&readings) {
                prop_assert_eq!(item["ts"].as_i64(), Some(reading.ts));
                prop_assert_eq!(item["lat"].as_f64(), reading.lat);
                prop_assert_eq!(item["speed_kmh"].as_f64(), reading.speed_kmh);
            }
            let envelopes = envelopes_by_device(readings.clone(), NOW);
            let mut decoded: Vec<Reading> = Vec::new();
            for envelope in &envelopes {
                let record = envelope.clone().into_bus_record();
                let back = Envelope::decode(&record.data).unwrap();
                prop_assert_eq!(&back, envelope);
                prop_assert_eq!(&record.partition_key, &back.device_id);
                decoded.extend(back.readings);
            }
            // Per device, order is kept.
            for envelope in &envelopes {
                let sent: Vec<&Reading> = readings.iter().filter(|r| r.device_id == envelope.device_id).collect();
                let got: Vec<&Reading> = decoded.iter().filter(|r| r.device_id == envelope.device_id).collect();
                prop_assert_eq!(sent, got);
            }
        }
    }
}
