"""`gapm matrix report`: an experiment matrix as one table — every metric of every row as the
mean ± sample standard deviation over its seeds — next to what each row cost: optimizer updates
per network, training wall-clock, and FLOPs per iteration of each stage.

Updates and FLOPs are counted, not estimated: one iteration of each stage of the row's model
(built from its config) runs under torch's FLOP counter with an `update` that counts its calls
and steps nothing. Updates per network = calls per iteration × the stage's iterations.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from gapm import build_model, is_image_shape
from pipeline import checkpoints
from pipeline.config import ExperimentConfig, load_config, method_hyperparameters
from pipeline.data.sources import held_out_data
from pipeline.eval import paper_figures
from pipeline.matrix import (
    ELEMENT_RECORD,
    EVAL_RECORD,
    Element,
    MatrixConfig,
    expand,
    final_checkpoint,
    run_dir,
)


@dataclass
class RowCost:
    updates: dict[str, int]  # network -> optimizer updates over the whole training
    flops_per_iteration: dict[int, float]  # stage -> FLOPs of one iteration (forward + backward)
    steps: dict[int, int]  # stage -> iterations


@dataclass
class Row:
    name: str
    settings: tuple[tuple[str, Any], ...]
    seeds: list[int] = field(default_factory=list)
    metrics: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    train_seconds: list[float] = field(default_factory=list)
    cost: RowCost | None = None


def count_cost(config: ExperimentConfig) -> RowCost:
    """Counts the updates and FLOPs of one iteration of each stage on a batch of the config's shape."""
    torch.manual_seed(0)
    model = build_model(config.model.kind, config.model.shape(), **method_hyperparameters(config))
    batch = torch.rand(config.data.batch_size, *config.model.data_shape) * 2 - 1
    updates: dict[str, int] = {}
    flops: dict[int, float] = {}
    steps = {1: config.stage1.steps, 2: config.stage2.steps}
    for stage, names in enumerate(model.stages, start=1):
        calls: dict[str, int] = defaultdict(int)

        def update(name: str, loss: torch.Tensor, calls=calls) -> None:
            loss.backward()
            calls[name] += 1
            getattr(model, name).zero_grad(set_to_none=True)

        for name, network in ((n, getattr(model, n)) for stage_names in model.stages for n in stage_names):
            network.train(name in names)
        with FlopCounterMode(display=False) as counter:
            model.stage_step(stage, {name: getattr(model, name) for name in names}, batch, update)
        flops[stage] = float(counter.get_total_flops())
        for name in names:
            updates[name] = calls[name] * steps[stage]
    return RowCost(updates, flops, {stage: steps[stage] for stage in flops})


def collect(matrix: MatrixConfig) -> list[Row]:
    rows: dict[str, Row] = {}
    for element in expand(matrix):
        row = rows.setdefault(element.row, Row(element.row, element.settings))
        directory = run_dir(matrix, element)
        evaluated = _read(directory / EVAL_RECORD).get("metrics", {})
        trained = _read(directory / "metrics.json")
        if not evaluated and not trained:
            continue
        row.seeds.append(element.seed)
        for key, value in {**trained, **evaluated}.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                row.metrics[key].append(float(value))
        seconds = _read(directory / ELEMENT_RECORD).get("train_seconds")
        if seconds is not None:
            row.train_seconds.append(float(seconds))
        if row.cost is None:
            row.cost = count_cost(element_config(element))
    return list(rows.values())


def element_config(element: Element) -> ExperimentConfig:
    return load_config(element.config, list(element.overrides))


def _read(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def format_mean_std(values: list[float], digits: int) -> str:
    if not values:
        return ""
    mean, std = mean_std(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def _digits(values: list[float]) -> int:
    """Decimals that show two significant digits of the spread (three of the mean without one)."""
    mean, std = mean_std(values)
    if std > 0:
        return max(0, min(6, 1 - math.floor(math.log10(std))))
    return max(0, min(6, 2 - math.floor(math.log10(abs(mean))))) if mean else 1


def write_matrix_report(matrix: MatrixConfig, metric_keys: list[str] | None, out: Path) -> dict[str, Path]:
    """<out>/<matrix name>.md and .csv; `metric_keys`: the metric columns (default: every
    evaluation metric the rows have)."""
    rows = [row for row in collect(matrix) if row.seeds]
    keys = metric_keys or sorted({k for row in rows for k in row.metrics if k.startswith("eval/")})
    networks = sorted({n for row in rows if row.cost for n in row.cost.updates})
    header = ["row", "seeds", *keys, "train seconds", *(f"updates {n}" for n in networks),
              "GFLOPs/iteration stage 1", "GFLOPs/iteration stage 2"]
    table = []
    for row in rows:
        cost = row.cost
        table.append([
            row.name, ",".join(str(s) for s in row.seeds),
            *(format_mean_std(row.metrics.get(k, []), _digits(row.metrics[k])) if row.metrics.get(k) else "" for k in keys),
            format_mean_std(row.train_seconds, 0),
            *(f"{cost.updates[n]:,}" if cost and n in cost.updates else "" for n in networks),
            *(f"{cost.flops_per_iteration[s] / 1e9:.4g}" if cost and s in cost.flops_per_iteration else ""
              for s in (1, 2))])
    out.mkdir(parents=True, exist_ok=True)
    markdown = out / f"{matrix.name}.md"
    legend = ("Mean ± sample standard deviation over the seeds listed; train seconds are wall-clock over all "
              "launches of the element (machine in each run's matrix-element.json); updates are optimizer steps "
              "per network over the whole training; GFLOPs count one iteration (forward and backward) of the "
              "stage on one batch.")
    lines = [f"# {matrix.name}", "", legend, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in table]
    markdown.write_text("\n".join(lines) + "\n")
    csv_path = out / f"{matrix.name}.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(table)
    written = {"markdown": markdown, "csv": csv_path}
    figure = write_matrix_figures(matrix, out / f"{matrix.name}-figures.png")
    if figure is not None:
        written["figures"] = figure
    return written


def write_matrix_figures(matrix: MatrixConfig, path: Path) -> Path | None:
    """The paper's panels (pipeline/eval/paper_figures.py) for the first trained seed of each row."""
    models, config = {}, None
    for element in expand(matrix):
        directory = run_dir(matrix, element)
        if element.row in models or not (directory / "metrics.json").is_file() \
                or checkpoints.latest_checkpoint(directory / "checkpoints") is None:
            continue
        model, _ = checkpoints.load_model(final_checkpoint(directory))
        models[element.row] = model
        config = config or element_config(element)
    if not models:
        return None
    shape = list(config.model.data_shape)
    count = paper_figures.RECONSTRUCTED + 2 * paper_figures.PAIRS if is_image_shape(shape) else 2000
    held_out = held_out_data(config.data, config.seed, count, shape)
    paper_figures.save_comparison(models, held_out, path)
    return path
