// The sialoop dashboard: hash routes over the JSON API (or, in an exported file, over the
// responses embedded in it). Everything shown is escaped; nothing is fetched from elsewhere.
"use strict";
(function () {
  const EMBED = window.SIALOOP_EMBED || null;
  const POLL_MS = 2000;
  const PAGE = 50;
  const $app = document.getElementById("app");
  const $crumbs = document.getElementById("crumbs");
  const $live = document.getElementById("live");
  const C = window.SialoopChart;
  let pollTimer = null, lastStamp = null, renderToken = 0;

  const esc = (s) => (s === null || s === undefined ? "" : String(s)).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
  const num = (x, d = 4) => (x === null || x === undefined || !isFinite(x) ? "–" : (+x).toFixed(d));
  const pval = (p) => (p === null || p === undefined ? "–" : p < 0.001 ? "<0.001" : (+p).toFixed(3));
  const badge = (s) => `<span class="badge ${esc(s)}">${esc(s)}</span>`;
  const enc = encodeURIComponent;

  // -- data ------------------------------------------------------------------------------
  async function api(path, params) {
    if (EMBED) return embedded(path, params || {});
    const q = params ? "?" + Object.entries(params).filter(([, v]) => v !== "" && v !== null && v !== undefined).map(([k, v]) => `${k}=${enc(v)}`).join("&") : "";
    const r = await fetch(`api${path}${q}`, { cache: "no-store" });
    if (!r.ok) {
      let detail = r.statusText;
      try { detail = (await r.json()).detail || detail; } catch (e) { /* not JSON */ }
      throw new Error(`${r.status}: ${detail}`);
    }
    return r.json();
  }

  function embedded(path, params) {
    const m = path.match(/^\/runs\/([^/]+)\/trajectories$/);
    if (m) {
      const all = EMBED.responses[path] || { items: [] };
      const items = all.items.filter((t) =>
        (!params.version || t.version === params.version) && (!params.split || t.split === params.split) &&
        (params.correct === undefined || params.correct === "" || String(t.correct) === String(params.correct)) &&
        (!params.error || (params.error === "any" ? t.error : params.error === "none" ? !t.error : t.error === params.error)));
      const offset = +params.offset || 0;
      return { total: items.length, offset, limit: PAGE, items: items.slice(offset, offset + PAGE), left_out: all.left_out, stored: all.stored };
    }
    if (!(path in EMBED.responses)) throw new Error(`not in this export: ${path} (the export holds a sample)`);
    return EMBED.responses[path];
  }

  // -- routing ---------------------------------------------------------------------------
  function route() {
    const hash = location.hash.replace(/^#/, "") || "/";
    const [path, query] = hash.split("?");
    const params = Object.fromEntries(new URLSearchParams(query || ""));
    const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
    if (parts[0] === "run" && parts[1]) {
      if (parts[2] === "gen") return { page: "generation", run: parts[1], gen: +parts[3] };
      if (parts[2] === "traj") return { page: "trajectories", run: parts[1], params };
      if (parts[2] === "t") return { page: "trajectory", run: parts[1], id: parts[3] };
      return { page: "run", run: parts[1] };
    }
    if (parts[0] === "compare") return { page: "compare", runs: (parts[1] || "").split(",").filter(Boolean) };
    return { page: "runs" };
  }

  async function render(quiet) {
    const r = route(), token = ++renderToken;
    const pages = { runs: pageRuns, run: pageRun, generation: pageGeneration, trajectories: pageTrajectories, trajectory: pageTrajectory, compare: pageCompare };
    try {
      const html = await pages[r.page](r);
      if (token !== renderToken) return;
      const y = window.scrollY;
      $app.innerHTML = html;
      if (quiet) window.scrollTo(0, y);
      bind(r);
      document.body.dataset.renderedMs = String(Math.round(performance.now()));
      document.body.dataset.rendered = r.page;
    } catch (err) {
      if (token !== renderToken) return;
      $app.innerHTML = `<div class="card error">${esc(err.message)}</div>`;
      document.body.dataset.rendered = "error";
    }
    watch(r);
  }

  function crumbs(items) {
    $crumbs.innerHTML = items.map(([label, href]) => (href ? `<a href="${href}">${esc(label)}</a>` : `<span>${esc(label)}</span>`)).join("<span>/</span>");
  }

  // A run page polls the run's stamp and re-renders when the run wrote something.
  function watch(r) {
    clearTimeout(pollTimer);
    if (EMBED || !r.run) { $live.hidden = true; return; }
    const tick = async () => {
      try {
        const s = await api(`/runs/${enc(r.run)}/stamp`);
        $live.hidden = s.status !== "running";
        if (lastStamp && lastStamp.run === r.run && lastStamp.stamp !== s.stamp) {
          lastStamp = { run: r.run, stamp: s.stamp };
          await render(true);
          return;
        }
        lastStamp = { run: r.run, stamp: s.stamp };
      } catch (e) { /* the server went away: try again */ }
      pollTimer = setTimeout(tick, POLL_MS);
    };
    pollTimer = setTimeout(tick, lastStamp && lastStamp.run === r.run ? POLL_MS : 0);
  }

  function bind(r) {
    const cmp = document.getElementById("compare");
    if (cmp) cmp.onclick = () => {
      const picked = [...document.querySelectorAll("input[name=pick]:checked")].map((i) => i.value);
      if (picked.length) location.hash = `#/compare/${picked.map(enc).join(",")}`;
    };
    document.querySelectorAll("tr[data-href]").forEach((tr) => {
      tr.onclick = (ev) => { if (ev.target.tagName !== "INPUT" && ev.target.tagName !== "A") location.hash = tr.dataset.href; };
    });
    const form = document.getElementById("filters");
    if (form) form.onchange = () => {
      const p = Object.fromEntries([...new FormData(form)].filter(([, v]) => v !== ""));
      location.hash = `#/run/${enc(r.run)}/traj?` + new URLSearchParams(p).toString();
    };
  }

  // -- pages -----------------------------------------------------------------------------
  async function pageRuns() {
    crumbs([["runs"]]);
    const runs = await api("/runs");
    if (!runs.length) return `<div class="card">No runs in this folder yet: start one with <code>sialoop run</code>.</div>`;
    const rows = runs.map((r) => `<tr class="clickable" data-href="#/run/${enc(r.dir)}">
      <td><input type="checkbox" name="pick" value="${esc(r.dir)}"></td>
      <td><a href="#/run/${enc(r.dir)}">${esc(r.run_id)}</a></td><td>${esc(r.task)}</td>
      <td>${badge(r.status)} <span class="note">${esc(r.reason || "")}</span></td>
      <td class="num">${num(r.best_val)}</td><td class="num">${num(r.best_test)}</td>
      <td class="num">${num(r.minutes, 1)}</td><td class="num">${r.generations ?? "–"}</td>
      <td>${esc((r.isolation || []).join(", "))}</td><td>${esc(r.model || "")}</td></tr>`).join("");
    return `<h1>Runs</h1><table id="runs"><thead><tr><th></th><th>run</th><th>task</th><th>status</th>
      <th class="num">best val</th><th class="num">test</th><th class="num">minutes</th><th class="num">generations</th>
      <th>isolation</th><th>model</th></tr></thead><tbody>${rows}</tbody></table>
      <p><button id="compare">compare selected side by side</button></p>`;
  }

  function incumbentLine(s) {
    const val = (v) => (v.scores.val || {}).value;
    const line = [];
    for (const v of s.versions) {
      if (v.status === "accepted" && val(v) !== undefined && val(v) !== null) line.push([v.generation, val(v)]);
    }
    return line;
  }

  function generationChart(s, key, label) {
    const points = s.versions.map((v) => {
      const sc = v.scores.val || {};
      const y = key === "value" ? sc.value : sc.seconds_per_item;
      const lever = v.generation === 0 ? "baseline" : v.kind;
      return { x: v.generation, y: y ?? null, cls: v.status, shape: lever, id: v.version,
        href: `#/run/${enc(s.run_id_dir)}/gen/${v.generation}`,
        title: `${v.version} (${lever}${v.method ? " " + v.method : ""}) ${v.status}: ${label} ${y ?? "no score"}${v.error ? " — " + v.error : ""}` };
    });
    const o = { points, direction: key === "value" ? s.direction : "lower", yLabel: label, label };
    if (key === "value") {
      o.line = incumbentLine(s);
      const best = s.versions.find((v) => v.version === s.best);
      if (best && s.best_test !== null && s.best_test !== undefined) o.marks = [{ x: best.generation, y: s.best_test, label: `test ${num(s.best_test)}`, title: `${best.version} on test (n ${(best.scores.test || {}).n})` }];
    } else {
      const acc = s.versions.filter((v) => v.status === "accepted" && (v.scores.val || {}).seconds_per_item != null);
      o.line = acc.map((v) => [v.generation, v.scores.val.seconds_per_item]);
    }
    return C.generations(o);
  }

  function legend() {
    return `<div class="legend"><span><i style="background:var(--accepted)"></i>accepted</span><span><i style="background:var(--rejected)"></i>rejected</span>
      <span><i style="background:var(--broken)"></i>broken</span><span><i style="background:var(--candidate)"></i>waiting for its gate</span>
      <span>● harness &nbsp;■ weights &nbsp;◆ generation 0 &nbsp;— incumbent &nbsp;★ test (once, best version)</span></div>`;
  }

  function tree(s) {
    const kids = {};
    for (const v of s.versions) (kids[v.parent || ""] = kids[v.parent || ""] || []).push(v);
    const known = new Set(s.versions.map((v) => v.version));
    const roots = s.versions.filter((v) => !v.parent || !known.has(v.parent));
    const node = (v) => `<li><a href="#/run/${enc(s.run_id_dir)}/gen/${v.generation}">${esc(v.version)}</a> ${badge(v.status)}
      <span class="note">gen ${v.generation} · ${esc(v.kind)}${v.method ? " " + esc(v.method) : ""} · val ${num((v.scores.val || {}).value)}${v.version === s.best ? " ★ best" : ""}</span>
      ${(kids[v.version] || []).length ? `<ul>${kids[v.version].map(node).join("")}</ul>` : ""}</li>`;
    return `<div class="tree" id="lineage"><ul>${roots.map(node).join("")}</ul></div>`;
  }

  async function summaryOf(run) {
    const s = await api(`/runs/${enc(run)}/summary`);
    s.run_id_dir = run;
    return s;
  }

  function figures(s) {
    return `<div class="figures">
      <div>status<b>${badge(s.status)}</b><span class="note">${esc(s.reason || "")}</span></div>
      <div>task<b>${esc(s.task)}</b></div><div>metric<b>${esc(s.metric || "–")}</b><span class="note">${esc(s.direction)} is better</span></div>
      <div>best<b>${esc(s.best || "–")}</b></div><div>best val<b>${num(s.best_val)}</b></div>
      <div>holdout<b>${num(s.best_holdout)}</b></div><div>test<b>${num(s.best_test)}</b></div>
      <div>minutes<b>${num(s.minutes, 1)}</b></div><div>isolation<b>${esc((s.isolation || []).join(", ") || "–")}</b></div>
      <div>model<b style="font-size:13px">${esc(s.model || "–")}</b></div></div>`;
  }

  async function pageRun(r) {
    const s = await summaryOf(r.run);
    crumbs([["runs", "#/"], [s.run_id]]);
    const decisions = s.decisions.map((d) => `<tr class="clickable" data-href="#/run/${enc(r.run)}/gen/${d.generation}">
      <td class="num"><a href="#/run/${enc(r.run)}/gen/${d.generation}">${d.generation}</a></td><td>${esc(d.lever)}</td><td>${esc(d.method || "")}</td>
      <td>${esc(d.rule || "")}</td><td>${esc(d.rationale)}</td></tr>`).join("");
    const versions = s.versions.map((v) => {
      const g = v.gate || {};
      return `<tr><td><a href="#/run/${enc(r.run)}/gen/${v.generation}">${esc(v.version)}</a>${v.version === s.best ? " ★" : ""}</td><td class="num">${v.generation}</td>
      <td>${esc(v.kind)}${v.method ? " " + esc(v.method) : ""}</td><td>${esc(v.parent || "–")}</td><td>${badge(v.status)} <span class="note error">${esc(v.error || "")}</span></td>
      <td class="num">${num((v.scores.val || {}).value)}</td><td class="num">${(v.scores.val || {}).n ?? ""}</td><td class="num">${num((v.scores.test || {}).value)}</td>
      <td class="num">${num((v.scores.val || {}).seconds_per_item, 3)}</td><td>${g.verdict ? esc(g.verdict) + " p " + pval(g.p_value) + " n " + g.n_paired : "–"}</td></tr>`;
    }).join("");
    const errors = s.errors.length ? `<table><thead><tr><th>kind</th><th class="num">count</th><th class="num">the machine's</th><th>where</th><th>example</th></tr></thead><tbody>${s.errors.map((e) => `<tr>
      <td><a href="#/run/${enc(r.run)}/traj?error=${enc(e.kind)}">${esc(e.kind)}</a></td><td class="num">${e.count}</td><td class="num">${e.infra}</td>
      <td>${Object.entries(e.where).map(([w, c]) => `${esc(w)} ${c}`).join(", ")}</td><td class="note">${esc(e.example || "")}</td></tr>`).join("")}</tbody></table>` : `<p class="muted">No trajectory failed.</p>`;
    const counts = s.trajectory_counts.map((c) => `<tr class="clickable" data-href="#/run/${enc(r.run)}/traj?version=${enc(c.version)}&split=${enc(c.split)}">
      <td>${esc(c.version)}</td><td>${esc(c.split)}</td><td class="num">${c.n}</td><td class="num">${c.errors}</td><td class="num">${num(c.mean_score)}</td></tr>`).join("");
    const progress = s.status === "running" && s.progress.length ? `<div class="card" id="progress"><h2>Progress</h2><pre>
${esc(s.progress.slice(-8).join("\n"))}</pre></div>` : "";
    return `<h1>Run ${esc(s.run_id)}</h1><div class="card">${figures(s)}</div>
      <div class="grid"><div class="card" id="score-chart"><h2>Val score per generation</h2>${generationChart(s, "value", s.metric || "score")}${legend()}</div>
      <div class="card" id="cost-chart"><h2>Cost per item</h2>${generationChart(s, "seconds", "seconds per item")}<p class="note">Seconds per val item: the harness's, plus the scorer's run of the program it returns (a program task); the line follows the incumbent.</p></div></div>${progress}
      <div class="grid"><div class="card"><h2>Lineage</h2>${tree(s)}</div>
      <div class="card"><h2>Decisions</h2><table id="decisions"><thead><tr><th class="num">gen</th><th>lever</th><th>method</th><th>rule</th><th>rationale</th></tr></thead><tbody>${decisions}</tbody></table></div></div>
      <div class="card"><h2>Versions</h2><table id="versions"><thead><tr><th>version</th><th class="num">gen</th><th>made by</th><th>parent</th><th>status</th>
      <th class="num">val</th><th class="num">n</th><th class="num">test</th><th class="num">s/item</th><th>gate</th></tr></thead><tbody>${versions}</tbody></table></div>
      <div class="grid"><div class="card"><h2>Errors by kind</h2>${errors}</div>
      <div class="card"><h2>Trajectories</h2><table><thead><tr><th>version</th><th>split</th><th class="num">n</th><th class="num">errors</th><th class="num">mean score</th></tr></thead><tbody>${counts}</tbody></table>
      <p><a href="#/run/${enc(r.run)}/traj">all trajectories</a></p></div></div>`;
  }

  function diffView(diff) {
    if (!diff) return `<p class="muted">No diff: the harness did not change.</p>`;
    const lines = diff.split("\n").map((l) => {
      const cls = l.startsWith("@@") ? "hunk" : l.startsWith("+") && !l.startsWith("+++") ? "add" : l.startsWith("-") && !l.startsWith("---") ? "del" : "";
      return `<span class="${cls}">${esc(l) || " "}</span>`;
    });
    return `<pre class="diff">${lines.join("")}</pre>`;
  }

  // A value of many entries (a score's per-unit figures) is folded: its size and, when the
  // entries are numbers, their mean and range.
  const FOLD = 12;
  function value(v) {
    if (v === null) return `<span class="muted">none</span>`;
    if (typeof v === "number") return esc(C.fmt(v));
    if (typeof v !== "object") return esc(v);
    const items = Array.isArray(v) ? v : Object.values(v);
    if (items.length <= FOLD) return `<code>${esc(JSON.stringify(v))}</code>`;
    const nums = items.filter((x) => typeof x === "number" && Number.isFinite(x));
    const stats = nums.length === items.length
      ? ` · mean ${C.fmt(nums.reduce((a, b) => a + b, 0) / nums.length)}, min ${C.fmt(Math.min(...nums))}, max ${C.fmt(Math.max(...nums))}`
      : "";
    return `<details class="folded"><summary>${items.length} ${Array.isArray(v) ? "values" : "entries"}${stats}</summary><code>${esc(JSON.stringify(v))}</code></details>`;
  }

  function kv(obj, skip) {
    const rows = Object.entries(obj || {}).filter(([k, v]) => !(skip || []).includes(k) && v !== undefined);
    if (!rows.length) return `<p class="muted">none</p>`;
    return `<dl class="kv">${rows.map(([k, v]) => `<dt>${esc(k)}</dt><dd>${value(v)}</dd>`).join("")}</dl>`;
  }

  // An output as stored (JSON text): an object's multi-line strings (a program task's program)
  // are shown as text, each under its key; anything else as the JSON itself.
  function outputView(text) {
    let parsed;
    try { parsed = JSON.parse(text); } catch (e) { return `<pre>\n${esc(text)}</pre>`; }
    if (typeof parsed === "string") return `<pre>\n${esc(parsed)}</pre>`;
    if (!parsed || typeof parsed !== "object" || Array.isArray(parsed)) return `<pre>\n${esc(text)}</pre>`;
    const long = Object.entries(parsed).filter(([, v]) => typeof v === "string" && v.includes("\n"));
    if (!long.length) return `<pre>\n${esc(text)}</pre>`;
    const rest = Object.fromEntries(Object.entries(parsed).filter(([, v]) => !(typeof v === "string" && v.includes("\n"))));
    return `${Object.keys(rest).length ? kv(rest) : ""}${long.map(([k, v]) => `<h3>${esc(k)} (${v.split("\n").length} lines)</h3><pre class="output-text">\n${esc(v)}</pre>`).join("")}`;
  }

  function gateView(g) {
    if (!g) return `<p class="muted">Not gated yet (or broken before its gate).</p>`;
    const looks = (g.looks || []).length > 1 ? `<h3>Looks</h3><table><thead><tr><th class="num">n</th><th class="num">p</th><th class="num">nominal alpha</th><th>verdict</th></tr></thead><tbody>${g.looks.map((l) => `<tr><td class="num">${l.n}</td><td class="num">${pval(l.p_value)}</td><td class="num">${num(l.nominal_alpha, 4)}</td><td>${esc(l.verdict)}</td></tr>`).join("")}</tbody></table>` : "";
    return `<div class="figures gate"><div>verdict<b>${badge(g.verdict)}</b></div><div>n paired<b>${g.n_paired}</b></div><div>p-value<b>${pval(g.p_value)}</b></div>
      <div>margin<b>${num(g.margin)}</b></div><div>wins<b>${g.wins}</b></div><div>losses<b>${g.losses}</b></div>
      <div>delta<b>${num(g.delta)}</b></div><div>incumbent<b>${num(g.incumbent_score)}</b></div><div>candidate<b>${num(g.candidate_score)}</b></div>
      <div>test<b style="font-size:13px">${esc(g.test)}</b></div></div><p class="note">${esc(g.reason)}</p>${looks}`;
  }

  function trainingView(t, files) {
    if (!t) return "";
    const curves = [{ name: "loss", values: t.losses || [] }];
    for (const [name, values] of Object.entries(t.curves || {})) curves.push({ name, values });
    const scalars = {};
    for (const k of ["method", "steps", "examples", "seconds", "first_loss", "last_loss", "mean_reward", "kl", "value_loss", "clip_fraction", "logprob_gap", "tokens_per_s", "groups", "skipped_groups", "resumed_from_step"]) if (t[k] !== null && t[k] !== undefined) scalars[k] = t[k];
    const adapter = files.length ? `<h3>Adapter</h3><table><tbody>${files.map((f) => `<tr><td><code>${esc(f.path)}</code></td><td class="num">${(f.bytes / 1024).toFixed(1)} KiB</td></tr>`).join("")}</tbody></table>` : "";
    return `<h3>Training</h3><div class="grid"><div>${curves.map((c) => c.values.length ? C.lines({ series: [c], label: c.name }) : "").join("") || `<p class="muted">no steps stored</p>`}</div><div>${kv(scalars)}</div></div>${adapter}`;
  }

  async function pageGeneration(r) {
    const [g, s] = await Promise.all([api(`/runs/${enc(r.run)}/generations/${r.gen}`), summaryOf(r.run)]);
    crumbs([["runs", "#/"], [s.run_id, `#/run/${enc(r.run)}`], [`generation ${r.gen}`]]);
    const decisions = g.decisions.map((d) => `<div class="card decision"><h2>Decision: ${esc(d.lever)}${d.method ? " · " + esc(d.method) : ""}</h2>
      <p>${esc(d.rationale)}</p><h3>Evidence it cites</h3>${kv(d.evidence)}${Object.keys(d.settings || {}).length ? `<h3>Settings</h3>${kv(d.settings)}` : ""}</div>`).join("");
    const cands = g.candidates.map((c) => `<div class="card candidate" data-version="${esc(c.version)}"><h2>${esc(c.version)} ${badge(c.status)} <span class="note">parent ${esc(c.parent || "–")} · adapter ${esc(c.adapter)}</span></h2>
      ${c.error ? `<pre class="error">
${esc(c.error)}</pre>` : ""}${c.note ? `<p>${esc(c.note)}</p>` : ""}${c.why ? `<p class="note">why: ${esc(c.why)}</p>` : ""}
      ${c.knobs ? `<h3>Knobs</h3>${kv(c.knobs)}` : ""}
      ${c.training ? trainingView(c.training, c.adapter_files) : `<h3>Diff against ${esc(c.parent || "nothing")}</h3>${diffView(c.diff)}`}
      ${c.program ? `<details class="program"><summary>the harness program (${c.program.split("\n").length} lines)</summary><pre>
${esc(c.program)}</pre></details>` : ""}
      <h3>Gate</h3>${gateView(c.gate)}
      <h3>Scores</h3><table><thead><tr><th>split</th><th class="num">value</th><th class="num">n</th><th class="num">errors</th><th class="num">s/item</th><th class="num">tok/item</th></tr></thead><tbody>
      ${Object.entries(c.scores).map(([split, sc]) => `<tr class="clickable" data-href="#/run/${enc(r.run)}/traj?version=${enc(c.version)}&split=${enc(split === "holdout" ? "val" : split)}"><td>${esc(split)}</td><td class="num">${num(sc.value)}</td><td class="num">${sc.n}</td><td class="num">${sc.errors}</td><td class="num">${num(sc.seconds_per_item, 3)}</td><td class="num">${num(sc.tokens_per_item, 0)}</td></tr>`).join("")}</tbody></table>
      </div>`).join("");
    const calls = g.agent_calls.length ? `<div class="card"><h2>Agent calls</h2>${g.agent_calls.map((a) => `<details><summary>${esc(a.role)} · ${esc(a.purpose)} · ${esc(a.provider)} ${esc(a.model)} · ${a.prompt_tokens ?? "?"}+${a.completion_tokens ?? "?"} tokens · ${num(a.seconds, 1)} s${a.error ? " · failed" : ""}</summary>
      ${a.error ? `<pre class="error">
${esc(a.error)}</pre>` : ""}${a.messages.map((m) => `<h3>${esc(m.role)}</h3><pre>
${esc(m.content)}</pre>`).join("")}<h3>response</h3><pre>
${esc(a.response)}</pre></details>`).join("")}</div>` : "";
    const nav = `<p>${r.gen > 0 ? `<a href="#/run/${enc(r.run)}/gen/${r.gen - 1}">← generation ${r.gen - 1}</a> · ` : ""}<a href="#/run/${enc(r.run)}/gen/${r.gen + 1}">generation ${r.gen + 1} →</a></p>`;
    return `<h1>Generation ${r.gen}</h1>${nav}${decisions || `<p class="muted">No decision stored for this generation.</p>`}${cands}${calls}`;
  }

  async function pageTrajectories(r) {
    const p = r.params, offset = +p.offset || 0;
    const [page, s] = await Promise.all([api(`/runs/${enc(r.run)}/trajectories`, { ...p, offset, limit: PAGE }), summaryOf(r.run)]);
    crumbs([["runs", "#/"], [s.run_id, `#/run/${enc(r.run)}`], ["trajectories"]]);
    const opt = (name, values, labels) => `<label>${name}<select name="${name}"><option value="">all</option>${values.map((v, i) => `<option value="${esc(v)}" ${String(p[name] ?? "") === String(v) ? "selected" : ""}>${esc(labels ? labels[i] : v)}</option>`).join("")}</select></label>`;
    const versions = [...new Set(s.trajectory_counts.map((c) => c.version))];
    const splits = [...new Set(s.trajectory_counts.map((c) => c.split))];
    const kinds = ["any", "none", ...s.errors.map((e) => e.kind)];
    const rows = page.items.map((t) => `<tr class="clickable" data-href="#/run/${enc(r.run)}/t/${enc(t.id)}">
      <td><a href="#/run/${enc(r.run)}/t/${enc(t.id)}">${esc(t.id)}</a></td><td>${esc(t.version)}</td><td>${esc(t.split)}</td><td>${esc(t.instance)}${t.sample ? " #" + t.sample : ""}</td>
      <td class="num">${num(t.score)}</td><td>${t.correct === null ? "–" : t.correct ? "✓" : "✗"}</td><td class="error">${esc(t.error || "")}</td>
      <td class="num">${num(t.seconds, 2)}</td><td class="num">${t.tokens ?? "–"}</td><td class="note">${esc(t.error_message || t.output || "")}</td></tr>`).join("");
    const link = (o) => `#/run/${enc(r.run)}/traj?` + new URLSearchParams({ ...p, offset: o }).toString();
    const cut = page.left_out ? `<p class="note">This export holds ${page.stored} of the run's trajectories; ${page.left_out} are left out.</p>` : "";
    return `<h1>Trajectories</h1><form id="filters" class="filters">${opt("version", versions)}${opt("split", splits)}${opt("correct", ["true", "false"], ["correct", "wrong"])}${opt("error", kinds, ["any error", "no error", ...s.errors.map((e) => e.kind)])}</form>
      ${cut}<div class="pager"><span id="total">${page.total} trajectories</span>${offset > 0 ? `<a href="${link(Math.max(0, offset - PAGE))}">← previous</a>` : ""}
      <span>${page.total ? offset + 1 : 0}-${Math.min(offset + PAGE, page.total)}</span>${offset + PAGE < page.total ? `<a href="${link(offset + PAGE)}">next →</a>` : ""}</div>
      <table id="trajectories"><thead><tr><th>id</th><th>version</th><th>split</th><th>instance</th><th class="num">score</th><th>correct</th><th>error</th><th class="num">s</th><th class="num">tokens</th><th>output or error</th></tr></thead><tbody>${rows}</tbody></table>`;
  }

  function heat(call) {
    if (!call.tokens.length) return `<p class="muted">No tokens recorded (an external policy's call).</p>`;
    const spans = call.tokens.map(([text, lp, prompt]) => {
      let style = "";
      if (lp !== null) {
        const p = Math.exp(lp), hue = Math.round(120 * p);
        style = `background:hsl(${hue},75%,${88 - 10 * (1 - p)}%)`;
      }
      return `<span class="${prompt ? "prompt" : "completion"}" style="${style}" title="${esc(text)} ${lp === null ? "" : "logprob " + lp.toFixed(3)}">${esc(text)}</span>`;
    });
    return `<div class="heat">${spans.join("")}</div><p class="note">Tokens coloured by probability (red low, green high; uncoloured: no logprob returned)${call.token_text ? "" : "; token text unavailable, ids shown"}${call.tokens_cut ? `; ${call.tokens_cut} more tokens not shown` : ""}.</p>`;
  }

  async function pageTrajectory(r) {
    const t = await api(`/runs/${enc(r.run)}/trajectories/${enc(r.id)}`);
    crumbs([["runs", "#/"], [r.run, `#/run/${enc(r.run)}`], ["trajectories", `#/run/${enc(r.run)}/traj?version=${enc(t.version_id)}`], [t.trajectory_id]]);
    const score = t.score ? `<div class="figures"><div>score<b>${num(t.score.value)}</b></div><div>correct<b>${t.score.correct === null || t.score.correct === undefined ? "–" : t.score.correct ? "✓" : "✗"}</b></div></div>${kv(t.score.detail)}` : `<p class="muted">No score.</p>`;
    const calls = t.llm_calls.map((c, i) => `<div class="card llm-call"><h3>call ${i + 1}: ${esc(c.endpoint)} · adapter ${esc(c.adapter)} · ${c.prompt_tokens}+${c.completion_tokens} tokens · ${num(c.latency_s, 2)} s</h3>
      <p class="note">${esc(JSON.stringify(c.params))}</p><h3>prompt</h3><pre>
${esc(c.prompt)}</pre><h3>completion</h3><pre>
${esc(c.completion)}</pre><h3>tokens</h3>${heat(c)}</div>`).join("");
    return `<h1>Trajectory ${esc(t.trajectory_id)}</h1><div class="card"><dl class="kv"><dt>version</dt><dd>${esc(t.version_id)}</dd><dt>split</dt><dd>${esc(t.split)}</dd>
      <dt>instance</dt><dd>${esc(t.instance_id)}${t.sample ? " sample " + t.sample : ""}</dd><dt>seconds</dt><dd>${num(t.seconds, 3)}${t.score && t.score.seconds != null ? " + " + num(t.score.seconds, 2) + " running the program" : ""}</dd><dt>tokens</dt><dd>${t.tokens ?? "–"}</dd><dt>attempts</dt><dd>${t.attempts}</dd></dl></div>
      ${t.error ? `<div class="card"><h2 class="error">Error: ${esc(t.error.kind)}${t.error.infra ? " (the machine's)" : ""}</h2><pre>
${esc(t.error.message)}</pre></div>` : ""}
      <div class="grid"><div class="card"><h2>Output</h2>${outputView(t.output)}</div><div class="card"><h2>Score</h2>${score}</div></div>
      ${t.logs ? `<div class="card"><h2>Logs</h2><pre>
${esc(t.logs)}</pre></div>` : ""}
      <h2>LLM calls (${t.llm_calls.length})</h2>${calls || `<p class="muted">This trajectory made no LLM call.</p>`}`;
  }

  async function pageCompare(r) {
    crumbs([["runs", "#/"], ["compare"]]);
    const all = await Promise.all(r.runs.map((run) => summaryOf(run)));
    const cols = all.map((s) => `<div class="card compare-run"><h2><a href="#/run/${enc(s.run_id_dir)}">${esc(s.run_id)}</a></h2>${figures(s)}
      ${generationChart(s, "value", s.metric || "score")}
      <p class="note">${s.versions.length} versions: ${["accepted", "rejected", "broken"].map((k) => `${s.versions.filter((v) => v.status === k).length} ${k}`).join(", ")}; decisions: ${esc(s.decisions.map((d) => d.lever + (d.method ? " " + d.method : "")).join(", "))}</p></div>`).join("");
    return `<h1>Compare ${all.length} runs</h1>${legend()}<div class="grid">${cols}</div>`;
  }

  window.addEventListener("hashchange", () => render(false));
  render(false);
})();
