use http::HeaderMap;

use super::*;
use crate::model::Reading;

/// After every fixture's time, with an age limit that takes them all in.
const NOW: EpochMillis = 1_800_000_000_000;

fn policy() -> ValidationPolicy {
    ValidationPolicy {
        max_age_ms: 20 * 365 * 86_400_000,
        ..ValidationPolicy::default()
    }
}

fn fixture(name: &str) -> String {
    let path = format!(
        "{}/src/trackers/fixtures/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn fixtures(prefix: &str) -> Vec<(String, String)> {
    let dir = format!("{}/src/trackers/fixtures", env!("CARGO_MANIFEST_DIR"));
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .filter(|name| name.starts_with(prefix))
        .collect();
    names.sort();
    assert!(!names.is_empty(), "no fixtures {prefix}*");
    names
        .into_iter()
        .map(|name| (fixture(&name), name))
        .collect()
}

fn osmand(query: &str, body: &str) -> Result<TrackerPost, TrackerError> {
    let headers = HeaderMap::new();
    osmand::read(
        &TrackerRequest {
            query,
            headers: &headers,
            body: body.as_bytes(),
        },
        NOW,
        &policy(),
    )
}

fn owntracks(headers: &[(&'static str, &str)], body: &str) -> Result<TrackerPost, TrackerError> {
    let mut map = HeaderMap::new();
    for (name, value) in headers {
        map.insert(*name, value.parse().unwrap());
    }
    owntracks::read(
        &TrackerRequest {
            query: "",
            headers: &map,
            body: body.as_bytes(),
        },
        NOW,
        &policy(),
    )
}

/// The one reading of a post that must have been accepted.
fn only(post: &TrackerPost) -> &Reading {
    assert!(post.batch.rejected.is_empty(), "{:?}", post.batch.rejected);
    assert_eq!(post.batch.accepted.len(), 1);
    &post.batch.accepted[0].1
}

fn close(actual: Option<f64>, expected: f64) {
    let actual = actual.expect("a value");
    assert!((actual - expected).abs() < 1e-9, "{actual} != {expected}");
}

#[test]
fn every_captured_osmand_query_is_read() {
    for line in fixture("osmand-query.txt").lines() {
        let post = osmand(line, "").unwrap_or_else(|e| panic!("{line}: {e}"));
        let reading = only(&post);
        assert_eq!(reading.device_id, post.device_id, "{line}");
    }
}

#[test]
fn osmand_parameters_map_to_geostream_fields_and_units() {
    // 40 knots, a bearing, booleans and numbers as free metrics.
    let post = osmand(
        "id=123456789012345&timestamp=1504763810&lat=40.7232948571&lon=-74.0061408571&bearing=7.19889788244&speed=40&ignition=true&rpm=933&fuel=24",
        "",
    )
    .unwrap();
    let reading = only(&post);
    assert_eq!(reading.device_id, "123456789012345");
    assert_eq!(reading.ts, 1_504_763_810_000);
    assert_eq!(reading.event_id, "123456789012345@1504763810000");
    close(reading.speed_kmh, 74.08);
    close(reading.heading_deg, 7.19889788244);
    close(reading.lat, 40.7232948571);
    assert_eq!(reading.metrics.get("ignition"), Some(&1.0));
    assert_eq!(reading.metrics.get("rpm"), Some(&933.0));
    assert_eq!(reading.metrics.get("fuel"), Some(&24.0));

    // Milliseconds, RFC 3339, and a date and time in UTC.
    let ts = |query: &str| only(&osmand(query, "").unwrap()).ts;
    assert_eq!(ts("id=1&timestamp=1442068686579"), 1_442_068_686_579);
    assert_eq!(
        ts("id=1&timestamp=2016-01-27T18%3A55%3A47Z"),
        1_453_920_947_000
    );
    assert_eq!(
        ts("id=1&timestamp=2014-06-04+09%3A10%3A11"),
        1_401_873_011_000
    );
    // No timestamp: the time it was received.
    assert_eq!(ts("id=1&lat=1&lon=2"), NOW);

    let reading = only(&osmand("id=7&timestamp=1377177267&location=60.0,30.0&batt=87&altitude=224.5&accuracy=12&engine_temp_c=91", "").unwrap()).clone();
    assert_eq!((reading.lat, reading.lon), (Some(60.0), Some(30.0)));
    assert_eq!(reading.battery_soc_pct, Some(87.0));
    assert_eq!(reading.engine_temp_c, Some(91.0));
    assert_eq!(reading.metrics.get("altitude_m"), Some(&224.5));
    assert_eq!(reading.metrics.get("accuracy_m"), Some(&12.0));

    // Parameters in a form body, as Traccar Client posts them; the secret is not a metric.
    let post = osmand(
        "secret=abc",
        "id=9&timestamp=1377177267&lat=1.5&lon=2.5&valid=true",
    )
    .unwrap();
    assert_eq!(post.secret.as_deref(), Some("abc"));
    let reading = only(&post);
    assert_eq!((reading.lat, reading.lon), (Some(1.5), Some(2.5)));
    assert!(reading.metrics.is_empty(), "{:?}", reading.metrics);

    // A fix the app marks invalid keeps the rest of the reading.
    let reading = only(
        &osmand(
            "id=9&timestamp=1377177267&lat=1.5&lon=2.5&valid=false&batt=50",
            "",
        )
        .unwrap(),
    )
    .clone();
    assert_eq!(
        (reading.lat, reading.lon, reading.battery_soc_pct),
        (None, None, Some(50.0))
    );
}

#[test]
fn osmand_problems_are_named_as_the_app_names_them() {
    let post = osmand(
        "id=9&timestamp=1377177267&lat=91&lon=2&speed=500&bearing=abc",
        "",
    )
    .unwrap();
    assert!(post.batch.accepted.is_empty());
    let errors = &post.batch.rejected[0].errors;
    let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
    assert!(fields.contains(&"lat"), "{errors:?}");
    assert!(fields.contains(&"bearing"), "{errors:?}");
    let speed = errors
        .iter()
        .find(|e| e.field == "speed")
        .expect("speed named");
    assert!(
        speed.message.contains("converted from the knots"),
        "{speed:?}"
    );

    let error = osmand("timestamp=1377177267&lat=60.0&lon=30.0", "").unwrap_err();
    assert!(error.0.contains("`id`"), "{error}");
    let bad_time = osmand("id=1&timestamp=yesterday", "").unwrap();
    assert_eq!(bad_time.batch.rejected[0].errors[0].field, "timestamp");
    // Too old for the contract: refused with the reason, under the app's name.
    let old = osmand::read(
        &TrackerRequest {
            query: "id=1&timestamp=1377177267",
            headers: &HeaderMap::new(),
            body: b"",
        },
        NOW,
        &ValidationPolicy::default(),
    )
    .unwrap();
    let error = &old.batch.rejected[0].errors[0];
    assert_eq!(error.field, "timestamp");
    assert!(error.message.contains("in the past"), "{error:?}");
}

#[test]
fn every_captured_traccar_client_json_is_read() {
    for (body, name) in fixtures("traccar-client-") {
        let post = osmand("", &body).unwrap_or_else(|e| panic!("{name}: {e}"));
        only(&post);
    }
}

#[test]
fn traccar_client_json_maps_units_and_unknowns() {
    let post = osmand("", &fixture("traccar-client-4.json")).unwrap();
    let reading = only(&post);
    assert_eq!(reading.device_id, "8737767034");
    assert_eq!(reading.event_id, "0e9a2473-a9a7-4c00-997b-fb97d2154e75");
    assert_eq!(reading.ts, 1_626_854_794_444);
    close(reading.speed_kmh, 18.67 * 3.6);
    close(reading.heading_deg, 63.0);
    close(reading.battery_soc_pct, 79.0);
    assert_eq!(reading.metrics.get("altitude_m"), Some(&35.7));
    assert_eq!(reading.metrics.get("charging"), Some(&0.0));

    // Speed, heading and battery of -1 are unknown, not errors.
    let post = osmand("", &fixture("traccar-client-3.json")).unwrap();
    let reading = only(&post);
    assert_eq!(
        (
            reading.speed_kmh,
            reading.heading_deg,
            reading.battery_soc_pct
        ),
        (None, None, None)
    );

    // Numeric and boolean extras are metrics; text extras are left out.
    let post = osmand("", &fixture("traccar-client-2.json")).unwrap();
    let metrics = &only(&post).metrics;
    assert_eq!(metrics.get("device_double_test"), Some(&1.345));
    assert_eq!(metrics.get("device_bool_test"), Some(&1.0));
    assert!(!metrics.contains_key("device_string_test"));

    // A batch of locations, each answered by its index.
    let body = r#"{"device_id":"v1","location":[
        {"timestamp":"2025-06-15T13:45:12Z","coords":{"latitude":1,"longitude":2}},
        {"timestamp":"2025-06-15T13:45:13Z","coords":{"latitude":100,"longitude":2}}]}"#;
    let post = osmand("", body).unwrap();
    assert_eq!(post.batch.accepted.len(), 1);
    assert_eq!(post.batch.rejected[0].index, 1);
    assert_eq!(
        post.batch.rejected[0].errors[0].field,
        "location.coords.latitude"
    );
}

#[test]
fn every_captured_owntracks_location_is_read() {
    for (body, name) in fixtures("owntracks-") {
        let post = owntracks(&[("x-limit-u", "jjolie"), ("x-limit-d", "phone")], &body)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(only(&post).device_id, "jjolie:phone", "{name}");
    }
}

#[test]
fn owntracks_fields_and_devices() {
    let post = owntracks(
        &[("x-limit-u", "jjolie"), ("x-limit-d", "phone")],
        &fixture("owntracks-3.json"),
    )
    .unwrap();
    let reading = only(&post);
    assert_eq!(reading.ts, 1_497_349_316_000);
    assert_eq!(reading.speed_kmh, Some(61.0));
    assert_eq!(reading.heading_deg, Some(271.0));
    assert_eq!(reading.battery_soc_pct, Some(67.0));
    assert_eq!(reading.metrics.get("accuracy_m"), Some(&5.0));
    assert_eq!(reading.metrics.get("altitude_m"), Some(&167.0));
    assert_eq!(reading.metrics.get("vertical_accuracy_m"), Some(&21.0));

    // Without the headers, the topic names the device; without both, the Basic user.
    let post = owntracks(&[], &fixture("owntracks-5.json")).unwrap();
    assert_eq!(post.device_id, "ckrey:22A67880-15C3-41A6-9157-25545C7993AC");
    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("veh-42:s3cret")
    );
    let post = owntracks(&[("authorization", &basic)], &fixture("owntracks-2.json")).unwrap();
    assert_eq!(
        (post.device_id.as_str(), post.secret.as_deref()),
        ("veh-42", Some("s3cret"))
    );
    let error = owntracks(&[], &fixture("owntracks-2.json")).unwrap_err();
    assert!(error.0.contains("X-Limit-U"), "{error}");

    // Other message types are answered and not stored.
    let post = owntracks(
        &[("x-limit-u", "jjolie")],
        r#"{"_type":"transition","wtst":1425042603,"lat":12.34,"lon":44.5,"tst":1427634603,"acc":130,"tid":"JP","event":"enter","desc":"home","t":"c"}"#,
    )
    .unwrap();
    assert_eq!((post.ignored, post.batch.item_count()), (1, 0));

    // Problems under the app's names.
    let post = owntracks(
        &[("x-limit-u", "jjolie")],
        r#"{"_type":"location","lat":95,"lon":2}"#,
    )
    .unwrap();
    let fields: Vec<&str> = post.batch.rejected[0]
        .errors
        .iter()
        .map(|e| e.field.as_str())
        .collect();
    assert_eq!(fields, ["tst", "lat"]);
    let post = owntracks(&[("x-limit-u", "jo@home")], &fixture("owntracks-2.json")).unwrap();
    assert_eq!(
        post.batch.rejected[0].errors[0].field,
        "X-Limit-U:X-Limit-D"
    );
    assert!(owntracks(&[("x-limit-u", "jjolie")], "not json").is_err());
}
