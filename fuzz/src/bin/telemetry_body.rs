fn main() {
    afl::fuzz!(|data: &[u8]| geostream_fuzz::telemetry_body(data));
}
