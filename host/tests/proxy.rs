//! Proxy mode and scale-out end to end, on real servers only: wisp as an upstream of wisp,
//! llama.cpp's llama-server (built from the PyPI sdist by scripts/build-llama.sh) as an
//! upstream, an upstream killed mid-stream, and two wisp replicas on one Postgres sharing
//! sessions and a rate limit.

mod common;

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::time::{Duration, Instant};

use common::{LlamaServer, Server, client, default_model_path, workspace_root};
use serde_json::{Value, json};
use wisp::store::testing::TestDatabase;

/// A front wisp serving `models` (TOML `[[models]]` entries) with `plugins` (`DIST` is
/// the built-in plugins' directory).
fn front(models: &str, plugins: &str) -> Server {
    let dist = workspace_root().join("plugins/dist").display().to_string();
    Server::start_with_config(&format!("{models}\n{plugins}").replace("DIST", &dist))
}

/// A `[[models]]` entry for `id` served by `upstreams` (urls of wisp servers or others).
fn proxied(id: &str, upstreams: &[String], extra: &str) -> String {
    let urls: Vec<String> = upstreams.iter().map(|u| format!("\"{u}/v1\"")).collect();
    format!("[[models]]\nid = \"{id}\"\nupstreams = [{}]\nupstream_model = \"gemma-3-270m\"\n{extra}\n", urls.join(", "))
}

fn post(server: &Server, path: &str, body: &Value) -> (u16, Value) {
    let response = client().post(server.url(path)).json(body).send().unwrap();
    let status = response.status().as_u16();
    (status, response.json().unwrap_or(Value::Null))
}

/// The `data:` payloads of an SSE response, up to `[DONE]` (excluded) or the end.
fn sse_payloads(response: reqwest::blocking::Response) -> (Vec<Value>, bool) {
    let mut payloads = Vec::new();
    for line in BufReader::new(response).lines() {
        let line = line.unwrap();
        let Some(data) = line.strip_prefix("data: ") else { continue };
        if data == "[DONE]" {
            return (payloads, true);
        }
        payloads.push(serde_json::from_str(data).unwrap());
    }
    (payloads, false)
}

fn chat_text(payloads: &[Value]) -> String {
    payloads.iter().filter_map(|p| p["choices"][0]["delta"]["content"].as_str()).collect()
}

/// The upstream sees the conversation, applies its own template and counts the real usage:
/// through the front, the reply and the usage are the upstream's own, streamed or not.
#[test]
fn a_proxied_model_answers_as_its_upstream_does() {
    let upstream = Server::start("");
    let front = front(&proxied("remote", std::slice::from_ref(&upstream.url), ""), "");
    let body = json!({"messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 12, "temperature": 0});
    let (status, direct) = post(&upstream, "/v1/chat/completions", &body);
    assert_eq!(status, 200, "{direct}");
    let mut via = body.clone();
    via["model"] = json!("remote");
    let (status, proxied) = post(&front, "/v1/chat/completions", &via);
    assert_eq!(status, 200, "{proxied}");
    assert_eq!(proxied["model"], "remote");
    assert_eq!(proxied["choices"][0]["message"]["content"], direct["choices"][0]["message"]["content"]);
    assert_eq!(proxied["choices"][0]["finish_reason"], direct["choices"][0]["finish_reason"]);
    assert_eq!(proxied["usage"], direct["usage"], "the upstream's real usage, not wisp's estimate");

    via["stream"] = json!(true);
    via["stream_options"] = json!({"include_usage": true});
    let response = client().post(front.url("/v1/chat/completions")).json(&via).send().unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let (payloads, done) = sse_payloads(response);
    assert!(done, "the stream ends with [DONE]");
    assert_eq!(chat_text(&payloads), direct["choices"][0]["message"]["content"].as_str().unwrap());
    assert_eq!(payloads.last().unwrap()["usage"], direct["usage"]);
    // A stream without usage finishes as well; every relayed stream counts as ok, none as
    // a client that left (the count once read the channel after the client had closed it).
    via.as_object_mut().unwrap().remove("stream_options");
    for _ in 0..8 {
        let (_, done) = sse_payloads(client().post(front.url("/v1/chat/completions")).json(&via).send().unwrap());
        assert!(done);
    }
    let outcome = |o: &str| front.metric(&format!("wisp_upstream_requests_total{{model=\"remote\",outcome=\"{o}\""));
    let deadline = Instant::now() + Duration::from_secs(5);
    while outcome("ok") + outcome("cancelled") < 10.0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!((outcome("ok"), outcome("cancelled")), (10.0, 0.0));

    // The Responses and Messages front-ends are wisp's: upstream gets the same chat.
    let reply = direct["choices"][0]["message"]["content"].as_str().unwrap();
    let (status, response) =
        post(&front, "/v1/responses", &json!({"model": "remote", "input": "Name a colour.", "max_output_tokens": 12, "temperature": 0}));
    assert_eq!(status, 200, "{response}");
    assert_eq!(response["output"][0]["content"][0]["text"], reply, "{response}");
    let (status, message) = post(
        &front,
        "/v1/messages",
        &json!({"model": "remote", "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 12, "temperature": 0}),
    );
    assert_eq!(status, 200, "{message}");
    assert_eq!(message["content"][0]["text"], reply, "{message}");
    assert_eq!(message["usage"]["input_tokens"], direct["usage"]["prompt_tokens"], "{message}");

    // Completions: the text prompt goes upstream as text.
    let body = json!({"prompt": "1, 2, 3, 4,", "max_tokens": 8, "temperature": 0});
    let (_, direct) = post(&upstream, "/v1/completions", &body);
    let (status, proxied) =
        post(&front, "/v1/completions", &json!({"model": "remote", "prompt": "1, 2, 3, 4,", "max_tokens": 8, "temperature": 0}));
    assert_eq!(status, 200, "{proxied}");
    assert_eq!(proxied["choices"][0]["text"], direct["choices"][0]["text"]);
    assert_eq!(proxied["usage"], direct["usage"]);

    // What wisp cannot govern or relay is refused, in the OpenAI shape.
    let (status, error) = post(&front, "/v1/completions", &json!({"model": "remote", "prompt": [1, 2, 3], "max_tokens": 4}));
    assert_eq!((status, error["error"]["code"].as_str()), (400, Some("unsupported_parameter")), "{error}");
    let (status, error) = post(
        &front,
        "/v1/chat/completions",
        &json!({"model": "remote", "messages": [{"role": "user", "content": "hi"}], "logprobs": true}),
    );
    assert_eq!((status, error["error"]["param"].as_str()), (400, Some("logprobs")), "{error}");
    // The upstream's own refusal reaches the client with its status.
    let (status, error) = post(
        &front,
        "/v1/chat/completions",
        &json!({"model": "remote", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 40000}),
    );
    assert_eq!((status, error["error"]["code"].as_str()), (400, Some("upstream_refused")), "{error}");
    assert!(error["error"]["message"].as_str().unwrap().contains("context length"), "{error}");
}

/// A plugin's stop ends the stream at the stop string and hangs up on the upstream, whose
/// generation ends there too (it does not run on to `max_tokens`).
#[test]
fn a_plugin_stop_ends_the_upstream_generation() {
    let upstream = Server::start("");
    let plugins = "[[plugins]]\nname = \"stops\"\nwasm = \"DIST/stop_sequences.wasm\"\nconfig = { models = { \"remote\" = [\"9\"] } }\n";
    let front = front(&proxied("remote", std::slice::from_ref(&upstream.url), ""), plugins);
    let before = upstream.metric("wisp_generation_tokens_total");
    let body = json!({"model": "remote", "prompt": "1, 2, 3, 4,", "max_tokens": 400, "temperature": 0, "stream": true});
    let response = client().post(front.url("/v1/completions")).json(&body).send().unwrap();
    let (payloads, done) = sse_payloads(response);
    assert!(done);
    let text: String = payloads.iter().filter_map(|p| p["choices"][0]["text"].as_str()).collect();
    assert!(text.contains('8') && !text.contains('9'), "the reply stops before the stop string: {text:?}");
    assert_eq!(payloads.iter().rev().find_map(|p| p["choices"][0]["finish_reason"].as_str()), Some("stop"));
    // The upstream stops generating once wisp hangs up (its count settles far below 400).
    let deadline = Instant::now() + Duration::from_secs(30);
    while upstream.metric("wisp_requests_running") > 0.0 {
        assert!(Instant::now() < deadline, "the upstream kept generating");
        std::thread::sleep(Duration::from_millis(50));
    }
    let generated = upstream.metric("wisp_generation_tokens_total") - before;
    assert!(generated < 100.0, "the upstream generated {generated} tokens after the stop");
}

/// The rate limit reserves prompt + `max_tokens` when a proxied request arrives and settles
/// at the end with the usage so far: a hung-up stream gives its reservation back.
#[test]
fn a_hung_up_proxied_stream_settles_its_reservation() {
    use std::io::Read;
    let upstream = Server::start("");
    let plugins = "[[plugins]]\nname = \"rate-limit\"\nwasm = \"DIST/rate_limit.wasm\"\nconfig = { tokens_per_minute = 700 }\n";
    let front = front(&proxied("remote", std::slice::from_ref(&upstream.url), ""), plugins);
    let body = json!({"model": "remote", "prompt": "1, 2, 3, 4,", "max_tokens": 400, "stream": true});
    let mut response = client().post(front.url("/v1/completions")).json(&body).send().unwrap();
    assert_eq!(response.status(), 200);
    let _ = response.read(&mut [0u8; 512]).unwrap();
    drop(response);
    // Settled to what was used, another 400-token reservation fits (it would not if the
    // first still held its 400).
    common::until_allowed(|| client().post(front.url("/v1/completions")).json(&body).send().unwrap());
}

/// Two upstreams; one is killed while both stream: the stream on it ends with an SSE error
/// event, the other finishes, and requests after the kill all succeed on the survivor.
#[test]
fn a_killed_upstream_fails_over() {
    let mut a = Server::start("");
    let b = Server::start("");
    let front = front(&proxied("remote", &[a.url.clone(), b.url.clone()], "upstream_cooldown_secs = 60\nhealth_check_secs = 1"), "");
    let stream = |front: &Server| {
        let body = json!({"model": "remote", "prompt": "1, 2, 3, 4,", "max_tokens": 300, "temperature": 0, "stream": true});
        let response = client().post(front.url("/v1/completions")).json(&body).send().unwrap();
        assert_eq!(response.status().as_u16(), 200);
        let mut lines = BufReader::new(response).lines();
        // Read until the first chunk, so both are streaming (one on each upstream: the
        // second goes to the one with nothing in flight) before the kill.
        for line in lines.by_ref() {
            if line.unwrap().starts_with("data: ") {
                break;
            }
        }
        lines
    };
    let first = stream(&front);
    let second = stream(&front);
    assert_eq!(a.metric("wisp_requests_running"), 1.0, "one stream on each upstream");
    a.kill();
    let ends: Vec<(bool, bool)> = [first, second]
        .into_iter()
        .map(|lines| {
            let (mut done, mut error) = (false, false);
            for line in lines {
                let line = line.unwrap();
                done |= line == "data: [DONE]";
                error |= line.starts_with("data: {\"error\"");
            }
            (done, error)
        })
        .collect();
    assert!(ends.contains(&(true, false)), "the stream on the survivor finishes: {ends:?}");
    assert!(ends.iter().any(|(_, error)| *error), "the stream on the killed upstream ends with an error event: {ends:?}");
    for i in 0..6 {
        let (status, body) = post(&front, "/v1/completions", &json!({"model": "remote", "prompt": format!("{i}, 1, 2,"), "max_tokens": 3}));
        assert_eq!(status, 200, "request {i} after the kill: {body}");
    }
    let killed = format!("wisp_upstream_healthy{{model=\"remote\",upstream=\"{}/v1\"}}", a.url);
    assert_eq!(front.metric(&killed), 0.0, "the killed upstream is out");
    assert!(front.metric("wisp_upstream_errors_total") >= 1.0);
}

/// No upstream answers: a 502 in the OpenAI shape, promptly, and `/ready` says so.
#[test]
fn unreachable_upstreams_are_a_502() {
    let closed = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let front = Server::start_with_config(&format!(
        "{}\n{}",
        common::default_model_entry(),
        proxied("remote", &[url], "upstream_connect_timeout_ms = 500")
    ));
    let started = Instant::now();
    let (status, error) =
        post(&front, "/v1/chat/completions", &json!({"model": "remote", "messages": [{"role": "user", "content": "hi"}]}));
    assert_eq!((status, error["error"]["code"].as_str()), (502, Some("upstream_unavailable")), "{error}");
    assert!(started.elapsed() < Duration::from_secs(10));
}

/// A proxied default model is ready while an upstream is: a failed health check takes the
/// upstream out (and `/ready` to 503), a passing one brings it back at once, without
/// waiting out the cool-down that a failed request would cost.
#[test]
fn readiness_follows_the_upstreams_health() {
    let upstream = Server::start("");
    let path = common::FaultProxy::start(upstream.url.trim_start_matches("http://"));
    let url = format!("http://127.0.0.1:{}", path.port);
    let front = front(&proxied("remote", &[url], "health_check_secs = 1\nupstream_cooldown_secs = 600"), "");
    let ready = || {
        let response = client().get(front.url("/ready")).send().unwrap();
        (response.status().as_u16(), response.text().unwrap())
    };
    let wait_for = |status: u16| {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let (now, body) = ready();
            if now == status {
                return body;
            }
            assert!(Instant::now() < deadline, "/ready stayed {now}: {body}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    path.set_down(true);
    let body = wait_for(503);
    assert!(body.contains("no upstream of the default model `remote` is healthy"), "{body}");
    let (status, error) = post(&front, "/v1/chat/completions", &json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}));
    assert_eq!((status, error["error"]["code"].as_str()), (502, Some("upstream_unavailable")), "{error}");
    path.set_down(false);
    wait_for(200);
    let (status, reply) = post(&front, "/v1/chat/completions", &json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}));
    assert_eq!(status, 200, "{reply}");
}

/// llama-server as the upstream: chat streamed and not, its usage on the client's response
/// and in the plugins' `on-finish` (the rate limit's token count), tools through its
/// JSON-schema constraint, and its load gauges read by the balancer.
#[test]
fn a_llama_server_upstream_is_governed() {
    let llama = LlamaServer::start(&default_model_path(), &["-t", "1", "-np", "2", "-c", "4096", "--metrics"]);
    let plugins = "[[plugins]]\nname = \"rate-limit\"\nwasm = \"DIST/rate_limit.wasm\"\nconfig = { requests_per_minute = 100, tokens_per_minute = 100000 }\n\
                   [[plugins]]\nname = \"stops\"\nwasm = \"DIST/stop_sequences.wasm\"\nconfig = { models = { \"llama-stop\" = [\"9\"] } }\n";
    let models = [proxied("llama", std::slice::from_ref(&llama.url), ""), proxied("llama-stop", std::slice::from_ref(&llama.url), "")];
    let front = front(&models.concat(), plugins);
    let body = json!({"model": "llama", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8, "temperature": 0});
    let (status, reply) = post(&front, "/v1/chat/completions", &body);
    assert_eq!(status, 200, "{reply}");
    let usage = &reply["usage"];
    assert!(usage["prompt_tokens"].as_u64().unwrap() > 0 && usage["completion_tokens"].as_u64().unwrap() > 0, "{reply}");
    let (status, direct) = post_url(&format!("{}/v1/chat/completions", llama.url), &body);
    assert_eq!(status, 200, "{direct}");
    assert_eq!(reply["choices"][0]["message"]["content"], direct["choices"][0]["message"]["content"]);
    assert_eq!(usage["prompt_tokens"], direct["usage"]["prompt_tokens"]);

    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let response = client().post(front.url("/v1/chat/completions")).json(&streamed).send().unwrap();
    let (payloads, done) = sse_payloads(response);
    assert!(done);
    assert_eq!(chat_text(&payloads), reply["choices"][0]["message"]["content"].as_str().unwrap());

    let tools = json!({
        "model": "llama",
        "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
        "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}],
        "tool_choice": "required",
        "parallel_tool_calls": false,
        "max_tokens": 60,
        "temperature": 0,
    });
    let (status, reply) = post(&front, "/v1/chat/completions", &tools);
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["choices"][0]["finish_reason"], "tool_calls", "{reply}");
    let call = &reply["choices"][0]["message"]["tool_calls"][0]["function"];
    assert_eq!(call["name"], "get_weather");
    let arguments: Value = serde_json::from_str(call["arguments"].as_str().unwrap()).unwrap();
    assert!(arguments["city"].is_string(), "{reply}");
    assert!(front.metric("wisp_upstream_requests_total{model=\"llama\"") >= 3.0);

    // A plugin's stop hangs up on llama-server, which stops generating (2,000 tokens would
    // take it half a minute and more).
    let body = json!({"model": "llama-stop", "prompt": "1, 2, 3, 4,", "max_tokens": 2000, "temperature": 0, "stream": true});
    let (payloads, done) = sse_payloads(client().post(front.url("/v1/completions")).json(&body).send().unwrap());
    assert!(done);
    let text: String = payloads.iter().filter_map(|p| p["choices"][0]["text"].as_str()).collect();
    assert!(text.contains('8') && !text.contains('9'), "{text:?}");
    let processing = || {
        let text = client().get(format!("{}/metrics", llama.url)).send().unwrap().text().unwrap();
        text.lines().find_map(|l| l.strip_prefix("llamacpp:requests_processing ")?.trim().parse::<f64>().ok()).unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while processing() > 0.0 {
        assert!(Instant::now() < deadline, "llama-server kept generating after wisp hung up");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn post_url(url: &str, body: &Value) -> (u16, Value) {
    let response = client().post(url).json(body).send().unwrap();
    let status = response.status().as_u16();
    (status, response.json().unwrap_or(Value::Null))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// Two wisp replicas on one Postgres, each proxying to the same upstream: a session begun
/// on one goes on on the other, and a limit of 10 requests a minute holds across both
/// (the 11th is refused, whichever replica gets it).
#[test]
fn two_replicas_share_sessions_and_a_rate_limit() {
    let db = runtime().block_on(TestDatabase::create());
    let upstream = Server::start("");
    let config = format!(
        "[store]\nurl = \"{}\"\n{}[[plugins]]\nname = \"rate-limit\"\nwasm = \"DIST/rate_limit.wasm\"\nconfig = {{ requests_per_minute = 10 }}\n",
        db.url,
        proxied("remote", std::slice::from_ref(&upstream.url), "")
    );
    let replicas = [front(&config, ""), front(&config, "")];
    // The limit counts in fixed one-minute windows: start early in one.
    let into_minute = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() % 60;
    if into_minute > 40 {
        std::thread::sleep(Duration::from_secs(61 - into_minute));
    }
    let (status, session) = post(&replicas[0], "/v1/sessions", &json!({"model": "remote", "system_prompt": "Be brief."}));
    assert_eq!(status, 200, "{session}");
    let id = session["id"].as_str().unwrap().to_string();
    let turn = |replica: &Server, content: &str| {
        let body = json!({"session_id": id, "messages": [{"role": "user", "content": content}], "max_tokens": 4, "temperature": 0});
        let (status, reply) = post(replica, "/v1/chat/completions", &body);
        assert_eq!(status, 200, "{reply}");
        reply
    };
    turn(&replicas[0], "Hello from replica a.");
    let second = turn(&replicas[1], "And hello from replica b.");
    assert_eq!(second["session_id"], id.as_str());
    let messages = client().get(replicas[1].url(&format!("/v1/sessions/{id}"))).send().unwrap().json::<Value>().unwrap();
    let users: Vec<&str> =
        messages["messages"].as_array().unwrap().iter().filter(|m| m["role"] == "user").map(|m| m["content"].as_str().unwrap()).collect();
    assert_eq!(users, ["Hello from replica a.", "And hello from replica b."]);

    // The rate limit counts on Postgres: 10 requests a minute across both replicas. The
    // four calls above (create, two turns, read) used four; six more alternate, and the
    // 11th is refused on each.
    let mut allowed = 0;
    for i in 0.. {
        let replica = &replicas[i % 2];
        let response = client().get(replica.url("/v1/models")).send().unwrap();
        match response.status().as_u16() {
            200 => allowed += 1,
            429 => break,
            other => panic!("unexpected {other}"),
        }
        assert!(i < 20, "the limit never bound");
    }
    assert_eq!(allowed, 6, "the session requests counted too");
    for replica in &replicas {
        let response = client().get(replica.url("/v1/models")).send().unwrap();
        assert_eq!(response.status().as_u16(), 429, "refused on both replicas");
    }
    drop(replicas);
    runtime().block_on(db.remove());
}
