// The dspy-trio playground: plain browser JavaScript, no build step.
// Predict (JSON), stream over SSE (fetch + a ReadableStream reader, since EventSource cannot POST) or over
// the /v1/ws WebSocket protocol; Stop aborts the SSE request or sends a cancel frame, and either way the
// server cancels the request and closes its upstream connection.
"use strict";

const $ = (id) => document.getElementById(id);
let programs = [];
let current = null; // {stop: () => void}

const apiKey = () => $("api-key").value.trim();
const headers = () => {
  const h = { "Content-Type": "application/json" };
  if (apiKey()) h.Authorization = `Bearer ${apiKey()}`;
  return h;
};

function setStatus(text) { $("status").textContent = text; }

function showError(error) {
  const box = $("error");
  const body = error && error.error ? error.error : error;
  box.textContent = body && body.message ? `${body.code || "error"}: ${body.message}` : String(error);
  box.hidden = false;
  setStatus("Failed");
}

function clearOutput() {
  $("error").hidden = true;
  $("fields").innerHTML = "";
  $("final").textContent = "";
}

function fieldBox(predictor, field) {
  const id = `field-${predictor}-${field}`.replace(/[^\w-]/g, "_");
  let box = document.getElementById(id);
  if (!box) {
    box = document.createElement("div");
    box.className = "field";
    box.id = id;
    box.dataset.field = field;
    box.innerHTML = `<h3></h3><div class="text"></div>`;
    box.querySelector("h3").textContent = predictor === "self" ? field : `${predictor} · ${field}`;
    $("fields").appendChild(box);
  }
  return box.querySelector(".text");
}

function showFinal(result) {
  const { outputs, usage, timings } = result;
  for (const [field, value] of Object.entries(outputs || {})) {
    const box = document.querySelector(`.field[data-field="${CSS.escape(field)}"] .text`) || fieldBox("self", field);
    box.textContent = typeof value === "string" ? value : JSON.stringify(value);
  }
  $("final").textContent = JSON.stringify({ outputs, usage, timings, dropped: result.dropped }, null, 2);
  setStatus(`Done in ${timings ? timings.total_ms.toFixed(0) : "?"} ms`);
}

function busy(on, stop) {
  current = on ? { stop } : null;
  for (const id of ["predict", "stream", "ws"]) $(id).disabled = on;
  $("stop").disabled = !on;
}

function readInputs() {
  const inputs = {};
  for (const element of $("inputs").elements) {
    if (!element.name) continue;
    const value = element.value;
    if (value === "" && !element.required) continue;
    if (element.dataset.type === "str") inputs[element.name] = value;
    else {
      try { inputs[element.name] = JSON.parse(value); } catch { inputs[element.name] = value; }
    }
  }
  return inputs;
}

function body() {
  return JSON.stringify({ inputs: readInputs(), timeout_secs: Number($("timeout").value) || undefined });
}

function renderForm() {
  const program = programs.find((p) => p.name === $("program").value);
  const form = $("inputs");
  form.innerHTML = "";
  for (const input of program ? program.inputs : []) {
    const label = document.createElement("label");
    label.textContent = `${input.name} (${input.type}${input.required ? "" : ", optional"})`;
    const area = document.createElement("textarea");
    area.name = input.name;
    area.required = input.required;
    area.dataset.type = input.type;
    area.placeholder = input.name === "question" ? "What is Trio?" : "";
    label.appendChild(area);
    form.appendChild(label);
  }
}

async function loadPrograms() {
  const response = await fetch("/v1/programs", { headers: headers() });
  const payload = await response.json();
  if (!response.ok) { showError(payload); return; }
  programs = payload.programs;
  $("program").innerHTML = programs.map((p) => `<option value="${p.name}">${p.name} (${p.kind})</option>`).join("");
  renderForm();
  setStatus("Ready");
  loadTenant();
}

// Which tenant the key belongs to (its name, never the key), its weight and what it used here.
async function loadTenant() {
  $("tenant").textContent = "";
  try {
    const response = await fetch("/v1/tenant", { headers: headers() });
    if (!response.ok) return;
    const t = await response.json();
    const limits = [t.max_in_flight && `${t.max_in_flight} in flight`, t.rate_limit.rpm && `${t.rate_limit.rpm} rpm`,
      t.budget && `$${t.budget.usd} / ${t.budget.window}s`].filter(Boolean).join(", ");
    $("tenant").textContent = `tenant ${t.tenant} · weight ${t.weight}${limits ? ` · ${limits}` : ""}`;
  } catch { /* the tenant is a detail: the page works without it */ }
}

async function predict() {
  clearOutput();
  const controller = new AbortController();
  busy(true, () => controller.abort());
  setStatus("Predicting…");
  try {
    const response = await fetch(`/v1/programs/${encodeURIComponent($("program").value)}/predict`,
      { method: "POST", headers: headers(), body: body(), signal: controller.signal });
    const payload = await response.json();
    if (!response.ok) showError(payload); else showFinal(payload);
  } catch (error) {
    if (error.name === "AbortError") setStatus("Stopped"); else showError(error);
  } finally { busy(false); }
}

function handleEvent(name, payload) {
  if (name === "status") setStatus(`Running (queued ${payload.queued_ms.toFixed(0)} ms)…`);
  else if (name === "delta") fieldBox(payload.predictor, payload.field).textContent += payload.text;
  else if (name === "final") showFinal(payload);
  else if (name === "error") showError(payload);
}

async function streamSSE() {
  clearOutput();
  const controller = new AbortController();
  busy(true, () => controller.abort());
  setStatus("Streaming…");
  try {
    const response = await fetch(`/v1/programs/${encodeURIComponent($("program").value)}/stream`,
      { method: "POST", headers: headers(), body: body(), signal: controller.signal });
    if (!response.ok) { showError(await response.json()); return; }
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        let name = "message";
        const data = [];
        for (const line of block.split("\n")) {
          if (line.startsWith("event:")) name = line.slice(6).trim();
          else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
        }
        if (data.length) handleEvent(name, JSON.parse(data.join("\n")));
      }
    }
  } catch (error) {
    if (error.name === "AbortError") setStatus("Stopped"); else showError(error);
  } finally { busy(false); }
}

function streamWebSocket() {
  clearOutput();
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const key = apiKey() ? `?api_key=${encodeURIComponent(apiKey())}` : "";
  const socket = new WebSocket(`${scheme}://${location.host}/v1/ws${key}`);
  const id = `pg-${Date.now()}`;
  busy(true, () => socket.readyState === WebSocket.OPEN && socket.send(JSON.stringify({ id, type: "cancel" })));
  setStatus("Streaming over WebSocket…");
  socket.onopen = () => socket.send(JSON.stringify({
    id, type: "stream", program: $("program").value, inputs: readInputs(),
    timeout_secs: Number($("timeout").value) || undefined,
  }));
  socket.onmessage = (message) => {
    const frame = JSON.parse(message.data);
    if (frame.type === "cancelled") { setStatus("Stopped"); socket.close(); return; }
    handleEvent(frame.type, frame);
    if (frame.type === "final" || frame.type === "error") socket.close();
  };
  socket.onerror = () => showError({ message: "the WebSocket failed (is the API key right?)" });
  socket.onclose = () => busy(false);
}

async function pollMetrics() {
  try {
    const response = await fetch("/metrics", { headers: { ...headers(), Accept: "application/json" } });
    if (response.ok) {
      const m = await response.json();
      const shown = {
        "requests": m.total_requests, "in flight": m.in_flight, "queued": m.queued, "errors": m.total_errors,
        "timeouts": m.total_timeouts, "cancelled": m.cancelled, "avg ms": m.average_duration_ms,
      };
      $("metric-values").innerHTML = Object.entries(shown).map(([k, v]) => `<dt>${k}</dt><dd>${v}</dd>`).join("");
    }
  } catch { /* the next poll will tell */ }
}

$("api-key").value = localStorage.getItem("dspy-trio-api-key") || "";
$("api-key").addEventListener("change", () => { localStorage.setItem("dspy-trio-api-key", apiKey()); loadPrograms(); });
$("program").addEventListener("change", renderForm);
$("predict").addEventListener("click", predict);
$("stream").addEventListener("click", streamSSE);
$("ws").addEventListener("click", streamWebSocket);
$("stop").addEventListener("click", () => current && current.stop());
loadPrograms();
pollMetrics();
setInterval(pollMetrics, 2000);
