// BentoSVD's web page: pick an image and see it as the model will, set the parameters that
// GET /info describes (their bounds and defaults come from the server, never from here),
// run it as a job (POST /jobs), watch its progress, then play and download the video.
"use strict";

const POLL_MS = 500;
const PLAYABLE = ["mp4", "webm"]; // formats for <video>; gif and webp play in an <img>

const $ = (id) => document.getElementById(id);
let info = null; // GET /info
let image = null; // {file, bitmap}: bitmap is null when the browser cannot decode the file
let job = null; // the job being watched: {id, url, cancelling, stem}
let videoUrl = null; // object URL of the shown video (kept for the session's strip)

class ServerError extends Error {
  constructor(status, body, retryAfter) {
    super(describe(status, body));
    this.status = status;
    this.fix = body?.fix;
    this.retryAfter = retryAfter;
  }
}

// Our own errors carry `message` (and maybe `fix`); BentoML's schema validation answers
// with `detail`, a list of {loc, msg}.
function describe(status, body) {
  if (body?.message) return body.message;
  if (Array.isArray(body?.detail)) {
    return body.detail.map((d) => `${(d.loc || []).join(".")}: ${d.msg}`).join("; ");
  }
  return `The server answered ${status}.`;
}

// With API_KEYS set on the server every call needs `Authorization: Bearer <key>`: the page
// asks for the key on the first 401 and keeps it for this tab's session (sessionStorage).
const KEY_STORE = "bentosvd-api-key";

function withKey(options = {}) {
  const key = sessionStorage.getItem(KEY_STORE);
  if (!key) return options;
  return { ...options, headers: { ...(options.headers || {}), Authorization: `Bearer ${key}` } };
}

async function request(url, options) {
  const response = await fetch(url, withKey(options));
  if (!response.ok) {
    const body = await response.json().catch(() => null);
    if (response.status === 401) askForKey(body);
    throw new ServerError(response.status, body, response.headers.get("Retry-After"));
  }
  return response;
}

function askForKey(body) {
  const had = sessionStorage.getItem(KEY_STORE) !== null;
  sessionStorage.removeItem(KEY_STORE);
  $("key-problem").textContent = had ? "The server did not accept that key." : "";
  $("key-problem").hidden = !had;
  $("key-form").hidden = false;
  $("key").focus();
}

$("key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  sessionStorage.setItem(KEY_STORE, $("key").value.trim());
  $("key").value = "";
  $("key-form").hidden = true;
  hideError();
  if (info === null) init(); // the settings could not be read without it
});

const getJSON = async (url, options) => (await request(url, options)).json();
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

init();

async function init() {
  try {
    info = await getJSON("/info");
  } catch (e) {
    $("model").textContent = e.status === 401
      ? "The server needs an API key to show its settings."
      : "The server's settings could not be read; reload to try again.";
    return showError(e);
  }
  $("model").textContent = `Model ${info.model}: ${info.num_frames} frames from a ` +
    `${info.width}×${info.height} image (portrait: ${info.height}×${info.width}), ` +
    `${info.num_inference_steps} denoising steps.`;
  if (info.warning) {
    $("warning").textContent = `Warning: ${info.warning}`;
    $("warning").hidden = false;
  }
  buildParams(info.params);
  wireImagePicker();
  $("form").addEventListener("submit", (e) => {
    e.preventDefault();
    submit();
  });
  $("cancel").addEventListener("click", cancel);
  updateButtons();
}

// --- parameters ---------------------------------------------------------------------

// Pydantic writes an optional field as anyOf [{type: ...}, {type: "null"}].
function flatten(schema) {
  const branch = (schema.anyOf || []).find((s) => s.type !== "null") || {};
  return { ...branch, ...schema };
}

// What a person calls each param; the API's name stays beside it in small type. A param
// not listed here (a newer server's) shows its API name, under Advanced.
const LABELS = {
  motion_bucket_id: "Motion",
  seed: "Seed",
  format: "Format",
  num_frames: "Frames",
  interpolate_fps: "Smooth to (fps)",
  interpolation: "Smoothing method",
  fps_id: "Frame rate",
  cond_aug: "Noise on the image",
  decoding_t: "Frames decoded at a time",
  boomerang: "Play forward, then back",
  num_inference_steps: "Denoising steps",
  min_guidance_scale: "Guidance, first frame",
  max_guidance_scale: "Guidance, last frame",
  sizing: "Fit the image",
  orientation: "Orientation",
};
// Always in view: how much it moves, which video, how long and how smooth.
const ESSENTIALS = ["motion_bucket_id", "seed", "format", "num_frames", "interpolate_fps",
                    "interpolation"];

function buildParams(params) {
  for (const [name, raw] of Object.entries(params)) {
    const prop = flatten(raw);
    let input;
    if (prop.enum) {
      input = document.createElement("select");
      for (const value of prop.enum) input.add(new Option(value, value, false, value === prop.default));
    } else if (prop.type === "boolean") {
      input = document.createElement("input");
      input.type = "checkbox";
      input.checked = prop.default === true;
    } else {
      input = document.createElement("input");
      const numeric = prop.type === "integer" || prop.type === "number";
      input.type = numeric ? "number" : "text";
      if (numeric) input.step = prop.type === "integer" ? "1" : "any";
      if (prop.minimum !== undefined) input.min = prop.minimum;
      if (prop.maximum !== undefined) input.max = prop.maximum;
      input.value = prop.default ?? "";
      input.required = prop.default != null;
    }
    input.id = `param-${name}`;
    input.name = name;

    const row = document.createElement("div");
    row.className = "param";
    const label = document.createElement("label");
    label.htmlFor = input.id;
    label.append(LABELS[name] || name);
    if (LABELS[name]) {
      const api = document.createElement("code");
      api.className = "api-name";
      api.textContent = name;
      label.append(" ", api);
    }
    const bounds = document.createElement("span");
    bounds.className = "bounds";
    const range = prop.enum ? prop.enum.join(" | ")
      : prop.minimum !== undefined && prop.maximum !== undefined ? `${prop.minimum} to ${prop.maximum}` : "";
    const fallback = prop.default != null ? `default ${prop.default}` : name === "seed" ? "default random" : "";
    bounds.textContent = [range, fallback].filter(Boolean).join(", ");
    const help = document.createElement("p");
    help.className = "help";
    help.textContent = prop.description || "";
    row.append(label, input, bounds);
    if (name === "seed") row.append(randomizeToggle(input, prop.default == null));
    help.id = `help-${name}`;
    input.setAttribute("aria-describedby", help.id);
    row.append(help);
    $(ESSENTIALS.includes(name) ? "essentials" : "advanced-params").append(row);
  }
  $("param-sizing")?.addEventListener("change", drawPreview);
  // The smoothing method means something only with a frame rate to smooth to.
  const target = $("param-interpolate_fps"), method = $("param-interpolation");
  if (target && method) {
    const sync = () => { method.disabled = target.value === ""; };
    target.addEventListener("input", sync);
    sync();
  }
}

function paramInputs() {
  return document.querySelectorAll("#form .params [name]");
}

// "randomize" sends no seed, so the server picks one (and reports it).
function randomizeToggle(seedInput, checked) {
  const label = document.createElement("label");
  label.className = "toggle";
  const box = document.createElement("input");
  box.type = "checkbox";
  box.id = "randomize";
  box.checked = checked;
  label.htmlFor = box.id;
  const sync = () => {
    seedInput.disabled = box.checked;
    seedInput.required = !box.checked;
  };
  box.addEventListener("change", sync);
  sync();
  label.append(box, " randomize");
  return label;
}

function readParams() {
  const params = {};
  for (const input of paramInputs()) {
    if (input.type === "checkbox") params[input.name] = input.checked;
    else if (input.disabled || input.value === "") continue;
    else params[input.name] = input.type === "number" ? Number(input.value) : input.value;
  }
  return params;
}

// --- image --------------------------------------------------------------------------

function wireImagePicker() {
  const drop = $("drop");
  $("file").addEventListener("change", () => pick($("file").files[0]));
  drop.addEventListener("dragover", (e) => {
    e.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    pick(e.dataTransfer.files[0]);
  });
  // A drop that misses the zone would otherwise navigate away to the dropped file.
  window.addEventListener("dragover", (e) => e.preventDefault());
  window.addEventListener("drop", (e) => e.preventDefault());
}

async function pick(file) {
  if (!file) return;
  image = { file, bitmap: null };
  try {
    image.bitmap = await createImageBitmap(file); // upright by its EXIF orientation, as on the server
  } catch {
    // Not an image the browser reads: it is still sent, and the server's answer says why.
  }
  if (image.file !== file) return; // another file was picked meanwhile
  drawPreview();
  updateButtons();
}

// Draw the image as the server will size it: landscape and square images become
// width×height, portrait ones height×width; "crop" covers and cuts the centre, "pad" fits
// inside on black bars, "fit" stretches, "native" keeps the image's own size in 64s.
// Transparent pixels show over white, as there.
function drawPreview() {
  if (!image) return;
  const canvas = $("preview");
  const caption = $("preview-caption");
  $("preview-box").hidden = false;
  if (!image.bitmap) {
    canvas.width = canvas.height = 0;
    caption.textContent = `${image.file.name}: this browser cannot show it as an image.`;
    return;
  }
  const { width: w, height: h } = image.bitmap;
  const sizing = $("param-sizing")?.value || "crop";
  let [W, H] = w >= h ? [info.width, info.height] : [info.height, info.width];
  if (sizing === "native") {
    // The image's own size within the model's pixels, sides rounded down to 64s (then
    // covered and cut, as "crop"): bentosvd/media/images.py, native_size.
    const scale = Math.min(1, Math.sqrt((info.width * info.height) / (w * h)));
    [W, H] = [w, h].map((side) => Math.max(64, Math.floor((side * scale) / 64) * 64));
  }
  let [dw, dh] = [W, H];
  if (sizing !== "fit") {
    const scale = (sizing === "pad" ? Math.min : Math.max)(W / w, H / h);
    [dw, dh] = [w * scale, h * scale];
  }
  const [x, y] = [(W - dw) / 2, (H - dh) / 2];
  canvas.width = W;
  canvas.height = H;
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, W, H);
  ctx.fillStyle = "#fff";
  ctx.fillRect(x, y, dw, dh);
  ctx.imageSmoothingQuality = "high";
  ctx.drawImage(image.bitmap, x, y, dw, dh);
  caption.textContent = `${image.file.name}, ${w}×${h} → ${W}×${H} (${sizing}), as the model sees it`;
}

// --- job ----------------------------------------------------------------------------

async function submit() {
  if (!image || job) return;
  hideError();
  $("result").hidden = true;
  const form = new FormData();
  form.append("img", image.file, image.file.name);
  const params = readParams();
  form.append("params", JSON.stringify(params));
  // The download's name: the image's, less its extension (another image may be picked meanwhile).
  job = { id: null, url: null, cancelling: false, params,
          stem: image.file.name.replace(/\.[^.]*$/, "") || "video" };
  updateButtons();
  showProgress({ status: "uploading" });
  try {
    let state = await getJSON("/jobs", { method: "POST", body: form });
    job.id = state.id;
    job.url = state.status_url || `/jobs/${state.id}`;
    if (job.cancelling) await sendCancel(); // Cancel was pressed during the upload
    let misses = 0;
    for (;;) {
      showProgress(state);
      if (state.status === "succeeded") return await showResult(state);
      if (state.status === "failed") throw new ServerError(500, state.error);
      if (state.status === "cancelled") return;
      await sleep(POLL_MS);
      try {
        state = await getJSON(job.url);
        misses = 0;
      } catch (e) {
        if (e instanceof ServerError || ++misses > 5) throw e; // else a network blip: poll again
      }
    }
  } catch (e) {
    showProgress({ status: "failed" });
    showError(e);
  } finally {
    job = null;
    updateButtons();
  }
}

async function cancel() {
  if (!job || job.cancelling) return;
  job.cancelling = true;
  updateButtons();
  showProgress({ status: "cancelling" });
  if (job.id) await sendCancel();
}

async function sendCancel() {
  try {
    await request(job.url, { method: "DELETE" });
  } catch (e) {
    if (e.status !== 409) showError(e); // 409: it finished first; the next poll shows how
  }
}

function showProgress(state) {
  const steps = state.total_steps || info.num_inference_steps;
  const step = state.step || 0;
  const ahead = state.queue_position;
  const texts = {
    uploading: "Uploading the image…",
    queued: ahead ? `Queued: ${ahead} job${ahead === 1 ? "" : "s"} ahead` : "Queued: next in line",
    running: step < steps ? `Step ${step} of ${steps}` : "Decoding and encoding the video…",
    succeeded: "Done",
    failed: "Failed",
    cancelling: "Cancelling…",
    cancelled: "Cancelled",
  };
  const active = ["uploading", "queued", "running"].includes(state.status);
  const status = active && job?.cancelling ? "cancelling" : state.status;
  $("job").hidden = false;
  $("status").textContent = texts[status] || status;
  $("status").dataset.status = status;
  const progress = $("progress");
  progress.max = steps;
  if (status === "running" || status === "succeeded") progress.value = status === "running" ? step : steps;
  else if (active) progress.removeAttribute("value"); // indeterminate while waiting
}

async function showResult(state) {
  const response = await request(state.result_url || `${job.url}/result`);
  const blob = await response.blob();
  const seed = state.seed ?? response.headers.get("X-Seed");
  const format = state.format || "mp4";
  // Not revoked when the next one comes: this session's strip keeps showing it.
  videoUrl = URL.createObjectURL(blob);

  const media = document.createElement(PLAYABLE.includes(format) ? "video" : "img");
  if (media.tagName === "VIDEO") {
    Object.assign(media, { controls: true, loop: true, autoplay: true, muted: true, playsInline: true });
  }
  describeMedia(media, seed);
  media.id = "video";
  media.src = videoUrl;
  $("player").replaceChildren(media);

  $("download").href = videoUrl;
  $("download").download = `${job.stem}-${info.model}-seed${seed}.${format}`;
  const smoothed = response.headers.get("X-Interpolation"); // e.g. "rife 7->14 fps"
  $("seed").textContent = `Seed used: ${seed}` + (smoothed ? `, smoothed: ${smoothed}` : "");
  $("seed").dataset.seed = seed;
  if ($("randomize")?.checked) $("param-seed").value = seed; // untick "randomize" to reuse it
  $("result").hidden = false;
  remember(state, seed, format, job.params);
}

// --- this session's videos -------------------------------------------------------------

// Each finished video stays in a strip beside the current one, with its seed and params and
// a button that puts those settings back in the form (kept in this page only).
function remember(state, seed, format, params) {
  const item = document.createElement("li");
  const media = $("player").firstElementChild.cloneNode();
  media.removeAttribute("id");
  if (media.tagName === "VIDEO") media.controls = false;
  describeMedia(media, seed);
  const caption = document.createElement("p");
  const shown = Object.entries({ ...params, seed }).map(([k, v]) => `${k} ${v}`).join(", ");
  caption.textContent = `${job.stem}: ${shown}`;
  const again = document.createElement("button");
  again.type = "button";
  again.className = "again";
  again.textContent = "Use these settings again";
  again.setAttribute("aria-label", `Use these settings again (seed ${seed})`); // one of several
  again.addEventListener("click", () => applyParams({ ...params, seed }));
  item.append(media, caption, again);
  item.dataset.seed = seed;
  item.dataset.format = format;
  $("history-list").prepend(item);
  $("history").hidden = false;
}

// What a screen reader says for a video: a <video>'s aria-label, an <img>'s (GIF, WebP) alt.
function describeMedia(media, seed) {
  const text = `Generated video, seed ${seed}`;
  if (media.tagName === "IMG") media.alt = text;
  else media.setAttribute("aria-label", text);
}

function applyParams(params) {
  for (const input of paramInputs()) {
    if (!(input.name in params)) continue;
    if (input.type === "checkbox") input.checked = Boolean(params[input.name]);
    else input.value = params[input.name] ?? "";
  }
  $("param-interpolate_fps")?.dispatchEvent(new Event("input"));
  if ("seed" in params && $("randomize")) {
    $("randomize").checked = false;
    $("randomize").dispatchEvent(new Event("change"));
  }
  drawPreview();
}

// --- errors and buttons --------------------------------------------------------------

function showError(e) {
  let message = e instanceof ServerError ? e.message : `Could not reach the server (${e.message}).`;
  if (e.retryAfter) message += ` Try again in ${e.retryAfter} s.`;
  $("error-message").textContent = message;
  $("error-fix").textContent = e.fix ? `Fix: ${e.fix}` : "";
  $("error-fix").hidden = !e.fix;
  $("error").hidden = false;
}

function hideError() {
  $("error").hidden = true;
}

function updateButtons() {
  $("submit").disabled = !info || !image || job !== null;
  $("cancel").disabled = job === null || job.cancelling;
}
