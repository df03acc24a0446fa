"""A self-contained static results page: captions, scores and per-word attention you can hover over.

``DIR/index.html`` holds everything but the pictures: inline CSS and JavaScript, no network, no CDN.
Each picture is written once beside it (``DIR/images/NNNNN_name.jpg``, or ``.png`` for small ones
such as the shapes world, where JPEG would smear the flat colours), scaled to at most ``image_side``
pixels: beside rather than inlined in base64 because a split of 1,000 photos (15-40 KB each) would
make an HTML file of tens of megabytes that a browser must parse before showing anything, while
separate files load as they scroll into view (``loading="lazy"``) and are cached.

Attention is not pre-rendered (one picture per word would be T files per caption). Each caption
carries its raw attention grid, ``T x L`` bytes (each word's map divided by its own peak, as the
figures scale it, and quantised to 0-255; ~4 KB of base64 for 15 words on a 14x14 grid), and the
page draws it in JavaScript on a canvas over the photo: the grid is upsampled bilinearly by the
canvas and shown as the figures' "spotlight" (attended regions keep their colour, the rest is
darkened to 25%); by default each map is stretched to its own range (the figures' ``scale="minmax"``,
which shows where a diffuse map leans), and a checkbox switches to ``"peak"`` scaling (a diffuse map
stays diffuse). Hard attention's chosen cell is outlined. Words are buttons: hovering, focusing
(Tab, arrow keys) or tapping one shows its map; a tap or Enter pins it, Escape unpins.

For a split (:func:`write_split_page`) each image also lists its references and its CIDEr-D, the
images are sorted worst first, and the metrics table is at the top. An image that could not be read
gets a row with its error; the rest of the page is still written.
"""

from __future__ import annotations

import base64
import html
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import numpy as np
from PIL import Image

from captioner.utils import atomic_write_text
from captioner.viz.attention import grid_shape

if TYPE_CHECKING:
    from captioner.data.sources import ImageRecord
    from captioner.decoding.caption import Caption

IMAGE_DIR = "images"
PAGE_NAME = "index.html"
SMALL_IMAGE_PIXELS = 160 * 160  # at most this many pixels: PNG (lossless and still small), else JPEG
_OUR_IMAGE = re.compile(r"^\d{5}_[A-Za-z0-9_.-]*\.(?:jpg|png)$")  # files this module writes (a rerun replaces them)
SCALED_METRICS = ("BLEU", "ROUGE", "METEOR", "CIDEr")  # also shown x100, as papers print them


@dataclass
class PageItem:
    """One row of the page: an image, its captions (best first) and, for a split, references and CIDEr-D.

    ``error`` with no captions is a broken image (a row with the error only); with captions it says
    why the picture is missing (the captions still show, without attention).
    """

    name: str
    image: Image.Image | None = None
    captions: Sequence[Caption] = ()
    labels: Sequence[str] | None = None  # one per caption (e.g. "beam 1"); default "1", "2", ... (none for a single caption)
    references: Sequence[str] = ()
    cider: float | None = None
    error: str | None = None
    grid: tuple[int, int] | None = None  # (h, w) of the attention grid; default: the squarest factorisation of L
    details: Mapping[str, str] = field(default_factory=dict)  # extra "key: value" lines (e.g. the file path)


# --------------------------------------------------------------------------------------------------
# Pieces
def _esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _safe_stem(name: str) -> str:
    stem = Path(name).stem if name else "image"
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_")[:40]
    return stem or "image"


def _write_image(image: Image.Image, out_dir: Path, index: int, name: str, side: int, quality: int) -> tuple[str, int, int]:
    """Save a display copy (longest side <= side) beside the page; (relative URL, width, height)."""
    img = image.convert("RGB")
    if max(img.size) > side:
        img = img.copy()
        img.thumbnail((side, side), Image.BICUBIC)
    small = img.size[0] * img.size[1] <= SMALL_IMAGE_PIXELS
    fname = f"{index:05d}_{_safe_stem(name)}.{'png' if small else 'jpg'}"
    path = out_dir / IMAGE_DIR / fname
    if small:
        img.save(path, format="PNG", optimize=True)
    else:
        img.save(path, format="JPEG", quality=quality, optimize=True)
    return f"{IMAGE_DIR}/{quote(fname)}", img.size[0], img.size[1]


def encode_attention(attention: Any) -> tuple[str, list[float]]:
    """Attention (T, L) -> (base64 of T*L bytes, each row divided by its peak; the T peaks)."""
    a = np.asarray(attention.detach().cpu().float() if hasattr(attention, "detach") else attention, dtype=np.float32)
    if a.ndim != 2:
        raise ValueError(f"attention must be (T, L), got shape {a.shape}")
    a = np.nan_to_num(np.clip(a, 0.0, None))
    peaks = a.max(axis=1) if a.size else np.zeros(a.shape[0], dtype=np.float32)  # (T,)
    q = np.rint(255.0 * a / np.maximum(peaks, 1e-12)[:, None]).astype(np.uint8)  # (T, L)
    return base64.b64encode(q.tobytes()).decode("ascii"), [float(p) for p in peaks]


def decode_attention(data: str, length: int, locations: int) -> np.ndarray:
    """Inverse of :func:`encode_attention`'s bytes: (T, L) in [0, 1] (for tests and tools)."""
    q = np.frombuffer(base64.b64decode(data), dtype=np.uint8)
    return q.reshape(length, locations).astype(np.float32) / 255.0


def metrics_table(metrics: Mapping[str, Any]) -> str:
    """The metrics as an HTML table, one column per metric (numbers only; BLEU/ROUGE/METEOR/CIDEr also x100)."""
    cols = [(k, v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if not cols:
        return ""
    head = "".join(f'<th scope="col">{_esc(k)}</th>' for k, _ in cols)
    value = "".join(f"<td>{_esc(v if isinstance(v, int) else f'{v:.4f}')}</td>" for _, v in cols)
    scaled = "".join(f"<td>{f'{100 * v:.2f}' if k.split('-')[0] in SCALED_METRICS else ''}</td>" for k, v in cols)
    return (f'<table class="metrics"><caption>Metrics</caption><thead><tr><td></td>{head}</tr></thead><tbody>'
            f'<tr><th scope="row">value</th>{value}</tr><tr><th scope="row">x100</th>{scaled}</tr></tbody></table>')


def _caption_html(c: Caption, label: str, grid: tuple[int, int] | None, item_id: str, k: int) -> str:
    """One caption: its score and one button per word carrying the attention data."""
    words = list(c.words)
    attrs = ['class="caption"', f'data-caption="{item_id}-{k}"', f'data-words="{len(words)}"']
    att = getattr(c, "attention", None)
    interactive = att is not None and len(words) > 0 and att.ndim == 2 and att.shape[0] == len(words)
    if interactive:
        L = int(att.shape[1])
        h, w = grid if grid is not None else grid_shape(L)  # square: the encoder sees the image squashed to a square
        if h * w != L:
            raise ValueError(f"grid {h}x{w} does not have {L} cells")
        data, peaks = encode_attention(att)
        attrs += [f'data-grid="{h}x{w}"', f'data-attn="{data}"', f'data-peaks="{",".join(f"{p:.4g}" for p in peaks)}"']
        if c.locations is not None:
            attrs.append(f'data-locs="{",".join(str(int(x)) for x in c.locations)}"')
    score = f"{c.score:.3f}" if c.score is not None and math.isfinite(c.score) else "n/a"
    if interactive:
        body = " ".join(f'<button type="button" class="word" data-t="{t}" aria-pressed="false">{_esc(wd)}</button>'
                        for t, wd in enumerate(words))
    else:
        body = " ".join(f'<span class="word-plain">{_esc(wd)}</span>' for wd in words)
    if not words:
        body = '<span class="empty">(empty caption)</span>'
    note = "" if getattr(c, "finished", True) else ' <span class="unfinished" title="stopped at max_len before &lt;end&gt;">(unfinished)</span>'
    return (f"<li {' '.join(attrs)}><span class=\"label\">{_esc(label)}</span> <span class=\"text\">{body}</span>{note} "
            f"<span class=\"score\" title=\"log-probability of the caption (words and &lt;end&gt;)\">log p {_esc(score)}</span></li>")


def _item_html(item: PageItem, index: int, out_dir: Path, image_side: int, quality: int) -> str:
    """The HTML of one row (writes its picture)."""
    item_id = f"item-{index}"
    name = _esc(item.name)
    parts: list[str] = []
    img_html = ""
    error = item.error
    if item.image is not None:
        try:
            url, W, H = _write_image(item.image, out_dir, index, item.name, image_side, quality)
            scale = max(1.0, 320.0 / max(W, H))  # canvas backing size: smooth even for a 64-pixel image
            cw, ch = round(W * scale), round(H * scale)
            img_html = (f'<div class="viz" style="aspect-ratio: {W} / {H}"><img class="photo" src="{url}" width="{W}" height="{H}" loading="lazy" '
                        f'alt="{name}"><canvas class="attn" width="{cw}" height="{ch}" aria-hidden="true"></canvas></div>'
                        f'<p class="viz-label" aria-live="polite">hover, tap or focus a word to see where the model looked</p>')
        except (OSError, ValueError) as e:  # an unwritable/undrawable picture: the captions still show
            error = " ".join(f"picture could not be written ({type(e).__name__}: {e})".split())
    if not img_html:
        img_html = '<div class="viz missing" role="img" aria-label="no picture">no picture</div>'
    broken = error is not None and not item.captions
    parts.append(f'<section class="item{" broken" if broken else ""}" id="{item_id}" data-name="{name}"'
                 + (f' data-cider="{item.cider:.6g}"' if item.cider is not None else "") + ">")
    parts.append(f'<div class="picture">{img_html}</div><div class="about">')
    parts.append(f'<h2 class="name">{name}</h2>')
    if item.cider is not None:
        parts.append(f'<p class="cider">CIDEr-D <b>{item.cider:.3f}</b></p>')
    for k, v in item.details.items():
        parts.append(f'<p class="detail"><span>{_esc(k)}:</span> {_esc(v)}</p>')
    if error is not None:
        parts.append(f'<p class="error" role="alert">error: {_esc(error)}</p>')
    if item.captions:
        n = len(item.captions)
        labels = list(item.labels) if item.labels is not None else [str(i + 1) if n > 1 else "" for i in range(n)]
        parts.append('<ol class="captions">' + "".join(
            _caption_html(c, labels[k], item.grid, item_id, k) for k, c in enumerate(item.captions)
        ) + "</ol>")
    if item.references:
        parts.append(f'<details class="refs" open><summary>references ({len(item.references)})</summary><ul>'
                     + "".join(f"<li>{_esc(r)}</li>" for r in item.references) + "</ul></details>")
    parts.append("</div></section>")
    return "".join(parts)


# --------------------------------------------------------------------------------------------------
# The page
class ResultsPage:
    """A results page written as items arrive: ``add`` writes each picture at once, ``write`` the HTML at the end.

    Only the page's text is kept in memory (a few KB per image), so a split of thousands of images can
    stream through. Pictures of an earlier page in the same directory (names this class writes) are removed.
    """

    def __init__(self, out_dir: str | Path, title: str = "captioner results", *, order: str = "input",
                 meta: Mapping[str, Any] | None = None, image_side: int = 384, quality: int = 85):
        if order not in ("input", "cider"):
            raise ValueError(f"order must be 'input' or 'cider', got {order!r}")
        self.out = Path(out_dir)
        (self.out / IMAGE_DIR).mkdir(parents=True, exist_ok=True)
        for old in (self.out / IMAGE_DIR).iterdir():
            if old.is_file() and _OUR_IMAGE.match(old.name):
                old.unlink()
        self.title, self.order, self.meta = title, order, dict(meta or {})
        self.image_side, self.quality = image_side, quality
        self.rows: list[tuple[float, int, str]] = []
        self.n_broken = 0

    def add(self, item: PageItem) -> None:
        """Write the item's picture and keep its row."""
        i = len(self.rows)
        self.rows.append((item.cider if item.cider is not None else -math.inf, i, _item_html(item, i, self.out, self.image_side, self.quality)))
        self.n_broken += item.error is not None and not item.captions

    def write(self, metrics: Mapping[str, Any] | None = None) -> Path:
        """Write ``index.html`` (atomically) with ``metrics`` as the table at the top; returns its path."""
        rows = sorted(self.rows, key=lambda r: (r[0], r[1])) if self.order == "cider" else self.rows
        summary = f"{len(rows)} image{'s' if len(rows) != 1 else ''}"
        if self.n_broken:
            summary += f", {self.n_broken} could not be captioned"
        if self.order == "cider":
            summary += "; sorted by CIDEr-D, worst first"
        meta_html = "".join(f"<div><dt>{_esc(k)}</dt><dd>{_esc(v)}</dd></div>" for k, v in self.meta.items())
        page = PAGE_TEMPLATE.format(
            title=_esc(self.title), css=CSS, js=JS, summary=_esc(summary),
            meta=f'<dl class="meta">{meta_html}</dl>' if meta_html else "",
            metrics=metrics_table(metrics) if metrics else "",
            items="\n".join(r[2] for r in rows) or '<p class="none">no images</p>',
        )
        path = self.out / PAGE_NAME
        atomic_write_text(path, page)
        os.chmod(path, 0o644)  # a page is for sharing: readable like its pictures (the temporary file was 0600)
        return path


def write_results_page(
    out_dir: str | Path,
    items: Iterable[PageItem],
    title: str = "captioner results",
    metrics: Mapping[str, Any] | None = None,
    *,
    order: str = "input",
    meta: Mapping[str, Any] | None = None,
    image_side: int = 384,
    quality: int = 85,
) -> Path:
    """Write ``out_dir/index.html`` (and its pictures beside it) for ``items``; returns the page's path.

    ``items`` may be a generator: each picture is written as its item arrives and then dropped.
    ``order``: ``"input"`` or ``"cider"`` (worst first; items without a score first). ``metrics``
    becomes the table at the top, ``meta`` a "key: value" list under the title (checkpoint, decoding, ...).
    """
    page = ResultsPage(out_dir, title, order=order, meta=meta, image_side=image_side, quality=quality)
    for item in items:
        page.add(item)
    return page.write(metrics)


def _display_copy(record: ImageRecord, side: int) -> Image.Image:
    from captioner.data.images import load_image

    img = load_image(record.path)
    img.thumbnail((side, side), Image.BICUBIC)
    return img


def write_split_page(
    out_dir: str | Path,
    records: Sequence[ImageRecord],
    captions: Sequence[Caption] | Sequence[Sequence[Caption]],
    cider: Mapping[str, float] | Sequence[float],
    metrics: Mapping[str, Any],
    load_image: Callable[[ImageRecord], Image.Image] | None = None,
    *,
    title: str = "captioner evaluation",
    meta: Mapping[str, Any] | None = None,
    image_side: int = 384,
) -> Path:
    """The evaluation page of a split: per image its caption(s), references and CIDEr-D, worst first, metrics on top.

    ``captions[i]`` (one Caption, or a best-first list) belongs to ``records[i]``; ``cider`` is keyed by
    ``image_id`` (e.g. ``captioner.metrics.evaluate(..., per_image=True)["per_image"]`` reduced to
    CIDEr-D) or aligned with ``records``. ``load_image(record)`` gives the picture (default: the
    record's file, upright RGB); a picture that fails to load becomes that row's error, and its
    captions still show. Images are loaded one at a time while the page is written.
    """
    if len(captions) != len(records):
        raise ValueError(f"{len(records)} records but {len(captions)} captions")
    if isinstance(cider, Mapping):
        scores = [cider.get(r.image_id) for r in records]
        scores = [float(s["CIDEr-D"]) if isinstance(s, Mapping) else (float(s) if s is not None else None) for s in scores]
    else:
        if len(cider) != len(records):
            raise ValueError(f"{len(records)} records but {len(cider)} CIDEr-D scores")
        scores = [float(s) for s in cider]
    load = load_image or (lambda r: _display_copy(r, image_side))

    def items() -> Iterable[PageItem]:
        for r, caps, s in zip(records, captions, scores):
            caps = list(caps) if isinstance(caps, (list, tuple)) else [caps]
            image, error = None, None
            try:
                image = load(r)
            except Exception as e:  # noqa: BLE001 - one row's picture must not lose the page
                error = " ".join(f"picture could not be loaded ({getattr(e, 'reason', None) or e})".split())
            yield PageItem(name=str(r.image_id), image=image, captions=caps, references=list(r.captions), cider=s,
                           error=error, details={"file": str(r.path)})

    return write_results_page(out_dir, items(), title, metrics, order="cider", meta=meta, image_side=image_side)


# --------------------------------------------------------------------------------------------------
# Inline page template, style and script
PAGE_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>{css}</style>
</head>
<body>
<header>
<h1>{title}</h1>
<p class="summary">{summary}</p>
{meta}
{metrics}
<p class="help">Hover, tap or Tab to a word to see where the model looked for it (darkened: not attended;
outlined: hard attention's chosen cell). Click, tap or Enter pins a word; Escape unpins; arrow keys move between words.</p>
<p class="controls"><label><input type="checkbox" id="stretch" checked> stretch each map to its own range
(shows the relative focus of a diffuse map; unticked: each map is only divided by its peak)</label></p>
</header>
<main>
{items}
</main>
<script>{js}</script>
</body>
</html>
"""

CSS = """
:root { --fg: #1d2228; --muted: #5b6570; --line: #d9dee3; --accent: #0b63c5; --bad: #b00020; --bg: #f6f7f9; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg); background: var(--bg); }
header { padding: 16px 24px 8px; background: #fff; border-bottom: 1px solid var(--line); }
h1 { margin: 0 0 4px; font-size: 22px; }
.summary, .help, .controls { color: var(--muted); margin: 4px 0; }
.help, .controls { font-size: 13px; }
dl.meta { display: flex; flex-wrap: wrap; gap: 4px 18px; margin: 6px 0; font-size: 13px; }
dl.meta div { display: flex; gap: 6px; } dl.meta dt { color: var(--muted); } dl.meta dd { margin: 0; font-family: ui-monospace, monospace; }
table.metrics { border-collapse: collapse; margin: 8px 0; font-size: 14px; background: #fff; }
table.metrics caption { text-align: left; font-weight: 600; padding-bottom: 2px; }
table.metrics th, table.metrics td { border: 1px solid var(--line); padding: 2px 10px; text-align: right; }
table.metrics th[scope=row] { text-align: left; font-weight: 500; color: var(--muted); }
main { padding: 12px 24px 40px; display: grid; gap: 12px; }
.item { display: grid; grid-template-columns: minmax(0, 340px) minmax(0, 1fr); gap: 16px; background: #fff;
        border: 1px solid var(--line); border-radius: 8px; padding: 12px; }
.item.broken { grid-template-columns: 1fr; border-color: var(--bad); background: #fff5f6; }
.item.broken .picture { display: none; }
@media (max-width: 640px) { .item { grid-template-columns: 1fr; } main, header { padding-left: 10px; padding-right: 10px; } }
.viz { position: relative; width: 100%; max-width: 340px; background: #000; border-radius: 4px; overflow: hidden; }
.viz img.photo, .viz canvas.attn { display: block; width: 100%; height: 100%; }
.viz canvas.attn { position: absolute; inset: 0; pointer-events: none; }
.viz.missing { display: flex; align-items: center; justify-content: center; aspect-ratio: 4 / 3; color: #ccc; font-size: 13px; }
.viz-label { margin: 4px 0 0; height: 2.9em; overflow: hidden; font-size: 13px; color: var(--muted); }  /* fixed: no layout shift on hover */
.about { min-width: 0; }
h2.name { margin: 0 0 4px; font-size: 15px; font-weight: 600; overflow-wrap: anywhere; }
.cider { margin: 0 0 4px; } .detail { margin: 0 0 4px; font-size: 12px; color: var(--muted); overflow-wrap: anywhere; }
.error { color: var(--bad); margin: 4px 0; font-family: ui-monospace, monospace; font-size: 13px; overflow-wrap: anywhere; }
ol.captions { list-style: none; margin: 6px 0; padding: 0; }
li.caption { margin: 0 0 6px; font-size: 17px; }
li.caption .label { display: inline-block; min-width: 1.6em; color: var(--muted); font-size: 12px; }
li.caption .label:empty { display: none; }
li.caption .score { color: var(--muted); font-size: 12px; margin-left: 6px; white-space: nowrap; }
.unfinished { color: var(--bad); font-size: 12px; }
.empty { color: var(--muted); font-style: italic; }
button.word { font: inherit; color: inherit; background: none; border: 0; border-bottom: 2px dotted #9aa5b1; padding: 0 1px;
              margin: 0; cursor: pointer; border-radius: 3px; }
button.word:hover, button.word.active { background: #e3efff; border-bottom-color: var(--accent); }
button.word:focus-visible { outline: 2px solid var(--accent); outline-offset: 1px; }
button.word[aria-pressed="true"] { background: #cfe3ff; border-bottom: 2px solid var(--accent); }
details.refs { margin-top: 6px; font-size: 14px; } details.refs ul { margin: 4px 0; padding-left: 20px; color: #333; }
.none { color: var(--muted); }
"""

# Draws word t of a caption: the (h x w) grid as a darkening mask, upsampled by the canvas (bilinear),
# so the photo keeps 25% + 75% x attention of its brightness (the figures' "spotlight").
JS = r"""
(function () {
  "use strict";
  var FLOOR = 0.25;
  var cache = new WeakMap(), stretch = document.getElementById("stretch");
  function parse(cap) {
    var d = cache.get(cap);
    if (d) return d;
    var grid = (cap.dataset.grid || "").split("x").map(Number);
    var raw = atob(cap.dataset.attn || "");
    var bytes = new Uint8Array(raw.length);
    for (var i = 0; i < raw.length; i++) bytes[i] = raw.charCodeAt(i);
    d = { h: grid[0], w: grid[1], bytes: bytes,
          peaks: (cap.dataset.peaks || "").split(",").map(Number),
          locs: cap.dataset.locs ? cap.dataset.locs.split(",").map(Number) : null };
    cache.set(cap, d);
    return d;
  }
  function parts(word) {
    var cap = word.closest(".caption"), item = word.closest(".item");
    return { cap: cap, item: item, canvas: item && item.querySelector("canvas.attn"), label: item && item.querySelector(".viz-label") };
  }
  function clear(item) {
    var canvas = item.querySelector("canvas.attn");
    if (canvas) canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
    item.querySelectorAll("button.word.active").forEach(function (b) { b.classList.remove("active"); });
    var label = item.querySelector(".viz-label");
    if (label) label.textContent = "hover, tap or focus a word to see where the model looked";
    if (canvas) { canvas.dataset.shown = ""; canvas.shownWord = null; }
  }
  function show(word) {
    var p = parts(word);
    if (!p.cap || !p.item) return;
    p.item.querySelectorAll("button.word.active").forEach(function (b) { b.classList.remove("active"); });
    word.classList.add("active");
    var t = Number(word.dataset.t), d = parse(p.cap), L = d.h * d.w;
    if (p.label) {
      var peak = d.peaks[t];
      p.label.textContent = "\u201c" + word.textContent + "\u201d (word " + (t + 1) + ")" +
        (isFinite(peak) && L > 0 ? ", peak attention " + peak.toFixed(3) + " (uniform: " + (1 / L).toFixed(3) + ")" : "") +
        (d.locs ? ", chosen cell " + d.locs[t] : "");
    }
    if (!p.canvas || !(d.h > 0 && d.w > 0)) return;
    var lo = 0;
    if (stretch && stretch.checked) {  // min-max: the row's peak is already 255
      lo = 255;
      for (var j = 0; j < L; j++) lo = Math.min(lo, d.bytes[t * L + j]);
      lo = lo / 255;
    }
    var span = 1 - lo, small = document.createElement("canvas");
    small.width = d.w; small.height = d.h;
    var sctx = small.getContext("2d"), img = sctx.createImageData(d.w, d.h);
    for (var i = 0; i < L; i++) {
      var a = span > 1e-6 ? (d.bytes[t * L + i] / 255 - lo) / span : 1;  // a uniform map: everything equally attended
      img.data[4 * i + 3] = Math.round(255 * (1 - FLOOR) * (1 - a));
    }
    sctx.putImageData(img, 0, 0);
    var c = p.canvas, ctx = c.getContext("2d");
    ctx.clearRect(0, 0, c.width, c.height);
    ctx.imageSmoothingEnabled = true;
    ctx.imageSmoothingQuality = "high";
    ctx.drawImage(small, 0, 0, c.width, c.height);
    if (d.locs) {
      var loc = d.locs[t], cw = c.width / d.w, ch = c.height / d.h, x = (loc % d.w) * cw, y = Math.floor(loc / d.w) * ch;
      ctx.lineWidth = Math.max(2, c.width / 160);
      ctx.strokeStyle = "#ffea00";
      ctx.strokeRect(x + ctx.lineWidth / 2, y + ctx.lineWidth / 2, cw - ctx.lineWidth, ch - ctx.lineWidth);
    }
    c.dataset.shown = p.cap.dataset.caption + ":" + t;
    c.shownWord = word;
  }
  function focusVisible(el) { try { return el.matches(":focus-visible"); } catch (err) { return true; } }
  function pinned(item) { return item.querySelector('button.word[aria-pressed="true"]'); }
  function rest(item) {
    var f = document.activeElement, w = pinned(item);
    if (f && f.matches && f.matches("button.word") && item.contains(f) && focusVisible(f)) w = f;  // keyboard focus wins over a pin
    if (w) show(w); else clear(item);
  }
  function wordOf(e) { return e.target && e.target.closest ? e.target.closest("button.word") : null; }
  if (stretch) stretch.addEventListener("change", function () {
    document.querySelectorAll("canvas.attn").forEach(function (c) { if (c.shownWord) show(c.shownWord); });
  });
  document.addEventListener("mouseover", function (e) { var w = wordOf(e); if (w) show(w); });
  document.addEventListener("mouseout", function (e) { var w = wordOf(e); if (w) rest(w.closest(".item")); });
  document.addEventListener("focusin", function (e) { var w = wordOf(e); if (w) show(w); });
  document.addEventListener("focusout", function (e) {
    var w = wordOf(e);
    if (w) setTimeout(function () { rest(w.closest(".item")); }, 0);  // once focus has moved (activeElement updated)
  });
  document.addEventListener("click", function (e) {
    var w = wordOf(e);
    if (!w) return;
    var item = w.closest(".item"), was = w.getAttribute("aria-pressed") === "true";
    item.querySelectorAll('button.word[aria-pressed="true"]').forEach(function (b) { b.setAttribute("aria-pressed", "false"); });
    w.setAttribute("aria-pressed", was ? "false" : "true");
    if (was) rest(item); else show(w);
  });
  document.addEventListener("keydown", function (e) {
    var w = wordOf(e);
    if (!w) return;
    var item = w.closest(".item");
    if (e.key === "Escape") {
      item.querySelectorAll('button.word[aria-pressed="true"]').forEach(function (b) { b.setAttribute("aria-pressed", "false"); });
      clear(item);
    } else if (e.key === "ArrowRight" || e.key === "ArrowLeft") {
      var words = Array.prototype.slice.call(item.querySelectorAll("button.word")), k = words.indexOf(w);
      var next = words[k + (e.key === "ArrowRight" ? 1 : -1)];
      if (next) { next.focus(); e.preventDefault(); }
    }
  });
})();
"""
