"""The where-it-looks report: one recorded caption -> probe.json and a self-contained report.html.

The page opens from disk (no server, no network): the image as the model saw it (resized to a square),
the caption as clickable tokens; for the selected token its attention over the image patches as a
heatmap overlay (any decoder layer or all of them, any head or their average), its top-5 next tokens
(what the model chose from), where every token looks per layer (its head-averaged attention split into
image / <bos> / prompt / the caption so far: one stacked bar per token and layer), the logit lens at
that position (each layer's top tokens), the caption's image reliance (each token's log-probability
with its image and with the image features zeroed, labelled by token), and the caption written with
the caption -> image attention knocked out (from layer 0, and from the middle layer on). For a detect or
segment answer (probe/locations.py) the parsed boxes are drawn over the image (with --vae, a segment
answer's masks tinted in over the heat map, outlined, each in its box's colour), and each box's four
`<loc>` tokens are shown as small maps of where the model looked when it wrote that coordinate (its
attention over the patches, layers and heads averaged), with the coordinate as a dashed line; selecting
a `<loc>` token also draws its line on the large view. The view is
in the address: report.html#token=3&layer=5&head=avg. Heatmaps travel as one uint8 per patch, each
grid scaled to its own maximum (kept beside it).
"""
import base64
import html
import io
import json

import numpy as np
import torch

from .hooking import DECODER
from .knockout import knockout
from .recording import generate, image_ablation, image_grid, logit_lens

VIEW = dict(left=16, top=72, size=448)  # where the image sits on the page, in CSS pixels (the browser test reads it)
SHARES = ["image", "<bos>", "prompt", "caption"]  # the key groups of Recording.attention_shares, as the page names them


def piece(tokenizer, i: int) -> str:
    """A token as the page shows it: SentencePiece's '▁' as a space, a newline as \\n, special tokens by name."""
    names = {tokenizer.eos_id: "<eos>", tokenizer.bos_id: "<bos>", tokenizer.pad_id: "<pad>",
             tokenizer.image_id: "<image>"}
    if i in names:
        return names[i]
    if i >= tokenizer.sp.get_piece_size():
        return f"<{i}>"
    return tokenizer.sp.id_to_piece(i).replace("\u2581", " ").replace("\n", "\\n")


@torch.no_grad()
def summarize(model, processor, rec, inputs: dict) -> tuple[dict, np.ndarray]:
    """Row 0 of a Recording (decoder hook_pattern and hook_resid_post recorded) -> (probe.json's dict,
    heatmaps (n tokens, L, H, side, side) float32)."""
    tok = processor.tokenizer
    ids = rec.tokens[0].tolist()
    n, L = len(ids), model.config.text.num_hidden_layers
    heat, lens = [], []
    for i in range(n):
        step = {k: v[:1] for k, v in rec.step(i).items()}
        rows = [step[DECODER.format(l) + "self_attn.hook_pattern"][:, :, 0] for l in range(L)]  # (1, H, S) each
        heat.append(torch.stack([image_grid(model, r, rec.input_ids[:1])[0] for r in rows]))  # (L, H, side, side)
        probs, top = logit_lens(model, step, k=5)  # (L, 1, 1, 5)
        lens.append([[[piece(tok, int(t)), round(float(p), 4)] for t, p in zip(top[l, 0, 0], probs[l, 0, 0])]
                     for l in range(L)])
    next_p, next_ids = rec.logits[0].softmax(-1).topk(5)  # (n, 5): what each token was chosen from
    rel = image_ablation(model, inputs["input_ids"][:1], inputs["pixel_values"][:1], rec.tokens[:1],
                         inputs["attention_mask"][:1], inputs["token_type_ids"][:1])
    real = rel["real"][0]
    shares = rec.attention_shares(model)[0]  # (n, L, 4)
    knocked = []
    for first in sorted({0, L // 2}):  # the caption when it may not look at the image from layer `first` on
        with knockout(model, {"suffix": ["image"]}, layers=range(first, L)):
            again = generate(model, **{k: v[:1] for k, v in inputs.items()}, max_new_tokens=n, names=["hook_embed"])
        knocked.append(dict(first_layer=first, text=processor.decode(again.tokens[0].tolist())))
    summary = dict(
        tokens=ids, pieces=[piece(tok, i) for i in ids], text=processor.decode(ids),
        attention_shares=shares.tolist(), share_groups=SHARES,  # (n, L, 4) head-averaged, summing to 1
        image_attention=shares[..., 0].tolist(),  # (n, L): the share on the image keys
        top5=[[[piece(tok, int(t)), round(float(p), 4)] for t, p in zip(next_ids[i], next_p[i])] for i in range(n)],
        logit_lens=lens,  # (n, L, 5) [piece, probability] at the position that chose each token
        reliance=dict(with_image=rel["with_image"][0].tolist(), without_image=rel["without_image"][0].tolist(),
                      real=real.tolist(), total_with_image=float(rel["with_image"][0][real].sum()),
                      total_without_image=float(rel["without_image"][0][real].sum())),
        knockout=knocked,
        layers=L, heads=model.config.text.num_attention_heads,
        grid=model.config.vision.image_size // model.config.vision.patch_size)
    return summary, torch.stack(heat).float().numpy()


def _png(image, size: int) -> str:
    buf = io.BytesIO()
    image.convert("RGB").resize((size, size)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def mask_overlay(masks: list, colours: list[str], size: int = VIEW["size"], alpha: float = 0.45, edge: int = 2) -> str:
    """Masks (H, W) bool (None: no mask) -> one RGBA PNG (base64) of size x size, each mask in its detection's
    colour ("#rrggbb") at `alpha` with an opaque outline `edge` px wide (the translucent fill alone is lost
    under a bright heat map), stretched to the square view as the image is (nearest neighbour); a later
    mask covers an earlier one where they overlap."""
    from PIL import Image
    out = np.zeros((size, size, 4), np.uint8)
    for mask, colour in zip(masks, colours):
        if mask is not None:
            big = np.asarray(Image.fromarray(mask).resize((size, size), Image.NEAREST))
            rgb = [int(colour[i:i + 2], 16) for i in (1, 3, 5)]
            out[big] = rgb + [round(255 * alpha)]
            out[big & ~_eroded(big, edge)] = rgb + [255]
    buf = io.BytesIO()
    Image.fromarray(out, "RGBA").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _eroded(mask: np.ndarray, r: int) -> np.ndarray:
    """(S, S) bool -> the pixels whose whole (2r + 1)^2 square lies in the mask (outside the view counts as out)."""
    padded, inner = np.pad(mask, r), mask.copy()
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            inner &= padded[dy:dy + len(mask), dx:dx + len(mask)]
    return inner


def render(summary: dict, heat: np.ndarray, image, title: str, model_size: int, overlay: str | None = None) -> str:
    """-> report.html text. `image`: a PIL image, shown as the model saw it (square, model_size px);
    overlay: the masks as one PNG over it (mask_overlay), or None."""
    peak = heat.max(axis=(-2, -1), keepdims=True)  # (n, L, H, 1, 1)
    scaled = np.round(heat / np.maximum(peak, 1e-30) * 255).astype(np.uint8)
    data = dict(summary, heat=base64.b64encode(scaled.tobytes()).decode(), peak=peak[..., 0, 0].tolist(),
                mask_overlay=overlay)
    payload = json.dumps(data).replace("</", "<\\/")
    return (PAGE.replace("$TITLE", html.escape(title)).replace("$IMAGE", _png(image, model_size))
            .replace("$LEFT", str(VIEW["left"])).replace("$TOP", str(VIEW["top"])).replace("$SIZE", str(VIEW["size"]))
            .replace("$DATA", payload))


def index(entries: list[tuple[str, str, str, str]]) -> str:
    """entries (folder, image name, caption, thumbnail PNG as base64) -> index.html text."""
    rows = "\n".join(f'<tr><td><a href="{html.escape(folder)}/report.html"><img src="data:image/png;base64,{thumb}" '
                     f'width="{THUMB}" height="{THUMB}" alt=""></a></td><td><a href="{html.escape(folder)}/report.html">'
                     f'{html.escape(name)}</a><br>{html.escape(text)}</td></tr>' for folder, name, text, thumb in entries)
    return ("<!doctype html><meta charset=utf-8><title>probe</title><style>body { font: 14px/1.4 sans-serif; margin: 16px }"
            " td { padding: 4px 12px 4px 0; vertical-align: top }</style>"
            f"<h1>Where it looks</h1><table>\n{rows}\n</table>\n")


def thumbnail(image) -> str:
    """A PIL image -> the index's thumbnail, PNG as base64."""
    return _png(image, THUMB)


THUMB = 96  # index.html thumbnails, CSS pixels


PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>$TITLE</title>
<style>
body { margin: 0; font: 14px/1.4 sans-serif; color: #222; background: #fff; }
header { position: absolute; left: 16px; top: 0; height: 64px; right: 16px; overflow: hidden; }
header h1 { font-size: 18px; margin: 10px 0 2px; } header p { margin: 0; color: #555; }
#view { position: absolute; left: $LEFTpx; top: $TOPpx; width: $SIZEpx; height: $SIZEpx; }
#view img, #view canvas { position: absolute; left: 0; top: 0; width: $SIZEpx; height: $SIZEpx; }
#view canvas { image-rendering: pixelated; }
#view svg { position: absolute; left: 0; top: 0; width: $SIZEpx; height: $SIZEpx; overflow: hidden; }
svg text.boxlab { font-size: 12px; fill: #000; }
.tok.loc { border-bottom-width: 3px; }
.loc-row { margin: 4px 0; } .loc-row b { display: inline-block; min-width: 150px; vertical-align: top; }
.loccell { position: relative; display: inline-block; width: 96px; height: 112px; margin: 0 6px 4px 0; cursor: pointer;
           font-size: 11px; vertical-align: top; }
.loccell img, .loccell canvas, .loccell svg { position: absolute; left: 0; top: 16px; width: 96px; height: 96px; }
.loccell canvas { image-rendering: pixelated; } .loccell.on { outline: 2px solid #3b6fb6; }
#side { position: absolute; left: calc($LEFTpx + $SIZEpx + 24px); top: $TOPpx; right: 16px; }
.tok { display: inline-block; margin: 2px; padding: 2px 6px; border: 1px solid #bbb; border-radius: 4px;
       cursor: pointer; white-space: pre; background: #f6f6f6; }
.tok.on { background: #cfe0f5; border-color: #3b6fb6; }
table { border-collapse: collapse; margin: 6px 0 12px; } td, th { padding: 1px 8px; text-align: left; }
th { color: #555; font-weight: normal; } h2 { font-size: 15px; margin: 12px 0 4px; }
#lens td { white-space: pre; font-family: monospace; font-size: 12px; }
svg text.lab { font-size: 11px; fill: #444; white-space: pre; }
.nowrap { white-space: nowrap; } .key { display: inline-block; width: 10px; height: 10px; margin: 0 4px 0 10px; }
</style></head><body>
<header><h1>$TITLE</h1><p id="caption"></p></header>
<div id="view"><img src="data:image/png;base64,$IMAGE" alt="input image"><canvas id="heat"></canvas><img id="masks" alt="" hidden><svg id="boxes" viewBox="0 0 $SIZE $SIZE"></svg></div>
<div id="side">
<div id="tokens"></div>
<p>layer <select id="layer"></select> head <select id="head"></select><br><span id="share"></span><br>
<span id="locnote"></span></p>
<div id="boxsec" hidden><h2>Boxes: where it looked when it wrote each coordinate (layers and heads averaged)</h2>
<div id="locs"></div></div>
<h2>Top-5 next tokens</h2><table id="top5"></table>
<h2>Where each token looks, per layer (head-averaged attention)</h2><p id="sharekey"></p><svg id="shares"></svg>
<h2>Image reliance</h2><p id="reltext"></p><svg id="rel"></svg>
<h2>Knockout</h2><p id="knock"></p>
<h2>Logit lens (each layer's residual through the final norm and the tied head)</h2><table id="lens"></table>
</div>
<script>
const D = $DATA;
const raw = Uint8Array.from(atob(D.heat), c => c.charCodeAt(0));
const N = D.grid * D.grid, L = D.layers, H = D.heads;
let token = 0;
const $ = id => document.getElementById(id);
function cell(t, l, h, j) { const g = (t * L + l) * H + h; return raw[g * N + j] / 255 * D.peak[t][l][h]; }
function grid(t, layer, head) {   // the attention over the patches, averaged as selected
  const out = new Float32Array(N), ls = layer === "all" ? [...Array(L).keys()] : [+layer];
  const hs = head === "avg" ? [...Array(H).keys()] : [+head];
  for (const l of ls) for (const h of hs) for (let j = 0; j < N; j++) out[j] += cell(t, l, h, j) / (ls.length * hs.length);
  return out;
}
function paint(c, g) {  // attention over the patches -> canvas c; hot colour map from the dimmest patch (clear) to the brightest (yellow)
  c.width = c.height = D.grid;
  const ctx = c.getContext("2d"), img = ctx.createImageData(D.grid, D.grid);
  let top = 0, low = Infinity, sum = 0;
  for (const v of g) { top = Math.max(top, v); low = Math.min(low, v); sum += v; }
  for (let j = 0; j < N; j++) {
    const v = top > low ? (g[j] - low) / (top - low) : 0;
    img.data.set([255, Math.round(255 * Math.max(0, 2 * v - 1)), 0, Math.round(190 * v)], 4 * j);
  }
  ctx.putImageData(img, 0, 0);
  return [top, low, sum];
}
function draw() {
  const [top, low, sum] = paint($("heat"), grid(token, $("layer").value, $("head").value));
  $("share").textContent = `attention on the image ${(100 * sum).toFixed(1)}%; colours span patches ` +
    `from ${(100 * low).toFixed(2)}% (clear) to ${(100 * top).toFixed(2)}% (yellow)`;
  document.querySelectorAll(".tok").forEach((b, i) => b.classList.toggle("on", i === token));
  document.querySelectorAll(".loccell").forEach(b => b.classList.toggle("on", +b.dataset.token === token));
  boxes();
  $("selcol").setAttribute("x", LEFT + token * CW);
  const layer = $("layer").value;
  $("selrow").setAttribute("visibility", layer === "all" ? "hidden" : "visible");
  if (layer !== "all") $("selrow").setAttribute("y", +layer * CH + 0.5);
  history.replaceState(null, "", `#token=${token}&layer=${$("layer").value}&head=${$("head").value}`);  // a link to this view
  $("top5").innerHTML = "<tr><th>token</th><th>probability</th></tr>" + D.top5[token].map(([p, q]) =>
    `<tr><td>${esc(p)}</td><td>${q.toFixed(3)}</td></tr>`).join("");
  $("lens").innerHTML = "<tr><th>layer</th><th colspan=5>top-5</th></tr>" + D.logit_lens[token].map((row, l) =>
    `<tr><td>${l}</td>` + row.map(([p, q]) => `<td>${esc(p)} ${q.toFixed(2)}</td>`).join("") + "</tr>").join("");
}
const COLOURS = ["#e8a317", "#8e44ad", "#3b6fb6", "#2e9e6b"];  // image, <bos>, prompt, caption
const CW = 30, CH = L <= 8 ? 20 : 12, LEFT = 24;  // one stacked bar per token (column) and layer (row)
function labels() {  // room for the token labels, written at 60 degrees under a row of bars
  return 16 + 5.5 * Math.min(16, Math.max(1, ...D.pieces.map(p => p.length)));
}
function shares() {  // each bar: the token's attention at that layer split by key group; widths add up to CW - 2
  const n = D.tokens.length, svg = $("shares");
  svg.setAttribute("width", LEFT + n * CW + 10);
  svg.setAttribute("height", L * CH + labels());
  let s = `<rect id="selcol" y="0" width="${CW}" height="${L * CH + 2}" fill="none" stroke="#222"/>` +
          `<rect id="selrow" x="${LEFT - 2}" width="${n * CW + 4}" height="${CH}" fill="none" stroke="#222" visibility="hidden"/>`;
  for (let l = 0; l < L; l++) s += `<text class="lab" x="${LEFT - 4}" y="${l * CH + CH - 1}" text-anchor="end">${l}</text>`;
  for (let t = 0; t < n; t++) {
    for (let l = 0; l < L; l++) {
      let x = LEFT + t * CW + 1;
      D.attention_shares[t][l].forEach((v, g) => {
        const w = v * (CW - 2);
        s += `<rect class="share" data-token="${t}" data-layer="${l}" data-group="${g}" data-share="${v}" x="${x}" ` +
             `y="${l * CH + 1}" width="${w}" height="${CH - 1}" fill="${COLOURS[g]}"><title>${esc(D.pieces[t])}, ` +
             `layer ${l}: ${esc(D.share_groups[g])} ${(100 * v).toFixed(1)}%</title></rect>`;
        x += w;
      });
    }
    s += `<text class="lab" transform="translate(${LEFT + t * CW + CW / 2 - 3},${L * CH + 8}) rotate(60)">${esc(D.pieces[t])}</text>`;
  }
  svg.innerHTML = s;
  svg.onclick = e => { const t = e.target.closest("[data-token]"); if (t) { token = +t.dataset.token; draw(); } };
  $("sharekey").innerHTML = "rows: layers 0 (top) to " + (L - 1) + "; columns: the caption's tokens" +
    D.share_groups.map((g, i) => `<span class="nowrap"><span class="key" style="background:${COLOURS[i]}"></span>` +
    `${esc(g)}</span>`).join("");
}
const DETS = D.detections || [], LOCS = D.loc_tokens || [];
const LOC = Object.fromEntries(LOCS.map(l => [l.token, l]));
const SX = $SIZE / (D.width || 1), SY = $SIZE / (D.height || 1);  // image pixels -> page pixels
function line(l, size) {  // a <loc> token's coordinate as a dashed line across a square view of `size` px
  const v = l.value / 1023 * size, y = l.coordinate && l.coordinate[0] === "y";
  const colour = l.detection === null ? "#fff" : DETS[l.detection].colour;
  return `<line class="coord" x1="${y ? 0 : v}" x2="${y ? size : v}" y1="${y ? v : 0}" y2="${y ? v : size}" ` +
         `stroke="${colour}" stroke-width="2" stroke-dasharray="6 4"/>`;
}
function boxes() {  // the parsed boxes over the image: the selected <loc> token's box bold, its coordinate dashed
  const sel = LOC[token];
  let s = "";
  DETS.forEach((d, j) => {
    const x0 = d.box[0] * SX, y0 = d.box[1] * SY, w = (d.box[2] - d.box[0]) * SX, h = (d.box[3] - d.box[1]) * SY;
    const ly = y0 >= 15 ? y0 - 15 : y0, on = sel && sel.detection === j;
    s += `<rect class="box" data-detection="${j}" x="${x0}" y="${y0}" width="${w}" height="${h}" fill="none" ` +
         `stroke="${d.colour}" stroke-width="${on ? 4 : 2}" shape-rendering="crispEdges"/>` +
         `<rect x="${x0}" y="${ly}" width="${7 * d.label.length + 6}" height="15" fill="${d.colour}"/>` +
         `<text class="boxlab" x="${x0 + 3}" y="${ly + 12}">${esc(d.label)}</text>`;
  });
  $("boxes").innerHTML = s + (sel && sel.coordinate ? line(sel, $SIZE) : "");
  $("locnote").textContent = !sel ? "" : `${sel.piece}: ${sel.coordinate || "a fifth <loc>"} of ` +
    (sel.detection === null ? "a malformed piece (dropped)" : `box ${sel.detection + 1} "${DETS[sel.detection].label}"`) +
    `, ${sel.value}/1023 of the image's ${sel.coordinate && sel.coordinate[0] === "x" ? "width" : "height"}; ` +
    `the heat map is where the model looked when it wrote it`;
}
function locs() {  // per object: its <loc> tokens, each a small map of where the model looked when it wrote it
  if (!LOCS.length) return;
  $("boxsec").hidden = false;
  const src = document.querySelector("#view img").src, objects = [...new Set(LOCS.map(l => l.object))];
  $("locs").innerHTML = objects.map(k => {
    const ls = LOCS.filter(l => l.object === k), d = ls[0].detection;
    const name = d === null ? "malformed (dropped)" : `${d + 1}. ${esc(DETS[d].label)}`;
    return `<div class="loc-row"><b>${name}</b>` + ls.map(l => `<span class="loccell" data-token="${l.token}">` +
      `${esc(l.piece)} ${l.coordinate || ""}<img src="${src}" alt=""><canvas></canvas>` +
      `<svg viewBox="0 0 96 96">${l.coordinate ? line(l, 96) : ""}</svg></span>`).join("") + "</div>";
  }).join("");
  document.querySelectorAll(".loccell").forEach(b => {
    paint(b.querySelector("canvas"), LOC[+b.dataset.token].attention.flat());
    b.onclick = () => { token = +b.dataset.token; draw(); };
  });
}
function esc(s) { return s.replace(/[&<>]/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;"})[c]); }
function reliance() {  // one bar per token, labelled under the axis
  const R = D.reliance, n = D.tokens.length, w = 28, svg = $("rel");
  svg.setAttribute("width", n * w + 10);
  svg.setAttribute("height", 114 + labels());
  let s = "", big = 1e-9;
  for (let i = 0; i < n; i++) big = Math.max(big, Math.abs(R.with_image[i] - R.without_image[i]));
  for (let i = 0; i < n; i++) {  // bar up: the image makes the token likelier; down: less likely
    if (!R.real[i]) continue;
    const d = R.with_image[i] - R.without_image[i], h = 50 * Math.abs(d) / big;
    s += `<rect x="${i * w + 5}" y="${d > 0 ? 60 - h : 60}" width="${w - 6}" height="${h}" fill="${d > 0 ? "#3b6fb6" : "#999"}">` +
         `<title>${esc(D.pieces[i])}: log p ${R.with_image[i].toFixed(2)} with image, ${R.without_image[i].toFixed(2)} without</title></rect>` +
         `<text class="lab" transform="translate(${i * w + 12},118) rotate(60)">${esc(D.pieces[i])}</text>`;
  }
  svg.innerHTML = s + `<line x1="0" x2="${n * w + 10}" y1="60" y2="60" stroke="#444"/>`;
  $("reltext").textContent = `caption log-likelihood ${R.total_with_image.toFixed(2)} with its image, ` +
    `${R.total_without_image.toFixed(2)} with the image features zeroed (bars: per-token difference)`;
}
if (D.mask_overlay) { $("masks").src = "data:image/png;base64," + D.mask_overlay; $("masks").hidden = false; }  // segment masks
$("caption").textContent = D.text;
$("tokens").innerHTML = D.pieces.map((p, i) => `<span class="tok${LOC[i] ? " loc" : ""}" data-i="${i}"` +
  (LOC[i] && LOC[i].detection !== null ? ` style="border-bottom-color:${DETS[LOC[i].detection].colour}"` : "") +
  `>${esc(p)}</span>`).join("");
document.querySelectorAll(".tok").forEach(b => b.onclick = () => { token = +b.dataset.i; draw(); });
$("layer").innerHTML = `<option value="all">all (average)</option>` + [...Array(L).keys()].map(l => `<option>${l}</option>`).join("");
$("head").innerHTML = `<option value="avg">average</option>` + [...Array(H).keys()].map(h => `<option>${h}</option>`).join("");
const view = new URLSearchParams(location.hash.slice(1));  // e.g. report.html#token=3&layer=5&head=avg
token = Math.min(+(view.get("token") || 0), D.tokens.length - 1);
if (view.has("layer")) $("layer").value = view.get("layer");
if (view.has("head")) $("head").value = view.get("head");
$("layer").onchange = $("head").onchange = draw;
$("knock").innerHTML = D.knockout.map(k => `caption &rarr; image attention blocked from layer ${k.first_layer} on: ` +
  `<q>${esc(k.text)}</q>`).join("<br>");
shares(); reliance(); locs(); draw();
</script></body></html>
"""
