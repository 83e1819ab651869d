// The live view of the engine: GET /stats about once a second (with the API
// key when the server has one), drawn as cards, a table of requests, the KV
// pool block by block and two charts of the last five minutes of steps.
"use strict";

const $ = (id) => document.getElementById(id);
const REFRESH_MS = 1000;
let timer = null;

function percent(value) {
  return value === null || value === undefined ? "–" : (100 * value).toFixed(1) + " %";
}

function fitCanvas(canvas) {
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth, height = canvas.clientHeight;
  canvas.width = width * ratio;
  canvas.height = height * ratio;
  const context = canvas.getContext("2d");
  context.setTransform(ratio, 0, 0, ratio, 0, 0);
  return [context, width, height];
}

function cssColor(name) {
  return getComputedStyle(document.documentElement).getPropertyValue(name).trim();
}

function drawBlockMap(map) {
  const canvas = $("block-map");
  const count = map.length;
  const width = canvas.clientWidth;
  const cell = Math.max(3, Math.floor(Math.sqrt((width * 110) / Math.max(count, 1))));
  const perRow = Math.max(1, Math.floor(width / cell));
  canvas.style.height = Math.ceil(count / perRow) * cell + 6 + "px";
  const [context, , height] = fitCanvas(canvas);
  context.clearRect(0, 0, width, height);
  const colors = { ".": cssColor("--free"), "c": cssColor("--cached"), "u": cssColor("--used") };
  for (let i = 0; i < count; i++) {
    context.fillStyle = colors[map[i]] || "#000";
    context.fillRect((i % perRow) * cell + 2, Math.floor(i / perRow) * cell + 2, cell - 1, cell - 1);
  }
}

function drawChart(id, points, field) {
  const [context, width, height] = fitCanvas($(id));
  context.clearRect(0, 0, width, height);
  const max = Math.max(1, ...points.map((p) => p[field]));
  context.fillStyle = cssColor("--muted");
  context.font = "11px system-ui";
  context.fillText(max.toFixed(field === "step_ms" ? 1 : 0), 4, 12);
  context.strokeStyle = cssColor("--accent");
  context.beginPath();
  points.forEach((point, index) => {
    const x = width * (1 + point.t / 300);
    const y = height - 4 - (height - 18) * (point[field] / max);
    if (index === 0) context.moveTo(x, y); else context.lineTo(x, y);
  });
  context.stroke();
}

function render(stats) {
  const task = { embed: " (embeddings)", score: " (reranker)" }[stats.model.task] || "";
  $("model-name").textContent = stats.model.id + task;
  $("running").textContent = stats.running;
  $("waiting").textContent = stats.waiting;
  $("kv-usage").textContent = percent(stats.kv.usage);
  $("preemptions").textContent = stats.preemptions;
  $("prefix-hit").textContent = percent(stats.prefix_cache.hit_rate);
  $("spec-accept").textContent = percent(stats.speculative.acceptance_rate);
  const recent = stats.steps.filter((p) => p.t > -10);
  const steps = recent.reduce((n, p) => n + p.steps, 0);
  $("step-ms").textContent = steps ? (recent.reduce((s, p) => s + p.step_ms * p.steps, 0) / steps).toFixed(1) + " ms" : "–";
  $("throughput").textContent = (recent.reduce((n, p) => n + p.generated, 0) / 10).toFixed(1);
  const body = $("requests");
  body.replaceChildren(...stats.requests.map((request) => {
    const row = document.createElement("tr");
    row.dataset.state = request.state;
    for (const value of [request.id, request.state, request.prompt_tokens, request.output_tokens, request.computed_tokens, request.blocks]) {
      const cell = document.createElement("td");
      cell.textContent = value;  // text, never markup
      row.appendChild(cell);
    }
    return row;
  }));
  const map = stats.kv.map;
  $("blocks-used").textContent = (map.match(/u/g) || []).length;
  $("blocks-cached").textContent = (map.match(/c/g) || []).length;
  $("blocks-free").textContent = (map.match(/\./g) || []).length;
  drawBlockMap(map);
  drawChart("tokens-chart", stats.steps, "tokens_per_step");
  drawChart("time-chart", stats.steps, "step_ms");
}

async function refresh() {
  try {
    const response = await fetch("/stats", { headers: authHeaders() });
    if (response.status === 401) {
      askForKey(await errorMessage(response));
      return;  // polling resumes once a key is given
    }
    if (!response.ok) throw new Error(await errorMessage(response));
    $("error").textContent = "";
    render(await response.json());
  } catch (error) {
    $("error").textContent = "Cannot reach the server: " + error.message;
  }
  timer = setTimeout(refresh, REFRESH_MS);
}

document.addEventListener("DOMContentLoaded", () => {
  setUpKeyForm(() => { clearTimeout(timer); refresh(); });
  refresh();
});
