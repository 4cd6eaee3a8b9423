//! SDK errors as the ports' [`StoreError`]: transient (worth retrying) or permanent, decided
//! from what the SDK itself knows — the error variant, the modelled retryable kind, the HTTP
//! status and the error codes its own retry classifier treats as throttling or transient —
//! never from substrings of a message.

use aws_runtime::retries::classifiers::{THROTTLING_ERRORS, TRANSIENT_ERRORS};
use aws_smithy_runtime_api::client::orchestrator::HttpResponse;
use aws_smithy_runtime_api::client::result::SdkError;
use aws_smithy_types::error::display::DisplayErrorContext;
use aws_smithy_types::error::metadata::ProvideErrorMetadata;
use aws_smithy_types::retry::ProvideErrorKind;
use geostream_shared::ports::StoreError;

/// Whether the call may succeed if made again: throttling, 5xx, time-outs and transport
/// failures are; a request the service refused as such (validation, missing resource, access
/// denied) is not. The SDK has already retried transient failures of the call as a whole, so
/// this decides whether the record is retried later or given up on.
pub fn is_transient<E>(error: &SdkError<E, HttpResponse>) -> bool
where
    E: ProvideErrorKind + ProvideErrorMetadata,
{
    match error {
        SdkError::ConstructionFailure(_) => false,
        SdkError::ServiceError(service) => {
            let err = service.err();
            let code = ProvideErrorMetadata::code(err);
            err.retryable_error_kind().is_some()
                || code.is_some_and(|c| {
                    THROTTLING_ERRORS.contains(&c) || TRANSIENT_ERRORS.contains(&c)
                })
                || service.raw().status().is_server_error()
        }
        // Time-outs, dispatch (transport) failures, unreadable responses, and future variants.
        _ => true,
    }
}

/// The SDK error as a [`StoreError`] of `operation`, its message with the whole cause chain.
pub fn store_error<E>(operation: &'static str, error: SdkError<E, HttpResponse>) -> StoreError
where
    E: ProvideErrorKind + ProvideErrorMetadata + std::error::Error + 'static,
{
    store_error_about(operation, "", error)
}

/// As [`store_error`], with what the call was about (`stream NAME`, `bucket NAME`) first.
pub fn store_error_about<E>(
    operation: &'static str,
    about: &str,
    error: SdkError<E, HttpResponse>,
) -> StoreError
where
    E: ProvideErrorKind + ProvideErrorMetadata + std::error::Error + 'static,
{
    let transient = is_transient(&error);
    let cause = DisplayErrorContext(&error).to_string();
    let message = if about.is_empty() {
        cause
    } else {
        format!("{about}: {cause}")
    };
    if transient {
        StoreError::transient(operation, message)
    } else {
        StoreError::permanent(operation, message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_dynamodb::operation::put_item::PutItemError;
    use aws_sdk_dynamodb::types::error::{
        ProvisionedThroughputExceededException, ResourceNotFoundException,
    };
    use aws_smithy_runtime_api::http::StatusCode;
    use aws_smithy_types::body::SdkBody;

    /// What the SDK reads off the wire beside the typed error: its code.
    fn metadata(code: &str) -> aws_smithy_types::error::ErrorMetadata {
        aws_smithy_types::error::ErrorMetadata::builder()
            .code(code)
            .build()
    }

    fn service_error(err: PutItemError, status: u16) -> SdkError<PutItemError, HttpResponse> {
        let raw = HttpResponse::new(StatusCode::try_from(status).unwrap(), SdkBody::empty());
        SdkError::service_error(err, raw)
    }

    #[test]
    fn throttling_is_transient_and_a_missing_table_is_not() {
        let throttled = PutItemError::ProvisionedThroughputExceededException(
            ProvisionedThroughputExceededException::builder()
                .message("slow down")
                .meta(metadata("ProvisionedThroughputExceededException"))
                .build(),
        );
        let missing = PutItemError::ResourceNotFoundException(
            ResourceNotFoundException::builder()
                .message("no table")
                .meta(metadata("ResourceNotFoundException"))
                .build(),
        );
        assert!(is_transient(&service_error(throttled, 400)));
        let error = store_error("PutItem", service_error(missing, 400));
        assert_eq!(error.kind, geostream_shared::ports::ErrorKind::Permanent);
        assert!(error.message.contains("no table"), "{}", error.message);
    }

    #[test]
    fn an_unmodelled_server_error_is_transient_and_a_client_error_is_not() {
        let unhandled = || PutItemError::generic(metadata("SomethingNew"));
        assert!(is_transient(&service_error(unhandled(), 503)));
        assert!(!is_transient(&service_error(unhandled(), 400)));
    }
}
