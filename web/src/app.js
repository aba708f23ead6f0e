// wisp's web chat. Sessions live on the server (/v1/sessions); replies stream over the
// WebSocket chat (/v1/chat/ws). Model output is markdown, rendered by marked and then
// sanitized by DOMPurify before it touches the DOM: a reply can never run script.

import { Marked } from "marked";
import DOMPurify from "dompurify";
import hljs from "highlight.js/lib/common";

const $ = (id) => document.getElementById(id);
const KEY_STORAGE = "wisp.apiKey";
const SETTINGS_STORAGE = "wisp.settings";

const state = {
  sessions: [],
  current: null, // the open session, with its messages
  running: null, // {id, el, text, started, firstTokenAt}
  socket: null,
  requestSeq: 0,
  chatModel: null, // the model new chats start on
};

// ---------- markdown ----------

const escapeHtml = (s) => s.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);

// Raw HTML in a reply is shown as text, never interpreted (DOMPurify is the second line).
const marked = new Marked({ gfm: true, breaks: false, renderer: { html: ({ text }) => escapeHtml(text) } });

/** Markdown to sanitized DOM, with highlighted code blocks that have a copy button. */
function renderMarkdown(el, text) {
  const html = DOMPurify.sanitize(marked.parse(text), { USE_PROFILES: { html: true } });
  el.innerHTML = html;
  for (const block of el.querySelectorAll("pre > code")) {
    hljs.highlightElement(block);
    const copy = document.createElement("button");
    copy.type = "button";
    copy.className = "copy";
    copy.textContent = "Copy";
    copy.addEventListener("click", async () => {
      await navigator.clipboard?.writeText(block.textContent).catch(() => {});
      copy.textContent = "Copied";
      setTimeout(() => (copy.textContent = "Copy"), 1200);
    });
    block.parentElement.append(copy);
  }
}

// ---------- settings and key ----------

function loadSettings() {
  try {
    const saved = JSON.parse(localStorage.getItem(SETTINGS_STORAGE) || "{}");
    if (saved.temperature !== undefined) $("temperature").value = saved.temperature;
    if (saved.maxTokens !== undefined) $("max-tokens").value = saved.maxTokens;
    if (saved.systemPrompt !== undefined) $("system-prompt").value = saved.systemPrompt;
  } catch {
    /* a broken entry is ignored */
  }
}

function saveSettings() {
  localStorage.setItem(
    SETTINGS_STORAGE,
    JSON.stringify({ temperature: $("temperature").value, maxTokens: $("max-tokens").value, systemPrompt: $("system-prompt").value }),
  );
}

const apiKey = () => localStorage.getItem(KEY_STORAGE) || "";

let keyPrompt = null;

/** Asks for a key; resolves true if one was saved. Concurrent callers share one dialog. */
function askForKey(reason) {
  if (keyPrompt) return keyPrompt;
  const dialog = $("key-dialog");
  $("key-reason").textContent = reason;
  $("key-input").value = apiKey();
  dialog.showModal();
  keyPrompt = new Promise((resolve) => {
    dialog.addEventListener(
      "close",
      () => {
        keyPrompt = null;
        if (dialog.returnValue === "save" && $("key-input").value.trim()) {
          localStorage.setItem(KEY_STORAGE, $("key-input").value.trim());
          resolve(true);
        } else resolve(false);
      },
      { once: true },
    );
  });
  return keyPrompt;
}

// ---------- notices ----------

/** Shows a plugin's or the server's decision in words people understand. */
function explain(error, status) {
  const code = error?.code || "";
  const message = error?.message || "Something went wrong";
  if (status === 401 || error?.type === "authentication_error") return { text: `${message}. Enter an API key to continue.`, auth: true };
  if (status === 429 || error?.type === "rate_limit_error") return { text: `Rate limited — ${message}` };
  if (code === "context_length_exceeded") return { text: `Too long for the model: ${message}` };
  return { text: message };
}

function notice(text) {
  const el = $("notice");
  el.textContent = text || "";
  el.hidden = !text;
}

// ---------- HTTP ----------

async function api(method, path, body) {
  for (;;) {
    const headers = { "content-type": "application/json" };
    if (apiKey()) headers.authorization = `Bearer ${apiKey()}`;
    const res = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
    const data = await res.json().catch(() => ({}));
    if (res.ok) return data;
    const { text, auth } = explain(data.error, res.status);
    if (auth && (await askForKey(text))) continue;
    const err = new Error(text);
    err.status = res.status;
    throw err;
  }
}

// ---------- sessions ----------

async function refreshSessions() {
  const list = await api("GET", "/v1/sessions?limit=100");
  state.sessions = list.data;
  renderSessions();
}

function renderSessions() {
  const ul = $("sessions");
  ul.replaceChildren();
  for (const s of state.sessions) {
    const li = document.createElement("li");
    li.dataset.id = s.id;
    li.className = state.current?.id === s.id ? "active" : "";
    const name = s.title || "New chat";
    const title = button(name, "title", () => openSession(s.id).catch((e) => notice(e.message)), name);
    const actions = document.createElement("span");
    actions.className = "actions";
    const rename = button("✎", "rename", async () => {
      const newName = prompt("Rename chat", s.title);
      if (newName === null) return;
      await api("PATCH", `/v1/sessions/${s.id}`, { title: newName.trim() }).catch((e) => notice(e.message));
      await refreshSessions();
    }, "Rename");
    const del = button("×", "delete", async () => {
      if (!confirm(`Delete “${name}”?`)) return;
      await api("DELETE", `/v1/sessions/${s.id}`).catch((e) => notice(e.message));
      if (state.current?.id === s.id) newChat();
      await refreshSessions();
    }, "Delete");
    actions.append(rename, del);
    li.append(title, actions);
    ul.append(li);
  }
}

async function openSession(id) {
  if (state.running) return;
  state.current = await api("GET", `/v1/sessions/${id}`);
  localStorage.setItem("wisp.session", id);
  if (state.current.model && [...$("model").options].some((o) => o.value === state.current.model)) $("model").value = state.current.model;
  $("system-prompt").value = state.current.system_prompt || "";
  $("app").classList.remove("sidebar-open");
  notice("");
  renderMessages();
  renderSessions();
}

function newChat() {
  if (state.running) return;
  state.current = null;
  localStorage.removeItem("wisp.session");
  if (state.chatModel) $("model").value = state.chatModel;
  notice("");
  renderMessages();
  renderSessions();
  $("input").focus();
}

// ---------- messages ----------

function messageEl(role, index) {
  const wrap = document.createElement("div");
  wrap.className = `message ${role}`;
  if (index !== undefined) wrap.dataset.index = index;
  const bubble = document.createElement("div");
  bubble.className = "bubble";
  const meta = document.createElement("div");
  meta.className = "meta";
  wrap.append(bubble, meta);
  return wrap;
}

function renderMessages() {
  const box = $("messages");
  box.replaceChildren();
  const messages = state.current?.messages || [];
  if (!messages.length) {
    const empty = document.createElement("p");
    empty.className = "empty";
    empty.textContent = "Start a conversation.";
    box.append(empty);
    return;
  }
  const lastAssistant = messages.findLastIndex((m) => m.role === "assistant");
  messages.forEach((m, i) => {
    const el = messageEl(m.role, i);
    const bubble = el.querySelector(".bubble");
    const meta = el.querySelector(".meta");
    if (m.role === "user") {
      bubble.textContent = m.content;
      const edit = button("Edit", "edit", () => startEdit(el, m, i));
      meta.append(edit);
    } else if (m.role === "tool") {
      bubble.append(collapsible("tool-result", `Result of ${m.tool_call_id}`, m.content));
    } else {
      renderMarkdown(bubble, m.content);
      for (const call of m.tool_calls || []) bubble.append(toolCall(call));
      if (m.finish_reason === "cancelled") meta.append(text("stopped"));
      if (m.finish_reason === "length") meta.append(text("cut at max tokens"));
      if (i === lastAssistant && i === messages.length - 1) meta.append(button("Regenerate", "regenerate", regenerate));
    }
    box.append(el);
  });
  box.scrollTop = box.scrollHeight;
}

/** A collapsed block: a one-line summary, and the full text when opened. */
function collapsible(cls, summary, body) {
  const details = document.createElement("details");
  details.className = cls;
  const head = document.createElement("summary");
  head.textContent = summary;
  const pre = document.createElement("pre");
  pre.textContent = body;
  details.append(head, pre);
  return details;
}

/** An assistant's tool call: its name, and its arguments (pretty JSON) when opened. */
function toolCall(call) {
  let args = call.function?.arguments ?? "";
  try {
    args = JSON.stringify(JSON.parse(args), null, 2);
  } catch {
    // Shown as it came.
  }
  const details = collapsible("tool-call", `Called ${call.function?.name}`, args);
  details.dataset.callId = call.id;
  return details;
}

function button(label, cls, onClick, tooltip) {
  const b = document.createElement("button");
  b.type = "button";
  b.className = cls;
  b.textContent = label;
  if (tooltip) b.title = tooltip;
  b.addEventListener("click", onClick);
  return b;
}

function text(t) {
  const s = document.createElement("span");
  s.textContent = t;
  return s;
}

function startEdit(el, message, index) {
  if (state.running) return;
  const box = document.createElement("div");
  box.className = "edit-box";
  const area = document.createElement("textarea");
  area.value = message.content;
  area.rows = Math.min(10, message.content.split("\n").length + 1);
  const row = document.createElement("div");
  row.className = "meta";
  row.append(
    button("Cancel", "edit-cancel", () => renderMessages()),
    button("Save & send", "edit-send", async () => {
      const content = area.value.trim();
      if (!content) return;
      // Edit = roll back to this message, then send its new text.
      const count = state.current.messages.length;
      await api("POST", `/v1/sessions/${state.current.id}/rollback`, { messages: count - index }).catch((e) => notice(e.message));
      state.current.messages = state.current.messages.slice(0, index);
      send(content);
    }),
  );
  box.append(area, row);
  el.replaceChildren(box);
  area.focus();
}

async function regenerate() {
  if (state.running || !state.current) return;
  // Regenerate = roll back the reply, then chat with no new message.
  await api("POST", `/v1/sessions/${state.current.id}/rollback`, { messages: 1 }).catch((e) => notice(e.message));
  state.current.messages = state.current.messages.slice(0, -1);
  send(null);
}

// ---------- streaming over the WebSocket ----------

function socket() {
  if (state.socket && state.socket.readyState <= WebSocket.OPEN) return Promise.resolve(state.socket);
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/v1/chat/ws`);
    ws.addEventListener("open", () => resolve(ws), { once: true });
    ws.addEventListener("error", () => reject(new Error("The chat connection failed")), { once: true });
    ws.addEventListener("message", (e) => onFrame(JSON.parse(e.data)));
    ws.addEventListener("close", () => {
      if (state.socket === ws) state.socket = null;
      if (state.running) finishRun(null, "The connection closed");
    });
    state.socket = ws;
  });
}

async function ensureSession() {
  if (state.current) return state.current;
  const systemPrompt = $("system-prompt").value.trim();
  const session = await api("POST", "/v1/sessions", { model: $("model").value || undefined, system_prompt: systemPrompt || null });
  state.current = session;
  localStorage.setItem("wisp.session", session.id);
  return session;
}

/** Sends `content` as the next user message (or, with null, answers the last one again). */
async function send(content) {
  if (state.running) return;
  notice("");
  let session;
  try {
    session = await ensureSession();
  } catch (e) {
    notice(e.message);
    return;
  }
  if (content !== null) session.messages.push({ role: "user", content, index: session.messages.length });
  renderMessages();
  const el = messageEl("assistant");
  el.classList.add("streaming");
  $("messages").append(el);
  const id = `r${++state.requestSeq}`;
  state.running = { id, el, text: "", started: performance.now(), firstTokenAt: null, content };
  setRunning(true);
  const request = {
    session_id: session.id,
    model: $("model").value || undefined,
    messages: content === null ? [] : [{ role: "user", content }],
    temperature: Number($("temperature").value),
    max_tokens: Number($("max-tokens").value) || undefined,
  };
  try {
    const ws = await socket();
    ws.send(JSON.stringify({ type: "chat", id, request, api_key: apiKey() || undefined }));
  } catch (e) {
    finishRun(null, e.message);
  }
}

let paintQueued = false;
function paint() {
  if (paintQueued) return;
  paintQueued = true;
  requestAnimationFrame(() => {
    paintQueued = false;
    const run = state.running;
    if (!run) return;
    renderMarkdown(run.el.querySelector(".bubble"), run.text);
    const box = $("messages");
    box.scrollTop = box.scrollHeight;
  });
}

function onFrame(frame) {
  const run = state.running;
  if (!run || frame.id !== run.id) return;
  if (frame.type === "delta") {
    run.firstTokenAt ??= performance.now();
    run.text += frame.content;
    paint();
  } else if (frame.type === "done") {
    finishRun(frame, null);
  } else if (frame.type === "error") {
    finishRun(null, frame.error);
  }
}

async function finishRun(done, error) {
  const run = state.running;
  if (!run) return;
  state.running = null;
  setRunning(false);
  if (done) {
    const tokens = done.usage?.completion_tokens || 0;
    const seconds = (performance.now() - (run.firstTokenAt ?? run.started)) / 1000;
    $("speed").textContent = tokens > 1 && seconds > 0 ? `${tokens} tokens · ${(Math.max(tokens - 1, 1) / seconds).toFixed(1)} tokens/s` : `${tokens} tokens`;
  }
  if (error) {
    const { text, auth } = typeof error === "string" ? { text: error } : explain(error);
    run.el.remove();
    // The turn was refused, so the server kept nothing of it.
    if (run.content !== null && state.current?.messages.at(-1)?.content === run.content) state.current.messages.pop();
    renderMessages();
    if (auth && (await askForKey(text))) return send(run.content);
    notice(text);
    if (run.content !== null) $("input").value ||= run.content;
  }
  if (state.current) {
    try {
      state.current = await api("GET", `/v1/sessions/${state.current.id}`);
    } catch (e) {
      notice(e.message);
    }
    renderMessages();
    refreshSessions().catch(() => {});
  }
}

function setRunning(running) {
  $("send").hidden = running;
  $("stop").hidden = !running;
}

function stop() {
  const run = state.running;
  if (run && state.socket) state.socket.send(JSON.stringify({ type: "cancel", id: run.id }));
}

// ---------- start ----------

// New chats start on the first model with a chat template of its own (an instruct model),
// else on the server's default (listed first).
async function loadModels() {
  const models = await api("GET", "/v1/models");
  const select = $("model");
  select.replaceChildren(...models.data.map((m) => new Option(m.id, m.id)));
  state.chatModel = (models.data.find((m) => m.chat_template) || models.data[0] || {}).id;
  if (state.chatModel) select.value = state.chatModel;
}

function bind() {
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    const content = $("input").value.trim();
    if (!content || state.running) return;
    $("input").value = "";
    send(content);
  });
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", stop);
  $("new-chat").addEventListener("click", newChat);
  $("key-button").addEventListener("click", () => askForKey("API key for this server (kept in this browser)."));
  $("toggle-sidebar").addEventListener("click", () => $("app").classList.toggle("sidebar-open"));
  for (const id of ["temperature", "max-tokens", "system-prompt"]) $(id).addEventListener("change", saveSettings);
  $("save-system").addEventListener("click", async () => {
    if (!state.current) return;
    const value = $("system-prompt").value.trim();
    try {
      state.current = await api("PATCH", `/v1/sessions/${state.current.id}`, { system_prompt: value || null });
      renderMessages();
    } catch (e) {
      notice(e.message);
    }
  });
}

async function main() {
  loadSettings();
  bind();
  renderMessages();
  try {
    await loadModels();
    await refreshSessions();
    const last = localStorage.getItem("wisp.session");
    if (last && state.sessions.some((s) => s.id === last)) await openSession(last);
  } catch (e) {
    notice(e.message);
  }
  $("input").focus();
}

main();
