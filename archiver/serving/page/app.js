// The page that tries each served model: lists them from /page/models, sends a file or typed text to
// /predictions/{name}/{version}, and draws the answer by its shape (bars, boxes, a mask, JSON, a file).
// Hand-written, no dependencies; it talks to its own origin only (the server's CSP says so too).

const TOKEN_KEY = "model-archiver-token";
const POLL_LOADING_MS = 1500; // while a model loads, so READY shows soon after it is
const POLL_IDLE_MS = 5000; // otherwise: models registered, removed or failed since are seen too
const IMAGE_KINDS = new Set(["image_classifier", "object_detector", "image_segmenter"]);
const TEXT_EXTENSIONS = /\.(txt|text|csv|tsv|md|json|jsonl)$/i;
const IMAGE_EXTENSIONS = /\.(jpe?g|png|gif|webp|bmp)$/i;
const MAX_JSON_SHOWN = 200000; // characters of an answer printed in full; the rest is in the download
// Distinct colours for segmentation classes (class 0, usually background, is left clear).
const PALETTE = [
  [0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
  [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212], [0, 128, 128],
];

const cards = new Map(); // "name@version" -> card state
let pollTimer = null;

// ---- small helpers -------------------------------------------------------------------------------
function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") el.className = value;
    else if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

function svg(tag, attrs = {}) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [key, value] of Object.entries(attrs)) el.setAttribute(key, String(value));
  return el;
}

function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

function authHeaders() {
  const t = token();
  return t ? { Authorization: `Bearer ${t}` } : {};
}

function percent(p) {
  return `${(p * 100).toFixed(1)}%`;
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

function clearResult(card) {
  card.result.replaceChildren();
  if (card.objectUrls) card.objectUrls.forEach((u) => URL.revokeObjectURL(u));
  card.objectUrls = [];
}

function showError(card, message, kind) {
  card.result.append(h("p", { class: `error error-${kind}`, role: "alert" }, message));
}

function objectUrl(card, blob) {
  const url = URL.createObjectURL(blob);
  card.objectUrls.push(url);
  return url;
}

// ---- drawing answers -----------------------------------------------------------------------------
async function drawAnswer(card, blob, contentType, image) {
  const mime = contentType.split(";")[0].trim().toLowerCase();
  if (mime === "application/json" || mime.endsWith("+json")) {
    const text = await blob.text();
    let value;
    try {
      value = JSON.parse(text);
    } catch (_) {
      return drawText(card, text, blob, "answer.txt");
    }
    return drawJsonAnswer(card, value, text, blob, image);
  }
  if (mime.startsWith("image/")) {
    if (image && card.model.kind === "image_segmenter") {
      const classes = await pngClasses(blob);
      if (classes) return drawMask(card, image, classes, blob, "mask.png");
    }
    const url = objectUrl(card, blob);
    card.result.append(h("img", { class: "answer-image", src: url, alt: "the model's answer" }), download(card, blob, "answer"));
    return;
  }
  if (mime.startsWith("text/")) return drawText(card, await blob.text(), blob, "answer.txt");
  card.result.append(h("p", {}, `The answer is ${blob.size} bytes of ${mime || "unnamed data"}.`), download(card, blob, "answer.bin"));
}

function drawText(card, text, blob, name) {
  card.result.append(h("pre", { class: "answer-text" }, text), download(card, blob, name));
}

function download(card, blob, name) {
  return h("a", { class: "download", href: objectUrl(card, blob), download: name }, `Download the answer (${blob.size} bytes)`);
}

function isScoreMap(value) {
  if (!value || typeof value !== "object" || Array.isArray(value)) return false;
  const entries = Object.values(value);
  return entries.length > 0 && entries.every((v) => typeof v === "number" && Number.isFinite(v));
}

function detectionOf(item) {
  // {"<label>": [x1, y1, x2, y2], "score": s}, TorchServe's object_detector answer.
  if (!item || typeof item !== "object" || Array.isArray(item) || typeof item.score !== "number") return null;
  const others = Object.entries(item).filter(([k]) => k !== "score");
  if (others.length !== 1) return null;
  const [label, box] = others[0];
  if (!Array.isArray(box) || box.length !== 4 || !box.every((v) => typeof v === "number")) return null;
  return { label, box, score: item.score };
}

function isClassMap(value) {
  // [H][W][2] of [class, probability], TorchServe's image_segmenter answer.
  return (
    Array.isArray(value) && value.length > 0 && Array.isArray(value[0]) && value[0].length > 0 &&
    Array.isArray(value[0][0]) && value[0][0].length === 2 && typeof value[0][0][0] === "number"
  );
}

async function drawJsonAnswer(card, value, text, blob, image) {
  if (Array.isArray(value) && value.length === 1 && isScoreMap(value[0])) value = value[0];
  if (isScoreMap(value)) return drawBars(card, value, image, blob);
  if (Array.isArray(value) && image) {
    const detections = value.map(detectionOf);
    if (detections.every(Boolean) && (value.length > 0 || card.model.kind === "object_detector")) {
      return drawBoxes(card, image, detections, blob);
    }
    if (isClassMap(value)) {
      const height = value.length;
      const width = value[0].length;
      const classes = new Uint16Array(width * height);
      for (let y = 0; y < height; y++) {
        for (let x = 0; x < width; x++) classes[y * width + x] = Math.round(value[y][x][0]);
      }
      return drawMask(card, image, { width, height, classes }, blob, "answer.json");
    }
  }
  const shown = text.length > MAX_JSON_SHOWN ? `${text.slice(0, MAX_JSON_SHOWN)}\n… (${text.length} characters in all: download it)` : JSON.stringify(value, null, 2);
  card.result.append(h("pre", { class: "answer-json" }, shown), download(card, blob, "answer.json"));
}

function drawBars(card, scores, image, blob) {
  const rows = Object.entries(scores).sort((a, b) => b[1] - a[1]).slice(0, 20);
  const probabilities = rows.every(([, p]) => p >= 0 && p <= 1);
  const top = Math.max(...rows.map(([, p]) => Math.abs(p)), 1e-12);
  const bars = h("ol", { class: "bars" });
  for (const [label, p] of rows) {
    const fill = h("span", { class: "bar-fill" });
    fill.style.width = `${Math.max(0.5, (probabilities ? p : Math.abs(p) / top) * 100)}%`;
    bars.append(
      h("li", { class: "bar", "data-label": label, "data-value": p },
        h("span", { class: "bar-label" }, label),
        h("span", { class: "bar-track" }, fill),
        h("span", { class: "bar-value" }, probabilities ? percent(p) : p.toPrecision(4))),
    );
  }
  const parts = [bars, download(card, blob, "answer.json")];
  if (image) {
    const stage = photoStage(card, image).stage;
    card.result.append(h("div", { class: "side-by-side" }, stage, h("div", { class: "answer-side" }, ...parts)));
  } else {
    card.result.append(...parts);
  }
}

function photoStage(card, image) {
  const img = h("img", { class: "photo", src: objectUrl(card, image), alt: image.name });
  const stage = h("div", { class: "stage" }, img);
  const loaded = new Promise((resolve, reject) => {
    if (img.complete && img.naturalWidth) resolve(img);
    img.addEventListener("load", () => resolve(img));
    img.addEventListener("error", () => reject(new Error("this browser cannot show the image")));
  });
  return { stage, img, loaded };
}

async function drawBoxes(card, image, detections, blob) {
  const { stage, loaded } = photoStage(card, image);
  const list = h("ul", { class: "detections" });
  card.result.append(h("div", { class: "side-by-side" }, stage, h("div", { class: "answer-side" }, list, download(card, blob, "answer.json"))));
  if (!detections.length) list.append(h("li", {}, "Nothing found above the model's score threshold."));
  let img;
  try {
    img = await loaded;
  } catch (err) {
    showError(card, `${err.message}; the boxes are listed instead.`, "image");
  }
  const overlay = svg("svg", { class: "overlay boxes", preserveAspectRatio: "none" });
  if (img) overlay.setAttribute("viewBox", `0 0 ${img.naturalWidth} ${img.naturalHeight}`);
  const width = img ? img.naturalWidth : 1;
  detections.forEach((d, i) => {
    const [x1, y1, x2, y2] = d.box;
    const colour = `rgb(${PALETTE[(i % (PALETTE.length - 1)) + 1].join(",")})`;
    const g = svg("g", { class: "box", "data-label": d.label, "data-score": d.score });
    g.append(
      svg("rect", { x: x1, y: y1, width: Math.max(0, x2 - x1), height: Math.max(0, y2 - y1), stroke: colour, "stroke-width": Math.max(2, width / 200), fill: "none" }),
    );
    const label = svg("text", { x: x1 + 4, y: y1 + Math.max(14, width / 30), fill: colour, "font-size": Math.max(12, width / 28) });
    label.textContent = `${d.label} ${percent(d.score)}`;
    g.append(label);
    overlay.append(g);
    list.append(h("li", { "data-label": d.label }, h("span", { class: "swatch" }), `${d.label} · ${percent(d.score)} · [${d.box.map((v) => v.toFixed(0)).join(", ")}]`));
    list.lastChild.firstChild.style.background = colour;
  });
  if (img) stage.append(overlay);
}

async function pngClasses(blob) {
  // An 8-bit grayscale PNG whose pixel values are class indices (the segmenter's Accept: image/png).
  let bitmap;
  try {
    bitmap = await createImageBitmap(blob, { colorSpaceConversion: "none", premultiplyAlpha: "none" });
  } catch (_) {
    return null;
  }
  const canvas = h("canvas", { width: bitmap.width, height: bitmap.height });
  const context = canvas.getContext("2d", { willReadFrequently: true });
  context.drawImage(bitmap, 0, 0);
  const pixels = context.getImageData(0, 0, bitmap.width, bitmap.height).data;
  const classes = new Uint16Array(bitmap.width * bitmap.height);
  for (let i = 0; i < classes.length; i++) classes[i] = pixels[i * 4];
  return { width: bitmap.width, height: bitmap.height, classes };
}

function cropRegion(card, img, mask) {
  // The default segmenter answers for Resize(256) + CenterCrop(224) of the photo: the mask covers the
  // centred square whose side is 224/256 of the photo's short side. Other handlers: the whole photo.
  const w = img.naturalWidth;
  const hgt = img.naturalHeight;
  if (card.model.kind === "image_segmenter" && mask.width === 224 && mask.height === 224) {
    const side = (Math.min(w, hgt) * 224) / 256;
    return { left: (w - side) / 2 / w, top: (hgt - side) / 2 / hgt, width: side / w, height: side / hgt };
  }
  return { left: 0, top: 0, width: 1, height: 1 };
}

async function drawMask(card, image, mask, blob, name) {
  const { stage, loaded } = photoStage(card, image);
  const legend = h("ul", { class: "legend" });
  const side = [legend];
  side.push(download(card, blob, name));
  card.result.append(h("div", { class: "side-by-side" }, stage, h("div", { class: "answer-side" }, ...side)));
  const canvas = h("canvas", { class: "overlay mask", width: mask.width, height: mask.height });
  const context = canvas.getContext("2d");
  const picture = context.createImageData(mask.width, mask.height);
  const counts = new Map();
  for (let i = 0; i < mask.classes.length; i++) {
    const c = mask.classes[i];
    counts.set(c, (counts.get(c) || 0) + 1);
    if (c === 0) continue;
    const [r, g, b] = PALETTE[((c - 1) % (PALETTE.length - 1)) + 1];
    picture.data.set([r, g, b, 140], i * 4);
  }
  context.putImageData(picture, 0, 0);
  for (const [c, n] of [...counts].sort((a, b) => a[0] - b[0])) {
    const swatch = h("span", { class: "swatch" });
    if (c !== 0) swatch.style.background = `rgb(${PALETTE[((c - 1) % (PALETTE.length - 1)) + 1].join(",")})`;
    legend.append(h("li", { "data-class": c }, swatch, `class ${c}${c === 0 ? " (left clear)" : ""} · ${percent(n / mask.classes.length)} of the pixels`));
  }
  let img;
  try {
    img = await loaded;
  } catch (err) {
    showError(card, `${err.message}; only the mask is shown.`, "image");
    card.result.append(canvas);
    return;
  }
  const region = cropRegion(card, img, mask);
  canvas.style.left = `${region.left * 100}%`;
  canvas.style.top = `${region.top * 100}%`;
  canvas.style.width = `${region.width * 100}%`;
  canvas.style.height = `${region.height * 100}%`;
  stage.append(canvas);
}

// ---- start ---------------------------------------------------------------------------------------
setUpTokenForm();
loadModels();
