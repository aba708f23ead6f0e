// The web chat in Chromium against the real binary and model: streaming, stop, regenerate,
// edit, sessions across reloads and switches, the keyboard, the API-key prompt, a 429, and
// markdown that renders code and tables but never runs a reply's script.
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { launch, openChat, plugin, sendAndWait, setMaxTokens, startServer, waitIdle } from "./harness.mjs";

let browser;
before(async () => {
  browser = await launch();
});
after(async () => {
  await browser?.close();
});

const texts = (page, selector) => page.locator(selector).allTextContents();

describe("without auth", () => {
  let server;
  before(async () => {
    server = await startServer();
  });
  after(() => server?.stop());

  test("sends with Enter and streams a reply, then shows tokens/s", async () => {
    const { page, problems } = await openChat(browser, server.url);
    assert.deepEqual(await texts(page, "#model option"), ["gemma-3-270m"]);
    // Shift+Enter is a new line, not a send.
    await page.fill("#input", "Hello");
    await page.press("#input", "Shift+Enter");
    await page.type("#input", "there");
    assert.equal(await page.inputValue("#input"), "Hello\nthere");
    assert.equal(await page.locator(".message").count(), 0);
    // Watch the reply grow while it streams.
    await setMaxTokens(page, 48);
    const growth = page.evaluate(
      () =>
        new Promise((resolve) => {
          const seen = new Set();
          const observer = new MutationObserver(() => {
            const bubble = document.querySelector(".streaming .bubble");
            if (bubble) seen.add(bubble.textContent.length);
            else if (seen.size) {
              observer.disconnect();
              resolve(seen.size);
            }
          });
          observer.observe(document.getElementById("messages"), { subtree: true, childList: true, characterData: true });
        }),
    );
    await page.press("#input", "Enter");
    await waitIdle(page, 1);
    assert.ok((await growth) >= 3, "the reply was painted several times while streaming");
    assert.deepEqual(await texts(page, ".message.user .bubble"), ["Hello\nthere"]);
    assert.ok((await page.locator(".message.assistant .bubble").textContent()).trim().length > 0);
    assert.match(await page.textContent("#speed"), /\d+ tokens · [\d.]+ tokens\/s/);
    assert.equal(await page.locator("#sessions li").count(), 1);
    assert.deepEqual(problems, []);
  });

  test("stops a reply mid-stream and keeps what was written", async () => {
    const { page } = await openChat(browser, server.url, { maxTokens: 400 });
    await page.fill("#input", "Write a long story about a dragon.");
    await page.press("#input", "Enter");
    await page.waitForFunction(() => (document.querySelector(".streaming .bubble")?.textContent.length || 0) > 20);
    await page.click("#stop");
    await waitIdle(page, 1);
    assert.equal(await page.isHidden("#stop"), true);
    const meta = await page.locator(".message.assistant .meta").textContent();
    assert.match(meta, /stopped/);
    const reply = await page.locator(".message.assistant .bubble").textContent();
    assert.ok(reply.length > 20, "the partial reply stays");
  });

  test("regenerates the last reply and edits an earlier message", async () => {
    const { page } = await openChat(browser, server.url);
    await page.click("#new-chat");
    await sendAndWait(page, "First question?");
    await sendAndWait(page, "Second question?");
    assert.equal(await page.locator(".message").count(), 4);

    // Regenerate: the conversation keeps its length, the reply is new.
    await page.click(".message.assistant:last-child .regenerate");
    await page.waitForSelector(".streaming");
    await waitIdle(page, 2);
    assert.equal(await page.locator(".message").count(), 4);
    assert.equal(await page.locator(".regenerate").count(), 1);

    // Edit the first message: everything after it is replaced by the new turn.
    await page.click('.message.user[data-index="0"] .edit');
    await page.fill(".edit-box textarea", "An edited first question?");
    await page.click(".edit-send");
    await page.waitForSelector(".streaming");
    await waitIdle(page, 1);
    assert.deepEqual(await texts(page, ".message.user .bubble"), ["An edited first question?"]);
    assert.equal(await page.locator(".message").count(), 2);
    // The server agrees.
    const id = await page.evaluate(() => localStorage.getItem("wisp.session"));
    const session = await (await fetch(`${server.url}/v1/sessions/${id}`)).json();
    assert.deepEqual(
      session.messages.map((m) => m.role),
      ["user", "assistant"],
    );
    assert.equal(session.messages[0].content, "An edited first question?");
  });

  test("sessions survive a reload, show in another browser, and switch", async () => {
    const { page, context } = await openChat(browser, server.url);
    await page.click("#new-chat");
    await sendAndWait(page, "Remember the word lighthouse.");
    await page.click("#new-chat");
    await sendAndWait(page, "A different chat.");
    await page.reload();
    await page.waitForSelector(".message.user");
    assert.deepEqual(await texts(page, ".message.user .bubble"), ["A different chat."]);
    const titles = await texts(page, "#sessions .title");
    assert.ok(titles.includes("Remember the word lighthouse.") && titles.includes("A different chat."), titles.join(" | "));
    await page.locator("#sessions .title", { hasText: "lighthouse" }).click();
    await page.waitForFunction(() => document.querySelector(".message.user .bubble")?.textContent.includes("lighthouse"));
    assert.equal(await page.locator("#sessions li.active .title").textContent(), "Remember the word lighthouse.");

    // Rename and delete from the sidebar.
    page.once("dialog", (d) => d.accept("Lighthouse chat"));
    await page.locator("#sessions li.active .rename").click();
    await page.waitForFunction(() => [...document.querySelectorAll("#sessions .title")].some((t) => t.textContent === "Lighthouse chat"));

    // Another browser (no shared storage) sees the same server-side sessions.
    const other = await openChat(browser, server.url);
    await other.page.waitForSelector("#sessions li");
    assert.ok((await texts(other.page, "#sessions .title")).includes("Lighthouse chat"));
    await other.context.close();

    page.once("dialog", (d) => d.accept());
    await page.locator("#sessions li.active .delete").click();
    await page.waitForFunction(() => ![...document.querySelectorAll("#sessions .title")].some((t) => t.textContent === "Lighthouse chat"));
    assert.equal(await page.locator(".message").count(), 0);
    await context.close();
  });

  test("shows a session's tool calls and results, collapsed until opened", async () => {
    // An API client chats in a session with a tool; the model (bound by grammar) calls it.
    const post = (path, body) =>
      fetch(`${server.url}${path}`, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body) }).then(async (r) => {
        assert.equal(r.status, 200, await r.clone().text());
        return r.json();
      });
    const session = await post("/v1/sessions", { title: "Weather with a tool" });
    const weather = { type: "function", function: { name: "get_weather", parameters: { type: "object", properties: { city: { enum: ["Paris", "Oslo"] } }, required: ["city"], additionalProperties: false } } };
    const asked = await post("/v1/chat/completions", {
      session_id: session.id,
      messages: [{ role: "user", content: "What is the weather in Paris?" }],
      tools: [weather],
      tool_choice: { type: "function", function: { name: "get_weather" } },
      parallel_tool_calls: false,
      max_tokens: 48,
      temperature: 0,
    });
    const call = asked.choices[0].message.tool_calls[0];
    await post("/v1/chat/completions", { session_id: session.id, messages: [{ role: "tool", tool_call_id: call.id, content: "18 C and sunny" }], max_tokens: 4 });

    const { page, context, problems } = await openChat(browser, server.url);
    await page.locator("#sessions .title", { hasText: "Weather with a tool" }).click();
    const tool = page.locator(".message.assistant details.tool-call").first();
    await tool.waitFor();
    assert.equal(await tool.locator("summary").textContent(), "Called get_weather");
    assert.equal(await tool.getAttribute("data-call-id"), call.id);
    assert.equal(await tool.locator("pre").isVisible(), false, "collapsed at first");
    await tool.locator("summary").click();
    assert.deepEqual(JSON.parse(await tool.locator("pre").textContent()), JSON.parse(call.function.arguments));
    const result = page.locator(".message.tool details.tool-result");
    assert.equal(await result.locator("summary").textContent(), `Result of ${call.id}`);
    await result.locator("summary").click();
    assert.equal(await result.locator("pre").textContent(), "18 C and sunny");
    assert.deepEqual(problems, []);
    await context.close();
  });

  test("works on a phone-sized screen", async () => {
    const { page } = await openChat(browser, server.url, { viewport: { width: 390, height: 800 } });
    assert.equal(await page.isVisible("#toggle-sidebar"), true);
    const box = await page.locator("#input").boundingBox();
    assert.ok(box.width > 200 && box.x + box.width <= 390, JSON.stringify(box));
    await page.click("#toggle-sidebar");
    await page.waitForFunction(() => document.getElementById("sidebar").getBoundingClientRect().left >= 0);
  });
});

describe("a reply's markup", () => {
  let server;
  before(async () => {
    const inject =
      '"\\n\\n```python\\nprint(\\"hi\\")\\n```\\n\\n| a | b |\\n|---|---|\\n| 1 | 2 |\\n\\n<script>window.__pwned = 1</script><img src=x onerror=\\"window.__pwned = 2\\">"';
    server = await startServer(plugin("inject", "hostile.wasm", `{ mode = "inject", text = ${inject} }`));
  });
  after(() => server?.stop());

  test("renders code and tables, and shows script as text without running it", async () => {
    const { page, problems } = await openChat(browser, server.url);
    await sendAndWait(page, "Show me code.");
    const bubble = page.locator(".message.assistant .bubble");
    assert.equal(await bubble.locator("pre code.hljs").count(), 1, "highlighted code block");
    assert.equal(await bubble.locator("pre .copy").count(), 1, "copy button");
    await bubble.locator("pre .copy").click();
    await page.waitForFunction(() => document.querySelector("pre .copy").textContent === "Copied");
    assert.equal(await bubble.locator("table td").count(), 2);
    assert.equal(await bubble.locator("script, img").count(), 0);
    assert.match(await bubble.textContent(), /<script>window.__pwned = 1<\/script>/);
    await page.waitForTimeout(300);
    assert.equal(await page.evaluate(() => window.__pwned), undefined);
    assert.deepEqual(problems, []);
  });
});

describe("with auth and a rate limit", () => {
  let server;
  const key = "sk-web-test";
  before(async () => {
    const sha = createHash("sha256").update(key).digest("hex");
    server = await startServer(
      plugin("auth", "api_key_auth.wasm", `{ keys = [{ name = "web", sha256 = "${sha}", models = ["*"] }] }`) +
        plugin("rate-limit", "rate_limit.wasm", "{ requests_per_minute = 12 }"),
    );
  });
  after(() => server?.stop());

  test("asks for the key, keeps it, and says when to retry after a 429", async () => {
    const context = await browser.newContext();
    const page = await context.newPage();
    await page.goto(server.url);
    // Listing sessions needs a key: the dialog asks.
    await page.waitForSelector("#key-dialog[open]");
    assert.match(await page.textContent("#key-reason"), /API key/);
    await page.fill("#key-input", "sk-wrong");
    await page.click("#key-save");
    // A wrong key is refused and the dialog asks again, saying why.
    await page.waitForFunction(() => document.getElementById("key-dialog").open && /Incorrect API key/.test(document.getElementById("key-reason").textContent));
    await page.fill("#key-input", key);
    await page.click("#key-save");
    await page.waitForFunction((k) => !document.getElementById("key-dialog").open && localStorage.getItem("wisp.apiKey") === k, key);
    await setMaxTokens(page, 4);

    // Keep chatting until the limiter refuses; the notice says when to retry.
    for (let i = 0; i < 12; i++) {
      await page.fill("#input", `Message ${i}`);
      await page.press("#input", "Enter");
      await page.waitForFunction(() => !document.getElementById("send").hidden && !document.querySelector(".streaming"), null, { timeout: 120_000 });
      if (await page.isVisible("#notice")) break;
    }
    const notice = await page.textContent("#notice");
    assert.match(notice, /Rate limited/);
    assert.match(notice, /retry in \d+ s/);
    await context.close();
  });
});
