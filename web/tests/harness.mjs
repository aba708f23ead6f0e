// Starts the real wisp binary (WISPTEST_BIN) with the real default model on port 0, and
// Debian's Chromium through playwright-core (never a downloaded browser).
import { spawn } from "node:child_process";
import { mkdtempSync, writeFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { createInterface } from "node:readline";
import { chromium } from "playwright-core";

export const root = resolve(new URL("../..", import.meta.url).pathname);
const bin = process.env.WISPTEST_BIN || join(root, "target/release/wisp");
const dist = join(root, "plugins/dist");

export const MODEL = `[[models]]\nid = "gemma-3-270m"\npath = "${join(root, "models/gemma-3-270m-q4_k_m.gguf")}"\n`;

export function plugin(name, wasm, config) {
  return `[[plugins]]\nname = "${name}"\nwasm = "${join(dist, wasm)}"\nconfig = ${config}\n`;
}

/** A running server; `stop()` kills it and removes its directory. */
export async function startServer(extraToml = "") {
  const dir = mkdtempSync(join(tmpdir(), "wisp-web-"));
  writeFileSync(join(dir, "wisp.toml"), MODEL + extraToml);
  const child = spawn(bin, ["serve", "--listen", "127.0.0.1:0", "--config", join(dir, "wisp.toml")], {
    cwd: dir,
    // Only the config file configures the server (WISP_* variables would override it).
    env: { ...Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith("WISP_"))), RUST_LOG: "warn" },
    stdio: ["ignore", "pipe", "inherit"],
  });
  const url = await new Promise((resolveUrl, reject) => {
    const lines = createInterface({ input: child.stdout });
    lines.on("line", (line) => {
      if (line.startsWith("wisp listening on ")) resolveUrl(line.slice("wisp listening on ".length).trim());
    });
    child.once("exit", (code) => reject(new Error(`wisp exited (${code}) before listening`)));
  });
  for (let i = 0; i < 600; i++) {
    const ready = await fetch(`${url}/ready`).then((r) => r.ok).catch(() => false);
    if (ready) break;
    await new Promise((r) => setTimeout(r, 100));
  }
  return {
    url,
    stop() {
      child.kill("SIGKILL");
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

export async function launch() {
  return chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    headless: true,
    args: [
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
  });
}

/** A fresh page on the chat with a small reply budget, so the real model answers quickly. */
export async function openChat(browser, url, { maxTokens = 8, colorScheme = "light", viewport } = {}) {
  const context = await browser.newContext({ colorScheme, viewport: viewport || { width: 1200, height: 800 } });
  await context.grantPermissions(["clipboard-read", "clipboard-write"], { origin: url }).catch(() => {});
  const page = await context.newPage();
  const problems = [];
  page.on("pageerror", (e) => problems.push(e.message));
  await page.goto(url);
  await page.locator("#model option").first().waitFor({ state: "attached" });
  await setMaxTokens(page, maxTokens);
  return { page, context, problems };
}

export async function setMaxTokens(page, n) {
  await page.locator("#settings summary").click();
  await page.fill("#max-tokens", String(n));
  await page.fill("#temperature", "0");
  await page.locator("#settings summary").click();
}

/** Types a message, sends it with Enter and waits for the reply to finish. */
export async function sendAndWait(page, text) {
  const before = await page.locator(".message.assistant").count();
  await page.fill("#input", text);
  await page.press("#input", "Enter");
  await waitIdle(page, before + 1);
}

export async function waitIdle(page, assistants) {
  await page.waitForFunction(
    (n) => document.querySelectorAll(".message.assistant").length >= n && !document.getElementById("send").hidden && !document.querySelector(".streaming"),
    assistants,
    { timeout: 120_000 },
  );
}
