"""The explorers in a real JupyterLab, in a real browser: Debian's chromium driven by Playwright (`pytest -m browser`).

One JupyterLab server (127.0.0.1, a token, a throw-away settings dir without news or update prompts) serves a temp
folder holding the notebooks under test: notebooks/01_boxes_and_iou.ipynb and 02_anchors.ipynb when they exist and
show the explorer, otherwise a small generated notebook that does. Each test opens one, runs all cells from the Run
menu, waits for the kernel, moves a slider from the keyboard and checks that the number in the explorer's labelled
widget changed. Screenshots land in the test's tmp_path (printed on failure).

Needs /usr/bin/chromium (`sudo apt-get install chromium`; never `playwright install`). Without it the tests skip,
except under CI=true, where a missing browser is a failure.
"""

import json
import os
import re
import secrets
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

from frcnn_tutorial.utils import free_local_port

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"]
IDLE = re.compile(r"\(ipykernel\) \| Idle")


def missing(reason: str):
    """Skip on a user's machine; fail under CI, where the browser test must run."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: the browser tests must run)")
    pytest.skip(reason)


def write_notebook(folder: Path, name: str, sources: list[str]) -> str:
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source) for source in sources])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    nbformat.write(nb, folder / name)
    return name


def notebook_for(course_name: str, call: str, folder: Path) -> str:
    """The course notebook if it exists and calls the explorer, else a generated two-cell one; copied to folder."""
    course = ROOT / "notebooks" / course_name
    if course.exists() and f"{call}(" in course.read_text():
        nbformat.write(nbformat.read(course, as_version=4), folder / course_name)
        return course_name
    return write_notebook(folder, f"test_{call}.ipynb", ["from frcnn_tutorial import widgets", f"widgets.{call}()"])


OTHER_EXPLORERS = [
    "from frcnn_tutorial import widgets",
    "widgets.nms_explorer()",
    "widgets.fpn_level_explorer()",
    "widgets.roi_pooling_explorer()",
    "import torch\n"
    "from frcnn_tutorial.data import EMBEDDED_CLASSES, embedded_dataset\n"
    "from frcnn_tutorial.model import faster_rcnn_tiny_fpn\n"
    "torch.manual_seed(0)\n"
    "model = faster_rcnn_tiny_fpn(len(EMBEDDED_CLASSES) + 1).eval()  # random weights: any scores will do\n"
    "widgets.detection_explorer(model, embedded_dataset('test'), EMBEDDED_CLASSES, score_thresh=0.0, nms_thresh=1.0)",
]


def quiet_settings(settings_dir: Path) -> None:
    """Turn off JupyterLab's news and update notifications (server flags alone do not); render all cells."""
    path = settings_dir / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False, "doNotDisturbMode": True}))
    # Render every cell, not only those in view: JupyterLab 4's default windowing leaves an explorer far down a long
    # chapter unrendered, so its labelled number would read empty.
    tracker = settings_dir / "@jupyterlab" / "notebook-extension" / "tracker.jupyterlab-settings"
    tracker.parent.mkdir(parents=True)
    tracker.write_text(json.dumps({"windowingMode": "none"}))


class Lab:
    """A JupyterLab server in a subprocess, stopped by its PID."""

    def __init__(self, root_dir: Path, work: Path):
        self.port, self.token = free_local_port(), secrets.token_hex(16)
        self.url = f"http://127.0.0.1:{self.port}"
        for sub in ("settings", "workspaces", "runtime", "config"):
            (work / sub).mkdir()
        quiet_settings(work / "settings")
        env = {**os.environ, "JUPYTERLAB_SETTINGS_DIR": str(work / "settings"), "OMP_NUM_THREADS": "1",
               "JUPYTERLAB_WORKSPACES_DIR": str(work / "workspaces"), "JUPYTER_RUNTIME_DIR": str(work / "runtime"),
               "JUPYTER_CONFIG_DIR": str(work / "config")}
        jupyter = Path(sys.executable).parent / "jupyter"  # the venv's
        command = [str(jupyter), "lab", "--no-browser", "--ip=127.0.0.1", f"--port={self.port}",
                   f"--ServerApp.root_dir={root_dir}", f"--IdentityProvider.token={self.token}",
                   "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
        if os.getuid() == 0:
            command.append("--ServerApp.allow_root=True")
        self.log = work / "server.log"
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root_dir)
        self.wait_until_up()

    def api(self, path: str, method: str = "GET"):
        request = urllib.request.Request(f"{self.url}{path}?token={self.token}", method=method)
        with urllib.request.urlopen(request, timeout=5) as response:
            body = response.read()
        return json.loads(body) if body else None

    def wait_until_up(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"JupyterLab exited with {self.process.returncode}:\n{self.log.read_text()}")
            try:
                self.api("/api/status")
                return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError(f"JupyterLab did not answer within {timeout} s:\n{self.log.read_text()}")

    def stop(self) -> None:
        try:
            for session in self.api("/api/sessions"):
                self.api(f"/api/sessions/{session['id']}", method="DELETE")
        finally:
            self.process.terminate()  # SIGTERM to this PID: the server shuts down cleanly
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    if not CHROMIUM.exists():
        missing(f"{CHROMIUM} not found: install it with `sudo apt-get install chromium` to run the browser tests")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("playwright is not installed: pip install -e '.[dev]' (never `playwright install`)")
    root_dir, work = tmp_path_factory.mktemp("lab_root"), tmp_path_factory.mktemp("lab_work")
    names = {"iou": notebook_for("01_boxes_and_iou.ipynb", "iou_explorer", root_dir),
             "anchor": notebook_for("02_anchors.ipynb", "anchor_explorer", root_dir),
             "others": write_notebook(root_dir, "test_other_explorers.ipynb", OTHER_EXPLORERS)}
    server = Lab(root_dir, work)
    playwright = sync_playwright().start()
    try:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS, headless=True)
        yield server, browser, names
        browser.close()
    finally:
        playwright.stop()
        server.stop()


def run_all(page, server, notebook: str) -> None:
    """Open the notebook (a fresh layout), wait for its kernel, run every cell from the Run menu."""
    page.goto(f"{server.url}/lab/tree/{notebook}?reset&token={server.token}")
    page.get_by_text(IDLE).first.wait_for(timeout=60_000)  # the toolbar says idle too early; the status bar not
    page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
    page.locator('[data-command="runmenu:run-all"]').click()


def wait_for_text(locator, pattern: str, differs_from=None, timeout: float = 30.0) -> str:
    """The first match of pattern in the locator's text, once it exists (and differs from differs_from)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(pattern, locator.inner_text()) if locator.count() else None
        if found and found.group(1) != differs_from:
            return found.group(1)
        time.sleep(0.2)
    text = locator.inner_text() if locator.count() else "<no such element>"
    raise AssertionError(f"no {pattern!r} (other than {differs_from!r}) in {text!r} after {timeout} s")


def move_slider_and_read(page, explorer: str, slider: str, value: str, pattern: str, key: str) -> tuple[str, str]:
    """The labelled number before and after pressing `key` on the slider's handle."""
    number = page.locator(f".{explorer} .{value}").first
    before = wait_for_text(number, pattern, timeout=90)  # the explorer has rendered its first figure
    page.get_by_text(IDLE).first.wait_for(timeout=60_000)  # and every cell has run
    assert page.locator(f".{explorer} img").first.is_visible()
    handle = page.locator(f".{explorer} .{slider} .noUi-handle").first
    handle.scroll_into_view_if_needed()
    handle.focus()
    handle.press(key)
    return before, wait_for_text(number, pattern, differs_from=before)


def drive(lab, tmp_path, name: str, moves: list[tuple[str, str, str, str, str]]) -> list[tuple[str, str]]:
    """Open notebook `name`, run all, then for each (explorer, slider, value, pattern, key) move and read."""
    server, browser, names = lab
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    shot = tmp_path / f"{name}.png"
    try:
        run_all(page, server, names[name])
        readings = []
        for explorer, *move in moves:
            readings.append(move_slider_and_read(page, explorer, *move))
            page.locator(f".{explorer}").first.scroll_into_view_if_needed()
            page.screenshot(path=str(tmp_path / f"{name}_{explorer}.png"))
        return readings
    except BaseException:
        page.screenshot(path=str(shot))
        print(f"screenshot of the failure: {shot}\nserver log: {server.log}")
        raise
    finally:
        page.close()


def test_iou_explorer_in_jupyterlab(lab, tmp_path):
    # box B's x1 slider to its end (256): B leaves A and the IoU drops from 0.1875 to 0
    [(before, after)] = drive(lab, tmp_path, "iou", [("iou-explorer", "iou-b-x1", "iou-value", r"IoU = ([\d.]+)",
                                                      "End")])
    assert float(before) > 0 and float(after) == 0.0


def test_anchor_explorer_in_jupyterlab(lab, tmp_path):
    # the stride one step up (16 -> 32): a quarter of the locations, so about a quarter of the anchors
    [(before, after)] = drive(lab, tmp_path, "anchor", [("anchor-explorer", "anchor-stride", "anchor-count",
                                                         r"anchors: ([\d,]+)", "ArrowRight")])
    assert int(after.replace(",", "")) < int(before.replace(",", "")) / 2


def test_other_explorers_in_jupyterlab(lab, tmp_path):
    (nms, fpn, roi, detections) = drive(lab, tmp_path, "others", [
        ("nms-explorer", "nms-threshold", "nms-count", r"kept (\d+)", "End"),  # IoU > 1: nothing suppressed
        ("fpn-level-explorer", "fpn-width", "fpn-level", r"level P(\d)", "End"),  # a very wide RoI: P5
        ("roi-pooling-explorer", "roi-output-size", "roi-pool-info", r"(\d+) in all", "ArrowRight"),  # 2x2 -> 3x3
        ("detection-explorer", "detection-score", "detection-count", r"(\d+) detections", "End"),  # score > 1
    ])
    assert int(nms[0]) < int(nms[1]) == 30
    assert (fpn[0], fpn[1]) == ("4", "5")
    assert (roi[0], roi[1]) == ("16", "36")  # 2 x 2 sampling points in each of 4, then 9 bins
    assert int(detections[0]) > 0 and detections[1] == "0"
