"use strict";
const S = {idx: null, pos: {}, dead: new Set(), hay: [], pages: {}, waiting: {}, order: [],
  key: "freq", desc: true, q: "", shown: 200, cur: null};
function registerIndex(d) { S.idx = d; init(); }
function registerPage(n, d) {
  S.pages[n] = d;
  for (const f of S.waiting[n] || []) f[0](d);
  delete S.waiting[n];
}
function loadPage(n) {
  if (S.pages[n]) return Promise.resolve(S.pages[n]);
  return new Promise((res, rej) => {
    const first = !S.waiting[n];
    (S.waiting[n] = S.waiting[n] || []).push([res, rej]);
    if (!first) return;
    // A script tag, not fetch(): fetch of file:// URLs is blocked, script src is not.
    const s = document.createElement("script");
    s.src = "data/page_" + n + ".js"; s.charset = "utf-8";
    s.onerror = () => {
      for (const f of S.waiting[n] || []) f[1](new Error("cannot load " + s.src));
      delete S.waiting[n];
    };
    document.head.appendChild(s);
  });
}
function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const k in attrs || {}) {
    const v = attrs[k];
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const c of kids) if (c != null) e.append(c);
  return e;
}
function svgEl(tag, attrs, text) {
  const e = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const k in attrs) e.setAttribute(k, attrs[k]);
  if (text != null) e.textContent = text;
  return e;
}
function fmt(x) {
  if (x == null) return "–";
  if (x === 0) return "0";
  const a = Math.abs(x);
  return a >= 1e-3 && a < 1e5 ? String(+x.toPrecision(3)) : x.toExponential(2);
}
function pct(x) {
  if (x == null) return "–";
  const p = 100 * x;
  return (p === 0 ? "0" : p >= 0.01 ? String(+p.toPrecision(3)) : p.toExponential(1)) + "%";
}
function signed(x) { return (x >= 0 ? "+" : "") + fmt(x); }
// Whitespace made visible where a token stands alone (lists, table cells): spaces as ␣.
function vis(t) { return t === "" ? "∅" : t.replace(/ /g, "␣"); }
function init() {
  const d = S.idx;
  d.ids.forEach((id, j) => { S.pos[id] = j; });
  for (const id of d.dead) S.dead.add(id);
  S.hay = d.ids.map((_, j) => [d.top_token[j], ...(d.promoted ? d.promoted[j] : []), d.ctx[j]]
    .join("\n").toLowerCase());
  document.title = d.title;
  document.getElementById("title").textContent = d.title;
  document.getElementById("summary").textContent = d.summary;
  const meta = document.getElementById("meta");
  for (const line of d.notes) meta.append(el("li", {text: line}));
  const sel = document.getElementById("sort");
  for (const c of d.columns) if (c.sort) sel.append(el("option", {value: c.key, text: c.label}));
  sel.addEventListener("change", () => setSort(sel.value, S.desc));
  document.getElementById("dir").addEventListener("click", () => setSort(S.key, !S.desc));
  document.getElementById("q").addEventListener("input", (e) => setQuery(e.target.value));
  const head = document.getElementById("head");
  for (const c of d.columns) {
    const th = el("th", {text: c.label, title: c.title || ""});
    if (c.sort) { th.className = "sortable"; th.addEventListener("click", () => setSort(c.key, S.key === c.key ? !S.desc : true)); }
    head.append(th);
  }
  document.getElementById("more").addEventListener("click", () => { S.shown += 500; renderRows(); });
  window.addEventListener("hashchange", fromHash);
  setSort("freq", true);
  if (!fromHash() && S.order.length) openFeature(d.ids[S.order[0]]);
  if (/[?&]test=1/.test(location.search) || location.hash === "#selftest") selftest();
}
// #f<id>: open that feature; a dead one (or one not in this browser) says so instead of
// showing another.
function fromHash() {
  const m = /^#f(\d+)$/.exec(location.hash);
  if (!m) return false;
  const id = +m[1];
  if (S.pos[id] !== undefined) openFeature(id);
  else showAbsent(id);
  return true;
}
function showAbsent(id) {
  S.cur = null;
  for (const tr of document.querySelectorAll("#rows tr")) tr.className = "";
  const det = document.getElementById("detail");
  det.textContent = "";
  const why = S.dead.has(id)
    ? `it is dead: it fired on none of the ${S.idx.n_tokens.toLocaleString("en")} tokens scanned, so there is nothing to show.`
    : "it is not in this browser (written for other features, see --features).";
  det.append(el("h2", {text: `feature ${id}`}), el("p", {class: "absent", text: `Feature ${id}: ${why}`}));
}
function matches(j, q) {
  const d = S.idx;
  if (!q) return true;
  if (q[0] === "#") return String(d.ids[j]) === q.slice(1);
  return String(d.ids[j]) === q || S.hay[j].includes(q);
}
function setQuery(q) { S.q = q.trim().toLowerCase(); document.getElementById("q").value = q; S.shown = 200; refresh(); }
function setSort(key, desc) {
  S.key = key; S.desc = desc;
  document.getElementById("sort").value = key;
  document.getElementById("dir").textContent = desc ? "↓ high first" : "↑ low first";
  refresh();
}
function refresh() {
  const d = S.idx, v = d[S.key], sgn = S.desc ? -1 : 1;
  S.order = [];
  for (let j = 0; j < d.ids.length; j++) if (matches(j, S.q)) S.order.push(j);
  // Missing values (features without an ablation) go last in both directions.
  S.order.sort((a, b) => (v[a] == null) - (v[b] == null) || (v[a] - v[b]) * sgn || d.ids[a] - d.ids[b]);
  renderRows();
}
function cell(c, x) {
  if (Array.isArray(x)) return el("td", {class: "tok", text: x.map(vis).join(" · ")});
  if (typeof x === "string") return el("td", {class: "tok", text: vis(x)});
  return el("td", {class: "num", text: c.key === "ids" ? String(x) : c.pct ? pct(x) : fmt(x)});
}
function renderRows() {
  const d = S.idx, body = document.getElementById("rows");
  body.textContent = "";
  for (const j of S.order.slice(0, S.shown)) {
    const tr = el("tr", {"data-j": j, "data-id": d.ids[j], onclick: () => openFeature(d.ids[j])});
    if (d.ids[j] === S.cur) tr.className = "cur";
    for (const c of d.columns) tr.append(cell(c, d[c.key][j]));
    body.append(tr);
  }
  document.getElementById("count").textContent =
    `${S.order.length} of ${d.ids.length} features` + (S.order.length > S.shown ? `, first ${S.shown} listed` : "");
  document.getElementById("more").style.display = S.order.length > S.shown ? "" : "none";
}
function openFeature(id) {
  const j = S.pos[id], ps = S.idx.page_size, slot = S.idx.slot[j], n = Math.floor(slot / ps);
  S.cur = id;
  for (const tr of document.querySelectorAll("#rows tr")) tr.className = +tr.dataset.id === id ? "cur" : "";
  if (location.hash !== "#f" + id && location.hash !== "#selftest") history.replaceState(null, "", "#f" + id);
  const det = document.getElementById("detail");
  det.textContent = "loading feature " + id + " …";
  return loadPage(n).then((p) => renderFeature(j, p.features[slot - n * ps], p.tokens),
    (e) => { det.textContent = String(e); throw e; });
}
function snippet(ex, toks, peak, cls) {
  // ex: [activation, token ids, activations of the window, index of the token it belongs to]
  const div = el("div", {class: cls}, el("b", {text: fmt(ex[0])}));
  const top = ex[3];
  ex[1].forEach((t, i) => {
    const a = ex[2][i], text = toks[t] ?? `<${t}>`, blank = /^\s*$/.test(text);
    const s = el("span", {text: blank ? vis(text) : text, title: `token ${t} ${JSON.stringify(text)}: ${fmt(a)}`});
    if (a > 0) s.style.background = `rgba(255,90,0,${Math.min(1, a / peak).toFixed(2)})`;
    s.className = (i === top ? "pk" : "") + (blank ? " ws" : "");
    div.append(s);
  });
  return div;
}
// A bar chart with labelled axes: `bars` [[count, tooltip]], y as % of the total when `asPct`.
function barChart(bars, xTicks, xLabel, yLabel, asPct, color) {
  const W = 440, H = 110, L = 44, B = 30, T = 8, n = bars.length;
  const total = bars.reduce((a, b) => a + b[0], 0) || 1, mx = Math.max(1, ...bars.map((b) => b[0]));
  const top = asPct ? 100 * mx / total : mx, bw = (W - L - 4) / Math.max(n, 1);
  const svg = svgEl("svg", {class: "hist", width: W, height: H + B + T, viewBox: `0 0 ${W} ${H + B + T}`});
  svg.append(svgEl("line", {x1: L, y1: T, x2: L, y2: T + H, stroke: "#999"}),
    svgEl("line", {x1: L, y1: T + H, x2: W - 4, y2: T + H, stroke: "#999"}));
  bars.forEach(([c, tip], i) => {
    if (!c) return;
    const bh = (c / mx) * H, r = svgEl("rect", {x: L + i * bw, y: T + H - bh, width: Math.max(bw - 1, 1), height: bh, fill: color});
    r.append(svgEl("title", {}, tip + (asPct ? ` (${pct(c / total)})` : ""))); svg.append(r);
  });
  const yt = (v, y) => svg.append(svgEl("text", {x: L - 3, y: y + 3, "font-size": 9, fill: "#555", "text-anchor": "end"}, v));
  yt(asPct ? pct(top / 100) : String(mx), T + 6); yt(asPct ? "0%" : "0", T + H);
  for (const [i, label] of xTicks) {  // keep the end labels inside the chart
    const anchor = i <= 0.5 ? "start" : i >= n - 0.5 ? "end" : "middle";
    svg.append(svgEl("text", {x: L + i * bw, y: T + H + 11, "font-size": 9, fill: "#555", "text-anchor": anchor}, label));
  }
  svg.append(svgEl("text", {x: L + (W - L) / 2, y: T + H + 25, "font-size": 10, fill: "#333", "text-anchor": "middle"}, xLabel));
  svg.append(svgEl("text", {x: 10, y: T + H / 2, "font-size": 10, fill: "#333", "text-anchor": "middle", transform: `rotate(-90 10 ${T + H / 2})`}, yLabel));
  return svg;
}
function activationHistogram(h, edges, perDecade) {
  const lo = h.findIndex((c) => c > 0), hi = h.length - 1 - [...h].reverse().findIndex((c) => c > 0);
  if (lo < 0) return el("p", {class: "meta", text: "no nonzero activation among the example tokens"});
  const label = (i) => i === 0 ? `≤ ${fmt(edges[0])}` : i === edges.length ? `> ${fmt(edges[edges.length - 1])}` : `${fmt(edges[i - 1])} – ${fmt(edges[i])}`;
  const bars = [], ticks = [];
  for (let i = lo; i <= hi; i++) {
    bars.push([h[i], `activation ${label(i)}: ${h[i]} tokens`]);
    if (i >= 1 && (i - 1) % perDecade === 0) ticks.push([i - lo, fmt(edges[i - 1])]);
  }
  return barChart(bars, ticks, "activation (log scale)", "% of its activations", true, "#e8743b");
}
function logitHistogram(counts, range) {
  const [lo, hi] = range, n = counts.length, w = (hi - lo) / n;
  const bars = counts.map((c, i) => [c, `logit effect ${fmt(lo + i * w)} – ${fmt(lo + (i + 1) * w)}: ${c} tokens`]);
  const ticks = [[0, fmt(lo)], [n, fmt(hi)]];
  if (lo < 0 && hi > 0) ticks.push([(-lo / (hi - lo)) * n, "0"]);
  return barChart(bars, ticks, "direct logit effect per unit activation", "tokens", false, "#6b8fd6");
}
function tokList(label, cls, items, toks) {
  const div = el("div", {class: "toks " + cls}, el("span", {class: "lab", text: label}));
  for (const [t, v] of items) {
    const text = toks[t] ?? `<${t}>`;
    div.append(el("span", {class: "tv"}, el("code", {text: vis(text), title: `token ${t} ${JSON.stringify(text)}`}), el("small", {text: signed(v)})));
  }
  return div;
}
function neighbours(label, items, href) {
  const div = el("div", {class: "near"}, el("span", {class: "lab", text: label}));
  if (!items.length) div.append(el("span", {text: "none"}));
  for (const [id, c] of items) {
    const txt = `${id} (${c.toFixed(2)})`;
    if (href) div.append(el("a", {href: href + "#f" + id, text: txt}));
    else if (S.pos[id] !== undefined) div.append(el("a", {href: "#f" + id, text: txt}));
    else div.append(el("span", {text: txt, title: "not in this browser"}));
  }
  return div;
}
function renderFeature(j, f, toks) {
  const d = S.idx, det = document.getElementById("detail");
  det.textContent = "";
  const stats = [`density ${pct(d.freq[j])} (fires on ${d.count[j].toLocaleString("en")} of ${d.n_tokens.toLocaleString("en")} tokens)`];
  for (const c of d.columns) {
    if (["ids", "freq", "prefix"].includes(c.key) || typeof d[c.key][j] !== "number") continue;
    stats.push(`${c.label} ${fmt(d[c.key][j])}`);
  }
  if (d.prefix) {
    const widths = [...new Set(d.prefix)].sort((a, b) => a - b), w = d.prefix[j], lo = widths[widths.indexOf(w) - 1] || 0;
    stats.push(`Matryoshka prefix: in the first ${w} latents (band ${lo}–${w - 1})`);
  }
  det.append(el("h2", {text: `feature ${d.ids[j]}`}), el("p", {class: "meta", text: stats.join(" · ")}));
  det.append(el("h3", {text: "activation density"}), activationHistogram(f.hist, d.hist_edges, d.hist_bins_per_decade));
  if (f.up) {
    det.append(el("h3", {text: "logit effect (decoder direction through the unembedding)"}),
      tokList("promotes", "up", f.up, toks), tokList("suppresses", "down", f.down, toks),
      logitHistogram(f.lhist, f.lrange));
  }
  const peak = f.top.length ? f.top[0][0] : 1;
  det.append(el("h3", {text: "top activations"}));
  for (const ex of f.top) det.append(snippet(ex, toks, peak, "ex"));
  det.append(el("h3", {text: "examples across the activation distribution"}),
    el("p", {class: "meta", text: "per quantile of this feature's nonzero activations, a random token from the histogram bin holding it"}));
  if (!f.q.length) det.append(el("p", {class: "meta", text: "none (no nonzero activation among the example tokens)"}));
  for (const [q, bin, ...ex] of f.q) {
    const row = snippet(ex, toks, peak, "ex q");
    row.prepend(el("i", {text: q, title: `activation bin ${bin}`}));
    det.append(row);
  }
  det.append(el("h3", {text: "nearest features"}), neighbours("decoder cosine", f.near, ""));
  if (f.corr) det.append(neighbours("activation r", f.corr, ""));
  if (f.far) det.append(neighbours(d.other_label, f.far, d.other_href + "/index.html"));
}
async function selftest() {
  const r = {errors: []};
  try {
    const d = S.idx;
    r.sorted = {};
    for (const c of d.columns.filter((c) => c.sort)) {
      for (const desc of [true, false]) {
        setSort(c.key, desc);
        const all = [...document.querySelectorAll("#rows tr")].map((tr) => d[c.key][+tr.dataset.j]);
        const v = all.filter((x) => x != null);
        let mono = v.length > 0 && all.slice(0, v.length).every((x) => x != null);
        for (let i = 1; i < v.length; i++) if (desc ? v[i - 1] < v[i] : v[i - 1] > v[i]) mono = false;
        r.sorted[c.key + (desc ? "_desc" : "_asc")] = mono;
      }
    }
    setSort("freq", true);
    const j0 = S.order[Math.min(1, S.order.length - 1)], id0 = d.ids[j0];
    setQuery("#" + id0);
    let rows = [...document.querySelectorAll("#rows tr")];
    r.search_id = rows.length === 1 && +rows[0].dataset.id === id0;
    const tt = d.top_token[j0].trim().toLowerCase();
    setQuery(d.top_token[j0]);
    rows = [...document.querySelectorAll("#rows tr")];
    r.search_token = rows.length >= 1 && rows.some((tr) => +tr.dataset.id === id0) &&
      rows.every((tr) => matches(+tr.dataset.j, tt));
    // a piece of a top snippet's context (not its top token) finds the feature too
    const words = d.ctx[j0].toLowerCase().split(/\s+/).filter((w) => w.length > 3 && !d.top_token[j0].toLowerCase().includes(w));
    r.search_context_word = words[0] || "";
    setQuery(r.search_context_word);
    rows = [...document.querySelectorAll("#rows tr")];
    r.search_context = words.length > 0 && rows.some((tr) => +tr.dataset.id === id0);
    setQuery("");
    setSort("freq", true);
    const first = document.querySelector("#rows tr");
    await openFeature(+first.dataset.id);
    r.opened = +first.dataset.id;
    r.histogram_bars = document.querySelectorAll("#detail svg.hist")[0].querySelectorAll("rect").length;
    r.histogram_axis_labels = [...document.querySelectorAll("#detail svg.hist")[0].querySelectorAll("text")].map((t) => t.textContent);
    r.logit_histograms = document.querySelectorAll("#detail svg.hist").length - 1;
    r.snippets = document.querySelectorAll("#detail .ex").length;
    r.quantile_labels = [...document.querySelectorAll("#detail .ex.q i")].map((i) => i.textContent);
    r.promoted = document.querySelectorAll("#detail .toks.up code").length;
    r.promoted_values = [...document.querySelectorAll("#detail .toks.up small")].map((s) => s.textContent);
    r.suppressed = document.querySelectorAll("#detail .toks.down code").length;
    r.neighbour_rows = [...document.querySelectorAll("#detail .near .lab")].map((s) => s.textContent);
    r.neighbour_links = [...document.querySelectorAll("#detail .near a")].map((a) => a.getAttribute("href"));
    r.token_cells_without_raw_spaces = [...document.querySelectorAll("#rows td.tok")]
      .every((td) => !td.textContent.split(" · ").join("").includes(" "));
    r.heading = document.querySelector("#detail h2").textContent;
    r.stats = document.querySelector("#detail p.meta").textContent;
    if (d.dead.length) {  // a dead feature's URL says so and opens nothing else
      location.hash = "#f" + d.dead[0];
      fromHash();
      r.dead_heading = document.querySelector("#detail h2").textContent;
      r.dead_text = document.querySelector("#detail .absent").textContent;
      r.dead_current = S.cur;
    }
  } catch (e) { r.errors.push(String(e)); }
  document.body.append(el("pre", {id: "selftest", text: JSON.stringify(r)}));
}
