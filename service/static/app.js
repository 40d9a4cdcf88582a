// The search page: plain JS against the JSON API (same origin). No build step, no inline handlers.
"use strict";

const $ = (id) => document.getElementById(id);
const base = location.pathname.replace(/\/[^/]*$/, "");  // works behind a path prefix
const api = (path) => `${base}${path}`;

const page = {
  stats: null,       // GET /api/stats
  query: "",         // the text of the current search
  image: null,       // {kind: "file", file, name} | {kind: "id", id} | null: the image the search starts from
  nextOffset: null,  // next page of the current search
  loading: false,
  shown: 0,
  current: null,     // the hit shown in the viewer
  seq: 0,            // answers of superseded searches are dropped
};

function setStatus(text, isError = false) {
  const el = $("status");
  el.textContent = text;
  el.classList.toggle("error", isError);
}

async function readError(resp) {
  try {
    const body = await resp.json();
    if (body.detail && Array.isArray(body.detail)) {
      // loc: ["body" | "query", field, ...]: name the field, without the location
      return body.detail.map((d) => `${(d.loc || []).slice(1).join(".") || "request"}: ${String(d.msg).replace(/^Value error, /, "")}`).join("; ");
    }
    return body.detail || body.error || resp.statusText;
  } catch (e) {
    return resp.statusText;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// The request: text, image, filters, sort, page
// ---------------------------------------------------------------------------------------------------------------

function filters() {
  const f = {};
  const folder = $("folder").value;
  if (folder) f.path_prefix = `${folder}/`;
  if ($("date-from").value) f.taken_after = $("date-from").value;
  if ($("date-to").value) f.taken_before = $("date-to").value;  // a date: through the end of that day
  return Object.keys(f).length ? f : null;
}

function options(offset) {
  const body = { top_k: Number($("top-k").value), offset, sort: $("sort").value };
  const f = filters();
  if (f) body.filter = f;
  if ($("hybrid").checked && page.query) body.mode = "hybrid";
  const s = page.stats;
  if (s && s.calibrated && !$("show-all").checked && s.default_min_relevance !== null) {
    body.min_relevance = s.default_min_relevance;
  }
  return body;
}

function request(offset) {
  const body = options(offset);
  if (page.query) body.query = page.query;
  const img = page.image;
  if (img && img.kind === "file") {
    const form = new FormData();
    form.append("file", img.file, img.name);
    form.append("request", JSON.stringify(body));
    return [api("/api/search/image"), { method: "POST", body: form }];
  }
  if (img && img.kind === "id") body.image_id = img.id;
  return [api("/api/search"), { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) }];
}

function describe(data) {
  const parts = [];
  const img = page.image;
  if (img) parts.push(img.kind === "id" ? `images like ${img.id}` : `image “${img.name}”`);
  if (data.terms && data.terms.length) {
    const plain = data.terms.length === 1 && data.terms[0].weight === 1;
    const text = plain ? data.terms[0].text : data.terms.map((t) => `${t.weight < 0 ? "−" : "+"}${Math.abs(t.weight) === 1 ? "" : Math.abs(t.weight) + "×"}${t.text}`).join(" ");
    parts.push(`“${text}”`);
  }
  return parts.join(" + ");
}

// ---------------------------------------------------------------------------------------------------------------
// Results
// ---------------------------------------------------------------------------------------------------------------

function card(hit) {
  const el = document.createElement("div");
  el.className = "card";
  el.dataset.id = hit.id;
  el.dataset.taken = hit.metadata.taken_at || "";
  el.dataset.folder = hit.metadata.folder || "";
  if (hit.relevance !== null && hit.relevance !== undefined) el.dataset.relevance = hit.relevance.toFixed(4);
  const img = document.createElement("img");
  img.loading = "lazy";
  img.src = hit.thumb_url;
  img.alt = (hit.metadata.captions || [hit.id])[0] || hit.id;
  img.addEventListener("click", () => openViewer(hit));
  const meta = document.createElement("div");
  meta.className = "meta";
  const score = document.createElement("span");
  score.className = "score";
  const rel = hit.relevance !== null && hit.relevance !== undefined ? ` · ${Math.round(hit.relevance * 100)}%` : "";
  score.textContent = `#${hit.rank} · ${hit.score.toFixed(3)}${rel}`;
  const more = document.createElement("button");
  more.type = "button";
  more.className = "more-like";
  more.textContent = "More like this";
  more.addEventListener("click", (ev) => { ev.stopPropagation(); startFromId(hit.id); });
  const cap = document.createElement("div");
  cap.className = "caption";
  cap.textContent = (hit.metadata.captions || [])[0] || hit.metadata.path;
  const when = document.createElement("div");
  when.className = "when";
  when.textContent = [hit.metadata.taken_at ? hit.metadata.taken_at.slice(0, 10) : "", hit.metadata.folder].filter(Boolean).join(" · ");
  meta.append(score, more, cap, when);
  el.append(img, meta);
  return el;
}

function showPage(data, append) {
  const grid = $("results");
  if (!append) { grid.replaceChildren(); page.shown = 0; window.scrollTo(0, 0); }
  for (const hit of data.results) grid.append(card(hit));
  page.shown += data.results.length;
  page.nextOffset = data.next_offset;
  $("more").hidden = data.next_offset === null;
  $("end").hidden = data.next_offset !== null || page.shown === 0;
  const hidden = page.stats && page.stats.calibrated && !$("show-all").checked ? " (less relevant hits hidden)" : "";
  const label = describe(data);
  setStatus(`${page.shown} results${label ? " for " + label : ""} in ${data.took_ms.toFixed(1)} ms${hidden}`);
}

async function run(append) {
  const offset = append ? page.nextOffset : 0;
  if (append && (offset === null || page.loading)) return;
  const seq = ++page.seq;
  page.loading = true;
  if (!append) setStatus("Searching…");
  try {
    const [url, init] = request(offset);
    const resp = await fetch(url, init);
    if (seq !== page.seq) return;
    if (!resp.ok) {
      setStatus(`Error ${resp.status}: ${await readError(resp)}`, true);
      return;
    }
    showPage(await resp.json(), append);
  } catch (e) {
    setStatus(`Network error: ${e}`, true);
  } finally {
    if (seq === page.seq) page.loading = false;
  }
}

function search() {
  page.query = $("q").value.trim();
  if (!page.query && !page.image) { setStatus("Type something to search for.", true); return; }
  const params = new URLSearchParams();
  if (page.query) params.set("q", page.query);
  history.replaceState(null, "", params.toString() ? `?${params}` : location.pathname);
  run(false);
}

// ---------------------------------------------------------------------------------------------------------------
// The image a search starts from: an upload, a drop, or "more like this"
// ---------------------------------------------------------------------------------------------------------------

function setImage(img) {
  page.image = img;
  const chip = $("image-chip");
  chip.hidden = !img;
  if (!img) return;
  $("image-chip-label").textContent = img.kind === "id" ? img.id : img.name;
  const thumb = $("image-chip-thumb");
  if (img.kind === "id") thumb.src = api(`/thumbs/${encodeURIComponent(img.id)}`);
  else thumb.src = URL.createObjectURL(img.file);
}

function startFromFile(file) {
  if (!file || !file.type.startsWith("image/")) { setStatus("That is not an image file.", true); return; }
  setImage({ kind: "file", file, name: file.name });
  search();
}

function startFromId(id) {
  setImage({ kind: "id", id });
  $("q").value = "";
  search();
}

function openViewer(hit) {
  page.current = hit;
  $("viewer-img").src = hit.image_url;
  $("viewer-img").alt = hit.id;
  const m = hit.metadata;
  const facts = [m.taken_at, m.camera, m.width && m.height ? `${m.width}×${m.height}` : ""].filter(Boolean).join(" · ");
  $("viewer-caption").textContent = `${hit.id} · score ${hit.score.toFixed(3)} ${facts ? "· " + facts : ""} — ${(m.captions || []).join(" / ")}`;
  $("viewer").showModal();
}

// ---------------------------------------------------------------------------------------------------------------
// Start-up: stats (examples, calibration), folders
// ---------------------------------------------------------------------------------------------------------------

async function loadStats() {
  try {
    const resp = await fetch(api("/api/stats"));
    if (!resp.ok) return;
    const s = await resp.json();
    page.stats = s;
    $("stats").textContent =
      `${s.count.toLocaleString()} images · ${s.encoder} · dim ${s.dim} · index ${s.index_key} · built ${s.created_at}` +
      ` · query cache ${s.query_cache.hits}/${s.query_cache.hits + s.query_cache.misses} hits`;
    $("show-all-label").hidden = !s.calibrated;
    if (s.syntax_hint) $("syntax-hint").textContent = `${s.syntax_hint} · drop an image to search by it, then type to change it`;
    const ex = $("examples");
    ex.replaceChildren();
    for (const q of s.examples) {
      const b = document.createElement("button");
      b.type = "button";
      b.textContent = q;
      b.addEventListener("click", () => { $("q").value = q; search(); });
      ex.append(b);
    }
  } catch (e) { /* stats are optional */ }
}

async function loadFolders() {
  try {
    const resp = await fetch(api("/api/folders"));
    if (!resp.ok) return;
    const lib = await resp.json();
    const select = $("folder");
    const totals = new Map();  // a folder's count includes its sub-folders
    for (const f of lib.folders) {
      const parts = f.folder ? f.folder.split("/") : [];
      for (let i = 1; i <= parts.length; i++) {
        const key = parts.slice(0, i).join("/");
        totals.set(key, (totals.get(key) || 0) + f.count);
      }
    }
    for (const [folder, count] of [...totals.entries()].sort()) {
      const opt = document.createElement("option");
      opt.value = folder;
      opt.textContent = `${"  ".repeat(folder.split("/").length - 1)}${folder.split("/").pop()} (${count})`;
      select.append(opt);
    }
    if (lib.earliest) { $("date-from").min = lib.earliest.slice(0, 10); $("date-to").min = lib.earliest.slice(0, 10); }
    if (lib.latest) { $("date-from").max = lib.latest.slice(0, 10); $("date-to").max = lib.latest.slice(0, 10); }
  } catch (e) { /* filters still work by hand */ }
}

// ---------------------------------------------------------------------------------------------------------------
// Wiring
// ---------------------------------------------------------------------------------------------------------------

$("search-form").addEventListener("submit", (ev) => { ev.preventDefault(); search(); });
$("upload").addEventListener("change", (ev) => { if (ev.target.files[0]) startFromFile(ev.target.files[0]); ev.target.value = ""; });
$("image-chip-clear").addEventListener("click", () => { setImage(null); if ($("q").value.trim()) search(); });
for (const id of ["folder", "date-from", "date-to", "sort", "hybrid", "show-all", "top-k"]) {
  $(id).addEventListener("change", () => { if (page.query || page.image) search(); });
}
$("clear-filters").addEventListener("click", () => {
  $("folder").value = ""; $("date-from").value = ""; $("date-to").value = ""; $("sort").value = "score";
  $("hybrid").checked = false;
  if (page.query || page.image) search();
});
$("more").addEventListener("click", () => run(true));
new IntersectionObserver((entries) => {  // infinite scroll: the sentinel below the grid came into view
  if (entries.some((e) => e.isIntersecting) && page.shown > 0) run(true);
}, { rootMargin: "400px" }).observe($("sentinel"));

$("viewer-close").addEventListener("click", () => $("viewer").close());
$("viewer-similar").addEventListener("click", () => { $("viewer").close(); if (page.current) startFromId(page.current.id); });
$("viewer").addEventListener("click", (ev) => { if (ev.target === $("viewer")) $("viewer").close(); });

// drag and drop an image anywhere on the page
let dragDepth = 0;
const isFileDrag = (ev) => ev.dataTransfer && Array.from(ev.dataTransfer.types || []).includes("Files");
document.addEventListener("dragenter", (ev) => { if (isFileDrag(ev)) { dragDepth++; $("drop-overlay").hidden = false; } });
document.addEventListener("dragleave", () => { dragDepth = Math.max(0, dragDepth - 1); if (!dragDepth) $("drop-overlay").hidden = true; });
document.addEventListener("dragover", (ev) => { if (isFileDrag(ev)) ev.preventDefault(); });
document.addEventListener("drop", (ev) => {
  ev.preventDefault();
  dragDepth = 0;
  $("drop-overlay").hidden = true;
  const file = ev.dataTransfer && ev.dataTransfer.files[0];
  if (file) startFromFile(file);
});

loadStats().then(() => {
  const initial = new URLSearchParams(location.search).get("q");
  if (initial) { $("q").value = initial; search(); }
});
loadFolders();
