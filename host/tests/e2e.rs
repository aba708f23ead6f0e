//! End-to-end tests: the real `wisp` binary, the real default model, real HTTP.
//! Raw SSE framing, bad inputs, cancellation and responsiveness are checked here; the
//! official Python and JavaScript SDKs are driven from here too (tests/sdk/).

mod common;

use std::io::{BufRead, BufReader};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Server, client, workspace_root};
use serde_json::{Value, json};

fn post(server: &Server, path: &str, body: &Value) -> (u16, Value) {
    let r = client().post(server.url(path)).json(body).send().expect("request");
    let status = r.status().as_u16();
    (status, r.json().expect("JSON body"))
}

fn post_raw(server: &Server, path: &str, body: impl Into<reqwest::blocking::Body>) -> (u16, Value) {
    let r = client().post(server.url(path)).header("content-type", "application/json").body(body).send().expect("request");
    let status = r.status().as_u16();
    (status, r.json().expect("JSON body"))
}

/// Every `data:` payload of an SSE response, in order.
fn sse_payloads(server: &Server, path: &str, body: &Value) -> Vec<String> {
    let r = client().post(server.url(path)).json(body).send().expect("request");
    assert_eq!(r.status().as_u16(), 200);
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    BufReader::new(r).lines().map(|l| l.expect("line")).filter_map(|l| l.strip_prefix("data: ").map(str::to_string)).collect()
}

fn assert_openai_error(body: &Value, code: Option<&str>) {
    let e = &body["error"];
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
    assert!(e["type"].is_string(), "{body}");
    assert!(e.get("param").is_some() && e.get("code").is_some(), "{body}");
    if let Some(code) = code {
        assert_eq!(e["code"], code, "{body}");
    }
}

fn chat_body(content: &str, extra: Value) -> Value {
    let mut body = json!({"model": "gemma-3-270m", "messages": [{"role": "user", "content": content}]});
    body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    body
}

#[test]
fn serves_health_ready_models_and_metrics() {
    let server = Server::start("");
    let r = client().get(server.url("/health")).send().unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let r: Value = client().get(server.url("/ready")).send().unwrap().json().unwrap();
    assert_eq!(r["status"], "ready");
    let models: Value = client().get(server.url("/v1/models")).send().unwrap().json().unwrap();
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], "gemma-3-270m");
    let one = client().get(server.url("/v1/models/gemma-3-270m")).send().unwrap();
    assert_eq!(one.status().as_u16(), 200);
    let missing = client().get(server.url("/v1/models/nope")).send().unwrap();
    assert_eq!(missing.status().as_u16(), 404);
    assert_openai_error(&missing.json().unwrap(), Some("model_not_found"));
    assert!(server.metric("wisp_model_load_seconds") > 0.0);
}

#[test]
fn chat_completion_answers_coherently_with_exact_usage() {
    let server = Server::start("");
    // The default model is a base model: a few-shot conversation in Gemma's turn format
    // (the built-in template) is what makes it answer.
    let messages = json!([
        {"role": "user", "content": "What is the capital of Germany?"},
        {"role": "assistant", "content": "Berlin."},
        {"role": "user", "content": "What is the capital of Italy?"},
        {"role": "assistant", "content": "Rome."},
        {"role": "user", "content": "What is the capital of France?"},
    ]);
    let (status, r) = post(&server, "/v1/chat/completions", &json!({"messages": messages, "max_tokens": 8, "temperature": 0}));
    assert_eq!(status, 200, "{r}");
    let text = r["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(text.starts_with("Paris"), "{text}");
    let usage = &r["usage"];
    assert_eq!(usage["total_tokens"], usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap());
    // `<bos><start_of_turn>user\n` + question + `<end_of_turn>\n<start_of_turn>model\n`.
    assert!(usage["prompt_tokens"].as_u64().unwrap() > 10, "{usage}");
}

#[test]
fn streams_sse_exactly_as_openai() {
    let server = Server::start("");
    let body = chat_body("Count from one to five.", json!({"max_tokens": 12, "temperature": 0, "stream": true}));
    let payloads = sse_payloads(&server, "/v1/chat/completions", &body);
    assert_eq!(payloads.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = payloads[..payloads.len() - 1].iter().map(|p| serde_json::from_str(p).unwrap()).collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk" && c["id"] == chunks[0]["id"]));
    assert!(chunks.iter().all(|c| c.get("usage").is_none()), "usage only with include_usage");
    let finish: Vec<_> = chunks.iter().filter(|c| !c["choices"][0]["finish_reason"].is_null()).collect();
    assert_eq!(finish.len(), 1);
    assert!(std::ptr::eq(finish[0], chunks.last().unwrap()), "finish_reason comes last");
    let streamed: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();

    // The same request without streaming gives the same text.
    let mut plain = body.clone();
    plain["stream"] = json!(false);
    let (_, r) = post(&server, "/v1/chat/completions", &plain);
    assert_eq!(streamed, r["choices"][0]["message"]["content"].as_str().unwrap());

    // include_usage: a final chunk with empty choices and the usage, `usage: null` before.
    let mut with_usage = body.clone();
    with_usage["stream_options"] = json!({"include_usage": true});
    let payloads = sse_payloads(&server, "/v1/chat/completions", &with_usage);
    let chunks: Vec<Value> = payloads[..payloads.len() - 1].iter().map(|p| serde_json::from_str(p).unwrap()).collect();
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"], r["usage"]);
    assert!(chunks[..chunks.len() - 1].iter().all(|c| c["usage"].is_null()));
}

#[test]
fn completions_stream_and_stop_across_tokens() {
    let server = Server::start("");
    let prompt = "The days of the week are Monday, Tuesday, Wednesday,";
    let (status, full) = post(&server, "/v1/completions", &json!({"prompt": prompt, "max_tokens": 12, "temperature": 0}));
    assert_eq!(status, 200, "{full}");
    let full_text = full["choices"][0]["text"].as_str().unwrap().to_string();
    assert!(full_text.contains("Thursday"), "{full_text}");
    // "rsday" starts inside a token: the cut must still land exactly before it.
    let (_, cut) = post(&server, "/v1/completions", &json!({"prompt": prompt, "max_tokens": 12, "temperature": 0, "stop": ["rsday"]}));
    let want = &full_text[..full_text.find("rsday").unwrap()];
    assert_eq!(cut["choices"][0]["text"], want);
    assert_eq!(cut["choices"][0]["finish_reason"], "stop");
    let payloads = sse_payloads(
        &server,
        "/v1/completions",
        &json!({"prompt": prompt, "max_tokens": 12, "temperature": 0, "stop": "rsday", "stream": true}),
    );
    let streamed: String = payloads
        .iter()
        .filter(|p| *p != "[DONE]")
        .map(|p| serde_json::from_str::<Value>(p).unwrap()["choices"][0]["text"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(streamed, want);
}

#[test]
fn bad_inputs_get_clean_4xx_in_the_openai_shape() {
    let server = Server::start("[server]\nmax_body_bytes = 65536\n[limits]\nmax_stop_sequences = 4");
    let chat = "/v1/chat/completions";
    let cases: Vec<(&str, Value, u16, Option<&str>)> = vec![
        ("unknown model", chat_body("hi", json!({"model": "nope"})), 404, Some("model_not_found")),
        ("wrong type", chat_body("hi", json!({"temperature": "hot"})), 400, None),
        ("out of range", chat_body("hi", json!({"top_p": 1.5})), 400, None),
        ("n > 1", chat_body("hi", json!({"n": 3})), 400, Some("unsupported_parameter")),
        ("bad tool name", chat_body("hi", json!({"tools": [{"type": "function", "function": {"name": "no spaces"}}]})), 400, None),
        (
            "tool_choice naming no tool",
            chat_body(
                "hi",
                json!({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": {"type": "function", "function": {"name": "g"}}}),
            ),
            400,
            None,
        ),
        (
            "unenforceable tool schema",
            chat_body(
                "hi",
                json!({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"$ref": "http://example.com/s.json"}}}]}),
            ),
            400,
            Some("unsupported_schema"),
        ),
        ("five stops", chat_body("hi", json!({"stop": ["a", "b", "c", "d", "e"]})), 400, None),
        ("empty messages", json!({"messages": []}), 400, None),
        ("bad role", json!({"messages": [{"role": "wizard", "content": "x"}]}), 400, None),
        ("unknown field", chat_body("hi", json!({"temprature": 1})), 400, Some("unknown_parameter")),
        ("max_tokens 0", chat_body("hi", json!({"max_tokens": 0})), 400, None),
        ("negative max_tokens", chat_body("hi", json!({"max_tokens": -5})), 400, None),
        ("max_tokens beyond context", chat_body("hi", json!({"max_tokens": 10_000_000})), 400, Some("context_length_exceeded")),
        ("stream_options without stream", chat_body("hi", json!({"stream_options": {"include_usage": true}})), 400, None),
        ("top_logprobs > 20", chat_body("hi", json!({"logprobs": true, "top_logprobs": 21})), 400, None),
        ("no messages field", json!({"model": "gemma-3-270m"}), 400, None),
        ("image part", json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}), 400, None),
    ];
    for (name, body, status, code) in cases {
        let (got, r) = post(&server, chat, &body);
        assert_eq!(got, status, "{name}: {r}");
        assert_openai_error(&r, code);
    }
    for (name, body) in [
        ("malformed JSON", "{\"messages\": [".to_string()),
        ("not an object", "[1,2,3]".to_string()),
        ("empty body", String::new()),
        ("invalid UTF-8 escape", "{\"messages\":[{\"role\":\"user\",\"content\":\"\\ud800\"}]}".to_string()),
    ] {
        let (got, r) = post_raw(&server, chat, body);
        assert_eq!(got, 400, "{name}: {r}");
        assert_openai_error(&r, None);
    }
    let (got, r) = post_raw(&server, chat, vec![b'x'; 200_000]);
    assert_eq!(got, 413, "{r}");
    assert_openai_error(&r, Some("payload_too_large"));
    let (got, r) = post(&server, "/v1/completions", &json!({"prompt": "hi", "logprobs": 9}));
    assert_eq!(got, 400, "{r}");
    let (got, r) = post(&server, "/v1/completions", &json!({"prompt": [1, 2, 999_999_999]}));
    assert_eq!(got, 400, "{r}");
    let (got, r) = post(&server, "/v1/completions", &json!({"prompt": ["a", "b"]}));
    assert_eq!(got, 400, "{r}");
    let r = client().get(server.url("/v1/nowhere")).send().unwrap();
    assert_eq!(r.status().as_u16(), 404);
    assert_openai_error(&r.json().unwrap(), Some("not_found"));
    let r = client().get(server.url("/v1/chat/completions")).send().unwrap();
    assert!(r.status().is_client_error(), "{}", r.status());
    assert_openai_error(&r.json().unwrap(), None);
    // The server is still fine.
    let (status, _) = post(&server, chat, &chat_body("hi", json!({"max_tokens": 2})));
    assert_eq!(status, 200);
}

#[test]
fn a_prompt_over_the_context_is_refused_with_the_numbers() {
    let server = Server::start("context_length = 64");
    let long = "word ".repeat(200);
    let (status, r) = post(&server, "/v1/chat/completions", &chat_body(&long, json!({})));
    assert_eq!(status, 400, "{r}");
    assert_openai_error(&r, Some("context_length_exceeded"));
    let message = r["error"]["message"].as_str().unwrap();
    assert!(message.contains("64 tokens"), "{message}");
    // Without max_tokens the default fills the rest of the context: finish_reason length.
    let (status, r) = post(&server, "/v1/completions", &json!({"prompt": "Once upon a time", "max_tokens": 40, "temperature": 0}));
    assert_eq!(status, 200, "{r}");
}

#[test]
fn hanging_up_mid_stream_stops_the_generation() {
    let server = Server::start("");
    let body = chat_body(
        "Write a very long story about a dragon.",
        json!({"max_tokens": 3000, "temperature": 1.0, "seed": 1, "stream": true, "logit_bias": {"1": -100, "106": -100}}),
    );
    let r = client().post(server.url("/v1/chat/completions")).json(&body).send().unwrap();
    let mut lines = BufReader::new(r).lines();
    let mut seen = 0;
    while seen < 5 {
        if lines.next().unwrap().unwrap().starts_with("data: ") {
            seen += 1;
        }
    }
    drop(lines);
    let deadline = Instant::now() + Duration::from_secs(30);
    while server.metric("wisp_requests_running") > 0.0 {
        assert!(Instant::now() < deadline, "generation still running after the client hung up");
        std::thread::sleep(Duration::from_millis(100));
    }
    let generated = server.metric("wisp_generation_tokens_total");
    assert!(generated < 3000.0, "generated {generated} tokens for a client that left");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(server.metric("wisp_generation_tokens_total"), generated, "tokens kept coming");
}

#[test]
fn stays_responsive_and_queues_while_generating() {
    let server = Server::start("");
    let url = server.url("/v1/chat/completions");
    let long = chat_body(
        "Tell me a long story.",
        json!({"max_tokens": 200, "temperature": 1.0, "seed": 3, "logit_bias": {"1": -100, "106": -100}}),
    );
    let first = std::thread::spawn({
        let (url, body) = (url.clone(), long.clone());
        move || client().post(url).json(&body).send().unwrap().json::<Value>().unwrap()
    });
    // Wait until it is generating.
    let deadline = Instant::now() + Duration::from_secs(30);
    while server.metric("wisp_requests_running") < 1.0 {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(20));
    }
    let quick = reqwest::blocking::Client::builder().timeout(Duration::from_secs(5)).build().unwrap();
    assert_eq!(quick.get(server.url("/health")).send().unwrap().status().as_u16(), 200);
    assert_eq!(quick.get(server.url("/v1/models")).send().unwrap().status().as_u16(), 200);
    // A second generation waits its turn and then completes.
    let (status, second) = post(&server, "/v1/chat/completions", &chat_body("Say hi.", json!({"max_tokens": 4})));
    assert_eq!(status, 200, "{second}");
    let first = first.join().unwrap();
    assert_eq!(first["usage"]["completion_tokens"], 200, "{first}");
}

#[test]
fn the_queue_limit_answers_503_not_a_hang() {
    // One sequence at a time plus one waiting: of four requests at once, some must be refused.
    let server = Server::start("[limits]\nmax_queue = 1\nmax_batch = 1");
    let url = server.url("/v1/chat/completions");
    let body = chat_body("Tell me a story.", json!({"max_tokens": 60, "logit_bias": {"1": -100, "106": -100}}));
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let (url, body) = (url.clone(), body.clone());
            std::thread::spawn(move || client().post(url).json(&body).send().unwrap().status().as_u16())
        })
        .collect();
    let statuses: Vec<u16> = workers.into_iter().map(|w| w.join().unwrap()).collect();
    assert!(statuses.contains(&200), "{statuses:?}");
    assert!(statuses.contains(&503), "{statuses:?}");
    assert!(statuses.iter().all(|s| *s == 200 || *s == 503), "{statuses:?}");
}

#[test]
fn config_check_names_the_bad_field() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[[models]]\nid = \"m\"\npath = \"x.gguf\"\ndevice = \"tpu\"\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_wisp")).args(["config", "check"]).arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("models[0].device"), "{stderr}");
    let good = dir.path().join("good.toml");
    std::fs::write(&good, "[server]\nlisten = \"0.0.0.0:9000\"\n").unwrap();
    let out =
        Command::new(env!("CARGO_BIN_EXE_wisp")).args(["config", "check"]).arg(&good).env("WISP_LIMITS__MAX_QUEUE", "7").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("max_queue = 7") && stdout.contains("0.0.0.0:9000"), "{stdout}");
}

fn run_sdk(program: &str, args: &[&str]) {
    run_sdk_against(&Server::start(""), program, args);
}

fn run_sdk_against(server: &Server, program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .arg(&server.url)
        .current_dir(workspace_root())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e} (run `make setup` to install the SDKs)"));
    assert!(out.status.success(), "{program} failed:\n{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}

#[test]
fn the_official_python_sdk_works_unchanged() {
    let python = workspace_root().join(".venv/bin/python");
    run_sdk(python.to_str().unwrap(), &["host/tests/sdk/openai_sdk.py"]);
}

/// `response_format` (json_object, json_schema, the pydantic parse helper) and tools (each
/// `tool_choice`, streamed calls, a result in the next turn) through the Python SDK on the
/// base Gemma and the instruct SmolLM2: every reply validates.
#[test]
fn structured_output_and_tools_validate_on_both_models_through_the_python_sdk() {
    let instruct = workspace_root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(instruct.exists(), "{} is missing: run scripts/fetch-model.sh (make test does)", instruct.display());
    let server = Server::start(&format!("[[models]]\nid = \"smollm2-135m-instruct\"\npath = \"{}\"\npreload = true\n", instruct.display()));
    let python = workspace_root().join(".venv/bin/python");
    run_sdk_against(&server, python.to_str().unwrap(), &["host/tests/sdk/structured_output.py"]);
    run_sdk_against(&server, python.to_str().unwrap(), &["host/tests/sdk/tools.py"]);
}

/// Anthropic's Messages API through the official `anthropic` SDK on the instruct model,
/// behind the api-key-auth plugin: the SDK's `x-api-key` is the credential it checks.
#[test]
fn the_anthropic_sdk_works_against_messages_behind_the_auth_plugin() {
    let instruct = workspace_root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let auth = workspace_root().join("plugins/dist/api_key_auth.wasm");
    // sha256("sk-demo"), as in examples/governed.toml.
    let sha = "f77894fdfa58e447c57e077eaa9708e8e009c84dc6aba2db80461275e9b85be7";
    let server = Server::start(&format!(
        "[[models]]\nid = \"smollm2-135m-instruct\"\npath = \"{}\"\npreload = true\n\
         [[plugins]]\nname = \"auth\"\nwasm = \"{}\"\nconfig = {{ keys = [{{ name = \"demo\", sha256 = \"{sha}\" }}] }}\n",
        instruct.display(),
        auth.display()
    ));
    let python = workspace_root().join(".venv/bin/python");
    run_sdk_against(&server, python.to_str().unwrap(), &["host/tests/sdk/anthropic_sdk.py", "sk-demo"]);
}

/// OpenAI's Responses API through the Python SDK's `client.responses.*` on the instruct model,
/// then an agent framework's tool loop over it (the OpenAI Agents SDK).
#[test]
fn the_responses_api_works_through_the_python_sdk() {
    let instruct = workspace_root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let server = Server::start(&format!("[[models]]\nid = \"smollm2-135m-instruct\"\npath = \"{}\"\npreload = true\n", instruct.display()));
    let python = workspace_root().join(".venv/bin/python");
    run_sdk_against(&server, python.to_str().unwrap(), &["host/tests/sdk/responses.py"]);
    run_sdk_against(&server, python.to_str().unwrap(), &["host/tests/sdk/agents_sdk.py"]);
}

#[test]
fn the_official_javascript_sdk_works_unchanged() {
    run_sdk("node", &["host/tests/sdk/openai_sdk.mjs"]);
}

#[test]
fn a_chat_template_in_the_config_overrides_the_built_in_one() {
    // This template renders only `<bos>` + the last message: the chat prompt becomes the
    // same tokens as a completions prompt of that text (which gets `<bos>` too).
    let server = Server::start("chat_template = \"{{ bos_token }}{{ messages[-1]['content'] }}\"");
    let (status, chat) = post(&server, "/v1/chat/completions", &chat_body("The sky is", json!({"max_tokens": 1})));
    assert_eq!(status, 200, "{chat}");
    let (_, completion) = post(&server, "/v1/completions", &json!({"prompt": "The sky is", "max_tokens": 1}));
    assert_eq!(chat["usage"]["prompt_tokens"], completion["usage"]["prompt_tokens"]);
    assert_eq!(chat["usage"]["prompt_tokens"], 4, "{chat}");
}

/// Continuous batching: requests running together give, at temperature 0, exactly the text
/// each gives alone (per-sequence caches, positions and samplers; shared matmuls).
#[test]
fn batched_generation_equals_single_stream_generation() {
    // Prefix reuse off: the batched run must prefill its prompts, not copy the first run's.
    let server = Server::start("[limits]\nprefix_cache_mb = 0");
    let prompts = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "The three primary colours are"];
    let complete = |prompt: &str| {
        let body = json!({"prompt": prompt, "max_tokens": 24, "temperature": 0, "logit_bias": {"1": -100, "106": -100}});
        let (status, r) = post(&server, "/v1/completions", &body);
        assert_eq!(status, 200, "{r}");
        r["choices"][0]["text"].as_str().unwrap().to_string()
    };
    let alone: Vec<String> = prompts.iter().map(|p| complete(p)).collect();
    let together: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = prompts.iter().map(|p| s.spawn(move || complete(p))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(together, alone);
    let metrics = client().get(server.url("/metrics")).send().unwrap().text().unwrap();
    let batched = metrics
        .lines()
        .find(|l| l.starts_with("wisp_batch_size_bucket{") && l.contains("le=\"1\""))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .unwrap();
    let steps =
        metrics.lines().find(|l| l.starts_with("wisp_batch_size_count{")).and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).unwrap();
    assert!(steps > batched, "some steps ran more than one sequence ({batched} of {steps} steps had one)");
}

/// Soak: 32 streams at once (max_batch 8, the rest queued), a third of them hung up at a
/// random point, for three rounds. Nothing is stuck afterwards (no running or waiting
/// request), no request got a 5xx, and memory is flat from round 2 to round 3.
#[test]
fn soak_with_random_disconnects_leaves_nothing_stuck() {
    use std::io::Read;
    let server = Server::start("");
    let rss = || {
        let status = std::fs::read_to_string(format!("/proc/{}/status", server.pid())).unwrap();
        status.lines().find_map(|l| l.strip_prefix("VmRSS:")).unwrap().trim().trim_end_matches(" kB").trim().parse::<u64>().unwrap()
    };
    let url = server.url("/v1/chat/completions");
    let mut after_round = Vec::new();
    for round in 0..3u64 {
        let statuses: Vec<u16> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..32u64)
                .map(|i| {
                    let url = url.clone();
                    s.spawn(move || {
                        let body = json!({"messages": [{"role": "user", "content": format!("Story {round}-{i}:")}], "max_tokens": 16 + (i % 5) * 6, "stream": true});
                        let mut response = client().post(&url).json(&body).send().unwrap();
                        let status = response.status().as_u16();
                        // Every third client hangs up after a few bytes, at a different point.
                        if i % 3 == 0 {
                            let mut buf = vec![0u8; 64 + (i as usize * 97) % 900];
                            let _ = response.read(&mut buf);
                            return status;
                        }
                        let text = response.text().unwrap();
                        assert!(text.trim_end().ends_with("data: [DONE]"), "stream {round}-{i} did not finish: {text}");
                        status
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(statuses.iter().all(|s| *s == 200), "round {round}: {statuses:?}");
        // Hung-up sequences leave the batch at their next step.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let metrics = client().get(server.url("/metrics")).send().unwrap().text().unwrap();
            let gauge = |name: &str| metrics.lines().find(|l| l.starts_with(name)).and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok());
            if gauge("wisp_requests_running{") == Some(0.0) && gauge("wisp_requests_waiting{") == Some(0.0) {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "requests stuck after round {round}:\n{metrics}");
            std::thread::sleep(Duration::from_millis(100));
        }
        // The prefix cache keeps finished sequences' KV up to its configured budget (each
        // round's prompts are new): memory is flat beside it, not with it.
        let cached_kb = counter(&server, "wisp_prefix_cache_bytes{") as u64 / 1024;
        after_round.push((rss(), cached_kb));
    }
    let beside_cache = |(rss, cached): (u64, u64)| rss.saturating_sub(cached) as f64;
    let (second, third) = (beside_cache(after_round[1]), beside_cache(after_round[2]));
    assert!(
        third < second * 1.15,
        "memory beside the prefix cache grew from {second} kB to {third} kB between rounds (RSS, cache): {after_round:?}"
    );
}

fn counter(server: &Server, name: &str) -> f64 {
    let metrics = client().get(server.url("/metrics")).send().unwrap().text().unwrap();
    metrics.lines().filter(|l| l.starts_with(name)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
}

/// Prefix reuse: a conversation's next turn starts with the previous turn's prompt and
/// reply, whose KV is kept; it is copied instead of prefilled, and the reply is the same
/// as without reuse.
#[test]
fn the_next_turn_reuses_the_previous_turns_kv_and_answers_the_same() {
    let with_reuse = Server::start("");
    let without = Server::start("[limits]\nprefix_cache_mb = 0");
    let history = json!([
        {"role": "user", "content": "Tell me about lighthouses and the people who kept them, in detail."},
    ]);
    let turn = |server: &Server, messages: &Value| {
        let (status, r) = post(server, "/v1/chat/completions", &json!({"messages": messages, "max_tokens": 24, "temperature": 0}));
        assert_eq!(status, 200, "{r}");
        (r["choices"][0]["message"]["content"].as_str().unwrap().to_string(), r["usage"]["prompt_tokens"].as_f64().unwrap())
    };
    let (first, first_prompt) = turn(&with_reuse, &history);
    assert_eq!(counter(&with_reuse, "wisp_prefix_cache_hit_tokens_total"), 0.0);
    // The finished sequence's KV is kept, and /metrics says how much memory that is; none
    // is held by running sequences once the reply is out.
    // (The engine keeps it just after the reply's last event: poll briefly.)
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while counter(&with_reuse, "wisp_kv_cache_bytes{") != 0.0 || counter(&with_reuse, "wisp_prefix_cache_bytes{") == 0.0 {
        assert!(std::time::Instant::now() < deadline, "the finished sequence's KV never moved to the prefix cache");
        std::thread::sleep(Duration::from_millis(20));
    }
    let kept = counter(&with_reuse, "wisp_prefix_cache_bytes{");
    assert!(kept <= (1024 << 20) as f64, "prefix cache bytes over the default budget: {kept}");
    let mut next = history.as_array().unwrap().clone();
    next.push(json!({"role": "assistant", "content": first}));
    next.push(json!({"role": "user", "content": "And today?"}));
    let next = Value::Array(next);
    let (reply, _) = turn(&with_reuse, &next);
    let reused = counter(&with_reuse, "wisp_prefix_cache_hit_tokens_total");
    assert!(reused >= first_prompt, "the whole first prompt ({first_prompt} tokens) is reused, got {reused}");
    assert_eq!(turn(&without, &history).0, first);
    assert_eq!(turn(&without, &next).0, reply, "reuse changes nothing in the output");
    assert_eq!(counter(&without, "wisp_prefix_cache_hit_tokens_total"), 0.0);
    assert_eq!(counter(&without, "wisp_prefix_cache_bytes{"), 0.0);
}

/// A hybrid recurrent model (Qwen 3.5's shapes: Gated DeltaNet layers hold a state that
/// cannot be cut back to a shorter prefix): the state after the first prompt is kept as a
/// checkpoint beside the state at the reply's end, so the next turn, whose reply text may
/// tokenize otherwise than it was generated, still skips at least the first prompt, and
/// answers as without reuse.
#[test]
fn a_recurrent_models_next_turn_restores_a_kept_state_and_answers_the_same() {
    let model = format!("[[models]]\nid = \"q\"\npath = \"{}\"\n", common::synthetic("qwen35-Q4_K_M").display());
    let with_reuse = Server::start_with_config(&model);
    let without = Server::start_with_config(&format!("[limits]\nprefix_cache_mb = 0\n{model}"));
    let complete = |server: &Server, prompt: &str| {
        let body = json!({"model": "q", "prompt": prompt, "max_tokens": 16, "temperature": 0});
        let (status, r) = post(server, "/v1/completions", &body);
        assert_eq!(status, 200, "{r}");
        (r["choices"][0]["text"].as_str().unwrap().to_string(), r["usage"]["prompt_tokens"].as_f64().unwrap())
    };
    let first_prompt = "Tell me about lighthouses and the people who kept them, in some detail, please.";
    let (first, first_tokens) = complete(&with_reuse, first_prompt);
    let deadline = Instant::now() + Duration::from_secs(5);
    while counter(&with_reuse, "wisp_prefix_cache_bytes{") == 0.0 {
        assert!(Instant::now() < deadline, "the finished sequence's state never moved to the prefix cache");
        std::thread::sleep(Duration::from_millis(20));
    }
    let next = format!("{first_prompt}{first} And what about today?");
    let (reply, _) = complete(&with_reuse, &next);
    let reused = counter(&with_reuse, "wisp_prefix_cache_hit_tokens_total");
    assert!(reused >= first_tokens, "at least the first prompt ({first_tokens} tokens) is reused, got {reused}");
    assert_eq!(complete(&without, first_prompt).0, first);
    assert_eq!(complete(&without, &next).0, reply, "reuse changes nothing in the output");
    assert_eq!(counter(&without, "wisp_prefix_cache_hit_tokens_total"), 0.0);
}

#[test]
fn an_engine_panic_fails_its_requests_and_the_engine_serves_on() {
    // Room for two requests: a leaked place would show as a 503 below.
    let config = format!(
        "[limits]\nmax_queue = 1\nmax_batch = 1\n[[models]]\nid = \"gemma-3-270m\"\npath = \"{}\"\n",
        common::default_model_path().display()
    );
    let server = Server::start_with_env(&config, &[("WISPTEST_ENGINE_PANIC_ON", "PANIC-NOW")]);
    // The panicking request gets an error, in the OpenAI shape, not a hang.
    let (status, body) = post(&server, "/v1/completions", &json!({"prompt": "say PANIC-NOW", "max_tokens": 4}));
    assert!(status >= 500, "{status} {body}");
    assert_openai_error(&body, None);
    // Readiness follows the engine, which is serving again.
    assert_eq!(client().get(server.url("/ready")).send().unwrap().status().as_u16(), 200);
    for _ in 0..3 {
        let (status, body) = post(&server, "/v1/completions", &json!({"prompt": "1, 2, 3,", "max_tokens": 4}));
        assert_eq!(status, 200, "{body}");
    }
    // A panic while another request waits: each ends (an error or its completion), none
    // hangs, and no place in the queue leaks.
    let streams: Vec<_> = (0..2)
        .map(|i| {
            let url = server.url("/v1/completions");
            std::thread::spawn(move || {
                let prompt = if i == 0 { "PANIC-NOW" } else { "Once upon a time" };
                client().post(url).json(&json!({"prompt": prompt, "max_tokens": 16})).send().map(|r| r.status().as_u16())
            })
        })
        .collect();
    let statuses: Vec<u16> = streams.into_iter().map(|s| s.join().unwrap().expect("a request hung or the connection broke")).collect();
    // The second PANIC-NOW panicked the engine again, unless it found the queue still full
    // (the place of a request answered just before is given back a moment after its
    // answer): then it was refused with a 503 and never ran.
    // A panic in admission drops its request as the stack unwinds, so its 500 can go out a
    // moment before the supervisor counts the panic: the count is waited for (2 s at most).
    let expected = if statuses[0] == 503 { 1.0 } else { 2.0 };
    let counted = || server.metric("wisp_errors_total{type=\"engine_panic\"}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while counted() < expected && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let panics = counted();
    assert!(panics >= expected, "{panics} panics counted, statuses {statuses:?}");
    for _ in 0..4 {
        let (status, body) = post(&server, "/v1/completions", &json!({"prompt": "Hi", "max_tokens": 1}));
        assert_eq!(status, 200, "{body}");
    }
}
