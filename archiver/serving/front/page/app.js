// The page that tries each served model: lists them from /page/models, sends a file or typed text to
// /predictions/{name}/{version}, and draws the answer by its shape (bars, boxes, a mask, JSON, a file).
// Hand-written, no dependencies; it talks to its own origin only (the server's CSP says so too).

import { clearResult, h, showError } from "/page/dom.js";
import { drawAnswer } from "/page/draw.js";

const TOKEN_KEY = "model-archiver-token";
const POLL_LOADING_MS = 1500; // while a model loads, so READY shows soon after it is
const POLL_IDLE_MS = 5000; // otherwise: models registered, removed or failed since are seen too
const IMAGE_KINDS = new Set(["image_classifier", "object_detector", "image_segmenter"]);
const TEXT_EXTENSIONS = /\.(txt|text|csv|tsv|md|json|jsonl)$/i;
const IMAGE_EXTENSIONS = /\.(jpe?g|png|gif|webp|bmp)$/i;

const cards = new Map(); // "name@version" -> card state
let pollTimer = null;

// ---- small helpers -------------------------------------------------------------------------------
function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

function authHeaders() {
  const t = token();
  return t ? { Authorization: `Bearer ${t}` } : {};
}

async function errorText(response) {
  // The server's failures are JSON {code, type, message}; say them in one line.
  const text = await response.text();
  try {
    const body = JSON.parse(text);
    if (body && typeof body.message === "string") return `${body.type || response.status}: ${body.message}`;
  } catch (_) {
    // not JSON: fall through
  }
  return text.trim().slice(0, 500) || response.statusText;
}

// ---- the token -----------------------------------------------------------------------------------
function askForToken(message) {
  const section = document.getElementById("token");
  section.hidden = false;
  const note = document.getElementById("token-message");
  note.textContent = message || "";
  note.hidden = !message;
  document.getElementById("token-input").focus();
}

function setUpTokenForm() {
  document.getElementById("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const input = document.getElementById("token-input");
    const value = input.value.trim();
    if (!value) return;
    sessionStorage.setItem(TOKEN_KEY, value);
    input.value = "";
    loadModels();
  });
  document.getElementById("token-forget").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    askForToken("Token forgotten.");
  });
}

// ---- the model list ------------------------------------------------------------------------------
async function loadModels() {
  const notice = document.getElementById("notice");
  let response;
  try {
    response = await fetch("/page/models", { headers: authHeaders(), cache: "no-store" });
  } catch (err) {
    notice.textContent = `The server does not answer (${err.message}). Is it still running?`;
    schedulePoll(POLL_IDLE_MS);
    return;
  }
  if (response.status === 401) {
    notice.textContent = "Enter the server's token to see its models.";
    askForToken(token() ? "That token was refused." : "");
    return;
  }
  if (!response.ok) {
    notice.textContent = `Could not list the models: ${await errorText(response)}`;
    return;
  }
  document.getElementById("token").hidden = !token();
  document.getElementById("token-message").hidden = true;
  const { models } = await response.json();
  notice.textContent = models.length
    ? `${models.length} model version${models.length === 1 ? "" : "s"} served.`
    : "No models are served. Start the server with archives, or register one through the management API.";
  renderModels(models);
  schedulePoll(models.some((m) => m.status === "LOADING") ? POLL_LOADING_MS : POLL_IDLE_MS);
}

function schedulePoll(delayMs) {
  clearTimeout(pollTimer);
  pollTimer = setTimeout(loadModels, delayMs);
}

function renderModels(models) {
  const list = document.getElementById("models");
  const seen = new Set();
  for (const model of models) {
    const key = `${model.name}@${model.version}`;
    seen.add(key);
    let card = cards.get(key);
    if (!card) {
      card = makeCard(model);
      cards.set(key, card);
      list.append(card.root);
    }
    updateCard(card, model);
  }
  for (const [key, card] of cards) {
    if (!seen.has(key)) {
      card.root.remove();
      cards.delete(key);
    }
  }
}

function statusText(model) {
  if (model.status === "LOADING") return "LOADING: its workers are starting; this page updates when it is ready.";
  if (model.status === "FAILED") return "FAILED: it cannot answer until it is registered again.";
  return null;
}

function inputKinds(model) {
  // What the model's handler reads, to guide the file picker (a person may still choose anything).
  if (IMAGE_KINDS.has(model.kind)) return { accept: "image/*", hint: "an image: JPEG, PNG, WebP, GIF, BMP" };
  if (model.kind === "text_classifier") return { accept: "text/*,.txt", hint: "a text file, or type below" };
  return { accept: "image/*,text/*,.txt,.json,application/json", hint: "an image, a text file or JSON" };
}

function makeCard(model) {
  const card = { model };
  const input = h("input", {
    type: "file",
    class: "file-input",
    accept: inputKinds(model).accept,
    onchange: () => input.files[0] && chooseFile(card, input.files[0]),
  });
  card.fileInput = input;
  card.drop = h(
    "label",
    { class: "drop" },
    h("span", { class: "drop-title" }, "Drop a file here, or choose one"),
    h("span", { class: "drop-hint" }, inputKinds(model).hint),
    input,
  );
  for (const type of ["dragenter", "dragover"]) {
    card.drop.addEventListener(type, (event) => {
      event.preventDefault();
      card.drop.classList.add("over");
    });
  }
  card.drop.addEventListener("dragleave", () => card.drop.classList.remove("over"));
  card.drop.addEventListener("drop", (event) => {
    event.preventDefault();
    card.drop.classList.remove("over");
    const file = event.dataTransfer.files[0];
    if (file) chooseFile(card, file);
  });
  card.text = h("textarea", {
    class: "text-input",
    rows: 3,
    placeholder: "…or type text (text that parses as a JSON object or list is sent as JSON)",
    oninput: () => {
      if (card.text.value.trim()) card.chosen = null;
      refreshChoice(card);
    },
  });
  card.choice = h("p", { class: "choice" });
  card.send = h("button", { type: "button", class: "send", onclick: () => send(card) }, "Send");
  card.title = h("h2", {}, model.name, " ", h("span", { class: "version" }, `v${model.version}`));
  card.status = h("span", { class: "status" });
  card.meta = h("p", { class: "meta" });
  card.state = h("p", { class: "state", role: "status" });
  card.failure = h("pre", { class: "load-error", hidden: true });
  card.result = h("div", { class: "result", "aria-live": "polite" });
  card.form = h("div", { class: "try" }, card.drop, card.text, h("div", { class: "actions" }, card.send, card.choice));
  card.root = h(
    "article",
    { class: "model", "data-model": model.name, "data-version": model.version },
    h("div", { class: "head" }, card.title, card.status),
    card.meta,
    card.state,
    card.failure,
    card.form,
    card.result,
  );
  return card;
}

function updateCard(card, model) {
  card.model = model;
  card.root.dataset.status = model.status;
  card.status.textContent = model.status;
  card.status.className = `status status-${model.status.toLowerCase()}`;
  const parts = [
    model.kind === "custom" ? `handler ${model.handler || "?"}` : model.kind.replace("_", " "),
    `batch size ${model.batchSize}`,
    `max batch delay ${model.maxBatchDelayMs} ms`,
    `workers ${model.liveWorkers}/${model.workers}`,
  ];
  if (model.isDefault) parts.push("default version");
  card.meta.textContent = parts.join(" · ");
  const state = statusText(model);
  card.state.textContent = state || "";
  card.state.hidden = !state;
  const problem = model.loadError || (model.reloadError ? `newest files do not load: ${model.reloadError}` : null);
  card.failure.textContent = problem || "";
  card.failure.hidden = !problem;
  card.form.hidden = model.status === "FAILED";
  refreshChoice(card);
}

// ---- choosing the input --------------------------------------------------------------------------
function fileKind(file) {
  const type = (file.type || "").toLowerCase();
  if (type.startsWith("image/") || (!type && IMAGE_EXTENSIONS.test(file.name))) return "image";
  if (type === "application/json" || /\.jsonl?$/i.test(file.name)) return "json";
  if (type.startsWith("text/") || (!type && TEXT_EXTENSIONS.test(file.name))) return "text";
  return null;
}

function unsupportedMessage(card, file, kind) {
  // A built-in handler reads one kind of input: say so before sending it something else. A handler of
  // the archive's own is sent any file, and answers for itself.
  const model = card.model;
  const reads = IMAGE_KINDS.has(model.kind) ? ["image", "json"] : model.kind === "text_classifier" ? ["text"] : null;
  if (!reads || reads.includes(kind)) return null;
  const what = { image: "an image", text: "text", json: "JSON" }[kind] ||
    (file.type ? `a file of type ${file.type}` : "a file of unknown type");
  const wants = reads[0] === "image" ? "images" : "text";
  return `${model.name} (${model.kind.replace("_", " ")}) reads ${wants}; ${file.name} is ${what}. ` +
    `Send other files with curl -T FILE ${location.origin}/predictions/${model.name}`;
}

function chooseFile(card, file) {
  card.fileInput.value = "";
  const kind = fileKind(file);
  const problem = unsupportedMessage(card, file, kind);
  clearResult(card);
  if (problem) {
    card.chosen = null;
    showError(card, problem, "unsupported");
    refreshChoice(card);
    return;
  }
  card.chosen = { file, kind: kind || "binary" };
  card.text.value = "";
  refreshChoice(card);
  if (card.model.status === "READY") send(card);
}

function refreshChoice(card) {
  const chosen = card.chosen;
  const typed = card.text.value.trim();
  card.choice.textContent = chosen
    ? `${chosen.file.name} (${chosen.file.type || chosen.kind}, ${chosen.file.size} bytes)`
    : typed
      ? "the typed text"
      : "";
  card.send.disabled = card.model.status !== "READY" || (!chosen && !typed);
}

function requestBody(card) {
  if (card.chosen) {
    const { file, kind } = card.chosen;
    const type = file.type || (kind === "json" ? "application/json" : kind === "text" ? "text/plain" : "application/octet-stream");
    return { body: file, type, image: kind === "image" ? file : null };
  }
  const text = card.text.value;
  const trimmed = text.trim();
  if (trimmed.startsWith("{") || trimmed.startsWith("[")) {
    try {
      JSON.parse(trimmed);
      return { body: text, type: "application/json", image: null };
    } catch (_) {
      // not JSON: send as text
    }
  }
  return { body: text, type: "text/plain; charset=utf-8", image: null };
}

// ---- sending -------------------------------------------------------------------------------------
async function send(card) {
  const model = card.model;
  if (model.status !== "READY") return;
  const { body, type, image } = requestBody(card);
  const headers = { "Content-Type": type, ...authHeaders() };
  if (model.kind === "image_segmenter") headers.Accept = "image/png, application/json;q=0.5";
  const url = `/predictions/${encodeURIComponent(model.name)}/${encodeURIComponent(model.version)}`;
  clearResult(card);
  card.send.disabled = true;
  card.root.classList.add("busy");
  const started = performance.now();
  let response;
  let payload;
  try {
    response = await fetch(url, { method: "POST", headers, body });
    payload = await response.blob();
  } catch (err) {
    showError(card, `The request did not complete: ${err.message}`, "network");
    return;
  } finally {
    card.root.classList.remove("busy");
    refreshChoice(card);
  }
  const latencyMs = performance.now() - started;
  card.result.append(
    h("p", { class: "latency" }, `${response.status} ${response.statusText} · ${latencyMs.toFixed(1)} ms`),
  );
  if (response.status === 401) {
    askForToken(token() ? "That token was refused." : "This server needs a token.");
  }
  if (!response.ok) {
    const message = await errorText(new Response(payload));
    showError(card, `${response.status}: ${message}`, "server");
    return;
  }
  await drawAnswer(card, payload, response.headers.get("Content-Type") || "", image);
}

// ---- start ---------------------------------------------------------------------------------------
setUpTokenForm();
loadModels();
