fn main() {
    afl::fuzz!(|data: &[u8]| geostream_fuzz::bus_envelope(data));
}
