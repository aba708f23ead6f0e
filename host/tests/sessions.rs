//! Sessions end to end on both backends (a SQLite file, and a fresh Postgres database per
//! test): three turns over HTTP, SSE and WebSocket, rollback and regenerate, a restart,
//! kill -9 mid-stream, two replicas on one Postgres, ownership under the auth plugin,
//! pruning to a small context, and the WebSocket protocol's edges.

mod common;

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{Server, client, default_model_path, workspace_root};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tungstenite::stream::MaybeTlsStream;
use wisp::store::testing::TestDatabase;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// Where a test's server keeps its sessions.
enum Db {
    /// `sqlite://wisp.db` in the server's own directory (the default).
    Sqlite,
    Postgres(TestDatabase),
}

impl Db {
    fn postgres() -> Db {
        Db::Postgres(runtime().block_on(TestDatabase::create()))
    }

    fn toml(&self) -> String {
        match self {
            Db::Sqlite => String::new(),
            Db::Postgres(db) => format!("[store]\nurl = \"{}\"\n", db.url),
        }
    }
}

impl Drop for Db {
    fn drop(&mut self) {
        if let Db::Postgres(db) = self {
            runtime().block_on(db.remove());
        }
    }
}

fn sha256_hex(text: &str) -> String {
    Sha256::digest(text.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

/// The model, the store, and the api-key-auth plugin with keys `sk-alice` and `sk-bob`.
fn config(db: &Db, extra: &str) -> String {
    let dist = workspace_root().join("plugins/dist");
    format!(
        "{extra}\n[[models]]\nid = \"gemma-3-270m\"\npath = \"{}\"\n{}\n[[plugins]]\nname = \"auth\"\nwasm = \"{}/api_key_auth.wasm\"\n\
         config = {{ keys = [{{ name = \"alice\", sha256 = \"{}\", models = [\"*\"] }}, {{ name = \"bob\", sha256 = \"{}\", models = [\"*\"] }}] }}\n",
        default_model_path().display(),
        db.toml(),
        dist.display(),
        sha256_hex("sk-alice"),
        sha256_hex("sk-bob"),
    )
}

fn call(server: &Server, method: &str, path: &str, key: &str, body: Option<Value>) -> (u16, Value) {
    let mut request = client().request(method.parse().unwrap(), server.url(path)).bearer_auth(key);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().unwrap();
    let status = response.status().as_u16();
    (status, response.json().unwrap_or(Value::Null))
}

fn create_session(server: &Server, key: &str, body: Value) -> String {
    let (status, session) = call(server, "POST", "/v1/sessions", key, Some(body));
    assert_eq!(status, 200, "{session}");
    session["id"].as_str().unwrap().to_string()
}

fn messages(server: &Server, key: &str, id: &str) -> Vec<(String, String)> {
    let (status, session) = call(server, "GET", &format!("/v1/sessions/{id}"), key, None);
    assert_eq!(status, 200, "{session}");
    session["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["role"].as_str().unwrap().to_string(), m["content"].as_str().unwrap().to_string()))
        .collect()
}

/// One non-streamed session turn; returns the reply and the response.
fn turn(server: &Server, key: &str, id: &str, content: Option<&str>) -> (String, Value) {
    let messages: Vec<Value> = content.map(|c| json!({"role": "user", "content": c})).into_iter().collect();
    let body = json!({"session_id": id, "messages": messages, "max_tokens": 6, "temperature": 0});
    let (status, response) = call(server, "POST", "/v1/chat/completions", key, Some(body));
    assert_eq!(status, 200, "{response}");
    (response["choices"][0]["message"]["content"].as_str().unwrap().to_string(), response)
}

/// One streamed session turn over SSE; returns the reply.
fn streamed_turn(server: &Server, key: &str, id: &str, content: &str) -> String {
    let body =
        json!({"session_id": id, "messages": [{"role": "user", "content": content}], "max_tokens": 6, "temperature": 0, "stream": true});
    let response = client().post(server.url("/v1/chat/completions")).bearer_auth(key).json(&body).send().unwrap();
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(response.headers()["x-wisp-session-id"], id);
    let mut reply = String::new();
    for line in BufReader::new(response).lines() {
        let line = line.unwrap();
        let Some(data) = line.strip_prefix("data: ") else { continue };
        if data == "[DONE]" {
            return reply;
        }
        let chunk: Value = serde_json::from_str(data).unwrap();
        reply.push_str(chunk["choices"][0]["delta"]["content"].as_str().unwrap_or(""));
    }
    panic!("the stream ended without [DONE]");
}

type Socket = tungstenite::WebSocket<MaybeTlsStream<TcpStream>>;

fn socket(server: &Server) -> Socket {
    let url = server.url("/v1/chat/ws").replace("http://", "ws://");
    let (socket, _) = tungstenite::connect(url).unwrap();
    if let MaybeTlsStream::Plain(stream) = socket.get_ref() {
        stream.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    }
    socket
}

fn send(socket: &mut Socket, frame: Value) {
    socket.send(tungstenite::Message::text(frame.to_string())).unwrap();
}

fn recv(socket: &mut Socket) -> Value {
    loop {
        match socket.read().unwrap() {
            tungstenite::Message::Text(text) => return serde_json::from_str(&text).unwrap(),
            tungstenite::Message::Ping(_) | tungstenite::Message::Pong(_) => continue,
            other => panic!("unexpected frame {other:?}"),
        }
    }
}

/// Reads frames until `done` or `error`; returns the text and the last frame.
fn ws_reply(socket: &mut Socket) -> (String, Value) {
    let mut text = String::new();
    loop {
        let frame = recv(socket);
        match frame["type"].as_str().unwrap() {
            "delta" => text.push_str(frame["content"].as_str().unwrap()),
            "start" => {}
            "done" | "error" => return (text, frame),
            other => panic!("unexpected frame type {other}: {frame}"),
        }
    }
}

fn ws_turn(server: &Server, key: &str, id: &str, content: &str) -> String {
    let mut ws = socket(server);
    let request = json!({"session_id": id, "messages": [{"role": "user", "content": content}], "max_tokens": 6, "temperature": 0});
    send(&mut ws, json!({"type": "chat", "id": "t3", "api_key": key, "request": request}));
    let (text, done) = ws_reply(&mut ws);
    assert_eq!(done["type"], "done", "{done}");
    assert_eq!(done["id"], "t3");
    text
}

/// The walk-through: create, three turns (HTTP, SSE, WebSocket), roll back,
/// regenerate, restart, history intact; another principal sees none of it.
fn session_lifecycle(db: Db) {
    let mut server = Server::start_with_config(&config(&db, ""));
    let id = create_session(&server, "sk-alice", json!({"system_prompt": "You answer in one word.", "title": ""}));
    let (first, response) = turn(&server, "sk-alice", &id, Some("Name a colour."));
    assert_eq!(response["session_id"], id.as_str());
    assert_eq!(response["pruned_messages"], 0);
    let second = streamed_turn(&server, "sk-alice", &id, "Name a fruit.");
    let third = ws_turn(&server, "sk-alice", &id, "Name an animal.");
    let expected = [
        ("user", "Name a colour."),
        ("assistant", first.as_str()),
        ("user", "Name a fruit."),
        ("assistant", second.as_str()),
        ("user", "Name an animal."),
        ("assistant", third.as_str()),
    ];
    let expected: Vec<(String, String)> = expected.iter().map(|(r, c)| (r.to_string(), c.to_string())).collect();
    assert_eq!(messages(&server, "sk-alice", &id), expected);

    // The second turn saw the first: its prompt is longer than a fresh one.
    let (_, session) = call(&server, "GET", &format!("/v1/sessions/{id}"), "sk-alice", None);
    assert_eq!(session["title"], "Name a colour.");
    let usage = |i: usize| session["messages"][i]["usage"]["prompt_tokens"].as_i64().unwrap();
    assert!(usage(3) > usage(1) && usage(5) > usage(3), "history grows the prompt: {session}");

    // Roll back the last turn, then regenerate the reply to the second question.
    let (status, rolled) = call(&server, "POST", &format!("/v1/sessions/{id}/rollback"), "sk-alice", Some(json!({"messages": 3})));
    assert_eq!(status, 200, "{rolled}");
    assert_eq!(rolled["message_count"], 3);
    let (regenerated, _) = turn(&server, "sk-alice", &id, None);
    assert_eq!(regenerated, second, "greedy regeneration of the same history gives the same reply");
    assert_eq!(messages(&server, "sk-alice", &id), expected[..4].to_vec());

    // Rename; another principal can see, change or use none of it.
    let (status, _) = call(&server, "PATCH", &format!("/v1/sessions/{id}"), "sk-alice", Some(json!({"title": "colours"})));
    assert_eq!(status, 200);
    for (method, path, body) in [
        ("GET", format!("/v1/sessions/{id}"), None),
        ("PATCH", format!("/v1/sessions/{id}"), Some(json!({"title": "mine"}))),
        ("POST", format!("/v1/sessions/{id}/rollback"), Some(json!({"messages": 1}))),
        ("DELETE", format!("/v1/sessions/{id}"), None),
        ("POST", "/v1/chat/completions".to_string(), Some(json!({"session_id": id, "messages": [{"role": "user", "content": "hi"}]}))),
    ] {
        let (status, error) = call(&server, method, &path, "sk-bob", body);
        assert_eq!((status, error["error"]["code"].as_str()), (404, Some("session_not_found")), "{method} {path}: {error}");
    }
    let (_, bobs) = call(&server, "GET", "/v1/sessions", "sk-bob", None);
    assert_eq!(bobs["data"].as_array().unwrap().len(), 0);
    let (status, _) = call(&server, "GET", "/v1/sessions", "sk-wrong", None);
    assert_eq!(status, 401);

    // Restart without any shutdown: everything is still there.
    server.kill_and_restart();
    assert_eq!(messages(&server, "sk-alice", &id), expected[..4].to_vec());
    let (_, list) = call(&server, "GET", "/v1/sessions", "sk-alice", None);
    assert_eq!(list["data"][0]["id"], id.as_str());
    assert_eq!(list["data"][0]["title"], "colours");
    let (status, deleted) = call(&server, "DELETE", &format!("/v1/sessions/{id}"), "sk-alice", None);
    assert_eq!((status, deleted["deleted"].as_bool()), (200, Some(true)));
    let (status, _) = call(&server, "GET", &format!("/v1/sessions/{id}"), "sk-alice", None);
    assert_eq!(status, 404);
}

#[test]
fn session_lifecycle_on_sqlite() {
    session_lifecycle(Db::Sqlite);
}

#[test]
fn session_lifecycle_on_postgres() {
    session_lifecycle(Db::postgres());
}

/// kill -9 while a turn streams: after the restart the history is what it was before the
/// turn (no user message without its reply), and the session goes on.
fn kill_mid_stream(db: Db) {
    let mut server = Server::start_with_config(&config(&db, ""));
    let id = create_session(&server, "sk-alice", json!({}));
    turn(&server, "sk-alice", &id, Some("Count to three."));
    let before = messages(&server, "sk-alice", &id);
    assert_eq!(before.len(), 2);

    let body =
        json!({"session_id": id, "messages": [{"role": "user", "content": "Write a long story."}], "max_tokens": 400, "stream": true});
    let response = client().post(server.url("/v1/chat/completions")).bearer_auth("sk-alice").json(&body).send().unwrap();
    let mut reader = BufReader::new(response);
    let mut chunks = 0;
    let mut line = String::new();
    while chunks < 5 {
        line.clear();
        assert!(reader.read_line(&mut line).unwrap() > 0, "the stream ended early");
        chunks += line.starts_with("data: ") as usize;
    }
    server.kill_and_restart();
    drop(reader);
    assert_eq!(messages(&server, "sk-alice", &id), before, "no half turn after kill -9");
    turn(&server, "sk-alice", &id, Some("Again."));
    assert_eq!(messages(&server, "sk-alice", &id).len(), 4);
}

#[test]
fn kill_mid_stream_leaves_no_half_turn_on_sqlite() {
    kill_mid_stream(Db::Sqlite);
}

#[test]
fn kill_mid_stream_leaves_no_half_turn_on_postgres() {
    kill_mid_stream(Db::postgres());
}

#[test]
fn two_replicas_on_one_postgres_share_sessions() {
    let db = Db::postgres();
    let a = Server::start_with_config(&config(&db, ""));
    let b = Server::start_with_config(&config(&db, ""));
    let id = create_session(&a, "sk-alice", json!({"system_prompt": "Be brief."}));
    turn(&a, "sk-alice", &id, Some("Hello from replica a."));
    let (_, response) = turn(&b, "sk-alice", &id, Some("And hello from replica b."));
    assert_eq!(response["session_id"], id.as_str());
    let on_a = messages(&a, "sk-alice", &id);
    assert_eq!(on_a, messages(&b, "sk-alice", &id));
    let users: Vec<_> = on_a.iter().filter(|(r, _)| r == "user").map(|(_, c)| c.as_str()).collect();
    assert_eq!(users, ["Hello from replica a.", "And hello from replica b."]);
    // The b turn's prompt held a's turn.
    let (_, session) = call(&b, "GET", &format!("/v1/sessions/{id}"), "sk-alice", None);
    assert!(session["messages"][3]["usage"]["prompt_tokens"].as_i64() > session["messages"][1]["usage"]["prompt_tokens"].as_i64());
}

/// A 256-token context: old turns are left out (whole, oldest first), the response says
/// how many, and a new message too big on its own is refused.
#[test]
fn history_is_pruned_to_the_context_by_tokens() {
    let db = Db::Sqlite;
    let toml =
        format!("[[models]]\nid = \"gemma-3-270m\"\npath = \"{}\"\ncontext_length = 256\n{}", default_model_path().display(), db.toml());
    let server = Server::start_with_config(&toml);
    let id = create_session(&server, "any", json!({"system_prompt": "Keep this system prompt."}));
    let filler = "The quick brown fox jumps over the lazy dog again and again. ".repeat(3);
    let mut pruned = Vec::new();
    let mut prompts = Vec::new();
    for i in 0..6 {
        let body = json!({"session_id": id, "messages": [{"role": "user", "content": format!("{i}: {filler}")}], "max_tokens": 16, "temperature": 0});
        let (status, response) = call(&server, "POST", "/v1/chat/completions", "any", Some(body));
        assert_eq!(status, 200, "{response}");
        pruned.push(response["pruned_messages"].as_u64().unwrap());
        prompts.push(response["usage"]["prompt_tokens"].as_u64().unwrap());
    }
    assert_eq!(pruned[0], 0);
    assert!(pruned.last().unwrap() > &0, "old turns were left out: {pruned:?}");
    assert!(pruned.iter().all(|p| p % 2 == 0), "whole turns are left out: {pruned:?}");
    // 256 context, 16 reserved for the reply.
    assert!(prompts.iter().all(|&p| p <= 240), "{prompts:?}");
    // Nothing is deleted: the session keeps every message.
    assert_eq!(messages(&server, "any", &id).len(), 12);

    let huge = "word ".repeat(400);
    let body = json!({"session_id": id, "messages": [{"role": "user", "content": huge}], "max_tokens": 16});
    let (status, error) = call(&server, "POST", "/v1/chat/completions", "any", Some(body));
    assert_eq!((status, error["error"]["code"].as_str()), (400, Some("context_length_exceeded")), "{error}");
    assert_eq!(messages(&server, "any", &id).len(), 12, "a refused turn stores nothing");
}

#[test]
fn bad_session_requests_get_clear_errors() {
    let db = Db::Sqlite;
    let server = Server::start_with_config(&config(&db, "[store]\nmax_message_bytes = 1000\n"));
    let id = create_session(&server, "sk-alice", json!({"metadata": {"project": "x"}}));
    let chat = |body: Value| call(&server, "POST", "/v1/chat/completions", "sk-alice", Some(body));
    let code =
        |(status, body): (u16, Value)| (status, body["error"]["code"].as_str().unwrap_or("").to_string(), body["error"]["param"].clone());

    assert_eq!(code(chat(json!({"session_id": "sess_nope", "messages": [{"role": "user", "content": "hi"}]}))).0, 404);
    let (status, c, param) = code(chat(json!({"session_id": id, "messages": [{"role": "system", "content": "x"}]})));
    assert_eq!((status, param), (400, json!("messages[0].role")), "{c}");
    let (status, _, param) = code(chat(json!({"session_id": id, "messages": []})));
    assert_eq!((status, param), (400, json!("messages")), "nothing to regenerate in an empty session");
    let (status, c, _) = code(chat(json!({"session_id": id, "messages": [{"role": "user", "content": "x".repeat(1001)}]})));
    assert_eq!((status, c.as_str()), (400, "message_too_large"));
    let (status, c, _) = code(call(&server, "POST", &format!("/v1/sessions/{id}/rollback"), "sk-alice", Some(json!({"messages": 1}))));
    assert_eq!((status, c.as_str()), (400, "invalid_rollback"));
    let (status, c, _) = code(call(&server, "POST", "/v1/sessions", "sk-alice", Some(json!({"model": "nope"}))));
    assert_eq!((status, c.as_str()), (404, "model_not_found"));
    let (status, c, param) = code(call(&server, "PATCH", &format!("/v1/sessions/{id}"), "sk-alice", Some(json!({"titel": "x"}))));
    assert_eq!((status, c.as_str(), param), (400, "unknown_parameter", json!("titel")));
    let (status, c, _) = code(call(&server, "POST", "/v1/sessions", "sk-alice", Some(json!({"metadata": [1]}))));
    assert_eq!((status, c.as_str()), (400, "invalid_metadata"));
    // Nothing above changed the session.
    let (_, session) = call(&server, "GET", &format!("/v1/sessions/{id}"), "sk-alice", None);
    assert_eq!((session["message_count"].as_i64(), session["metadata"]["project"].as_str()), (Some(0), Some("x")));

    // Paging, most recently active first (ties in the millisecond clock go by id, so the
    // sessions are made a few milliseconds apart: CI once saw two within one).
    let more: Vec<String> = (0..3)
        .map(|_| {
            std::thread::sleep(std::time::Duration::from_millis(5));
            create_session(&server, "sk-alice", json!({}))
        })
        .collect();
    let (_, page) = call(&server, "GET", "/v1/sessions?limit=2", "sk-alice", None);
    assert_eq!(page["has_more"], true);
    let ids: Vec<_> = page["data"].as_array().unwrap().iter().map(|s| s["id"].as_str().unwrap().to_string()).collect();
    assert_eq!(ids, [more[2].clone(), more[1].clone()]);
    let (_, rest) = call(&server, "GET", &format!("/v1/sessions?limit=2&after={}", ids[1]), "sk-alice", None);
    let ids: Vec<_> = rest["data"].as_array().unwrap().iter().map(|s| s["id"].as_str().unwrap().to_string()).collect();
    assert_eq!(ids, [more[0].clone(), id.clone()]);
    assert_eq!(rest["has_more"], false);
}

#[test]
fn websocket_protocol() {
    let db = Db::Sqlite;
    let server = Server::start_with_config(&config(&db, ""));
    let mut ws = socket(&server);

    send(&mut ws, json!({"type": "ping"}));
    assert_eq!(recv(&mut ws), json!({"type": "pong"}));
    ws.send(tungstenite::Message::Ping(b"p".to_vec().into())).unwrap();
    ws.send(tungstenite::Message::text("{not json")).unwrap();
    let frame = recv(&mut ws);
    assert_eq!((frame["type"].as_str(), frame["error"]["code"].as_str()), (Some("error"), Some("invalid_frame")), "{frame}");
    send(&mut ws, json!({"type": "shout", "id": 7}));
    let frame = recv(&mut ws);
    assert_eq!((frame["id"].as_i64(), frame["error"]["code"].as_str()), (Some(7), Some("invalid_frame")), "{frame}");
    ws.send(tungstenite::Message::Binary(vec![1, 2, 3].into())).unwrap();
    assert_eq!(recv(&mut ws)["error"]["code"], "invalid_frame");

    // The plugins apply: no key, then a bad request, each an error frame in OpenAI's shape.
    let hello = json!({"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4});
    send(&mut ws, json!({"type": "chat", "id": "a", "request": hello}));
    let frame = recv(&mut ws);
    assert_eq!((frame["id"].as_str(), frame["error"]["code"].as_str()), (Some("a"), Some("missing_api_key")), "{frame}");
    send(&mut ws, json!({"type": "chat", "id": "b", "api_key": "sk-alice", "request": {"messages": [], "max_tokens": 4}}));
    let frame = recv(&mut ws);
    assert_eq!((frame["type"].as_str(), frame["error"]["param"].as_str()), (Some("error"), Some("messages")), "{frame}");

    // Two requests one after another on the same socket.
    for id in ["c", "d"] {
        send(&mut ws, json!({"type": "chat", "id": id, "api_key": "sk-alice", "request": hello}));
        let start = recv(&mut ws);
        assert_eq!((start["type"].as_str(), start["id"].as_str()), (Some("start"), Some(id)), "{start}");
        let (text, done) = ws_reply(&mut ws);
        assert_eq!(done["type"], "done", "{done}");
        assert_eq!(done["id"], id);
        let completion = done["usage"]["completion_tokens"].as_u64().unwrap();
        assert!((1..=4).contains(&completion), "{done}");
        assert!(!text.is_empty() || done["finish_reason"] == "stop", "{done}");
    }

    // Cancel: a long session reply stops at once, a second chat meanwhile is refused, and
    // the session keeps the partial reply marked `cancelled`.
    let id = create_session(&server, "sk-alice", json!({}));
    let long = json!({"session_id": id, "messages": [{"role": "user", "content": "Write a very long story."}], "max_tokens": 500});
    send(&mut ws, json!({"type": "chat", "id": "long", "api_key": "sk-alice", "request": long}));
    assert_eq!(recv(&mut ws)["type"], "start");
    let mut partial = String::new();
    while partial.len() < 10 {
        let frame = recv(&mut ws);
        assert_eq!(frame["type"], "delta", "{frame}");
        partial.push_str(frame["content"].as_str().unwrap());
    }
    send(&mut ws, json!({"type": "chat", "id": "busy", "api_key": "sk-alice", "request": hello}));
    send(&mut ws, json!({"type": "cancel", "id": "long"}));
    let cancelled_at = Instant::now();
    let mut busy_refused = false;
    let done = loop {
        let frame = recv(&mut ws);
        match frame["type"].as_str().unwrap() {
            "delta" => partial.push_str(frame["content"].as_str().unwrap()),
            "error" => {
                assert_eq!((frame["id"].as_str(), frame["error"]["code"].as_str()), (Some("busy"), Some("request_in_progress")));
                busy_refused = true;
            }
            "done" => break frame,
            other => panic!("{other}: {frame}"),
        }
    };
    assert!(busy_refused);
    assert!(cancelled_at.elapsed() < Duration::from_secs(2), "cancel is immediate");
    assert_eq!((done["id"].as_str(), done["finish_reason"].as_str()), (Some("long"), Some("cancelled")));
    let generated = done["usage"]["completion_tokens"].as_u64().unwrap();
    assert!(generated > 0 && generated < 500, "{done}");
    let (_, session) = call(&server, "GET", &format!("/v1/sessions/{id}"), "sk-alice", None);
    assert_eq!(session["messages"][1]["content"].as_str(), Some(partial.as_str()));
    assert_eq!(session["messages"][1]["finish_reason"], "cancelled");
    send(&mut ws, json!({"type": "cancel"}));
    assert_eq!(recv(&mut ws)["error"]["code"], "nothing_to_cancel");

    // Tools: a named call comes as one `tool_calls` frame (OpenAI's shape), then `done`.
    let weather = json!({"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}}, "required": ["city"], "additionalProperties": false}}});
    let ask = json!({"messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": [weather],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}}, "parallel_tool_calls": false, "max_tokens": 48, "temperature": 0});
    send(&mut ws, json!({"type": "chat", "id": "tool", "api_key": "sk-alice", "request": ask}));
    assert_eq!(recv(&mut ws)["type"], "start");
    let calls = recv(&mut ws);
    assert_eq!((calls["type"].as_str(), calls["id"].as_str()), (Some("tool_calls"), Some("tool")), "{calls}");
    let call = &calls["tool_calls"][0];
    assert_eq!((call["type"].as_str(), call["function"]["name"].as_str()), (Some("function"), Some("get_weather")), "{calls}");
    let arguments: Value = serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    assert!(["Paris", "Oslo"].contains(&arguments["city"].as_str().unwrap()), "{arguments}");
    let done = recv(&mut ws);
    assert_eq!((done["type"].as_str(), done["finish_reason"].as_str()), (Some("done"), Some("tool_calls")), "{done}");

    // The socket still serves after all of that.
    send(&mut ws, json!({"type": "chat", "id": "e", "api_key": "sk-alice", "request": hello}));
    let (_, done) = ws_reply(&mut ws);
    assert_eq!(done["type"], "done");
}

/// Frames that arrive while a session turn is in a plugin call or being written lose
/// nothing: every turn is stored whole, as streamed, and every ping is answered.
#[test]
fn websocket_frames_arriving_mid_turn_lose_no_turn() {
    let db = Db::Sqlite;
    let server = Server::start_with_config(&config(&db, ""));
    let id = create_session(&server, "sk-alice", json!({}));
    let mut ws = socket(&server);
    let mut replies = Vec::new();
    for turn in 0..3 {
        let request =
            json!({"session_id": id, "messages": [{"role": "user", "content": format!("Count to {}.", turn + 3)}], "max_tokens": 12});
        send(&mut ws, json!({"type": "chat", "id": turn, "api_key": "sk-alice", "request": request}));
        // A burst of frames while the turn runs (plugin calls on every token, the write at the end).
        for _ in 0..40 {
            send(&mut ws, json!({"type": "ping"}));
        }
        let (mut text, mut pongs) = (String::new(), 0);
        let done = loop {
            let frame = recv(&mut ws);
            match frame["type"].as_str().unwrap() {
                "pong" => pongs += 1,
                "start" => {}
                "delta" => text.push_str(frame["content"].as_str().unwrap()),
                "done" => break frame,
                other => panic!("{other}: {frame}"),
            }
        };
        assert_eq!(done["finish_reason"].as_str().map(|r| r == "length" || r == "stop"), Some(true), "{done}");
        while pongs < 40 {
            assert_eq!(recv(&mut ws)["type"], "pong");
            pongs += 1;
        }
        replies.push(text);
    }
    let stored = messages(&server, "sk-alice", &id);
    assert_eq!(stored.len(), 6, "{stored:?}");
    for (i, reply) in replies.iter().enumerate() {
        assert_eq!(stored[2 * i + 1], ("assistant".to_string(), reply.clone()));
    }
}

/// Postgres goes away mid-stream (every connection cut, new ones refused, as in a restart)
/// and comes back: the turn is written once it is back, whole; the stream ends cleanly.
#[test]
fn a_turn_outlives_a_postgres_restart_mid_stream() {
    let db = runtime().block_on(TestDatabase::create());
    let proxy = common::FaultProxy::start("127.0.0.1:5432");
    let name = db.url.rsplit('/').next().unwrap();
    let store = format!("[store]\nurl = \"postgres://postgres@127.0.0.1:{}/{name}\"\n", proxy.port);
    let server = Server::start_with_config(&config(&Db::Sqlite, &store));
    let id = create_session(&server, "sk-alice", json!({}));

    let body = json!({"session_id": id, "messages": [{"role": "user", "content": "Write a story."}], "max_tokens": 60, "stream": true});
    let response = client().post(server.url("/v1/chat/completions")).bearer_auth("sk-alice").json(&body).send().unwrap();
    assert_eq!(response.status(), 200);
    let mut reader = BufReader::new(response);
    let (mut line, mut reply, mut chunks) = (String::new(), String::new(), 0);
    let mut last = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).unwrap() == 0 {
            break;
        }
        let Some(data) = line.trim_end().strip_prefix("data: ") else { continue };
        chunks += 1;
        if chunks == 3 {
            // Down for 3 s, then back.
            proxy.set_down(true);
            let proxy_up = std::thread::spawn({
                let port = proxy.port;
                move || {
                    std::thread::sleep(Duration::from_secs(3));
                    port
                }
            });
            let _ = proxy_up.join();
            proxy.set_down(false);
        }
        last = data.to_string();
        if data != "[DONE]" {
            let chunk: Value = serde_json::from_str(data).unwrap();
            reply.push_str(chunk["choices"][0]["delta"]["content"].as_str().unwrap_or(""));
        }
    }
    assert_eq!(last, "[DONE]", "the stream did not end cleanly");
    let stored = messages(&server, "sk-alice", &id);
    assert_eq!(stored, vec![("user".into(), "Write a story.".into()), ("assistant".into(), reply)]);
    drop(server);
    runtime().block_on(db.remove());
}

/// Makes files immutable (`chattr +i`, as root on ext4: even root cannot write them) until
/// dropped: a SQLite store that turns read-only under a running server.
struct Immutable(Vec<std::path::PathBuf>);

impl Immutable {
    fn set(files: Vec<std::path::PathBuf>) -> Immutable {
        let status = std::process::Command::new("chattr").arg("+i").args(&files).status().expect("run chattr");
        assert!(status.success(), "chattr +i failed: this test needs root on ext4");
        Immutable(files)
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = std::process::Command::new("chattr").arg("-i").args(&self.0).status();
    }
}

/// The SQLite file turns read-only under a running server: writes get a clear 5xx in the
/// OpenAI shape, reads and health go on, nothing is half written, and once it is writable
/// again the session goes on.
#[test]
fn a_read_only_sqlite_store_gets_clear_errors_and_the_server_stays_up() {
    let server = Server::start_with_config(&config(&Db::Sqlite, ""));
    let id = create_session(&server, "sk-alice", json!({}));
    turn(&server, "sk-alice", &id, Some("Count to three."));
    let dir = server.config_path().parent().unwrap().to_path_buf();
    // The database and its write-ahead log; the shared-memory index stays writable, as
    // SQLite readers need it.
    let files: Vec<_> = ["wisp.db", "wisp.db-wal"].iter().map(|f| dir.join(f)).filter(|p| p.exists()).collect();
    let frozen = Immutable::set(files);

    let (status, body) = call(&server, "POST", "/v1/sessions", "sk-alice", Some(json!({})));
    assert!(status >= 500, "{status} {body}");
    assert_eq!(body["error"]["code"], "store_unavailable", "{body}");
    let body = json!({"session_id": id, "messages": [{"role": "user", "content": "Again."}], "max_tokens": 4});
    let (status, response) = call(&server, "POST", "/v1/chat/completions", "sk-alice", Some(body));
    assert!(status >= 500, "{status} {response}");
    assert_eq!(response["error"]["type"], "server_error", "{response}");
    assert_eq!(client().get(server.url("/health")).send().unwrap().status().as_u16(), 200);
    assert_eq!(messages(&server, "sk-alice", &id).len(), 2, "reads go on, and nothing was half written");

    drop(frozen);
    turn(&server, "sk-alice", &id, Some("And now?"));
    assert_eq!(messages(&server, "sk-alice", &id).len(), 4);
}

/// A small tmpfs mounted for a test (as root), unmounted when dropped: a disk that can
/// really fill up.
struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("run mount");
        assert!(status.success(), "mounting a tmpfs failed: this test needs root");
        Tmpfs(dir)
    }

    /// Writes a file until the disk is full; removing it frees the space.
    fn fill(&self) -> std::path::PathBuf {
        use std::io::Write;
        let path = self.0.path().join("filler");
        let mut file = std::fs::File::create(&path).unwrap();
        for chunk in [1 << 20, 4096, 1] {
            while file.write_all(&vec![0u8; chunk]).is_ok() {}
        }
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(self.0.path()).status();
    }
}

/// The disk under a SQLite store fills up while the server runs: writes get a clear 507
/// `store_full` (not retried: space does not come back by waiting), reads and health go
/// on, nothing is half written, and once there is space the session goes on.
#[test]
fn a_full_disk_under_sqlite_gets_clear_errors_and_the_server_stays_up() {
    let disk = Tmpfs::mount("4m");
    let store = format!("[store]\nurl = \"sqlite://{}\"\n", disk.0.path().join("wisp.db").display());
    let server = Server::start_with_config(&config(&Db::Sqlite, &store));
    let id = create_session(&server, "sk-alice", json!({}));
    turn(&server, "sk-alice", &id, Some("Count to three."));
    let filler = disk.fill();

    // Any new transaction appends frames to the write-ahead log, which must grow.
    let long = "Tell me more about this. ".repeat(200);
    let body = json!({"session_id": id, "messages": [{"role": "user", "content": long}], "max_tokens": 2});
    let (status, response) = call(&server, "POST", "/v1/chat/completions", "sk-alice", Some(body));
    assert_eq!(status, 507, "{response}");
    assert_eq!(response["error"]["code"], "store_full", "{response}");
    let (status, body) = call(&server, "POST", "/v1/sessions", "sk-alice", Some(json!({"system_prompt": long})));
    assert_eq!((status, body["error"]["code"].as_str()), (507, Some("store_full")), "{body}");
    assert_eq!(client().get(server.url("/health")).send().unwrap().status().as_u16(), 200);
    assert_eq!(messages(&server, "sk-alice", &id).len(), 2, "reads go on, and nothing was half written");

    std::fs::remove_file(filler).unwrap();
    turn(&server, "sk-alice", &id, Some("And now?"));
    assert_eq!(messages(&server, "sk-alice", &id).len(), 4);
    drop(server);
}

/// A Responses API chain lives in the store: continued after kill -9 and a restart, and on
/// a second replica on the same Postgres; another principal cannot read or continue it.
#[test]
fn a_response_chain_survives_kill_9_and_continues_on_another_replica() {
    let db = Db::postgres();
    let mut a = Server::start_with_config(&config(&db, ""));
    let respond = |server: &Server, key: &str, previous: Option<&str>, input: &str| {
        let mut body = json!({"input": input, "max_output_tokens": 6, "temperature": 0});
        if let Some(previous) = previous {
            body["previous_response_id"] = json!(previous);
        }
        call(server, "POST", "/v1/responses", key, Some(body))
    };
    let (status, first) = respond(&a, "sk-alice", None, "My name is Ada.");
    assert_eq!(status, 200, "{first}");
    let first_id = first["id"].as_str().unwrap().to_string();
    let (status, second) = respond(&a, "sk-alice", Some(&first_id), "What is my name?");
    assert_eq!(status, 200, "{second}");
    let second_id = second["id"].as_str().unwrap().to_string();
    // The chain's history is in the prompt: the second turn's input holds the first turn.
    assert!(second["usage"]["input_tokens"].as_u64() > first["usage"]["input_tokens"].as_u64(), "{first} {second}");

    a.kill_and_restart();
    let (status, stored) = call(&a, "GET", &format!("/v1/responses/{second_id}"), "sk-alice", None);
    assert_eq!((status, stored["output"].clone()), (200, second["output"].clone()), "{stored}");
    let (status, third) = respond(&a, "sk-alice", Some(&second_id), "And again?");
    assert_eq!(status, 200, "{third}");
    assert!(third["usage"]["input_tokens"].as_u64() > second["usage"]["input_tokens"].as_u64());

    let b = Server::start_with_config(&config(&db, ""));
    let (status, fourth) = respond(&b, "sk-alice", Some(third["id"].as_str().unwrap()), "Once more.");
    assert_eq!(status, 200, "{fourth}");
    assert!(fourth["usage"]["input_tokens"].as_u64() > third["usage"]["input_tokens"].as_u64());

    // bob cannot see or continue alice's chain: the same 404 as for an id that never was.
    let (status, e) = respond(&b, "sk-bob", Some(&second_id), "Hi");
    assert_eq!((status, e["error"]["code"].as_str()), (404, Some("response_not_found")), "{e}");
    assert_eq!(call(&b, "GET", &format!("/v1/responses/{second_id}"), "sk-bob", None).0, 404);
    // Without a valid key nobody learns which ids exist: 401 for a real id and an unknown one.
    assert_eq!(respond(&b, "sk-nope", Some(&second_id), "Hi").0, 401);
    assert_eq!(respond(&b, "sk-nope", Some("resp_0123"), "Hi").0, 401);
    assert_eq!(respond(&b, "sk-alice", Some("resp_0123"), "Hi").0, 404);
    assert_eq!(call(&b, "DELETE", &format!("/v1/responses/{second_id}"), "sk-bob", None).0, 404);
    let (status, deleted) = call(&b, "DELETE", &format!("/v1/responses/{first_id}"), "sk-alice", None);
    assert_eq!((status, deleted["deleted"].as_bool()), (200, Some(true)));
    assert_eq!(call(&a, "GET", &format!("/v1/responses/{first_id}"), "sk-alice", None).0, 404);
}
