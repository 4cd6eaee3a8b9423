//! The stream handlers as the event-source-mapping loop invokes them.

use async_trait::async_trait;
use aws_lambda_events::event::kinesis::KinesisEvent;
use aws_lambda_events::event::streams::KinesisEventResponse;
use geostream_shared::stream::StreamFunction;

use crate::esm::KinesisFunction;

/// A stream function seen as Lambda sees it. The handlers answer every batch with partial
/// failures, so an invocation as a whole never fails.
pub struct Invoked<T>(pub T);

#[async_trait]
impl<T: StreamFunction> KinesisFunction for Invoked<T> {
    fn name(&self) -> &str {
        self.0.name()
    }

    async fn invoke(&self, event: KinesisEvent) -> Result<KinesisEventResponse, String> {
        Ok(self.0.handle(event).await)
    }
}
