// The playground: plain DOM and fetch against the service's public API, nothing else.
// The API key (if keys are on) stays in this tab's sessionStorage; no admin token is ever used.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "promptswap.apiKey";

function headers(extra = {}) {
  const key = $("api-key").value.trim();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

// The service's error body is {"error": {"code", "message"}}; show its message.
async function failure(response) {
  try {
    const body = await response.json();
    if (body && body.error) return `${response.status} ${body.error.code}: ${body.error.message}`;
  } catch (_) { /* not JSON */ }
  return `${response.status} ${response.statusText}`;
}

async function getJSON(path) {
  const response = await fetch(path, { headers: headers() });
  if (!response.ok) throw new Error(await failure(response));
  return response.json();
}

function status(id, text, isError = false) {
  const el = $(id);
  el.textContent = text;
  el.classList.toggle("error", isError);
}

function fillSelect(select, first, names) {
  const keep = select.value;
  select.replaceChildren(new Option(first, ""));
  for (const name of names) select.add(new Option(name, name));
  if (names.includes(keep)) select.value = keep;
}

function humanBytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KiB`;
  return `${(n / 1024 / 1024).toFixed(1)} MiB`;
}

// --------------------------------------------------------------- models and adapters

async function loadModels() {
  try {
    const models = (await getJSON("/v1/models")).data;
    const backbones = models.filter((m) => m.kind !== "adapter");
    $("backbones").textContent = backbones.map((m) => `${m.kind}: ${m.id}`).join(" · ") || "no backbone";
    $("classify-panel").hidden = !backbones.some((m) => m.kind === "clip");
    $("chat-panel").hidden = !backbones.some((m) => m.kind === "llava");
  } catch (err) {
    $("backbones").textContent = `models: ${err.message}`;
  }
}

async function loadAdapters() {
  const body = $("adapters").tBodies[0];
  try {
    const adapters = (await getJSON("/v1/adapters")).adapters;
    body.replaceChildren();
    const refs = { maple: [], m2pt: [] };
    for (const adapter of adapters) {
      for (const v of adapter.versions) {
        const row = body.insertRow();
        row.dataset.adapter = v.key;
        row.dataset.loaded = String(v.loaded);
        for (const text of [adapter.name, String(v.version), adapter.method || "?", humanBytes(v.size_bytes)]) {
          row.insertCell().textContent = text;
        }
        const loaded = row.insertCell();
        loaded.textContent = v.loaded ? "yes" : "no";
        loaded.className = v.loaded ? "yes" : "";
      }
      if (refs[adapter.method]) refs[adapter.method].push(adapter.name, ...adapter.versions.map((v) => v.key));
    }
    fillSelect($("adapter"), "none (zero-shot)", refs.maple);
    fillSelect($("chat-adapter"), "none", refs.m2pt);
    status("adapters-status", adapters.length ? "" : "no adapters stored");
  } catch (err) {
    status("adapters-status", err.message, true);
  }
}

// --------------------------------------------------------------- classify

function showResults(answer) {
  const results = $("results");
  results.replaceChildren();
  // The API answers sorted already; sort again so the bars are ordered whatever it sends.
  const rows = [...answer.labels].sort((a, b) => b.score - a.score);
  for (const { label, score, logit } of rows) {
    const row = document.createElement("div");
    row.className = "row";
    row.dataset.label = label;
    row.dataset.score = String(score);
    row.title = `logit ${logit.toFixed(4)}`;
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = label;
    const track = document.createElement("span");
    track.className = "track";
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.style.display = "block";
    bar.style.width = `${(score * 100).toFixed(2)}%`;
    track.append(bar);
    const value = document.createElement("span");
    value.className = "value";
    value.textContent = `${(score * 100).toFixed(1)}%`;
    row.append(name, track, value);
    results.append(row);
  }
  const who = answer.adapter ? `adapter ${answer.adapter}` : "zero-shot";
  status("classify-status", `${answer.model} · ${who}`);
}

async function classify(event) {
  event.preventDefault();
  const file = $("image").files[0];
  const labels = $("labels").value.split("\n").map((l) => l.trim()).filter(Boolean);
  if (!file || !labels.length) return status("classify-status", "choose an image and type labels", true);
  const form = new FormData();
  form.append("image", file);
  form.append("labels", JSON.stringify(labels)); // one JSON array: labels may hold commas
  if ($("adapter").value) form.append("adapter", $("adapter").value);
  $("classify").disabled = true;
  $("results").dataset.state = "busy";
  status("classify-status", "classifying…");
  try {
    const response = await fetch("/v1/classify", { method: "POST", headers: headers(), body: form });
    if (!response.ok) throw new Error(await failure(response));
    showResults(await response.json());
    loadAdapters(); // the adapter used is loaded now
  } catch (err) {
    $("results").replaceChildren();
    status("classify-status", err.message, true);
  } finally {
    $("classify").disabled = false;
    $("results").dataset.state = "done";
  }
}

function preview() {
  const file = $("image").files[0];
  const img = $("image-preview");
  if (img.src) URL.revokeObjectURL(img.src);
  img.hidden = !file;
  if (file) img.src = URL.createObjectURL(file);
}

// --------------------------------------------------------------- chat (server-sent events)

async function chat(event) {
  event.preventDefault();
  const file = $("chat-image").files[0];
  const answer = $("answer");
  answer.textContent = "";
  answer.dataset.state = "busy";
  const form = new FormData();
  form.append("image", file);
  form.append("instruction", $("instruction").value);
  form.append("max_tokens", $("max-tokens").value || "64");
  form.append("stream", "true");
  if ($("chat-adapter").value) form.append("adapter", $("chat-adapter").value);
  $("chat").disabled = true;
  status("chat-status", "generating…");
  try {
    const response = await fetch("/v1/chat", { method: "POST", headers: headers(), body: form });
    if (!response.ok) throw new Error(await failure(response));
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    let finish = null;
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const frame = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        const data = frame.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
        if (!data || data === "[DONE]") continue;
        const payload = JSON.parse(data);
        if (payload.error) throw new Error(`${payload.error.code}: ${payload.error.message}`);
        answer.textContent += payload.text;
        finish = payload.finish_reason || finish;
      }
    }
    status("chat-status", `done (${finish || "stop"})`);
  } catch (err) {
    status("chat-status", err.message, true);
  } finally {
    $("chat").disabled = false;
    answer.dataset.state = "done";
  }
}

// --------------------------------------------------------------- start

function start() {
  const key = $("api-key");
  key.value = sessionStorage.getItem(KEY_STORE) || "";
  key.addEventListener("change", () => {
    sessionStorage.setItem(KEY_STORE, key.value.trim());
    loadModels();
    loadAdapters();
  });
  $("image").addEventListener("change", preview);
  $("classify-form").addEventListener("submit", classify);
  $("chat-form").addEventListener("submit", chat);
  $("refresh-adapters").addEventListener("click", loadAdapters);
  Promise.all([loadModels(), loadAdapters()]).then(() => { document.body.dataset.ready = "true"; });
}

start();
