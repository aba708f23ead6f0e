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

pub fn default_model_path() -> PathBuf {
    let path = workspace_root().join("models/gemma-3-270m-q4_k_m.gguf");
    assert!(path.exists(), "{} is missing: run scripts/fetch-model.sh (make test does)", path.display());
    path
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
        Self::start_with_config(&format!(
            "[[models]]\nid = \"gemma-3-270m\"\npath = \"{}\"\n{extra}\n",
            default_model_path().display()
        ))
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

    fn start_in(toml: &str, logged: bool) -> Server {
        let dir = tempfile::tempdir().expect("tempdir");
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
        let mut child = Command::new(env!("CARGO_BIN_EXE_wisp"))
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
        let deadline = Instant::now() + Duration::from_secs(120);
        let client = client();
        while Instant::now() < deadline {
            if let Ok(r) = client.get(self.url("/ready")).send()
                && r.status().as_u16() == 200
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("wisp did not become ready in time");
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

/// A blocking HTTP client with a generous timeout (the model is real and runs on CPU).
pub fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder().timeout(Duration::from_secs(300)).build().expect("http client")
}
