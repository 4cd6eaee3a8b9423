//! The yardstick for the embedded index's radius queries: Redis 7 / Valkey's
//! `GEOSEARCH ... BYRADIUS r m ASC COUNT 100 WITHDIST` over the same 100,000 vehicles as the
//! `radius query over 100k vehicles` group of `benches/core.rs` (same seed, same area), timed
//! server-side (`INFO commandstats`, microseconds per call, without the network).
//!
//! Run against a server (`scripts/redis start` prints its URL):
//! `GEOSTREAM_VALKEY_URL=redis://127.0.0.1:6391 cargo bench -p geostream-shared --bench redis_geosearch`
//! Without the variable it says so and exits.

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const KEY: &str = "geostream-bench:geo";
const CALLS: u64 = 2_000;

fn geosearch_usec(connection: &mut redis::Connection) -> redis::RedisResult<(u64, f64)> {
    let info: String = redis::cmd("INFO").arg("commandstats").query(connection)?;
    // cmdstat_geosearch:calls=N,usec=U,usec_per_call=...
    let line = info
        .lines()
        .find(|l| l.starts_with("cmdstat_geosearch:"))
        .unwrap_or_default();
    let field = |name: &str| {
        line.split([':', ','])
            .find_map(|part| part.strip_prefix(&format!("{name}=")))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    Ok((field("calls") as u64, field("usec")))
}

fn main() -> redis::RedisResult<()> {
    // `cargo bench` passes "--bench"; a filter argument is not used here.
    let Ok(url) = std::env::var("GEOSTREAM_VALKEY_URL") else {
        eprintln!("redis_geosearch: set GEOSTREAM_VALKEY_URL to a Redis 7 or Valkey server (scripts/redis start)");
        return Ok(());
    };
    let mut connection = redis::Client::open(url)?.get_connection()?;
    let _: () = redis::cmd("DEL").arg(KEY).query(&mut connection)?;
    // The same fleet as benches/core.rs: 100,000 vehicles over a 60 km x 60 km metro area.
    let mut rng = SmallRng::seed_from_u64(7);
    let mut next = || rng.random::<f64>();
    let mut pipeline = redis::pipe();
    for n in 0..100_000 {
        let (lat, lon) = (52.25 + next() * 0.54, 12.95 + next() * 0.9);
        pipeline
            .cmd("GEOADD")
            .arg(KEY)
            .arg(lon)
            .arg(lat)
            .arg(format!("veh-{n:06}"))
            .ignore();
        if n % 10_000 == 9_999 {
            let _: () = pipeline.query(&mut connection)?;
            pipeline = redis::pipe();
        }
    }
    println!("Redis/Valkey GEOSEARCH, nearest 100 of 100,000 vehicles, server-side time per call:");
    for radius in [500.0, 2_000.0, 10_000.0] {
        let (calls_before, usec_before) = geosearch_usec(&mut connection)?;
        for _ in 0..CALLS {
            let found: Vec<(String, f64)> = redis::cmd("GEOSEARCH")
                .arg(KEY)
                .arg("FROMLONLAT")
                .arg(13.405)
                .arg(52.52)
                .arg("BYRADIUS")
                .arg(radius)
                .arg("m")
                .arg("ASC")
                .arg("COUNT")
                .arg(100)
                .arg("WITHDIST")
                .query(&mut connection)?;
            std::hint::black_box(found);
        }
        let (calls_after, usec_after) = geosearch_usec(&mut connection)?;
        let calls = calls_after - calls_before;
        println!(
            "  radius {radius} m, limit 100: {:.1} µs per call ({calls} calls)",
            (usec_after - usec_before) / calls.max(1) as f64
        );
    }
    let _: () = redis::cmd("DEL").arg(KEY).query(&mut connection)?;
    Ok(())
}
