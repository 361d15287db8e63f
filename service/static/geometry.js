// The drawing page's geometry, pure functions of numbers and point lists (no DOM, no state), so
// that tests can check each on its own (tests/test_service_page.py imports this module in the
// browser). A drawing is a list of actions: strokes {tool: "pen" | "eraser", width, points: [[x, y],
// ...]} in a FRAME x FRAME frame, and {clear: true} markers.

export const FRAME = 1000; // logical drawing frame, both axes (the canvas is square)
export const SIMPLIFY = 0.8; // Ramer-Douglas-Peucker tolerance (frame units) for what is sent

/** Strokes on the canvas now: those after the last clear. */
export function strokesAfterLastClear(actions) {
  let start = 0;
  for (let i = actions.length - 1; i >= 0; i--) {
    if (actions[i].clear) { start = i + 1; break; }
  }
  return actions.slice(start);
}

/** Whether `a` is a well-formed stroke (what a stored drawing must hold). */
export function isStroke(a) {
  return !!a && (a.tool === "pen" || a.tool === "eraser") && Number.isFinite(a.width) &&
    Array.isArray(a.points) && a.points.length > 0 &&
    a.points.every((p) => Array.isArray(p) && p.length === 2 && p.every(Number.isFinite));
}

/** A client position in the drawing frame, clamped to `rect` (the canvas' client rectangle), to 0.1. */
export function toFrame(clientX, clientY, rect) {
  const clamp = (v) => Math.min(FRAME, Math.max(0, v));
  const x = clamp(((clientX - rect.left) / rect.width) * FRAME);
  const y = clamp(((clientY - rect.top) / rect.height) * FRAME);
  return [Math.round(x * 10) / 10, Math.round(y * 10) / 10];
}

export function distToSegment(p, a, b) {
  const dx = b[0] - a[0];
  const dy = b[1] - a[1];
  const len2 = dx * dx + dy * dy;
  let t = len2 ? ((p[0] - a[0]) * dx + (p[1] - a[1]) * dy) / len2 : 0;
  t = Math.max(0, Math.min(1, t));
  return Math.hypot(p[0] - (a[0] + t * dx), p[1] - (a[1] + t * dy));
}

export function bounds(points, pad) {
  let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
  for (const [x, y] of points) {
    x0 = Math.min(x0, x); y0 = Math.min(y0, y); x1 = Math.max(x1, x); y1 = Math.max(y1, y);
  }
  return [x0 - pad, y0 - pad, x1 + pad, y1 + pad];
}

export const overlaps = (a, b) => a[0] <= b[2] && b[0] <= a[2] && a[1] <= b[3] && b[1] <= a[3];
export const inside = (p, b) => p[0] >= b[0] && p[0] <= b[2] && p[1] >= b[1] && p[1] <= b[3];

export function underEraser(p, eraser) {
  if (!inside(p, eraser.box)) return false;
  const pts = eraser.points;
  if (pts.length === 1) return Math.hypot(p[0] - pts[0][0], p[1] - pts[0][1]) <= eraser.r;
  for (let i = 1; i < pts.length; i++) if (distToSegment(p, pts[i - 1], pts[i]) <= eraser.r) return true;
  return false;
}

/** Points at most `step` apart along the polyline. */
export function resample(points, step) {
  const out = [points[0]];
  for (let i = 1; i < points.length; i++) {
    const [ax, ay] = points[i - 1];
    const [bx, by] = points[i];
    const n = Math.max(1, Math.ceil(Math.hypot(bx - ax, by - ay) / step));
    for (let j = 1; j <= n; j++) out.push([ax + ((bx - ax) * j) / n, ay + ((by - ay) * j) / n]);
  }
  return out;
}

/** The parts of a pen stroke that no later eraser stroke covers (a point is erased when the
 * eraser's disc covers the pen line's centre there). */
export function cutByErasers(stroke, erasers) {
  const box = bounds(stroke.points, stroke.width / 2);
  const hits = erasers.filter((e) => overlaps(box, e.box));
  if (!hits.length) return [stroke.points];
  const step = Math.max(0.5, Math.min(2, ...hits.map((e) => e.r / 2)));
  const pieces = [];
  let run = [];
  for (const p of resample(stroke.points, step)) {
    if (hits.some((e) => underEraser(p, e))) {
      if (run.length) pieces.push(run);
      run = [];
    } else {
      run.push(p);
    }
  }
  if (run.length) pieces.push(run);
  return pieces;
}

/** Ramer-Douglas-Peucker, iterative. */
export function simplify(points, eps) {
  if (points.length < 3) return points.slice();
  const keep = new Uint8Array(points.length);
  keep[0] = keep[points.length - 1] = 1;
  const stack = [[0, points.length - 1]];
  while (stack.length) {
    const [a, b] = stack.pop();
    let worst = -1, index = -1;
    for (let i = a + 1; i < b; i++) {
      const d = distToSegment(points[i], points[a], points[b]);
      if (d > worst) { worst = d; index = i; }
    }
    if (worst > eps) {
      keep[index] = 1;
      stack.push([a, index], [index, b]);
    }
  }
  return points.filter((_, i) => keep[i]);
}

/** The visible drawing as QuickDraw simplified strokes [[x...], [y...]]: every pen stroke minus
 * what later eraser strokes covered; the eraser strokes themselves are not sent. */
export function queryStrokes(strokes, tolerance = SIMPLIFY) {
  const out = [];
  strokes.forEach((s, i) => {
    if (s.tool !== "pen") return;
    const erasers = strokes.slice(i + 1).filter((e) => e.tool === "eraser")
      .map((e) => ({ points: e.points, r: e.width / 2, box: bounds(e.points, e.width / 2) }));
    for (const piece of cutByErasers(s, erasers)) {
      const pts = simplify(piece, tolerance);
      const r = (v) => Math.round(v * 10) / 10;
      out.push([pts.map((p) => r(p[0])), pts.map((p) => r(p[1]))]);
    }
  });
  return out;
}
