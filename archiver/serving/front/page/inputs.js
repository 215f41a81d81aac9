// What a model's handler reads and what a chosen file is: the file picker's hints, the sentence for a
// file a built-in handler cannot read, and the body and content type a file or typed text is sent with.

const IMAGE_KINDS = new Set(["image_classifier", "object_detector", "image_segmenter"]);
const TEXT_EXTENSIONS = /\.(txt|text|csv|tsv|md|json|jsonl)$/i;
const IMAGE_EXTENSIONS = /\.(jpe?g|png|gif|webp|bmp)$/i;

export function inputKinds(model) {
  // What the model's handler reads, to guide the file picker (a person may still choose anything).
  if (IMAGE_KINDS.has(model.kind)) return { accept: "image/*", hint: "an image: JPEG, PNG, WebP, GIF, BMP" };
  if (model.kind === "text_classifier") return { accept: "text/*,.txt", hint: "a text file, or type below" };
  return { accept: "image/*,text/*,.txt,.json,application/json", hint: "an image, a text file or JSON" };
}

export function fileKind(file) {
  const type = (file.type || "").toLowerCase();
  if (type.startsWith("image/") || (!type && IMAGE_EXTENSIONS.test(file.name))) return "image";
  if (type === "application/json" || /\.jsonl?$/i.test(file.name)) return "json";
  if (type.startsWith("text/") || (!type && TEXT_EXTENSIONS.test(file.name))) return "text";
  return null;
}

export function unsupportedMessage(model, file, kind) {
  // A built-in handler reads one kind of input: say so before sending it something else. A handler of
  // the archive's own is sent any file, and answers for itself.
  const reads = IMAGE_KINDS.has(model.kind) ? ["image", "json"] : model.kind === "text_classifier" ? ["text"] : null;
  if (!reads || reads.includes(kind)) return null;
  const what = { image: "an image", text: "text", json: "JSON" }[kind] ||
    (file.type ? `a file of type ${file.type}` : "a file of unknown type");
  const wants = reads[0] === "image" ? "images" : "text";
  return `${model.name} (${model.kind.replace("_", " ")}) reads ${wants}; ${file.name} is ${what}. ` +
    `Send other files with curl -T FILE ${location.origin}/predictions/${model.name}`;
}

export function requestBody(chosen, text) {
  if (chosen) {
    const { file, kind } = chosen;
    const type = file.type || (kind === "json" ? "application/json" : kind === "text" ? "text/plain" : "application/octet-stream");
    return { body: file, type, image: kind === "image" ? file : null };
  }
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
