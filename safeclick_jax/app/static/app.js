// safeclick-jax web page: niivue viewer + the server's HTTP API (docs/app.md).
import { Niivue, NVImage, DRAG_MODE, SLICE_TYPE, SHOW_RENDER } from "/vendor/niivue/index.js";
import { askKey, authHeaders, download, putSessionInUrl, readEvents, sessionInUrl } from "/static/persist.js";
import { strokeTools } from "/static/strokes.js";

const $ = (id) => document.getElementById(id);
// niivue's default drawing colours for label values 1..: the object list shows the same ones.
const COLORS = ["#ff0000", "#00ff00", "#0000ff", "#ffff00", "#00ffff", "#ff00ff", "#ff8000", "#8000ff", "#00ff80"];
const state = { vol: null, obj: 1, bg: false, busy: false, downAt: 0, loc: null, locAt: 0, inv: null, tool: null };

const nv = new Niivue({
  backColor: [0.07, 0.07, 0.07, 1],
  show3Dcrosshair: true,
  dragMode: DRAG_MODE.callbackOnly,
  multiplanarShowRender: SHOW_RENDER.ALWAYS,
  isOrientCube: false,
  drawOpacity: 0.5,
});

function status(text, error = false) {
  $("status").textContent = text;
  $("status").style.color = error ? "#f77" : "#8c8";
}
function showError(text) {
  $("error").textContent = text || "";
  if (text) status("error", true);
}

async function api(method, path, body, isForm = false) {
  const opt = { method, headers: authHeaders() };
  if (body !== undefined) {
    if (isForm) opt.body = body;
    else { opt.body = JSON.stringify(body); opt.headers["content-type"] = "application/json"; }
  }
  const r = await fetch(path, opt);
  let data = null;
  try { data = await r.json(); } catch { data = {}; }
  if (r.status === 401 && askKey(data.detail || "401")) return api(method, path, body, isForm);
  if (!r.ok) throw new Error(data.detail || `${r.status} ${r.statusText}`);
  return data;
}

// run one user action: busy state, timing shown, errors in words
async function act(label, fn) {
  if (state.busy) return;
  state.busy = true;
  document.body.style.cursor = "progress";
  status(label + "...");
  showError("");
  const t0 = performance.now();
  try {
    const out = await fn();
    const ms = performance.now() - t0;
    const server = out && out.ms !== undefined ? ` (model ${(out.ms / 1000).toFixed(2)} s)` : "";
    $("timing").textContent = `${label}: ${(ms / 1000).toFixed(2)} s${server}`;
    status("ready");
    return out;
  } catch (e) {
    showError(`${label} failed: ${e.message}`);
  } finally {
    state.busy = false;
    document.body.style.cursor = "";
  }
}

function invert4(m) {
  // Gauss-Jordan on a 4x4 row-major matrix
  const a = m.map((r, i) => [...r, ...[0, 1, 2, 3].map((j) => (i === j ? 1 : 0))]);
  for (let c = 0; c < 4; c++) {
    let p = c;
    for (let r = c + 1; r < 4; r++) if (Math.abs(a[r][c]) > Math.abs(a[p][c])) p = r;
    [a[c], a[p]] = [a[p], a[c]];
    const d = a[c][c];
    for (let j = 0; j < 8; j++) a[c][j] /= d;
    for (let r = 0; r < 4; r++) if (r !== c) { const f = a[r][c]; for (let j = 0; j < 8; j++) a[r][j] -= f * a[c][j]; }
  }
  return a.map((r) => r.slice(4));
}
function mmToVoxel(mm) {
  const m = state.inv;
  return [0, 1, 2].map((i) => Math.round(m[i][0] * mm[0] + m[i][1] * mm[1] + m[i][2] * mm[2] + m[i][3]));
}

async function refreshOverlay() {
  const v = state.vol;
  if (!v) return;
  const url = `/api/volumes/${v.id}/overlay/${Date.now()}/labels.nii.gz`;
  nv.loadDrawing(await NVImage.loadFromUrl({ url, name: "labels.nii.gz", headers: authHeaders() }));
  nv.setDrawOpacity(parseFloat($("opacity").value));
  nv.drawScene();
}

function renderObjects() {
  const ul = $("objects");
  ul.innerHTML = "";
  for (const o of state.vol ? state.vol.objects : []) {
    const li = document.createElement("li");
    li.className = o.id === state.obj ? "sel" : "";
    li.dataset.id = o.id;
    li.innerHTML = `<span class="sw" style="background:${COLORS[(o.id - 1) % COLORS.length]}"></span>
      <input class="name" value="${o.name.replace(/"/g, "&quot;")}" aria-label="name">
      <button class="vis" title="H">${o.visible ? "hide" : "show"}</button><button class="del" title="delete">x</button>`;
    li.addEventListener("click", (e) => { if (e.target.tagName !== "BUTTON") { state.obj = o.id; renderObjects(); } });
    li.querySelector(".name").addEventListener("change", (e) =>
      act("rename", () => api("PATCH", `/api/volumes/${state.vol.id}/objects/${o.id}`, { name: e.target.value }).then(reload)));
    li.querySelector(".vis").addEventListener("click", () => toggleVisible(o));
    li.querySelector(".del").addEventListener("click", () =>
      act(`delete object ${o.id}`, () => api("DELETE", `/api/volumes/${state.vol.id}/objects/${o.id}`).then(reloadAll)));
    ul.appendChild(li);
  }
  $("where").textContent = whereText();
}

function toggleVisible(o) {
  return act(o.visible ? "hide" : "show", () =>
    api("PATCH", `/api/volumes/${state.vol.id}/objects/${o.id}`, { visible: !o.visible }).then(reloadAll));
}

function whereText() {
  if (!state.vol) return "";
  const c = nv.scene && nv.volumes.length ? mmToVoxel(nv.frac2mm(nv.scene.crosshairPos)) : [0, 0, 0];
  const o = state.vol.objects.find((x) => x.id === state.obj);
  return `voxel [${c.join(", ")}]  slice ${c[state.vol.axis] + 1}/${state.vol.shape[state.vol.axis]}  ` +
    `object: ${o ? o.name : "-"}  ${state.bg ? "BACKGROUND" : "foreground"} ${state.tool ? state.tool + "s" : "clicks"}`;
}

async function reload() {
  state.vol = await api("GET", `/api/volumes/${state.vol.id}`);
  if (!state.vol.objects.find((o) => o.id === state.obj) && state.vol.objects.length) state.obj = state.vol.objects[0].id;
  renderObjects();
}
async function reloadAll(out) { await reload(); await refreshOverlay(); return out; }

async function openVolume(bodyOrForm, isForm) {
  await act("open", async () => {
    if (state.vol) { try { await api("DELETE", `/api/volumes/${state.vol.id}`); } catch { /* expired */ } }
    state.vol = null;
    $("overlay-msg").textContent = "Opening the volume...";
    const v = await api("POST", "/api/volumes", bodyOrForm, isForm).finally(() => ($("overlay-msg").textContent = ""));
    return showVolume(v);
  });
}

// a session opened now, or resumed after a reload / a restart (its id in the page's URL)
async function showVolume(v) {
  state.vol = v;
  state.obj = v.objects.length ? v.objects[0].id : 1;
  state.inv = invert4(v.affine);
  putSessionInUrl(v.id);
  await nv.loadVolumes([{ url: `/api/volumes/${v.id}/image.nii.gz`, name: "image.nii.gz", headers: authHeaders() }]);
  nv.setSliceType(SLICE_TYPE.MULTIPLANAR);
  const mapping = { ct_window: "CT window", percentile: "percentile clipping" }[v.normalization] || v.normalization;
  $("volinfo").textContent =
    `${v.name}: ${v.shape.join(" x ")} voxels, ${v.spacing.map((s) => s.toFixed(2)).join(" x ")} mm; ` +
    `intensities: ${mapping}`;
  renderObjects();
  await refreshOverlay();
  if (!v.live) await api("POST", `/api/volumes/${v.id}/resume`);
  watchEncoding(v);
  return v;
}

// after opening, the server encodes the slices in the background: show how far it is
async function watchEncoding(v) {
  while (state.vol && state.vol.id === v.id) {
    const d = await api("GET", `/api/volumes/${v.id}`).catch(() => null);
    if (!d || !state.vol || state.vol.id !== v.id) break;
    const e = d.encoding, r = d.resume;
    if (d.live && e.done >= e.total) break;
    $("encoding").textContent = d.live ? `encoding slices ${e.done} / ${e.total} (clicks work meanwhile)`
      : `resuming the session: ${r.done} / ${r.total} interactions replayed`;
    await new Promise((r) => setTimeout(r, 1000));
  }
  $("encoding").textContent = "";
}

// a click or box (POST .../prompts), or a scribble or lasso (kind: "scribbles" / "lassos")
async function prompt(body, kind = "prompts") {
  const v = state.vol;
  const what = kind === "lassos" ? "lasso" : kind === "scribbles" ? "scribble" : body.box ? "box" : "click";
  const out = await act(body.label === 0 ? `background ${what}` : what, () =>
    api("POST", `/api/volumes/${v.id}/${kind}`, { object: state.obj, ...body }));
  if (out) { await reload(); await refreshOverlay(); }
}

async function propagate() {
  const v = state.vol;
  if (!v) return;
  const es = new AbortController();
  readEvents(`/api/volumes/${v.id}/events`, (p) => {
    if (p.total) { $("progress").max = p.total; $("progress").value = p.done; $("progtext").textContent = `${p.done} / ${p.total} slices`; }
  }, es.signal).catch(() => {});
  const out = await act("propagate", () => api("POST", `/api/volumes/${v.id}/propagate`, { object: state.obj }));
  es.abort();
  if (out) {
    const p = out.progress;  // the final count: the last event may not have arrived before the answer
    $("progress").max = p.total; $("progress").value = p.done; $("progtext").textContent = `${p.done} / ${p.total} slices`;
    await refreshOverlay();
  }
}

async function history(what) {
  if (!state.vol) return;
  const out = await act(what, () => api("POST", `/api/volumes/${state.vol.id}/${what}`));
  if (out) { $("timing").textContent += `: ${out[what]}`; await reloadAll(); }
}

// --- viewer events ------------------------------------------------------------------------------
nv.onLocationChange = (loc) => { state.loc = loc; state.locAt = performance.now(); $("where").textContent = whereText(); };
nv.onDragRelease = (d) => {
  if (!state.vol) return;
  const a = mmToVoxel(d.mmStart), b = mmToVoxel(d.mmEnd);
  const ax = state.vol.axis;
  if (a[ax] !== b[ax]) { showError("draw the box on a slice across the slicing axis (the axial view)"); return; }
  const inplane = [0, 1, 2].filter((i) => i !== ax);
  const [u0, u1] = [a[inplane[0]], b[inplane[0]]].sort((x, y) => x - y);
  const [v0, v1] = [a[inplane[1]], b[inplane[1]]].sort((x, y) => x - y);
  prompt({ box: [u0, v0, u1, v1], slice: a[ax], axis: ax });
};
const canvas = $("gl");
state.strokes = strokeTools({
  nv,
  gl: canvas,
  toVoxel: mmToVoxel,
  send: async (kind, points, shift) => {
    if (!state.vol) return;
    await prompt(kind === "lassos" ? { points } : { points, label: shift || state.bg ? 0 : 1 }, kind);
  },
  changed: (tool) => {
    state.tool = tool;
    $("scribble").classList.toggle("on", tool === "scribble");
    $("lasso").classList.toggle("on", tool === "lasso");
    $("where").textContent = whereText();
  },
});
$("scribble").onclick = () => state.strokes.setTool("scribble");
$("lasso").onclick = () => state.strokes.setTool("lasso");
let down = null;
canvas.addEventListener("pointerdown", (e) => { down = { x: e.clientX, y: e.clientY, shift: e.shiftKey, button: e.button, t: performance.now() }; });
canvas.addEventListener("pointerup", (e) => {
  const d = down;
  down = null;
  if (!d || d.button !== 0 || !state.vol || Math.hypot(e.clientX - d.x, e.clientY - d.y) > 4) return;
  setTimeout(() => {
    // a click on a 2D view moves the crosshair (onLocationChange); one on the 3D render does not
    if (state.locAt < d.t || !state.loc || state.loc.axCorSag > 2) return;
    const vox = mmToVoxel(state.loc.mm);
    const label = d.shift || state.bg ? 0 : 1;
    prompt({ voxel: vox, label });
  }, 20);
});

// --- controls -----------------------------------------------------------------------------------
$("open").onclick = () => $("files").value && openVolume({ path: $("files").value });
$("upload").onchange = (e) => {
  const f = e.target.files[0];
  if (!f) return;
  const fd = new FormData();
  fd.append("file", f, f.name);
  openVolume(fd, true);
  e.target.value = "";
};
$("labelsfile").onchange = (e) => {
  const f = e.target.files[0];
  if (!f || !state.vol) return;
  const fd = new FormData();
  fd.append("file", f, f.name);
  act("load label map", () => api("POST", `/api/volumes/${state.vol.id}/labels`, fd, true).then(reloadAll));
  e.target.value = "";
};
$("add").onclick = () => state.vol && act("add object", async () => {
  const o = await api("POST", `/api/volumes/${state.vol.id}/objects`, {});
  state.obj = o.object;
  return reloadAll(o);
});
$("bg").onchange = (e) => { state.bg = e.target.checked; $("where").textContent = whereText(); };
$("propagate").onclick = propagate;
$("undo").onclick = () => history("undo");
$("redo").onclick = () => history("redo");
$("clear").onclick = () => state.vol && act("clear object", () =>
  api("POST", `/api/volumes/${state.vol.id}/objects/${state.obj}/clear`).then(reloadAll));
$("opacity").oninput = (e) => { nv.setDrawOpacity(parseFloat(e.target.value)); nv.drawScene(); };
$("download").onclick = () => state.vol && act("download", () =>
  download(`/api/volumes/${state.vol.id}/labels.nii.gz`, state.vol.name.replace(/\.nii(\.gz)?$/i, "") + "_labels.nii.gz"));
$("save").onclick = () => state.vol && act("save", async () => {
  const out = await api("POST", `/api/volumes/${state.vol.id}/save`);
  $("timing").textContent = `saved ${out.saved}`;
  return out;
});
document.addEventListener("keydown", (e) => {
  if (e.target.tagName === "INPUT" && e.target.type !== "checkbox" && e.target.type !== "range") return;
  const k = e.key.toLowerCase();
  if ((e.ctrlKey || e.metaKey) && k === "z") { e.preventDefault(); history(e.shiftKey ? "redo" : "undo"); }
  else if ((e.ctrlKey || e.metaKey) && k === "y") { e.preventDefault(); history("redo"); }
  else if ((e.ctrlKey || e.metaKey) && k === "s") { e.preventDefault(); $("save").onclick(); }
  else if (e.ctrlKey || e.metaKey || e.altKey) return;
  else if (k === "p") propagate();
  else if (k === "b") { $("bg").checked = !$("bg").checked; $("bg").onchange({ target: $("bg") }); }
  else if (k === "n") $("add").onclick();
  else if (k === "c") $("clear").onclick();
  else if (k === "d") $("download").onclick();
  else if (k === "h" && state.vol) { const o = state.vol.objects.find((x) => x.id === state.obj); if (o) toggleVisible(o); }
  else if (k >= "1" && k <= "9" && state.vol) {
    const o = state.vol.objects[parseInt(k) - 1];
    if (o) { state.obj = o.id; renderObjects(); }
  }
});

// --- start: wait for the model, list the files, open the first one -------------------------------
async function start() {
  await nv.attachToCanvas(canvas);
  nv.opts.dragMode = DRAG_MODE.callbackOnly;
  nv.setSliceType(SLICE_TYPE.MULTIPLANAR);
  for (;;) {
    let h;
    try { h = await api("GET", "/api/health"); } catch (e) { h = { state: "unreachable", error: e.message }; }
    $("model").textContent = `model: ${h.model || "?"}`;
    if (h.state === "ready") break;
    if (h.state === "failed") { showError(`the model failed to load: ${h.error}`); $("overlay-msg").textContent = "The model failed to load."; return; }
    $("overlay-msg").textContent = "The model is compiling (first start takes a minute)...";
    status("model compiling");
    await new Promise((r) => setTimeout(r, 1000));
  }
  $("overlay-msg").textContent = "";
  const { files } = await api("GET", "/api/files");
  $("files").innerHTML = files.map((f) => `<option>${f.path}</option>`).join("");
  status("ready");
  const resumed = sessionInUrl() && await act("resume", async () => showVolume(await api("GET", `/api/volumes/${sessionInUrl()}`)));
  if (resumed) return;
  const pick = new URLSearchParams(location.search).get("open") || (files[0] && files[0].path);
  if (pick) await openVolume({ path: pick });
  else $("overlay-msg").textContent = "No volume in the data folder: upload a .nii or .nii.gz file.";
}
window.safeclick = { state, nv };
start().catch((e) => showError(`the page failed to start: ${e.message}`));
