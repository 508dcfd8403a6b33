/* domain-sae feature dashboard front end (vanilla JS, no dependencies, works offline).
   Every string from the store or a prompt is inserted with textContent / createTextNode, never as HTML.
   The shared helpers are window.dsae; panels.js (loaded after this file) adds the steering and live-test panels
   to it, and the page is drawn once both are loaded (DOMContentLoaded). */
"use strict";
(function () {
  const B = document.body, MODE = B.dataset.mode, ROOT = B.dataset.root || "/", PAGE = B.dataset.page;
  const dataEl = document.getElementById("dsae-data");
  const EMBED = dataEl ? JSON.parse(dataEl.textContent) : null;
  const app = document.getElementById("app");

  function el(tag, attrs, ...kids) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined) continue;
      if (k === "class") e.className = v;
      else if (k === "text") e.textContent = v;
      else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
      else e.setAttribute(k, String(v));
    }
    for (const c of kids) { if (c !== null && c !== undefined) e.appendChild(typeof c === "string" ? document.createTextNode(c) : c); }
    return e;
  }
  function fmt(v, d) {
    if (v === null || v === undefined || Number.isNaN(v)) return "–";
    const x = Number(v);
    if (x !== 0 && Math.abs(x) < 1e-3) return x.toExponential(2);
    return x.toPrecision(d || 4);
  }
  function num(v, d) { return el("span", { class: "num", "data-value": v === null || v === undefined ? "" : v, text: fmt(v, d) }); }
  async function api(path, opts) {
    const r = await fetch(ROOT + "api/" + path, opts);
    let j; try { j = await r.json(); } catch (e) { throw new Error("HTTP " + r.status); }
    if (!r.ok) throw new Error(j.error || ("HTTP " + r.status));
    return j;
  }
  function showError(where, err) { where.appendChild(el("p", { class: "error", id: "error", text: String(err.message || err) })); }
  function featureHref(sae, saeId, latent) {
    if (MODE === "export") return ROOT + "feature/" + saeId + "/" + latent + ".html";
    return ROOT + "feature/" + latent + "?sae=" + encodeURIComponent(sae);
  }
  function featureLink(sae, saeId, latent, label) { return el("a", { href: featureHref(sae, saeId, latent), class: "latent-link", "data-latent": latent, text: label || ("#" + latent) }); }

  /* Visible whitespace: spaces as ·, tabs as →, newlines as ↵ plus a real line break, other control characters escaped. */
  function visibleText(s) {
    const frag = document.createDocumentFragment();
    let buf = "";
    const flush = () => { if (buf) { frag.appendChild(document.createTextNode(buf)); buf = ""; } };
    for (const ch of s) {
      if (ch === " ") { flush(); frag.appendChild(el("span", { class: "ws", text: "\u00b7" })); }
      else if (ch === "\t") { flush(); frag.appendChild(el("span", { class: "ws", text: "\u2192   " })); }
      else if (ch === "\n") { flush(); frag.appendChild(el("span", { class: "nl", text: "\u21b5" })); frag.appendChild(document.createTextNode("\n")); }
      else if (ch === "\r") { flush(); frag.appendChild(el("span", { class: "ctl", text: "\u240d" })); }
      else if (ch.charCodeAt(0) < 32 || ch.charCodeAt(0) === 127) { flush(); frag.appendChild(el("span", { class: "ctl", text: "\\x" + ch.charCodeAt(0).toString(16).padStart(2, "0") })); }
      else buf += ch;
    }
    flush();
    return frag;
  }
  /* Tokens of a context; tokens with empty text (bytes of a character completed later) are merged into the next one. */
  function renderTokens(texts, acts, maxAct, highlight, segments, onClick, selected) {
    const div = el("div", { class: "ctx" });
    let group = [];
    for (let i = 0; i < texts.length; i++) {
      group.push(i);
      if (texts[i] === "" && i < texts.length - 1) continue;
      const vals = group.map(j => (acts ? acts[j] : 0) || 0);
      const a = Math.max(...vals);
      const cls = ["tok"];
      if (group.includes(highlight)) cls.push("hl");
      if (segments && segments[group[0]] === 0) cls.push("special");
      if (onClick) cls.push("click");
      if (selected !== undefined && group.includes(selected)) cls.push("sel");
      const title = group.map(j => "token " + j + ": " + fmt(acts ? acts[j] : null)).join("\n");
      const span = el("span", { class: cls.join(" "), title: title, "data-index": group[group.length - 1], "data-act": a });
      if (maxAct > 0 && a > 0) span.style.backgroundColor = "rgba(235, 110, 20, " + Math.min(1, 0.12 + 0.88 * a / maxAct).toFixed(3) + ")";
      span.appendChild(visibleText(group.map(j => texts[j]).join("")));
      if (onClick) { const last = group[group.length - 1]; span.addEventListener("click", () => onClick(last)); }
      div.appendChild(span);
      group = [];
    }
    return div;
  }
  function exampleRow(ex, maxAct) {
    return el("div", { class: "example", "data-value": ex.value },
      el("div", { class: "value", text: fmt(ex.value) }),
      renderTokens(ex.texts, ex.acts, maxAct, ex.highlight, ex.segments));
  }
  function histogram(h) {
    const counts = h.counts, edges = h.log10_edges;
    let lo = counts.findIndex(c => c > 0), hi = counts.length - 1 - [...counts].reverse().findIndex(c => c > 0);
    const box = el("div", { class: "card" });
    if (lo < 0) { box.appendChild(el("p", { class: "muted", text: "Never active on these tokens." })); return box; }
    lo = Math.max(0, lo - 2); hi = Math.min(counts.length - 1, hi + 2);
    const max = Math.max(...counts);
    const bars = el("div", { class: "hist", id: "histogram" });
    for (let i = lo; i <= hi; i++) {
      const b = el("div", { class: "bar", title: "10^" + edges[i].toFixed(2) + " – 10^" + edges[i + 1].toFixed(2) + ": " + counts[i], "data-count": counts[i] });
      b.style.height = (100 * counts[i] / max).toFixed(1) + "%";
      bars.appendChild(b);
    }
    box.appendChild(el("h3", { text: "Activation histogram (log10 f, active tokens)" }));
    box.appendChild(bars);
    box.appendChild(el("div", { class: "hist-axis" }, el("span", { text: "10^" + edges[lo].toFixed(1) }), el("span", { text: "10^" + edges[hi + 1].toFixed(1) })));
    return box;
  }
  /* Chat lines "user: …" / "assistant: …" / "system: …" to messages (a line without a role is the user's). */
  function parseChat(text) {
    return text.split("\n").filter(l => l.trim()).map(l => { const m = l.match(/^(system|user|assistant)\s*:\s?(.*)$/i); return m ? { role: m[1].toLowerCase(), content: m[2] } : { role: "user", content: l }; });
  }
  function promptBody(kind, text) { return kind === "chat" ? { messages: parseChat(text) } : { text: text }; }
  function kindSelect(id) { return el("select", { id: id }, el("option", { value: "text", text: "plain text" }), el("option", { value: "chat", text: "chat (lines 'user: …' / 'assistant: …')" })); }
  /* Poll a job until it ends; onTick(job) after every answer. Resolves with the finished job. */
  function pollJob(id, onTick, every) {
    return new Promise((resolve, reject) => {
      const tick = async () => {
        let j;
        try { j = await api("job/" + id); } catch (e) { reject(e); return; }
        if (onTick) onTick(j);
        if (j.status === "done" || j.status === "error" || j.status === "cancelled") { resolve(j); return; }
        setTimeout(tick, every || 250);
      };
      tick();
    });
  }
  function table(head, rows, attrs) {
    const t = el("table", attrs || {});
    t.appendChild(el("thead", {}, el("tr", {}, ...head.map(h => el("th", { text: h })))));
    const tb = el("tbody");
    for (const r of rows) tb.appendChild(el("tr", {}, ...r.map(c => el("td", {}, typeof c === "string" ? document.createTextNode(c) : c))));
    t.appendChild(tb);
    return t;
  }

  /* ---------------------------------------------------------------- feature list */
  async function pageList() {
    const store = EMBED ? EMBED.store : await api("store");
    const state = { sae: B.dataset.sae || store.saes[0].label, q: "", sort: "density", order: "desc", page: 0, per: 50 };
    app.textContent = "";
    app.appendChild(el("h1", { text: "Features" }));
    app.appendChild(el("p", { class: "muted", text: store.datasets.map(d => d.spec + ": " + d.n_tokens.toLocaleString() + " tokens").join(" · ") }));
    const saeSel = el("select", { id: "sae-select" }, ...store.saes.map(s => el("option", { value: s.label, text: s.label + " (" + s.d_sae + " latents, " + s.hook + ")" })));
    const q = el("input", { type: "text", id: "search", placeholder: "search top contexts, or #123" });
    const sort = el("select", { id: "sort" }, ...["density", "max_act", "specificity", "mean_act", "latent"].map(s => el("option", { value: s, text: "sort: " + s })));
    const order = el("select", { id: "order" }, el("option", { value: "desc", text: "descending" }), el("option", { value: "asc", text: "ascending" }));
    app.appendChild(el("div", { class: "controls" }, saeSel, q, sort, order));
    const out = el("div", { id: "list" });
    app.appendChild(out);
    async function load() {
      out.textContent = "";
      let res;
      try { res = EMBED ? localList(state) : await api("features?" + new URLSearchParams({ sae: state.sae, q: state.q, sort: state.sort, order: state.order, page: state.page, per_page: state.per })); }
      catch (e) { showError(out, e); return; }
      const pages = Math.max(1, Math.ceil(res.total / res.per_page));
      const ds = store.datasets;
      out.appendChild(table(["latent", "density", "mean act", "max act", "specificity (AUROC)", "top context"],
        res.rows.map(r => [featureLink(res.sae, res.sae_id, r.latent), num(r.density), num(r.mean_act), num(r.max_act),
          el("span", {}, num(r.specificity, 3), r.spec_dataset !== null && r.spec_dataset !== undefined && ds[r.spec_dataset] ? " " + ds[r.spec_dataset].spec : ""),
          el("span", { class: "ctx" }, visibleText(r.snippet || ""))]), { id: "feature-table" }));
      const prev = el("button", { id: "prev", text: "‹ previous", onclick: () => { state.page--; load(); } });
      const next = el("button", { id: "next", text: "next ›", onclick: () => { state.page++; load(); } });
      prev.disabled = state.page <= 0; next.disabled = state.page >= pages - 1;
      out.appendChild(el("div", { class: "pager" }, prev, el("span", { id: "page-info", text: "page " + (res.page + 1) + " of " + pages + " · " + res.total.toLocaleString() + " latents" }), next));
    }
    let timer = null;
    q.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(() => { state.q = q.value; state.page = 0; load(); }, 200); });
    saeSel.addEventListener("change", () => { state.sae = saeSel.value; state.page = 0; load(); });
    sort.addEventListener("change", () => { state.sort = sort.value; state.page = 0; load(); });
    order.addEventListener("change", () => { state.order = order.value; state.page = 0; load(); });
    await load();
  }
  function localList(state) {  /* the export's client-side version of /api/features */
    const sae = EMBED.store.saes.find(s => s.label === state.sae);
    let rows = EMBED.rows[String(sae.sae_id)];
    const q = state.q.trim();
    if (q.startsWith("#") && /^#\d+$/.test(q)) rows = rows.filter(r => r.latent === Number(q.slice(1)));
    else if (q) { const ql = q.toLowerCase(); rows = rows.filter(r => (r.search || "").toLowerCase().includes(ql)); }
    const k = state.sort, sgn = state.order === "asc" ? 1 : -1;
    rows = [...rows].sort((a, b) => (a[k] === null) - (b[k] === null) || sgn * ((a[k] || 0) - (b[k] || 0)) || a.latent - b.latent);
    return { sae: sae.label, sae_id: sae.sae_id, total: rows.length, page: state.page, per_page: state.per, rows: rows.slice(state.page * state.per, (state.page + 1) * state.per) };
  }

  /* ---------------------------------------------------------------- one feature */
  async function pageFeature() {
    let f;
    try { f = EMBED ? EMBED.feature : await api("feature/" + B.dataset.latent + "?sae=" + encodeURIComponent(B.dataset.sae || "")); }
    catch (e) { app.textContent = ""; showError(app, e); return; }
    app.textContent = "";
    app.appendChild(el("h1", { id: "feature-title", text: f.sae + " · latent #" + f.latent }));
    app.appendChild(el("p", { class: "muted", text: "hook " + f.hook + " · " + f.d_sae + " latents" }));
    const stats = el("div", { class: "grid2" });
    stats.appendChild(el("div", { class: "card" }, el("h3", { text: "Statistics (all datasets)" }),
      table(["density", "mean act (active)", "max act", "active tokens"], [[el("span", { id: "stat-density" }, num(f.density)), el("span", { id: "stat-mean" }, num(f.mean_act)), el("span", { id: "stat-max" }, num(f.max_act)), String(f.n_active)]]),
      el("h3", { text: "Per dataset" }),
      table(["dataset", "density", "mean act", "max act", "AUROC vs rest"], f.per_dataset.map(d => [d.spec, num(d.density), num(d.mean_act), num(d.max_act), num(d.auroc, 3)]), { id: "per-dataset" })));
    stats.appendChild(histogram(f.histogram));
    app.appendChild(stats);
    const maxAct = f.max_act;
    const logit = el("div", { class: "card", id: "logits" }, el("h3", { text: "Logit effects (" + f.logits.label + ")" }));
    if (f.logits.positive.length) {
      logit.appendChild(el("div", { class: "grid2" },
        table(["promoted token", "effect"], f.logits.positive.map(t => [el("span", { class: "ctx" }, visibleText(t[1])), num(t[2])]), { id: "logits-pos" }),
        table(["suppressed token", "effect"], f.logits.negative.map(t => [el("span", { class: "ctx" }, visibleText(t[1])), num(t[2])]), { id: "logits-neg" })));
    } else logit.appendChild(el("p", { class: "muted", text: "Not available: the hook's width differs from the unembedding's." }));
    const nb = el("div", { class: "card", id: "neighbours" }, el("h3", { text: "Nearest latents (decoder cosine, over all latents)" }),
      table(["latent", "cosine"], f.neighbours.map(n => [featureLink(f.sae, f.sae_id, n[0]), num(n[1], 3)])));
    if (f.other_saes.length) {
      nb.appendChild(el("h3", { text: "Same hook, other SAEs" }));
      nb.appendChild(table(["SAE", "same index", "Hungarian partner"], f.other_saes.map(o => [o.sae,
        o.same_index === null ? "–" : featureLink(o.sae, o.sae_id, o.same_index),
        o.matched ? el("span", {}, featureLink(o.sae, o.sae_id, o.matched.latent), " cos " + fmt(o.matched.cosine, 3)) : "–"]), { id: "other-saes" }));
    }
    app.appendChild(el("div", { class: "grid2" }, logit, nb));
    app.appendChild(el("h2", { text: "Top activating contexts" }));
    const top = el("div", { class: "card", id: "top-examples" });
    if (!f.top.length) top.appendChild(el("p", { class: "muted", text: "Never active." }));
    f.top.forEach(ex => top.appendChild(exampleRow(ex, maxAct)));
    app.appendChild(top);
    if (f.top_by_dataset.length > 1) {
      app.appendChild(el("h2", { text: "Top contexts per dataset" }));
      app.appendChild(el("div", { class: "grid2", id: "by-dataset" }, ...f.top_by_dataset.map(d => el("div", { class: "card" },
        el("h3", { text: d.spec }), ...(d.examples.length ? d.examples.map(ex => exampleRow(ex, maxAct)) : [el("p", { class: "muted", text: "Never active here." })])))));
    }
    app.appendChild(el("h2", { text: "Samples from activation-quantile intervals (active tokens, not in the top contexts)" }));
    const qbox = el("div", { class: "card", id: "quantile-examples" });
    f.quantiles.forEach(q => {
      qbox.appendChild(el("h3", { text: "interval " + (q.interval + 1) + ": " + fmt(q.lo) + " – " + fmt(q.hi) }));
      q.examples.forEach(ex => qbox.appendChild(exampleRow(ex, maxAct)));
    });
    app.appendChild(qbox);
    if (MODE === "export") app.appendChild(el("p", { class: "muted", id: "panels-note", text: "Steering and the live test need the server: dsae dashboard STORE." }));
    else window.dsae.panels.feature(app, f);
  }

  /* ---------------------------------------------------------------- prompt */
  async function pagePrompt() {
    const store = await api("store");
    app.textContent = "";
    app.appendChild(el("h1", { text: "Prompt" }));
    const saeSel = el("select", { id: "sae-select" }, ...store.saes.map(s => el("option", { value: s.label, text: s.label + " (" + s.hook + ")" })));
    if (B.dataset.sae) saeSel.value = B.dataset.sae;
    const kind = kindSelect("prompt-kind");
    const ta = el("textarea", { id: "prompt-text", placeholder: "Type a prompt…", spellcheck: "false" });
    const go = el("button", { id: "prompt-go", text: "Analyse" });
    app.appendChild(el("div", { class: "controls" }, saeSel, kind, go));
    app.appendChild(ta);
    const out = el("div", { id: "prompt-out" });
    app.appendChild(out);
    const steer = window.dsae.panels.steer({ sae: () => saeSel.value, body: () => promptBody(kind.value, ta.value), latentInput: true });
    let shown = 0;
    go.addEventListener("click", async () => {
      out.textContent = ""; const mine = ++shown;
      const body = Object.assign({ sae: saeSel.value }, promptBody(kind.value, ta.value));
      go.disabled = true;
      let res;
      try { res = await api("prompt", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) }); }
      catch (e) { if (mine === shown) showError(out, e); go.disabled = false; return; }
      go.disabled = false;
      if (mine === shown) renderPrompt(out, res, () => mine === shown, steer.setLatent);
    });
    app.appendChild(steer.box);
  }
  function renderPrompt(out, res, current, steerLatent) {
    const toks = res.tokens;
    const acts = toks.map(t => t.activation.length ? t.activation[0].value : 0);
    const maxAct = Math.max(0, ...acts);
    let selected = toks.reduce((b, t, i) => (acts[i] > acts[b] ? i : b), 0);
    const tokBox = el("div", { class: "card", id: "prompt-tokens" });
    const detail = el("div", { id: "token-detail" });
    const prog = el("div", { class: "progress" }, el("div", { id: "ablation-bar" }));
    const progText = el("span", { class: "muted", id: "ablation-status", text: "ablation: queued" });
    out.appendChild(el("p", { class: "muted", text: res.n_tokens + " tokens · SAE " + res.sae + " · click a token to see its latents; colour = strongest activation" }));
    out.appendChild(tokBox);
    out.appendChild(el("div", {}, progText, prog));
    out.appendChild(detail);
    const draw = () => {
      tokBox.textContent = "";
      tokBox.appendChild(renderTokens(toks.map(t => t.text), acts, maxAct, -1, toks.map(t => t.segment), (i) => { selected = i; draw(); }, selected));
      drawDetail();
    };
    const col = (id, title, entries, digits, note) => el("div", { class: "card", id: id }, el("h3", { text: title }),
      entries === null ? el("p", { class: "muted", text: note || "computing…" }) :
        entries.length ? el("ol", {}, ...entries.map(e => el("li", {}, featureLink(res.sae, null, e.latent), " ", num(e.value, digits), " ",
          el("button", { class: "mini steer-pick", "data-latent": e.latent, title: "steer with this latent", text: "steer", onclick: () => steerLatent(e.latent) })))) : el("p", { class: "muted", text: "none" }));
    const drawDetail = () => {
      const t = toks[selected];
      detail.textContent = "";
      detail.appendChild(el("h2", { id: "token-title" }, "Token " + selected + ": ", el("span", { class: "ctx" }, visibleText(t.text)),
        t.next_ce === null ? "" : " · next-token loss " + fmt(t.next_ce) + " nats"));
      detail.appendChild(el("div", { class: "metrics4" },
        col("col-activation", "Activation", t.activation, 4),
        col("col-quantile", "Quantile within the latent", t.quantile, 3),
        col("col-logit", "Direct logit effect on the next token (direct path)", t.logit, 4),
        col("col-ablation", "Loss change on the next token when ablated (nats)", t.ablation, 4, t.next_ce === null ? "last token: no next token" : "computing…")));
    };
    draw();
    pollJob(res.job, (j) => {
      if (!current()) return;
      document.getElementById("ablation-bar").style.width = (j.total ? 100 * j.done / j.total : 100).toFixed(0) + "%";
      progText.textContent = "ablation: " + j.status + " (" + j.done + "/" + j.total + " latents)";
      if (j.status === "done") { j.result.forEach((a, i) => { toks[i].ablation = a; }); drawDetail(); }
      if (j.status === "error") progText.textContent = "ablation failed: " + j.error;
      if (j.status === "cancelled") progText.textContent = "ablation: cancelled (a newer prompt replaced it)";
    }, 400).catch(e => { if (current()) progText.textContent = "ablation failed: " + e.message; });
  }

  /* ---------------------------------------------------------------- comparison */
  async function pageCompare() {
    let c;
    const params = { a: B.dataset.a || "", b: B.dataset.b || "", page: 0 };
    const none = () => { app.textContent = ""; app.appendChild(el("h1", { id: "compare-title", text: "Compare" }));
      app.appendChild(el("p", { class: "muted", id: "no-comparison", text: "This store holds no pair of SAEs on the same hook, so there is nothing to compare." })); };
    const load = async () => {
      try {
        if (!EMBED && !(await api("store")).comparisons.length) { none(); return; }
        c = EMBED ? EMBED.compare : await api("compare?" + new URLSearchParams(params));
      } catch (e) { app.textContent = ""; showError(app, e); return; }
      if (!c) { none(); return; }
      draw();
    };
    const draw = () => {
      app.textContent = "";
      app.appendChild(el("h1", { id: "compare-title", text: c.a + " vs " + c.b }));
      if (!EMBED && c.comparisons.length > 1) {
        const sel = el("select", { id: "compare-select" }, ...c.comparisons.map(x => el("option", { value: x.a + "\u0000" + x.b, text: x.a + " vs " + x.b })));
        sel.value = c.a + "\u0000" + c.b;
        sel.addEventListener("change", () => { [params.a, params.b] = sel.value.split("\u0000"); params.page = 0; load(); });
        app.appendChild(el("div", { class: "controls" }, sel));
      }
      app.appendChild(el("p", {}, "hook " + c.hook + " · one-to-one Hungarian matching by decoder cosine · matched (cos ≥ " + fmt(c.threshold, 2) + "): ",
        el("strong", { id: "matched-fraction" }, num(c.matched_fraction, 3)), " · mean pair cosine ", num(c.mean_cosine, 3), c.note ? " · " + c.note : ""));
      const pages = Math.max(1, Math.ceil(c.n_pairs / c.per_page));
      app.appendChild(el("h2", { text: "Matched pairs (highest cosine first)" }));
      app.appendChild(table(["cosine", c.a, "top context", c.b, "top context"], c.pairs.map(p => [num(p.cosine, 3),
        featureLink(c.a, c.a_id, p.a), el("span", { class: "ctx" }, visibleText(p.a_info.snippet)),
        featureLink(c.b, c.b_id, p.b), el("span", { class: "ctx" }, visibleText(p.b_info.snippet))]), { id: "pairs" }));
      if (!EMBED) {
        const prev = el("button", { text: "‹ previous", onclick: () => { params.page--; load(); } });
        const next = el("button", { text: "next ›", onclick: () => { params.page++; load(); } });
        prev.disabled = c.page <= 0; next.disabled = c.page >= pages - 1;
        app.appendChild(el("div", { class: "pager" }, prev, el("span", { text: "page " + (c.page + 1) + " of " + pages }), next));
      }
      const un = (side, label, id, sid) => el("div", { class: "card" }, el("h3", { text: "No match in the other SAE: " + label }),
        table(["latent", "best pair cosine"], side.map(u => [featureLink(label, sid, u.latent), num(u.best_pair_cosine, 3)]), { id: id }));
      app.appendChild(el("div", { class: "grid2" }, un(c.unmatched_a, c.a, "unmatched-a", c.a_id), un(c.unmatched_b, c.b, "unmatched-b", c.b_id)));
      app.appendChild(el("h2", { text: "Most-rotated latents (decoder cosine to the parent's same latent)" }));
      if (c.parent && c.rotated.length) {
        const child = c.parent === c.a ? c.b : c.a, cid = c.parent === c.a ? c.b_id : c.a_id;
        app.appendChild(el("p", { class: "muted", text: child + " was fine-tuned from " + c.parent + "." }));
        app.appendChild(table(["latent", "cosine to parent"], c.rotated.map(r => [featureLink(child, cid, r.latent), num(r.cosine, 3)]), { id: "rotated" }));
      } else app.appendChild(el("p", { class: "muted", id: "rotated", text: "Neither SAE was fine-tuned from the other (no lineage in their metadata)." }));
    };
    await load();
  }

  window.dsae = { MODE, ROOT, el, fmt, num, api, showError, featureLink, renderTokens, visibleText, promptBody, kindSelect, pollJob, panels: null };
  const pages = { list: pageList, feature: pageFeature, prompt: pagePrompt, compare: pageCompare };
  document.addEventListener("DOMContentLoaded", () => {
    (pages[PAGE] || pageList)().catch(e => { app.textContent = ""; showError(app, e); })
      .finally(() => { B.dataset.ready = "1"; });  /* drawn (tests wait for body[data-ready]) */
  });
})();
