//! `/v1/sessions`: server-side chat history. Every route runs the plugin chain's
//! `on-request` (route `sessions`, no messages) to learn the caller's principal, so a
//! session is visible only to the principal that created it (404 to anyone else).
//! Chatting in a session is `POST /v1/chat/completions` with `session_id` (chat.rs).

use salvo::prelude::*;
use serde::Deserialize;
use serde_json::{Value, json};

use super::chat::Caller;
use super::error::ApiError;
use super::{AppState, read_body, state};
use crate::store::{Session, SessionFields};

pub fn router() -> Router {
    Router::with_path("sessions")
        .get(list_sessions)
        .post(create_session)
        .push(
            Router::with_path("{id}")
                .get(get_session)
                .patch(update_session)
                .delete(delete_session)
                .push(Router::with_path("rollback").post(rollback_session)),
        )
}

/// The fields of `POST /v1/sessions` and `PATCH /v1/sessions/{id}`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
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
    super::types::parse_body(&body)
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

#[handler]
async fn create_session(req: &mut Request, depot: &mut Depot) -> Result<Json<Value>, ApiError> {
    let state = state(depot);
    let principal = Caller::from_request(req).identify(&state, "sessions").await?;
    let body: SessionBody = parse(req, &state).await?;
    let session = state.store.create(&principal, state.registry.default_id(), fields(body, &state)?).await?;
    Ok(Json(with_messages(&state, session).await?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    limit: Option<usize>,
    after: Option<String>,
}

#[handler]
async fn list_sessions(req: &mut Request, depot: &mut Depot) -> Result<Json<Value>, ApiError> {
    let state = state(depot);
    let principal = Caller::from_request(req).identify(&state, "sessions").await?;
    let query: ListQuery = req
        .parse_queries()
        .map_err(|e| ApiError::invalid_code(None, "invalid_query", format!("Invalid query string: {e}")))?;
    let (sessions, has_more) = state.store.list(&principal, query.limit.unwrap_or(20), query.after.as_deref()).await?;
    Ok(Json(json!({
        "object": "list",
        "first_id": sessions.first().map(|s| s.id.clone()),
        "last_id": sessions.last().map(|s| s.id.clone()),
        "has_more": has_more,
        "data": sessions,
    })))
}

#[handler]
async fn get_session(req: &mut Request, depot: &mut Depot) -> Result<Json<Value>, ApiError> {
    let state = state(depot);
    let principal = Caller::from_request(req).identify(&state, "sessions").await?;
    let session = state.store.get(&principal, &id(req)).await?;
    Ok(Json(with_messages(&state, session).await?))
}

#[handler]
async fn update_session(req: &mut Request, depot: &mut Depot) -> Result<Json<Value>, ApiError> {
    let state = state(depot);
    let principal = Caller::from_request(req).identify(&state, "sessions").await?;
    let body: SessionBody = parse(req, &state).await?;
    let session = state.store.update(&principal, &id(req), fields(body, &state)?).await?;
    Ok(Json(with_messages(&state, session).await?))
}

#[handler]
async fn delete_session(req: &mut Request, depot: &mut Depot) -> Result<Json<Value>, ApiError> {
    let state = state(depot);
    let principal = Caller::from_request(req).identify(&state, "sessions").await?;
    let id = id(req);
    state.store.delete(&principal, &id).await?;
    Ok(Json(json!({"id": id, "object": "session.deleted", "deleted": true})))
}

/// Removes the last `messages` messages (default 1). Regenerate = roll back the reply, then
/// chat with `session_id` and no new messages; edit = roll back to the message, then send
/// its new text.
#[handler]
async fn rollback_session(req: &mut Request, depot: &mut Depot) -> Result<Json<Value>, ApiError> {
    let state = state(depot);
    let principal = Caller::from_request(req).identify(&state, "sessions").await?;
    let body: RollbackBody = parse(req, &state).await?;
    let session = state.store.rollback(&principal, &id(req), body.messages).await?;
    Ok(Json(with_messages(&state, session).await?))
}
