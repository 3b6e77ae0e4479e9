"""synthesize_results.py on run folders written by the test: table, sorting, broken runs, plot, HParams."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np
import pytest
from matplotlib.container import BarContainer, ErrorbarContainer
from matplotlib.figure import Figure
from PIL import Image
from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer
from tensorboard.plugins.hparams import metadata as hparams_metadata

import synthesize_results as sr
import utils

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_run(parent: Path, name: str, params: dict | None, metrics: dict | str | None, complete: bool = True) -> Path:
    run = parent / name
    run.mkdir(parents=True)
    if params is not None:
        (run / "params.json").write_text(json.dumps(params))
    if metrics is not None:
        text = metrics if isinstance(metrics, str) else json.dumps(metrics)
        (run / "metrics_val_best_weights.json").write_text(text)
    if complete:
        (run / "train_complete.json").write_text("{}")
    return run


def metrics(miou: float, **extra) -> dict:
    return {"miou": miou, "pixel_accuracy": 0.9, "mean_accuracy": 0.7, "fw_iou": 0.85, "loss": 1 - miou,
            "per_class_iou": {"a": miou, "b": None}, "epoch": 3, **extra}


def table_rows(text: str) -> list[list[str]]:
    """Cells of the Markdown table's body rows."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]


def table_header(text: str) -> list[str]:
    line = next(line for line in text.splitlines() if line.startswith("|"))
    return [c.strip() for c in line.strip("|").split("|")]


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    parent = tmp_path / "learning_rate"
    parent.mkdir()
    (parent / "params.json").write_text(json.dumps({"learning_rate": 0.01, "num_epochs": 3}))
    write_run(parent, "learning_rate_0.1", {"learning_rate": 0.1, "num_epochs": 3}, metrics(0.61))
    write_run(parent, "learning_rate_0.001", {"learning_rate": 0.001, "num_epochs": 3}, metrics(0.7234))
    write_run(parent, "learning_rate_0.01", {"learning_rate": 0.01, "num_epochs": 3}, metrics(0.65), complete=False)
    write_run(parent, "learning_rate_1", {"learning_rate": 1, "num_epochs": 3}, "{not json")
    write_run(parent, "learning_rate_0.3", {"learning_rate": 0.3, "num_epochs": 3}, None, complete=False)
    return parent


def test_table_is_printed_written_and_sorted_by_miou(sweep, capsys):
    assert sr.main(["--parent_dir", str(sweep)]) == 0
    out = capsys.readouterr().out
    written = (sweep / "results.md").read_text()
    assert written in out

    assert table_header(written) == ["run", "learning_rate", "miou %", "pixel_accuracy %", "mean_accuracy %",
                                     "fw_iou %", "loss", "epoch", "complete"]
    rows = table_rows(written)
    assert [r[0] for r in rows] == ["learning_rate_0.001", "learning_rate_0.01", "learning_rate_0.1"]
    assert rows[0] == ["learning_rate_0.001", "0.001", "72.34", "90.00", "70.00", "85.00", "0.2766", "3", "yes"]
    assert rows[1][-1] == "no"
    miou_column = [float(r[2]) for r in rows]
    assert miou_column == sorted(miou_column, reverse=True)


def test_missing_and_broken_files_are_listed_not_crashed_on(sweep):
    bad_params = write_run(sweep, "bad_params", None, metrics(0.9))
    (bad_params / "params.json").write_text("[1, 2")
    assert sr.main(["--parent_dir", str(sweep)]) == 0
    text = (sweep / "results.md").read_text()
    assert "- `learning_rate_1`: broken metrics_val_best_weights.json: Expecting property name" in text
    assert "- `learning_rate_0.3`: missing metrics_val_best_weights.json" in text
    assert "- `bad_params`: broken params.json: Expecting ',' delimiter" in text
    assert [r[0] for r in table_rows(text)] == ["learning_rate_0.001", "learning_rate_0.01", "learning_rate_0.1"]
    assert table_header(text)[:3] == ["run", "learning_rate", "miou %"]


def test_plot_is_a_valid_png(sweep):
    assert sr.main(["--parent_dir", str(sweep)]) == 0
    data = (sweep / "results.png").read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1000
    with Image.open(sweep / "results.png") as image:
        image.verify()
        assert image.format == "PNG" and image.size[0] > 100 and image.size[1] > 100


def test_metric_option_sorts_by_it_and_loss_lowest_first(sweep):
    write_run(sweep, "learning_rate_0.05", {"learning_rate": 0.05, "num_epochs": 3},
              metrics(0.5, pixel_accuracy=0.99, loss=0.01))
    assert sr.main(["--parent_dir", str(sweep), "--metric", "pixel_accuracy"]) == 0
    rows = table_rows((sweep / "results.md").read_text())
    assert rows[0][0] == "learning_rate_0.05"
    assert table_header((sweep / "results.md").read_text())[2] == "pixel_accuracy %"

    assert sr.main(["--parent_dir", str(sweep), "--metric", "loss"]) == 0
    text = (sweep / "results.md").read_text()
    losses = [float(r[2]) for r in table_rows(text)]
    assert losses == sorted(losses) and losses[0] == 0.01
    assert "lower is better" in text


def test_boundary_columns_and_only_differing_params(tmp_path):
    parent = tmp_path / "table5"
    common = {"backbone": "resnet50", "kernel_size": 15, "scale_range": [0.5, 2.0]}
    write_run(parent, "a", {**common, "head": "1x1", "boundary_refine": False},
              metrics(0.690, boundary_accuracy=0.713, interior_accuracy=0.939))
    write_run(parent, "b", {**common, "head": "gcn", "boundary_refine": False},
              metrics(0.745, boundary_accuracy=0.715, interior_accuracy=0.950))
    write_run(parent, "c", {**common, "head": "gcn", "boundary_refine": True},
              metrics(0.747, boundary_accuracy=0.734, interior_accuracy=None))
    assert sr.main(["--parent_dir", str(parent)]) == 0
    text = (parent / "results.md").read_text()
    header = table_header(text)
    assert header[:3] == ["run", "head", "boundary_refine"]
    assert "boundary_accuracy %" in header and "interior_accuracy %" in header
    rows = {r[0]: dict(zip(header, r)) for r in table_rows(text)}
    assert [r[0] for r in table_rows(text)] == ["c", "b", "a"]
    assert rows["c"]["boundary_refine"] == "true" and rows["c"]["boundary_accuracy %"] == "73.40"
    assert rows["c"]["interior_accuracy %"] == sr.MISSING
    assert (parent / "results.png").read_bytes().startswith(PNG_SIGNATURE)


def test_nested_parent_folders_are_not_runs_and_names_are_relative(tmp_path):
    parent = tmp_path / "ablations"
    (parent / "t1").mkdir(parents=True)
    (parent / "t1" / "params.json").write_text(json.dumps({"kernel_size": 15}))
    write_run(parent, "t1/kernel_size_3", {"kernel_size": 3}, metrics(0.70))
    write_run(parent, "t1/kernel_size_5", {"kernel_size": 5}, metrics(0.71))
    runs = [sr.load_run(d, parent, utils.METRICS_BEST, "miou") for d in sr.find_run_dirs(parent, utils.METRICS_BEST)]
    assert [r.name for r in runs] == ["t1/kernel_size_3", "t1/kernel_size_5"]


def test_single_experiment_folder_is_its_own_run(tmp_path):
    run = write_run(tmp_path, "base_model", {"learning_rate": 0.01}, metrics(0.72))
    assert sr.find_run_dirs(run, utils.METRICS_BEST) == [run]


@pytest.mark.parametrize("values, scale", [
    ([1e-3, 1e-2, 1e-1], "log"),
    ([1e-3, 1e-1], "log"),
    ([1e-3, 5e-2], "linear"),
    ([3, 5, 7, 15], "linear"),
    ([0.0, 0.1, 10.0], "linear"),
    ([210, 1024, 2048], "linear"),
])
def test_x_scale_is_log_from_two_decades(values, scale):
    assert sr.choose_x_scale(values) == scale


def test_x_axis_is_the_numeric_key_that_draws_lines(tmp_path):
    def run(name, **params):
        return sr.RunResult(name=name, directory=tmp_path, params=params, metrics={"miou": 0.5}, problem=None,
                            complete=True)

    table2 = [run(f"{h}{k}", head=h, kernel_size=k) for h in ("gcn", "conv") for k in (3, 5, 7)]
    assert sr.choose_x_key(table2, ["head", "kernel_size"]) == "kernel_size"
    table5 = [run("a", head="1x1", kernel_size=1, boundary_refine=False),
              run("b", head="gcn", kernel_size=15, boundary_refine=False),
              run("c", head="gcn", kernel_size=15, boundary_refine=True)]
    assert sr.choose_x_key(table5, ["head", "kernel_size", "boundary_refine"]) is None


def test_bad_input_is_one_clear_error(tmp_path, sweep, capsys):
    assert sr.main(["--parent_dir", str(tmp_path / "nowhere")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert sr.main(["--parent_dir", str(empty)]) == 2
    assert "no runs below" in capsys.readouterr().err
    assert sr.main(["--parent_dir", str(sweep), "--metric", "mIoU"]) == 2
    err = capsys.readouterr().err
    assert "has a numeric 'mIoU'" in err and "miou" in err
    assert sr.main(["--parent_dir", str(sweep), "--average_over", "seed"]) == 2
    assert "--average_over 'seed' is not a parameter that differs among the runs" in capsys.readouterr().err


def test_average_over_seed_gives_mean_and_sample_std_per_setting(tmp_path):
    parent = tmp_path / "kernel_seeds"
    mious = {(15, 1): 0.50, (15, 2): 0.54, (15, 3): 0.55, (3, 1): 0.47, (3, 2): 0.49}
    for (k, seed), miou in mious.items():
        write_run(parent, f"k{k}_s{seed}", {"kernel_size": k, "seed": seed, "lr": 0.02},
                  metrics(miou, boundary_accuracy=0.6 + seed / 100))
    write_run(parent, "k3_s3", {"kernel_size": 3, "seed": 3, "lr": 0.02}, None)  # unfinished: left out
    assert sr.main(["--parent_dir", str(parent), "--average_over", "seed"]) == 0
    text = (parent / "results.md").read_text()
    per_run, averages = text.split("Mean ± sample standard deviation over seed:")
    assert len(table_rows(per_run)) == 5
    assert table_header(averages) == ["kernel_size", "runs", "seed", "miou %", "pixel_accuracy %", "mean_accuracy %",
                                      "fw_iou %", "boundary_accuracy %", "loss"]
    k15, k3 = table_rows(averages)
    # k=15: mean 0.53, sample std sqrt(((-.03)² + .01² + .02²) / 2) = 0.026458
    assert k15[:4] == ["15", "3", "3, 2, 1", "53.00 ± 2.65"]
    assert k15[7] == "62.00 ± 1.00" and k15[8] == "0.47 ± 0.02646"
    assert k3[:4] == ["3", "2", "2, 1", "48.00 ± 1.41"]
    assert k3[4] == "90.00 ± 0.00"


# ----------------------------------------------------------------------------- averaged plot

def run_main(monkeypatch, argv: list[str]) -> Figure:
    """sr.main(argv), which must succeed; the figure its plot_results drew."""
    figures = []
    plot_results = sr.plot_results
    monkeypatch.setattr(sr, "plot_results", lambda *args: figures.append(plot_results(*args)) or figures[-1])
    assert sr.main(argv) == 0
    (figure,) = figures
    return figure


def plotted(figure: Figure) -> tuple[list[float], list[tuple[float, float, float]]]:
    """The figure's plotted values (line points or bar heights) and its error bars as (x, low, high)."""
    (ax,) = figure.axes
    bars = [c for c in ax.containers if isinstance(c, BarContainer)]
    lines = [c.lines[0] for c in ax.containers if isinstance(c, ErrorbarContainer) and c.lines[0] is not None]
    values = [p.get_height() for b in bars for p in b.patches] + [y for line in lines for y in line.get_ydata()]
    errors = [(s[0][0], s[0][1], s[1][1]) for c in ax.containers if isinstance(c, ErrorbarContainer)
              for collection in c.lines[2] for s in collection.get_segments()]
    return values, sorted(errors)


HEAD_SEEDS = {("gcn", 15): (0.5321, 0.5156, 0.5131), ("gcn", 3): (0.5132, 0.5072, 0.5274),
              ("1x1", 1): (0.5361, 0.5243, 0.5105)}


@pytest.fixture
def heads_by_seeds(tmp_path: Path) -> Path:
    parent = tmp_path / "camvid_kernel_ablation"
    for (head, k), mious in HEAD_SEEDS.items():
        for seed, miou in zip((230, 231, 232), mious):
            write_run(parent, f"head_{head},kernel_size_{k},seed_{seed}",
                      {"head": head, "kernel_size": k, "seed": seed, "lr": 0.02}, metrics(miou))
    return parent


def test_averaged_points_are_mean_and_sample_std_per_setting(tmp_path):
    def run(name, miou, **params):
        return sr.RunResult(name=name, directory=tmp_path, params=params, metrics={"miou": miou, "loss": None},
                            problem=None, complete=True)

    rows = [run("a1", 0.60, head="gcn", seed=1), run("b1", 0.58, head="1x1", seed=1),
            run("a2", 0.56, head="gcn", seed=2), run("b2", 0.50, head="1x1", seed=2),
            run("a3", 0.52, head="gcn", seed=3)]
    gcn, plain = sr.averaged_points(rows, ["head", "seed"], "miou", "seed")
    assert (gcn.params, [r.name for r in gcn.runs], gcn.n) == ({"head": "gcn"}, ["a1", "a2", "a3"], 3)
    # mean 0.56, sample std sqrt((0.04² + 0² + 0.04²) / 2) = 0.04; 1x1: mean 0.54, std sqrt(2 · 0.04² / 1)
    assert gcn.mean == pytest.approx(0.56) and gcn.std == pytest.approx(0.04)
    assert plain.mean == pytest.approx(0.54) and plain.std == pytest.approx(0.04 * 2 ** 0.5) and plain.n == 2
    assert sr.format_mean("miou", gcn) == "56.00 ± 4.00"
    (missing, _) = sr.averaged_points(rows, ["head", "seed"], "loss", "seed")
    assert (missing.mean, missing.std, missing.n, sr.format_mean("loss", missing)) == (None, None, 0, sr.MISSING)
    single = sr.averaged_points(rows[:2], ["head", "seed"], "miou", "seed")[0]
    assert (single.mean, single.std, sr.format_mean("miou", single)) == (0.60, None, "60.00")
    per_run = sr.averaged_points(rows, ["head", "seed"], "miou")
    assert [(p.name, p.mean, p.std, p.n) for p in per_run] == [(r.name, r.metrics["miou"], None, 1) for r in rows]


def test_average_over_seed_plots_one_bar_per_setting_with_sample_std(tmp_path, monkeypatch):
    parent = tmp_path / "heads"
    for head, mious in {"gcn": (0.60, 0.56, 0.52), "1x1": (0.58, 0.50)}.items():
        for seed, miou in enumerate(mious):
            write_run(parent, f"{head}_{seed}", {"head": head, "seed": seed}, metrics(miou))
    figure = run_main(monkeypatch, ["--parent_dir", str(parent), "--average_over", "seed"])
    values, errors = plotted(figure)
    assert values == pytest.approx([56.0, 54.0])  # one bar per head, best first
    # gcn: 56 ± sqrt((4² + 0² + 4²) / 2) = 56 ± 4; 1x1: 54 ± sqrt((4² + 4²) / 1) = 54 ± sqrt(32)
    np.testing.assert_allclose(errors, [(0, 52.0, 60.0), (1, 54 - 32 ** 0.5, 54 + 32 ** 0.5)])
    assert "mean ± std over seed (n=2–3)" in figure.axes[0].get_title()
    assert [t.get_text() for t in figure.axes[0].get_xticklabels()] == ["gcn", "1x1"]
    assert (parent / "results.png").read_bytes().startswith(PNG_SIGNATURE)


def test_average_over_seed_plots_one_point_per_setting_along_the_numeric_key(heads_by_seeds, monkeypatch):
    figure = run_main(monkeypatch, ["--parent_dir", str(heads_by_seeds), "--average_over", "seed"])
    values, errors = plotted(figure)
    assert len(values) == len(errors) == len(HEAD_SEEDS)  # not one line per seed
    expected = sorted((k, 100 * statistics.fmean(m) - 100 * statistics.stdev(m),
                       100 * statistics.fmean(m) + 100 * statistics.stdev(m)) for (_, k), m in HEAD_SEEDS.items())
    np.testing.assert_allclose(errors, expected)
    assert sorted(values) == pytest.approx(sorted(100 * statistics.fmean(m) for m in HEAD_SEEDS.values()))
    (ax,) = figure.axes
    assert ax.get_xlabel() == "kernel_size" and "mean ± std over seed (n=3)" in ax.get_title()
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["head=1x1", "head=gcn"]


def test_without_average_over_every_run_is_plotted_without_error_bars(heads_by_seeds, monkeypatch):
    figure = run_main(monkeypatch, ["--parent_dir", str(heads_by_seeds)])
    values, errors = plotted(figure)
    assert sorted(values) == pytest.approx(sorted(100 * m for mious in HEAD_SEEDS.values() for m in mious))
    assert errors == [] and "mean" not in figure.axes[0].get_title()


# ----------------------------------------------------------------------------- TensorBoard HParams

def hparams_sessions(directory: Path) -> dict[str, tuple[dict, float]]:
    """Per TensorBoard run below directory that starts an HParams session: its hparams and its miou."""
    mux = EventMultiplexer().AddRunsFromDirectory(str(directory))
    mux.Reload()
    sessions = {}
    for run, tags in mux.PluginRunToTagToContent(hparams_metadata.PLUGIN_NAME).items():
        if hparams_metadata.SESSION_START_INFO_TAG in tags:
            start = hparams_metadata.parse_session_start_info_plugin_data(
                tags[hparams_metadata.SESSION_START_INFO_TAG])
            hparams = {k: getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()}
            (miou,) = mux.Tensors(run, "miou")
            sessions[run] = (hparams, miou.tensor_proto.float_val[0])
    return sessions


def test_hparams_has_one_session_per_run_and_rerunning_replaces_them(sweep, capsys):
    write_run(sweep, "learning_rate_0.05", {"learning_rate": 0.05, "num_epochs": 3, "scale_range": [0.5, 2.0],
                                            "flip": None}, metrics(0.5))
    for _ in range(2):
        assert sr.main(["--parent_dir", str(sweep)]) == 0
        hparams = sweep / "hparams"
        assert f"tensorboard --logdir {hparams}" in capsys.readouterr().out
        sessions = hparams_sessions(hparams)
        assert sorted(sessions) == ["learning_rate_0.001", "learning_rate_0.01", "learning_rate_0.05",
                                    "learning_rate_0.1"]
        assert all(len(list((hparams / run).glob("events.out.tfevents.*"))) == 1 for run in sessions)
    assert sessions["learning_rate_0.001"] == ({"learning_rate": 0.001, "scale_range": sr.MISSING,
                                                "flip": sr.MISSING}, pytest.approx(0.7234))
    assert sessions["learning_rate_0.05"] == ({"learning_rate": 0.05, "scale_range": "[0.5,2.0]", "flip": "null"},
                                              pytest.approx(0.5))

    (sweep / "learning_rate_0.05" / "metrics_val_best_weights.json").unlink()
    assert sr.main(["--parent_dir", str(sweep)]) == 0
    assert sorted(hparams_sessions(sweep / "hparams")) == ["learning_rate_0.001", "learning_rate_0.01",
                                                           "learning_rate_0.1"]


def test_hparams_folder_holding_a_run_is_not_cleared(sweep, capsys):
    run = write_run(sweep, "hparams", {"learning_rate": 0.2, "num_epochs": 3}, metrics(0.6))
    assert sr.main(["--parent_dir", str(sweep)]) == 2
    assert "holds runs" in capsys.readouterr().err
    assert (run / "params.json").exists() and not (sweep / "results.png").exists()
