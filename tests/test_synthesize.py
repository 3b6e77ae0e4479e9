"""synthesize_results.py on run folders written by the test: table, sorting, broken runs, plot."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

import synthesize_results as sr

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
    runs = [sr.load_run(d, parent, sr.METRICS_FILE, "miou") for d in sr.find_run_dirs(parent, sr.METRICS_FILE)]
    assert [r.name for r in runs] == ["t1/kernel_size_3", "t1/kernel_size_5"]


def test_single_experiment_folder_is_its_own_run(tmp_path):
    run = write_run(tmp_path, "base_model", {"learning_rate": 0.01}, metrics(0.72))
    assert sr.find_run_dirs(run, sr.METRICS_FILE) == [run]


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
        return sr.Run(name, tmp_path, params, {"miou": 0.5}, None, True)

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
