//! The API's error shape: `{"error": {"code": "<snake_case>", "message": "…"}}`
//! with the status that says whose fault it is. Bad input is always a 4xx;
//! store trouble is a 503 with `Retry-After`; nothing maps to a 500.

use super::{json_response, Body};
use crate::session::InputError;
use crate::store::StoreError;
use hyper::{header, Response, StatusCode};

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn unavailable(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, code, message)
    }

    pub fn into_response(self) -> Response<Body> {
        #[derive(serde::Serialize)]
        struct Inner<'a> {
            code: &'a str,
            message: &'a str,
        }
        #[derive(serde::Serialize)]
        struct Outer<'a> {
            error: Inner<'a>,
        }
        let body = serde_json::to_vec(&Outer {
            error: Inner {
                code: self.code,
                message: &self.message,
            },
        })
        .unwrap_or_default();
        let mut resp = json_response(self.status, body);
        if self.status == StatusCode::SERVICE_UNAVAILABLE
            || self.status == StatusCode::TOO_MANY_REQUESTS
            || self.status == StatusCode::INSUFFICIENT_STORAGE
        {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        }
        resp
    }
}

impl From<InputError> for ApiError {
    fn from(e: InputError) -> ApiError {
        match e {
            InputError::Invalid(m) => ApiError::bad_request("invalid_input", m),
            e @ InputError::MetadataTooLarge { .. } => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "metadata_too_large",
                e.to_string(),
            ),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        match e {
            StoreError::Input(i) => i.into(),
            StoreError::NotHeld => ApiError::unavailable(
                "store_unavailable",
                "the session store is unreachable and this node does not hold the session; retry shortly",
            ),
            e @ (StoreError::DiskFull { .. } | StoreError::DiskNoSpace(_)) => {
                tracing::warn!(error = %e, "write refused");
                ApiError::new(
                    StatusCode::INSUFFICIENT_STORAGE,
                    "insufficient_storage",
                    "the node's disk is almost full; writes are refused until space is freed",
                )
            }
            e @ StoreError::Full { .. } => {
                tracing::warn!(error = %e, "create refused");
                ApiError::unavailable(
                    "too_many_sessions",
                    "the session store is at its ceiling (max_sessions); retry later",
                )
            }
            e @ StoreError::JournalFull(_) => {
                tracing::warn!(error = %e, "write refused");
                ApiError::new(
                    StatusCode::INSUFFICIENT_STORAGE,
                    "journal_full",
                    "the node's outage journal is at its budget; changes are refused until redis returns",
                )
            }
            e @ StoreError::DiskFault(_) => {
                tracing::error!(error = %e, "store error");
                ApiError::unavailable(
                    "disk_fault",
                    "the node could not write to its disk; retry shortly",
                )
            }
            other => {
                tracing::error!(error = %other, "store error");
                ApiError::unavailable(
                    "store_unavailable",
                    "the session store is unavailable; retry shortly",
                )
            }
        }
    }
}
