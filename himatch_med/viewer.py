"""Study pages: a study's volume with its heatmap in NiiVue, in the browser, offline, from the study's own folder.

NiiVue (``@niivue/niivue``, BSD-2-Clause) is not part of this package. The optional extra ``himatch-med[viewer]``
installs ``ipyniivue`` from PyPI, whose wheel carries NiiVue's JavaScript bundle (an ES module). A page is three files
beside the study's outputs::

    view_data.js    the input volume, the heatmap and, when present, the findings label map, as base64 gzipped
                    NIfTI (browsers refuse ``fetch()`` under file://), with the positions the page jumps to
    niivue.js       NiiVue from the installed ipyniivue, rewritten as a classic script (browsers refuse ES modules
                    from file://) that sets ``globalThis.himatchNiivue``; its licence heads the file
    view.html       the page (written last: its presence means the page is complete); every id and path escaped

The page loads nothing else, so it opens from the file system, from a shared folder, or from a copy of the study
folder alone. It reports what it loaded in ``window.himatchStatus``: ``state`` (``loading``, ``ready`` or
``error``), ``error``, and one entry per layer with its role, name and dimensions.

Besides the volumes (through :mod:`himatch_med.io`), the only file this module reads is NiiVue's bundle inside the
installed ipyniivue package.
"""

from __future__ import annotations

import base64
import functools
import html
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import numpy as np

from himatch_med import io
from himatch_med.config import CT_WINDOWS
from himatch_med.figures import FINDING_COLOURS, OVERLAY_FLOOR

PAGE = "view.html"
SCRIPT = "niivue.js"
DATA = "view_data.js"
FILES = (DATA, SCRIPT, PAGE)
"""What a page is made of, in the order written: the page last."""
INSTALL = "pip install 'himatch-med[viewer]'"
PACKAGE = "ipyniivue"
BUNDLE = "ipyniivue/static/widget.js"
TESTED = "ipyniivue>=2.4,<2.5"
ANOMALY_COLORMAP = "redyell"
"""Red to yellow: the convention of FSL and FSLeyes for thresholded statistical maps."""
ANOMALY_OPACITY = 0.8
FINDINGS_OPACITY = 0.5

# The bundle constructs NiiVue in its anywidget initialiser; the class's minified name is read from there.
_CONSTRUCTED = re.compile(r'"Creating new Niivue instance"\);.{0,200}?=new ([A-Za-z_$][\w$]*)\(')
_EXPORT = re.compile(r"export\s*\{[^{}]*\}\s*;?\s*$")
# What a classic script cannot hold: import.meta, static imports (import x from, import {x}, import * as, import "x").
_MODULE_ONLY = re.compile(r"\bimport\.meta\b|(?:^|[;}\n])\s*import\s*(?:[{*\"']|[A-Za-z_$][\w$]*\s*(?:,|from\b))")


@dataclass(frozen=True)
class Layer:
    """One volume of the page: ``role`` (``image``, ``anomaly`` or ``findings``), the bytes of a gzipped NIfTI file.

    ``cal_min``/``cal_max`` set the displayed range (None: NiiVue's robust range); ``labels`` names the values 1..N of
    a label map.
    """

    role: str
    name: str
    data: bytes
    shape: tuple[int, ...]
    colormap: str
    opacity: float = 1.0
    cal_min: float | None = None
    cal_max: float | None = None
    labels: tuple[str, ...] = ()


@dataclass(frozen=True)
class Jump:
    """A top slice of the report: its name in the file's axis numbering, its score, and the hottest voxel in it.

    ``voxel`` is in the file's own voxel indices; ``world`` is the same point in scanner coordinates (RAS mm).
    """

    label: str
    score: float
    voxel: tuple[int, int, int]
    world: tuple[float, float, float]


@dataclass(frozen=True)
class StudyView:
    """What a study page (or the notebook view) shows: the layers, where to jump, and the overlay's range in z.

    ``affine`` maps the file's voxel indices to scanner coordinates (RAS mm), as the layers' headers do.
    """

    title: str
    input: str
    affine: np.ndarray
    layers: tuple[Layer, ...]
    jumps: tuple[Jump, ...]
    threshold: float
    ceiling: float
    volume_score: float | None = None
    volume_percentile: float | None = None
    links: dict[str, str] = field(default_factory=dict)
    volume_score_spread: float | None = None
    percentile_volumes: int | None = None
    percentile_stable: bool | None = None


def bundle_path() -> Path | None:
    """NiiVue's bundle inside the installed ipyniivue (None when it is not installed); imports nothing."""
    import importlib.metadata as metadata

    try:
        located = Path(metadata.distribution(PACKAGE).locate_file(BUNDLE))
    except metadata.PackageNotFoundError:
        return None
    return located if located.is_file() else None


def available() -> bool:
    """Whether study pages can be written (the ``viewer`` extra is installed)."""
    return bundle_path() is not None


@functools.lru_cache(maxsize=1)
def niivue_script() -> str | None:
    """``niivue.js``: the installed NiiVue as a classic script with its licence; None without the ``viewer`` extra."""
    import importlib.metadata as metadata

    path = bundle_path()
    if path is None:
        return None
    distribution = metadata.distribution(PACKAGE)
    licence = distribution.read_text("licenses/LICENSE") or distribution.read_text("LICENSE") or ""
    return classic_script(io.read_text(path), source=f"{PACKAGE} {distribution.version}",
                          licence=licence)


def classic_script(module: str, *, source: str, licence: str = "") -> str:
    """NiiVue's ES-module bundle rewritten as a classic script that sets ``globalThis.himatchNiivue = {Niivue}``.

    Browsers load classic scripts from file:// but refuse ES modules there. The bundle's code runs unchanged, in
    strict mode as a module would, inside a function so that its names stay private.

    Args:
        module: the text of ipyniivue's ``static/widget.js``.
        source: where it comes from (package and version), for the header and for errors.
        licence: the licence text to carry in the header.

    Raises:
        RuntimeError: the bundle is not laid out as the tested versions are (a module import, ``import.meta``, no
            single final export, or no NiiVue constructor to find).
    """
    constructed = _CONSTRUCTED.search(module)
    export = _EXPORT.search(module)
    body = module[: export.start()] if export else module
    if constructed is None or export is None or _MODULE_ONLY.search(body):
        raise RuntimeError(f"{source}: its NiiVue bundle is not laid out as expected, so no viewer page can be made "
                           f"from it; install a tested version: pip install '{TESTED}'")
    notice = "\n".join(f" * {line}".rstrip() for line in licence.replace("*/", "* /").strip().splitlines())
    header = (f"/* NiiVue (https://github.com/niivue/niivue), from the {source} package's static/widget.js,\n"
              " * rewritten by himatch-med as a classic script that sets globalThis.himatchNiivue.\n *\n"
              f"{notice}\n */\n")
    return (f'{header}(function () {{\n"use strict";\n{body}\n'
            f"globalThis.himatchNiivue = {{ Niivue: {constructed.group(1)}, source: {json.dumps(source)} }};\n"
            "})();\n")


def read_report(folder: Path) -> dict:
    """The report of the study whose outputs are in ``folder`` (its one ``*_report.json``)."""
    reports = sorted(Path(folder).glob("*_report.json"))
    if len(reports) != 1:
        raise ValueError(f"{folder}: holds {len(reports)} reports (*_report.json); pass the folder of one study's "
                         "outputs")
    return io.read_json(reports[0])


def study_view(folder: Path, report: dict, *, title: str, image: io.Image | None = None) -> StudyView:
    """Gather what a study's page shows from its output folder and report.

    Args:
        folder: the study's output folder (the heatmap, the report and, when present, the findings label map).
        report: the study's report, as written there.
        title: the study's name on the page (its id in a screening).
        image: the input as already read; read again from the report's ``input`` when None.
    """
    folder = Path(folder)
    outputs = report["outputs"]
    heat = io.read_image(folder / outputs["anomaly"])
    if image is None:
        image = io.read_image(report["input"])
    if image.array.shape != heat.array.shape:
        raise ValueError(f"{report['input']}: shape {image.array.shape} differs from its heatmap's "
                         f"{heat.array.shape}; the input changed after the run: run it again")
    window = _window(report.get("settings", {}))
    pixels = io.nifti_bytes(image, dtype=_compact(image.array))
    layers = [Layer("image", "image.nii.gz", pixels, image.array.shape, "gray",
                    cal_min=window[0] if window else None, cal_max=window[1] if window else None)]
    ceiling = max(math.ceil(2 * float(np.nanmax(heat.array))) / 2, OVERLAY_FLOOR + 2.0)
    layers.append(Layer("anomaly", "anomaly.nii.gz", io.nifti_bytes(heat), heat.array.shape, ANOMALY_COLORMAP,
                        opacity=ANOMALY_OPACITY, cal_min=OVERLAY_FLOOR, cal_max=ceiling))
    findings = folder / outputs.get("findings", f"{io.stem(report['input'])}_findings.nii.gz")
    if findings.is_file():
        layers.append(_findings_layer(io.read_image(findings), heat.array.shape))
    jumps = tuple(_jump(t, heat) for t in report.get("top_slices", []))
    links = {key: outputs[key] for key in ("report", "anomaly", "overview") if key in outputs}
    if findings.is_file():
        links["findings"] = findings.name
    basis = report.get("percentile_basis") if isinstance(report.get("percentile_basis"), dict) else {}
    spread, volumes, stable = report.get("volume_score_spread"), basis.get("normal_volumes"), basis.get("stable")
    return StudyView(title, str(report["input"]), heat.affine, tuple(layers), jumps, OVERLAY_FLOOR, ceiling,
                     report.get("volume_score"), report.get("volume_percentile"), links,
                     float(spread) if isinstance(spread, int | float) and not isinstance(spread, bool) else None,
                     volumes if isinstance(volumes, int) and not isinstance(volumes, bool) else None,
                     stable if isinstance(stable, bool) else None)


def _compact(array: np.ndarray):
    """int16 for whole numbers that fit (most MRI and CT: half the bytes of float32), else float32."""
    if array.size and np.isfinite(array).all() and -32768 <= array.min() and array.max() <= 32767 \
            and np.array_equal(array, np.rint(array)):
        return np.int16
    return np.float32


def _window(settings: dict) -> tuple[float, float] | None:
    if settings.get("modality") != "ct" or settings.get("window") not in CT_WINDOWS:
        return None
    level, width = CT_WINDOWS[settings["window"]]
    return level - width / 2, level + width / 2


def _findings_layer(findings: io.Image, shape: tuple[int, ...]) -> Layer:
    if findings.array.shape != shape:
        raise ValueError(f"{findings.path}: shape {findings.array.shape} differs from the heatmap's {shape}")
    count = int(np.nanmax(findings.array)) if findings.array.size else 0
    return Layer("findings", "findings.nii.gz", io.nifti_bytes(findings, dtype=np.int16), shape, "",
                 opacity=FINDINGS_OPACITY, labels=tuple(f"finding {n}" for n in range(1, count + 1)))


def _jump(top: dict, heat: io.Image) -> Jump:
    """Where the page goes for a top slice: the hottest voxel of that file slice."""
    axis = "ijk".index(top["file_axis"])
    index = int(top["file_index"])
    plane = np.take(heat.array, index, axis=axis)
    row, column = np.unravel_index(int(np.nanargmax(plane)), plane.shape)
    voxel = [int(row), int(column)]
    voxel.insert(axis, index)
    world = heat.affine @ np.array([*voxel, 1.0])
    return Jump(f"{top['file_axis']}={index}", float(top["score"]), (voxel[0], voxel[1], voxel[2]),
                (round(float(world[0]), 3), round(float(world[1]), 3), round(float(world[2]), 3)))


def write_page(folder: Path, report: dict | None = None, *, title: str | None = None,
               image: io.Image | None = None) -> Path | None:
    """Write a study's page (``view.html`` with ``niivue.js`` and ``view_data.js``) into its output folder.

    Args:
        folder: the study's output folder.
        report: the study's report (read from the folder when None).
        title: the study's name on the page (default: the input's name).
        image: the input as already read (read again from the report's ``input`` when None).

    Returns:
        The page, or None when NiiVue is not installed (``pip install 'himatch-med[viewer]'``); an earlier page of
        the folder is then removed, since it would show other results.
    """
    folder = Path(folder)
    script = niivue_script()
    if script is None:
        for name in FILES:
            (folder / name).unlink(missing_ok=True)
        return None
    report = read_report(folder) if report is None else report
    view = study_view(folder, report, title=title or io.stem(report["input"]), image=image)
    (folder / PAGE).unlink(missing_ok=True)  # no complete-looking page while its data is being replaced
    io.write_text(data_script(view), folder / DATA)
    io.write_text(script, folder / SCRIPT)
    return io.write_text(page_html(view), folder / PAGE)


def add_page(folder: Path, report: dict, *, title: str, image: io.Image | None = None, replace: bool = True) -> str:
    """Write a study's page as :func:`write_page` does, for a screening: a failure becomes a note, never an error.

    Args:
        folder: the study's output folder.
        report: the study's report.
        title: the study's id.
        image: the input as already read (read again when None).
        replace: rewrite an existing page (False: keep it, for studies complete from an earlier run).

    Returns:
        '' when the page was written, kept, or could not be (NiiVue is not installed: the screening report says so
        once); otherwise a one-line note saying why there is no page.
    """
    if not replace and (Path(folder) / PAGE).is_file():
        return ""
    try:
        write_page(folder, report, title=title, image=image)
    except Exception as error:  # the page is a convenience: a failure must not cost the study its results
        return f"no 3D viewer page: {type(error).__name__}: {error}"
    return ""


def data_script(view: StudyView) -> str:
    """``view_data.js``: the layers as base64 and the page's numbers, as ``window.himatchData``."""
    data = {
        "layers": [{"role": layer.role, "name": layer.name, "shape": list(layer.shape), "colormap": layer.colormap,
                    "opacity": layer.opacity, "cal_min": layer.cal_min, "cal_max": layer.cal_max,
                    "labels": list(layer.labels), "base64": base64.b64encode(layer.data).decode("ascii")}
                   for layer in view.layers],
        "jumps": [{"label": jump.label, "score": jump.score, "voxel": list(jump.voxel), "world": list(jump.world)}
                  for jump in view.jumps],
        "toVoxel": np.round(np.linalg.inv(view.affine)[:3], 9).tolist(),
        "threshold": view.threshold, "ceiling": view.ceiling,
        "findingColours": [list(colour) for colour in FINDING_COLOURS],
    }
    # ASCII JSON with "<" escaped: the text cannot end a script element even if it is ever inlined into a page.
    return "window.himatchData = " + json.dumps(data, ensure_ascii=True).replace("<", "\\u003c") + ";\n"


def page_html(view: StudyView) -> str:
    """``view.html``: the study's facts, the controls and the canvas; every id and path escaped."""
    e = html.escape
    spread = "" if view.volume_score_spread is None else f" &plusmn; {view.volume_score_spread:.2f}"
    score = "" if view.volume_score is None else f" · volume score <b>{view.volume_score:.2f}{spread} z</b>"
    if view.volume_percentile is not None:
        basis = "" if view.percentile_volumes is None else (
            f" of {view.percentile_volumes} normal volumes" + ("" if view.percentile_stable else ", too few"))
        score += f" (percentile {view.volume_percentile:.0f}{basis})"
    names = {"report": "report", "anomaly": "heatmap", "overview": "overview", "findings": "findings"}
    links = " ".join(f'<a href="{e(quote(name))}">{names[key]}</a>' for key, name in view.links.items())
    jumps = "".join(f'<button type="button" data-jump="{n}" title="go to the hottest point of this slice">'
                    f"{e(jump.label)} <small>{jump.score:.2f} z</small></button>" for n, jump in enumerate(view.jumps))
    findings = ('<label><input type="checkbox" id="findings" checked> findings</label>'
                if any(layer.role == "findings" for layer in view.layers) else "")
    step = 0.1
    page = _PAGE.format(
        title=e(view.title), input=e(view.input), score=score, links=links,
        jumps=jumps or '<span class="meta">none scored</span>', findings=findings,
        threshold=f"{view.threshold:.1f}", ceiling=f"{view.ceiling - step:.1f}", step=step,
        opacity=ANOMALY_OPACITY, data=e(DATA), script=e(SCRIPT), code=_PAGE_SCRIPT)
    # Pure ASCII (other characters as references), as report.html: the same page whatever encoding serves it.
    return page.encode("ascii", "xmlcharrefreplace").decode("ascii")


def show(source: str | Path, *, height: int = 600):
    """The study's view inline in a notebook: an ``ipyniivue.NiiVue`` widget with the same layers as its page.

    Args:
        source: a study's output folder, or its ``*_report.json``.
        height: the widget's height in pixels.
    """
    try:
        from ipyniivue import LUT, MultiplanarType, NiiVue, ShowRender, SliceType, Volume
    except ImportError as error:
        raise ImportError(f"the notebook view needs ipyniivue: {INSTALL}") from error
    source = Path(source)
    folder = source.parent if source.is_file() else source
    report = io.read_json(source) if source.is_file() else read_report(folder)
    view = study_view(folder, report, title=io.stem(report["input"]))
    widget = NiiVue(height=height, slice_type=SliceType.MULTIPLANAR, multiplanar_show_render=ShowRender.ALWAYS,
                    multiplanar_layout=MultiplanarType.GRID, is_colorbar=True, show_3d_crosshair=True)
    volumes = []
    for layer in view.layers:
        options = {"data": layer.data, "name": layer.name, "opacity": layer.opacity,
                   "colorbar_visible": layer.role == "anomaly"}
        options.update({k: v for k, v in (("colormap", layer.colormap), ("cal_min", layer.cal_min),
                                          ("cal_max", layer.cal_max)) if v})
        if layer.labels:
            options["colormap_label"] = LUT(lut=_label_table(len(layer.labels)), min=0, max=len(layer.labels),
                                            labels=["", *layer.labels])
        volumes.append(Volume(**options))
    widget.load_volumes(volumes)
    return widget


def _label_table(count: int) -> list[int]:
    """RGBA of labels 0..count, flat (0 transparent), as ipyniivue's label tables have them."""
    colours = [FINDING_COLOURS[n % len(FINDING_COLOURS)] for n in range(count)]
    return [0, 0, 0, 0] + [value for colour in colours for value in (*colour, 255)]


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title} &middot; himatch-med viewer</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
html, body {{ height: 100%; margin: 0; }}
body {{ font: 13px/1.4 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #e8e8ea; background: #111;
  display: flex; flex-direction: column; }}
header, footer {{ padding: 6px 12px; background: #1c1c1f; }}
h1 {{ font-size: 17px; margin: 0; display: inline; }} .meta {{ color: #9a9aa2; }} code {{ font-size: 12px; }}
.controls {{ display: flex; flex-wrap: wrap; gap: 6px 18px; align-items: center; margin-top: 6px; }}
.controls label {{ white-space: nowrap; }} input[type=range] {{ vertical-align: middle; width: 150px; }}
button {{ font: inherit; background: #2c2c31; color: #e8e8ea; border: 1px solid #4a4a52; border-radius: 4px;
  padding: 2px 8px; margin-right: 4px; cursor: pointer; }}
button:hover, button.active {{ background: #b3261e; border-color: #b3261e; }}
#stage {{ flex: 1; min-height: 320px; position: relative; }}
#viewer {{ position: absolute; inset: 0; width: 100%; height: 100%; outline: none; }}
#message {{ position: absolute; top: 40%; left: 10%; right: 10%; text-align: center; color: #ffb4ab; }}
a {{ color: #8ab4f8; text-decoration: none; }} a:hover {{ text-decoration: underline; }}
</style></head><body>
<header>
<h1>{title}</h1> <span class="meta">input <code>{input}</code>{score} · {links}</span>
<div class="controls">
<label>view <select id="layout">
<option value="3">axial, coronal, sagittal and 3D</option><option value="0">axial</option>
<option value="1">coronal</option><option value="2">sagittal</option><option value="4">3D render</option>
</select></label>
<label>heatmap threshold <input type="range" id="threshold" min="0" max="{ceiling}" step="{step}"
 value="{threshold}"> <output id="threshold-value">{threshold}</output> z</label>
<label>opacity <input type="range" id="opacity" min="0" max="1" step="0.05" value="{opacity}"></label>
{findings}
<span>most anomalous slices: {jumps}</span>
</div>
</header>
<div id="stage"><canvas id="viewer"></canvas><div id="message" hidden></div></div>
<footer><span id="location" class="meta"></span><br>
<span class="meta">Colour bar: anomaly in z-units of the bank's normal variation (0 is typical normal tissue); below the
threshold the heatmap is transparent. Wheel over a plane: scroll its slices; click: move the crosshair; drag in 3D:
rotate. Slice names are the file's own voxel axis and index, as in the report.</span></footer>
<noscript><p>This page needs JavaScript and WebGL 2.</p></noscript>
<script src="{script}"></script>
<script src="{data}"></script>
<script>
{code}
</script>
</body></html>
"""

_PAGE_SCRIPT = r"""(function () {
  "use strict";
  const status = { state: "loading", error: "", layers: [], jump: null };
  window.himatchStatus = status;
  const message = document.getElementById("message");
  function fail(error) {
    status.state = "error";
    status.error = String((error && error.message) || error);
    message.textContent = "The viewer could not start: " + status.error;
    message.hidden = false;
  }
  if (!window.himatchNiivue || !window.himatchData) {
    fail("niivue.js or view_data.js did not load; keep them in the folder of view.html");
    return;
  }
  const data = window.himatchData;
  function buffer(text) {
    const raw = atob(text);
    const bytes = new Uint8Array(raw.length);
    for (let i = 0; i < raw.length; i++) bytes[i] = raw.charCodeAt(i);
    return bytes.buffer;
  }
  function labelTable(labels) {
    const table = { R: [0], G: [0], B: [0], A: [0], labels: [""].concat(labels) };
    labels.forEach(function (_, n) {
      const colour = data.findingColours[n % data.findingColours.length];
      table.R.push(colour[0]); table.G.push(colour[1]); table.B.push(colour[2]); table.A.push(255);
    });
    return table;
  }
  async function start() {
    const nv = new window.himatchNiivue.Niivue({
      isColorbar: true, sliceType: 3, multiplanarShowRender: 1, multiplanarLayout: 2, show3Dcrosshair: true,
      dragAndDropEnabled: false, backColor: [0, 0, 0, 1], crosshairColor: [0.3, 0.8, 1, 0.8], crosshairWidth: 0.5,
      crosshairWidthUnit: "mm", crosshairGap: 12, logLevel: "warn",
    });
    await nv.attachToCanvas(document.getElementById("viewer"));
    const index = {};
    for (const layer of data.layers) {
      const volume = await nv.addVolumeFromUrl({
        url: layer.name, name: layer.name, buffer: buffer(layer.base64), colormap: layer.colormap || "gray",
        opacity: layer.opacity, cal_min: layer.cal_min === null ? NaN : layer.cal_min,
        cal_max: layer.cal_max === null ? NaN : layer.cal_max, colorbarVisible: layer.role === "anomaly",
      });
      if (layer.labels.length) volume.setColormapLabel(labelTable(layer.labels));
      layer.base64 = null;
      index[layer.role] = nv.volumes.indexOf(volume);
      status.layers.push({ role: layer.role, name: layer.name, dims: Array.from(volume.hdr.dims.slice(1, 4)) });
    }
    nv.updateGLVolume();
    const location = document.getElementById("location");
    const roles = data.layers.map(function (layer) { return layer.role; });
    nv.onLocationChange = function (info) {
      const mm = Array.from(info.mm).slice(0, 3);
      const voxel = data.toVoxel.map(function (row) {
        return Math.round(row[0] * mm[0] + row[1] * mm[1] + row[2] * mm[2] + row[3]);
      });
      const parts = ["RAS " + mm.map(function (v) { return v.toFixed(1); }).join(", ") + " mm",
        "file voxel i=" + voxel[0] + " j=" + voxel[1] + " k=" + voxel[2]];
      info.values.forEach(function (entry, n) {
        if (roles[n] === "image") parts.push("image " + Number(entry.value).toPrecision(4));
        if (roles[n] === "anomaly") parts.push("anomaly " + Number(entry.value).toFixed(2) + " z");
        if (roles[n] === "findings" && entry.value >= 1) parts.push(data.layers[n].labels[Math.round(entry.value) - 1]);
      });
      location.textContent = parts.join(" \u00b7 ");
      status.location = { world: mm, voxel: voxel };
    };
    const anomaly = nv.volumes[index.anomaly];
    const threshold = document.getElementById("threshold");
    const shown = document.getElementById("threshold-value");
    function setThreshold(value) {
      anomaly.cal_min = Math.min(Number(value), data.ceiling - 0.05);
      shown.textContent = Number(value).toFixed(1);
      threshold.value = value;
      nv.updateGLVolume();
    }
    threshold.addEventListener("input", function () { setThreshold(threshold.value); });
    const opacity = document.getElementById("opacity");
    opacity.addEventListener("input", function () { nv.setOpacity(index.anomaly, Number(opacity.value)); });
    const findings = document.getElementById("findings");
    if (findings) findings.addEventListener("change", function () {
      nv.setOpacity(index.findings, findings.checked ? data.layers[index.findings].opacity : 0);
    });
    const layout = document.getElementById("layout");
    layout.addEventListener("change", function () { nv.setSliceType(Number(layout.value)); });
    const buttons = Array.from(document.querySelectorAll("button[data-jump]"));
    function jump(n) {
      const target = data.jumps[n];
      // Through the volume's true (possibly oblique) affine: NiiVue's default frame is the voxel-aligned one.
      nv.scene.crosshairPos = nv.mm2frac(target.world, 0, true);
      nv.drawScene();
      if (nv.createOnLocationChange) nv.createOnLocationChange();
      buttons.forEach(function (button, m) { button.classList.toggle("active", m === n); });
      status.jump = { index: n, label: target.label, voxel: target.voxel, world: target.world };
    }
    buttons.forEach(function (button) {
      button.addEventListener("click", function () { jump(Number(button.dataset.jump)); });
    });
    window.himatchViewer = { nv: nv, jump: jump, setThreshold: setThreshold, layers: index };
    if (data.jumps.length) jump(0);
    status.state = "ready";
  }
  start().catch(fail);
})();"""
