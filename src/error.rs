//! The one error type of the HTTP edge: every failure becomes the OCI error JSON
//! (`{"errors":[{"code":..,"message":..,"detail":..}]}`) with the status the protocol pairs
//! with its code. Engine errors are mapped here by cause; internal detail is logged here.

use actix_web::http::{header, StatusCode};
use actix_web::{HttpResponse, ResponseError};
use oci_spec::distribution::ErrorCode;
use pullcache_actors::reference::ReferenceError;
use pullcache_actors::{EngineError, UpstreamError};

/// Error codes: the OCI spec's, plus the Distribution extensions clients know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Code {
    Oci(ErrorCode),
    Unavailable,
    Unknown,
    PaginationNumberInvalid,
    TagInvalid,
}

impl Code {
    pub fn as_str(&self) -> String {
        match self {
            Code::Oci(c) => serde_json::to_value(c)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_else(|| "UNKNOWN".into()),
            Code::Unavailable => "UNAVAILABLE".into(),
            Code::Unknown => "UNKNOWN".into(),
            Code::PaginationNumberInvalid => "PAGINATION_NUMBER_INVALID".into(),
            Code::TagInvalid => "TAG_INVALID".into(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: Code,
    pub message: String,
    pub retry_after: Option<u64>,
    /// A `WWW-Authenticate` challenge (401s).
    pub challenge: Option<String>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: Code, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after: None,
            challenge: None,
        }
    }

    /// 401 UNAUTHORIZED with a Basic challenge in `realm`.
    pub fn unauthorized(realm: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            challenge: Some(format!("Basic realm=\"{realm}\", charset=\"UTF-8\"")),
            ..ApiError::oci(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized, message)
        }
    }

    /// 403 DENIED: authenticated, but not allowed by the access rules.
    pub fn denied(message: impl Into<String>) -> ApiError {
        ApiError::oci(StatusCode::FORBIDDEN, ErrorCode::Denied, message)
    }

    pub fn oci(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError::new(status, Code::Oci(code), message)
    }

    pub fn name_unknown(message: impl Into<String>) -> ApiError {
        ApiError::oci(StatusCode::NOT_FOUND, ErrorCode::NameUnknown, message)
    }

    pub fn unsupported(message: impl Into<String>) -> ApiError {
        ApiError::oci(
            StatusCode::METHOD_NOT_ALLOWED,
            ErrorCode::Unsupported,
            message,
        )
    }

    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({
            "errors": [{ "code": self.code.as_str(), "message": self.message, "detail": {} }]
        })
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.code.as_str(),
            self.message
        )
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.status
    }

    fn error_response(&self) -> HttpResponse {
        let mut r = HttpResponse::build(self.status);
        r.content_type("application/json");
        if let Some(s) = self.retry_after {
            r.insert_header((header::RETRY_AFTER, s.to_string()));
        }
        if let Some(c) = &self.challenge {
            r.insert_header((header::WWW_AUTHENTICATE, c.as_str()));
        }
        r.body(self.body().to_string())
    }
}

impl From<ReferenceError> for ApiError {
    fn from(e: ReferenceError) -> Self {
        let bad = StatusCode::BAD_REQUEST;
        match e {
            ReferenceError::NameInvalid | ReferenceError::NameTooLong => {
                ApiError::oci(bad, ErrorCode::NameInvalid, e.to_string())
            }
            ReferenceError::TagInvalid => ApiError::new(
                bad,
                Code::TagInvalid,
                "invalid tag: must match [a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}",
            ),
            ReferenceError::Digest(d) => {
                ApiError::oci(bad, ErrorCode::DigestInvalid, d.to_string())
            }
        }
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        let msg = e.to_string();
        match e {
            EngineError::ManifestUnknown(_) | EngineError::ManifestRefused(_) => {
                ApiError::oci(StatusCode::NOT_FOUND, ErrorCode::ManifestUnknown, msg)
            }
            EngineError::BlobUnknown(_) => {
                ApiError::oci(StatusCode::NOT_FOUND, ErrorCode::BlobUnknown, msg)
            }
            EngineError::NameUnknown(_) => ApiError::name_unknown(msg),
            EngineError::Denied(_) => ApiError::oci(StatusCode::FORBIDDEN, ErrorCode::Denied, msg),
            EngineError::Upstream(u) => upstream_error(u),
            EngineError::DigestMismatch { .. } => {
                tracing::error!(error = %msg, "refusing upstream content");
                ApiError::oci(StatusCode::BAD_GATEWAY, ErrorCode::DigestInvalid, msg)
            }
            // Out of file descriptors: not a broken store but a full process table. Say so
            // in the log, and let the client retry (the descriptors come back as responses
            // end).
            EngineError::Storage { ref source, .. } if out_of_descriptors(source) => {
                tracing::warn!(error = %msg, "out of file descriptors: raise the open-file limit (ulimit -n, systemd LimitNOFILE) or lower limits.max_fills");
                ApiError {
                    retry_after: Some(5),
                    ..ApiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        Code::Unavailable,
                        "too many open files; try again shortly",
                    )
                }
            }
            EngineError::Storage { .. } | EngineError::Metadata(_) | EngineError::Internal(_) => {
                // The detail (with its source chain) goes to the log, not to the client.
                tracing::error!(error = %msg, source = %std::error::Error::source(&e).map(|s| s.to_string()).unwrap_or_default(), "storage failure");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    Code::Unknown,
                    "internal storage error",
                )
            }
            EngineError::WaitTimedOut { .. } => {
                tracing::warn!(error = %msg, "a blob download stalled");
                ApiError::new(StatusCode::GATEWAY_TIMEOUT, Code::Unavailable, msg)
            }
            EngineError::UpstreamDown(_) | EngineError::StaleTooOld { .. } => ApiError {
                retry_after: Some(30),
                ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, Code::Unavailable, msg)
            },
            EngineError::DiskFull(_) | EngineError::Busy(_) => ApiError {
                retry_after: Some(5),
                ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, Code::Unavailable, msg)
            },
            EngineError::Unavailable(_) | EngineError::Abandoned => {
                tracing::error!(error = %msg, "engine unavailable");
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, Code::Unavailable, msg)
            }
        }
    }
}

/// Upstream trouble by cause: rate limit -> 429 with Retry-After, timeout -> 504,
/// unreachable or 5xx -> 502, refused access -> 403/404, anything else -> 502.
fn upstream_error(u: UpstreamError) -> ApiError {
    let msg = u.to_string();
    tracing::warn!(error = %msg, "upstream error");
    match u {
        UpstreamError::Status {
            status: 429,
            retry_after,
            ..
        } => ApiError {
            retry_after: Some(retry_after.unwrap_or(60)),
            ..ApiError::oci(
                StatusCode::TOO_MANY_REQUESTS,
                ErrorCode::TooManyRequests,
                msg,
            )
        },
        UpstreamError::Status { status: 403, .. } => {
            ApiError::oci(StatusCode::FORBIDDEN, ErrorCode::Denied, msg)
        }
        UpstreamError::Status { status: 404, .. } => ApiError::name_unknown(msg),
        UpstreamError::Timeout { .. } => {
            ApiError::new(StatusCode::GATEWAY_TIMEOUT, Code::Unavailable, msg)
        }
        UpstreamError::Unauthorized {
            anonymous: true, ..
        } => ApiError::name_unknown(msg),
        UpstreamError::Unauthorized {
            anonymous: false, ..
        } => ApiError::oci(StatusCode::FORBIDDEN, ErrorCode::Denied, msg),
        UpstreamError::Connect { .. }
        | UpstreamError::Status { .. }
        | UpstreamError::Protocol { .. } => {
            ApiError::new(StatusCode::BAD_GATEWAY, Code::Unavailable, msg)
        }
    }
}

/// EMFILE or ENFILE: the process's or the system's open-file table is full.
fn out_of_descriptors(e: &std::io::Error) -> bool {
    matches!(
        rustix::io::Errno::from_io_error(e),
        Some(rustix::io::Errno::MFILE | rustix::io::Errno::NFILE)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_out_of_file_descriptors_is_a_503_with_retry_after() {
        for errno in [rustix::io::Errno::MFILE, rustix::io::Errno::NFILE] {
            let e = EngineError::storage(
                "opening a stored blob",
                std::io::Error::from_raw_os_error(errno.raw_os_error()),
            );
            let a = ApiError::from(e);
            assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(a.retry_after, Some(5));
        }
        let e = EngineError::storage("opening a stored blob", std::io::ErrorKind::Other.into());
        assert_eq!(ApiError::from(e).status, StatusCode::INTERNAL_SERVER_ERROR);
    }

    #[test]
    fn codes_serialise_as_the_spec_names_them() {
        assert_eq!(
            Code::Oci(ErrorCode::ManifestUnknown).as_str(),
            "MANIFEST_UNKNOWN"
        );
        assert_eq!(
            Code::Oci(ErrorCode::TooManyRequests).as_str(),
            "TOOMANYREQUESTS"
        );
        assert_eq!(Code::Oci(ErrorCode::NameInvalid).as_str(), "NAME_INVALID");
        let e = ApiError::name_unknown("x");
        assert_eq!(e.body()["errors"][0]["code"], "NAME_UNKNOWN");
    }
}
