// Small SVG charts for the dashboard: a generation plot (points, an incumbent step line, marks)
// and a line chart (training curves). SVG, so every point is an element a test can count.
"use strict";
(function () {
  const esc = (s) => String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));

  function ticks(lo, hi, n) {
    if (!(hi > lo)) { hi = lo + 1; }
    const raw = (hi - lo) / n, mag = Math.pow(10, Math.floor(Math.log10(raw)));
    const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= raw) || raw;
    const out = [];
    for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(+v.toPrecision(12));
    return out;
  }

  function fmt(v) {
    const a = Math.abs(v);
    if (a !== 0 && (a < 1e-3 || a >= 1e5)) return v.toExponential(1);
    return +v.toPrecision(4) + "";
  }

  function extent(values, pad) {
    let lo = Math.min(...values), hi = Math.max(...values);
    if (!isFinite(lo)) return [0, 1];
    if (lo === hi) { const d = Math.abs(lo) * 0.1 || 0.5; lo -= d; hi += d; }
    const p = (hi - lo) * pad;
    return [lo - p, hi + p];
  }

  function marker(p, x, y) {
    const cls = `pt ${esc(p.cls || "")}`;
    const data = `data-version="${esc(p.id || "")}" data-status="${esc(p.cls || "")}" data-lever="${esc(p.shape || "")}"`;
    const title = `<title>${esc(p.title || "")}</title>`;
    let shape;
    if (p.shape === "weights") shape = `<rect class="${cls}" ${data} x="${x - 5}" y="${y - 5}" width="10" height="10">${title}</rect>`;
    else if (p.shape === "baseline") shape = `<path class="${cls}" ${data} d="M${x} ${y - 7}L${x + 7} ${y}L${x} ${y + 7}L${x - 7} ${y}Z">${title}</path>`;
    else shape = `<circle class="${cls}" ${data} cx="${x}" cy="${y}" r="5.5">${title}</circle>`;
    return p.href ? `<a href="${esc(p.href)}">${shape}</a>` : shape;
  }

  // points: {x, y|null, cls, shape, title, href, id}; a null y is drawn in the band below the
  // axis (a broken candidate has no score). direction "lower": the y axis is flipped so that
  // better is always up.
  function generations(o) {
    const W = o.width || 620, H = o.height || 270, L = 58, R = 16, T = 26, B = 40, band = 22;
    const scored = o.points.filter((p) => p.y !== null && p.y !== undefined && isFinite(p.y));
    const ys = scored.map((p) => p.y).concat((o.marks || []).map((m) => m.y)).concat((o.line || []).map((q) => q[1]));
    const [lo, hi] = extent(ys.length ? ys : [0, 1], 0.08);
    const xs = o.points.map((p) => p.x).concat((o.line || []).map((q) => q[0]));
    const xmax = Math.max(1, ...xs);
    const lower = o.direction === "lower";
    const sx = (x) => L + (x / xmax) * (W - L - R - 10) + 5;
    const plotH = H - T - B - band;
    const sy = (y) => lower ? T + ((y - lo) / (hi - lo)) * plotH : T + (1 - (y - lo) / (hi - lo)) * plotH;
    let s = `<svg class="chart" viewBox="0 0 ${W} ${H}" role="img" aria-label="${esc(o.label || "chart")}">`;
    for (const t of ticks(lo, hi, 5)) {
      if (t < lo || t > hi) continue;
      s += `<line class="gridline" x1="${L}" x2="${W - R}" y1="${sy(t)}" y2="${sy(t)}"/><text x="${L - 6}" y="${sy(t) + 4}" text-anchor="end">${fmt(t)}</text>`;
    }
    s += `<line class="axis" x1="${L}" x2="${W - R}" y1="${T + plotH}" y2="${T + plotH}"/>`;
    for (let g = 0; g <= xmax; g++) s += `<text x="${sx(g)}" y="${T + plotH + band + 16}" text-anchor="middle">${g}</text>`;
    s += `<text x="${(L + W - R) / 2}" y="${H - 6}" text-anchor="middle">${esc(o.xLabel || "generation")}</text>`;
    s += `<text x="${L}" y="${T - 8}" text-anchor="start">↑ better: ${esc(o.yLabel || "")} (${lower ? "lower" : "higher"} is better)</text>`;
    if (o.points.some((p) => p.y === null || p.y === undefined || !isFinite(p.y))) {
      s += `<text x="${L - 6}" y="${T + plotH + band / 2 + 5}" text-anchor="end">no score</text>`;
    }
    if (o.line && o.line.length) {
      let d = "";
      o.line.forEach((q, i) => {
        const x = sx(q[0]), y = sy(q[1]);
        d += i === 0 ? `M${x} ${y}` : `H${x}V${y}`;
      });
      d += `H${sx(xmax) + 5}`;
      s += `<path class="incumbent" d="${d}"><title>incumbent</title></path>`;
    }
    const jitter = {};
    for (const p of o.points) {
      const k = `${p.x}`;
      jitter[k] = (jitter[k] || 0) + 1;
    }
    const seen = {};
    for (const p of o.points) {
      const k = `${p.x}`, i = (seen[k] = (seen[k] || 0) + 1) - 1, n = jitter[k];
      const dx = n > 1 ? (i - (n - 1) / 2) * 9 : 0;
      const has = p.y !== null && p.y !== undefined && isFinite(p.y);
      s += marker(p, sx(p.x) + dx, has ? sy(p.y) : T + plotH + band / 2);
    }
    for (const m of o.marks || []) {
      const x = sx(m.x) + 12, y = sy(m.y);
      s += `<g class="testmark-group"><path class="testmark" d="M${x} ${y - 7}l2 5h5l-4 3 2 6-5-4-5 4 2-6-4-3h5z"><title>${esc(m.title || m.label)}</title></path><text x="${x + 9}" y="${y + 4}">${esc(m.label)}</text></g>`;
    }
    return s + "</svg>";
  }

  // series: [{name, values: [number|null]}] against the step index.
  function lines(o) {
    const W = o.width || 620, H = o.height || 220, L = 58, R = 100, T = 12, B = 34;
    const colours = ["#4575b4", "#d73027", "#1a9850", "#7b3294", "#e08214", "#35978f"];
    const all = o.series.flatMap((s) => s.values.filter((v) => v !== null && isFinite(v)));
    const [lo, hi] = extent(all.length ? all : [0, 1], 0.05);
    const n = Math.max(2, ...o.series.map((s) => s.values.length));
    const sx = (i) => L + (i / (n - 1)) * (W - L - R);
    const sy = (v) => T + (1 - (v - lo) / (hi - lo)) * (H - T - B);
    let s = `<svg class="chart" viewBox="0 0 ${W} ${H}" role="img" aria-label="${esc(o.label || "curves")}">`;
    for (const t of ticks(lo, hi, 4)) {
      if (t < lo || t > hi) continue;
      s += `<line class="gridline" x1="${L}" x2="${W - R}" y1="${sy(t)}" y2="${sy(t)}"/><text x="${L - 6}" y="${sy(t) + 4}" text-anchor="end">${fmt(t)}</text>`;
    }
    s += `<line class="axis" x1="${L}" x2="${W - R}" y1="${H - B}" y2="${H - B}"/>`;
    s += `<text x="${(L + W - R) / 2}" y="${H - 6}" text-anchor="middle">${esc(o.xLabel || "step")} (1-${n})</text>`;
    o.series.forEach((ser, k) => {
      const c = colours[k % colours.length];
      let d = "", pen = false;
      ser.values.forEach((v, i) => {
        if (v === null || !isFinite(v)) { pen = false; return; }
        d += `${pen ? "L" : "M"}${sx(i)} ${sy(v)}`;
        pen = true;
      });
      s += `<path class="series" data-series="${esc(ser.name)}" stroke="${c}" d="${d}"/>`;
      s += `<text x="${W - R + 8}" y="${T + 14 + k * 15}" style="fill:${c}">${esc(ser.name)}</text>`;
    });
    return s + "</svg>";
  }

  window.SialoopChart = { generations, lines, fmt };
})();
