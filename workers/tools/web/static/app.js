// ksm-proto's live view: frames, page tables, counters and notifier messages from /api/events.
// Plain JS and canvas; every request carries the token the server wrote into the page.
"use strict";
(function () {
  const TOKEN = window.KSM_TOKEN;
  const q = (id) => document.getElementById(id);
  const CTRS = ["pages_shared", "pages_sharing", "pages_unshared", "pages_volatile", "full_scans"];
  const CTR_COLORS = ["#f0a040", "#e8590c", "#3f7fc4", "#c678dd", "#98c379"];
  const KNOBS = ["run", "pages_to_scan", "sleep_millisecs", "max_page_sharing", "use_zero_pages"];
  const STAT_KEYS = ["ksm_rmap_items", "ksm_merging_pages", "ksm_zero_pages", "ksm_process_profit"];
  const STRIP_COLS = 256, MAX_ROWS = 60;

  // the shown state: tests read it through window.ksm (what the page draws comes from it alone)
  const S = window.ksm = { frames: null, vms: {}, counters: {}, knobs: {}, info: {}, msgCounts: {}, cow: {},
                           updates: 0, cells: { free: 0, anon: 0, ksm: 0, zero: 0 }, readOnly: true,
                           history: [], rate: 0, drawMs: 0 };

  // ---------------------------------------------------------------- colours
  const RGB = (h) => [parseInt(h.slice(1, 3), 16), parseInt(h.slice(3, 5), 16), parseInt(h.slice(5, 7), 16)];
  const PAL = new Uint32Array(256);          // cell code -> ABGR pixel
  const pack = ([r, g, b]) => (255 << 24) | (b << 16) | (g << 8) | r;
  PAL[0] = pack(RGB("#23282f")); PAL[1] = pack(RGB("#3f7fc4")); PAL[2] = pack(RGB("#9aa3ad"));
  const K0 = RGB("#f6d365"), K1 = RGB("#e8590c"), K2 = RGB("#b80f2e");
  for (let c = 3; c < 256; c++) {            // KSM, mapcount c-2: yellow (1) -> orange (8) -> red (64+)
    const x = Math.min(1, Math.log2(c - 2) / 6);
    const [a, b, f] = x < 0.5 ? [K0, K1, x * 2] : [K1, K2, x * 2 - 1];
    PAL[c] = pack(a.map((v, i) => Math.round(v + (b[i] - v) * f)));
  }
  const NONE = pack(RGB("#14171c"));
  const kindOf = (c) => (c === 0 ? "free" : c === 1 ? "anonymous" : c === 2 ? "zero page" : `KSM, mapcount ${c - 2}`);

  // ---------------------------------------------------------------- decoding
  function b64(s) {
    const bin = atob(s), a = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) a[i] = bin.charCodeAt(i);
    return a;
  }
  function applyCells(old, d, Type) {
    if (d.full !== undefined) {
      const u8 = b64(d.full);
      return Type === Uint8Array ? u8 : new Type(u8.buffer);
    }
    for (let k = 0; k < d.idx.length; k++) old[d.idx[k]] = d.val[k];
    return old;
  }

  // ---------------------------------------------------------------- the frame grid
  const fc = q("frames"), fo = q("frames-over");
  let fctx = null, fimg = null, fpix = null, cols = 1, scale = 1;
  function layoutFrames(n) {
    cols = 1 << Math.ceil(Math.log2(Math.sqrt(n)));
    const rows = Math.ceil(n / cols);
    scale = Math.max(1, Math.floor(512 / cols));
    fc.width = cols; fc.height = rows;
    fc.style.width = fo.style.width = cols * scale + "px";
    fc.style.height = fo.style.height = rows * scale + "px";
    fo.width = cols * scale; fo.height = rows * scale;
    fctx = fc.getContext("2d");
    fimg = fctx.createImageData(cols, rows);
    fpix = new Uint32Array(fimg.data.buffer);
    fpix.fill(NONE);
    q("nframes").textContent = n.toLocaleString();
  }
  const KIND = (v) => (v === 0 ? "free" : v === 1 ? "anon" : v === 2 ? "zero" : "ksm");
  function drawFrames(d, before) {
    const f = S.frames, c = S.cells;
    if (d.full !== undefined) {
      for (const k in c) c[k] = 0;
      for (let i = 0; i < f.length; i++) { fpix[i] = PAL[f[i]]; c[KIND(f[i])]++; }
    } else {
      if (!d.idx.length) return false;
      for (let k = 0; k < d.idx.length; k++) {     // the counts follow the changed cells only
        const i = d.idx[k];
        c[KIND(before[k])]--; c[KIND(f[i])]++;
        fpix[i] = PAL[f[i]];
      }
    }
    fctx.putImageData(fimg, 0, 0);
    for (const k in c) q("count-" + k).textContent = c[k].toLocaleString();
    return true;
  }

  // ---------------------------------------------------------------- page-table strips
  function vmBox(name) {
    let v = S.vms[name];
    if (v) return v;
    const box = document.createElement("div");
    box.className = "vm"; box.dataset.vm = name;
    const title = document.createElement("div");
    const nm = document.createElement("span"); nm.className = "name"; nm.textContent = name;
    const st = document.createElement("span"); st.className = "stat";
    title.append(nm, " ", st);
    const stack = document.createElement("div"); stack.className = "stack";
    const cv = document.createElement("canvas"); cv.className = "cells strip"; cv.dataset.vm = name;
    const ov = document.createElement("canvas"); ov.className = "over";
    stack.append(cv, ov);
    box.append(title, stack);
    q("vms").append(box);
    v = S.vms[name] = { name, box, stat: st, cv, ov, pfn: new Int32Array(0), ksm_stat: {}, img: null };
    cv.addEventListener("mousemove", (e) => hoverPage(v, e));
    cv.addEventListener("mouseleave", hideHover);
    cv.addEventListener("click", (e) => {
      const p = pageAt(v, e);
      if (p >= 0) { q("ctl-vm").value = name; q("ctl-page").value = p; }
    });
    cv.style.cursor = "crosshair"; cv.style.pointerEvents = "auto"; ov.style.pointerEvents = "none";
    refreshVmSelect();
    return v;
  }
  function stripGeom(v) {
    const c = Math.min(STRIP_COLS, Math.max(1, v.pfn.length));
    const rows = Math.min(MAX_ROWS * 8, Math.max(1, Math.ceil(v.pfn.length / c)));
    const sc = v.pfn.length > STRIP_COLS * MAX_ROWS ? 1 : 2;
    return { c, rows, sc };
  }
  function drawStrip(v) {
    const { c, rows, sc } = stripGeom(v);
    if (v.cv.width !== c || v.cv.height !== rows) {
      v.cv.width = c; v.cv.height = rows; v.img = null;
      v.cv.style.width = v.ov.style.width = c * sc + "px";
      v.cv.style.height = v.ov.style.height = rows * sc + "px";
      v.ov.width = c * sc; v.ov.height = rows * sc;
    }
    const ctx = v.cv.getContext("2d");
    if (!v.img) { v.img = ctx.createImageData(c, rows); v.pix = new Uint32Array(v.img.data.buffer); }
    const pix = v.pix, pfn = v.pfn, f = S.frames, n = Math.min(pfn.length, c * rows);
    pix.fill(NONE);
    for (let i = 0; i < n; i++) {
      const p = pfn[i];
      pix[i] = p < 0 ? NONE : (p < f.length ? PAL[f[p]] : PAL[1]);
    }
    ctx.putImageData(v.img, 0, 0);
    v.geom = { c, rows, sc };
  }
  function pageAt(v, e) {
    const g = v.geom; if (!g) return -1;
    const r = v.cv.getBoundingClientRect();
    const x = Math.floor((e.clientX - r.left) / g.sc), y = Math.floor((e.clientY - r.top) / g.sc);
    const p = y * g.c + x;
    return x >= 0 && x < g.c && p >= 0 && p < v.pfn.length ? p : -1;
  }

  // ---------------------------------------------------------------- hover: a frame and who maps it
  const hov = q("hover");
  function mappers(pfn) {
    const out = [];
    for (const name in S.vms) {
      const a = S.vms[name].pfn;
      for (let i = 0; i < a.length; i++) if (a[i] === pfn) out.push([name, i]);
    }
    return out;
  }
  function hex(n) { return "0x" + n.toString(16); }
  function showHover(e, lines) {
    hov.textContent = lines.join("\n"); hov.style.whiteSpace = "pre";
    hov.style.display = "block";
    hov.style.left = Math.min(window.innerWidth - 430, e.clientX + 14) + "px";
    hov.style.top = (e.clientY + 14) + "px";
  }
  function hideHover() { hov.style.display = "none"; clearMarks(); S.hovered = null; }
  function clearMarks() {
    fo.getContext("2d").clearRect(0, 0, fo.width, fo.height);
    for (const n in S.vms) { const o = S.vms[n].ov; o.getContext("2d").clearRect(0, 0, o.width, o.height); }
  }
  function mark(pfn, maps) {
    clearMarks();
    const x = fo.getContext("2d"); x.strokeStyle = "#fff"; x.lineWidth = 1;
    const s = Math.max(scale, 3);
    x.strokeRect((pfn % cols) * scale - (s - scale) / 2 + 0.5, Math.floor(pfn / cols) * scale - (s - scale) / 2 + 0.5,
                 s, s);
    for (const [n, i] of maps) {
      const v = S.vms[n]; if (!v.geom) continue;
      const g = v.geom, o = v.ov.getContext("2d"); o.strokeStyle = "#fff";
      o.strokeRect((i % g.c) * g.sc - 1.5, Math.floor(i / g.c) * g.sc - 1.5, g.sc + 3, g.sc + 3);
    }
  }
  function ranges(pages) {          // [0,1,2,5] -> "0-2, 5"
    const out = [];
    for (let i = 0; i < pages.length; i++) {
      let j = i;
      while (j + 1 < pages.length && pages[j + 1] === pages[j] + 1) j++;
      out.push(i === j ? `${pages[i]}` : `${pages[i]}-${pages[j]}`);
      i = j;
    }
    return out.length > 8 ? out.slice(0, 8).join(", ") + ", …" : out.join(", ");
  }
  function describe(pfn, maps, skip) {
    const lines = [`frame ${pfn}: ${kindOf(S.frames[pfn])}`];
    const others = maps.filter(([n, i]) => !(skip && n === skip[0] && i === skip[1]));
    lines.push(others.length ? `${skip ? "also " : ""}mapped by ${others.length} page(s):` : (skip ? "no other page maps it" : "no page maps it"));
    const by = {};
    for (const [n, i] of others) (by[n] = by[n] || []).push(i);
    for (const n in by) lines.push(`  ${n}: ${by[n].length} page(s): ${ranges(by[n])}`);
    return lines;
  }
  function hoverPage(v, e) {
    const p = pageAt(v, e);
    if (p < 0) { hideHover(); return; }
    const pfn = v.pfn[p];
    if (pfn < 0) { showHover(e, [`${v.name} page ${p}: not present`]); clearMarks(); S.hovered = { vm: v.name, page: p, pfn: null }; return; }
    const maps = mappers(pfn);
    mark(pfn, maps);
    S.hovered = { vm: v.name, page: p, pfn, mappers: maps };
    showHover(e, [`${v.name} page ${p} (${hex(0x7f0000000000 + p * 4096)}) -> frame ${pfn}`,
                  ...describe(pfn, maps, [v.name, p]).slice(0)]);
  }
  fc.addEventListener("mousemove", (e) => {
    if (!S.frames) return;
    const r = fc.getBoundingClientRect();
    const x = Math.floor((e.clientX - r.left) / scale), y = Math.floor((e.clientY - r.top) / scale);
    const pfn = y * cols + x;
    if (x < 0 || x >= cols || pfn < 0 || pfn >= S.frames.length) { hideHover(); return; }
    const maps = mappers(pfn);
    mark(pfn, maps);
    S.hovered = { frame: pfn, mappers: maps };
    showHover(e, describe(pfn, maps, null));
  });
  fc.addEventListener("mouseleave", hideHover);

  // ---------------------------------------------------------------- counters and their chart
  const ctrTable = q("ctrtable");
  function counterRows(c) {
    for (const k of Object.keys(c)) {
      let row = ctrTable.querySelector(`tr[data-ctr="${k}"]`);
      if (!row) {
        row = document.createElement("tr"); row.dataset.ctr = k;
        const i = CTRS.indexOf(k);
        const a = document.createElement("td");
        a.innerHTML = i >= 0 ? `<span class="sw" style="display:inline-block;width:9px;height:9px;background:${CTR_COLORS[i]}"></span> ` : "";
        a.append(k);
        const b = document.createElement("td"); b.className = "v"; b.id = "ctr-" + k;
        row.append(a, b); ctrTable.append(row);
      }
      q("ctr-" + k).textContent = c[k].toLocaleString();
    }
  }
  function drawChart() {
    const cv = q("chart"), x = cv.getContext("2d"), W = cv.width, H = cv.height, h = S.history;
    x.clearRect(0, 0, W, H);
    x.strokeStyle = "#262c35"; x.strokeRect(0.5, 0.5, W - 1, H - 1);
    if (h.length < 2) return;
    const t0 = h[0].t, t1 = Math.max(h[h.length - 1].t, t0 + 1e-3);
    let top = 1;
    for (const p of h) for (const k of CTRS) if (k !== "full_scans") top = Math.max(top, p.c[k]);
    const scans = Math.max(1, ...h.map((p) => p.c.full_scans));
    CTRS.forEach((k, i) => {
      x.strokeStyle = CTR_COLORS[i]; x.lineWidth = 1.5; x.beginPath();
      h.forEach((p, j) => {
        const v = k === "full_scans" ? p.c[k] / scans * top : p.c[k];
        const X = 2 + (p.t - t0) / (t1 - t0) * (W - 4), Y = H - 2 - v / top * (H - 14);
        j ? x.lineTo(X, Y) : x.moveTo(X, Y);
      });
      x.stroke();
    });
    x.fillStyle = "#7d8794"; x.font = "10px sans-serif";
    x.fillText(`max ${top.toLocaleString()} (full_scans scaled to fit)`, 4, 10);
  }

  // ---------------------------------------------------------------- notifier messages
  const msgList = q("msgs");
  function addMessages(rows) {
    const keep = 40;
    if (!rows.length) return;
    for (const el of msgList.querySelectorAll(".msg.new")) el.classList.remove("new");
    const frag = document.createDocumentFragment();
    for (const m of rows.slice(-keep).reverse()) {
      const d = document.createElement("div");
      d.className = "msg new"; d.dataset.vm = m.vm; d.dataset.sub = m.sub; d.dataset.seq = m.seq; d.dataset.type = m.type;
      const t = document.createElement("span");
      const ty = m.type.split(/[ /]/)[0];
      t.className = "ty ty-" + ty; t.textContent = m.type;
      d.append(t, ` ${m.vm} · ${m.sub} #${m.seq}`);
      frag.append(d);
    }
    msgList.prepend(frag);
    while (msgList.childElementCount > keep) msgList.lastElementChild.remove();
  }
  function msgCounts(c) {
    const t = q("msgcounts");
    for (const k of Object.keys(c).sort()) {
      let row = t.querySelector(`tr[data-type="${k}"]`);
      if (!row) {
        row = document.createElement("tr"); row.dataset.type = k;
        const a = document.createElement("td"); const s = document.createElement("span");
        s.className = "ty-" + k.split(" ")[0]; s.textContent = k; a.append(s);
        const b = document.createElement("td"); b.className = "v"; b.id = "msgcount-" + k.split(" ")[0];
        row.append(a, b); t.append(row);
      }
      q("msgcount-" + k.split(" ")[0]).textContent = c[k].toLocaleString();
    }
  }

  // ---------------------------------------------------------------- controls
  function refreshVmSelect() {
    const sel = q("ctl-vm"), cur = sel.value;
    sel.textContent = "";
    for (const n in S.vms) { const o = document.createElement("option"); o.textContent = n; sel.append(o); }
    if (cur in S.vms) sel.value = cur;
  }
  function buildKnobs() {
    const box = q("knobs");
    for (const k of KNOBS) {
      const row = document.createElement("div"); row.className = "row";
      const l = document.createElement("label"); l.textContent = k;
      const i = document.createElement("input"); i.type = "number"; i.id = "knob-" + k; i.min = "0";
      row.append(l, i); box.append(row);
    }
    const b = document.createElement("button"); b.id = "btn-knobs"; b.textContent = "set knobs";
    b.onclick = () => {
      const knobs = {};
      for (const k of KNOBS) { const v = q("knob-" + k).value; if (v !== "" && +v !== S.knobs[k]) knobs[k] = +v; }
      if (!Object.keys(knobs).length) { result("no knob changed"); return; }
      control({ action: "knobs", knobs });
    };
    box.append(b);
  }
  function result(text, err) { const r = q("ctl-result"); r.textContent = text; r.className = err ? "err" : ""; }
  async function control(body) {
    try {
      const r = await fetch("api/control", { method: "POST", headers: { "Content-Type": "application/json", "X-KSM-Token": TOKEN },
                                             body: JSON.stringify(body) });
      const j = await r.json();
      if (!r.ok) result(`${body.action}: ${j.error}`, true); else result(`${body.action}: ok ${JSON.stringify(j)}`);
      S.lastControl = { status: r.status, reply: j };
    } catch (e) { result(`${body.action}: ${e}`, true); }
  }
  q("btn-write").onclick = () => control({ action: "write", vm: q("ctl-vm").value, page: +q("ctl-page").value,
                                           value: +q("ctl-value").value });
  q("btn-madvise").onclick = () => control({ action: "madvise", vm: q("ctl-vm").value, page: +q("ctl-page").value,
                                             npages: +q("ctl-npages").value, advice: q("ctl-advice").value });
  q("btn-fork").onclick = () => control({ action: "fork", vm: q("ctl-vm").value, name: q("ctl-forkname").value });
  buildKnobs();

  // ---------------------------------------------------------------- one update
  let rateN = 0, rateT = performance.now();
  function apply(d) {
    const t0 = performance.now();
    S.info = d.info; S.readOnly = d.read_only;
    q("source").textContent = d.info.source + (d.info.file ? ` ${d.info.file}` : "");
    q("mode").textContent = d.info.mode;
    q("clock").textContent = d.info.source === "replay"
      ? `t = ${(d.info.t_us / 1e6).toFixed(3)} / ${(d.info.end_us / 1e6).toFixed(3)} s of the trace` : `t = ${d.t.toFixed(1)} s`;
    q("controls").hidden = d.read_only;
    if (!S.frames || (d.frames.full !== undefined && b64len(d.frames.full) !== S.frames.length)) {
      const n = d.frames.full !== undefined ? b64len(d.frames.full) : 0;
      layoutFrames(n);
      S.frames = new Uint8Array(n);
    }
    const before = d.frames.idx ? d.frames.idx.map((i) => S.frames[i]) : null;
    S.frames = applyCells(S.frames, d.frames, Uint8Array);
    const framesMoved = drawFrames(d.frames, before);
    for (const n of d.gone) { const v = S.vms[n]; if (v) { v.box.remove(); delete S.vms[n]; refreshVmSelect(); } }
    for (const [name, vd] of Object.entries(d.vms)) {
      const v = vmBox(name);
      v.dirty = framesMoved || vd.full !== undefined || vd.idx.length > 0 || !v.geom;
      v.pfn = applyCells(v.pfn, vd, Int32Array);
      v.ksm_stat = vd.ksm_stat;
      const cow = d.cow_faults[name];
      v.stat.textContent = STAT_KEYS.filter((k) => k in vd.ksm_stat).map((k) => `${k} ${vd.ksm_stat[k]}`).join(" · ")
        + (cow !== undefined ? ` · cow_faults ${cow}` : "") + ` · ${v.pfn.length} pages`;
      for (const k in vd.ksm_stat) v.stat.dataset[k] = vd.ksm_stat[k];
    }
    for (const n in S.vms) if (S.vms[n].dirty) drawStrip(S.vms[n]);
    S.counters = d.counters; S.knobs = d.knobs; S.msgCounts = d.msg_counts; S.cow = d.cow_faults;
    counterRows(d.counters);
    S.history.push({ t: d.t, c: d.counters });
    if (S.history.length > 600) S.history.shift();
    drawChart();
    for (const k of KNOBS) {
      const i = q("knob-" + k);
      if (k in d.knobs && document.activeElement !== i) i.value = d.knobs[k];
    }
    addMessages(d.msgs);
    msgCounts(d.msg_counts);
    S.updates++;
    rateN++;
    const now = performance.now();
    S.drawMs = now - t0;
    if (now - rateT >= 1000) {
      S.rate = rateN * 1000 / (now - rateT); rateN = 0; rateT = now;
      q("rate").textContent = S.rate.toFixed(1);
    }
    q("drawms").textContent = S.drawMs.toFixed(1);
    S.drawTimes = (S.drawTimes || []); S.drawTimes.push(S.drawMs);
    if (S.drawTimes.length > 1000) S.drawTimes.shift();
  }
  function b64len(s) { return Math.floor(s.length * 3 / 4) - (s.endsWith("==") ? 2 : s.endsWith("=") ? 1 : 0); }

  const es = new EventSource("api/events?token=" + encodeURIComponent(TOKEN));
  es.onopen = () => { q("conn").textContent = "live"; };
  es.onmessage = (e) => {
    try { apply(JSON.parse(e.data)); } catch (err) { q("conn").textContent = "error: " + err; console.error(err); }
  };
  es.onerror = () => { q("conn").textContent = "disconnected (the run ended?)"; };
})();
