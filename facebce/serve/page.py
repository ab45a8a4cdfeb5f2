"""The web page at `/`: plain HTML + JavaScript, no build step, kept in a module so that it travels in
the wheel with the code (no package-data entry to forget). It talks to the same API with the key the
user types (kept in sessionStorage), draws the face box on a canvas and shows the decision."""

PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>facebce serve</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 52em; color: #222; }
 fieldset { border: 1px solid #ccc; padding: 1em; margin-bottom: 1em; }
 label { display: inline-block; min-width: 7em; }
 input[type=text], input[type=password] { width: 22em; }
 button { margin: .5em .5em 0 0; padding: .4em 1.2em; }
 #view { display: flex; gap: 1.5em; align-items: flex-start; }
 canvas { border: 1px solid #ccc; max-width: 320px; }
 table { border-collapse: collapse; } td, th { padding: .2em .8em; border-bottom: 1px solid #eee; text-align: left; }
 .decision { font-size: 1.6em; font-weight: bold; margin: .2em 0; }
 .unknown { color: #b00; } .known { color: #070; } .error { color: #b00; white-space: pre-wrap; }
</style>
</head>
<body>
<h1>facebce serve</h1>
<p>Identify a face against the gallery at one global threshold, or enrol it. Aligned 112&times;112 crops are
used as they are; other photos need a server started with a detector.</p>
<fieldset>
 <div><label for="key">API key</label>
  <input id="key" type="password" placeholder="fbk_... (empty if the server has no keys)"></div>
 <div><label for="file">Image</label>
  <input id="file" type="file" accept="image/jpeg,image/png,image/bmp,image/webp"></div>
 <div><label for="name">Identity</label><input id="name" type="text" placeholder="name, for Enrol"></div>
 <div><label for="k">Top k</label><input id="k" type="number" min="1" max="100" value="5" style="width:4em"></div>
 <button id="identify">Identify</button><button id="enrol">Enrol</button>
</fieldset>
<div id="view">
 <canvas id="canvas" width="112" height="112"></canvas>
 <div id="result" data-state="idle"><p>Pick an image, then Identify or Enrol.</p></div>
</div>
<p><a href="/docs">API documentation</a> &middot; <a href="/metrics">metrics</a></p>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const keyBox = $("key");
keyBox.value = sessionStorage.getItem("facebce-key") || "";
keyBox.addEventListener("change", () => sessionStorage.setItem("facebce-key", keyBox.value));
let image = null;

function esc(s) {
  const table = {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"};
  return String(s).replace(/[&<>"']/g, (c) => table[c]);
}

$("file").addEventListener("change", () => {
  const f = $("file").files[0];
  if (!f) return;
  const img = new Image();
  img.onload = () => { image = img; draw(null); };
  img.src = URL.createObjectURL(f);
});

function draw(face) {
  const c = $("canvas"), ctx = c.getContext("2d");
  if (!image) return;
  c.width = image.naturalWidth; c.height = image.naturalHeight;
  ctx.drawImage(image, 0, 0);
  if (!face) return;
  const b = face.box || [0, 0, c.width, c.height];  // an aligned crop: the face is the whole image
  ctx.strokeStyle = "#0c0"; ctx.lineWidth = Math.max(2, c.width / 100);
  ctx.strokeRect(b[0], b[1], b[2] - b[0], b[3] - b[1]);
}

async function call(url) {
  const f = $("file").files[0];
  if (!f) { show("error", "<p class='error'>Pick an image first.</p>"); return null; }
  const form = new FormData();
  form.append("files", f, f.name);
  if (url.endsWith("identify")) form.append("k", $("k").value || "5");
  const headers = keyBox.value ? {"Authorization": "Bearer " + keyBox.value} : {};
  show("busy", "<p>Working&hellip;</p>");
  let resp, body;
  try {
    resp = await fetch(url, {method: "POST", body: form, headers});
    body = await resp.json();
  } catch (e) {
    show("error", "<p class='error'>Request failed: " + esc(e) + "</p>");
    return null;
  }
  if (!resp.ok) {
    const err = body.error || {};
    show("error", "<p class='error'>" + resp.status + " " + esc(err.code || "") + ": " +
      esc(err.message || "") + "</p>");
    return null;
  }
  return body;
}

function show(state, html) {
  const r = $("result");
  r.dataset.state = state;
  r.innerHTML = html;
}

$("identify").addEventListener("click", async () => {
  const body = await call("/v1/identify");
  if (!body) return;
  const r = body.results[0];
  draw(r.face);
  const decision = r.known
    ? "<p class='decision known' id='decision'>" + esc(r.identity) + "</p>"
    : "<p class='decision unknown' id='decision'>UNKNOWN</p>";
  const rows = r.matches.map((m) => "<tr><td>" + esc(m.identity) + "</td><td>" + m.score.toFixed(3) +
    "</td><td>" + m.id + "</td></tr>").join("");
  show("done", decision +
    "<p>best score <span id='score'>" + (r.score === null ? "-" : r.score.toFixed(3)) + "</span> vs threshold " +
    "<span id='threshold'>" + body.threshold.toFixed(3) + "</span></p>" +
    "<table id='matches'><tr><th>identity</th><th>score</th><th>id</th></tr>" + rows + "</table>");
});

$("enrol").addEventListener("click", async () => {
  const name = $("name").value.trim();
  if (!name) { show("error", "<p class='error'>Type the identity's name to enrol.</p>"); return; }
  const body = await call("/v1/subjects/" + encodeURIComponent(name) + "/faces");
  if (!body) return;
  draw(body.faces[0]);
  show("done", "<p class='decision known' id='decision'>enrolled " + esc(body.identity) + "</p><p>face id " +
    body.ids.join(", ") + "</p>");
});
</script>
</body>
</html>
"""
