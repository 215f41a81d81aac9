// Small DOM helpers the page's scripts share: elements made from text (never from HTML, so a model
// name or a label cannot inject markup), and the parts of a card's result area.

export function h(tag, attrs = {}, ...children) {
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

export function svg(tag, attrs = {}) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [key, value] of Object.entries(attrs)) el.setAttribute(key, String(value));
  return el;
}

export function percent(p) {
  return `${(p * 100).toFixed(1)}%`;
}

export function clearResult(card) {
  card.result.replaceChildren();
  if (card.objectUrls) card.objectUrls.forEach((u) => URL.revokeObjectURL(u));
  card.objectUrls = [];
}

export function showError(card, message, kind) {
  card.result.append(h("p", { class: `error error-${kind}`, role: "alert" }, message));
}

export function objectUrl(card, blob) {
  const url = URL.createObjectURL(blob);
  card.objectUrls.push(url);
  return url;
}

export function download(card, blob, name) {
  return h("a", { class: "download", href: objectUrl(card, blob), download: name }, `Download the answer (${blob.size} bytes)`);
}
