"""The HTML/PNG report and the terminal summary built from real selections of a synthetic matrix."""

from __future__ import annotations

import copy
import math
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

import poise
from poise.errors import PoiseError
from poise.report import build_report, display_names, print_summary, slugs, summary_rows
from poise.synthetic import synthetic_matrix

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class PageParser(HTMLParser):
    """Collects <img src>, <link>/<script> tags and href attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.external: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs.get("src") or "")
        if tag in ("link", "script", "iframe") or "href" in attrs:
            self.external.append(tag)

    def handle_data(self, data):
        self.text.append(data)


def parse(path: Path) -> PageParser:
    parser = PageParser()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


@pytest.fixture(scope="module")
def matrix():
    matrix, _ = synthetic_matrix(n_rows=2000, columns_per_task=4)
    return matrix


@pytest.fixture(scope="module")
def selections(matrix):
    return [poise.select(matrix, "bids", 200), poise.select(matrix, "instance-max", 200)]


@pytest.fixture(scope="module")
def report(matrix, selections, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    return build_report(matrix, selections, out)


def test_every_image_in_the_page_is_an_existing_png_in_out_dir(report):
    page = parse(report)
    assert report.name == "report.html"
    assert page.images, "the page shows no figures"
    for src in page.images:
        assert "/" not in src and not src.startswith("data:")
        path = report.parent / src
        assert path.is_file() and path.stat().st_size > 0, src
        assert path.read_bytes()[:8] == PNG_MAGIC


def test_each_selection_has_an_aid_and_a_thi_figure_and_comparisons_exist(report):
    images = set(parse(report).images)
    for stem in ("bids", "instance-max"):
        assert f"aid_{stem}.png" in images
        assert f"thi_{stem}.png" in images
    assert {"aid_comparison.png", "thi_comparison.png", "coverage.png", "overlap.png"} <= images


def test_page_is_self_contained_and_lists_tasks_and_selections(report, matrix):
    page = parse(report)
    assert page.external == []
    html = report.read_text(encoding="utf-8")
    assert "<style>" in html and "http://" not in html and "https://" not in html
    text = " ".join(page.text)
    for task in matrix.task_names:
        assert task in text
    for label in ("bids", "instance-max", "AID", "THI", "macro"):
        assert label in text


def test_embedded_report_uses_data_uris_and_no_file_references(matrix, selections, tmp_path):
    path = build_report(matrix, selections, tmp_path, embed_images=True)
    page = parse(path)
    assert page.images and all(src.startswith("data:image/png;base64,") for src in page.images)
    html = path.read_text(encoding="utf-8")
    assert ".png" not in html


def test_single_selection_report_has_no_overlap_figure(matrix, selections, tmp_path):
    page = parse(build_report(matrix, selections[:1], tmp_path))
    assert "overlap.png" not in page.images
    assert not (tmp_path / "overlap.png").exists()
    assert {"aid_bids.png", "thi_bids.png", "coverage.png"} <= set(page.images)


def test_user_strings_are_escaped_and_shared_labels_get_distinct_files(matrix, selections, tmp_path):
    evil = copy.deepcopy(selections[0])
    evil.arguments["label"] = '<script>alert("x")</script>'
    twin_a = copy.deepcopy(selections[1])
    twin_b = copy.deepcopy(selections[1])
    comparison = copy.deepcopy(selections[0])
    comparison.arguments["label"] = "comparison"
    path = build_report(matrix, [evil, twin_a, twin_b, comparison], tmp_path, title="A & B <i>")
    html = path.read_text(encoding="utf-8")
    assert "<script>" not in html and "<i>" not in html
    assert "&lt;script&gt;" in html and "A &amp; B &lt;i&gt;" in html
    images = parse(path).images
    aid_files = [src for src in images if src.startswith("aid_") and src != "aid_comparison.png"]
    assert len(aid_files) == len(set(aid_files)) == 4
    # a selection labelled "comparison" must not overwrite the cross-selection figure
    assert "aid_comparison.png" in images and "aid_comparison-2.png" in images


def test_slugs_are_filesystem_safe_unique_and_avoid_reserved_names():
    stems = slugs(["bids", "bids", "BIDS (raw)", "../etc/passwd", "", "comparison", "ä ö"])
    assert len(set(stems)) == len(stems)
    assert stems[:3] == ["bids", "bids-2", "bids-raw"]
    assert "comparison" not in stems
    for stem in stems:
        assert stem and all(c.isascii() and (c.isalnum() or c == "-") for c in stem)


def test_display_names_disambiguate_repeated_labels(selections):
    names = display_names([selections[0], selections[0], selections[1]])
    assert names == ["bids", "bids #2", "instance-max"]


def test_report_refuses_a_selection_from_another_pool(matrix, selections, tmp_path):
    other = copy.deepcopy(selections[0])
    other.n_pool = matrix.n_rows + 1
    with pytest.raises(PoiseError, match="pool of 2001 rows"):
        build_report(matrix, [other], tmp_path)
    with pytest.raises(PoiseError, match="no selections"):
        build_report(matrix, [], tmp_path)


def test_summary_rows_have_a_row_per_task_and_a_macro_row(matrix, selections):
    rows = summary_rows(matrix, selections)
    assert [r["task"] for r in rows] == [*matrix.task_names, "macro"]
    assert [r["macro"] for r in rows] == [False] * len(matrix.task_names) + [True]
    for column in range(len(selections)):
        shares = [r["thi"][column] for r in rows[:-1]]
        assert sum(shares) == pytest.approx(1.0)
        influence = [r["influence"][column] for r in rows[:-1]]
        assert rows[-1]["influence"][column] == pytest.approx(np.mean(influence))
        expected = max(shares) / min(shares) if min(shares) > 0 else math.inf
        assert rows[-1]["thi"][column] == pytest.approx(expected)
    # the point of BIDS: its task shares are more balanced than raw instance-max
    assert rows[-1]["thi"][0] < rows[-1]["thi"][1]


def test_print_summary_renders_a_row_per_selection_and_a_column_per_task(matrix, selections):
    console = Console(record=True, width=200)
    print_summary(matrix, selections, console=console)
    text = console.export_text()
    for task in matrix.task_names:
        assert task in text
    for needle in ("THI share", "Mean normalised influence", "balance", "macro", "bids", "instance-max"):
        assert needle in text
    assert "%" in text and "×" in text


def test_print_summary_is_not_squeezed_when_piped(matrix, selections):
    import io

    stream = io.StringIO()
    console = Console(file=stream, width=40, force_terminal=False)
    print_summary(matrix, selections, console=console)
    text = stream.getvalue()
    assert "…" not in text
    for task in matrix.task_names:
        assert task in text
    assert console.width == 40


def test_run_report_builds_the_page_from_saved_matrix_and_selection_folders(matrix, selections, tmp_path):
    from poise.config import ReportConfig
    from poise.report import run_report

    matrix.save(tmp_path / "attribution")
    folders = []
    for selection in selections:
        folder = tmp_path / "selections" / selection.method
        poise.write_selection(selection, folder)
        folders.append(str(folder))
    config = ReportConfig(attribution=str(tmp_path / "attribution"), selections=folders,
                          out=str(tmp_path / "report"), title="from disk")
    path = run_report(config)
    assert path == tmp_path / "report" / "report.html"
    assert {"aid_bids.png", "thi_instance-max.png", "overlap.png"} <= set(parse(path).images)
    with pytest.raises(PoiseError, match="at least one selection"):
        run_report(ReportConfig(attribution=str(tmp_path / "attribution"), out=str(tmp_path / "r2")))
