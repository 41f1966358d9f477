"""The HTML/PNG report and the terminal summary built from real selections of a synthetic matrix."""

from __future__ import annotations

import base64
import copy
import io
import json
import math
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

import poise
from poise.errors import PoiseError
from poise.report import build_report, display_names, plots, preview_text, print_summary, summary_rows
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


FIGURES = ["aid_comparison.png", "aid_selections.png", "thi_comparison.png", "thi_selections.png",
           "coverage.png", "zscore_fit.png", "overlap.png"]


def test_images_are_embedded_by_default_and_the_pngs_are_still_written_beside_the_page(report):
    page = parse(report)
    assert report.name == "report.html"
    assert len(page.images) == len(FIGURES)
    html = report.read_text(encoding="utf-8")
    assert ".png" not in html  # no <img src="x.png">: the page is one file that opens anywhere
    embedded = []
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        embedded.append(base64.b64decode(src.split(",", 1)[1]))
    for name in FIGURES:
        png = (report.parent / name).read_bytes()
        assert png[:8] == PNG_MAGIC
        assert png in embedded, name


def test_no_embed_images_links_the_png_files_beside_the_page(matrix, selections, tmp_path):
    path = build_report(matrix, selections, tmp_path, embed_images=False)
    page = parse(path)
    assert page.images == FIGURES
    for src in page.images:
        assert "/" not in src
        assert (tmp_path / src).read_bytes()[:8] == PNG_MAGIC
    assert "data:image" not in path.read_text(encoding="utf-8")


def test_selections_share_one_aid_and_one_thi_figure_instead_of_one_each(matrix, selections, tmp_path):
    three = [*selections, poise.select(matrix, "random", 200)]
    page = parse(build_report(matrix, three, tmp_path, embed_images=False))
    assert page.images == FIGURES  # the number of figures does not grow with the selections
    assert not list(tmp_path.glob("aid_bids*.png")) and not list(tmp_path.glob("thi_bids*.png"))


def test_images_carry_their_size_so_the_page_does_not_jump(report):
    html = report.read_text(encoding="utf-8")
    assert html.count("<img ") == len(FIGURES)
    assert len(re.findall(r'<img [^>]*width="\d+" height="\d+"', html)) == len(FIGURES)


def test_page_is_self_contained_and_lists_tasks_and_selections(report, matrix):
    page = parse(report)
    assert page.external == []
    html = report.read_text(encoding="utf-8")
    assert "<style>" in html and "http://" not in html and "https://" not in html
    text = " ".join(page.text)
    for task in matrix.task_names:
        assert task in text
    for label in ("bids", "instance-max", "AID", "THI", "macro", "First picks"):
        assert label in text


def test_single_selection_report_has_no_overlap_or_comparison_figure(matrix, selections, tmp_path):
    page = parse(build_report(matrix, selections[:1], tmp_path, embed_images=False))
    assert page.images == ["aid_selections.png", "thi_selections.png", "coverage.png", "zscore_fit.png"]
    assert not (tmp_path / "overlap.png").exists()


def test_user_strings_are_escaped(matrix, selections, tmp_path):
    evil = copy.deepcopy(selections[0])
    evil.arguments["label"] = '<script>alert("x")</script>'
    evil.trace[0] = {**evil.trace[0], "id": "<b>row</b>", "task": "<i>t</i>", "column_id": "&col"}
    twin_a = copy.deepcopy(selections[1])
    twin_b = copy.deepcopy(selections[1])
    path = build_report(matrix, [evil, twin_a, twin_b], tmp_path, title="A & B <i>")
    html = path.read_text(encoding="utf-8")
    assert "<script>" not in html and "<i>" not in html and "<b>" not in html
    assert "&lt;script&gt;" in html and "A &amp; B &lt;i&gt;" in html
    assert "&lt;b&gt;row&lt;/b&gt;" in html and "&amp;col" in html
    assert "instance-max #2" in " ".join(parse(path).text)


# ----------------------------------------------------------------------------------------- colours
def test_method_colors_give_each_selection_one_distinct_colour_and_no_grey():
    names = ["bids", "bids (raw)", "instance-max", "task-max", "sum", "rds", "random", "instance-max (norm)"]
    colors = plots.method_colors(names)
    assert list(colors) == names
    assert colors == plots.method_colors(names)  # the same names, the same colours, every time
    rgb = {tuple(round(c, 6) for c in color[:3]) for color in colors.values()}
    assert len(rgb) == len(names)
    assert not any(r == g == b for r, g, b in rgb)  # greys are kept for references and neutral legends
    assert len(set(plots.method_colors([f"m{k}" for k in range(25)]).values())) == 25


RED, BLUE = (1.0, 0.0, 0.0, 1.0), (0.0, 0.0, 1.0, 1.0)
#: Colours the figures used for tasks and series before (tab10 orange, green, purple; the old THI blue and
#: orange; Set2): none may appear when the only methods are pure red and pure blue.
OLD_COLORS = [(1.0, 0.498, 0.055), (0.173, 0.627, 0.173), (0.580, 0.404, 0.741), (0.298, 0.447, 0.690),
              (0.867, 0.518, 0.322), (0.400, 0.761, 0.647), (0.988, 0.553, 0.384)]


def _pixels(png: bytes) -> np.ndarray:
    from matplotlib.image import imread

    return imread(io.BytesIO(png), format="png")[..., :3]


def _has(pixels: np.ndarray, color, tol: float = 0.02) -> bool:
    return bool((np.abs(pixels - np.asarray(color[:3])) < tol).all(axis=-1).any())


def _has_pure(pixels: np.ndarray, channel: int) -> bool:
    """Some pixel is strongly in one RGB channel only (pure red or blue, possibly a little transparent)."""
    others = [c for c in range(3) if c != channel]
    return bool(((pixels[..., channel] > 0.9) & (pixels[..., others] < 0.3).all(axis=-1)).any())


def test_every_figure_draws_a_selection_in_its_method_colour_and_tasks_without_colour(matrix, selections):
    from poise.analysis import aid_by_task, coverage, profile

    names = ["one", "two"]
    colors = {"one": RED, "two": BLUE}
    profiles = [profile(matrix, s.indices) for s in selections]
    aids = [aid_by_task(matrix, p.aid) for p in profiles]
    task_wise, inst = [p.thi_task for p in profiles], [p.thi_instance for p in profiles]
    coverages = [coverage(matrix, s.indices) for s in selections]
    figures = {
        "aid panels": plots.aid_panels(names, aids, colors=colors),
        "aid comparison": plots.aid_comparison_plot(names, aids, colors=colors),
        "thi panels": plots.thi_panels(names, task_wise, inst, colors=colors),
        "thi comparison": plots.thi_comparison_plot(names, task_wise, inst, colors=colors),
        "coverage": plots.coverage_plot(names, coverages, colors=colors),
    }
    for what, png in figures.items():
        pixels = _pixels(png)
        assert _has_pure(pixels, 0) and _has_pure(pixels, 2), what
        for old in OLD_COLORS:
            assert not _has(pixels, old), (what, old)


def test_page_swatches_use_the_same_colour_as_the_figures(report, selections):
    from matplotlib.colors import to_hex

    html = report.read_text(encoding="utf-8")
    for name, color in plots.method_colors(display_names(selections)).items():
        # the selections table, the summary header and the first-picks heading
        assert html.count(f'<span class="swatch" style="background:{to_hex(color)}">') == 3, name


# ------------------------------------------------------------------------------------- plot layout
def _counts(tasks, values):
    return dict(zip(tasks, values, strict=True))


def test_small_multiples_have_one_panel_per_selection_on_shared_axes_with_integer_count_ticks():
    tasks = ["a", "b", "c"]
    names = ["s1", "s2", "s3", "s4", "s5"]
    counts = [_counts(tasks, [3, 2, 2]), _counts(tasks, [7, 0, 0]), _counts(tasks, [1, 3, 3]),
              _counts(tasks, [2, 2, 3]), _counts(tasks, [0, 4, 3])]
    fig = plots.thi_panels_figure(names, counts, counts)
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == names
    first = panels[0]
    assert all(first.get_shared_y_axes().joined(first, ax) for ax in panels)
    assert all(first.get_shared_x_axes().joined(first, ax) for ax in panels)
    ticks = first.get_yticks()
    assert len(ticks) >= 2 and np.allclose(ticks, np.round(ticks))
    # every column's lowest panel names the tasks, including one above a spare cell of the grid
    labelled = [ax for ax in panels if any(t.get_text() for t in ax.get_xticklabels())]
    assert [ax.get_title() for ax in labelled] == ["s2", "s3", "s4", "s5"]

    aid = [{t: np.linspace(-0.1 * k, 0.2 * k, 4) for t in tasks} for k in range(len(names))]
    fig = plots.aid_panels_figure(names, aid)
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == names
    assert all(panels[0].get_shared_y_axes().joined(panels[0], ax) for ax in panels)
    assert [t.get_text() for t in panels[-1].get_xticklabels()] == tasks  # the same task order


def test_coverage_limits_leave_headroom_above_100_percent_and_below_zero():
    low, high = plots.coverage_limits(100.0)
    assert low < 0.0 and high > 100.0
    low, high = plots.coverage_limits(12.0)
    assert low < 0.0 and 12.0 < high < 100.0


def test_coverage_draws_a_line_at_100_percent_inside_the_frame_and_counts_picks_in_integers():
    tasks = ["a", "b"]
    sizes = np.array([1, 2, 3, 4, 5])
    full = {"sizes": sizes, "thi_share": {"a": np.ones(5), "b": np.zeros(5)}}
    fig = plots.coverage_figure(["only-a"], [full])
    ax = fig.axes[0]
    low, high = ax.get_ylim()
    assert high > 100.0 and low < 0.0
    assert [a.get_title() for a in fig.axes if a.get_visible() and a.axison] == tasks  # one panel per task
    ticks = [t for t in ax.get_xticks() if 0 <= t <= 5]
    assert len(ticks) >= 2 and np.allclose(ticks, np.round(ticks))


# ------------------------------------------------------------------------------------- first picks
class PicksParser(HTMLParser):
    """The cells of every <table class="picks">, one list of cell texts per row, and the h3 headings."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.headings: list[str] = []
        self._in_table = self._in_h3 = False
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "table" and ("class", "picks") in attrs:
            self._in_table = True
            self.tables.append([])
        elif self._in_table and tag == "tr":
            self.tables[-1].append([])
        elif self._in_table and tag in ("td", "th"):
            self._cell = []
        elif tag == "h3":
            self._in_h3 = True
            self.headings.append("")

    def handle_endtag(self, tag):
        if tag == "table":
            self._in_table = False
        elif tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell))
            self._cell = None
        elif tag == "h3":
            self._in_h3 = False

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)
        elif self._in_h3:
            self.headings[-1] += data


def picks_of(path: Path) -> PicksParser:
    parser = PicksParser()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def test_first_picks_table_lists_each_selections_first_ten_picks_in_order(matrix, selections, tmp_path):
    chosen = [selections[0], poise.select(matrix, "random", 200)]
    parsed = picks_of(build_report(matrix, chosen, tmp_path))
    assert len(parsed.tables) == 2
    assert parsed.headings[0].startswith("bids") and "first 10 of 200 picks" in parsed.headings[0]
    for table, selection in zip(parsed.tables, chosen, strict=True):
        header, *rows = table
        assert header[:6] == ["rank", "row", "id", "task", "validation example",
                              "gain" if selection.method == "bids" else "score"]
        assert len(rows) == 10
        for k, (row, entry) in enumerate(zip(rows, selection.trace, strict=False)):
            assert row[0] == str(k + 1) and row[1] == str(entry["row"]) and row[2] == entry["id"]
            if selection.method == "random":
                assert row[3] == row[4] == row[5] == "–"  # random serves no task
            else:
                assert row[3] == entry["task"] and row[4] == entry["column_id"]
                assert float(row[5]) == pytest.approx(entry["score"], rel=1e-3)


def _pool_lines(matrix, texts=None):
    lines = []
    for i in range(matrix.n_rows):
        text = texts(i) if texts else f"Question number {i}?"
        lines.append(json.dumps({"id": matrix.row_id(i),
                                 "messages": [{"role": "system", "content": "be brief"},
                                              {"role": "user", "content": text},
                                              {"role": "assistant", "content": "ok"}]}))
    return lines


def test_first_picks_show_the_examples_text_from_selected_jsonl(matrix, selections, tmp_path):
    folder = tmp_path / "bids"
    long = "<b>" + "word " * 60
    poise.write_selection(selections[0], folder, _pool_lines(matrix, lambda i: long if i % 2 else f"Q {i}?"))
    path = build_report(matrix, selections[:1], tmp_path / "report", folders=[folder])
    header, *rows = picks_of(path).tables[0]
    assert header[-1] == "example (first user message)"
    for row, entry in zip(rows, selections[0].trace, strict=False):
        text = row[-1]
        assert len(text) <= 120
        if entry["row"] % 2:
            assert text.startswith("<b>word word") and text.endswith("…")
        else:
            assert text == f"Q {entry['row']}?"
    assert "&lt;b&gt;word" in path.read_text(encoding="utf-8")


def test_first_picks_ignore_a_selected_jsonl_of_other_rows(matrix, selections, tmp_path):
    folder = tmp_path / "bids"
    poise.write_selection(selections[1], folder, _pool_lines(matrix))  # instance-max's picks
    path = build_report(matrix, selections[:1], tmp_path / "report", folders=[folder])
    header, *rows = picks_of(path).tables[0]
    assert "example (first user message)" not in header
    assert [row[2] for row in rows] == [entry["id"] for entry in selections[0].trace[:10]]


@pytest.mark.parametrize(
    ("example", "expected"),
    [
        ({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": " Hi\n there "}]},
         "Hi there"),
        ({"conversations": [{"from": "human", "value": "sharegpt"}, {"from": "gpt", "value": "x"}]}, "sharegpt"),
        ({"instruction": "Do it", "input": "now", "output": "ok"}, "Do it now"),
        ({"prompt": "p", "completion": "c"}, "p"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "parts"}]}]}, "parts"),
        ({"input_ids": [1, 2], "labels": [1, 2]}, None),
        ("not a dict", None),
    ],
)
def test_preview_text_reads_the_first_user_message_of_every_pool_format(example, expected):
    assert preview_text(example) == expected


def test_preview_text_is_cut_to_the_limit():
    text = preview_text({"prompt": "x" * 500}, limit=120)
    assert len(text) == 120 and text.endswith("…")


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
        poise.write_selection(selection, folder, _pool_lines(matrix))
        folders.append(str(folder))
    config = ReportConfig(attribution=str(tmp_path / "attribution"), selections=folders,
                          out=str(tmp_path / "report"), title="from disk")
    assert config.embed_images  # embedded by default
    path = run_report(config)
    assert path == tmp_path / "report" / "report.html"
    assert all(src.startswith("data:image/png;base64,") for src in parse(path).images)
    assert {p.name for p in (tmp_path / "report").glob("*.png")} == set(FIGURES)
    first = selections[0].trace[0]
    assert f"Question number {first['row']}?" in picks_of(path).tables[0][1]  # read from the given folder
    with pytest.raises(PoiseError, match="at least one selection"):
        run_report(ReportConfig(attribution=str(tmp_path / "attribution"), out=str(tmp_path / "r2")))


# ------------------------------------------------------------------------------------- downstream
def _write_scores(folder, label: str, values: dict[str, float], metric: str = "nll") -> str:
    import json as _json

    folder.mkdir(parents=True)
    (folder / "scores.json").write_text(_json.dumps({"label": label, "model": "m", "scores": {
        task: {metric: {"value": v, "stderr": 0.01, "higher_is_better": metric != "nll"},
               "acc": {"value": 0.5, "stderr": None, "higher_is_better": True}} for task, v in values.items()}}))
    return str(folder)


def test_report_on_evaluation_folders_prints_and_writes_the_table2_layout(tmp_path) -> None:
    import io

    from rich.console import Console

    from poise.config import ReportConfig
    from poise.report import run_report

    runs = [_write_scores(tmp_path / "base", "base", {"math": 1.2, "code": 2.0}),
            _write_scores(tmp_path / "bids", "bids-15", {"math": 0.9, "code": 1.7}),
            _write_scores(tmp_path / "random", "random-15", {"math": 1.0, "code": 2.5})]
    stream = io.StringIO()
    page = run_report(ReportConfig(selections=runs, out=str(tmp_path / "report")),
                      console=Console(file=stream, width=200))
    text = stream.getvalue()
    assert "math (nll)" in text and "macro-average" in text and "worst" in text
    bids_row = next(line for line in text.splitlines() if "bids-15" in line)
    assert "1.3000" in bids_row and "1.7000" in bids_row  # macro (0.9 + 1.7) / 2; worst = the highest nll
    html = page.read_text()
    assert "<b>0.9000</b>" in html and "<u>1.0000</u>" in html  # math: best bids, second random (lower is better)
    assert "<b>1.7000</b>" in html and "<u>2.0000</u>" in html  # code: best bids, second base
    assert "<b>1.3000</b>" in html  # macro-average


def test_downstream_table_follows_each_metrics_direction() -> None:
    from poise.report.downstream import downstream_table, ranks

    higher = [{"label": name, "scores": {"t": {"acc": {"value": v, "higher_is_better": True}}}}
              for name, v in (("a", 0.2), ("b", 0.6), ("c", 0.4))]
    table = downstream_table(higher, metric="acc")
    assert table.columns == ["t (acc)", "macro-average", "worst"]
    assert [row[0] for row in ranks(table)] == [None, 1, 2]
    assert table.values[1] == [0.6, 0.6, 0.6]


def test_zscore_columns_are_normalised_per_column_and_skip_constant_ones() -> None:
    from poise.report.plots import zscore_columns, zscore_fit_figure

    rng = np.random.default_rng(0)
    scores = np.column_stack([rng.normal(5, 2, 400), rng.exponential(1, 400), np.ones(400), rng.normal(0, 9, 400)])
    tasks = ["a", "a", "a", "b"]
    columns = zscore_columns(scores, tasks, per_task=5)
    assert [len(columns["a"]), len(columns["b"])] == [2, 1]  # the constant column is left out
    for z in [*columns["a"], *columns["b"]]:
        assert abs(z.mean()) < 1e-12 and abs(z.std() - 1) < 1e-12
    assert zscore_fit_figure(scores, tasks)[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------ large pools
def _report_of_a_large_pool(rows: int, tmp_path) -> tuple[Path, list[str]]:
    """`poise report` on BIDS and random selection folders (half the pool each, with a pool file) of a
    rows x 49 matrix saved as an attribution folder; the page and the selection folders."""
    from poise.config import ReportConfig
    from poise.report import run_report
    from poise.synthetic import synthetic_pool

    big, sources = synthetic_matrix(n_rows=rows, columns_per_task=7)
    big.save(tmp_path / "attribution")
    lines = [json.dumps(example) for example in synthetic_pool(sources)]
    folders = []
    for method in ("bids", "random"):
        folder = tmp_path / f"select-{method}"
        selection = poise.select(big, method, 0.5)
        poise.write_selection(selection, folder, lines)
        folders.append(str(folder))
    path = run_report(ReportConfig(attribution=str(tmp_path / "attribution"), selections=folders,
                                   out=str(tmp_path / "report")))
    return path, folders


def _check_large_report(path: Path, folders: list[str], rows: int) -> None:
    from poise.report.page import MAX_PAGE_BYTES

    assert path.stat().st_size < MAX_PAGE_BYTES
    text = " ".join(parse(path).text)
    assert "What this page leaves out" in text
    assert f"each column's line is drawn at 1,000 evenly spaced quantiles of its {rows:,} values" in text
    for folder in folders:  # every pick: named under its table
        assert f"All {rows // 2:,} picks (row, id, score, served validation example): {folder}/selection.json" in text
        assert f"{folder}/selected.jsonl" in text
    assert len(picks_of(path).tables) == 2
    assert all(len(table) == 1 + 10 for table in picks_of(path).tables)  # a header and the first picks only


def test_the_report_of_a_20k_row_selection_stays_small_and_says_what_it_leaves_out(tmp_path):
    path, folders = _report_of_a_large_pool(20_000, tmp_path)
    _check_large_report(path, folders, 20_000)


@pytest.mark.slow
def test_the_report_of_a_100k_row_selection_stays_small(tmp_path):
    path, folders = _report_of_a_large_pool(100_000, tmp_path)
    _check_large_report(path, folders, 100_000)


def test_display_names_tell_budgets_and_random_seeds_apart(matrix):
    """A run's report holds every method at several budgets, and random once per training seed: the names say
    which is which (a name that repeats, `task-max #2`, would not)."""
    picks = [poise.select(matrix, "task-max", budget) for budget in (100, 150)]
    draws = [poise.select(matrix, "random", 100, seed=seed) for seed in (0, 1)]
    for selection, seed in zip(draws, (0, 1), strict=True):
        selection.arguments["seed"] = seed  # as `poise select` records it
    names = display_names([*picks, *draws, picks[0]])
    assert names == ["task-max (100 picks)", "task-max (150 picks)", "random (seed 0)", "random (seed 1)",
                     "task-max (100 picks) #2"]


def test_comparison_figures_grow_so_a_long_legend_leaves_the_plot_its_height(matrix):
    """32 selections (12 methods at two budgets, random at three seeds) made a legend taller than the figure,
    which squeezed the plot into a strip: the figure grows with the legend instead."""
    tasks = ["a", "b", "c"]
    rng = np.random.default_rng(0)

    def png_height(n: int) -> int:
        aid = [{t: rng.normal(size=8) for t in tasks} for _ in range(n)]
        data = plots.aid_comparison_plot([f"s{k}" for k in range(n)], aid)
        return int.from_bytes(data[20:24], "big")  # the PNG header's height

    few, many = png_height(3), png_height(32)
    assert few == round(4.6 * plots.DPI)
    assert many == round(plots._height_for(32, 4.6) * plots.DPI) and many > 1.4 * few


def test_the_thi_comparison_panels_keep_equal_heights_beside_a_long_legend():
    """The legend of 32 selections, drawn on the upper panel, stretched that panel's row to the legend's height
    and left a gap above a short lower panel: one legend beside the figure leaves both panels alike."""
    tasks = ["a", "b", "c"]
    counts = [{t: k + j for j, t in enumerate(tasks)} for k in range(32)]
    fig = plots.thi_comparison_figure([f"s{k}" for k in range(32)], counts, counts)
    fig.draw_without_rendering()  # runs the constrained layout
    upper, lower = (ax.get_position() for ax in fig.axes[:2])
    assert upper.height == pytest.approx(lower.height, rel=0.05)
    assert upper.height > 0.4  # the two panels fill the figure's height between them
    assert upper.y0 - lower.y1 < 0.1  # the gap between them is a title's, not a legend's
