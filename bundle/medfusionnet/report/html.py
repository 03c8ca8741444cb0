"""``decisions.html``: a report a clinician can open offline, beside ``decisions.json``.

The index page lists every image of the run (status, tier, combined tier, findings, tabular level) and links to one
page per image that has its X-ray: the X-ray, the overlay of each positive finding's region (its Grad-CAM map where
it reaches the threshold, as `serving.finding_regions` bounds it, with the map's strength as opacity), the 14
probabilities against their thresholds as a bar chart, the tier and its rule, the tabular inputs used and, with a
risk model, its level, probability and fired rules per outcome. Pictures are JPEG files in ``report/`` next to the
pages, referenced by relative paths; no script, font or style is fetched from anywhere. Each page counts its
pictures once loaded and writes the counts into the ``<body>`` attributes ``data-images-loaded`` /
``data-images-broken`` (and a visible warning when one is missing), so that a browser, or a test driving one, can
tell a page whose pictures did not resolve."""

from __future__ import annotations

import html
import os
import re

import numpy as np

from ..constants import LABELS

PAGE_WIDTH = 980
OVERLAY_SIZE = 440  # longest side of the pictures, in pixels
COLOURS = [  # one per finding, in LABELS order (distinct on the grey X-ray)
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
    (0, 128, 128),
    (220, 190, 255),
    (170, 110, 40),
    (255, 250, 200),
]
TIER_COLOURS = {"low": "#2e7d32", "medium": "#ef6c00", "high": "#c62828"}

_STYLE = """
body { font-family: DejaVu Sans, Arial, sans-serif; margin: 16px; color: #222; max-width: %dpx; }
h1 { font-size: 20px; } h2 { font-size: 16px; margin-top: 18px; }
table { border-collapse: collapse; font-size: 13px; } td, th { border: 1px solid #bbb; padding: 3px 7px; }
th { background: #eee; text-align: left; }
.tier { color: #fff; padding: 2px 8px; border-radius: 3px; font-weight: bold; }
.pictures { display: flex; flex-wrap: wrap; gap: 10px; } figure { margin: 0; }
figcaption { font-size: 12px; text-align: center; } .note { font-size: 12px; color: #555; }
.broken { background: #c62828; color: #fff; padding: 6px; display: none; }
""" % (PAGE_WIDTH)

# counts the pictures once the page has loaded; a test or a reader can then tell a broken page from a good one
_IMAGE_CHECK = """
<script>
window.addEventListener("load", function () {
  var images = document.images, loaded = 0, broken = 0;
  for (var i = 0; i < images.length; i++) {
    if (images[i].complete && images[i].naturalWidth > 0) { loaded++; } else { broken++; }
  }
  document.body.setAttribute("data-images-loaded", loaded);
  document.body.setAttribute("data-images-broken", broken);
  if (broken > 0) {
    var note = document.getElementById("broken");
    note.textContent = broken + " picture(s) of this page could not be loaded";
    note.style.display = "block";
  }
});
</script>
"""


def _page(title: str, body: str) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style>{_IMAGE_CHECK}</head>\n"
        f'<body><div id="broken" class="broken"></div>\n{body}\n</body></html>\n'
    )


def _tier(tier: str | None) -> str:
    if not tier:
        return ""
    return f'<span class="tier" style="background:{TIER_COLOURS.get(tier, "#555")}">{html.escape(tier)}</span>'


def safe_name(name: str) -> str:
    """``name`` as a file name that needs no escaping in a URL (letters, digits, ``._-``)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def _small(array: np.ndarray) -> np.ndarray:
    """``array`` (H, W[, C]) reduced so that its longest side is at most `OVERLAY_SIZE`."""
    from PIL import Image

    height, width = array.shape[:2]
    scale = OVERLAY_SIZE / max(height, width)
    if scale >= 1:
        return array
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    if array.dtype == bool:
        return np.asarray(Image.fromarray(array.astype(np.uint8) * 255).resize(size, Image.NEAREST)) > 127
    image = Image.fromarray(np.asarray(array, dtype=np.float32), mode="F").resize(size, Image.BILINEAR)
    return np.asarray(image, dtype=np.float32)


def overlay(xray: np.ndarray, cam: np.ndarray, colour, cam_threshold: float = 0.5) -> np.ndarray:
    """uint8 RGB picture: the X-ray in grey, the region where ``cam`` reaches ``cam_threshold`` tinted with
    ``colour`` (opacity growing with the map's strength) and outlined."""
    grey = np.clip(_small(xray), 0, 1)
    cam = np.clip(_small(cam), 0, 1)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    inside = cam >= cam_threshold
    alpha = np.where(inside, 0.25 + 0.45 * cam, 0.0)[..., None]
    rgb = rgb * (1 - alpha) + np.asarray(colour, dtype=np.float32)[None, None] / 255.0 * alpha
    edge = inside & ~(np.roll(inside, 1, 0) & np.roll(inside, -1, 0) & np.roll(inside, 1, 1) & np.roll(inside, -1, 1))
    rgb[edge] = np.asarray(colour, dtype=np.float32) / 255.0
    return (np.clip(rgb, 0, 1) * 255).astype(np.uint8)


def _save_jpeg(path: str, array: np.ndarray) -> None:
    """JPEG (quality 90): about a fifth of a PNG's encoding time at this size, and plenty for a reading copy."""
    from PIL import Image

    if array.ndim == 2:
        array = (np.clip(_small(array), 0, 1) * 255).astype(np.uint8)
    Image.fromarray(array).save(path, quality=90)


def probability_chart(probabilities: dict, thresholds: dict, decisions: dict) -> str:
    """Inline SVG: one bar per finding (its probability; red when at or above its threshold), a black tick at the
    threshold, the value written beside the bar."""
    row, left, width = 20, 150, 330
    height = row * len(probabilities) + 24
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 70}" height="{height}" role="img">']
    for tick in (0, 0.25, 0.5, 0.75, 1.0):
        x = left + tick * width
        parts.append(f'<line x1="{x:.1f}" y1="0" x2="{x:.1f}" y2="{height - 18}" stroke="#ddd"/>')
        parts.append(f'<text x="{x:.1f}" y="{height - 4}" font-size="10" text-anchor="middle">{tick:g}</text>')
    for i, (label, p) in enumerate(probabilities.items()):
        y = i * row + 3
        colour = "#c62828" if decisions.get(label) else "#78909c"
        parts.append(f'<text x="{left - 6}" y="{y + 12}" font-size="12" text-anchor="end">{html.escape(label)}</text>')
        parts.append(f'<rect x="{left}" y="{y}" width="{p * width:.1f}" height="{row - 6}" fill="{colour}"/>')
        t = left + float(thresholds[label]) * width
        parts.append(
            f'<line x1="{t:.1f}" y1="{y - 2}" x2="{t:.1f}" y2="{y + row - 4}" stroke="#000" stroke-width="2"/>'
        )
        parts.append(f'<text x="{left + width + 6}" y="{y + 12}" font-size="11">{p:.3f}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _fields_table(fields: dict) -> str:
    if not fields:
        return '<p class="note">No tabular input: every field was encoded as missing.</p>'
    rows = []
    for key, value in fields.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}: {v}" for k, v in value.items())
        rows.append(f"<tr><th>{html.escape(str(key))}</th><td>{html.escape(str(value))}</td></tr>")
    return "<table>" + "".join(rows) + "</table>"


def _risk_section(risk: dict | None, combined_tier: str | None, combined_rule: str | None) -> str:
    if risk is None:
        return ""
    parts = ["<h2>Tabular risk model</h2>"]
    if risk.get("status") != "ok":
        parts.append(f'<p class="note">No tabular risk: {html.escape(str(risk.get("status")))}</p>')
    else:
        parts.append(f"<p>Level {_tier(risk.get('level'))}</p><table>")
        parts.append("<tr><th>outcome</th><th>probability</th><th>level</th><th>stage-1 rules that fired</th></tr>")
        for outcome, item in risk.get("outcomes", {}).items():
            rules = "; ".join(item.get("rules", [])) or "none"
            parts.append(
                f"<tr><td>{html.escape(outcome)}</td><td>{item['probability']:.3f}</td>"
                f"<td>{html.escape(item['level'])}</td><td>{html.escape(rules)}</td></tr>"
            )
        parts.append("</table>")
        if risk.get("unknown"):
            parts.append(f'<p class="note">Unknown or invalid fields: {html.escape(", ".join(risk["unknown"]))}</p>')
    if combined_tier:
        parts.append(f"<p>Combined tier {_tier(combined_tier)}</p>")
        if combined_rule:
            parts.append(f'<p class="note">{html.escape(combined_rule)}</p>')
    return "".join(parts)


def write_study_page(
    folder: str,
    result: dict,
    xray: np.ndarray,
    maps: dict[str, np.ndarray],
    fields: dict,
    cam_threshold: float = 0.5,
    model: str = "MedFusionNet",
) -> str:
    """One image's page ``<folder>/<name>.html`` with its pictures beside it; returns the page's path.

    ``result`` is the image's entry of ``decisions.json`` plus the document's ``rule``, ``thresholds`` (and
    ``combined_rule``), as `serving.XrayPredictor.predict` gives it; ``maps`` the Grad-CAM map of each positive
    finding on the X-ray's grid (`serving.XrayPredictor.finding_maps`).
    """
    os.makedirs(folder, exist_ok=True)
    stem = safe_name(result["image"])
    _save_jpeg(os.path.join(folder, f"{stem}_xray.jpg"), xray)
    figures = [f'<figure><img src="{stem}_xray.jpg" alt="X-ray"><figcaption>X-ray</figcaption></figure>']
    for finding, cam in maps.items():
        file = f"{stem}_{safe_name(finding)}.jpg"
        _save_jpeg(os.path.join(folder, file), overlay(xray, cam, COLOURS[LABELS.index(finding)], cam_threshold))
        p = result["probabilities"][finding]
        figures.append(
            f'<figure><img src="{file}" alt="{html.escape(finding)} region">'
            f"<figcaption>{html.escape(finding)} ({p:.3f})</figcaption></figure>"
        )
    findings = ", ".join(result["findings"]) or "none"
    body = [
        f"<h1>{html.escape(result['image'])}</h1>",
        f"<p>Tier {_tier(result['tier'])} &nbsp; Positive findings: {html.escape(findings)}</p>",
        f'<p class="note">{html.escape(result.get("rule", ""))}</p>',
        f'<div class="pictures">{"".join(figures)}</div>',
        f'<p class="note">Regions: Grad-CAM of the CNN branch where it reaches {cam_threshold:g} of its maximum; an '
        "explanation of the model's evidence, not a delineation of the finding.</p>",
        "<h2>Probabilities and thresholds</h2>",
        probability_chart(result["probabilities"], result["thresholds"], result["decisions"]),
        '<p class="note">Bar: probability'
        + (" (temperature-scaled)" if result.get("calibrated") else "")
        + "; black tick: the finding's decision threshold; red: at or above it.</p>",
        "<h2>Tabular inputs used</h2>",
        _fields_table(fields),
        _risk_section(result.get("tabular_risk"), result.get("combined_tier"), result.get("combined_rule")),
        f'<p class="note">{html.escape(model)}. Decision support for a reader, not a diagnosis.</p>',
        '<p><a href="../decisions.html">All images of this run</a></p>',
    ]
    path = os.path.join(folder, f"{stem}.html")
    with open(path, "w", encoding="utf-8") as f:
        f.write(_page(result["image"], "\n".join(body)))
    return path


def write_index(output_dir: str, document: dict, pages: dict[str, str], model: str = "MedFusionNet") -> str:
    """``<output_dir>/decisions.html``: every image of ``document`` (``decisions.json``), linked to its page in
    ``pages`` (``{image: path}``) where it has one; returns the path."""
    with_risk = "combined_rule" in document
    head = ["image", "status", "tier", *(["tabular level", "combined tier"] if with_risk else []), "findings"]
    rows = ["<tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"]
    for item in document["images"]:
        name = html.escape(item["image"])
        if item["image"] in pages:
            link = os.path.relpath(pages[item["image"]], output_dir).replace(os.sep, "/")
            name = f'<a href="{html.escape(link)}">{name}</a>'
        if item["status"] != "ok":
            cells = [
                name,
                html.escape(item["status"]),
                "",
                *([""] * 2 if with_risk else []),
                html.escape(item["error"]),
            ]
        else:
            risk = []
            if with_risk:
                tabular = item["tabular_risk"]
                risk = [html.escape(str(tabular.get("level", tabular.get("status", "")))), _tier(item["combined_tier"])]
            cells = [name, "ok", _tier(item["tier"]), *risk, html.escape(", ".join(item["findings"]))]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    missing = sum(1 for i in document["images"] if i["status"] == "ok" and i["image"] not in pages)
    body = [
        f"<h1>{html.escape(model)}: decisions for {len(document['images'])} image(s)</h1>",
        f'<p class="note">{html.escape(document["rule"])}</p>',
        f'<p class="note">{html.escape(document.get("combined_rule", ""))}</p>' if with_risk else "",
        "<table>" + "".join(rows) + "</table>",
        (
            f'<p class="note">{missing} image(s) without a page (the report_pages of inference.yaml limits the pages).</p>'
            if missing
            else ""
        ),
    ]
    path = os.path.join(output_dir, "decisions.html")
    with open(path, "w", encoding="utf-8") as f:
        f.write(_page("decisions", "\n".join(body)))
    return path
