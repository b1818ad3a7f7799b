// edge-llm chat page. A plain client of the server's OpenAI API: no build step, nothing
// fetched from anywhere but this origin. Replies are rendered by render.js (markdown,
// sanitized); everything else the page shows is text.
"use strict";

const $ = (id) => document.getElementById(id);
const el = Render.el;
const STORE = { conversations: "edge-llm.conversations", current: "edge-llm.current",
                settings: "edge-llm.settings", key: "edge-llm.apiKey" };
const NEW_TITLE = "New chat";

const state = {
  conversations: load(STORE.conversations, []),
  currentId: load(STORE.current, null),
  settings: Object.assign({ system: "", temperature: "", maxTokens: "", mode: "chat" }, load(STORE.settings, {})),
  maxContext: null,
  defaultMaxTokens: null,  // the page's reply budget (edge.launch), from /static/defaults.json
  controller: null,        // AbortController of the running request
  streaming: null,         // the reply being written
  confirmDelete: null,     // id of the conversation whose ✕ asks "delete?"
};

function load(key, fallback) {
  try { const v = localStorage.getItem(key); return v === null ? fallback : JSON.parse(v); }
  catch (e) { return fallback; }
}
function save(key, value) {
  try { localStorage.setItem(key, JSON.stringify(value)); } catch (e) { /* private mode, quota: keep going */ }
}

// --- conversations in localStorage -------------------------------------------------------

function current() {
  let c = state.conversations.find((x) => x.id === state.currentId);
  if (!c) c = newConversation();
  return c;
}
function newConversation(messages = [], title = NEW_TITLE) {
  const c = { id: Date.now().toString(36) + Math.random().toString(36).slice(2, 6), title,
              messages, updated: Date.now() };
  state.conversations.unshift(c);
  state.currentId = c.id;
  persist();
  return c;
}
function persist() {
  save(STORE.conversations, state.conversations);
  save(STORE.current, state.currentId);
}

function renderSidebar() {
  const ul = $("conversations");
  ul.replaceChildren();
  for (const c of state.conversations) {
    const li = el("li", c.id === state.currentId ? "current" : "");
    if (state.confirmDelete === c.id) {
      li.classList.add("confirm");
      const yes = button("Delete", "confirm-delete", `Delete “${c.title}” for good`, () => deleteConversation(c.id));
      const no = button("Keep", "keep", "Keep this conversation", () => { state.confirmDelete = null; renderSidebar(); });
      li.append(el("span", "ask", `Delete “${c.title || NEW_TITLE}”?`), yes, no);
      ul.append(li);
      yes.focus();
      continue;
    }
    const open = button(c.title || NEW_TITLE, "open", c.title || NEW_TITLE, () => {
      if (!state.controller) { state.currentId = c.id; state.confirmDelete = null; persist(); renderAll(); }
    });
    const del = button("✕", "delete", "Delete this conversation", () => {
      if (!state.controller) { state.confirmDelete = c.id; renderSidebar(); }
    });
    li.append(open, del);
    ul.append(li);
  }
}

function deleteConversation(id) {
  if (state.controller) return;
  state.confirmDelete = null;
  state.conversations = state.conversations.filter((x) => x.id !== id);
  if (state.currentId === id) state.currentId = state.conversations[0] ? state.conversations[0].id : null;
  persist(); renderAll();
}

function button(text, cls, title, onClick) {
  const b = el("button", cls, text);
  b.type = "button";
  b.title = title;
  b.addEventListener("click", onClick);
  return b;
}

function messageView(m, i, messages) {
  const div = el("div", "msg " + m.role);
  div.append(el("div", "role", m.role === "assistant" ? (state.model || "assistant") : m.role));
  const content = el("div", "content");
  if (m.role === "assistant" && !m.content) content.append(waiting());
  else if (m.role === "assistant") Render.markdown(content, m.content);
  else content.append(el("p", "plain", m.content));
  div.append(content);
  if (m.interrupted) div.append(el("div", "note", "(stopped: the reply was interrupted)"));
  if (m.cut) div.append(el("div", "note", m.cut));
  const actions = el("div", "actions");
  actions.append(Render.copyButton(() => m.content));
  const last = i === messages.length - 1;
  if (m.role === "user") actions.append(button("Edit", "edit", "Edit this message and send it again: the conversation forks here",
                                               () => startEdit(div, i)));
  if (last && m !== state.streaming && !state.controller) {
    actions.append(button("↻ Regenerate", "regenerate", m.role === "assistant" ? "Write this reply again" : "Ask for a reply again",
                          regenerate));
  }
  div.append(actions);
  return div;
}

function waiting() {
  const w = el("span", "waiting");
  w.setAttribute("role", "status");
  w.setAttribute("aria-label", "waiting for the reply");
  w.append(el("i"), el("i"), el("i"));
  return w;
}

function startEdit(div, i) {
  if (state.controller) return;
  const conv = current();
  const content = div.querySelector(".content");
  const box = el("textarea", "edit-box");
  box.value = conv.messages[i].content;
  box.rows = Math.min(10, box.value.split("\n").length + 1);
  const send = button("Send as a new branch", "edit-send", "Fork the conversation here with the edited message", () => {
    if (box.value.trim()) editAndResend(i, box.value);
  });
  const cancel = button("Cancel", "edit-cancel", "Keep the message as it was", renderMessages);
  box.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send.click(); }
    if (e.key === "Escape") { e.stopPropagation(); renderMessages(); }
  });
  content.replaceChildren(box, el("div", "edit-buttons"));
  content.lastChild.append(send, cancel);
  div.querySelector(".actions").hidden = true;
  box.focus();
}

// The conversation forks: a new one with the messages before `i` and the edited message; the
// original stays as it was in the list.
function editAndResend(i, text) {
  const conv = current();
  const kept = conv.messages.slice(0, i).map((m) => Object.assign({}, m));
  const fork = newConversation(kept.concat([{ role: "user", content: text }]),
                               i === 0 ? title(text) : "⑂ " + conv.title);
  renderAll();
  ask(fork, { onNothing: () => {} });
}

function renderMessages() {
  const box = $("messages");
  const messages = current().messages;
  box.replaceChildren(...messages.map(messageView));
  scrollDown();
}
function renderAll() { renderSidebar(); renderMessages(); }
function scrollDown() { const v = $("chat-view"); v.scrollTop = v.scrollHeight; }
function title(text) { return text.trim().split("\n")[0].slice(0, 60) || NEW_TITLE; }

// --- talking to the server ----------------------------------------------------------------

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function samplingFields() {
  const body = { stop_loops: true };     // a reply stuck in a loop ends (the server's loop guard)
  const t = parseFloat($("temperature").value);
  if (!Number.isNaN(t)) body.temperature = t;
  const n = parseInt($("max-tokens").value, 10);
  if (n > 0) body.max_tokens = n;
  else if (state.defaultMaxTokens) body.max_tokens = state.defaultMaxTokens;
  return body;
}

function notice(text, isError) {
  const n = $("notice");
  n.textContent = text || "";
  n.className = isError ? "error" : "";
  n.hidden = !text;
}

class PageError extends Error {}

// What went wrong, and what to do about it, from the API's error (status, code, message).
function explain(status, error, retryAfter) {
  const code = error && error.code;
  const said = error && error.message ? error.message : "";
  const wait = retryAfter ? ` in ${retryAfter} s` : " in a moment";
  if (status === 401) {
    $("settings").hidden = false;
    $("api-key").focus();
    return `The server needs an API key (401: ${said || "unauthorized"}). Enter the server's API key under ⚙ (settings), then send again.`;
  }
  if (code === "context_length_exceeded") {
    return "The conversation no longer fits in the model's context" + (state.maxContext ? ` of ${state.maxContext} tokens` : "") +
      ". Start a new chat, or edit an earlier message to fork a shorter conversation. (" + said + ")";
  }
  if (code === "queue_full" || status === 429) return `The server is busy with other requests. Send again${wait}. (${said})`;
  if (code === "model_loading") return `The model is still loading. Send again${wait}.`;
  if (code === "server_shutdown") return `The server is shutting down or restarting. Send again${wait}.`;
  if (status === 503) return `The server cannot answer now (503: ${said}). Send again${wait}.`;
  return (said || "The request failed") + (status ? ` (HTTP ${status})` : "");
}

async function errorOf(res) {
  let error = null;
  try { const j = await res.json(); error = j.error || null; } catch (e) { /* not JSON */ }
  return new PageError(explain(res.status, error, res.headers.get("Retry-After")));
}

function unreachable(during) {
  pollHealth();
  return new PageError(during
    ? "The connection to the server was lost during the reply (what came is kept). Check that edge-llm is running, then regenerate."
    : `Cannot reach the server at ${location.host}: it is not running or the network is down. Start it (edge-llm serve, or systemctl start edge-llm), then send again.`);
}

// POST `path` with stream: true; call onText(piece) per piece; return {usage, finish, firstAt, lastAt}.
async function streamRequest(path, body, onText, signal) {
  let res;
  try {
    res = await fetch(path, { method: "POST", headers: headers(), signal,
      body: JSON.stringify(Object.assign(body, samplingFields(), { stream: true, stream_options: { include_usage: true } })) });
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw unreachable(false);
  }
  if (!res.ok) throw await errorOf(res);
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  const out = { usage: null, finish: null, firstAt: null, lastAt: null };
  let buf = "";
  for (;;) {
    let chunk;
    try { chunk = await reader.read(); } catch (e) {
      if (e.name === "AbortError") throw e;
      throw unreachable(true);
    }
    if (chunk.done) break;
    buf += decoder.decode(chunk.value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const event = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return out;
        const j = JSON.parse(data);
        if (j.error) throw new PageError(explain(0, j.error, null));
        if (j.usage) out.usage = j.usage;
        const choice = j.choices && j.choices[0];
        if (!choice) continue;
        const piece = choice.delta ? choice.delta.content : choice.text;
        if (piece) {
          const now = performance.now();
          if (out.firstAt === null) out.firstAt = now;
          out.lastAt = now;
          onText(piece);
        }
        if (choice.finish_reason) out.finish = choice.finish_reason;
      }
    }
  }
  return out;
}

function showStats(r, stopped, pieces, error) {
  const stats = $("stats");
  if (error) { stats.textContent = pieces ? `failed after ${pieces} piece${pieces === 1 ? "" : "s"} of text` : ""; return; }
  if (stopped || !r) { stats.textContent = `stopped after ${pieces} piece${pieces === 1 ? "" : "s"} of text`; return; }
  const u = r.usage;
  if (!u) { stats.textContent = ""; return; }
  const secs = r.firstAt !== null && r.lastAt > r.firstAt ? (r.lastAt - r.firstAt) / 1000 : 0;
  const tps = secs > 0 && u.completion_tokens > 1 ? ((u.completion_tokens - 1) / secs).toFixed(1) : "–";
  const used = u.prompt_tokens + u.completion_tokens;
  const ctx = state.maxContext ? `${used} / ${state.maxContext} (${Math.round(100 * used / state.maxContext)} %)` : `${used}`;
  const cached = u.prompt_tokens_details ? u.prompt_tokens_details.cached_tokens : 0;
  stats.textContent = `${u.completion_tokens} tokens · ${tps} tokens/s · context ${ctx} · prompt ${u.prompt_tokens}` +
    ` (${cached} cached)` + (r.finish === "length" ? " · cut at the token limit (⚙ Max tokens)" : "");
}

function busy(on) {
  $("send").hidden = on;
  $("stop").hidden = !on;
  $("prompt").disabled = on;
}

function sendChat() {
  const text = $("prompt").value;
  if (!text.trim() || state.controller) return;
  const conv = current();
  conv.messages.push({ role: "user", content: text });
  $("prompt").value = "";
  ask(conv, { onNothing: () => {           // nothing came back: take the question back
    conv.messages.pop();
    $("prompt").value = text;
  } });
}

function regenerate() {
  const conv = current();
  if (state.controller || !conv.messages.length) return;
  const last = conv.messages[conv.messages.length - 1];
  if (last.role === "assistant") conv.messages.pop();
  ask(conv, { onNothing: () => { if (last.role === "assistant") conv.messages.push(last); } });
}

// Stream a reply to `conv`'s messages (its last is the user's). `onNothing`: undo, when the
// request failed before any text came.
async function ask(conv, { onNothing }) {
  const reply = { role: "assistant", content: "" };
  conv.messages.push(reply);
  conv.updated = Date.now();
  state.streaming = reply;
  state.confirmDelete = null;
  renderAll();
  const view = $("messages").lastElementChild;
  const content = view.querySelector(".content");
  const system = $("system").value.trim();
  const history = conv.messages.slice(0, -1).map((m) => ({ role: m.role, content: m.content }));
  const messages = (system ? [{ role: "system", content: system }] : []).concat(history);
  let pieces = 0, scheduled = false, result = null;
  const paint = () => { scheduled = false; Render.markdown(content, reply.content); scrollDown(); };
  await run(async (signal) => {
    result = await streamRequest("/v1/chat/completions", { messages }, (piece) => {
      reply.content += piece;
      pieces += 1;
      if (!scheduled) { scheduled = true; requestAnimationFrame(paint); }
    }, signal);
  }, (stopped, error) => {
    state.streaming = null;
    if (stopped) reply.interrupted = true;
    if (result && result.finish === "length") reply.cut = "(cut at the token limit: raise Max tokens under ⚙ for longer replies)";
    if (!reply.content && !stopped) {
      conv.messages.pop();
      onNothing();
    } else if (conv.title === NEW_TITLE) {
      const first = conv.messages.find((m) => m.role === "user");
      if (first) conv.title = title(first.content);
    }
    persist();
    renderAll();
    showStats(result, stopped, pieces, error);
  });
}

async function sendCompletion() {
  const box = $("completion-text");
  if (!box.value || state.controller) return;
  let pieces = 0, result = null;
  await run(async (signal) => {
    result = await streamRequest("/v1/completions", { prompt: box.value }, (piece) => {
      box.value += piece;           // a textarea's value is text, never markup
      pieces += 1;
      box.scrollTop = box.scrollHeight;
    }, signal);
  }, (stopped, error) => showStats(result, stopped, pieces, error));
}

async function run(work, done) {
  state.controller = new AbortController();
  busy(true);
  notice("");
  let stopped = false, error = null;
  try {
    await work(state.controller.signal);
  } catch (e) {
    if (e.name === "AbortError") stopped = true;
    else {
      error = e;
      notice(e instanceof PageError ? e.message : `Something went wrong in the page: ${e.message || e}. Reload it and send again.`, true);
    }
  } finally {
    state.controller = null;
    busy(false);
    done(stopped, error);
    $("prompt").focus();
  }
}

function stop() {
  if (state.controller) state.controller.abort();     // the server cancels the job when we go
}

let healthTimer = null;
async function pollHealth() {
  clearTimeout(healthTimer);
  try {
    const res = await fetch("/health");
    const j = await res.json();
    state.model = j.model;
    $("model").textContent = j.model ? "· " + j.model : "";
    if (j.max_context) state.maxContext = j.max_context;
    if (j.status === "loading") { notice("The model is loading…"); healthTimer = setTimeout(pollHealth, 2000); return; }
    if (j.status !== "ok") { notice(j.error ? j.error.message : "the server is not ready", true); return; }
    if ($("notice").dataset.down) { delete $("notice").dataset.down; notice(""); }
    else if (!state.controller && !$("notice").classList.contains("error")) notice("");
  } catch (e) {
    notice(`Cannot reach the server at ${location.host}: it is not running or the network is down. ` +
           "Start it (edge-llm serve, or systemctl start edge-llm); this page retries every 5 s.", true);
    $("notice").dataset.down = "1";
    healthTimer = setTimeout(pollHealth, 5000);
  }
}

async function loadDefaults() {
  try {
    const j = await (await fetch("/static/defaults.json")).json();
    if (j.max_tokens > 0) {
      state.defaultMaxTokens = j.max_tokens;
      $("max-tokens").placeholder = `${j.max_tokens} (the page's default)`;
    }
  } catch (e) { /* the server's own default applies */ }
}

// --- wiring ---------------------------------------------------------------------------------

function setMode(mode) {
  state.settings.mode = mode;
  save(STORE.settings, state.settings);
  $("mode").value = mode;
  $("chat-view").hidden = mode !== "chat";
  $("completion-view").hidden = mode === "chat";
  $("prompt").hidden = mode !== "chat";
  $("side").dataset.mode = mode;
}

function init() {
  $("system").value = state.settings.system;
  $("temperature").value = state.settings.temperature;
  $("max-tokens").value = state.settings.maxTokens;
  $("api-key").value = load(STORE.key, "");
  for (const [id, field] of [["system", "system"], ["temperature", "temperature"], ["max-tokens", "maxTokens"]]) {
    $(id).addEventListener("input", () => { state.settings[field] = $(id).value; save(STORE.settings, state.settings); });
  }
  $("api-key").addEventListener("input", () => save(STORE.key, $("api-key").value));
  $("toggle-settings").addEventListener("click", () => { $("settings").hidden = !$("settings").hidden; });
  $("toggle-side").addEventListener("click", () => { $("side").hidden = !$("side").hidden; });
  $("new-chat").addEventListener("click", () => { if (!state.controller) { newConversation(); renderAll(); $("prompt").focus(); } });
  $("mode").addEventListener("change", () => setMode($("mode").value));
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    if (state.settings.mode === "chat") sendChat(); else sendCompletion();
  });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); sendChat(); }
  });
  $("stop").addEventListener("click", stop);
  document.addEventListener("keydown", (e) => { if (e.key === "Escape") stop(); });
  if (window.matchMedia("(min-width: 641px)").matches) $("side").hidden = false;
  setMode(state.settings.mode === "completion" ? "completion" : "chat");
  current();
  renderAll();
  loadDefaults();
  pollHealth();
  $("prompt").focus();
}

init();
