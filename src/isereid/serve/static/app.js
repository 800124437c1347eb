// isereid serve: the page. Everything it shows comes from the JSON API (docs/serve.md).
"use strict";
const PAGE = 24, CROPS_PER_CAMERA = 8, OUTLIERS_PER_PAGE = 48;
const state = { summary: null, epoch: null, sort: "size", offset: 0, total: 0, outlierOffset: 0, threshold: 0.5,
                lastResults: null };
const $ = (id) => document.getElementById(id);

async function api(path, options) {
  const response = await fetch(path, options);
  const body = await response.json().catch(() => ({ detail: response.statusText }));
  if (!response.ok) throw new Error(body.detail || response.statusText);
  return body;
}

function el(tag, attrs = {}, children = []) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "text") node.textContent = v;
    else if (k === "onclick") node.addEventListener("click", v);
    else node.setAttribute(k, v);
  }
  for (const c of children) node.appendChild(c);
  return node;
}

function crop(id, cls = "crop") {
  return el("img", { src: `api/image/${id}`, class: cls, loading: "lazy", title: `image ${id}`,
                     onclick: () => searchById(id) });
}

function show(view) {
  for (const b of document.querySelectorAll("header button")) b.classList.toggle("active", b.dataset.view === view);
  for (const name of ["run", "clusters", "search"]) $(`view-${name}`).hidden = name !== view;
}

// ------------------------------------------------------------------ run view
function lineChart(title, series, yMax) {
  const W = 320, H = 180, L = 40, B = 24, T = 20, R = 10;
  const pts = series.flatMap((s) => s.points);
  if (!pts.length) return null;
  const xs = pts.map((p) => p[0]), ys = pts.map((p) => p[1]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs, x0 + 1), y0 = 0, y1 = yMax || Math.max(...ys, 1e-9) * 1.05;
  const sx = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R), sy = (y) => H - B - ((y - y0) / (y1 - y0)) * (H - B - T);
  const colours = ["#1565c0", "#c62828", "#2e7d32", "#ef6c00"];
  let svg = `<svg class="chart" width="${W}" height="${H}" xmlns="http://www.w3.org/2000/svg">`;
  svg += `<text x="${L}" y="14">${title}</text>`;
  svg += `<line x1="${L}" y1="${H - B}" x2="${W - R}" y2="${H - B}" stroke="#999"/>`;
  svg += `<line x1="${L}" y1="${T}" x2="${L}" y2="${H - B}" stroke="#999"/>`;
  svg += `<text x="2" y="${T + 8}">${+y1.toPrecision(3)}</text><text x="2" y="${H - B}">0</text>`;
  svg += `<text x="${L}" y="${H - 6}">epoch ${x0}</text><text x="${W - R - 30}" y="${H - 6}">${x1}</text>`;
  series.forEach((s, i) => {
    const path = s.points.map((p) => `${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(" ");
    svg += `<polyline fill="none" stroke="${colours[i]}" stroke-width="2" points="${path}"/>`;
    for (const p of s.points) svg += `<circle cx="${sx(p[0])}" cy="${sy(p[1])}" r="2.5" fill="${colours[i]}"/>`;
    svg += `<text x="${W - R - 110}" y="${T + 12 + 12 * i}" fill="${colours[i]}">${s.name}</text>`;
  });
  const div = el("div");
  div.innerHTML = svg + "</svg>";
  return div.firstChild;
}

function renderRun(summary) {
  const recs = summary.records;
  const pick = (f) => recs.filter((r) => f(r) !== undefined && f(r) !== null).map((r) => [r.epoch, f(r)]);
  $("run-name").textContent = `${summary.run} · ${summary.model.arch} ${summary.model.height}x${summary.model.width}`;
  $("run-summary").textContent = `${recs.length} epochs recorded, pseudo-labels of ${summary.epochs.length}; ` +
    `${summary.train_images} training images; search: ${summary.gallery.source} (${summary.gallery.backend}).`;
  const charts = $("charts");
  charts.replaceChildren();
  const add = (c) => c && charts.appendChild(c);
  add(lineChart("loss", [{ name: "loss", points: pick((r) => r.loss) }]));
  add(lineChart("clusters / outliers", [{ name: "clusters", points: pick((r) => r.num_clusters) },
                                        { name: "outliers", points: pick((r) => r.num_outliers) }]));
  add(lineChart("clusters spanning cameras", [{ name: "share", points: pick((r) => r.cluster && r.cluster.cross_camera_clusters) }], 1));
  add(lineChart("test mAP / rank-1", [{ name: "mAP", points: pick((r) => r.mAP) },
                                      { name: "rank-1", points: pick((r) => r.rank1) }], 1));
  const table = $("epoch-table");
  table.replaceChildren(el("tr", {}, ["epoch", "clusters", "outliers", "cross-camera", "loss", "mAP"].map((h) => el("th", { text: h }))));
  const pct = (v) => (v === undefined || v === null ? "" : `${(100 * v).toFixed(1)}%`);
  for (const r of recs) {
    table.appendChild(el("tr", {}, [r.epoch, r.num_clusters, r.num_outliers, pct(r.cluster && r.cluster.cross_camera_clusters),
      r.loss === undefined ? "" : r.loss.toFixed(3), pct(r.mAP)].map((v) => el("td", { text: String(v) }))));
  }
}

// ------------------------------------------------------------------ clusters view
async function loadClusters() {
  const q = `epoch=${state.epoch}&sort=${state.sort}&offset=${state.offset}&limit=${PAGE}` +
            `&outlier_offset=${state.outlierOffset}&outlier_limit=${OUTLIERS_PER_PAGE}`;
  const data = await api(`api/clusters?${q}`);
  state.total = data.total;
  const list = $("cluster-list");
  list.replaceChildren();
  for (const c of data.clusters) {
    const cams = Object.keys(c.cameras);
    const badge = cams.length > 1 ? el("span", { class: "badge cross", text: `joined across ${cams.length} cameras` })
                                  : el("span", { class: "badge pure", text: "camera-pure" });
    const card = el("div", { class: "card", "data-testid": "cluster-card", "data-cluster-id": String(c.id) },
                    [el("h4", { text: `cluster ${c.id} · ${c.size} images` }, [badge])]);
    for (const cam of cams) {
      const ids = c.cameras[cam];
      const row = el("div", { class: "camrow" }, [el("span", { class: "cam", text: `cam ${cam}` })]);
      for (const id of ids.slice(0, CROPS_PER_CAMERA)) row.appendChild(crop(id));
      if (ids.length > CROPS_PER_CAMERA) row.appendChild(el("span", { class: "more", text: `+${ids.length - CROPS_PER_CAMERA}` }));
      card.appendChild(row);
    }
    list.appendChild(card);
  }
  const pages = Math.max(1, Math.ceil(data.total / PAGE));
  $("page-info").textContent = `page ${Math.floor(state.offset / PAGE) + 1} of ${pages} (${data.total} clusters)`;
  $("outlier-info").textContent = `(${data.num_outliers}; showing ${data.outlier_offset + 1}-` +
    `${data.outlier_offset + data.outliers.length})`;
  $("outlier-list").replaceChildren(...data.outliers.map((id) => crop(id)));
  state.numOutliers = data.num_outliers;
}

// ------------------------------------------------------------------ search view
function renderResults() {
  const box = $("search-results");
  box.replaceChildren();
  if (!state.lastResults) return;
  let lineDrawn = false;
  for (const [rank, r] of state.lastResults.entries()) {
    const distance = 1 - r.score;
    if (!lineDrawn && distance > state.threshold) {
      box.appendChild(el("div", { class: "nomatch", "data-testid": "no-match", text: `no match beyond ${state.threshold.toFixed(2)}` }));
      lineDrawn = true;
    }
    const cls = r.match === true ? "match" : r.match === false ? "mismatch" : "unknown";
    box.appendChild(el("div", { class: `result ${cls}`, "data-testid": "result", "data-image-name": r.name,
                                "data-score": String(r.score) },
      [crop(r.image_id, ""), el("div", { text: `${rank + 1}. ${r.score.toFixed(3)}` }),
       el("div", { text: `cam ${r.camera}` })]));
  }
}

async function runSearch(form, queryNode) {
  form.append("topk", $("topk").value || "10");
  form.append("other_cameras_only", $("other-cameras").checked ? "true" : "false");
  $("query-view").replaceChildren(queryNode);
  $("search-note").textContent = "searching…";
  $("search-note").classList.remove("error");
  try {
    const data = await api("api/search", { method: "POST", body: form });
    state.lastResults = data.results;
    $("search-note").textContent = `${data.results.length} results from ${state.summary.gallery.source}`;
  } catch (e) {
    state.lastResults = null;
    $("search-note").textContent = e.message;
    $("search-note").classList.add("error");
  }
  renderResults();
}

function searchById(id) {
  show("search");
  const form = new FormData();
  form.append("image_id", String(id));
  state.lastQuery = () => searchById(id);
  runSearch(form, crop(id));
}

function searchUpload(file) {
  const form = new FormData();
  form.append("image", file, file.name);
  state.lastQuery = () => searchUpload(file);
  runSearch(form, el("img", { src: URL.createObjectURL(file) }));
}

function setThreshold(value) {
  state.threshold = value;
  $("threshold").value = String(value);
  $("threshold-value").textContent = value.toFixed(2);
  renderResults();
}

// ------------------------------------------------------------------ start
async function start() {
  for (const b of document.querySelectorAll("header button")) b.addEventListener("click", () => show(b.dataset.view));
  const summary = await api("api/run");
  state.summary = summary;
  renderRun(summary);
  const select = $("epoch-select");
  for (const e of summary.epochs) select.appendChild(el("option", { value: String(e), text: `epoch ${e}` }));
  state.epoch = summary.epochs[summary.epochs.length - 1];
  select.value = String(state.epoch);
  select.addEventListener("change", () => { state.epoch = +select.value; state.offset = 0; state.outlierOffset = 0; loadClusters(); });
  $("sort-select").addEventListener("change", (ev) => { state.sort = ev.target.value; state.offset = 0; loadClusters(); });
  $("prev-page").addEventListener("click", () => { if (state.offset > 0) { state.offset -= PAGE; loadClusters(); } });
  $("next-page").addEventListener("click", () => { if (state.offset + PAGE < state.total) { state.offset += PAGE; loadClusters(); } });
  $("more-outliers").addEventListener("click", () => {
    state.outlierOffset = state.outlierOffset + OUTLIERS_PER_PAGE < state.numOutliers ? state.outlierOffset + OUTLIERS_PER_PAGE : 0;
    loadClusters();
  });
  $("query-upload").addEventListener("change", (ev) => { if (ev.target.files.length) searchUpload(ev.target.files[0]); });
  $("other-cameras").addEventListener("change", () => state.lastQuery && state.lastQuery());
  $("threshold").addEventListener("input", (ev) => setThreshold(+ev.target.value));
  const suggested = summary.threshold === null ? 0.5 : summary.threshold;
  $("threshold-reset").addEventListener("click", () => setThreshold(suggested));
  $("threshold-reset").title = summary.threshold === null ? "no suggestion recorded; 0.5"
    : `suggested from the distances inside and between the clusters of epoch ${summary.threshold_epoch}`;
  setThreshold(suggested);
  const fromHash = () => { const view = new URLSearchParams(location.hash.slice(1)).get("view"); if (view) show(view); };
  window.addEventListener("hashchange", fromHash);
  fromHash();
  await loadClusters();
}

start().catch((e) => { document.body.prepend(el("p", { class: "error", text: `cannot load the run: ${e.message}` })); });
