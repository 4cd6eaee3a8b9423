use clap::Parser;
use geostream_sim::{run, SimOptions};

/// Simulates a vehicle fleet and POSTs its telemetry to a GeoStream endpoint.
#[derive(Parser)]
#[command(name = "geostream-sim", version)]
struct Cli {
    /// Base URL of the GeoStream API (the local runner, or the API Gateway URL).
    #[arg(long, default_value = "http://127.0.0.1:8080", env = "GEOSTREAM_URL")]
    url: String,
    /// Also write the closing report as JSON to this file.
    #[arg(long)]
    report_json: Option<std::path::PathBuf>,
    #[command(flatten)]
    sim: SimOptions,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            let _ = stop_tx.send(true);
        }
    });
    match run(cli.sim, &cli.url, stop_rx).await {
        Ok(report) => {
            println!("{report}");
            if let Some(path) = cli.report_json {
                let json = serde_json::to_string_pretty(&report).unwrap_or_default();
                if let Err(error) = std::fs::write(&path, json) {
                    eprintln!("geostream-sim: cannot write {}: {error}", path.display());
                    return std::process::ExitCode::FAILURE;
                }
            }
            std::process::ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("geostream-sim: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn command_line_is_well_formed() {
        super::Cli::command().debug_assert();
    }
}
