//! `/v1/sessions`: server-side chat history. Every route runs the plugin chain's
//! `on-request` (route `sessions`, no messages) to learn the caller's principal, so a
//! session is visible only to the principal that created it (404 to anyone else).
//! Chatting in a session is `POST /v1/chat/completions` with `session_id` (chat.rs).

use salvo::oapi::{ToParameters, ToSchema, endpoint};
use salvo::prelude::*;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{caller, read_body, state};
use crate::error::ApiError;
use crate::state::AppState;
use crate::store::{Session, SessionFields};

pub fn router() -> Router {
    Router::with_path("sessions").get(list_sessions).post(create_session).push(
        Router::with_path("{id}")
            .get(get_session)
            .patch(update_session)
            .delete(delete_session)
            .push(Router::with_path("rollback").post(rollback_session)),
    )
}

/// The fields of `POST /v1/sessions` and `PATCH /v1/sessions/{id}`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[salvo(schema(example = json!({"title": "Trip planning", "system_prompt": "Be brief."})))]
struct SessionBody {
    model: Option<String>,
    title: Option<String>,
    /// `null` clears it on PATCH.
    #[serde(default, deserialize_with = "present")]
    system_prompt: Option<Option<String>>,
    metadata: Option<Value>,
}

/// Tells an explicit `null` (`Some(None)`) from an absent field (`None`).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<String>>, D::Error> {
    Option::<String>::deserialize(d).map(Some)
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[salvo(schema(example = json!({"messages": 1})))]
struct RollbackBody {
    /// How many messages to remove from the end.
    messages: i64,
}

/// Parses a JSON body with the same field-naming errors as the chat routes.
async fn parse<T: serde::de::DeserializeOwned + Default>(req: &mut Request, state: &AppState) -> Result<T, ApiError> {
    let body = read_body(req, state).await?;
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    crate::request::parse_body(&body)
}

impl Default for RollbackBody {
    fn default() -> Self {
        RollbackBody { messages: 1 }
    }
}

fn fields(body: SessionBody, state: &AppState) -> Result<SessionFields, ApiError> {
    if let Some(model) = &body.model
        && state.registry.info(model).is_none()
    {
        return Err(ApiError::model_not_found(model));
    }
    if body.title.as_ref().is_some_and(|t| t.len() > 1024) {
        return Err(ApiError::invalid("title", "`title` may be at most 1024 bytes"));
    }
    Ok(SessionFields { model: body.model, title: body.title, system_prompt: body.system_prompt, metadata: body.metadata })
}

fn id(req: &Request) -> String {
    req.param::<String>("id").unwrap_or_default()
}

async fn with_messages(state: &AppState, session: Session) -> Result<Value, ApiError> {
    let messages = state.store.messages(&session).await?;
    let mut value = json!(session);
    value["messages"] = json!(messages);
    Ok(value)
}

/// Creates a session (owned by the caller's principal).
#[endpoint(tags("sessions"), status_codes(200, 400, 401, 403, 404, 413, 429, 503), request_body(content = SessionBody, description = "All fields optional"), responses((status_code = 200, description = "The new session", body = super::openapi::SessionWithMessages)))]
async fn create_session(req: &mut Request, depot: &mut Depot) -> Result<Json<Value>, ApiError> {
    let state = state(depot);
    let principal = caller(req).identify(&state, "sessions").await?;
    let body: SessionBody = parse(req, &state).await?;
    let session = state.store.create(&principal, state.registry.default_id(), fields(body, &state)?).await?;
    Ok(Json(with_messages(&state, session).await?))
}

#[derive(Debug, Deserialize, ToParameters)]
#[serde(deny_unknown_fields)]
#[salvo(parameters(default_parameter_in = Query))]
struct ListQuery {
    /// Sessions per page, 1 to 100 (default 20).
    limit: Option<usize>,
    /// The last id of the previous page.
    after: Option<String>,
}

/// The caller's sessions, most recently active first.
#[endpoint(tags("sessions"), status_codes(200, 400, 401, 403, 404, 429, 503), parameters(ListQuery), responses((status_code = 200, description = "A page of sessions", body = super::openapi::SessionList)))]
async fn list_sessions(req: &mut Request, depot: &mut Depot) -> Result<Json<Value>, ApiError> {
    let state = state(depot);
    let principal = caller(req).identify(&state, "sessions").await?;
    let query: ListQuery =
        req.parse_queries().map_err(|e| ApiError::invalid_code(None, "invalid_query", format!("Invalid query string: {e}")))?;
    let (sessions, has_more) = state.store.list(&principal, query.limit.unwrap_or(20), query.after.as_deref()).await?;
    Ok(Json(json!({
        "object": "list",
        "first_id": sessions.first().map(|s| s.id.clone()),
        "last_id": sessions.last().map(|s| s.id.clone()),
        "has_more": has_more,
        "data": sessions,
    })))
}

/// One session with its messages.
#[endpoint(tags("sessions"), status_codes(200, 401, 403, 404, 429, 503), parameters(("id" = String, Path, description = "The session id")), responses((status_code = 200, description = "The session", body = super::openapi::SessionWithMessages)))]
async fn get_session(req: &mut Request, depot: &mut Depot) -> Result<Json<Value>, ApiError> {
    let state = state(depot);
    let principal = caller(req).identify(&state, "sessions").await?;
    let session = state.store.get(&principal, &id(req)).await?;
    Ok(Json(with_messages(&state, session).await?))
}

/// Renames a session or changes its model, system prompt or metadata.
#[endpoint(tags("sessions"), status_codes(200, 400, 401, 403, 404, 413, 429, 503), parameters(("id" = String, Path, description = "The session id")), request_body(content = SessionBody, description = "The fields to change; `system_prompt: null` clears it"), responses((status_code = 200, description = "The session", body = super::openapi::SessionWithMessages)))]
async fn update_session(req: &mut Request, depot: &mut Depot) -> Result<Json<Value>, ApiError> {
    let state = state(depot);
    let principal = caller(req).identify(&state, "sessions").await?;
    let body: SessionBody = parse(req, &state).await?;
    let session = state.store.update(&principal, &id(req), fields(body, &state)?).await?;
    Ok(Json(with_messages(&state, session).await?))
}

/// Deletes a session and its messages.
#[endpoint(tags("sessions"), status_codes(200, 401, 403, 404, 429, 503), parameters(("id" = String, Path, description = "The session id")), responses((status_code = 200, description = "Deleted", body = super::openapi::SessionDeleted)))]
async fn delete_session(req: &mut Request, depot: &mut Depot) -> Result<Json<Value>, ApiError> {
    let state = state(depot);
    let principal = caller(req).identify(&state, "sessions").await?;
    let id = id(req);
    state.store.delete(&principal, &id).await?;
    Ok(Json(json!({"id": id, "object": "session.deleted", "deleted": true})))
}

/// Removes the last `messages` messages (default 1). Regenerate = roll back the reply, then
/// chat with `session_id` and no new messages; edit = roll back to the message, then send
/// its new text.
#[endpoint(tags("sessions"), status_codes(200, 400, 401, 403, 404, 413, 429, 503), parameters(("id" = String, Path, description = "The session id")), request_body(content = RollbackBody, description = "`messages`: how many to remove (default 1)"), responses((status_code = 200, description = "The session after the rollback", body = super::openapi::SessionWithMessages)))]
async fn rollback_session(req: &mut Request, depot: &mut Depot) -> Result<Json<Value>, ApiError> {
    let state = state(depot);
    let principal = caller(req).identify(&state, "sessions").await?;
    let body: RollbackBody = parse(req, &state).await?;
    let session = state.store.rollback(&principal, &id(req), body.messages).await?;
    Ok(Json(with_messages(&state, session).await?))
}
