// Scribble (S) and lasso (L) tools of the page (docs/app.md): a freehand stroke drawn on a slice
// of the viewer, shown on a 2D canvas over niivue's as the pointer moves, and sent as the voxels
// it passed through (POST /api/volumes/{id}/scribbles or .../lassos). While a tool is on, the
// pointer draws instead of moving the crosshair; the mouse wheel and the arrow keys still change
// the slice. Esc (or the tool's key again) returns to clicks.

const TOOLS = { s: "scribble", l: "lasso" };

// nv: the Niivue viewer; gl: its canvas; toVoxel(mm) -> [i, j, k]; send(kind, voxels, background):
// posts the stroke; changed(tool): the tool was switched (null: clicks).
export function strokeTools({ nv, gl, toVoxel, send, changed }) {
  const viewer = gl.parentElement;
  const ink = document.createElement("canvas");  // the stroke as drawn, over the viewer
  ink.id = "strokes";
  viewer.appendChild(ink);
  const ctx = ink.getContext("2d");
  let tool = null, stroke = null;

  function setTool(t) {
    tool = tool === t ? null : t;
    viewer.style.cursor = tool ? "crosshair" : "";
    changed(tool);
  }

  // the voxel under a pointer event, or null off the slices (the 3D render, the margins)
  function voxelAt(e) {
    const r = gl.getBoundingClientRect();
    const pos = [(e.clientX - r.left) * (gl.width / r.width), (e.clientY - r.top) * (gl.height / r.height)];
    const frac = nv.canvasPos2frac(pos);
    return frac[0] < 0 ? null : toVoxel(nv.frac2mm(frac));
  }

  function draw() {
    ctx.clearRect(0, 0, ink.width, ink.height);
    if (!stroke || stroke.xy.length < 2) return;
    ctx.strokeStyle = stroke.background ? "#00e5ff" : "#ffe600";
    ctx.lineWidth = 2;
    ctx.setLineDash([]);
    ctx.beginPath();
    stroke.xy.forEach(([x, y], i) => (i ? ctx.lineTo(x, y) : ctx.moveTo(x, y)));
    if (stroke.tool === "lasso") {
      ctx.stroke();
      ctx.setLineDash([4, 4]);  // the closing segment the server adds
      ctx.beginPath();
      ctx.moveTo(...stroke.xy[stroke.xy.length - 1]);
      ctx.lineTo(...stroke.xy[0]);
    }
    ctx.stroke();
  }

  function add(e) {
    const r = viewer.getBoundingClientRect();
    stroke.xy.push([e.clientX - r.left, e.clientY - r.top]);
    const v = voxelAt(e);
    const last = stroke.voxels[stroke.voxels.length - 1];
    if (v && !(last && v.every((x, i) => x === last[i]))) stroke.voxels.push(v);
    draw();
  }

  // capture phase on the viewer: a stroke's events never reach niivue's or the page's click handlers
  viewer.addEventListener("pointerdown", (e) => {
    if (!tool || e.button !== 0) return;
    e.preventDefault();  // no mousedown: niivue does not move the crosshair
    e.stopPropagation();
    const r = viewer.getBoundingClientRect();
    ink.width = r.width;
    ink.height = r.height;
    stroke = { tool, background: e.shiftKey, xy: [], voxels: [] };
    viewer.setPointerCapture(e.pointerId);
    add(e);
  }, true);
  viewer.addEventListener("pointermove", (e) => {
    if (!stroke) return;
    e.stopPropagation();
    add(e);
  }, true);
  viewer.addEventListener("pointerup", (e) => {
    if (!stroke) return;
    e.stopPropagation();
    add(e);
    const s = stroke;
    stroke = null;
    send(s.tool === "lasso" ? "lassos" : "scribbles", s.voxels, s.background).finally(() => {
      if (!stroke) ctx.clearRect(0, 0, ink.width, ink.height);
    });
  }, true);

  document.addEventListener("keydown", (e) => {
    if (e.target.tagName === "INPUT" && e.target.type !== "checkbox" && e.target.type !== "range") return;
    if (e.ctrlKey || e.metaKey || e.altKey) return;
    const k = e.key.toLowerCase();
    if (TOOLS[k]) setTool(TOOLS[k]);
    else if (k === "escape" && tool) setTool(tool);
  });
  return { setTool, tool: () => tool };
}
