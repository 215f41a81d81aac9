// The page that tries each served model: lists them from /page/models, sends a file or typed text to
// /predictions/{name}/{version}, and draws the answer by its shape (bars, boxes, a mask, JSON, a file).
// Hand-written, no dependencies; it talks to its own origin only (the server's CSP says so too).

import { clearResult, h, showError } from "/page/dom.js";
import { isStreamed, readStreamed } from "/page/stream.js";
import { drawAnswer } from "/page/draw.js";
import { fileKind, inputKinds, requestBody, unsupportedMessage } from "/page/inputs.js";

const TOKEN_KEY = "model-archiver-token";
const POLL_LOADING_MS = 1500; // while a model loads, so READY shows soon after it is
const POLL_IDLE_MS = 5000; // otherwise: models registered, removed or failed since are seen too
// While a chosen file waits for its model: look soon, then less often, and give up past any load timeout
// a server would allow (120 s by default, with restarts), so a tab left open does not send hours later.
const WAIT_FIRST_MS = 300;
const WAIT_MAX_MS = 2000;
const WAIT_LIMIT_MS = 10 * 60 * 1000;

const cards = new Map(); // "name@version" -> card state
let pollTimer = null;
let waitPollMs = 0; // the backoff's current step while a card waits; 0 when none does

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
  schedulePoll(nextPollMs(models));
}

function nextPollMs(models) {
  if (![...cards.values()].some((card) => card.waiting)) {
    waitPollMs = 0;
    return models.some((m) => m.status === "LOADING") ? POLL_LOADING_MS : POLL_IDLE_MS;
  }
  waitPollMs = Math.min(waitPollMs ? waitPollMs * 1.5 : WAIT_FIRST_MS, WAIT_MAX_MS);
  return waitPollMs;
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
      if (card.waiting) {
        sayGone(`${card.model.name} is no longer served (its registration failed, or it was unregistered), ` +
          `so ${card.waiting.file.name} was not sent.`);
      }
      endWait(card);
      card.root.remove();
      cards.delete(key);
    }
  }
}

function sayGone(message) {
  // A card that vanished cannot hold the news that its file was not sent: the page says it instead.
  const gone = document.getElementById("gone");
  gone.textContent = message || "";
  gone.hidden = !message;
}

function statusText(model) {
  if (model.status === "LOADING") return "LOADING: its workers are starting; this page updates when it is ready.";
  if (model.status === "FAILED") return "FAILED: it cannot answer until it is registered again.";
  return null;
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
      if (card.text.value.trim()) {
        card.chosen = null;
        stopWaiting(card, "text was typed instead");
      }
      refreshChoice(card);
    },
  });
  card.choice = h("p", { class: "choice" });
  const sendNow = () => {
    stopOtherWaits(card, `text was sent to ${card.model.name}`);
    send(card);
  };
  card.send = h("button", { type: "button", class: "send", onclick: sendNow }, "Send");
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
  settleWait(card);
}

// ---- choosing the input --------------------------------------------------------------------------
function chooseFile(card, file) {
  card.fileInput.value = "";
  stopOtherWaits(card, `a file was chosen for ${card.model.name}`);
  endWait(card);
  sayGone(null); // a newer choice replaces the file that waited
  const kind = fileKind(file);
  const problem = unsupportedMessage(card.model, file, kind);
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
  else if (card.model.status === "LOADING") waitForReady(card);
}

// ---- a file chosen while its model loads: sent once the model is READY, exactly once ----------------
function waitForReady(card) {
  const { name } = card.model;
  const file = card.chosen.file;
  const giveUp = () => {
    endWait(card);
    clearResult(card);
    const minutes = WAIT_LIMIT_MS / 60000;
    showError(card, `${name} is still LOADING after ${minutes} minutes, so ${file.name} was not sent. ` +
      "Choose it again to wait longer.", "wait");
  };
  card.waiting = { file, timer: setTimeout(giveUp, WAIT_LIMIT_MS) };
  const cancel = h("button", { type: "button", class: "cancel", onclick: () => stopWaiting(card) }, "Cancel");
  card.result.append(
    h("p", { class: "waiting", role: "status" },
      `Waiting for ${name} to load… ${file.name} is sent once it is READY. `, cancel),
  );
  waitPollMs = 0;
  schedulePoll(WAIT_FIRST_MS);
}

function settleWait(card) {
  // Called with each new reading of the list; the wait ends before anything is sent, so only once.
  const waiting = card.waiting;
  if (!waiting || card.model.status === "LOADING") return;
  endWait(card);
  if (card.model.status === "READY") {
    send(card);
    return;
  }
  clearResult(card); // FAILED: the card shows why
  const failed = `${card.model.name} failed to load, so ${waiting.file.name} was not sent. Why is shown above.`;
  showError(card, failed, "wait");
}

function endWait(card) {
  if (!card.waiting) return;
  clearTimeout(card.waiting.timer);
  card.waiting = null;
}

function stopWaiting(card, why) {
  // The person moved on: say that nothing was sent, and leave the file chosen for a press of Send.
  const waiting = card.waiting;
  if (!waiting) return;
  endWait(card);
  clearResult(card);
  const reason = why ? ` (${why})` : "";
  card.result.append(
    h("p", { class: "wait-ended" },
      `Stopped waiting for ${card.model.name}${reason}: ${waiting.file.name} was not sent.`),
  );
}

function stopOtherWaits(card, why) {
  for (const other of cards.values()) {
    if (other !== card) stopWaiting(other, why);
  }
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

// ---- sending -------------------------------------------------------------------------------------
async function send(card) {
  const model = card.model;
  if (model.status !== "READY") return;
  const { body, type, image } = requestBody(card.chosen, card.text.value);
  const headers = { "Content-Type": type, ...authHeaders() };
  if (model.kind === "image_segmenter") headers.Accept = "image/png, application/json;q=0.5";
  const url = `/predictions/${encodeURIComponent(model.name)}/${encodeURIComponent(model.version)}`;
  clearResult(card);
  card.send.disabled = true;
  card.root.classList.add("busy");
  const started = performance.now();
  let response;
  let payload;
  let streamed = null; // a streaming handler's answer, shown as it arrived
  try {
    response = await fetch(url, { method: "POST", headers, body });
    if (isStreamed(response)) {
      streamed = await readStreamed(card, response, started);
      payload = streamed.blob;
    } else {
      payload = await response.blob();
    }
  } catch (err) {
    showError(card, `The request did not complete: ${err.message}`, "network");
    return;
  } finally {
    card.root.classList.remove("busy");
    refreshChoice(card);
  }
  const latencyMs = performance.now() - started;
  const first = streamed && streamed.firstMs !== null ? `first chunk ${streamed.firstMs.toFixed(1)} ms · ` : "";
  card.result.prepend(
    h("p", { class: "latency" }, `${response.status} ${response.statusText} · ${first}${latencyMs.toFixed(1)} ms`),
  );
  if (response.status === 401) {
    askForToken(token() ? "That token was refused." : "This server needs a token.");
  }
  if (!response.ok) {
    const message = await errorText(new Response(payload));
    showError(card, `${response.status}: ${message}`, "server");
    return;
  }
  if (streamed) return; // already shown, chunk by chunk
  await drawAnswer(card, payload, response.headers.get("Content-Type") || "", image);
}

// ---- start ---------------------------------------------------------------------------------------
setUpTokenForm();
loadModels();
