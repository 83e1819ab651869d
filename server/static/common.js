// Shared by the playground and the dashboard: the API key (asked for only
// when the server answers 401, kept in this tab's sessionStorage, sent as a
// bearer token) and HTML escaping. The pages carry no secret themselves.
"use strict";

const KEY_STORAGE = "tokenstep-api-key";

function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE) || "";
}

function authHeaders(extra) {
  const headers = Object.assign({}, extra || {});
  const key = apiKey();
  if (key) headers["Authorization"] = "Bearer " + key;
  return headers;
}

// Escape text for insertion into HTML: nothing a model writes becomes markup.
function escapeHtml(text) {
  return String(text)
    .replace(/&/g, "&amp;")
    .replace(/</g, "&lt;")
    .replace(/>/g, "&gt;")
    .replace(/"/g, "&quot;")
    .replace(/'/g, "&#39;");
}

// The key form, first in <main>: hidden until a 401; `onKey` runs once a key is saved.
function setUpKeyForm(onKey) {
  const form = document.createElement("form");
  form.id = "key-form";
  form.hidden = true;
  form.innerHTML = '<p id="key-message" role="alert"></p><label for="key-input">API key</label>' +
    '<input id="key-input" type="password" autocomplete="off"><button type="submit">Use key</button>';
  document.querySelector("main").prepend(form);
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY_STORAGE, document.getElementById("key-input").value.trim());
    form.hidden = true;
    onKey();
  });
}

function askForKey(message) {
  document.getElementById("key-form").hidden = false;
  document.getElementById("key-message").textContent = message;
  document.getElementById("key-input").focus();
}

// The error message of an OpenAI-style error body, or the status line.
async function errorMessage(response) {
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return body.error.message;
  } catch (_) { /* not JSON */ }
  return "HTTP " + response.status;
}
