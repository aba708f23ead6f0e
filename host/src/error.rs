//! The one client-facing error type and the one place that turns it into the OpenAI shape
//! `{"error":{"message","type","param","code"}}`. The HTTP body, the SSE error event and
//! the catcher for unmatched routes all call [`ApiError::body`]; handlers only use `?`.

use salvo::http::StatusCode;
use salvo::prelude::*;
use serde_json::{Value, json};

use crate::engine::EngineError;
use crate::engine::grammar::GrammarError;
use crate::engine::template::TemplateError;
use crate::store::StoreError;

/// A client-facing error: status, OpenAI `type`, optional `param` and `code`, message.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub message: String,
    pub param: Option<String>,
    pub code: Option<String>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, code: Option<&str>, message: impl Into<String>) -> ApiError {
        ApiError { status, kind, message: message.into(), param: None, code: code.map(str::to_string) }
    }

    /// 400: the request is malformed or a value is out of range.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> ApiError {
        ApiError { param: Some(param.into()), ..Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", None, message) }
    }

    /// 400 with a machine-readable code.
    pub fn invalid_code(param: Option<&str>, code: &str, message: impl Into<String>) -> ApiError {
        ApiError { param: param.map(str::to_string), ..Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", Some(code), message) }
    }

    /// 400 for a parameter wisp understands but does not implement.
    pub fn unsupported(param: &str, message: impl Into<String>) -> ApiError {
        Self::invalid_code(Some(param), "unsupported_parameter", message)
    }

    pub fn model_not_found(model: &str) -> ApiError {
        ApiError {
            param: Some("model".into()),
            ..Self::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                Some("model_not_found"),
                format!("The model `{model}` does not exist"),
            )
        }
    }

    /// The engine failed on an accepted request.
    pub fn engine_failure(message: String) -> ApiError {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", Some("engine_error"), message)
    }

    /// A plugin refused the request; its status must be a client error (else 403).
    pub fn denied(denial: crate::policy::Denial) -> ApiError {
        let status = StatusCode::from_u16(denial.status).ok().filter(|s| s.is_client_error()).unwrap_or(StatusCode::FORBIDDEN);
        let kind = match status {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::FORBIDDEN => "permission_error",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            _ => "invalid_request_error",
        };
        ApiError { status, kind, message: denial.message, param: None, code: Some(denial.code) }
    }

    /// An `/admin` refusal.
    pub fn admin(status: StatusCode, code: &str, message: &str) -> ApiError {
        Self::new(status, "invalid_request_error", Some(code), message)
    }

    /// The server is stopping: a stream still open when the grace period ends.
    pub fn shutting_down() -> ApiError {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            Some("server_shutting_down"),
            "The server is shutting down; the reply was cut. Retry on another replica.",
        )
    }

    /// A request ran past its route's time limit.
    pub fn timed_out(seconds: u64) -> ApiError {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            Some("request_timeout"),
            format!("The request took longer than this route's limit of {seconds} s"),
        )
    }

    pub fn not_ready(message: impl Into<String>) -> ApiError {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", Some("not_ready"), message)
    }

    /// Any status without a specific error (unmatched route, wrong method, …).
    pub fn from_status(status: StatusCode) -> ApiError {
        let (kind, code, message) = match status {
            StatusCode::NOT_FOUND => ("invalid_request_error", "not_found", "No such route".to_string()),
            StatusCode::METHOD_NOT_ALLOWED => {
                ("invalid_request_error", "method_not_allowed", "This route does not accept that method".to_string())
            }
            StatusCode::PAYLOAD_TOO_LARGE => ("invalid_request_error", "payload_too_large", "The request body is too large".to_string()),
            s if s.is_client_error() => ("invalid_request_error", "bad_request", s.to_string()),
            s => ("server_error", "internal_error", s.to_string()),
        };
        Self::new(status, kind, Some(code), message)
    }

    pub fn with_param(self, param: impl Into<String>) -> ApiError {
        ApiError { param: Some(param.into()), ..self }
    }

    /// The label used for the errors metric.
    pub fn metric_type(&self) -> &str {
        self.code.as_deref().unwrap_or(self.kind)
    }

    /// The OpenAI error body.
    pub fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status.as_u16(), self.kind, self.message)
    }
}

impl std::error::Error for ApiError {}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        match e {
            StoreError::NotFound(id) => ApiError {
                param: Some("session_id".into()),
                ..ApiError::new(StatusCode::NOT_FOUND, "invalid_request_error", Some("session_not_found"), format!("No session `{id}`"))
            },
            StoreError::Invalid { param, code, message } => ApiError::invalid_code(Some(param), code, message),
            e if e.is_out_of_space() => {
                tracing::error!(error = %e, "the session store is out of space");
                ApiError::new(
                    StatusCode::INSUFFICIENT_STORAGE,
                    "server_error",
                    Some("store_full"),
                    "The session store is out of disk space; nothing was stored",
                )
            }
            e @ (StoreError::Db(_) | StoreError::Migrate(_) | StoreError::InUse(_)) => {
                tracing::error!(error = %e, "session store failed");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "server_error",
                    Some("store_unavailable"),
                    "The session store is unavailable; try again",
                )
            }
        }
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> ApiError {
        let message = e.to_string();
        match e {
            EngineError::UnknownModel(id) => ApiError::model_not_found(&id),
            EngineError::Load { .. } => {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", Some("model_load_failed"), message)
            }
            EngineError::Overloaded(_) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", Some("engine_overloaded"), message)
            }
            EngineError::Stopped(_) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", Some("engine_stopped"), message),
            // A template that does not compile is the server's fault, never the messages'.
            EngineError::Template(t) => ApiError::from(t),
            EngineError::Grammar(GrammarError::Unsupported(message)) => ApiError {
                param: Some("response_format".into()),
                ..ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    Some("unsupported_schema"),
                    format!("The response format cannot be enforced: {message}"),
                )
            },
            EngineError::Grammar(GrammarError::Unavailable(_)) => {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", Some("grammar_unavailable"), message)
            }
            EngineError::UpstreamUnavailable { .. } => {
                ApiError::new(StatusCode::BAD_GATEWAY, "server_error", Some("upstream_unavailable"), message)
            }
            EngineError::UpstreamRefused { status, .. } => ApiError::new(
                StatusCode::from_u16(status).ok().filter(|s| s.is_client_error()).unwrap_or(StatusCode::BAD_REQUEST),
                "invalid_request_error",
                Some("upstream_refused"),
                message,
            ),
        }
    }
}

impl From<crate::policy::PolicyError> for ApiError {
    fn from(e: crate::policy::PolicyError) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", Some("policy_failed"), e.to_string())
    }
}

impl From<TemplateError> for ApiError {
    fn from(e: TemplateError) -> ApiError {
        match e {
            TemplateError::Rejected(message) => ApiError {
                param: Some("messages".into()),
                ..ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", Some("invalid_messages"), message)
            },
            TemplateError::Compile(message) => {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", Some("bad_chat_template"), message)
            }
        }
    }
}

/// The error code of a response, for the errors metric (the `track` hoop reads it).
#[derive(Debug, Clone)]
pub struct ErrorLabel(pub String);

impl Scribe for ApiError {
    fn render(self, res: &mut Response) {
        res.extensions.insert(ErrorLabel(self.metric_type().to_string()));
        res.status_code(self.status);
        res.render(Json(self.body()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_has_the_openai_shape() {
        let e = ApiError::invalid("temperature", "temperature must be between 0 and 2, got 3");
        assert_eq!(
            e.body(),
            json!({"error": {"message": "temperature must be between 0 and 2, got 3", "type": "invalid_request_error", "param": "temperature", "code": null}})
        );
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
    }

    #[test]
    fn a_chat_template_that_does_not_compile_is_a_server_error() {
        let e = ApiError::from(EngineError::Template(TemplateError::Compile("unexpected end of input".into())));
        assert_eq!(e.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!((e.kind, e.code.as_deref(), e.param.as_deref()), ("server_error", Some("bad_chat_template"), None));
    }

    #[test]
    fn unknown_model_is_404_model_not_found() {
        let e = ApiError::from(EngineError::UnknownModel("nope".into()));
        assert_eq!(e.status, StatusCode::NOT_FOUND);
        assert_eq!(e.code.as_deref(), Some("model_not_found"));
    }
}
