"use strict";
// The demo page. It uses the public API only: GET /models fills the model list, each chosen file
// is sent to POST /classify as multipart (fields image, model, top_k, and version when one is
// picked), and the JSON answer or the service's own error message is shown, with the version that
// answered (a name can serve several, split by its traffic policy: docs/rollouts.md); for a model
// that explains, POST /explain's heatmap of that same version is laid over the upload with an
// opacity slider. Nothing is loaded from outside this server.

const $ = (id) => document.getElementById(id);
const KEY_STORE = "imgserve.apiKey"; // sessionStorage: the key lives as long as the tab
let models = []; // one entry per (name, version), as GET /models lists them
let traffic = {}; // name -> its traffic policy (weights, shadow, sticky), as GET /models gives it
let chosen = null; // the File being classified
let latest = 0; // number of the last request sent: an older answer arriving later is dropped

function show(id, on) {
  $(id).hidden = !on;
}

function showError(message) {
  $("error").textContent = message;
  $("error").dataset.file = chosen ? chosen.name : "";
  show("error", true);
  show("result", false);
}

function askForKey(note) {
  show("key-row", true);
  if (note) $("key-note").textContent = note;
}

async function getJSON(url, options) {
  const r = await fetch(url, options);
  let body = null;
  try {
    body = await r.json();
  } catch (e) {
    // a proxy's HTML error page, or an empty body: the status says enough
  }
  return [r, body];
}

async function loadModels() {
  let r, body;
  try {
    [r, body] = await getJSON("/models");
  } catch (e) {
    return showError(`cannot reach the service: ${e.message}`);
  }
  if (!r.ok || !body) {
    return showError(`GET /models answered HTTP ${r.status}` + (body && body.error ? `: ${body.error}` : ""));
  }
  models = body.models;
  traffic = body.traffic || {};
  const names = [...new Set(models.map((m) => m.name))];
  $("model").replaceChildren(...names.map((n) => {
    const vs = versionsOf(n).map((m) => m.version);
    return new Option(`${n} (version${vs.length > 1 ? "s" : ""} ${vs.join(", ")})`, n, n === body.default,
      n === body.default);
  }));
  if (body.api_key_required) askForKey();
  listVersions();
  describeModel();
}

function versionsOf(name) {
  return models.filter((m) => m.name === name);
}

// The entry the model description is about: the picked version, else the one the name answers by default.
function chosenModel() {
  const vs = versionsOf($("model").value);
  return vs.find((m) => m.version === $("version").value) || vs.find((m) => m.default_version) || vs[vs.length - 1];
}

function weightsText(name) {
  const p = traffic[name];
  return p && p.weights ? Object.entries(p.weights).map(([v, w]) => `${v} ${w} %`).join(", ") : "";
}

// With several versions: "any" (the traffic policy picks, or the newest without one) or one version.
function listVersions() {
  const name = $("model").value;
  const vs = versionsOf(name);
  const weights = weightsText(name);
  $("version").replaceChildren(new Option(weights ? `any: traffic policy (${weights})` : "any: the newest", ""),
    ...vs.map((m) => new Option(m.version, m.version)));
  show("version-row", vs.length > 1);
}

function describeModel() {
  const m = chosenModel();
  if (!m) return;
  const inp = m.input;
  const colour = inp.channels === 1 ? "greyscale" : "RGB";
  $("model-info").textContent =
    `${m.architecture || "model"}: ${m.num_classes} classes, ${inp.width}×${inp.height} ${colour} input, ` +
    `${m.backend} ${m.precision} on ${m.device}`;
  const k = $("topk");
  const keep = Number(k.value) || 5;
  const most = Math.min(m.num_classes, 10);
  k.replaceChildren(...Array.from({ length: most }, (_, i) => new Option(String(i + 1), String(i + 1))));
  k.value = String(Math.min(keep, most));
}

function choose(file) {
  if (!file) return;
  chosen = file;
  $("file-name").textContent = `${file.name} (${(file.size / 1024).toFixed(1)} KB)`;
  const img = $("preview");
  if (img.src) URL.revokeObjectURL(img.src);
  img.src = URL.createObjectURL(file);
  $("again").disabled = false;
  classify();
}

function predictionRow(p, i) {
  const li = document.createElement("li");
  li.className = i === 0 ? "pred top" : "pred";
  const label = document.createElement("span");
  label.className = "label";
  label.textContent = p.label;
  const bar = document.createElement("span");
  bar.className = "bar";
  const fill = document.createElement("span");
  fill.className = "fill";
  fill.style.width = `${(p.score * 100).toFixed(1)}%`;
  bar.append(fill);
  const score = document.createElement("span");
  score.className = "score";
  score.textContent = `${(p.score * 100).toFixed(1)} %`;
  li.append(label, bar, score);
  return li;
}

async function classify() {
  if (!chosen) return;
  const form = new FormData();
  form.append("image", chosen, chosen.name);
  form.append("model", $("model").value);
  if ($("version").value) form.append("version", $("version").value);
  form.append("top_k", $("topk").value);
  const headers = {};
  const key = $("key").value.trim();
  if (key) headers.Authorization = `Bearer ${key}`;
  show("error", false);
  show("result", false);
  show("busy", true);
  const mine = ++latest;
  const t0 = performance.now();
  let r, body;
  try {
    [r, body] = await getJSON("/classify", { method: "POST", body: form, headers });
  } catch (e) {
    if (mine !== latest) return;
    show("busy", false);
    return showError(`no answer from the service: ${e.message}`);
  }
  const ms = performance.now() - t0;
  if (mine !== latest) return;
  show("busy", false);
  if (r.status === 401) askForKey("This service needs an API key: enter it above, then press Classify again.");
  if (!r.ok || !body) {
    return showError(`HTTP ${r.status}: ${body && body.error ? body.error : "the service gave no message"}`);
  }
  if (key) sessionStorage.setItem(KEY_STORE, key);
  $("result-model").textContent = body.model;
  $("result-version").textContent = body.version;
  $("result-route").textContent = route(body.model, form.get("version"));
  $("rtt").textContent = `${ms.toFixed(0)} ms`;
  $("predictions").replaceChildren(...body.predictions.map(predictionRow));
  $("result").dataset.file = chosen.name; // which upload this answer is for (the browser test waits on it)
  show("result", true);
  form.set("version", body.version); // the heatmap explains the answer shown, of the version that gave it
  explain(form, headers, mine);
}

// Why this version answered: asked for, or picked by the traffic policy among several.
function route(name, asked) {
  if (asked) return "(the version asked for)";
  if (versionsOf(name).length < 2) return "";
  return weightsText(name) ? `(picked by the traffic policy: ${weightsText(name)})` : "(the newest)";
}

// The class-activation map of the top-1 class, over the upload (models that explain; docs/explain.md).
// The heatmap comes as its own PNG so the opacity slider needs no new request.
async function explain(form, headers, mine) {
  show("explain", false);
  show("explain-none", false);
  const m = chosenModel();
  if (!m || !m.explain || !m.explain.method) {
    $("explain-none").textContent = `No heatmap for this model: ${m && m.explain ? m.explain.reason : "unknown"}`;
    show("explain-none", true);
    return;
  }
  form.append("heatmap", "png");
  let r, body;
  try {
    [r, body] = await getJSON("/explain", { method: "POST", body: form, headers });
  } catch (e) {
    return;
  }
  if (mine !== latest || !r.ok || !body) return;
  $("explained").textContent = `${body.explained.label} (${(body.explained.score * 100).toFixed(1)} %)`;
  $("explain-base").src = $("preview").src;
  const bytes = Uint8Array.from(atob(body.heatmap.heatmap_png), (c) => c.charCodeAt(0));
  const heat = $("explain-heat");
  if (heat.src) URL.revokeObjectURL(heat.src);
  heat.src = URL.createObjectURL(new Blob([bytes], { type: "image/png" })); // the page's CSP allows blob:, not data:
  setOpacity();
  $("explain").dataset.file = chosen.name;
  show("explain", true);
}

function setOpacity() {
  $("explain-heat").style.opacity = String(Number($("opacity").value) / 100);
}

function setUp() {
  for (const el of document.querySelectorAll("#origin")) el.textContent = location.origin;
  $("key").value = sessionStorage.getItem(KEY_STORE) || "";
  $("model").addEventListener("change", () => { listVersions(); describeModel(); classify(); });
  $("version").addEventListener("change", () => { describeModel(); classify(); });
  $("topk").addEventListener("change", classify);
  $("again").addEventListener("click", classify);
  $("opacity").addEventListener("input", setOpacity);
  $("file").addEventListener("change", (e) => choose(e.target.files[0]));
  const img = $("preview");
  img.addEventListener("load", () => {
    img.classList.toggle("tiny", img.naturalWidth < 128); // a 28 px upload is shown enlarged, pixel by pixel
    show("preview", true);
    show("drop-text", false);
  });
  img.addEventListener("error", () => { show("preview", false); show("drop-text", true); });
  const drop = $("drop");
  for (const type of ["dragenter", "dragover"]) {
    drop.addEventListener(type, (e) => { e.preventDefault(); drop.classList.add("over"); });
  }
  for (const type of ["dragleave", "drop"]) {
    drop.addEventListener(type, () => drop.classList.remove("over"));
  }
  drop.addEventListener("drop", (e) => { e.preventDefault(); choose(e.dataTransfer.files[0]); });
  loadModels();
}

setUp();
