// The search page: plain JS against the JSON API (same origin). No build step.
"use strict";

const $ = (id) => document.getElementById(id);
const base = location.pathname.replace(/\/[^/]*$/, "");  // works behind a path prefix
const api = (path) => `${base}${path}`;
let current = null;  // the hit shown in the viewer

function setStatus(text, isError = false) {
  const el = $("status");
  el.textContent = text;
  el.classList.toggle("error", isError);
}

async function readError(resp) {
  try {
    const body = await resp.json();
    if (body.detail && Array.isArray(body.detail)) return body.detail.map((d) => d.msg).join("; ");
    return body.detail || body.error || resp.statusText;
  } catch (e) {
    return resp.statusText;
  }
}

function render(data, label) {
  const grid = $("results");
  grid.replaceChildren();
  for (const hit of data.results) {
    const card = document.createElement("div");
    card.className = "card";
    card.dataset.id = hit.id;
    const img = document.createElement("img");
    img.loading = "lazy";
    img.src = hit.thumb_url;
    img.alt = (hit.metadata.captions || [hit.id])[0];
    const meta = document.createElement("div");
    meta.className = "meta";
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = `#${hit.rank} · ${hit.score.toFixed(3)}`;
    const cap = document.createElement("div");
    cap.className = "caption";
    cap.textContent = (hit.metadata.captions || [hit.id])[0];
    meta.append(score, cap);
    card.append(img, meta);
    card.addEventListener("click", () => openViewer(hit));
    grid.append(card);
  }
  setStatus(`${data.results.length} results for ${label} in ${data.took_ms.toFixed(1)} ms`);
}

async function run(url, init, label) {
  setStatus("Searching…");
  try {
    const resp = await fetch(url, init);
    if (!resp.ok) {
      setStatus(`Error ${resp.status}: ${await readError(resp)}`, true);
      return;
    }
    render(await resp.json(), label);
  } catch (e) {
    setStatus(`Network error: ${e}`, true);
  }
}

function searchText(q) {
  q = q.trim();
  if (!q) { setStatus("Type something to search for.", true); return; }
  const k = $("top-k").value;
  history.replaceState(null, "", `?q=${encodeURIComponent(q)}`);
  run(api(`/api/search?q=${encodeURIComponent(q)}&top_k=${k}`), {}, `“${q}”`);
}

function searchImage(file) {
  const form = new FormData();
  form.append("file", file);
  run(api(`/api/search/image?top_k=${$("top-k").value}`), { method: "POST", body: form }, `image “${file.name}”`);
}

function searchSimilar(id) {
  run(api(`/api/search/similar/${encodeURIComponent(id)}?top_k=${$("top-k").value}`), {}, `images like ${id}`);
}

function openViewer(hit) {
  current = hit;
  $("viewer-img").src = hit.image_url;
  $("viewer-img").alt = hit.id;
  $("viewer-caption").textContent = `${hit.id} · score ${hit.score.toFixed(3)} — ${(hit.metadata.captions || []).join(" / ")}`;
  $("viewer").showModal();
}

async function loadStats() {
  try {
    const resp = await fetch(api("/api/stats"));
    if (!resp.ok) return;
    const s = await resp.json();
    $("stats").textContent =
      `${s.count.toLocaleString()} images · ${s.encoder} · dim ${s.dim} · index ${s.index_key} · built ${s.created_at}` +
      ` · query cache ${s.query_cache.hits}/${s.query_cache.hits + s.query_cache.misses} hits`;
    const ex = $("examples");
    ex.replaceChildren();
    for (const q of s.examples) {
      const b = document.createElement("button");
      b.type = "button";
      b.textContent = q;
      b.addEventListener("click", () => { $("q").value = q; searchText(q); });
      ex.append(b);
    }
  } catch (e) { /* stats are optional */ }
}

$("search-form").addEventListener("submit", (ev) => { ev.preventDefault(); searchText($("q").value); });
$("upload").addEventListener("change", (ev) => { if (ev.target.files[0]) searchImage(ev.target.files[0]); ev.target.value = ""; });
$("viewer-close").addEventListener("click", () => $("viewer").close());
$("viewer-similar").addEventListener("click", () => { $("viewer").close(); if (current) searchSimilar(current.id); });
$("viewer").addEventListener("click", (ev) => { if (ev.target === $("viewer")) $("viewer").close(); });

loadStats();
const initial = new URLSearchParams(location.search).get("q");
if (initial) { $("q").value = initial; searchText(initial); }
