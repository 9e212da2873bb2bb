"""Study pages in NiiVue: written beside a screening's outputs, escaped, linked, and opened in headless Chromium.

The browser tests use Playwright (PyPI) driving a Chromium: Playwright's own build when one is installed, else the
system's (Debian's ``chromium``), else ``HIMATCH_CHROMIUM``; without either they skip and say so. Screenshots go to
``HIMATCH_SCREENSHOTS`` when it is set (to look at them), else to the test's temporary folder.
"""

import base64
import gzip
import importlib.util
import json
import os
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import LESION, LPS, OBLIQUE, PERMUTED, SETTINGS, SHAPE, as_stored, brain_volume, save_nifti
from test_screening import write_dicom_series

from himatch_med import jobs, screening, viewer
from himatch_med.bank.build import build_bank
from himatch_med.detect import Detector

RADIUS = 3.0
HOSTILE = "P<01> & \"Ann's\" <script>alert(1)</script>"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("viewer")
    (root / "refs").mkdir()
    (root / "cohort").mkdir()
    for i, affine in enumerate((OBLIQUE, PERMUTED, LPS)):
        save_nifti(as_stored(brain_volume(i, SHAPE)[0], affine), affine, root / "refs" / f"ref{i}.nii.gz")
    array, _ = brain_volume(30, SHAPE, lesion=LESION, radius=RADIUS)
    save_nifti(as_stored(array, OBLIQUE), OBLIQUE, root / "cohort" / "lesion.nii.gz")
    write_dicom_series(brain_volume(40, SHAPE)[0], root / "cohort" / "dicom_oblique")
    # The id of the lesion study is hostile HTML; its folder name is made safe, its id must be escaped on the page.
    (root / "cohort.csv").write_text(f'id,path\n"{HOSTILE.replace(chr(34), chr(34) * 2)}",cohort/lesion.nii.gz\n'
                                     "dicom_oblique,cohort/dicom_oblique\n")
    return root


@pytest.fixture(scope="module")
def viewer_detector(root, stand_in):
    """The stand-in with a bank of this module's three references (what the pages' checks were written against)."""
    references = sorted((root / "refs").iterdir())
    bank = build_bank(stand_in, ((str(p), jobs.read(p, SETTINGS).prepared) for p in references), SETTINGS)
    return Detector(stand_in, bank, SETTINGS)


@pytest.fixture(scope="module")
def screened(root, viewer_detector):
    """The two studies screened once with the viewer extra installed."""
    if not viewer.available():
        pytest.skip(f"the viewer extra is not installed: {viewer.INSTALL}")
    folder = root / "out"
    studies = screening.read_cohort([root / "cohort.csv"])
    result = screening.screen(studies, viewer_detector, folder, workers=0, progress=False)
    assert result.count("ok") == 2
    return folder, {r.study.id: r for r in result.results}


def _decode(layer):
    return nib.Nifti1Image.from_bytes(gzip.decompress(base64.b64decode(layer["base64"])))


def _data(page_folder):
    text = (page_folder / viewer.DATA).read_text()
    assert text.startswith("window.himatchData = ") and text.endswith(";\n")
    return json.loads(text[len("window.himatchData = "):-2])


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links, self.scripts, self.inline = [], [], []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.links += [attrs[name] for name in ("src", "href") if attrs.get(name)]
        if tag == "script":
            self._in_script = True
            self.scripts.append(attrs.get("src"))

    def handle_endtag(self, tag):
        self._in_script = self._in_script and tag != "script"

    def handle_data(self, data):
        if self._in_script:
            self.inline.append(data)


def _tags(page):
    parser = _Tags()
    parser.feed(page)
    return parser


def test_each_study_gets_a_page_beside_its_outputs_and_the_report_links_it(screened):
    folder, results = screened
    for result in results.values():
        study = folder / result.study.folder
        assert [p.name for p in sorted(study.glob("view*"))] == ["view.html", "view_data.js"]
        assert (study / viewer.SCRIPT).stat().st_size > 1_000_000
        assert result.outputs["view"] == f"{result.study.folder}/view.html"
        assert not [note for note in result.notes if "page" in note or "viewer" in note], result.notes
    report = (folder / "report.html").read_text()
    for result in results.values():
        assert f"href='{result.study.folder}/view.html'>3D viewer</a>" in report
    assert viewer.INSTALL not in report


def test_the_page_loads_only_files_of_its_own_folder_as_classic_scripts(screened):
    folder, results = screened
    for result in results.values():
        study = folder / result.study.folder
        tags = _tags((study / viewer.PAGE).read_text())
        assert tags.scripts == [viewer.SCRIPT, viewer.DATA, None]
        for link in tags.links:
            assert not re.match(r"[a-z]+:|/|\.\.", link) and "/" not in link, link
            assert (study / link).is_file(), link
        code = "".join(tags.inline)
        assert "fetch(" not in code and "import" not in code and "XMLHttpRequest" not in code
    script = (folder / "dicom_oblique" / viewer.SCRIPT).read_text()
    assert "BSD 2-Clause License" in script[:2000] and "globalThis.himatchNiivue" in script[-200:]
    assert not re.search(r"export\s*\{[^}]*\}\s*;?\s*$", script[-500:])


def test_ids_and_paths_are_escaped_on_the_page(screened):
    folder, results = screened
    result = results[HOSTILE]
    page = (folder / result.study.folder / viewer.PAGE).read_text()
    assert "alert(1)" in page and "<script>alert" not in page and HOSTILE not in page
    assert "P&lt;01&gt; &amp; &quot;Ann&#x27;s&quot; &lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert page.isascii()
    data = (folder / result.study.folder / viewer.DATA).read_text()
    assert "<" not in data and data.isascii()


def test_the_page_data_holds_the_input_and_the_heatmap_on_the_input_grid(root, screened):
    folder, results = screened
    from himatch_med import io

    # The float lesion volume travels as float32, the whole-numbered DICOM series as int16: both exactly.
    cases = {HOSTILE: nib.load(root / "cohort" / "lesion.nii.gz").get_fdata(),
             "dicom_oblique": io.read_image(root / "cohort" / "dicom_oblique").array}
    for study_id, source in cases.items():
        study = folder / results[study_id].study.folder
        data = _data(study)
        # Every run writes its findings now: the label map is the page's third layer.
        assert [layer["role"] for layer in data["layers"]] == ["image", "anomaly", "findings"]
        image, heat = (_decode(layer) for layer in data["layers"][:2])
        stored = nib.load(next(study.glob("*_anomaly.nii.gz")))
        assert image.shape == heat.shape == stored.shape
        np.testing.assert_array_equal(heat.get_fdata(), stored.get_fdata())
        for header in (image.header, heat.header):
            np.testing.assert_allclose(header.get_sform(), stored.header.get_sform(), atol=1e-5)
            np.testing.assert_allclose(header.get_qform(), stored.header.get_qform(), atol=1e-5)
        np.testing.assert_allclose(image.get_fdata(), source, atol=1e-4)
        assert image.get_data_dtype() == (np.int16 if study_id == "dicom_oblique" else np.float32)
        assert data["layers"][1]["cal_min"] == data["threshold"] and data["ceiling"] >= data["threshold"] + 2


def test_the_jumps_go_to_the_hottest_voxel_of_each_top_slice(screened):
    folder, results = screened
    result = results[HOSTILE]
    study = folder / result.study.folder
    heat = nib.load(next(study.glob("*_anomaly.nii.gz")))
    values = heat.get_fdata()
    jumps = _data(study)["jumps"]
    assert len(jumps) == len(result.top_slices) > 0
    for jump, top in zip(jumps, result.top_slices):
        axis = "ijk".index(top["file_axis"])
        assert jump["label"] == f"{top['file_axis']}={top['file_index']}" and jump["voxel"][axis] == top["file_index"]
        assert values[tuple(jump["voxel"])] == pytest.approx(np.take(values, top["file_index"], axis).max())
        np.testing.assert_allclose(jump["world"], (heat.affine @ [*jump["voxel"], 1])[:3], atol=1e-3)
    page = (study / viewer.PAGE).read_text()
    assert page.count("data-jump=") == len(jumps) and f">{jumps[0]['label']} <small>" in page


FINDINGS = {1: (slice(10, 14), slice(10, 14), slice(3, 5)), 2: (slice(30, 33), slice(30, 33), slice(8, 10))}


@pytest.fixture(scope="module")
def with_findings(screened, tmp_path_factory):
    """A copy of the DICOM study with a findings label map of two regions (the file the Findings issue will add)."""
    folder, _ = screened
    study = tmp_path_factory.mktemp("findings") / "dicom_oblique"
    shutil.copytree(folder / "dicom_oblique", study)
    heat = nib.load(next(study.glob("*_anomaly.nii.gz")))
    labels = np.zeros(heat.shape, np.int16)
    for label, box in FINDINGS.items():
        labels[box] = label
    nib.save(nib.Nifti1Image(labels, heat.affine, heat.header), study / "dicom_oblique_findings.nii.gz")
    assert viewer.write_page(study, title="with findings") == study / viewer.PAGE
    return study, labels


def test_a_findings_label_map_is_shown_when_present(with_findings):
    study, labels = with_findings
    data = _data(study)
    findings = data["layers"][2]
    assert findings["role"] == "findings" and findings["labels"] == ["finding 1", "finding 2"]
    np.testing.assert_array_equal(_decode(findings).get_fdata(), labels)
    page = (study / viewer.PAGE).read_text()
    assert 'id="findings"' in page and 'href="dicom_oblique_findings.nii.gz"' in page
    if importlib.util.find_spec("ipyniivue"):
        table = viewer.show(study).volumes[2].colormap_label
        assert table.labels == ["", "finding 1", "finding 2"] and table.lut[:8] == [0, 0, 0, 0, 230, 25, 75, 255]


def test_without_the_extra_no_page_is_written_and_the_report_says_how(root, viewer_detector, tmp_path, monkeypatch):
    studies = [s for s in screening.read_cohort([root / "cohort.csv"]) if s.id == "dicom_oblique"]
    stale = tmp_path / "dicom_oblique"
    stale.mkdir()
    for name in viewer.FILES:
        (stale / name).write_text("from an earlier run")
    monkeypatch.setattr(viewer, "bundle_path", lambda: None)
    viewer.niivue_script.cache_clear()
    try:
        result = screening.screen(studies, viewer_detector, tmp_path, workers=0, progress=False)
    finally:
        viewer.niivue_script.cache_clear()
    assert result.count("ok") == 1 and "view" not in result.results[0].outputs
    assert not [note for note in result.results[0].notes if "page" in note], result.results[0].notes
    assert not [name for name in viewer.FILES if (stale / name).exists()]  # stale pages would show old maps
    report = (tmp_path / "report.html").read_text()
    assert "No 3D viewer pages" in report and "pip install &#x27;himatch-med[viewer]&#x27;" in report
    assert "view.html" not in report


def test_a_rerun_adds_pages_to_studies_finished_without_them(root, viewer_detector, screened):
    folder, results = screened
    page = folder / "dicom_oblique" / viewer.PAGE
    page.unlink()
    kept = (folder / results[HOSTILE].study.folder / viewer.PAGE).stat().st_mtime_ns
    studies = screening.read_cohort([root / "cohort.csv"])
    again = screening.screen(studies, viewer_detector, folder, workers=0, progress=False)
    assert again.count("skipped") == 2 and page.is_file()
    assert (folder / results[HOSTILE].study.folder / viewer.PAGE).stat().st_mtime_ns == kept
    assert all("view" in r.outputs for r in again.results)


def test_a_page_that_cannot_be_made_is_a_note_not_a_failure(screened, tmp_path):
    folder, _ = screened
    study = tmp_path / "study"
    shutil.copytree(folder / "dicom_oblique", study)
    report = viewer.read_report(study)
    report["input"] = str(tmp_path / "gone.nii.gz")
    note = viewer.add_page(study, report, title="gone")
    assert note.startswith("no 3D viewer page: ") and "gone.nii.gz: no such file" in note


def test_the_bundle_becomes_a_classic_script_or_is_refused():
    module = 'var a=1;function f(){console.log("Creating new Niivue instance");let o={};v=new Xy$(o)}export{f as default};'
    script = viewer.classic_script(module, source="ipyniivue 0.0", licence="BSD */ text")
    assert "export" not in script and "globalThis.himatchNiivue = { Niivue: Xy$" in script
    assert script.index("(function () {") < script.index("var a=1") and "BSD * / text" in script
    assert viewer.classic_script(module.replace("var a=1;", 'var a=1;importScripts("w.js");'), source="s")
    for broken in (module.replace("Creating new", "Making"), module.replace("export{f as default};", ""),
                   "import{x}from\"./y.js\";" + module, 'import x from "./y.js";' + module,
                   module.replace("var a=1", "var a=import.meta.url")):
        with pytest.raises(RuntimeError, match="not laid out as expected.*ipyniivue>=2.4"):
            viewer.classic_script(broken, source="ipyniivue 9.9")


def test_show_returns_a_notebook_widget_with_the_same_layers(screened):
    pytest.importorskip("ipyniivue", reason=f"the notebook view needs ipyniivue: {viewer.INSTALL}")
    folder, _ = screened
    widget = viewer.show(folder / "dicom_oblique")
    assert [v.name for v in widget.volumes] == ["image.nii.gz", "anomaly.nii.gz", "findings.nii.gz"]
    assert widget.volumes[1].colormap == viewer.ANOMALY_COLORMAP and widget.volumes[1].cal_min == 1.0


# --- in a real browser -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (pip install playwright)")
    # WebGL 2 without a GPU: SwiftShader, Chromium's software renderer.
    args = ["--use-angle=swiftshader", "--enable-unsafe-swiftshader"]
    manager = sync_api.sync_playwright().start()
    candidates = [os.environ.get("HIMATCH_CHROMIUM"), None, shutil.which("chromium"), shutil.which("chromium-browser")]
    errors, launched = [], None
    for executable in dict.fromkeys(candidates):
        if executable == "":
            continue
        try:
            launched = manager.chromium.launch(executable_path=executable, args=args)
            break
        except Exception as error:  # Playwright raises its own Error for a missing or broken browser
            errors.append(f"{executable or 'playwright chromium'}: {str(error).splitlines()[0]}")
    if launched is None:
        manager.stop()
        pytest.skip("no Chromium to run the page in (apt-get install chromium, or playwright install chromium): "
                    + "; ".join(errors))
    yield launched
    launched.close()
    manager.stop()


@pytest.fixture
def shots(tmp_path):
    folder = Path(os.environ.get("HIMATCH_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _open(browser, page_path):
    page = browser.new_page(viewport={"width": 1100, "height": 900}, device_scale_factor=1)
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(page_path.as_uri())
    page.wait_for_function("window.himatchStatus && window.himatchStatus.state !== 'loading'", timeout=60_000)
    status = page.evaluate("window.himatchStatus")
    assert status["state"] == "ready", (status, errors)
    assert not errors, errors
    return page, status


def _axial_pixels(page, overlay):
    """The canvas as an array, with the heatmap's opacity set to ``overlay``, and the axial tile's box."""
    from io import BytesIO

    import matplotlib.image

    page.evaluate(f"window.himatchViewer.nv.setOpacity(window.himatchViewer.layers.anomaly, {overlay})")
    page.wait_for_timeout(200)
    pixels = matplotlib.image.imread(BytesIO(page.locator("#viewer").screenshot()), format="png")[..., :3]
    tiles = page.evaluate("window.himatchViewer.nv.screenSlices.map(s => [s.axCorSag, ...s.leftTopWidthHeight])")
    box = next(t[1:] for t in tiles if t[0] == 0)
    return pixels, [int(round(v)) for v in box], next(n for n, t in enumerate(tiles) if t[0] == 0)


def _lesion_world(root):
    image = nib.as_closest_canonical(nib.load(root / "cohort" / "lesion.nii.gz"))
    return (image.affine @ [*LESION, 1])[:3]


def test_the_lesion_study_opens_in_chromium_with_its_heatmap_on_the_lesion(root, screened, browser, shots):
    folder, results = screened
    study = folder / results[HOSTILE].study.folder
    page, status = _open(browser, study / viewer.PAGE)
    shape = list(nib.load(root / "cohort" / "lesion.nii.gz").shape)
    assert [(layer["role"], layer["dims"]) for layer in status["layers"]] == [("image", shape), ("anomaly", shape),
                                                                               ("findings", shape)]
    assert page.title().startswith(HOSTILE)
    # The page opens on the most anomalous slice; its buttons move there again after a look elsewhere.
    page.evaluate("window.himatchViewer.nv.scene.crosshairPos = [0.1, 0.1, 0.1]")
    page.locator("button[data-jump='0']").click()
    jump = page.evaluate("window.himatchStatus.jump")
    # NiiVue's world positions through the volume's true affine (its third argument), the frame of the report.
    crosshair = page.evaluate("Array.from(window.himatchViewer.nv.frac2mm("
                              "window.himatchViewer.nv.scene.crosshairPos, 0, true)).slice(0, 3)")
    np.testing.assert_allclose(crosshair, jump["world"], atol=1e-3)
    assert page.evaluate("window.himatchStatus.location.voxel") == jump["voxel"]
    assert "file voxel i={} j={} k={}".format(*jump["voxel"]) in page.locator("#location").inner_text()
    lesion = _lesion_world(root)
    assert np.linalg.norm(np.array(jump["world"]) - lesion) < 2 * RADIUS * 3.0
    page.screenshot(path=str(shots / "viewer_lesion.png"))
    # The heatmap's hot pixels (above 2 z) in the axial plane lie on the planted lesion.
    page.locator("#threshold").fill("2")
    assert page.locator("#threshold-value").inner_text() == "2.0"
    shown, box, tile = _axial_pixels(page, 1.0)
    hidden, _, _ = _axial_pixels(page, 0.0)
    left, top, width, height = box
    changed = np.abs(shown - hidden).sum(-1)[top:top + height, left:left + width] > 0.1
    rows, columns = np.nonzero(changed)
    assert len(rows) > 20, "no heatmap pixels above the threshold in the axial plane"
    points = [[int(c) + left + 0.5, int(r) + top + 0.5] for r, c in zip(rows, columns)]
    worlds = np.array(page.evaluate(
        "([points, tile]) => points.map(p => Array.from(window.himatchViewer.nv.frac2mm("
        "window.himatchViewer.nv.screenXY2TextureFrac(p[0], p[1], tile), 0, true)).slice(0, 3))", [points, tile]))
    distance = np.linalg.norm(worlds - lesion, axis=1)
    assert np.median(distance) < 2 * RADIUS * 2.0, np.median(distance)
    # The threshold slider: above the hottest value, nothing of the heatmap is painted.
    page.evaluate(f"window.himatchViewer.setThreshold({_data(study)['ceiling']})")
    page.evaluate("window.himatchViewer.nv.setOpacity(window.himatchViewer.layers.anomaly, 1)")
    page.wait_for_timeout(200)
    blank, _, _ = _axial_pixels(page, 1.0)
    assert (np.abs(blank - hidden).sum(-1)[top:top + height, left:left + width] > 0.1).sum() < 0.1 * len(rows)
    page.close()


def test_the_dicom_study_opens_in_chromium_on_the_series_grid(root, screened, browser, shots):
    import SimpleITK as sitk

    folder, _ = screened
    page, status = _open(browser, folder / "dicom_oblique" / viewer.PAGE)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(root / "cohort" / "dicom_oblique")))
    size = list(reader.Execute().GetSize())
    assert [(layer["role"], layer["dims"]) for layer in status["layers"]] == [("image", size), ("anomaly", size),
                                                                              ("findings", size)]
    page.locator("button[data-jump='1']").click()
    assert page.evaluate("window.himatchStatus.jump.index") == 1
    page.screenshot(path=str(shots / "viewer_dicom.png"))
    page.close()


def test_the_findings_open_in_chromium_as_named_labels(with_findings, browser, shots):
    study, _ = with_findings
    page, status = _open(browser, study / viewer.PAGE)
    assert [layer["role"] for layer in status["layers"]] == ["image", "anomaly", "findings"]
    voxel = [12, 12, 4]  # inside finding 1
    world = (nib.load(study / "dicom_oblique_findings.nii.gz").affine @ [*voxel, 1])[:3].tolist()
    page.evaluate("(world) => { const nv = window.himatchViewer.nv; nv.scene.crosshairPos = nv.mm2frac(world, 0, true);"
                  " nv.drawScene(); nv.createOnLocationChange(); }", world)
    text = page.locator("#location").inner_text()
    assert "file voxel i=12 j=12 k=4" in text and text.endswith("finding 1"), text
    page.screenshot(path=str(shots / "viewer_findings.png"))
    page.locator("#findings").uncheck()
    assert page.evaluate("window.himatchViewer.nv.volumes[2].opacity") == 0
    page.close()
