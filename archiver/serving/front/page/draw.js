// Draws one answer by its shape: {label: probability} as bars, TorchServe's detections as boxes over the
// photo, a class mask (PNG or [H][W][2] JSON) over the photo, anything else as JSON, text or a file.

import { download, h, objectUrl, percent, showError, svg } from "/page/dom.js";

const MAX_JSON_SHOWN = 200000; // characters of an answer printed in full; the rest is in the download
// Distinct colours for segmentation classes (class 0, usually background, is left clear).
const PALETTE = [
  [0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
  [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212], [0, 128, 128],
];

export async function drawAnswer(card, blob, contentType, image) {
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
