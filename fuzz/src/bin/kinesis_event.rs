fn main() {
    afl::fuzz!(|data: &[u8]| geostream_fuzz::kinesis_event(data));
}
