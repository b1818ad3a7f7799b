// edge-llm chat page. A plain client of the server's OpenAI API: no build step, no
// dependencies, nothing fetched from anywhere but this origin.
// Model text is only ever put into the page as text (textContent / text nodes): the small
// markdown subset below builds elements itself and never parses model text as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const STORE = { conversations: "edge-llm.conversations", current: "edge-llm.current",
                settings: "edge-llm.settings", key: "edge-llm.apiKey" };

const state = {
  conversations: load(STORE.conversations, []),
  currentId: load(STORE.current, null),
  settings: Object.assign({ system: "", temperature: "", maxTokens: "", mode: "chat" }, load(STORE.settings, {})),
  maxContext: null,
  controller: null,        // AbortController of the running request
};

function load(key, fallback) {
  try { const v = localStorage.getItem(key); return v === null ? fallback : JSON.parse(v); }
  catch (e) { return fallback; }
}
function save(key, value) {
  try { localStorage.setItem(key, JSON.stringify(value)); } catch (e) { /* private mode, quota: keep going */ }
}
function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

// --- safe rendering: a markdown subset built from text nodes ---------------------------

function renderMarkdown(container, text) {
  container.replaceChildren();
  const parts = text.split(/```/);          // even: prose, odd: fenced code
  parts.forEach((part, i) => {
    if (i % 2 === 1) {
      const nl = part.indexOf("\n");
      const lang = nl > 0 ? part.slice(0, nl).trim() : "";
      const body = nl >= 0 && /^[\w+#.-]*$/.test(lang) ? part.slice(nl + 1) : part;
      const pre = el("pre");
      const code = el("code", lang ? "lang-" + lang.replace(/[^\w-]/g, "") : "", body.replace(/\n$/, ""));
      pre.append(code, copyButton(() => code.textContent));
      container.append(pre);
      return;
    }
    for (const para of part.split(/\n{2,}/)) {
      if (!para.trim()) continue;
      const p = el("p");
      inline(p, para.replace(/^\n+|\n+$/g, ""));
      container.append(p);
    }
  });
}

function inline(parent, text) {
  // `code` and **bold**, everything else as text
  const re = /`([^`\n]+)`|\*\*([^*\n]+)\*\*/g;
  let last = 0, m;
  while ((m = re.exec(text)) !== null) {
    if (m.index > last) parent.append(document.createTextNode(text.slice(last, m.index)));
    parent.append(m[1] !== undefined ? el("code", "", m[1]) : el("strong", "", m[2]));
    last = re.lastIndex;
  }
  if (last < text.length) parent.append(document.createTextNode(text.slice(last)));
}

function copyButton(getText) {
  const b = el("button", "copy", "Copy");
  b.type = "button";
  b.title = "Copy to the clipboard";
  b.addEventListener("click", async () => {
    const ok = await copyText(getText());
    b.textContent = ok ? "Copied" : "Copy failed";
    setTimeout(() => { b.textContent = "Copy"; }, 1200);
  });
  return b;
}

async function copyText(text) {
  if (navigator.clipboard && window.isSecureContext) {
    try { await navigator.clipboard.writeText(text); return true; } catch (e) { /* fall through */ }
  }
  const ta = el("textarea");          // plain http on a LAN address has no clipboard API
  ta.value = text;
  ta.setAttribute("readonly", "");
  ta.style.position = "fixed"; ta.style.opacity = "0";
  document.body.append(ta);
  ta.select();
  let ok = false;
  try { ok = document.execCommand("copy"); } catch (e) { ok = false; }
  ta.remove();
  return ok;
}

// --- conversations in localStorage -------------------------------------------------------

function current() {
  let c = state.conversations.find((x) => x.id === state.currentId);
  if (!c) c = newConversation();
  return c;
}
function newConversation() {
  const c = { id: Date.now().toString(36) + Math.random().toString(36).slice(2, 6), title: "New chat",
              messages: [], updated: Date.now() };
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
    const open = el("button", "open", c.title || "New chat");
    open.type = "button";
    open.addEventListener("click", () => { if (!state.controller) { state.currentId = c.id; persist(); renderAll(); } });
    const del = el("button", "delete", "✕");
    del.type = "button";
    del.title = "Delete this conversation";
    del.addEventListener("click", () => {
      if (state.controller) return;
      state.conversations = state.conversations.filter((x) => x.id !== c.id);
      if (state.currentId === c.id) state.currentId = state.conversations[0] ? state.conversations[0].id : null;
      persist(); renderAll();
    });
    li.append(open, del);
    ul.append(li);
  }
}

function messageView(m) {
  const div = el("div", "msg " + m.role);
  div.append(el("div", "role", m.role === "assistant" ? (state.model || "assistant") : m.role));
  const content = el("div", "content");
  renderMarkdown(content, m.content);
  div.append(content);
  if (m.interrupted) div.append(el("div", "note", "(stopped: the reply was interrupted)"));
  div.append(copyButton(() => m.content));
  return div;
}

function renderMessages() {
  const box = $("messages");
  box.replaceChildren(...current().messages.map(messageView));
  scrollDown();
}
function renderAll() { renderSidebar(); renderMessages(); }
function scrollDown() { const v = $("chat-view"); v.scrollTop = v.scrollHeight; }

// --- talking to the server ----------------------------------------------------------------

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function samplingFields() {
  const body = {};
  const t = parseFloat($("temperature").value);
  if (!Number.isNaN(t)) body.temperature = t;
  const n = parseInt($("max-tokens").value, 10);
  if (n > 0) body.max_tokens = n;
  return body;
}

function notice(text, isError) {
  const n = $("notice");
  n.textContent = text || "";
  n.className = isError ? "error" : "";
  n.hidden = !text;
}

async function errorMessage(res) {
  let msg = `HTTP ${res.status}`;
  try { const j = await res.json(); if (j.error && j.error.message) msg = j.error.message; } catch (e) { /* not JSON */ }
  if (res.status === 401) {
    $("settings").hidden = false;
    $("api-key").focus();
    msg += " Enter the server's API key under ⚙ (settings).";
  }
  return msg;
}

// POST `path` with stream: true; call onText(piece) per piece; return {usage, finish, firstAt, lastAt}.
async function streamRequest(path, body, onText, signal) {
  const res = await fetch(path, { method: "POST", headers: headers(), signal,
    body: JSON.stringify(Object.assign(body, samplingFields(), { stream: true, stream_options: { include_usage: true } })) });
  if (!res.ok) throw new Error(await errorMessage(res));
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  const out = { usage: null, finish: null, firstAt: null, lastAt: null };
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const event = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return out;
        const j = JSON.parse(data);
        if (j.error) throw new Error(j.error.message);
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

function showStats(r, stopped, pieces) {
  if (stopped || !r) { $("stats").textContent = `stopped after ${pieces} piece${pieces === 1 ? "" : "s"} of text`; return; }
  const u = r.usage;
  if (!u) { $("stats").textContent = ""; return; }
  const secs = r.firstAt !== null && r.lastAt > r.firstAt ? (r.lastAt - r.firstAt) / 1000 : 0;
  const tps = secs > 0 && u.completion_tokens > 1 ? ((u.completion_tokens - 1) / secs).toFixed(1) : "–";
  const used = u.prompt_tokens + u.completion_tokens;
  const ctx = state.maxContext ? `${used} / ${state.maxContext} (${Math.round(100 * used / state.maxContext)} %)` : `${used}`;
  const cached = u.prompt_tokens_details ? u.prompt_tokens_details.cached_tokens : 0;
  $("stats").textContent = `${u.completion_tokens} tokens · ${tps} tokens/s · context ${ctx} · prompt ${u.prompt_tokens}` +
    ` (${cached} cached)` + (r.finish === "length" ? " · cut at the token limit" : "");
}

function busy(on) {
  $("send").hidden = on;
  $("stop").hidden = !on;
  $("prompt").disabled = on;
}

async function sendChat() {
  const text = $("prompt").value;
  if (!text.trim() || state.controller) return;
  const conv = current();
  conv.messages.push({ role: "user", content: text });
  if (conv.messages.length === 1) conv.title = text.slice(0, 60);
  const reply = { role: "assistant", content: "" };
  conv.messages.push(reply);
  conv.updated = Date.now();
  $("prompt").value = "";
  renderAll();
  const view = $("messages").lastElementChild;
  const content = view.querySelector(".content");
  const system = $("system").value.trim();
  const history = conv.messages.slice(0, -1).map((m) => ({ role: m.role, content: m.content }));
  const messages = (system ? [{ role: "system", content: system }] : []).concat(history);
  let pieces = 0, scheduled = false, result = null;
  const paint = () => { scheduled = false; renderMarkdown(content, reply.content); scrollDown(); };
  await run(async (signal) => {
    result = await streamRequest("/v1/chat/completions", { messages }, (piece) => {
      reply.content += piece;
      pieces += 1;
      if (!scheduled) { scheduled = true; requestAnimationFrame(paint); }
    }, signal);
  }, (stopped, error) => {
    if (stopped) reply.interrupted = true;
    if (error && !reply.content) conv.messages.splice(-2, 2);      // nothing came: take the question back
    if (error && !reply.content) $("prompt").value = text;
    persist();
    renderAll();
    showStats(result, stopped, pieces);
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
  }, (stopped) => showStats(result, stopped, pieces));
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
    else { error = e; notice(e.message || String(e), true); }
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

async function pollHealth() {
  try {
    const res = await fetch("/health");
    const j = await res.json();
    state.model = j.model;
    $("model").textContent = j.model ? "· " + j.model : "";
    if (j.max_context) state.maxContext = j.max_context;
    if (j.status === "loading") { notice("The model is loading…"); setTimeout(pollHealth, 2000); return; }
    if (j.status !== "ok") { notice(j.error ? j.error.message : "the server is not ready", true); return; }
    notice("");
  } catch (e) {
    notice("Cannot reach the server: " + e.message, true);
    setTimeout(pollHealth, 5000);
  }
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
  pollHealth();
  $("prompt").focus();
}

init();
