//! The archive on Amazon Timestream for LiveAnalytics.
//!
//! One multi-measure record per reading: dimensions `device_id` and `event_id`, measure name
//! `reading`, time = the reading's `ts` (milliseconds), measures = every reading present
//! (DOUBLE), free metrics as `metrics.<name>`. A record is identified by its dimensions, measure
//! name and time, so two readings of a device in the same millisecond with different event ids
//! are two records, and the same reading written again is the same record: the version is the
//! write time, so a rewrite is an upsert and a retried batch leaves the table as it was.

use crate::capacity::{CapacityMeter, Unit};
use async_trait::async_trait;
use aws_sdk_timestreamwrite::error::{DisplayErrorContext, SdkError};
use aws_sdk_timestreamwrite::operation::write_records::WriteRecordsError;
use aws_sdk_timestreamwrite::types::{Dimension, MeasureValue, MeasureValueType, Record, TimeUnit};
use geostream_shared::model::{Reading, READING_FIELDS};
use geostream_shared::now_millis;
use geostream_shared::ports::{Archive, RejectedReading, StoreError};
use geostream_shared::validation::is_valid_device_id;
use geostream_shared::EpochMillis;
use tokio::sync::OnceCell;

/// WriteRecords takes at most 100 records.
const MAX_RECORDS_PER_CALL: usize = 100;
const MEASURE_NAME: &str = "reading";

pub struct TimestreamArchive {
    write: aws_sdk_timestreamwrite::Client,
    query: aws_sdk_timestreamquery::Client,
    discovery: bool,
    discovered: OnceCell<(
        aws_sdk_timestreamwrite::Client,
        aws_sdk_timestreamquery::Client,
    )>,
    database: String,
    table: String,
    meter: CapacityMeter,
}

/// Timestream's size of a record, as it bills writes (1 KB units): the dimension and measure
/// names and values (8 bytes per double) and the 8-byte time.
fn record_size(record: &Record) -> usize {
    let dimensions: usize = record
        .dimensions()
        .iter()
        .map(|d| d.name().len() + d.value().len())
        .sum();
    let measures: usize = record
        .measure_values()
        .iter()
        .map(|m| {
            m.name().len()
                + match m.r#type() {
                    MeasureValueType::Double => 8,
                    _ => m.value().len(),
                }
        })
        .sum();
    dimensions + record.measure_name().map_or(0, str::len) + measures + 8
}

impl TimestreamArchive {
    /// `discovery`: resolve Timestream's cell endpoints (needed on AWS, done on first use so cold
    /// starts make no call); off against an emulator.
    pub fn new(
        write: aws_sdk_timestreamwrite::Client,
        query: aws_sdk_timestreamquery::Client,
        discovery: bool,
        database: impl Into<String>,
        table: impl Into<String>,
    ) -> Self {
        TimestreamArchive {
            write,
            query,
            discovery,
            discovered: OnceCell::new(),
            database: database.into(),
            table: table.into(),
            meter: CapacityMeter::default(),
        }
    }

    /// Counts the write units this archive consumes on `meter`.
    pub fn metered(mut self, meter: CapacityMeter) -> Self {
        self.meter = meter;
        self
    }

    async fn clients(
        &self,
    ) -> Result<
        (
            aws_sdk_timestreamwrite::Client,
            aws_sdk_timestreamquery::Client,
        ),
        StoreError,
    > {
        if !self.discovery {
            return Ok((self.write.clone(), self.query.clone()));
        }
        self.discovered
            .get_or_try_init(|| async {
                let write = self
                    .write
                    .clone()
                    .with_endpoint_discovery_enabled()
                    .await
                    .map_err(|e| {
                        StoreError::transient("DescribeEndpoints", format!("Timestream write: {e}"))
                    })?;
                let query = self
                    .query
                    .clone()
                    .with_endpoint_discovery_enabled()
                    .await
                    .map_err(|e| {
                        StoreError::transient("DescribeEndpoints", format!("Timestream query: {e}"))
                    })?;
                Ok((write.0, query.0))
            })
            .await
            .cloned()
    }

    /// The Timestream record of a reading.
    pub fn record(reading: &Reading, version: i64) -> Result<Record, String> {
        let double = |name: &str, value: f64| {
            MeasureValue::builder()
                .name(name)
                .value(value.to_string())
                .r#type(MeasureValueType::Double)
                .build()
                .map_err(|e| e.to_string())
        };
        let mut measures = Vec::new();
        for name in ["lat", "lon"]
            .into_iter()
            .chain(READING_FIELDS.iter().map(|f| f.0))
        {
            if let Some(value) = reading.value(name) {
                measures.push(double(name, value)?);
            }
        }
        for (name, value) in &reading.metrics {
            measures.push(double(&format!("metrics.{name}"), *value)?);
        }
        let dimension = |name: &str, value: &str| {
            Dimension::builder()
                .name(name)
                .value(value)
                .build()
                .map_err(|e| e.to_string())
        };
        Ok(Record::builder()
            .dimensions(dimension("device_id", &reading.device_id)?)
            .dimensions(dimension("event_id", &reading.event_id)?)
            .measure_name(MEASURE_NAME)
            .measure_value_type(MeasureValueType::Multi)
            .set_measure_values(Some(measures))
            .time(reading.ts.to_string())
            .time_unit(TimeUnit::Milliseconds)
            .version(version)
            .build())
    }

    /// The SQL of a track read. Device ids are validated to `[A-Za-z0-9_.:-]`, so quoting is safe.
    pub fn track_query(
        &self,
        device_id: &str,
        from: EpochMillis,
        to: EpochMillis,
        limit: usize,
    ) -> String {
        format!(
            "SELECT * FROM \"{}\".\"{}\" WHERE device_id = '{device_id}' AND measure_name = '{MEASURE_NAME}' \
             AND time >= from_milliseconds({from}) AND time < from_milliseconds({to}) ORDER BY time ASC LIMIT {limit}",
            self.database, self.table
        )
    }
}

/// Parses Timestream's timestamp text, `2025-11-23 12:13:19.500000000`, as UTC.
fn parse_time(text: &str) -> Option<EpochMillis> {
    chrono::NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f")
        .ok()
        .map(|t| t.and_utc().timestamp_millis())
}

/// A reading from one row of a track query, given the row's column names and scalar values.
pub fn reading_from_row(columns: &[String], values: &[Option<String>]) -> Result<Reading, String> {
    let mut reading = Reading::default();
    for (column, value) in columns.iter().zip(values) {
        let Some(value) = value else { continue };
        match column.as_str() {
            "device_id" => reading.device_id = value.clone(),
            "event_id" => reading.event_id = value.clone(),
            "time" => {
                reading.ts = parse_time(value)
                    .ok_or_else(|| format!("time {value:?} is not a Timestream timestamp"))?
            }
            "measure_name" => {}
            name => {
                let number: f64 = value
                    .parse()
                    .map_err(|_| format!("{name} = {value:?} is not a number"))?;
                if let Some(metric) = name.strip_prefix("metrics.") {
                    reading.metrics.insert(metric.to_string(), number);
                } else if name == "lat" {
                    reading.lat = Some(number);
                } else if name == "lon" {
                    reading.lon = Some(number);
                } else if !reading.set_value(name, number) {
                    tracing::debug!(column = name, "ignoring unknown Timestream column");
                }
            }
        }
    }
    if reading.device_id.is_empty() || reading.event_id.is_empty() {
        return Err("row lacks device_id or event_id".into());
    }
    Ok(reading)
}

#[async_trait]
impl Archive for TimestreamArchive {
    async fn write(&self, readings: &[Reading]) -> Result<Vec<RejectedReading>, StoreError> {
        let (write, _) = self.clients().await?;
        let version = now_millis();
        let mut rejected = Vec::new();
        for (chunk_index, chunk) in readings.chunks(MAX_RECORDS_PER_CALL).enumerate() {
            let offset = chunk_index * MAX_RECORDS_PER_CALL;
            let mut records = Vec::with_capacity(chunk.len());
            let mut indices = Vec::with_capacity(chunk.len());
            for (i, reading) in chunk.iter().enumerate() {
                match Self::record(reading, version) {
                    Ok(record) => {
                        records.push(record);
                        indices.push(offset + i);
                    }
                    Err(reason) => rejected.push(RejectedReading {
                        index: offset + i,
                        reason,
                    }),
                }
            }
            if records.is_empty() {
                continue;
            }
            let units: f64 = records
                .iter()
                .map(|r| record_size(r).div_ceil(1024).max(1) as f64)
                .sum();
            let result = write
                .write_records()
                .database_name(&self.database)
                .table_name(&self.table)
                .set_records(Some(records))
                .send()
                .await;
            match result {
                Ok(_) => self.meter.add(Unit::TimestreamWriteUnits, units),
                Err(SdkError::ServiceError(service))
                    if matches!(
                        service.err(),
                        WriteRecordsError::RejectedRecordsException(_)
                    ) =>
                {
                    let WriteRecordsError::RejectedRecordsException(exception) = service.err()
                    else {
                        continue;
                    };
                    // The other records of the call were written; report the refused ones.
                    for record in exception.rejected_records() {
                        let Some(&index) = indices.get(record.record_index() as usize) else {
                            continue;
                        };
                        if record
                            .existing_version()
                            .is_some_and(|existing| existing >= version)
                        {
                            continue; // a newer write of the same reading is already there
                        }
                        rejected.push(RejectedReading {
                            index,
                            reason: record
                                .reason()
                                .unwrap_or("rejected by Timestream")
                                .to_string(),
                        });
                    }
                }
                Err(error) => {
                    let message = DisplayErrorContext(&error).to_string();
                    let permanent = matches!(&error, SdkError::ServiceError(s) if matches!(s.err(), WriteRecordsError::ValidationException(_) | WriteRecordsError::ResourceNotFoundException(_)));
                    return Err(if permanent {
                        StoreError::permanent("WriteRecords", message)
                    } else {
                        StoreError::transient("WriteRecords", message)
                    });
                }
            }
        }
        Ok(rejected)
    }

    async fn track(
        &self,
        device_id: &str,
        from: EpochMillis,
        to: EpochMillis,
        limit: usize,
    ) -> Result<Vec<Reading>, StoreError> {
        if !is_valid_device_id(device_id) {
            return Err(StoreError::invalid(
                "Query",
                format!("{device_id:?} is not a device id"),
            ));
        }
        let (_, query) = self.clients().await?;
        let sql = self.track_query(device_id, from, to, limit);
        let mut readings = Vec::new();
        let mut next_token: Option<String> = None;
        loop {
            let output = query
                .query()
                .query_string(&sql)
                .set_next_token(next_token.take())
                .send()
                .await
                .map_err(|e| {
                    StoreError::transient(
                        "Query",
                        aws_sdk_timestreamquery::error::DisplayErrorContext(&e).to_string(),
                    )
                })?;
            let columns: Vec<String> = output
                .column_info()
                .iter()
                .map(|c| c.name().unwrap_or_default().to_string())
                .collect();
            for row in output.rows() {
                let values: Vec<Option<String>> = row
                    .data()
                    .iter()
                    .map(|d| d.scalar_value().map(str::to_string))
                    .collect();
                readings.push(
                    reading_from_row(&columns, &values)
                        .map_err(|e| StoreError::permanent("Query", e))?,
                );
            }
            match output.next_token() {
                Some(token) if readings.len() < limit => next_token = Some(token.to_string()),
                _ => break,
            }
        }
        readings.truncate(limit);
        Ok(readings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reading_becomes_one_multi_measure_record() {
        let mut reading = Reading {
            device_id: "truck-7".into(),
            ts: 1_763_900_000_123,
            event_id: "e-1".into(),
            lat: Some(52.5),
            lon: Some(13.4),
            engine_temp_c: Some(104.5),
            ..Default::default()
        };
        reading.metrics.insert("door_open".into(), 1.0);
        let record = TimestreamArchive::record(&reading, 7).unwrap();
        assert_eq!(record.time(), Some("1763900000123"));
        assert_eq!(record.version(), Some(7));
        let names: Vec<&str> = record.measure_values().iter().map(|m| m.name()).collect();
        assert_eq!(names, ["lat", "lon", "engine_temp_c", "metrics.door_open"]);
    }

    /// Timestream identifies a record by its dimensions, measure name and time: what a write
    /// of the same key replaces.
    fn identity(record: &Record) -> (Vec<(String, String)>, Option<String>, Option<String>) {
        let dimensions = record
            .dimensions()
            .iter()
            .map(|d| (d.name().to_string(), d.value().to_string()))
            .collect();
        (
            dimensions,
            record.measure_name().map(str::to_string),
            record.time().map(str::to_string),
        )
    }

    #[test]
    fn readings_of_one_device_in_one_millisecond_are_distinct_records() {
        let reading = |event_id: &str, temp: f64| Reading {
            device_id: "truck-7".into(),
            ts: 1_763_900_000_123,
            event_id: event_id.into(),
            engine_temp_c: Some(temp),
            ..Default::default()
        };
        let first = TimestreamArchive::record(&reading("door-1", 90.0), 1).unwrap();
        let second = TimestreamArchive::record(&reading("door-2", 91.0), 1).unwrap();
        assert_ne!(identity(&first), identity(&second));
        let again = TimestreamArchive::record(&reading("door-1", 90.0), 2).unwrap();
        assert_eq!(identity(&first), identity(&again), "a rewrite is an upsert");
    }

    #[test]
    fn rows_parse_back_into_readings() {
        let columns: Vec<String> = [
            "device_id",
            "measure_name",
            "time",
            "event_id",
            "lat",
            "lon",
            "engine_temp_c",
            "metrics.door_open",
            "speed_kmh",
        ]
        .iter()
        .map(|c| c.to_string())
        .collect();
        let values: Vec<Option<String>> = [
            "truck-7",
            "reading",
            "2025-11-23 12:13:20.123000000",
            "e-1",
            "52.5",
            "13.4",
            "104.5",
            "1.0",
        ]
        .iter()
        .map(|v| Some(v.to_string()))
        .chain([None])
        .collect();
        let reading = reading_from_row(&columns, &values).unwrap();
        assert_eq!(reading.ts, 1_763_900_000_123);
        assert_eq!(
            (reading.lat, reading.engine_temp_c, reading.speed_kmh),
            (Some(52.5), Some(104.5), None)
        );
        assert_eq!(reading.metrics["door_open"], 1.0);
        let bad: Vec<Option<String>> = vec![Some("truck-7".into()), None, Some("yesterday".into())];
        assert!(reading_from_row(&columns, &bad).is_err());
    }
}
