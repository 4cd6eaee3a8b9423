fn main() {
    afl::fuzz!(|data: &[u8]| geostream_fuzz::kafka_event(data));
}
