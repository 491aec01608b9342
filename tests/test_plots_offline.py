"""DVC's interactive plots offline: `dvc plots show` fills a page template that carries Vega,
Vega-Lite and Vega-Embed inline (pipelines/plots_page.py), and every chart draws in a real
headless Chromium with no network."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import BIN, REPO, subprocess_env
from pipelines import plots_page
from scratch import make_scratch_project

CHROMIUM = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(name)), None)
# headless, and nothing fetched behind the page's back (this machine's network is closed anyway)
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--enable-logging=stderr", "--v=0", "--virtual-time-budget=10000")


def test_the_checked_in_template_is_what_the_pinned_package_makes():
    path = plots_page.template_path()
    assert path.read_text(encoding="utf8") == plots_page.page(), (
        f"{path.relative_to(REPO)} is stale: run python -m pipelines.plots_page")
    assert "{plot_divs}" in plots_page.page() and "{scripts}" not in plots_page.page()  # no CDN tags


@pytest.mark.parametrize("folder", ["text", "lm"])
def test_every_dvc_project_here_names_the_one_template(folder):
    assert plots_page.template_path(REPO / folder) == plots_page.template_path()


def write_plot_data(project: Path) -> None:
    """Small files for the three interactive plots dvc.yaml declares: the curves, reliability, confusion."""
    for sub, header, rows in (("curves", "epoch,val_accuracy", ["1,0.5", "2,0.7", "3,0.8"]),
                              ("reliability", "confidence,accuracy", ["0.5,0.4", "0.8,0.75", "0.95,0.9"])):
        (project / "reports" / sub).mkdir(parents=True, exist_ok=True)
        for model in ("teacher", "student", "baseline"):
            (project / "reports" / sub / f"{model}.csv").write_text("\n".join([header, *rows]) + "\n")
    (project / "reports/predictions.csv").write_text("actual,student\na,a\nb,b\nb,a\na,a\n")


def vega_plots_drawn(page: str, dom: str) -> dict[str, bool]:
    """Per plot the page hands to vegaEmbed: whether Vega drew its marks (an svg or canvas) in its div."""
    starts = sorted((dom.index(f'<div id="{i}"'), i) for i in re.findall(r"vegaEmbed\('#([^']+)'", page))
    ends = [start for start, _ in starts[1:]] + [len(dom)]
    marks = re.compile(r'<(svg|canvas)\b[^>]*class="marks"')
    return {i: bool(marks.search(dom[start:end])) for (start, i), end in zip(starts, ends)}


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium here (Debian: apt-get install chromium)")
def test_plain_dvc_plots_show_draws_every_interactive_plot_offline_in_headless_chromium(tmp_path):
    project = make_scratch_project(tmp_path / "project")
    write_plot_data(project)
    subprocess.run([str(BIN / "dvc"), "plots", "show", "--out", "shown"], cwd=project, env=subprocess_env(),
                   check=True, capture_output=True, timeout=120)
    page = (project / "shown/index.html").read_text(encoding="utf8")
    assert "<script src=" not in page  # nothing to fetch
    browser = subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom",
                              (project / "shown/index.html").as_uri()], capture_output=True, text=True, timeout=120)
    console = [line for line in browser.stderr.splitlines() if ":CONSOLE" in line]
    assert not [line for line in console if "Uncaught" in line or "is not defined" in line], console
    drawn = vega_plots_drawn(page, browser.stdout)
    assert len(drawn) == 3 and all(drawn.values()), drawn
