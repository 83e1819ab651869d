// The chat playground: a conversation streamed token by token over
// /v1/chat/completions (or /v1/completions when the model has no chat
// template), a stop button that aborts the request (the server drops it from
// the batch within a step), sampling controls, and per answer its TTFT,
// tokens/s, finish reason and token counts. Model text is escaped before the
// small Markdown renderer below adds its own tags: it never becomes markup.
"use strict";

const state = { model: null, messages: [], controller: null };
const $ = (id) => document.getElementById(id);

// --- Markdown: fenced code, inline code, bold, italics, headings, lists ---

function renderInline(escaped) {
  return escaped.split(/(`[^`]*`)/).map((piece) => {
    if (piece.length > 1 && piece.startsWith("`") && piece.endsWith("`")) return "<code>" + piece.slice(1, -1) + "</code>";
    return piece
      .replace(/\*\*([^*]+)\*\*/g, "<strong>$1</strong>")
      .replace(/(^|[^*\w])\*([^*\s][^*]*?)\*(?!\w)/g, "$1<em>$2</em>");
  }).join("");
}

function renderBlocks(text) {
  const html = [];
  let list = null;  // "ul" or "ol" while inside a list
  let paragraph = [];
  const flushParagraph = () => {
    if (paragraph.length) html.push("<p>" + paragraph.map(renderInline).join("<br>") + "</p>");
    paragraph = [];
  };
  const closeList = () => {
    if (list) html.push("</" + list + ">");
    list = null;
  };
  for (const raw of escapeHtml(text).split("\n")) {
    const line = raw.trimEnd();
    const heading = line.match(/^(#{1,6})\s+(.*)$/);
    const bullet = line.match(/^\s*[-*+]\s+(.*)$/);
    const numbered = line.match(/^\s*\d+[.)]\s+(.*)$/);
    if (heading) {
      flushParagraph(); closeList();
      const level = Math.min(heading[1].length + 2, 6);  // the page has its own h1/h2
      html.push("<h" + level + ">" + renderInline(heading[2]) + "</h" + level + ">");
    } else if (bullet || numbered) {
      flushParagraph();
      const kind = bullet ? "ul" : "ol";
      if (list !== kind) { closeList(); html.push("<" + kind + ">"); list = kind; }
      html.push("<li>" + renderInline((bullet || numbered)[1]) + "</li>");
    } else if (!line.trim()) {
      flushParagraph(); closeList();
    } else {
      closeList();
      paragraph.push(line);
    }
  }
  flushParagraph(); closeList();
  return html.join("");
}

function renderMarkdown(text) {
  // Odd pieces are inside ``` fences (an unclosed fence, while streaming, runs to the end).
  return text.split("```").map((piece, index) => {
    if (index % 2 === 0) return renderBlocks(piece);
    const newline = piece.indexOf("\n");
    const lang = newline >= 0 ? piece.slice(0, newline).trim() : "";
    const code = newline >= 0 ? piece.slice(newline + 1) : piece;
    const label = /^[\w+#.-]{1,20}$/.test(lang) ? ' data-lang="' + lang + '"' : "";
    return "<pre><code" + label + ">" + escapeHtml(code) + "</code></pre>";
  }).join("");
}

// --- the conversation ---

function addMessage(role, text) {
  const item = document.createElement("article");
  item.className = "message " + role;
  item.setAttribute("aria-label", role === "user" ? "You" : "Model");
  if (role === "assistant") {
    // A thinking model's reasoning, folded above its answer (shown once some arrives).
    const reasoning = document.createElement("details");
    reasoning.className = "reasoning";
    reasoning.hidden = true;
    const summary = document.createElement("summary");
    summary.textContent = "Reasoning";
    const thought = document.createElement("div");
    thought.className = "reasoning-text";
    reasoning.append(summary, thought);
    item.appendChild(reasoning);
  }
  const body = document.createElement("div");
  body.className = "content";
  if (role === "user") body.textContent = text;
  else body.innerHTML = renderMarkdown(text);
  item.appendChild(body);
  $("conversation").appendChild(item);
  item.scrollIntoView({ block: "end" });
  return item;
}

function numberOrNull(id) {
  const value = $(id).value.trim();
  return value === "" ? null : Number(value);
}

function requestBody(userText) {
  const body = { model: state.model.id, stream: true, stream_options: { include_usage: true } };
  for (const [id, field] of [["temperature", "temperature"], ["top-p", "top_p"], ["top-k", "top_k"], ["max-tokens", "max_tokens"], ["seed", "seed"]]) {
    const value = numberOrNull(id);
    if (value !== null) body[field] = value;
  }
  const stops = $("stop").value.split("\n").filter((s) => s.length);
  if (stops.length) body.stop = stops;
  const schema = $("schema").value.trim();
  if (schema) body.response_format = { type: "json_schema", json_schema: { name: "answer", schema: JSON.parse(schema) } };
  if (state.model.chat_template) body.messages = state.messages.slice();
  else body.prompt = userText;
  return body;
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop-button").disabled = !busy;
}

async function send() {
  const userText = $("message").value;
  if (!userText.trim() || state.controller) return;
  $("error").textContent = "";
  let body;
  state.messages.push({ role: "user", content: userText });
  try {
    body = requestBody(userText);
  } catch (error) {
    state.messages.pop();
    $("error").textContent = "The JSON schema is not valid JSON: " + error.message;
    return;
  }
  $("message").value = "";
  addMessage("user", userText);
  const answer = addMessage("assistant", "");
  const content = answer.querySelector(".content");
  const reasoning = answer.querySelector(".reasoning");
  const thought = answer.querySelector(".reasoning-text");
  const meta = document.createElement("p");
  meta.className = "meta";
  answer.appendChild(meta);
  const path = state.model.chat_template ? "/v1/chat/completions" : "/v1/completions";
  const started = performance.now();
  let firstToken = null, text = "", finish = null, usage = null;
  state.controller = new AbortController();
  setBusy(true);
  try {
    const response = await fetch(path, { method: "POST", headers: authHeaders({ "Content-Type": "application/json" }), body: JSON.stringify(body), signal: state.controller.signal });
    if (response.status === 401) {
      askForKey(await errorMessage(response));
      throw new Error("this server needs an API key");
    }
    if (!response.ok) throw new Error(await errorMessage(response));
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      const events = buffer.split(/\r?\n\r?\n/);
      buffer = events.pop();
      for (const event of events) {
        const data = event.split(/\r?\n/).filter((line) => line.startsWith("data:")).map((line) => line.slice(5).trim()).join("\n");
        if (!data || data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        if (chunk.usage) usage = chunk.usage;
        for (const choice of chunk.choices || []) {
          const thinking = choice.delta ? (choice.delta.reasoning_content || choice.delta.reasoning || "") : "";
          if (thinking) {
            if (firstToken === null) firstToken = performance.now();
            reasoning.hidden = false;
            thought.textContent += thinking;  // text, never markup
          }
          const delta = choice.delta ? (choice.delta.content || "") : (choice.text || "");
          if (delta) {
            if (firstToken === null) firstToken = performance.now();
            text += delta;
            content.innerHTML = renderMarkdown(text);
          }
          if (choice.finish_reason) finish = choice.finish_reason;
        }
      }
    }
  } catch (error) {
    if (error.name === "AbortError") finish = "stopped";
    else $("error").textContent = error.message;
  } finally {
    state.controller = null;
    setBusy(false);
  }
  state.messages.push({ role: "assistant", content: text });
  const ended = performance.now();
  const parts = [];
  if (firstToken !== null) parts.push("TTFT " + Math.round(firstToken - started) + " ms");
  if (usage && firstToken !== null && usage.completion_tokens > 1 && ended > firstToken) {
    parts.push(((usage.completion_tokens - 1) / ((ended - firstToken) / 1000)).toFixed(1) + " tokens/s");
  }
  parts.push("finish: " + (finish || "none"));
  if (usage) parts.push(usage.prompt_tokens + " prompt + " + usage.completion_tokens + " completion tokens");
  meta.textContent = parts.join(" · ");
  $("message").focus();
}

function stop() {
  if (state.controller) state.controller.abort();
}

async function loadModel() {
  const response = await fetch("/stats", { headers: authHeaders() });
  if (response.status === 401) {
    askForKey(await errorMessage(response));
    return;
  }
  if (!response.ok) {
    $("error").textContent = await errorMessage(response);
    return;
  }
  state.model = (await response.json()).model;
  $("model-name").textContent = state.model.id;
  $("mode").textContent = state.model.chat_template ? "chat" : "completion (no chat template)";
  $("send").disabled = false;
}

document.addEventListener("DOMContentLoaded", () => {
  setUpKeyForm(loadModel);
  $("chat-form").addEventListener("submit", (event) => { event.preventDefault(); send(); });
  $("message").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) { event.preventDefault(); send(); }
  });
  $("stop-button").addEventListener("click", stop);
  $("clear").addEventListener("click", () => { state.messages = []; $("conversation").replaceChildren(); });
  loadModel();
});
