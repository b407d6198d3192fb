//! Errors of the OpenAI-compatible API: a gRPC code becomes its HTTP status, every error has
//! OpenAI's `{"error": {...}}` shape, and a body that does not fit the schema is a 400 naming the field.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use moe_router::RouterError;
use serde_json::{json, Value};

/// An error answer: the gRPC code's HTTP status and OpenAI's error body.
pub enum ApiError {
    Router(RouterError),
    /// A body that is not JSON or does not fit the request's schema: 400, naming the field
    /// (`param`) where there is one, as OpenAI does (never axum's plain-text 422).
    Body {
        param: Option<String>,
        message: String,
    },
}

impl From<RouterError> for ApiError {
    fn from(e: RouterError) -> Self {
        Self::Router(e)
    }
}

/// The request body as a JSON object, or a 400 saying why it is not one.
pub(crate) fn json_object(raw: &[u8]) -> Result<Value, ApiError> {
    match serde_json::from_slice::<Value>(raw) {
        Ok(v) if v.is_object() => Ok(v),
        Ok(_) => Err(ApiError::Body { param: None, message: "the body must be a JSON object".into() }),
        Err(e) => Err(ApiError::Body { param: None, message: format!("the body is not valid JSON: {e}") }),
    }
}

/// `v` (the field `name` of the body, or the whole body when `name` is empty) as a `T`, or the
/// 400 that names the field that did not fit and why, as OpenAI does (never a plain-text 422).
pub(crate) fn field<T: serde::de::DeserializeOwned>(v: &Value, name: &str) -> Result<T, ApiError> {
    let value = match name {
        "" => v,
        _ => v.get(name).ok_or_else(|| ApiError::Body {
            param: Some(name.to_string()),
            message: format!("{name}: this field is required"),
        })?,
    };
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = match e.path().to_string() {
            inner if inner == "." => name.to_string(),
            inner if name.is_empty() => inner,
            inner if inner.starts_with('[') => format!("{name}{inner}"),
            inner => format!("{name}.{inner}"),
        };
        let message = match path.as_str() {
            "" => e.into_inner().to_string(),
            p => format!("{p}: {}", e.into_inner()),
        };
        ApiError::Body { param: (!path.is_empty()).then_some(path), message }
    })
}

pub fn http_status(code: tonic::Code) -> StatusCode {
    use tonic::Code as C;
    match code {
        C::InvalidArgument | C::OutOfRange => StatusCode::BAD_REQUEST,
        C::Unauthenticated => StatusCode::UNAUTHORIZED,
        C::PermissionDenied => StatusCode::FORBIDDEN,
        C::NotFound => StatusCode::NOT_FOUND,
        C::FailedPrecondition | C::AlreadyExists => StatusCode::CONFLICT,
        C::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        C::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        C::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

pub(crate) fn error_body(e: &RouterError) -> Value {
    let code = moe_router::outcome_label(e.code());
    let param = match e {
        RouterError::InvalidArgument { field, .. } => Some(*field),
        _ => None,
    };
    let kind = match e.code() {
        tonic::Code::InvalidArgument => "invalid_request_error",
        tonic::Code::Unauthenticated => "authentication_error",
        tonic::Code::PermissionDenied => "permission_error",
        tonic::Code::NotFound => "not_found_error",
        tonic::Code::ResourceExhausted => "rate_limit_error",
        _ => "server_error",
    };
    json!({"error": {"message": e.to_string(), "type": kind, "param": param, "code": code}})
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match self {
            ApiError::Router(e) => {
                let mut response = (http_status(e.code()), Json(error_body(&e))).into_response();
                if let Some(wait) = e.retry_after() {
                    let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
                    if let Ok(v) = axum::http::HeaderValue::from_str(&secs.to_string()) {
                        response.headers_mut().insert(axum::http::header::RETRY_AFTER, v);
                    }
                }
                response
            }
            ApiError::Body { param, message } => {
                let error = json!({"message": message, "type": "invalid_request_error", "param": param,
                                   "code": "invalid_argument"});
                (StatusCode::BAD_REQUEST, Json(json!({"error": error}))).into_response()
            }
        }
    }
}
