//! The stream handlers as the event-source-mapping loop invokes them.

use async_trait::async_trait;
use aws_lambda_events::event::kinesis::KinesisEvent;
use aws_lambda_events::event::streams::KinesisEventResponse;
use geostream_anomaly_inspector::AnomalyInspector;
use geostream_archiver::Archiver;
use geostream_geo_update::GeoUpdate;

use crate::esm::KinesisFunction;

pub struct GeoUpdateFunction(pub GeoUpdate);
pub struct ArchiverFunction(pub Archiver);
pub struct AnomalyInspectorFunction(pub AnomalyInspector);

#[async_trait]
impl KinesisFunction for GeoUpdateFunction {
    fn name(&self) -> &str {
        geostream_geo_update::FUNCTION_NAME
    }
    async fn invoke(&self, event: KinesisEvent) -> Result<KinesisEventResponse, String> {
        Ok(self.0.handle(event).await)
    }
}

#[async_trait]
impl KinesisFunction for ArchiverFunction {
    fn name(&self) -> &str {
        geostream_archiver::FUNCTION_NAME
    }
    async fn invoke(&self, event: KinesisEvent) -> Result<KinesisEventResponse, String> {
        Ok(self.0.handle(event).await)
    }
}

#[async_trait]
impl KinesisFunction for AnomalyInspectorFunction {
    fn name(&self) -> &str {
        geostream_anomaly_inspector::FUNCTION_NAME
    }
    async fn invoke(&self, event: KinesisEvent) -> Result<KinesisEventResponse, String> {
        Ok(self.0.handle(event).await)
    }
}
