"""Collect the runs of a sweep into one Markdown table (results.md) and one plot (results.png).

    python synthesize_results.py --parent_dir experiments/learning_rate [--metric miou]
        [--metrics_file metrics_val_best_weights.json] [--average_over seed]

A run is a folder below the parent holding the metrics file, or holding a params.json with no runs below
it. One row per run: its folder, the parameters whose values differ among the runs, and the main metrics
(rates in %, boundary/interior accuracy when the runs report them), sorted by --metric (best first:
highest, or lowest for the loss). Runs whose metrics file is missing or unreadable are listed below the
table, not crashed on. The plot shows the metric against the swept numeric parameter with the most
values (log scale when they span two decades or more), one line per setting of the other swept
parameters; when no parameter gives a line, one bar per run. With --average_over KEY (e.g. seed), a
second table gives each metric's mean ± sample standard deviation over the runs that differ only in KEY,
and the plot shows that mean ± std, one point per setting of the other swept parameters. The runs also
go to TensorBoard's HParams tab: event files in <parent_dir>/hparams (rewritten on every call).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence, TypeVar

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
from matplotlib.figure import Figure  # noqa: E402
from torch.utils.tensorboard import SummaryWriter  # noqa: E402

import utils  # noqa: E402
from errors import UserError  # noqa: E402

RESULTS_TABLE = "results.md"
RESULTS_PLOT = "results.png"
HPARAMS_DIR = "hparams"
RATE_METRICS = tuple(name for name in utils.SCALAR_METRICS if name != "loss")  # shown as percentages
MAIN_METRICS = (*utils.SCALAR_METRICS, "epoch")
LOWER_IS_BETTER = {"loss"}
LOG_SCALE_DECADES = 2.0
MISSING = "—"


class ResultsError(UserError):
    """Bad command-line input (no such folder, no runs, unknown metric); the message says which."""


@dataclass(kw_only=True)
class RunResult:
    """One run folder: its parameters and metrics, or the reason they cannot be used."""

    name: str
    directory: Path
    params: dict[str, Any]  # {} when params.json is missing or broken
    metrics: dict[str, Any] | None
    problem: str | None
    complete: bool


@dataclass
class Point:
    """One setting of the swept keys and the mean ± sample std of one metric over its runs."""

    name: str  # the run's folder, or "mean over <key>"
    params: dict[str, Any]  # the setting (the parameters of its best run, less the averaged key)
    runs: list[RunResult]  # best first
    mean: float | None  # None when no run reports the metric
    std: float | None  # None for fewer than two values
    n: int  # runs that report the metric


class HasParams(Protocol):
    """A RunResult or a Point."""

    params: dict[str, Any]


Item = TypeVar("Item", bound=HasParams)


def is_number(value: Any) -> bool:
    """A real, finite number (bools are not numbers here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def find_run_dirs(parent_dir: Path, metrics_file: str) -> list[Path]:
    """Folders below parent_dir with a metrics file, or with a params.json and no such folder beneath them."""
    candidates = {p.parent for name in (metrics_file, utils.PARAMS_FILE) for p in parent_dir.rglob(name)}
    candidates -= {parent_dir}

    def has_candidate_below(directory: Path) -> bool:
        return any(directory in c.parents for c in candidates)

    runs = [d for d in candidates if (d / metrics_file).exists() or not has_candidate_below(d)]
    if not runs and (parent_dir / metrics_file).exists():
        runs = [parent_dir]
    return sorted(runs)


def read_json_object(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(object, None) or (None, why it cannot be used)."""
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        return None, f"missing {path.name}"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, f"broken {path.name}: {exc}"
    if not isinstance(value, dict):
        return None, f"broken {path.name}: not a JSON object"
    return value, None


def load_run(directory: Path, parent_dir: Path, metrics_file: str, metric: str) -> RunResult:
    """Read one run folder; any problem is recorded on the RunResult rather than raised."""
    name = directory.relative_to(parent_dir).as_posix() if directory != parent_dir else directory.name
    complete = (directory / utils.COMPLETE_MARKER).exists()
    params, problem = read_json_object(directory / utils.PARAMS_FILE)
    if params is None and (directory / utils.PARAMS_FILE).exists():
        return RunResult(name=name, directory=directory, params={}, metrics=None, problem=problem, complete=complete)
    metrics, problem = read_json_object(directory / metrics_file)
    if metrics is not None and not is_number(metrics.get(metric)):
        metrics, problem = None, f"broken {metrics_file}: no numeric {metric!r} (found {metrics.get(metric)!r})"
    return RunResult(name=name, directory=directory, params=params or {}, metrics=metrics, problem=problem,
                     complete=complete)


def format_value(value: Any) -> str:
    """A parameter value as shown in the table: strings bare, others as compact JSON."""
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def swept_keys(runs: list[RunResult]) -> list[str]:
    """Keys whose values differ among the runs with a params.json (a key absent from some differs), in file order."""
    runs = [run for run in runs if run.params]
    keys = list(dict.fromkeys(k for run in runs for k in run.params))
    return [k for k in keys if len({json.dumps(run.params.get(k, MISSING), sort_keys=True) for run in runs}) > 1]


def sort_runs(runs: list[RunResult], metric: str) -> list[RunResult]:
    """Runs with the metric, best first (ties by name)."""
    sign = 1 if metric in LOWER_IS_BETTER else -1
    return sorted((r for r in runs if r.metrics is not None), key=lambda r: (sign * r.metrics[metric], r.name))


def metric_columns(rows: list[RunResult], metric: str) -> list[str]:
    """The sort metric first, then the main metrics that at least one run reports."""
    present = [m for m in MAIN_METRICS if m != metric and any(is_number(r.metrics.get(m)) for r in rows)]
    return [metric, *present]


def format_metric(name: str, value: Any) -> str:
    """Rates in % with 2 decimals, integers as they are, other values with 4 significant digits."""
    if not is_number(value):
        return MISSING
    if name in RATE_METRICS:
        return f"{100 * value:.2f}"
    return str(value) if isinstance(value, int) else f"{value:.4g}"


def metric_header(name: str) -> str:
    return f"{name} %" if name in RATE_METRICS else name


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_table(headers: list[str], body: list[list[str]]) -> str:
    """A Markdown table of the given header and body cells."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in cells) + " |" for cells in body]
    return "\n".join(lines)


def markdown_table(rows: list[RunResult], keys: list[str], metrics: list[str]) -> str:
    """One Markdown table row per run: folder, swept parameters, metrics (rates in %), completion."""
    headers = ["run", *keys, *(metric_header(m) for m in metrics), "complete"]
    return render_table(headers, [
        [run.name, *(format_value(run.params[k]) if k in run.params else MISSING for k in keys),
         *(format_metric(m, run.metrics.get(m)) for m in metrics), "yes" if run.complete else "no"]
        for run in rows])


def averaged_points(rows: list[RunResult], keys: list[str], metric: str, over: str | None = None) -> list[Point]:
    """Per setting of the swept keys other than `over` (per run when over is None), in the order of its best
    run in `rows`: the metric's mean and sample standard deviation over the setting's runs."""
    others = [k for k in keys if k != over]
    groups: dict[Any, list[RunResult]] = {}
    for run in rows:
        setting = run.name if over is None else tuple(format_value(run.params.get(k, MISSING)) for k in others)
        groups.setdefault(setting, []).append(run)
    points = []
    for group in groups.values():
        values = [r.metrics[metric] for r in group if is_number(r.metrics.get(metric))]
        points.append(Point(group[0].name if over is None else f"mean over {over}",
                            {k: v for k, v in group[0].params.items() if k != over}, group,
                            statistics.fmean(values) if values else None,
                            statistics.stdev(values) if len(values) > 1 else None, len(values)))
    return points


def format_mean(name: str, point: Point) -> str:
    """Mean ± sample standard deviation (mean alone for one value), formatted as format_metric."""
    if point.mean is None:
        return MISSING
    mean = format_metric(name, point.mean)
    return mean if point.std is None else f"{mean} ± {format_metric(name, point.std)}"


def average_table(rows: list[RunResult], keys: list[str], metrics: list[str], over: str) -> str:
    """One row per setting of the swept keys other than `over`: run count, `over` values, mean ± std metrics.

    Rows keep the order of their best run in `rows` (sorted best first).
    """
    others = [k for k in keys if k != over]
    metrics = [m for m in metrics if m != "epoch"]
    columns = [averaged_points(rows, keys, m, over) for m in metrics]
    headers = [*others, "runs", over, *(metric_header(m) for m in metrics)]
    return render_table(headers, [
        [*(format_value(points[0].params.get(k, MISSING)) for k in others), str(len(points[0].runs)),
         ", ".join(format_value(r.params.get(over, MISSING)) for r in points[0].runs),
         *(format_mean(m, p) for m, p in zip(metrics, points))]
        for points in zip(*columns)])


def render_report(parent_dir: Path, runs: list[RunResult], metric: str, metrics_file: str,
                  average_over: str | None = None) -> tuple[str, list[RunResult], list[str]]:
    """The Markdown text of results.md, the sorted rows and the swept keys."""
    rows = sort_runs(runs, metric)
    keys = swept_keys(runs)
    if average_over is not None and average_over not in keys:
        raise ResultsError(f"--average_over {average_over!r} is not a parameter that differs among the runs below "
                           f"{parent_dir} (those are: {', '.join(keys) or 'none'})")
    order = "lower" if metric in LOWER_IS_BETTER else "higher"
    parts = [f"# Results: {parent_dir}", "",
             f"{len(rows)} runs sorted by {metric} ({order} is better), from {metrics_file}; rates in %.", ""]
    if rows:
        parts += [markdown_table(rows, keys, metric_columns(rows, metric)), ""]
    if rows and average_over is not None:
        parts += [f"Mean ± sample standard deviation over {average_over}:", "",
                  average_table(rows, keys, metric_columns(rows, metric), average_over), ""]
    problems = [r for r in runs if r.metrics is None]
    if problems:
        parts += ["Runs without usable results:", ""]
        parts += [f"- `{r.name}`: {r.problem}" for r in problems] + [""]
    return "\n".join(parts), rows, keys


# ----------------------------------------------------------------------------- plot

def choose_x_scale(values: list[float]) -> str:
    """'log' when all values are positive and span at least two decades, else 'linear'."""
    if not values or min(values) <= 0:
        return "linear"
    return "log" if math.log10(max(values) / min(values)) >= LOG_SCALE_DECADES else "linear"


def choose_x_key(items: list[HasParams], keys: list[str]) -> str | None:
    """The swept numeric key with the most distinct values, if plotting against it draws a line (>= 2 points)."""
    numeric = [k for k in keys if all(is_number(i.params.get(k)) for i in items)]
    for key in sorted(numeric, key=lambda k: -len({i.params[k] for i in items})):
        if any(len(group) >= 2 for group in group_lines(items, key, keys).values()):
            return key
    return None


def group_lines(items: list[Item], x_key: str, keys: list[str]) -> dict[str, list[Item]]:
    """Items per setting of the keys other than x_key (labelled `key=value, ...`), each group sorted by x."""
    groups: dict[str, list[Item]] = {}
    for item in items:
        label = ", ".join(f"{k}={format_value(item.params.get(k, MISSING))}" for k in keys if k != x_key)
        groups.setdefault(label, []).append(item)
    return {label: sorted(group, key=lambda i: i.params[x_key]) for label, group in groups.items()}


def plot_results(rows: list[RunResult], keys: list[str], metric: str, title: str, path: Path,
                 over: str | None = None) -> Figure:
    """Write results.png and return its (closed) figure: the metric versus the swept value (lines), or one bar
    per run; with `over`, the mean ± sample std over it, one point per setting of the other swept keys."""
    points = averaged_points(rows, keys, metric, over)
    keys = [k for k in keys if k != over]
    scale = 100 if metric in RATE_METRICS else 1

    def means(ps: list[Point]) -> list[float]:
        return [p.mean * scale for p in ps]

    def errors(ps: list[Point]) -> list[float] | None:
        return None if over is None else [(p.std or 0.0) * scale for p in ps]

    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    x_key = choose_x_key(points, keys)
    if x_key is not None:
        groups = group_lines(points, x_key, keys)
        for group, line in groups.items():
            ax.errorbar([p.params[x_key] for p in line], means(line), errors(line), marker="o", capsize=4,
                        label=group or None)
        xs = sorted({p.params[x_key] for p in points})
        ax.set_xscale(choose_x_scale(xs))
        if ax.get_xscale() == "linear" and all(isinstance(x, int) for x in xs):
            ax.set_xticks(xs)
        ax.set_xlabel(x_key)
        if len(groups) > 1:
            ax.legend(fontsize="small")
    else:
        names = [", ".join(format_value(p.params.get(k, MISSING)) for k in keys) or p.name for p in points]
        bars = ax.bar(range(len(points)), means(points), yerr=errors(points), capsize=4)
        ax.bar_label(bars, [format_mean(metric, p) for p in points], fontsize="small",
                     label_type="edge" if over is None else "center")
        ax.set_xticks(range(len(points)), names, rotation=30, ha="right", fontsize="small")
        ax.set_xlabel(", ".join(keys) or "run")
    ax.set_ylabel(f"{metric} (%)" if metric in RATE_METRICS else metric)
    if over is not None:
        counts = sorted({p.n for p in points})
        n = str(counts[0]) if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"
        title = f"{title}\n{metric}: mean ± std over {over} (n={n})"
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    utils.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)
    return fig


# ----------------------------------------------------------------------------- TensorBoard HParams

def hparams_dir(parent_dir: Path, runs: list[RunResult]) -> Path:
    """<parent_dir>/hparams, which write_hparams clears; a ResultsError if a run lies inside it."""
    path = parent_dir / HPARAMS_DIR
    if any(r.directory == path or path in r.directory.parents for r in runs):
        raise ResultsError(f"{path} holds runs, but this script rewrites that folder: rename it")
    return path


def hparam_value(value: Any) -> int | float | str:
    """Numbers as they are, anything else as in the table (torch would turn bools into 1.0 / 0.0)."""
    return value if is_number(value) else format_value(value)


def write_hparams(directory: Path, rows: list[RunResult], keys: list[str]) -> None:
    """Replace `directory` by TensorBoard HParams event files: one run per row, named by its folder. A link, file or
    FIFO at its name is removed (a link's target is untouched)."""
    if directory.is_dir() and not directory.is_symlink():
        shutil.rmtree(directory)
    elif os.path.lexists(directory):
        directory.unlink()
    with SummaryWriter(str(directory)) as writer:
        for run in rows:
            writer.add_hparams({k: hparam_value(run.params.get(k, MISSING)) for k in keys},
                               {m: run.metrics[m] for m in MAIN_METRICS if is_number(run.metrics.get(m))},
                               run_name=run.name)


# ----------------------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    parser = utils.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parent_dir", required=True, help="folder whose runs to collect")
    parser.add_argument("--metric", default="miou", help="metrics key to sort and plot by (default: miou)")
    parser.add_argument("--metrics_file", default=utils.METRICS_BEST,
                        help=f"file name to collect (default: {utils.METRICS_BEST}; or {utils.METRICS_LAST})")
    parser.add_argument("--average_over", default=None, metavar="KEY",
                        help="also tabulate and plot mean ± std over runs that differ only in this parameter "
                             "(e.g. seed)")
    return parser


def collect(parent_dir: Path, metric: str, metrics_file: str) -> list[RunResult]:
    """Every run below parent_dir; a ResultsError when there is none or no metrics file has the metric."""
    if not parent_dir.is_dir():
        raise ResultsError(f"{parent_dir} is not a folder")
    runs = [load_run(d, parent_dir, metrics_file, metric) for d in find_run_dirs(parent_dir, metrics_file)]
    if not runs:
        raise ResultsError(f"no runs below {parent_dir} (no {metrics_file} or child {utils.PARAMS_FILE})")
    readable = [m for m in (read_json_object(r.directory / metrics_file)[0] for r in runs) if m is not None]
    if readable and all(r.metrics is None for r in runs):
        available = sorted({k for m in readable for k, v in m.items() if is_number(v)})
        raise ResultsError(f"no {metrics_file} below {parent_dir} has a numeric {metric!r}; "
                           f"numeric keys found: {', '.join(available)}")
    return runs


def main(argv: Sequence[str] | None = None) -> int:
    """Print and write results.md, results.png and the HParams event files; 0 on success, 2 on bad input."""
    args = build_parser().parse_args(argv)
    return utils.run_cli(lambda: synthesize(args))


def synthesize(args: argparse.Namespace) -> int:
    parent_dir = Path(args.parent_dir)
    runs = collect(parent_dir, args.metric, args.metrics_file)
    text, rows, keys = render_report(parent_dir, runs, args.metric, args.metrics_file, args.average_over)
    hparams = hparams_dir(parent_dir, runs)
    utils.check_output_names([parent_dir / RESULTS_TABLE, parent_dir / RESULTS_PLOT])
    print(text)
    utils.write_text(parent_dir / RESULTS_TABLE, text)
    if not rows:
        print(f"wrote {parent_dir / RESULTS_TABLE}; no results to plot")
        return 0
    plot_results(rows, keys, args.metric, str(parent_dir), parent_dir / RESULTS_PLOT, args.average_over)
    write_hparams(hparams, rows, keys)
    print(f"wrote {parent_dir / RESULTS_TABLE}, {parent_dir / RESULTS_PLOT} and TensorBoard HParams for {len(rows)} "
          f"runs in {hparams}/; view them with: tensorboard --logdir {shlex.quote(str(hparams))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
