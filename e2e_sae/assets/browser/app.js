"use strict";
const S = {idx: null, pos: {}, pages: {}, waiting: {}, order: [], key: "freq", desc: true,
  q: "", shown: 200, cur: null};
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
function svgEl(tag, attrs) {
  const e = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const k in attrs) e.setAttribute(k, attrs[k]);
  return e;
}
function fmt(x) {
  if (x == null) return "–";
  if (x === 0) return "0";
  const a = Math.abs(x);
  return a >= 1e-3 && a < 1e5 ? String(+x.toPrecision(3)) : x.toExponential(2);
}
function init() {
  const d = S.idx;
  d.ids.forEach((id, j) => { S.pos[id] = j; });
  document.title = d.title;
  document.getElementById("title").textContent = d.title;
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
function fromHash() {
  const m = /^#f(\d+)$/.exec(location.hash);
  if (m && S.pos[+m[1]] !== undefined) { openFeature(+m[1]); return true; }
  return false;
}
function matches(j, q) {
  const d = S.idx;
  if (!q) return true;
  if (q[0] === "#") return String(d.ids[j]) === q.slice(1);
  return String(d.ids[j]) === q || d.top_token[j].toLowerCase().includes(q) ||
    d.promoted[j].toLowerCase().includes(q);
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
function renderRows() {
  const d = S.idx, body = document.getElementById("rows");
  body.textContent = "";
  for (const j of S.order.slice(0, S.shown)) {
    const tr = el("tr", {"data-j": j, "data-id": d.ids[j], onclick: () => openFeature(d.ids[j])});
    if (d.ids[j] === S.cur) tr.className = "cur";
    for (const c of d.columns) {
      const x = d[c.key][j];
      tr.append(el("td", {class: typeof x === "string" ? "tok" : "num", text: typeof x === "string" ? x : (c.key === "ids" ? String(x) : fmt(x))}));
    }
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
    const a = ex[2][i];
    const s = el("span", {text: toks[t] ?? `<${t}>`, title: `token ${t}: ${fmt(a)}`});
    if (a > 0) s.style.background = `rgba(255,90,0,${Math.min(1, a / peak).toFixed(2)})`;
    if (i === top) s.className = "pk";
    div.append(s);
  });
  return div;
}
function histogram(h, edges) {
  let lo = h.findIndex((c) => c > 0), hi = h.length - 1 - [...h].reverse().findIndex((c) => c > 0);
  const W = 420, H = 110, n = hi - lo + 1, bw = (W - 40) / Math.max(n, 1), mx = Math.max(...h);
  const svg = svgEl("svg", {class: "hist", width: W, height: H + 22, viewBox: `0 0 ${W} ${H + 22}`});
  if (lo < 0) return svg;
  for (let i = lo; i <= hi; i++) {
    const bh = (h[i] / mx) * H, x = 30 + (i - lo) * bw;
    const r = svgEl("rect", {x: x, y: H - bh, width: Math.max(bw - 1, 1), height: bh, fill: "#e8743b"});
    const lab = i === 0 ? `≤ ${fmt(edges[0])}` : i === edges.length ? `> ${fmt(edges[edges.length - 1])}` : `${fmt(edges[i - 1])} – ${fmt(edges[i])}`;
    r.append(svgEl("title", {})); r.firstChild.textContent = `${lab}: ${h[i]} tokens`;
    svg.append(r);
    if (i >= 1 && (i - 1) % 4 === 0) {
      const t = svgEl("text", {x: x, y: H + 14, "font-size": 10, fill: "#555"});
      t.textContent = fmt(edges[i - 1]); svg.append(t);
    }
  }
  const t = svgEl("text", {x: 0, y: 10, "font-size": 10, fill: "#555"}); t.textContent = fmt(mx); svg.append(t);
  return svg;
}
function tokList(label, cls, items, toks) {
  const div = el("div", {class: "toks " + cls}, el("span", {class: "lab", text: label}));
  for (const [t, v] of items) div.append(el("code", {text: toks[t] ?? `<${t}>`, title: `token ${t}: ${v >= 0 ? "+" : ""}${fmt(v)}`}));
  return div;
}
function neighbours(label, items, local) {
  const div = el("div", {class: "near"}, el("span", {class: "lab", text: label}));
  for (const [id, c] of items) {
    const txt = `${id} (${c.toFixed(2)})`;
    if (local && S.pos[id] !== undefined) div.append(el("a", {href: "#f" + id, text: txt}));
    else div.append(el("span", {text: txt}));
  }
  return div;
}
function renderFeature(j, f, toks) {
  const d = S.idx, det = document.getElementById("detail");
  det.textContent = "";
  const stats = d.columns.filter((c) => c.key !== "ids" && typeof d[c.key][j] === "number")
    .map((c) => `${c.label} ${fmt(d[c.key][j])}`).join(" · ");
  det.append(el("h2", {text: `feature ${d.ids[j]}`}), el("p", {class: "meta", text: stats}));
  if (f.expl) {
    det.append(el("h3", {text: "explanation (autointerp)"}),
      el("p", {class: "expl", text: f.expl[0] || "(empty)"}),
      el("p", {class: "meta", text: `simulation score ${fmt(f.expl[1])} · detection AUC ${fmt(f.expl[2])}`}));
  }
  det.append(el("h3", {text: "activation density"}),
    el("p", {class: "meta", text: `nonzero activations over the example tokens, ${d.hist_bins_per_decade} log-spaced bins per decade (hover a bar)`}),
    histogram(f.hist, d.hist_edges));
  if (f.up) {
    det.append(el("h3", {text: "logit effect (decoder direction through the unembedding)"}),
      tokList("promotes", "up", f.up, toks), tokList("suppresses", "down", f.down, toks));
  }
  const peak = f.top.length ? f.top[0][0] : 1;
  det.append(el("h3", {text: "top activations"}));
  for (const ex of f.top) det.append(snippet(ex, toks, peak, "ex"));
  if (f.q.length) {
    det.append(el("h3", {text: "examples across the activation distribution"}),
      el("p", {class: "meta", text: "one random token from the histogram bin holding each quantile of this feature's nonzero activations"}));
    for (const [lab, ...ex] of f.q) {
      const row = snippet(ex, toks, peak, "ex q"); row.prepend(el("i", {text: lab})); det.append(row);
    }
  }
  det.append(el("h3", {text: "nearest features (decoder cosine)"}), neighbours("this SAE", f.near, true));
  if (f.far) det.append(neighbours(d.other_label, f.far, false));
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
    setQuery("");
    setSort("freq", true);
    const first = document.querySelector("#rows tr");
    await openFeature(+first.dataset.id);
    r.opened = +first.dataset.id;
    r.histogram_bars = document.querySelectorAll("#detail svg.hist rect").length;
    r.snippets = document.querySelectorAll("#detail .ex").length;
    r.quantile_snippets = document.querySelectorAll("#detail .ex.q").length;
    r.promoted = document.querySelectorAll("#detail .toks.up code").length;
    r.suppressed = document.querySelectorAll("#detail .toks.down code").length;
    r.heading = document.querySelector("#detail h2").textContent;
  } catch (e) { r.errors.push(String(e)); }
  document.body.append(el("pre", {id: "selftest", text: JSON.stringify(r)}));
}
