//! Every error is an OperationOutcome with an HTTP status; this is the one place that mapping lives.

use crate::store::StoreError;
use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use fhir_codec::Issue;
use serde_json::{json, Value};

pub const FHIR_JSON: &str = "application/fhir+json; charset=utf-8";

/// `Retry-After` (seconds) on every 503.
pub const RETRY_AFTER_SECS: u32 = 5;

#[derive(Debug)]
pub struct FhirError {
    pub status: StatusCode,
    pub issues: Vec<Issue>,
}

impl FhirError {
    pub fn new(
        status: StatusCode,
        code: &'static str,
        diagnostics: impl Into<String>,
    ) -> FhirError {
        FhirError::at(status, code, String::new(), diagnostics)
    }
    pub fn at(
        status: StatusCode,
        code: &'static str,
        expression: impl Into<String>,
        diagnostics: impl Into<String>,
    ) -> FhirError {
        FhirError {
            status,
            issues: vec![Issue {
                code,
                expression: expression.into(),
                diagnostics: diagnostics.into(),
            }],
        }
    }
    /// The same error, its issues placed at `expression` (a check reused inside another resource).
    pub fn at_path(mut self, expression: &str) -> FhirError {
        for i in &mut self.issues {
            i.expression = expression.to_string();
        }
        self
    }
    pub fn bad_request(diagnostics: impl Into<String>) -> FhirError {
        FhirError::new(StatusCode::BAD_REQUEST, "invalid", diagnostics)
    }
    pub fn not_found(diagnostics: impl Into<String>) -> FhirError {
        FhirError::new(StatusCode::NOT_FOUND, "not-found", diagnostics)
    }
    pub fn invalid_resource(issues: Vec<Issue>) -> FhirError {
        FhirError {
            status: StatusCode::BAD_REQUEST,
            issues,
        }
    }
    pub fn internal() -> FhirError {
        FhirError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "exception",
            "internal error; see the server log for the request id",
        )
    }
    /// 503 `transient` with `Retry-After`: the server cannot do this now (its storage cannot be
    /// written: disk full, read-only, unreachable); nothing was served or changed.
    pub fn unavailable(why: &str) -> FhirError {
        FhirError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "transient",
            format!("{why}; nothing was served or changed: retry later"),
        )
    }
    /// 503 `transient` with `Retry-After` from a storage failure met while a request ran: nothing
    /// was served, but a write's commit may have reached the database before it failed (a
    /// connection lost during the commit leaves its outcome unknown), so this says so rather
    /// than "nothing was changed", which would have a client send a saved message twice.
    pub fn unavailable_in_flight(why: &str) -> FhirError {
        FhirError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "transient",
            format!(
                "{why}; nothing was served: retry later. A write may have been saved if the \
                 database failed while committing it: retry a create with If-None-Exist, or read \
                 before writing again"
            ),
        )
    }
    /// This error as answered to a request that can have written nothing (a read, search or
    /// history): a storage 503 says "nothing was served or changed", not the in-flight write's
    /// "may have been saved" ([`FhirError::unavailable_in_flight`]); anything else as it is.
    pub fn for_a_read(self) -> FhirError {
        if self.status != StatusCode::SERVICE_UNAVAILABLE {
            return self;
        }
        let said = self.issues.first().map_or("", |i| i.diagnostics.as_str());
        FhirError::unavailable(said.split(';').next().unwrap_or_default())
    }
    pub fn outcome(&self) -> Value {
        outcome(&self.issues, "error")
    }
}

impl std::fmt::Display for FhirError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({} issues)", self.status, self.issues.len())
    }
}

impl ResponseError for FhirError {
    fn status_code(&self) -> StatusCode {
        self.status
    }
    fn error_response(&self) -> HttpResponse {
        let mut r = HttpResponse::build(self.status);
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            r.insert_header((
                actix_web::http::header::RETRY_AFTER,
                RETRY_AFTER_SECS.to_string(),
            ));
        }
        r.content_type(FHIR_JSON).body(self.outcome().to_string())
    }
}

impl From<StoreError> for FhirError {
    fn from(e: StoreError) -> FhirError {
        if let Some(why) = crate::store::health::unavailable(&e) {
            tracing::error!(error = %e, "the database cannot be written");
            // A full or read-only database refuses the write before anything commits (SQLite
            // rolls it back; PostgreSQL aborts the statement): nothing was changed. A lost
            // connection, an I/O error or a timeout may have met the commit itself.
            return match why {
                crate::store::health::FULL | crate::store::health::READ_ONLY => {
                    FhirError::unavailable(why)
                }
                _ => FhirError::unavailable_in_flight(why),
            };
        }
        match e {
            StoreError::NotFound(t, id) => FhirError::not_found(format!("{t}/{id} is not known")),
            StoreError::Gone(t, id) => FhirError::new(
                StatusCode::GONE,
                "deleted",
                format!("{t}/{id} has been deleted"),
            ),
            StoreError::PreconditionFailed(m) => {
                FhirError::new(StatusCode::PRECONDITION_FAILED, "conflict", m)
            }
            StoreError::Conflict(m) => FhirError::new(StatusCode::CONFLICT, "conflict", m),
            StoreError::Forbidden(m) => FhirError::new(StatusCode::FORBIDDEN, "forbidden", m),
            StoreError::Invalid(issues) => FhirError::invalid_resource(issues),
            StoreError::Db(e) => {
                tracing::error!(error = %e, "database error");
                FhirError::internal()
            }
            StoreError::Other(e) => {
                tracing::error!(error = %e, "store error");
                FhirError::internal()
            }
        }
    }
}

/// An OperationOutcome for `issues` at `severity`.
pub fn outcome(issues: &[Issue], severity: &str) -> Value {
    let issue: Vec<Value> = issues
        .iter()
        .map(|i| {
            let mut v = json!({"severity": severity, "code": i.code, "diagnostics": i.diagnostics});
            if !i.expression.is_empty() {
                v["expression"] = json!([i.expression]);
            }
            v
        })
        .collect();
    json!({"resourceType": "OperationOutcome", "issue": issue})
}

/// An informational OperationOutcome (e.g. for `Prefer: return=OperationOutcome`).
pub fn information(message: &str) -> Value {
    json!({"resourceType": "OperationOutcome", "issue": [{"severity": "information", "code": "informational", "diagnostics": message}]})
}
