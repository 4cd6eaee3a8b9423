//! The simulated fleet speaking the tracker apps' protocols, as a phone running Traccar Client
//! or OwnTracks would: one reading per request, the device's secret in the URL (Traccar
//! Client) or as the HTTP Basic password (OwnTracks).

use geostream_shared::device_secret::DeviceSecrets;

use crate::fleet::DeviceReading;

/// What the simulated devices speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Protocol {
    /// GeoStream's own `POST /v1/telemetry`, readings in batches of --batch-size.
    #[default]
    Telemetry,
    /// Traccar Client's OsmAnd protocol (`/v1/ingest/osmand`), one reading per request.
    Osmand,
    /// OwnTracks' HTTP mode (`/v1/ingest/owntracks`), one reading per request.
    Owntracks,
}

const KMH_PER_KNOT: f64 = 1.852;

/// One request as the app would send it.
#[derive(Debug, Clone)]
pub struct AppRequest {
    pub path_and_query: String,
    pub body: Vec<u8>,
    pub content_type: Option<&'static str>,
    /// HTTP Basic credentials, user and password.
    pub basic: Option<(String, String)>,
    pub headers: Vec<(&'static str, String)>,
}

/// The request of one reading; `None` for the telemetry protocol, whose requests are batches.
pub fn app_request(
    protocol: Protocol,
    reading: &DeviceReading,
    secrets: Option<&DeviceSecrets>,
) -> Option<AppRequest> {
    let secret = secrets.map(|secrets| secrets.issue(&reading.device_id));
    match protocol {
        Protocol::Telemetry => None,
        Protocol::Osmand => {
            let mut query = form_urlencoded::Serializer::new(String::new());
            query
                .append_pair("id", &reading.device_id)
                // Milliseconds: Traccar reads a number of 2^31 or more as such.
                .append_pair("timestamp", &reading.ts.to_string())
                .append_pair("lat", &reading.lat.to_string())
                .append_pair("lon", &reading.lon.to_string())
                .append_pair("speed", &(reading.speed_kmh / KMH_PER_KNOT).to_string())
                .append_pair("bearing", &reading.heading_deg.to_string())
                .append_pair("batt", &reading.battery_soc_pct.to_string());
            // What Traccar Client has no parameter for goes by GeoStream's field names.
            for (name, value) in [
                ("engine_temp_c", reading.engine_temp_c),
                ("battery_temp_c", reading.battery_temp_c),
                ("tire_pressure_psi", reading.tire_pressure_psi),
                ("fuel_pct", reading.fuel_pct),
                ("temperature_c", reading.temperature_c),
                ("humidity_pct", reading.humidity_pct),
            ] {
                query.append_pair(name, &value.to_string());
            }
            if let Some(secret) = &secret {
                query.append_pair("secret", secret);
            }
            Some(AppRequest {
                path_and_query: format!("/v1/ingest/osmand?{}", query.finish()),
                body: Vec::new(),
                content_type: None,
                basic: None,
                headers: Vec::new(),
            })
        }
        Protocol::Owntracks => {
            let message = serde_json::json!({
                "_type": "location",
                "tid": reading.device_id.chars().rev().take(2).collect::<String>(),
                "tst": reading.ts / 1000,
                "lat": reading.lat,
                "lon": reading.lon,
                "vel": reading.speed_kmh.round(),
                "cog": reading.heading_deg.round() as i64 % 360,
                "batt": reading.battery_soc_pct.round(),
                "acc": 5,
                "conn": "m",
            });
            Some(AppRequest {
                path_and_query: "/v1/ingest/owntracks".into(),
                body: serde_json::to_vec(&message).unwrap_or_default(),
                content_type: Some("application/json"),
                basic: secret.map(|secret| (reading.device_id.clone(), secret)),
                // The user only: the app's device id would make `USER:DEVICE` the vehicle's id.
                headers: vec![("X-Limit-U", reading.device_id.clone())],
            })
        }
    }
}
