//! Operations end to end: the metrics a scrape shows after real traffic (including a plugin
//! deny and a plugin trap), the Grafana dashboard naming only exported metrics, request ids
//! in headers and logs (and no prompt in the logs), CORS, route time limits, and SIGTERM
//! with streams open.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::time::{Duration, Instant};

use common::{Server, client, default_model_path, workspace_root};
use serde_json::{Value, json};

fn model() -> String {
    format!("[[models]]\nid = \"gemma-3-270m\"\npath = \"{}\"\n", default_model_path().display())
}

fn plugin(name: &str, wasm: &str, config: &str, extra: &str) -> String {
    let dist = workspace_root().join("plugins/dist");
    format!("[[plugins]]\nname = \"{name}\"\nwasm = \"{}/{wasm}\"\nconfig = {config}\n{extra}\n", dist.display())
}

fn chat(server: &Server, key: Option<&str>, body: Value) -> reqwest::blocking::Response {
    let mut request = client().post(server.url("/v1/chat/completions")).json(&body);
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    request.send().unwrap()
}

/// Prometheus text: `name{labels}` → value, and the families declared by `# TYPE`.
struct Scrape {
    samples: HashMap<String, f64>,
    families: Vec<String>,
}

impl Scrape {
    fn take(server: &Server) -> Scrape {
        let text = client().get(server.url("/metrics")).send().unwrap().text().unwrap();
        let mut samples = HashMap::new();
        let mut families = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                families.push(rest.split(' ').next().unwrap().to_string());
            } else if !line.starts_with('#') && !line.is_empty() {
                let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("not a sample: {line}"));
                let value: f64 = value.parse().unwrap_or_else(|_| panic!("not a number: {line}"));
                samples.insert(series.to_string(), value);
            }
        }
        Scrape { samples, families }
    }

    /// The sum over every series of `name` whose labels include all of `labels`.
    fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|(series, _)| {
                let (series_name, series_labels) = series.split_once('{').unwrap_or((series, ""));
                series_name == name && labels.iter().all(|(k, v)| series_labels.contains(&format!("{k}=\"{v}\"")))
            })
            .map(|(_, v)| v)
            .sum()
    }
}

#[test]
fn metrics_move_with_traffic_including_plugin_denies_and_traps() {
    let auth = plugin(
        "auth",
        "api_key_auth.wasm",
        // printf sk-demo | sha256sum
        "{ keys = [{ name = \"demo\", sha256 = \"f77894fdfa58e447c57e077eaa9708e8e009c84dc6aba2db80461275e9b85be7\", models = [\"*\"] }] }",
        "",
    );
    let trap = plugin("flaky", "hostile.wasm", "{ mode = \"trap\", hook = \"request\" }", "fail = \"open\"");
    let server = Server::start_with_config(&format!("{}{auth}{trap}", model()));
    let before = Scrape::take(&server);
    assert!(before.sum("wisp_model_load_seconds", &[("model", "gemma-3-270m")]) > 0.0);

    let hello = json!({"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 5});
    assert_eq!(chat(&server, None, hello.clone()).status(), 401, "auth denies without a key");
    assert_eq!(chat(&server, Some("sk-demo"), hello.clone()).status(), 200, "the trapping plugin fails open");
    let mut streamed = hello.clone();
    streamed["stream"] = json!(true);
    let body = chat(&server, Some("sk-demo"), streamed).text().unwrap();
    assert!(body.trim_end().ends_with("data: [DONE]"));
    let mut unknown = hello.clone();
    unknown["model"] = json!("nope");
    assert_eq!(chat(&server, Some("sk-demo"), unknown).status(), 404);

    // The engine lowers its gauges after it has sent a request's last event (keeping the
    // finished prefix comes in between), so a scrape right after `[DONE]` may still count
    // the stream as running: they must settle, not be settled at once.
    let m = [("model", "gemma-3-270m")];
    let deadline = Instant::now() + Duration::from_secs(10);
    let after = loop {
        let scrape = Scrape::take(&server);
        let busy = scrape.sum("wisp_requests_running", &m) + scrape.sum("wisp_requests_waiting", &m);
        if busy == 0.0 || Instant::now() > deadline {
            break scrape;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let grew = |name: &str, labels: &[(&str, &str)], by: f64| {
        let delta = after.sum(name, labels) - before.sum(name, labels);
        assert!(delta >= by, "{name}{labels:?} grew by {delta}, expected at least {by}");
    };
    grew("wisp_requests_total", &[("route", "chat_completions"), ("status", "200")], 2.0);
    grew("wisp_requests_total", &[("route", "chat_completions"), ("status", "401")], 1.0);
    grew("wisp_requests_total", &[("route", "chat_completions"), ("status", "404")], 1.0);
    grew("wisp_request_duration_seconds_count", &[("route", "chat_completions")], 4.0);
    grew("wisp_errors_total", &[("type", "missing_api_key")], 1.0);
    grew("wisp_errors_total", &[("type", "model_not_found")], 1.0);
    grew("wisp_time_to_first_token_seconds_count", &m, 2.0);
    grew("wisp_inter_token_latency_seconds_count", &m, 2.0);
    grew("wisp_queue_time_seconds_count", &m, 2.0);
    grew("wisp_prompt_tokens_total", &m, 10.0);
    grew("wisp_generation_tokens_total", &m, 2.0);
    grew("wisp_plugin_verdicts_total", &[("plugin", "auth"), ("verdict", "deny")], 1.0);
    grew("wisp_plugin_verdicts_total", &[("plugin", "auth"), ("verdict", "rewrite")], 2.0);
    grew("wisp_plugin_failures_total", &[("plugin", "flaky"), ("kind", "trap")], 2.0);
    grew("wisp_plugin_hook_duration_seconds_count", &[("plugin", "auth"), ("hook", "on_request")], 3.0);
    assert_eq!(after.sum("wisp_requests_running", &m), 0.0);
    assert_eq!(after.sum("wisp_requests_waiting", &m), 0.0);
    // Latencies are sane: a 5-token reply's first token within the histogram's range.
    let ttft = after.sum("wisp_time_to_first_token_seconds_sum", &m) / after.sum("wisp_time_to_first_token_seconds_count", &m);
    assert!(ttft > 0.0 && ttft < 30.0, "mean TTFT {ttft}");

    // Every metric the Grafana dashboard queries is one the server exports.
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(workspace_root().join("docker/grafana/dashboards/wisp.json")).unwrap()).unwrap();
    let mut queried = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if word.starts_with("wisp_") {
                    queried.push(word.to_string());
                }
            }
        }
    }
    assert!(queried.len() >= 10, "{queried:?}");
    for name in &queried {
        let family = ["_bucket", "_count", "_sum"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(name);
        assert!(after.families.iter().any(|f| f == family), "the dashboard queries `{name}`, which /metrics does not export");
    }
}

#[test]
fn request_ids_round_trip_and_reach_the_engine_logs_but_prompts_do_not() {
    let server = Server::start_logged(&model());
    let secret_prompt = "my-very-private-prompt-text";
    let body = json!({"messages": [{"role": "user", "content": secret_prompt}], "max_tokens": 3});
    let r = client().post(server.url("/v1/chat/completions")).header("x-request-id", "trace-42.a").json(&body).send().unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-request-id"], "trace-42.a");
    let generated = client().get(server.url("/v1/models")).send().unwrap();
    let id = generated.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(id.len(), 32, "a fresh id when none is sent: {id}");
    let junk = client().get(server.url("/health")).header("x-request-id", "bad id with spaces").send().unwrap();
    assert_ne!(junk.headers()["x-request-id"], "bad id with spaces");

    // The engine's spans (queue, prefill, decode on the model thread) carry the id.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let log = server.log();
        let lines: Vec<_> = log.lines().filter(|l| l.contains("trace-42.a")).collect();
        let has = |span: &str| lines.iter().any(|l| l.contains(&format!("{span}{{")) || l.contains(&format!(":{span}:")));
        if has("queue") && has("prefill") && has("decode") {
            break;
        }
        assert!(Instant::now() < deadline, "engine spans with the request id missing from the log:\n{log}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!server.log().contains(secret_prompt), "a prompt reached the log");
}

#[test]
fn cors_and_route_time_limits() {
    let config = format!("[server]\ncors_origins = [\"http://chat.example\"]\ngeneration_timeout_seconds = 1\n{}", model());
    let server = Server::start_with_config(&config);
    let preflight = |origin: &str| {
        client()
            .request(reqwest::Method::OPTIONS, server.url("/v1/chat/completions"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "authorization, content-type")
            .send()
            .unwrap()
    };
    let allowed = preflight("http://chat.example");
    assert_eq!(allowed.headers().get("access-control-allow-origin").map(|v| v.to_str().unwrap()), Some("http://chat.example"));
    let refused = preflight("http://evil.example");
    assert!(refused.headers().get("access-control-allow-origin").is_none());

    // A non-streamed reply that would take longer than the 1 s limit.
    let started = Instant::now();
    let r = chat(&server, None, json!({"messages": [{"role": "user", "content": "Write a long story."}], "max_tokens": 400}));
    assert_eq!(r.status(), 503);
    let body: Value = r.json().unwrap();
    assert_eq!(body["error"]["code"], "request_timeout");
    assert!(started.elapsed() < Duration::from_secs(5));
    // The engine is free again at once (the abandoned generation was cancelled).
    let r = chat(&server, None, json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}));
    assert_eq!(r.status(), 200);
}

/// Opens a streamed chat and reads its first event.
fn open_stream(server: &Server, max_tokens: u32) -> BufReader<reqwest::blocking::Response> {
    let body =
        json!({"messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": max_tokens, "stream": true, "temperature": 0});
    let mut stream = BufReader::new(client().post(server.url("/v1/chat/completions")).json(&body).send().unwrap());
    let mut first = String::new();
    stream.read_line(&mut first).unwrap();
    assert!(first.starts_with("data: "), "{first}");
    stream
}

fn events(stream: BufReader<reqwest::blocking::Response>) -> Vec<String> {
    stream.lines().map(|l| l.unwrap()).filter(|l| l.starts_with("data: ")).collect()
}

#[test]
fn sigterm_lets_a_stream_finish_within_the_grace_period() {
    let mut server = Server::start_with_config(&format!("[server]\nshutdown_grace_seconds = 10\n{}", model()));
    let stream = open_stream(&server, 30);
    server.terminate();
    // Readiness fails while draining (or the listener is already closed).
    let ready = client().get(server.url("/ready")).timeout(Duration::from_secs(2)).send();
    assert!(ready.map(|r| r.status().as_u16() == 503).unwrap_or(true));
    let events = events(stream);
    assert_eq!(events.last().map(String::as_str), Some("data: [DONE]"));
    assert!(events.iter().any(|l| l.contains("\"finish_reason\":\"length\"")), "{events:?}");
    let status = server.wait_exit(Duration::from_secs(15)).expect("wisp exits once the stream is done");
    assert!(status.success(), "{status:?}");
}

#[test]
fn sigterm_ends_a_stream_still_open_after_the_grace_period_with_an_error() {
    let mut server = Server::start_with_config(&format!("[server]\nshutdown_grace_seconds = 2\n{}", model()));
    let stream = open_stream(&server, 3000);
    server.terminate();
    let signalled = Instant::now();
    let events = events(stream);
    let ended = signalled.elapsed();
    assert_eq!(events.last().map(String::as_str), Some("data: [DONE]"), "{:?}", events.last());
    let error: Value = serde_json::from_str(events[events.len() - 2].strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(error["error"]["code"], "server_shutting_down", "{error}");
    assert!(ended >= Duration::from_millis(1500) && ended < Duration::from_secs(10), "ended after {ended:?}");
    let status = server.wait_exit(Duration::from_secs(15)).expect("wisp exits after the grace period");
    assert!(status.success(), "{status:?}");
}

#[test]
fn the_examples_run_against_a_server() {
    let server = Server::start_with_config(&model());
    let root = workspace_root();
    let run = |program: &str, args: &[&str]| {
        let out = std::process::Command::new(program)
            .args(args)
            .current_dir(&root)
            .env("WISP_URL", &server.url)
            .output()
            .unwrap_or_else(|e| panic!("{program}: {e}"));
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(out.status.success(), "{program} {args:?} failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
        stdout
    };
    let curl = run("bash", &["examples/curl.sh"]);
    assert!(curl.contains("data: [DONE]") && curl.contains("\"messages\":[{"), "{curl}");
    let python = root.join(".venv/bin/python");
    let python = python.to_str().unwrap();
    let sdk = run(python, &["examples/python_client.py"]);
    assert!(sdk.contains("gemma-3-270m"), "{sdk}");
    let ws = run(python, &["examples/ws_client.py", "Tell me a long story."]);
    assert!(ws.contains("'type': 'pong'") && ws.contains("'type': 'done'"), "{ws}");
}

/// The server's resident memory in MB.
fn rss_mb(server: &Server) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", server.pid())).unwrap();
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")).unwrap().trim().trim_end_matches(" kB").trim().parse::<u64>().unwrap() / 1024
}

fn loaded(server: &Server, id: &str) -> bool {
    let models: Value = client().get(server.url("/v1/models")).send().unwrap().json().unwrap();
    models["data"].as_array().unwrap().iter().find(|m| m["id"] == id).unwrap()["loaded"].as_bool().unwrap()
}

/// Models load and unload without a restart: on demand (the request waits), by the admin
/// routes, and after `keep_alive` idle seconds; a stream running on a model being unloaded
/// finishes, and the memory goes back to the OS.
#[test]
fn models_load_and_unload_without_a_restart() {
    let instruct = workspace_root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let server = Server::start_logged(&format!(
        "{}[[models]]\nid = \"smol\"\npath = \"{}\"\nkeep_alive = 2\n[admin]\nkey = \"admin-key\"\n",
        model(),
        instruct.display()
    ));
    let admin = |path: &str| -> (u16, Value) {
        let r = client().post(server.url(path)).bearer_auth("admin-key").send().unwrap();
        (r.status().as_u16(), r.json().unwrap())
    };
    let ask = |model: &str| chat(&server, None, json!({"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}));
    assert!(!loaded(&server, "smol"), "not preloaded");
    // The default model's token trie is built in the background after its load; measure
    // once it stands, or its ~50 MB land between `before` and `after`.
    const TRIE_BUILT: &str = "token trie for constrained decoding built";
    server.wait_for_log(TRIE_BUILT, 1);
    let before = rss_mb(&server);

    // On demand: the request waits for the load.
    assert_eq!(ask("smol").status(), 200);
    assert!(loaded(&server, "smol"));
    server.wait_for_log(TRIE_BUILT, 2);
    let with_model = rss_mb(&server);
    // Idle past keep_alive (2 s): unloaded, memory back.
    let deadline = Instant::now() + Duration::from_secs(20);
    while loaded(&server, "smol") {
        assert!(Instant::now() < deadline, "keep_alive did not unload the model");
        std::thread::sleep(Duration::from_millis(200));
    }
    server.wait_for_log("model memory freed", 1);
    let after = rss_mb(&server);
    eprintln!("RSS: {before} MB without the model, {with_model} MB with it, {after} MB after keep_alive unloaded it");
    assert!(after + (with_model - before) / 2 < with_model, "memory did not go back: {before} → {with_model} → {after} MB");

    // The admin routes; a stream running on the model finishes after its unload.
    let (status, state) = admin("/admin/models/smol/load");
    assert_eq!((status, state["loaded"].as_bool()), (200, Some(true)), "{state}");
    let body = json!({"model": "smol", "messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 40, "stream": true,
                      "logit_bias": {"2": -100}});
    let mut stream = BufReader::new(client().post(server.url("/v1/chat/completions")).json(&body).send().unwrap());
    let mut first = String::new();
    stream.read_line(&mut first).unwrap();
    let (status, state) = admin("/admin/models/smol/unload");
    assert_eq!((status, state["was_loaded"].as_bool()), (200, Some(true)), "{state}");
    assert!(!loaded(&server, "smol"));
    let events = events(stream);
    assert_eq!(events.last().map(String::as_str), Some("data: [DONE]"));
    assert!(events.iter().any(|l| l.contains("\"finish_reason\":\"length\"")), "the stream ran to its end: {events:?}");
    assert_eq!(ask("smol").status(), 200, "the next request loads it again");

    // The default model too: still ready, and reloaded by the next request.
    assert_eq!(admin("/admin/models/gemma-3-270m/unload").0, 200);
    assert_eq!(client().get(server.url("/ready")).send().unwrap().status(), 200);
    assert_eq!(ask("gemma-3-270m").status(), 200);
    assert_eq!(admin("/admin/models/nope/load").0, 404);
    assert_eq!(client().post(server.url("/admin/models/smol/unload")).send().unwrap().status(), 401);
}
