/* domain-sae dashboard: the steering and live-test panels (served pages only; they need the model).
   Loaded after app.js; uses its helpers (window.dsae) and adds window.dsae.panels. Strings are inserted as text. */
"use strict";
(function () {
  const D = window.dsae;
  const el = D.el, num = D.num, fmt = D.fmt;
  const post = (path, body) => D.api(path, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });

  function rows(head, data, id) {
    const t = el("table", { id: id });
    t.appendChild(el("thead", {}, el("tr", {}, ...head.map(h => el("th", { text: h })))));
    t.appendChild(el("tbody", {}, ...data.map(r => el("tr", {}, ...r.map(c => el("td", {}, typeof c === "string" ? document.createTextNode(c) : c))))));
    return t;
  }

  /* Steering. opts.sae(): the SAE label; opts.latent: a fixed latent, or opts.latentInput: a latent box;
     opts.body(): {text} or {messages} of the page's prompt, or absent: the panel has its own prompt box. */
  function steer(opts) {
    const box = el("div", { class: "card", id: "steer-panel" }, el("h2", { text: "Steering" }),
      el("p", { class: "muted", text: "add: the latent's decoder direction times strength × its max activation in the store; clamp: the latent set to strength × that max (0 ablates it). " +
        "Applied at every position of the SAE's hook, prompt and continuation. Greedy continuations without and with it, and the change in mean next-token loss on the prompt." }));
    const controls = el("div", { class: "controls" });
    let latentIn = null, kind = null, own = null;
    if (opts.latentInput) { latentIn = el("input", { type: "number", id: "steer-latent", min: 0, step: 1, placeholder: "latent #" }); controls.appendChild(el("label", {}, "latent ", latentIn)); }
    const mode = el("select", { id: "steer-mode" }, el("option", { value: "add", text: "add direction" }), el("option", { value: "clamp", text: "clamp latent" }));
    const strength = el("input", { type: "number", id: "steer-strength", min: -10, max: 10, step: 0.5, value: 4 });
    const tokens = el("input", { type: "number", id: "steer-tokens", min: 1, max: 64, step: 1, value: 24 });
    const go = el("button", { id: "steer-go", text: "Steer" }), stop = el("button", { id: "steer-stop", text: "Stop" });
    stop.disabled = true;
    const status = el("span", { class: "muted", id: "steer-status" });
    controls.append(mode, el("label", {}, "strength ", strength), el("label", {}, "new tokens ", tokens), go, stop, status);
    if (!opts.body) { kind = D.kindSelect("steer-kind"); own = el("textarea", { id: "steer-prompt", placeholder: "A prompt to continue…", spellcheck: "false" }); box.append(kind, own); }
    box.appendChild(controls);
    const out = el("div", { id: "steer-out" });
    box.appendChild(out);
    let job = null;
    const render = (r) => {
      out.appendChild(el("p", { id: "steer-summary" }, r.mode + " latent #" + r.latent + " at strength " + fmt(r.strength, 3) + " × max activation " + fmt(r.unit) + " = ",
        num(r.value), " · mean next-token loss on the prompt (" + r.loss.targets + " targets): ", num(r.loss.clean), " → ", num(r.loss.steered), " nats, change ",
        el("strong", { id: "steer-loss" }, num(r.loss.delta))));
      const side = (id, title, g) => el("div", { class: "card", id: id }, el("h3", { text: title }), el("div", { class: "ctx" }, D.visibleText(g.text)));
      out.appendChild(el("div", { class: "grid2" }, side("steer-clean", "Without", r.clean), side("steer-steered", "With " + r.mode + " (strength " + fmt(r.strength, 3) + ")", r.steered)));
    };
    go.addEventListener("click", async () => {
      out.textContent = "";
      const latent = latentIn ? (latentIn.value === "" ? null : Number(latentIn.value)) : opts.latent;
      const body = Object.assign({ sae: opts.sae(), latent: latent, mode: mode.value, strength: Number(strength.value), max_new_tokens: Number(tokens.value) },
        opts.body ? opts.body() : D.promptBody(kind.value, own.value));
      go.disabled = true; stop.disabled = false; status.textContent = "steering: queued";
      try {
        job = (await post("steer", body)).job;
        const j = await D.pollJob(job, (j) => { status.textContent = "steering: " + j.status + " (" + j.done + "/" + j.total + " steps)"; }, 200);
        if (j.status === "done") { status.textContent = "steering: done"; render(j.result); }
        else if (j.status === "error") D.showError(out, new Error(j.error));
        else status.textContent = "steering: cancelled";
      } catch (e) { status.textContent = ""; D.showError(out, e); }
      job = null; go.disabled = false; stop.disabled = true;
    });
    stop.addEventListener("click", async () => {
      if (job) { try { await D.api("job/" + job, { method: "DELETE" }); } catch (e) { D.showError(out, e); } }
    });
    return { box: box, setLatent: (i) => { if (latentIn) { latentIn.value = i; latentIn.scrollIntoView({ block: "center" }); latentIn.focus(); } } };
  }

  /* Live test of one latent: its activation and quantile on every token of a typed text. */
  function live(f) {
    const box = el("div", { class: "card", id: "live-panel" }, el("h2", { text: "Live test" }),
      el("p", { class: "muted", text: "Type text: this latent's activation on every token (the SAE's own activation, as on the prompt page) and, where active, its quantile among the latent's active values in the store." }));
    const kind = D.kindSelect("live-kind"), ta = el("textarea", { id: "live-text", placeholder: "Type text to test this latent on…", spellcheck: "false" });
    const go = el("button", { id: "live-go", text: "Run" }), status = el("span", { class: "muted", id: "live-status" });
    const out = el("div", { id: "live-out" });
    box.append(el("div", { class: "controls" }, kind, go, status), ta, out);
    let seq = 0, timer = null;
    const run = async () => {
      clearTimeout(timer);
      const mine = ++seq;
      status.textContent = "running…";
      let r;
      try { r = await post("live", Object.assign({ sae: f.sae, latent: f.latent }, D.promptBody(kind.value, ta.value))); }
      catch (e) { if (mine === seq) { status.textContent = ""; out.textContent = ""; D.showError(out, e); } return; }
      if (mine !== seq) return;
      status.textContent = r.n_tokens + " tokens";
      out.textContent = "";
      const acts = r.tokens.map(t => t.activation);
      const maxAct = Math.max(f.max_act || 0, ...acts);
      out.appendChild(el("div", { id: "live-tokens" }, D.renderTokens(r.tokens.map(t => t.text), acts, maxAct, -1, r.tokens.map(t => t.segment))));
      out.appendChild(rows(["token", "text", "activation", "quantile"], r.tokens.map(t => [String(t.i), el("span", { class: "ctx" }, D.visibleText(t.text)), num(t.activation), num(t.quantile, 3)]), "live-table"));
    };
    go.addEventListener("click", run);
    ta.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(run, 600); });
    return box;
  }

  D.panels = {
    steer: steer,
    feature: (app, f) => {
      app.appendChild(el("h2", { text: "Act on this latent" }));
      app.appendChild(el("div", { class: "grid2", id: "act-panels" }, live(f), steer({ sae: () => f.sae, latent: f.latent }).box));
    },
  };
})();
