//! The query-api Lambda: API Gateway HTTP API (payload v2) -> DynamoDB and archive reads.

use geostream_aws::compose::Composition;
use geostream_query_api::{QueryApi, FUNCTION_NAME};

#[tokio::main]
async fn main() -> Result<(), geostream_lambda::Error> {
    geostream_lambda::init_tracing();
    let ports = Composition::for_lambda(FUNCTION_NAME).await?;
    if ports.token_verifier()?.is_some() {
        return Err("query-api is served by API Gateway, whose JWT authorizer verifies tokens: AUTHORIZATION=jwt_in_function is for ingest behind its Function URL".into());
    }
    let api = QueryApi::new(
        ports.positions().await?,
        ports.archive().await?,
        ports.alert_records()?,
    )
    .with_fleet(ports.geofences()?, ports.fleet_events()?)
    .with_history(ports.history()?)
    .with_access(ports.access()?);
    let metrics = ports.metrics();
    geostream_lambda::run_http_function(|request| api.handle(request, &metrics)).await
}
