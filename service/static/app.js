// The drawing page of `sbir serve`: draw on a canvas, search as you draw, see the matching photos.
//
// The drawing is a vector model: a list of actions, each a stroke {tool, width, points} in a fixed
// 1000 x 1000 frame (so a resize or a different screen never changes it) or a "clear" marker.
// The canvas is always redrawn from that list, which makes undo and redo exact. Eraser strokes are
// strokes too; before a search they are applied to the pen strokes drawn before them (each pen line
// is cut where an eraser passed over it) and the pieces are sent as QuickDraw vectors, so what is
// searched is what is seen. No build step, no dependencies: plain browser JavaScript in ES modules
// (geometry.js: the pure geometry; results.js: a result's tile; this one: the page's state and events).

import { FRAME, isStroke, queryStrokes, strokesAfterLastClear, toFrame } from "./geometry.js";
import { tile } from "./results.js";

const STORE_KEY = "sbir.drawing.v1";
const SEARCH_DELAY_MS = 300; // after a stroke ends
const MIN_STEP = 1.5; // frame units between recorded points
const INK = "#111418";
const INFO_POLL_MS = 30000;
const RETRY_MAX_MS = 15000;
const SEARCH_TIMEOUT_MS = 30000;
const DEFAULT_WIDTHS = { pen: 12, eraser: 48 };

const $ = (id) => document.getElementById(id);
const canvas = $("canvas");
const ctx = canvas.getContext("2d");
const ui = {
  stage: $("stage"), hint: $("hint"), pen: $("pen"), eraser: $("eraser"), width: $("width"),
  widthValue: $("width-value"), undo: $("undo"), redo: $("redo"),
  clear: $("clear"), count: $("stroke-count"), upload: $("upload"), file: $("file"),
  status: $("status"), statusText: $("status-text"), retry: $("retry"), serving: $("info-serving"),
  timing: $("info-timing"), query: $("query"), k: $("k"), empty: $("empty"), grid: $("grid"),
  more: $("more"),
};

// ---- state ---------------------------------------------------------------------------------
const doc = { actions: [], redo: [] };
const prefs = { tool: "pen", widths: { ...DEFAULT_WIDTHS }, k: null };
let info = null; // last GET /info answer
let limits = { default_k: 24, max_k: 100, max_thumbnail: 1024 };
let active = null; // the stroke being drawn: {pointerId, stroke}
let query = { kind: "drawing" }; // or {kind: "file", file, previewUrl}
let searchTimer = 0;
let retryTimer = 0;
let retryDelay = 0;
let inFlight = null; // AbortController of the newest request
let sequence = 0;
let infoStale = false; // the server was unreachable: ask /info again once it answers

/** Strokes on the canvas now: those after the last clear. */
const visibleStrokes = () => strokesAfterLastClear(doc.actions);

// ---- persistence: the drawing survives a reload --------------------------------------------
function save() {
  const data = { v: 1, actions: doc.actions, redo: doc.redo, tool: prefs.tool, widths: prefs.widths, k: prefs.k };
  try {
    localStorage.setItem(STORE_KEY, JSON.stringify(data));
  } catch {
    try { // too large for the quota: keep at least what is visible
      localStorage.setItem(STORE_KEY, JSON.stringify({ ...data, actions: visibleStrokes(), redo: [] }));
    } catch { /* storage disabled: the drawing lives as long as the tab */ }
  }
}

function restore() {
  let data;
  try { data = JSON.parse(localStorage.getItem(STORE_KEY) || "null"); } catch { return; }
  if (!data || data.v !== 1) return;
  const valid = (list) => Array.isArray(list) && list.every((a) => (a && a.clear === true) || isStroke(a));
  if (valid(data.actions)) doc.actions = data.actions;
  if (valid(data.redo)) doc.redo = data.redo;
  if (data.tool === "pen" || data.tool === "eraser") prefs.tool = data.tool;
  for (const t of ["pen", "eraser"]) {
    const w = data.widths && data.widths[t];
    if (Number.isFinite(w) && w >= 1 && w <= 200) prefs.widths[t] = w;
  }
  if (Number.isInteger(data.k) && data.k > 0) prefs.k = data.k;
}

// ---- canvas: size, coordinates, drawing ----------------------------------------------------
/** Match the backing store to the CSS size times devicePixelRatio, then redraw from the model. */
function fitCanvas() {
  const rect = canvas.getBoundingClientRect();
  const dpr = window.devicePixelRatio || 1;
  const w = Math.max(1, Math.round(rect.width * dpr));
  const h = Math.max(1, Math.round(rect.height * dpr));
  if (canvas.width !== w || canvas.height !== h) {
    canvas.width = w;
    canvas.height = h;
    redraw();
  }
}

function watchPixelRatio() {
  const mq = window.matchMedia(`(resolution: ${window.devicePixelRatio || 1}dppx)`);
  mq.addEventListener("change", () => { fitCanvas(); watchPixelRatio(); }, { once: true });
}

/** A pointer event's position in the drawing frame, clamped to the visible canvas. */
const frameOf = (e) => toFrame(e.clientX, e.clientY, canvas.getBoundingClientRect());

/** Draw `stroke` from point `from` on (0: all of it; more: only the newest segments). */
function paint(stroke, from = 0) {
  const sx = canvas.width / FRAME;
  const sy = canvas.height / FRAME;
  const pts = stroke.points;
  ctx.globalCompositeOperation = stroke.tool === "eraser" ? "destination-out" : "source-over";
  ctx.strokeStyle = INK;
  ctx.fillStyle = INK;
  ctx.lineWidth = stroke.width * sx;
  ctx.lineCap = "round";
  ctx.lineJoin = "round";
  if (pts.length === 1 || from >= pts.length - 1) {
    const [x, y] = pts[pts.length - 1];
    if (pts.length === 1) {
      ctx.beginPath();
      ctx.arc(x * sx, y * sy, (stroke.width * sx) / 2, 0, Math.PI * 2);
      ctx.fill();
    }
    return;
  }
  ctx.beginPath();
  const start = Math.max(0, from - 1);
  ctx.moveTo(pts[start][0] * sx, pts[start][1] * sy);
  for (let i = start + 1; i < pts.length; i++) ctx.lineTo(pts[i][0] * sx, pts[i][1] * sy);
  ctx.stroke();
}

function redraw() {
  ctx.globalCompositeOperation = "source-over";
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  for (const s of visibleStrokes()) paint(s);
  if (active) paint(active.stroke);
}

// ---- pointer input (mouse, touch, stylus) --------------------------------------------------
canvas.addEventListener("pointerdown", (e) => {
  if (active || (e.pointerType === "mouse" && e.button !== 0)) return;
  e.preventDefault(); // no text selection, no focus change, no emulated mouse events
  // Shortcuts should reach the page, not a control focused earlier (a select would eat "e").
  if (document.activeElement instanceof HTMLElement && document.activeElement !== canvas) document.activeElement.blur();
  try { canvas.setPointerCapture(e.pointerId); } catch { /* synthetic or already gone */ }
  // A stylus' eraser end (button 5) erases whatever tool is selected.
  const tool = e.pointerType === "pen" && (e.button === 5 || (e.buttons & 32)) ? "eraser" : prefs.tool;
  active = { pointerId: e.pointerId, stroke: { tool, width: prefs.widths[tool], points: [frameOf(e)] } };
  clearTimeout(searchTimer); // no search in the middle of a stroke
  ui.hint.hidden = true;
  paint(active.stroke);
});

canvas.addEventListener("pointermove", (e) => {
  if (!active || e.pointerId !== active.pointerId) return;
  e.preventDefault();
  const pts = active.stroke.points;
  const before = pts.length;
  const events = typeof e.getCoalescedEvents === "function" ? e.getCoalescedEvents() : [];
  for (const ev of events.length ? events : [e]) {
    const p = frameOf(ev);
    const last = pts[pts.length - 1];
    if (Math.hypot(p[0] - last[0], p[1] - last[1]) >= MIN_STEP) pts.push(p);
  }
  if (pts.length > before) paint(active.stroke, before);
});

function endStroke(e) {
  if (!active || e.pointerId !== active.pointerId) return;
  const { stroke } = active;
  active = null;
  doc.actions.push(stroke);
  doc.redo = [];
  changed();
}
canvas.addEventListener("pointerup", endStroke);
canvas.addEventListener("pointercancel", endStroke); // keep what was drawn before the cancel
canvas.addEventListener("lostpointercapture", endStroke);
canvas.addEventListener("contextmenu", (e) => e.preventDefault());

// ---- commands ------------------------------------------------------------------------------
function changed() {
  save();
  redraw();
  updateControls();
  query = dropFileQuery();
  scheduleSearch();
}

function undo() {
  if (active || !doc.actions.length) return;
  doc.redo.push(doc.actions.pop());
  changed();
}

function redo() {
  if (active || !doc.redo.length) return;
  doc.actions.push(doc.redo.pop());
  changed();
}

function clearDrawing() {
  if (active || !visibleStrokes().length) return;
  doc.actions.push({ clear: true });
  doc.redo = [];
  changed();
}

function setTool(tool) {
  prefs.tool = tool;
  save();
  updateControls();
}

function setWidth(w) {
  prefs.widths[prefs.tool] = Math.min(Number(ui.width.max), Math.max(Number(ui.width.min), Math.round(w)));
  save();
  updateControls();
}

function updateControls() {
  const strokes = visibleStrokes();
  const n = strokes.length;
  const pens = strokes.filter((s) => s.tool === "pen").length;
  ui.pen.setAttribute("aria-pressed", String(prefs.tool === "pen"));
  ui.eraser.setAttribute("aria-pressed", String(prefs.tool === "eraser"));
  ui.stage.classList.toggle("erasing", prefs.tool === "eraser");
  ui.width.setAttribute("aria-label", prefs.tool === "pen" ? "Pen width" : "Eraser width");
  ui.width.value = String(prefs.widths[prefs.tool]);
  ui.widthValue.textContent = String(prefs.widths[prefs.tool]);
  ui.undo.disabled = doc.actions.length === 0;
  ui.redo.disabled = doc.redo.length === 0;
  ui.clear.disabled = n === 0;
  ui.hint.hidden = n > 0 || !!active;
  const text = n === 0 ? "No strokes yet" : `${n} stroke${n === 1 ? "" : "s"}` +
    (n > pens ? ` (${n - pens} eraser)` : "");
  ui.count.textContent = text;
  canvas.dataset.strokes = String(n);
  canvas.setAttribute("aria-label", n === 0 ? "Drawing canvas, empty" : `Drawing canvas, ${text}`);
}

ui.pen.addEventListener("click", () => setTool("pen"));
ui.eraser.addEventListener("click", () => setTool("eraser"));
ui.width.addEventListener("input", () => setWidth(Number(ui.width.value)));
ui.undo.addEventListener("click", undo);
ui.redo.addEventListener("click", redo);
ui.clear.addEventListener("click", clearDrawing);

document.addEventListener("keydown", (e) => {
  const t = e.target;
  const typing = t instanceof Element &&
    !!t.closest("textarea, select, [contenteditable], input:not([type=range]):not([type=button]):not([type=file])");
  const key = e.key.toLowerCase();
  if ((e.ctrlKey || e.metaKey) && !e.altKey) {
    if (typing) return;
    if (key === "z" && !e.shiftKey) undo();
    else if ((key === "z" && e.shiftKey) || (key === "y" && !e.shiftKey)) redo();
    else return;
    e.preventDefault();
    return;
  }
  if (typing || e.altKey || (e.repeat && (key === "delete" || key === "backspace"))) return;
  if (key === "p") setTool("pen");
  else if (key === "e") setTool("eraser");
  else if (key === "[") setWidth(prefs.widths[prefs.tool] - 2);
  else if (key === "]") setWidth(prefs.widths[prefs.tool] + 2);
  else if (key === "delete" || key === "backspace") clearDrawing();
  else return;
  e.preventDefault();
});

// ---- search ----------------------------------------------------------------------------------
function dropFileQuery() {
  if (query.kind === "file" && query.previewUrl) URL.revokeObjectURL(query.previewUrl);
  return { kind: "drawing" };
}

function scheduleSearch(delay = SEARCH_DELAY_MS) {
  clearTimeout(searchTimer);
  clearTimeout(retryTimer);
  retryDelay = 0;
  searchTimer = setTimeout(search, delay);
}

function currentK() {
  const k = prefs.k || limits.default_k;
  return Math.max(1, Math.min(k, limits.max_k));
}

function search() {
  clearTimeout(searchTimer);
  clearTimeout(retryTimer);
  if (query.kind === "file") {
    const form = new FormData();
    form.append("file", query.file, query.file.name || "sketch.png");
    send(form, `your file ${query.file.name || "(unnamed)"}`);
    return;
  }
  const strokes = visibleStrokes();
  const vectors = queryStrokes(strokes);
  if (!vectors.length) {
    if (inFlight) inFlight.abort();
    inFlight = null;
    sequence++;
    showResults(null);
    setStatus(strokes.length ? "Everything is erased: nothing to search." : "Draw something to search.");
    return;
  }
  const n = strokes.length;
  send(JSON.stringify({ strokes: vectors }), `your drawing (${n} stroke${n === 1 ? "" : "s"})`, "application/json");
}

async function send(body, what, contentType) {
  if (inFlight) inFlight.abort(); // a newer query makes the running one stale
  const controller = new AbortController();
  inFlight = controller;
  const mine = ++sequence;
  const started = performance.now();
  let timedOut = false;
  const timer = setTimeout(() => { timedOut = true; controller.abort(); }, SEARCH_TIMEOUT_MS);
  setStatus(`Searching with ${what}…`, "busy");
  ui.grid.setAttribute("aria-busy", "true");
  let res;
  let data = null;
  try {
    const headers = contentType ? { "Content-Type": contentType } : {};
    res = await fetch(`search?k=${currentK()}`, { method: "POST", body, headers, signal: controller.signal });
    try { data = await res.json(); } catch (err) { if (err.name === "AbortError") throw err; }
  } catch (err) {
    if ((err.name === "AbortError" && !timedOut) || mine !== sequence) return;
    ui.grid.removeAttribute("aria-busy");
    setStatus(timedOut
      ? `The server did not answer within ${SEARCH_TIMEOUT_MS / 1000} s. Your drawing is kept.`
      : `Cannot reach the server (${err.message}). Your drawing is kept; retry when the server is back.`,
    "error", true);
    infoStale = true;
    return;
  } finally {
    clearTimeout(timer);
  }
  if (mine !== sequence) return;
  inFlight = null;
  ui.grid.removeAttribute("aria-busy");
  const rtt = performance.now() - started;
  if (!res.ok) {
    const message = (data && data.error && data.error.message) || `${res.status} ${res.statusText || "error"}`;
    const code = data && data.error && data.error.code;
    if (res.status === 503) {
      retryDelay = Math.min(RETRY_MAX_MS, Math.max(1000, Number(res.headers.get("Retry-After")) * 1000 || 1000,
        retryDelay * 2));
      const what503 = code === "not-ready" ? "Nothing is indexed yet" : "The server is busy";
      setStatus(`${what503}: ${message}. Retrying in ${Math.round(retryDelay / 1000)} s.`, "error", true);
      retryTimer = setTimeout(search, retryDelay);
      loadInfo();
    } else {
      setStatus(`The server refused the search (${res.status}): ${message}`, "error", query.kind === "drawing");
    }
    return;
  }
  if (!data || !Array.isArray(data.results)) {
    setStatus(`The server's answer is not a search result (${res.status}).`, "error", true);
    return;
  }
  retryDelay = 0;
  showResults(data, what);
  const n = data.results.length;
  setStatus(n ? `${n} photo${n === 1 ? "" : "s"} for ${what}.` : `No photos matched ${what}.`);
  const server = data.timings_ms && data.timings_ms.total;
  ui.timing.textContent = `Last search ${Math.round(rtt)} ms` +
    (Number.isFinite(server) ? ` (server ${Math.round(server)} ms)` : "") + ".";
  if (infoStale || !info || !info.snapshot || info.snapshot.id !== data.snapshot) loadInfo();
}

function setStatus(text, kind = "", retry = false) {
  ui.statusText.textContent = text;
  ui.status.className = `status ${kind}`;
  ui.retry.hidden = !retry;
}

ui.retry.addEventListener("click", () => { retryDelay = 0; search(); });

// ---- results -------------------------------------------------------------------------------
function showResults(data, what = "") {
  const results = data ? data.results : [];
  ui.grid.replaceChildren(...results.map((r) => tile(r, limits.max_thumbnail)));
  ui.grid.dataset.snapshot = data ? data.snapshot : "";
  ui.empty.hidden = results.length > 0;
  ui.empty.textContent = data ? "No photos matched." : "The photos that match your sketch appear here, best first.";
  const k = currentK();
  const total = info && info.snapshot ? info.snapshot.photos : Infinity;
  ui.more.hidden = !data || results.length < k || k >= limits.max_k || k >= total;
  ui.query.replaceChildren();
  if (data && query.kind === "file") {
    const img = document.createElement("img");
    img.src = query.previewUrl;
    img.alt = "";
    ui.query.append(img);
  }
  if (data) ui.query.append(document.createTextNode(`for ${what}`));
}

// ---- k -------------------------------------------------------------------------------------
function kOptions() {
  const opts = new Set([8, 16, limits.default_k, 48, 96, limits.max_k].filter((k) => k >= 1 && k <= limits.max_k));
  if (prefs.k && prefs.k <= limits.max_k) opts.add(prefs.k);
  return [...opts].sort((a, b) => a - b);
}

function fillK() {
  const k = currentK();
  ui.k.replaceChildren(...kOptions().map((v) => {
    const o = document.createElement("option");
    o.value = String(v);
    o.textContent = `${v} photos`;
    o.selected = v === k;
    return o;
  }));
}

function setK(k) {
  prefs.k = k;
  save();
  fillK();
  search();
}

ui.k.addEventListener("change", () => setK(Number(ui.k.value)));
ui.more.addEventListener("click", () => {
  const k = currentK();
  const next = kOptions().find((v) => v > k);
  if (next) setK(next);
});

// ---- uploads -------------------------------------------------------------------------------
function searchFile(file) {
  if (!file) return;
  dropFileQuery();
  query = { kind: "file", file, previewUrl: URL.createObjectURL(file) };
  search();
}

ui.upload.addEventListener("click", () => ui.file.click());
ui.file.addEventListener("change", () => {
  searchFile(ui.file.files[0]);
  ui.file.value = ""; // the same file can be chosen again
});
for (const type of ["dragenter", "dragover"]) {
  ui.stage.addEventListener(type, (e) => {
    if (!e.dataTransfer || ![...e.dataTransfer.types].includes("Files")) return;
    e.preventDefault();
    e.dataTransfer.dropEffect = "copy";
    ui.stage.classList.add("dropping");
  });
}
ui.stage.addEventListener("dragleave", () => ui.stage.classList.remove("dropping"));
ui.stage.addEventListener("drop", (e) => {
  e.preventDefault();
  ui.stage.classList.remove("dropping");
  searchFile(e.dataTransfer && e.dataTransfer.files[0]);
});

// ---- what am I looking at: GET /info -----------------------------------------------------------
async function loadInfo() {
  let data;
  try {
    const res = await fetch("info", { cache: "no-store" });
    data = await res.json();
  } catch (err) {
    ui.serving.textContent = `Cannot reach the server (${err.message}).`;
    infoStale = true;
    return;
  }
  info = data;
  infoStale = false;
  if (data.limits) limits = { ...limits, ...data.limits };
  fillK();
  if (!data.ready || !data.snapshot) {
    const err = data.last_reload_error; // {snapshot, at, reason, message}
    const why = err && (typeof err === "object" ? err.message : String(err));
    ui.serving.textContent = "No snapshot is served yet" +
      (why ? `: ${why}` : " (waiting for an index to be published).");
    return;
  }
  const m = data.model || {};
  const backbone = m.backbone && typeof m.backbone === "object" ? m.backbone.name : m.backbone;
  const parts = [backbone, m.embedding, m.dim && `${m.dim}-d`, m.device].filter(Boolean).join(", ");
  ui.serving.textContent = `Snapshot ${data.snapshot.id} · model ${String(m.sha256 || "?").slice(0, 12)}` +
    (parts ? ` (${parts})` : "") + ` · ${Number(data.snapshot.photos).toLocaleString("en")} photos indexed.`;
}

// ---- start -----------------------------------------------------------------------------------
restore();
updateControls();
fillK();
new ResizeObserver(fitCanvas).observe(canvas);
window.addEventListener("resize", fitCanvas);
watchPixelRatio();
fitCanvas();
loadInfo().then(() => {
  if (visibleStrokes().length) scheduleSearch(0);
});
setInterval(() => { if (document.visibilityState === "visible") loadInfo(); }, INFO_POLL_MS);
