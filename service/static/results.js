// One search result as a grid tile of the drawing page. Every string from the server is inserted as
// text, never as HTML.

const THUMB_CSS_PX = 180;

/** A result's photo id as the digits of its URL: ids exceed 2^53, a parsed number would round them. */
export function photoId(result, base = location.href) {
  try { return new URL(result.url, base).pathname.split("/").pop(); } catch { return String(result.id); }
}

export function label(md, rank, key) {
  for (const field of ["name", "label", "title", "class", "category"]) {
    if (typeof md[field] === "string" && md[field].trim()) return md[field];
  }
  return key || `Photo ${rank}`;
}

export function tile(result, maxThumbnail) {
  const md = result.metadata && typeof result.metadata === "object" ? result.metadata : {};
  const id = encodeURIComponent(photoId(result));
  const size = Math.min(maxThumbnail, THUMB_CSS_PX);
  const size2 = Math.min(maxThumbnail, THUMB_CSS_PX * 2);
  const li = document.createElement("li");
  li.className = "tile";
  const a = document.createElement("a");
  a.href = `photos/${id}`;
  a.target = "_blank";
  a.rel = "noopener";
  const key = typeof result.key === "string" ? result.key : "";
  const name = label(md, result.rank, key);
  a.title = [`#${result.rank} · score ${Number(result.score).toFixed(3)}`, ...(key ? [key] : []),
    ...Object.entries(md).map(([k, v]) => `${k}: ${typeof v === "string" ? v : JSON.stringify(v)}`)].join("\n");
  const img = document.createElement("img");
  img.src = `photos/${id}?size=${size}`;
  if (size2 > size) img.srcset = `photos/${id}?size=${size} 1x, photos/${id}?size=${size2} 2x`;
  img.alt = name;
  img.decoding = "async";
  img.addEventListener("error", () => li.classList.add("broken"));
  const cap = document.createElement("span");
  cap.className = "caption";
  const rank = document.createElement("span");
  rank.className = "rank";
  rank.textContent = `#${result.rank}`;
  const nm = document.createElement("span");
  nm.className = "name";
  nm.textContent = name;
  const path = document.createElement("span");  // which photo: its key, unless the name is the key
  path.className = "photo-key";
  path.textContent = key;
  path.hidden = !key || key === name;
  const score = document.createElement("span");
  score.className = "score";
  score.textContent = Number(result.score).toFixed(3);
  score.title = "cosine similarity (higher is closer)";
  const meta = document.createElement("span");
  meta.className = "meta";
  meta.append(rank, score);
  cap.append(nm, path, meta);
  a.append(img, cap);
  li.append(a);
  return li;
}
