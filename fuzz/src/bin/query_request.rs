fn main() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a current-thread runtime");
    afl::fuzz!(|data: &[u8]| geostream_fuzz::query_request(&runtime, data));
}
