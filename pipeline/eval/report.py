"""`gapm report`: one table (Markdown and CSV) and one figure grid per MLflow experiment, so
the paper's comparison tables can be reproduced side by side from tracked runs."""

from __future__ import annotations

import csv
import io
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient
from PIL import Image, ImageDraw

from pipeline.errors import GapmError

log = logging.getLogger(__name__)

# The metric columns: metric key, header, format, scale (the value shown is value x scale) and
# what the number is. A column appears when some run has the metric (FID and KID once an
# evaluation job has logged them on the runs).
@dataclass(frozen=True)
class MetricColumn:
    key: str
    header: str
    fmt: str
    meaning: str
    scale: float = 1.0


METRIC_COLUMNS = [
    MetricColumn("eval/reconstruction_mse", "reconstruction MSE", "{:.4f}",
                 "mean squared error of the reconstructions of the held-out data at the end of training "
                 "(images: pixels in [0, 1])"),
    MetricColumn("eval/sample_nearest_distance", "sample→data distance", "{:.4f}",
                 "mean Euclidean distance from each generated point to its nearest held-out point: are the "
                 "samples on the data?"),
    MetricColumn("eval/sample_mmd", "sample MMD", "{:.4f}",
                 "squared MMD between generated and held-out points (sum of Gaussian kernels, bandwidths "
                 "0.02-0.5): coverage and proportions"),
    MetricColumn("eval/roll_parameter_tv", "roll coverage TV", "{:.3f}",
                 "total variation between the histograms (20 bins) of generated and held-out points over the "
                 "position along the roll of their nearest roll point: 0 = the samples cover the roll in the "
                 "data's proportions (an ideal sampler scores about 0.04 at 5000 samples)"),
    MetricColumn("eval/off_roll_fraction", "off-roll", "{:.1%}",
                 "fraction of generated points farther than 0.05 from the roll"),
    MetricColumn("eval/relative_reconstruction_mse", "relative reconstruction MSE", "{:.4f}",
                 "reconstruction MSE of the held-out points divided by their variance"),
    MetricColumn("eval/fid", "FID", "{:.1f}",
                 "FID of the generated images (clean-fid) at the newest evaluated checkpoint, against the "
                 "reference statistics the evaluation job names"),
    MetricColumn("eval/kid", "KID ×1000", "{:.2f}", "KID of the same samples, multiplied by 1000 as usually "
                 "reported (MLflow holds the raw value)", scale=1000.0),
    MetricColumn("eval/test_reconstruction_mse", "test reconstruction MSE", "{:.4f}",
                 "mean squared error of the reconstructions of the whole test split, pixels in [0, 1] "
                 "(evaluation job)"),
]
RUN_COLUMNS = [
    ("run", "the MLflow run name (the config's `name`); the newest finished run of each name"),
    ("method", "`model.kind`: gapm or a baseline"),
    ("world size", "processes that trained the run (its `world_size` tag); each step saw world size × batch "
                   "samples"),
    ("batch", "`data.batch_size`, per process"),
    ("steps", "training iterations: stage 1 + stage 2 (the baselines train one stage)"),
]
FIGURE_NAMES = ("figure4.png", "samples.png")


class ReportError(GapmError):
    """No experiment or no finished runs to report on."""


def experiment_runs(client: MlflowClient, experiment: str, run_names: list[str] | None = None) -> list:
    """The newest finished run of each method/config name in `experiment` (only `run_names`, in
    that order, when given)."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise ReportError(f"MLflow at {mlflow.get_tracking_uri()} has no experiment {experiment!r}; "
                          "check MLFLOW_TRACKING_URI and tracking.experiment in the configs")
    runs = client.search_runs([found.experiment_id], filter_string="attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"])
    newest: dict[str, object] = {}
    for run in runs:
        newest.setdefault(run.info.run_name or run.info.run_id, run)
    if not newest:
        raise ReportError(f"experiment {experiment!r} has no finished runs yet")
    if run_names:
        missing = [name for name in run_names if name not in newest]
        if missing:
            raise ReportError(f"experiment {experiment!r} has no finished run named {', '.join(missing)}; "
                              f"its runs: {', '.join(sorted(newest))}")
        return [newest[name] for name in run_names]
    return sorted(newest.values(), key=lambda r: (r.data.params.get("model.kind") != "gapm", r.info.run_name))


def present_columns(runs: list) -> list[MetricColumn]:
    return [c for c in METRIC_COLUMNS if any(c.key in r.data.metrics for r in runs)]


def table_rows(runs: list) -> tuple[list[str], list[list[str]]]:
    present = present_columns(runs)
    header = [name for name, _ in RUN_COLUMNS] + [c.header for c in present]
    rows = []
    for run in runs:
        params = run.data.params
        steps = int(params.get("stage1.steps", 0)) + (int(params.get("stage2.steps", 0))
                                                       if params.get("model.kind", "gapm") == "gapm" else 0)
        row = [run.info.run_name, params.get("model.kind", "gapm"), run.data.tags.get("world_size", "?"),
               params.get("data.batch_size", "?"), str(steps)]
        for column in present:
            value = run.data.metrics.get(column.key)
            row.append(column.fmt.format(value * column.scale) if value is not None else "")
        rows.append(row)
    return header, rows


def column_legend(runs: list) -> str:
    """What each column of the table is (Markdown list)."""
    lines = [f"- **{name}**: {meaning}" for name, meaning in RUN_COLUMNS]
    lines += [f"- **{c.header}** (`{c.key}`{f' × {c.scale:g}' if c.scale != 1 else ''}): {c.meaning}; lower is better"
              for c in present_columns(runs)]
    return "Columns:\n\n" + "\n".join(lines) + "\n"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def figure_grid(client: MlflowClient, runs: list, columns: int = 1) -> Image.Image | None:
    """Each run's main figure, stacked with its name above it."""
    panels = []
    with tempfile.TemporaryDirectory() as scratch:
        for run in runs:
            names = {a.path for a in client.list_artifacts(run.info.run_id)}
            name = next((n for n in FIGURE_NAMES if n in names), None)
            if name is None:
                log.warning("run %s has no figure (%s)", run.info.run_name, " or ".join(FIGURE_NAMES))
                continue
            local = client.download_artifacts(run.info.run_id, name, scratch)
            panels.append((run.info.run_name, Image.open(local).convert("RGB")))
    if not panels:
        return None
    width = max(image.width for _, image in panels)
    label = 20
    grid = Image.new("RGB", (width, sum(image.height + label for _, image in panels)), "white")
    draw, top = ImageDraw.Draw(grid), 0
    for title, image in panels:
        draw.text((8, top + 4), title, fill="black")
        grid.paste(image, (0, top + label))
        top += image.height + label
    return grid


def write_report(experiment: str, out_dir: Path, run_names: list[str] | None = None,
                 name: str | None = None) -> dict[str, Path]:
    """Writes OUT/NAME.md, .csv and -figures.png (NAME: the experiment's unless given); returns
    their paths. `run_names` picks runs of the experiment (default: all, newest of each name)."""
    client = MlflowClient()
    runs = experiment_runs(client, experiment, run_names)
    header, rows = table_rows(runs)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = name or experiment
    written = {"markdown": out_dir / f"{name}.md", "csv": out_dir / f"{name}.csv"}
    written["markdown"].write_text(f"# {name}\n\n" + markdown_table(header, rows) + "\n" + column_legend(runs))
    buffer = io.StringIO()
    csv.writer(buffer).writerows([header, *rows])
    written["csv"].write_text(buffer.getvalue())
    grid = figure_grid(client, runs)
    if grid is not None:
        written["figures"] = out_dir / f"{name}-figures.png"
        grid.save(written["figures"])
    return written
