// Review page: draws the frame and boxes on a canvas; keyboard shortcuts and mouse editing.
// Boxes are in frame pixels; the canvas has the frame's size and CSS scales it.
(function () {
  "use strict";
  const data = JSON.parse(document.getElementById("sample-data").textContent);
  const canvas = document.getElementById("frame");
  const ctx = canvas.getContext("2d");
  const img = document.getElementById("img");
  const list = document.getElementById("boxes");
  const form = document.getElementById("review-form");
  const newClass = document.getElementById("new-class");
  let boxes = data.boxes.map((b) => ({ cls: b.cls, box: b.box.slice(), score: b.score }));
  let selected = boxes.length ? 0 : -1;
  let drawMode = false;
  let drag = null;
  const COLORS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45"];
  const color = (cls) => COLORS[Math.max(0, data.classes.indexOf(cls)) % COLORS.length];

  function clamp(b) {
    b.box[0] = Math.max(0, Math.min(b.box[0], data.width - 1));
    b.box[1] = Math.max(0, Math.min(b.box[1], data.height - 1));
    b.box[2] = Math.max(b.box[0] + 1, Math.min(b.box[2], data.width));
    b.box[3] = Math.max(b.box[1] + 1, Math.min(b.box[3], data.height));
  }

  function render() {
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    if (img.complete && img.naturalWidth) ctx.drawImage(img, 0, 0, canvas.width, canvas.height);
    const lw = Math.max(2, canvas.width / 400);
    boxes.forEach((b, i) => {
      const [x1, y1, x2, y2] = b.box;
      ctx.lineWidth = i === selected ? lw * 2 : lw;
      ctx.strokeStyle = color(b.cls);
      ctx.setLineDash(i === selected ? [lw * 4, lw * 2] : []);
      ctx.strokeRect(x1, y1, x2 - x1, y2 - y1);
      ctx.setLineDash([]);
      ctx.font = `${Math.round(lw * 7)}px sans-serif`;
      ctx.fillStyle = color(b.cls);
      const label = b.cls + (b.score !== undefined && b.score !== null ? " " + b.score.toFixed(2) : "");
      ctx.fillText(label, x1 + lw, Math.max(lw * 7, y1 - lw));
    });
    list.innerHTML = "";
    boxes.forEach((b, i) => {
      const li = document.createElement("li");
      li.className = i === selected ? "selected" : "";
      const sel = document.createElement("select");
      sel.setAttribute("aria-label", "class of box " + (i + 1));
      data.classes.forEach((c) => { const o = document.createElement("option"); o.textContent = c; o.selected = c === b.cls; sel.appendChild(o); });
      sel.addEventListener("change", () => { b.cls = sel.value; b.score = null; render(); });
      const del = document.createElement("button");
      del.type = "button"; del.textContent = "delete";
      del.addEventListener("click", () => { boxes.splice(i, 1); selected = Math.min(selected, boxes.length - 1); render(); });
      li.append(sel, " [" + b.box.map((v) => Math.round(v)).join(", ") + "] ", del);
      li.addEventListener("click", (e) => { if (e.target === li) { selected = i; render(); } });
      list.appendChild(li);
    });
    canvas.style.cursor = drawMode ? "crosshair" : "default";
  }

  function toFrame(ev) {
    const r = canvas.getBoundingClientRect();
    return [(ev.clientX - r.left) * canvas.width / r.width, (ev.clientY - r.top) * canvas.height / r.height];
  }

  function hit(x, y) {
    const tol = canvas.width / 100;
    for (let i = boxes.length - 1; i >= 0; i--) {
      const [x1, y1, x2, y2] = boxes[i].box;
      if (Math.abs(x - x2) < tol && Math.abs(y - y2) < tol) return [i, "resize"];
      if (x >= x1 && x <= x2 && y >= y1 && y <= y2) return [i, "move"];
    }
    return [-1, null];
  }

  canvas.addEventListener("mousedown", (ev) => {
    const [x, y] = toFrame(ev);
    if (drawMode) {
      boxes.push({ cls: newClass.value, box: [x, y, x + 1, y + 1], score: null });
      selected = boxes.length - 1;
      drag = { mode: "resize", i: selected, x, y };
    } else {
      const [i, mode] = hit(x, y);
      selected = i;
      drag = i >= 0 ? { mode, i, x, y } : null;
    }
    render();
  });
  window.addEventListener("mousemove", (ev) => {
    if (!drag) return;
    const [x, y] = toFrame(ev);
    const b = boxes[drag.i];
    if (drag.mode === "move") {
      const dx = x - drag.x, dy = y - drag.y;
      b.box = [b.box[0] + dx, b.box[1] + dy, b.box[2] + dx, b.box[3] + dy];
      drag.x = x; drag.y = y;
    } else {
      b.box[2] = x; b.box[3] = y;
    }
    render();
  });
  window.addEventListener("mouseup", () => {
    if (!drag) return;
    const b = boxes[drag.i];
    b.box = [Math.min(b.box[0], b.box[2]), Math.min(b.box[1], b.box[3]), Math.max(b.box[0], b.box[2]), Math.max(b.box[1], b.box[3])];
    clamp(b);
    if (b.box[2] - b.box[0] < 2 || b.box[3] - b.box[1] < 2) { boxes.splice(drag.i, 1); selected = boxes.length - 1; }
    drag = null; drawMode = false;
    render();
  });

  async function submit(action) {
    if (!form) return;
    const note = document.getElementById("note").value;
    const body = { action, note };
    if (action === "confirm") body.boxes = boxes.map((b) => ({ cls: b.cls, box: b.box.map((v) => Math.round(v * 10) / 10) }));
    const resp = await fetch(`/api/v1/samples/${data.sample_id}/review`, {
      method: "POST", credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": data.csrf_token },
      body: JSON.stringify(body),
    });
    if (resp.ok) { window.location.href = data.next_url; return; }
    let msg = resp.statusText;
    try { msg = (await resp.json()).detail; } catch (e) { /* not JSON */ }
    alert(`Review not saved: ${typeof msg === "string" ? msg : JSON.stringify(msg)}`);
  }

  if (form) {
    form.addEventListener("submit", (ev) => { ev.preventDefault(); submit(ev.submitter ? ev.submitter.value : "confirm"); });
  }

  document.addEventListener("keydown", (ev) => {
    if (ev.target instanceof HTMLInputElement || ev.target instanceof HTMLSelectElement) return;
    const b = boxes[selected];
    const step = ev.altKey ? 1 : Math.max(1, Math.round(data.width / 200));
    const arrows = { ArrowLeft: [-step, 0], ArrowRight: [step, 0], ArrowUp: [0, -step], ArrowDown: [0, step] };
    if (ev.key === "c") submit("confirm");
    else if (ev.key === "r") submit("reject");
    else if (ev.key === "n") window.location.href = data.next_url;
    else if (ev.key === "d") { drawMode = true; render(); }
    else if (ev.key === "Tab" && boxes.length) { selected = (selected + (ev.shiftKey ? boxes.length - 1 : 1)) % boxes.length; render(); }
    else if ((ev.key === "Delete" || ev.key === "Backspace") && b) { boxes.splice(selected, 1); selected = Math.min(selected, boxes.length - 1); render(); }
    else if (/^[1-9]$/.test(ev.key) && b && data.classes[+ev.key - 1]) { b.cls = data.classes[+ev.key - 1]; b.score = null; render(); }
    else if (arrows[ev.key] && b) {
      const [dx, dy] = arrows[ev.key];
      if (ev.shiftKey) { b.box[2] += dx; b.box[3] += dy; } else { b.box = [b.box[0] + dx, b.box[1] + dy, b.box[2] + dx, b.box[3] + dy]; }
      clamp(b); render();
    } else return;
    ev.preventDefault();
  });

  img.addEventListener("load", render);
  render();
  window.lineguardReview = { boxes: () => boxes };  // for tests and the curious
})();
