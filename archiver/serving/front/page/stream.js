// A streamed answer (Transfer-Encoding: chunked, from a handler that streams): shown as it arrives.
//
// A streaming handler's answer has no Content-Length; its chunks are read from the response's body as
// they come (fetch + ReadableStream), text is appended to the card as each arrives, and the whole answer
// is kept for the download. Answers with a length are read whole, as before.

import { download, h } from "/page/dom.js";

const MAX_TEXT_SHOWN = 200000; // characters shown as they come; the rest is in the download

export function isStreamed(response) {
  return response.ok && response.body && !response.headers.get("Content-Length");
}

// Reads a streamed answer into the card; returns {blob, firstMs} (ms from `started` to the first chunk).
export async function readStreamed(card, response, started) {
  const type = response.headers.get("Content-Type") || "application/octet-stream";
  const text = h("pre", { class: "answer-text answer-stream", "aria-live": "polite", "aria-busy": "true" });
  const progress = h("p", { class: "stream-progress" }, "streaming…");
  card.result.append(progress, text);
  const decoder = new TextDecoder();
  const reader = response.body.getReader();
  const chunks = [];
  let shown = 0;
  let firstMs = null;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    if (firstMs === null) firstMs = performance.now() - started;
    chunks.push(value);
    const piece = decoder.decode(value, { stream: true });
    if (shown < MAX_TEXT_SHOWN) {
      text.append(piece.slice(0, MAX_TEXT_SHOWN - shown));
      shown += piece.length;
    }
    progress.textContent = `streaming… ${chunks.length} chunk${chunks.length === 1 ? "" : "s"}`;
  }
  text.append(decoder.decode());
  text.setAttribute("aria-busy", "false");
  const blob = new Blob(chunks, { type });
  progress.textContent = `streamed in ${chunks.length} chunk${chunks.length === 1 ? "" : "s"}`;
  card.result.append(download(card, blob, "answer.txt"));
  return { blob, firstMs };
}
