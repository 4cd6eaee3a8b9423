//! The stream handlers as the event-source-mapping loop invokes them.

use std::sync::Arc;

use async_trait::async_trait;
use aws_lambda_events::event::kinesis::KinesisEvent;
use aws_lambda_events::event::streams::KinesisEventResponse;
use geostream_lambda::stream::handle_kinesis;
use geostream_shared::metrics::MetricsSink;
use geostream_shared::stream::StreamFunction;

use crate::esm::KinesisFunction;

/// A stream function seen as Lambda sees it, publishing its metrics where the runner keeps them.
/// The handlers answer every batch with partial failures, so an invocation as a whole never
/// fails.
pub struct Invoked {
    pub function: Arc<dyn StreamFunction>,
    pub metrics: Arc<dyn MetricsSink>,
}

#[async_trait]
impl KinesisFunction for Invoked {
    fn name(&self) -> &str {
        self.function.name()
    }

    async fn invoke(&self, event: KinesisEvent) -> Result<KinesisEventResponse, String> {
        Ok(handle_kinesis(self.function.as_ref(), event, self.metrics.as_ref()).await)
    }
}
