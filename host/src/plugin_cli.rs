//! `wisp plugin new` and `wisp plugin test`: the plugin author's loop without a server.
//!
//! `new` writes a crate against `wisp-sdk` that builds to a component as is; `test` runs a
//! built `.wasm` through the same runtime the server uses, on a request read from JSON,
//! and prints the verdict and the transformed output.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use serde::Deserialize;

use crate::pipeline::shape::Shape;
use crate::policy::checks::RequestRules;
use crate::policy::kv::MemoryKv;
use crate::policy::limits::PluginLimits;
use crate::policy::{
    Decision, FailMode, Finish, Header, Message, PluginConfig, PolicyChain, PolicyEngine, Request, ResponseFormat, Sampling, ToolChoice,
    Usage,
};
use crate::request;
use crate::telemetry::Metrics;

#[derive(Debug, clap::Subcommand)]
pub enum PluginCommand {
    /// Write a new plugin crate (a `Policy` impl against wisp-sdk) into ./NAME.
    New {
        name: String,
        /// Path of the wisp-sdk crate (default: the one this wisp was built from).
        #[arg(long)]
        sdk: Option<PathBuf>,
    },
    /// Run a built plugin on a request, offline: prints the verdict and the output stream.
    Test {
        /// The plugin's component (.wasm).
        wasm: PathBuf,
        /// A chat request as JSON (OpenAI shape) with optional `headers` (object),
        /// `principal`, and `output` (the text chunks to stream through the plugin).
        #[arg(long)]
        request: PathBuf,
        /// The plugin's config as a JSON object (as `config` in wisp.toml would give it).
        #[arg(long, default_value = "{}")]
        config: String,
    },
    /// Measure what a config's plugin chain costs per request and per streamed chunk.
    Bench {
        /// The config whose `[[plugins]]` to measure (default: ./wisp.toml).
        #[arg(long, default_value = "wisp.toml")]
        config: PathBuf,
        /// Requests to time.
        #[arg(long, default_value_t = 300)]
        requests: usize,
        /// Decode step time to compare the per-chunk cost with, in ms (default: 1000 / the
        /// tg64 rate of `wisp bench` on the default model here, 39 tokens/s).
        #[arg(long, default_value_t = 25.4)]
        decode_ms: f64,
    },
}

pub fn run(command: PluginCommand) -> anyhow::Result<()> {
    match command {
        PluginCommand::New { name, sdk } => new(&name, sdk),
        PluginCommand::Test { wasm, request, config } => {
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            runtime.block_on(test(&wasm, &request, &config))
        }
        PluginCommand::Bench { config, requests, decode_ms } => {
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            runtime.block_on(bench(&config, requests, decode_ms))
        }
    }
}

fn new(name: &str, sdk: Option<PathBuf>) -> anyhow::Result<()> {
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        bail!("`{name}` is not a crate name (letters, digits, - and _)");
    }
    let dir = PathBuf::from(name);
    if dir.exists() {
        bail!("{} already exists", dir.display());
    }
    // A given path is used as written (relative to the new crate); the default is the SDK
    // this wisp was built from.
    let sdk = match sdk {
        Some(path) => path,
        None => {
            let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("../sdk");
            std::path::absolute(&built).unwrap_or(built)
        }
    };
    let ty: String = name
        .split(['-', '_'])
        .map(|part| {
            let mut chars = part.chars();
            chars.next().map(|c| c.to_ascii_uppercase().to_string() + chars.as_str()).unwrap_or_default()
        })
        .collect();
    std::fs::create_dir_all(dir.join("src"))?;
    std::fs::create_dir_all(dir.join(".cargo"))?;
    std::fs::write(
        dir.join("Cargo.toml"),
        format!(
            "[package]\nname = \"{name}\"\nversion = \"0.1.0\"\nedition = \"2024\"\n\n[lib]\ncrate-type = [\"cdylib\"]\n\n\
             [dependencies]\nwisp-sdk = {{ path = \"{}\" }}\nserde = {{ version = \"1\", features = [\"derive\"] }}\nserde_json = \"1\"\n\n[profile.release]\nopt-level = \"s\"\nlto = true\nstrip = true\n\n\
             # A plugin is its own workspace.\n[workspace]\n",
            sdk.display()
        ),
    )?;
    std::fs::write(dir.join(".cargo/config.toml"), "[build]\ntarget = \"wasm32-wasip2\"\n")?;
    std::fs::write(dir.join("src/lib.rs"), TEMPLATE.replace("MyPolicy", &ty).replace("my-policy", name))?;
    std::fs::write(
        dir.join("request.json"),
        "{\n  \"model\": \"gemma-3-270m\",\n  \"messages\": [{\"role\": \"user\", \"content\": \"Hello there\"}],\n  \
         \"headers\": {\"authorization\": \"Bearer sk-demo\"},\n  \"output\": [\"Hi! How \", \"can I help?\"]\n}\n",
    )?;
    let wasm = format!("target/wasm32-wasip2/release/{}.wasm", name.replace('-', "_"));
    println!("created {name}/ — a wisp policy plugin");
    println!("  cd {name} && cargo build --release        # builds {wasm}");
    println!("  wisp plugin test {wasm} --request request.json --config '{{\"word\": \"xyzzy\"}}'");
    println!(
        "then add it to wisp.toml:\n  [[plugins]]\n  name = \"{name}\"\n  wasm = \"{name}/{wasm}\"\n  config = {{ word = \"xyzzy\" }}"
    );
    Ok(())
}

const TEMPLATE: &str = r#"//! my-policy: a wisp governance plugin.
//!
//! Refuses prompts that contain a configured word and marks the end of every reply.
//! Edit the `Policy` impl; every hook you leave out passes through.

use serde::Deserialize;
use wisp_sdk::{ChunkResult, Denial, Finish, Policy, Request, Verdict};

/// This plugin's `config` table from wisp.toml (handed to `init` as JSON).
#[derive(Deserialize)]
struct MyPolicy {
    word: String,
}

impl Policy for MyPolicy {
    fn init(config: &str) -> Result<Self, String> {
        serde_json::from_str(config).map_err(|e| format!("my-policy config: {e}"))
    }

    fn on_request(&mut self, request: &Request) -> Verdict {
        if request.messages.iter().any(|m| m.content.contains(&self.word)) {
            return Verdict::Deny(Denial { status: 400, code: "forbidden_word".into(), message: format!("`{}` is not allowed", self.word) });
        }
        Verdict::Allow
    }

    fn on_chunk(&mut self, text: &str) -> ChunkResult {
        ChunkResult { emit: text.to_string(), stop: false }
    }

    fn on_finish(&mut self, _finish: &Finish) -> String {
        " [checked by my-policy]".to_string()
    }
}

wisp_sdk::export_policy!(MyPolicy);
"#;

/// The request file of `plugin test`.
#[derive(Deserialize)]
struct TestRequest {
    #[serde(default = "default_model")]
    model: String,
    messages: Vec<TestMessage>,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    headers: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    principal: Option<String>,
    #[serde(default)]
    output: Vec<String>,
    #[serde(default)]
    tools: Option<Vec<request::Tool>>,
    #[serde(default)]
    tool_choice: Option<request::ToolChoice>,
    #[serde(default)]
    parallel_tool_calls: Option<bool>,
    #[serde(default)]
    response_format: Option<request::ResponseFormat>,
}

#[derive(Deserialize)]
struct TestMessage {
    role: String,
    content: String,
}

fn default_model() -> String {
    crate::config::DEFAULT_MODEL_ID.to_string()
}

async fn test(wasm: &Path, request: &Path, config: &str) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(request).with_context(|| format!("reading {}", request.display()))?;
    let t: TestRequest = serde_json::from_str(&text).with_context(|| format!("parsing {}", request.display()))?;
    let config: serde_json::Value = serde_json::from_str(config).context("--config is not JSON")?;
    let config: toml::Table = serde_json::from_value(config).context("--config must be a JSON object")?;
    let name = wasm.file_stem().and_then(|s| s.to_str()).unwrap_or("plugin").to_string();
    let plugin = PluginConfig { name, wasm: wasm.to_path_buf(), config, fail: FailMode::Closed, limits: PluginLimits::default() };
    let engine = PolicyEngine::new(Arc::new(MemoryKv::new()), Arc::new(Metrics::new()), RequestRules::default())?;
    let chain = Arc::new(PolicyChain::load(engine, &[plugin]).await?);
    let prompt_chars: usize = t.messages.iter().map(|m| m.content.len()).sum();
    let shape = Shape::new(request::tools(t.tools, t.tool_choice, t.parallel_tool_calls)?, request::format(t.response_format)?);
    let mut request = Request {
        route: "chat".into(),
        model: t.model,
        messages: t.messages.into_iter().map(|m| Message { role: m.role, content: m.content }).collect(),
        sampling: Sampling { temperature: t.temperature.unwrap_or(1.0), top_p: 1.0, max_tokens: t.max_tokens, stop: vec![] },
        principal: t.principal,
        headers: t.headers.into_iter().map(|(name, value)| Header { name: name.to_lowercase(), value }).collect(),
        client_addr: "127.0.0.1".into(),
        prompt_tokens: (prompt_chars / 4).max(1) as u32,
        tools: Vec::new(),
        tool_choice: ToolChoice::None,
        parallel_tool_calls: true,
        response_format: ResponseFormat::Text,
    };
    shape.to_policy(&mut request);
    let mut session = chain.start().await?;
    match session.on_request(request).await? {
        Decision::Deny(d) => {
            println!("verdict: deny {} {}: {}", d.status, d.code, d.message);
            return Ok(());
        }
        Decision::Allow(r) => {
            let principal = r.principal.as_deref().unwrap_or("anonymous");
            println!("verdict: allow (principal: {principal}, {} messages)", r.messages.len());
            if !r.tools.is_empty() || r.tool_choice != ToolChoice::None {
                let names: Vec<&str> = r.tools.iter().map(|t| t.name.as_str()).collect();
                println!("tools: {names:?}, tool_choice: {:?}", r.tool_choice);
            }
            if r.response_format != ResponseFormat::Text {
                println!("response_format: {:?}", r.response_format);
            }
        }
    }
    let mut generated = 0u32;
    for chunk in &t.output {
        generated += 1;
        let (emit, stop) = session.on_chunk(chunk.clone()).await?;
        println!("chunk {chunk:?} -> {emit:?}{}", if stop { " [stop]" } else { "" });
        if stop {
            break;
        }
    }
    let rest = session.finish(Finish { reason: "stop".into(), usage: Usage { prompt_tokens: 0, completion_tokens: generated } }).await?;
    println!("finish -> {rest:?}");
    Ok(())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

async fn bench(config: &Path, requests: usize, decode_ms: f64) -> anyhow::Result<()> {
    let config = crate::config::Config::load(Some(config))?;
    if config.plugins.is_empty() {
        bail!("the config has no [[plugins]]");
    }
    let engine = PolicyEngine::new(Arc::new(ForgetfulKv), Arc::new(Metrics::new()), RequestRules::default())?;
    let chain = Arc::new(PolicyChain::load(engine, &config.plugins).await?);
    let request = Request {
        route: "chat".into(),
        model: crate::config::DEFAULT_MODEL_ID.into(),
        messages: vec![Message { role: "user".into(), content: "Write a short poem about the sea and the sky.".into() }],
        sampling: Sampling { temperature: 1.0, top_p: 1.0, max_tokens: Some(64), stop: vec![] },
        principal: None,
        headers: vec![Header { name: "authorization".into(), value: "Bearer sk-demo".into() }],
        client_addr: "127.0.0.1".into(),
        prompt_tokens: 12,
        tools: Vec::new(),
        tool_choice: ToolChoice::None,
        parallel_tool_calls: true,
        response_format: ResponseFormat::Text,
    };
    let chunk = " the sea".to_string();
    let (mut start_us, mut request_us, mut chunk_us) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..requests {
        let t = std::time::Instant::now();
        let mut session = chain.start().await?;
        start_us.push(t.elapsed().as_secs_f64() * 1e6);
        let t = std::time::Instant::now();
        if let Decision::Deny(d) = session.on_request(request.clone()).await? {
            bail!("the chain denied the benchmark request ({} {}): every plugin must see it", d.status, d.code);
        }
        request_us.push(t.elapsed().as_secs_f64() * 1e6);
        for _ in 0..16 {
            let t = std::time::Instant::now();
            session.on_chunk(chunk.clone()).await?;
            chunk_us.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    for v in [&mut start_us, &mut request_us, &mut chunk_us] {
        v.sort_by(f64::total_cmp);
    }
    let names: Vec<String> = config.plugins.iter().map(|p| p.name.clone()).collect();
    println!("chain: {} ({} plugins), {requests} requests, 16 chunks each", names.join(" → "), names.len());
    println!("| stage | p50 µs | p99 µs |");
    println!("|---|---|---|");
    for (stage, v) in
        [("instantiate + init (per request)", &start_us), ("on-request (per request)", &request_us), ("on-chunk (per chunk)", &chunk_us)]
    {
        println!("| {stage} | {:.1} | {:.1} |", percentile(v, 0.5), percentile(v, 0.99));
    }
    let per_request: Vec<f64> = start_us.iter().zip(&request_us).map(|(a, b)| a + b).collect();
    let mut per_request = per_request;
    per_request.sort_by(f64::total_cmp);
    println!(
        "| whole chain before the model (per request) | {:.1} | {:.1} |",
        percentile(&per_request, 0.5),
        percentile(&per_request, 0.99)
    );
    println!("on-chunk share of a {decode_ms} ms decode step: {:.3} % (p50)", percentile(&chunk_us, 0.5) / (decode_ms * 1000.0) * 100.0);
    Ok(())
}

/// The benchmark's kv: every call is made (the host-call cost is measured) but nothing
/// accumulates, so a rate limit never cuts the chain short mid-benchmark.
struct ForgetfulKv;

#[async_trait::async_trait]
impl crate::policy::kv::KvBackend for ForgetfulKv {
    async fn get(&self, _key: &str) -> anyhow::Result<Option<Vec<u8>>> {
        Ok(None)
    }
    async fn set(&self, _key: &str, _value: Vec<u8>, _ttl: Option<std::time::Duration>) -> anyhow::Result<()> {
        Ok(())
    }
    async fn incr(&self, _key: &str, delta: i64, _ttl: Option<std::time::Duration>) -> anyhow::Result<i64> {
        Ok(delta)
    }
    async fn compare_and_swap(
        &self,
        _key: &str,
        _expected: Option<&[u8]>,
        _new: Vec<u8>,
        _ttl: Option<std::time::Duration>,
    ) -> anyhow::Result<bool> {
        Ok(true)
    }
}
