"""Run metrics: a JSONL file (the record of truth), optional W&B / TensorBoard sinks, a progress
bar, and plots.

Every sink takes plain dicts: `logger.log({"kind": "train", "step": 3, "loss": 1.2, ...})`.
`JSONLLogger` writes one JSON object per line and flushes each call, so `tail -f` works while a
run goes. Non-finite floats are written as the strings "nan", "inf" and "-inf" (strict JSON has no
spelling for them). A resumed run appends to the same file, so a step may appear twice; readers
(and `plot_metrics`) keep the last record of each (kind, step).

`plot_metrics(run_dir_or_jsonl, out_png)` draws every known numeric key that the file holds (loss,
validation loss, learning rate, gradient norm, throughput, accuracy, RL rewards and staleness...),
one panel per group; `rollouts plot RUN_DIR` is the same from the command line.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "PANEL_Y_LABELS",
    "PLOT_PANELS",
    "JSONLLogger",
    "MetricsLogger",
    "MultiLogger",
    "ProgressBar",
    "TensorBoardLogger",
    "WandbLogger",
    "plot_grad_flow",
    "plot_metrics",
    "read_metrics",
]

METRICS_FILE_NAME = "metrics.jsonl"

# Panel title -> the keys drawn in it, in order. Keys absent from a run are skipped, and so are
# panels left empty; the RL keys appear as soon as an RL run logs them.
PLOT_PANELS: dict[str, tuple[str, ...]] = {
    "loss": ("loss", "val_loss"),
    "perplexity": ("val_perplexity",),
    "learning rate": ("lr",),
    "gradient norm": ("grad_norm",),
    "throughput (tokens/s)": ("tokens_per_s",),
    "accuracy": (
        "accuracy",
        "train_accuracy",
        "val_accuracy",
        "held_out_accuracy",
        "eval_accuracy",
    ),
    "reward": ("reward_mean", "reward_std"),
    "groups": ("frac_all_correct", "frac_all_wrong", "frac_mixed"),
    "staleness (versions)": ("staleness_mean", "staleness_max"),
    "sampler/trainer KL": ("sampler_trainer_kl", "kl_sampler_trainer", "mismatch_kl"),
    "entropy": ("entropy",),
    "clip fraction": ("clip_fraction",),
    "time per step (s)": ("sample_time_s", "train_time_s"),
    "sampling and training at once": ("overlap_frac",),
    "memory (MB)": ("rss_mb", "cuda_allocated_mb", "cuda_reserved_mb", "cuda_peak_mb"),
}


@runtime_checkable
class MetricsLogger(Protocol):
    """Anything with `log(record)` and `close()`."""

    def log(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class JSONLLogger:
    """Appends one JSON object per `log` call to `path`, flushed at once."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())

    def log(self, record: dict[str, Any]) -> None:
        if self._file.closed:
            raise RuntimeError(f"JSONLLogger({self.path}) is closed")
        line = {"time": time.time(), **{k: _json_safe(v) for k, v in record.items()}}
        self._file.write(json.dumps(line, allow_nan=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> JSONLLogger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    return value


class MultiLogger:
    """Sends each record to every sink (e.g. JSONL plus W&B)."""

    def __init__(self, *sinks: MetricsLogger) -> None:
        self.sinks = sinks

    def log(self, record: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.log(record)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


class WandbLogger:
    """Weights & Biases sink (the `wandb` extra): numeric values at the record's `step`."""

    def __init__(self, project: str, run_name: str | None = None, config: dict | None = None):
        try:
            import wandb
        except ImportError as error:
            raise ImportError(
                "WandbLogger needs wandb: pip install 'rollouts[wandb]' (or pip install wandb)"
            ) from error
        self._run = wandb.init(project=project, name=run_name, config=config)

    def log(self, record: dict[str, Any]) -> None:
        values = {k: v for k, v in record.items() if _is_number(v) and k != "step"}
        self._run.log(values, step=record.get("step"))

    def close(self) -> None:
        self._run.finish()


class TensorBoardLogger:
    """TensorBoard sink (the `tensorboard` extra): one scalar per numeric key, prefixed by kind."""

    def __init__(self, log_dir: str | Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:
            raise ImportError(
                "TensorBoardLogger needs tensorboard: pip install 'rollouts[tensorboard]' "
                "(or pip install tensorboard)"
            ) from error
        self._writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, record: dict[str, Any]) -> None:
        step = record.get("step", 0)
        prefix = str(record.get("kind", "metrics"))
        for key, value in record.items():
            if _is_number(value) and key != "step":
                self._writer.add_scalar(f"{prefix}/{key}", value, global_step=step)

    def close(self) -> None:
        self._writer.close()


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


LINES_PER_RUN = 20  # without a terminal: about this many progress lines per run


class ProgressBar:
    """A tqdm bar over optimizer steps in a terminal; without one (a log file, CI, a batch job),
    a line on `log` every `line_every_steps` steps (default: about 20 per run) and at the end.
    Silent when disabled."""

    def __init__(
        self,
        total: int,
        initial: int = 0,
        enabled: bool = True,
        *,
        log: Any = None,
        line_every_steps: int | None = None,
        name: str = "step",
    ) -> None:
        from tqdm.auto import tqdm

        in_terminal = sys.stderr.isatty()
        self._bar = tqdm(
            total=total,
            initial=initial,
            unit="step",
            dynamic_ncols=True,
            disable=not (enabled and in_terminal),
        )
        self._log = log if enabled and not in_terminal else None
        self._every = line_every_steps or max(1, total // LINES_PER_RUN)
        self._total, self._name = total, name

    def update(self, step: int, postfix: dict[str, float]) -> None:
        self._bar.n = step
        self._bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)
        self._bar.refresh()
        if self._log is not None and (step % self._every == 0 or step == self._total):
            figures = ", ".join(f"{k} {v:.4g}" for k, v in postfix.items())
            self._log.info("%s %d/%d: %s", self._name, step, self._total, figures)

    def close(self) -> None:
        self._bar.close()


def read_metrics(run_dir_or_jsonl: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics file (or of `RUN_DIR/metrics.jsonl`), last record per step kept."""
    path = Path(run_dir_or_jsonl)
    if path.is_dir():
        path = path / METRICS_FILE_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file at {path} (expected a JSONL file or a run dir)")
    by_key: dict[tuple[Any, Any], dict[str, Any]] = {}
    unkeyed: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if number == _count_lines(path):  # a run killed mid-write leaves a torn last line
                    break
                raise ValueError(f"{path} line {number}: not valid JSON: {line[:80]!r}") from None
            if "step" in record:
                by_key[(record.get("kind"), record["step"])] = record
            else:
                unkeyed.append(record)
    return sorted(by_key.values(), key=lambda r: (r["step"], str(r.get("kind")))) + unkeyed


def _count_lines(path: Path) -> int:
    with open(path, encoding="utf-8") as handle:
        return sum(1 for _ in handle)


# The y-axis label of each panel (the x-axis is the optimizer step).
PANEL_Y_LABELS: dict[str, str] = {
    "loss": "loss (nats per token)",
    "perplexity": "perplexity",
    "learning rate": "learning rate",
    "gradient norm": "global norm, before clipping",
    "throughput (tokens/s)": "tokens/s",
    "accuracy": "fraction correct",
    "reward": "reward",
    "groups": "fraction of groups",
    "staleness (versions)": "versions behind",
    "sampler/trainer KL": "nats",
    "entropy": "nats",
    "clip fraction": "fraction of tokens",
    "time per step (s)": "seconds",
    "sampling and training at once": "fraction of wall time",
    "memory (MB)": "MB",
}
THROUGHPUT_WARMUP_STEPS = 2  # a run's first steps include start-up work: left out of throughput


def plot_metrics(
    run_dir_or_jsonl: str | Path | Sequence[str | Path],
    out_png: str | Path | None = None,
    panels: dict[str, Sequence[str]] | None = None,
) -> Path:
    """Draw every known numeric key of one run (or of several, overlaid) against the step;
    return the PNG.

    Each panel has axis labels; the figure is titled with the run names (their directory names).
    Throughput leaves out each run's first `THROUGHPUT_WARMUP_STEPS` steps, so one start-up
    spike does not flatten the panel. `out_png` defaults to `metrics.png` beside the (first)
    metrics file, or `compare.png` there for several runs; `panels` replaces `PLOT_PANELS`.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    sources = [Path(run_dir_or_jsonl)] if isinstance(run_dir_or_jsonl, str | Path) else [
        Path(source) for source in run_dir_or_jsonl
    ]  # fmt: skip
    if not sources:
        raise ValueError("plot_metrics needs at least one run directory or metrics file")
    runs = {_run_name(source): read_metrics(source) for source in sources}
    series = {name: _series(records, panels or PLOT_PANELS) for name, records in runs.items()}
    titles = list(dict.fromkeys(t for per_run in series.values() for t in per_run))
    if not titles:
        keys = sorted({k for records in runs.values() for k in _keys(records)})
        raise ValueError(f"{', '.join(map(str, sources))}: no plottable metric (keys {keys})")
    columns = 2 if len(titles) > 1 else 1
    rows = math.ceil(len(titles) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(6 * columns, 3 * rows), squeeze=False)
    for axis, title in zip(axes.flat, titles, strict=False):
        _draw_panel(axis, title, {name: per_run.get(title, {}) for name, per_run in series.items()})
    for axis in list(axes.flat)[len(titles) :]:
        axis.set_visible(False)
    figure.suptitle(" vs ".join(runs))
    figure.tight_layout()
    default_name = "metrics.png" if len(sources) == 1 else "compare.png"
    first = sources[0]
    out = Path(out_png) if out_png else (first if first.is_dir() else first.parent) / default_name
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out


def _run_name(source: Path) -> str:
    directory = source if source.is_dir() else source.parent
    return directory.resolve().name


def _draw_panel(
    axis: Any, title: str, curves_by_run: dict[str, dict[str, tuple[list[float], list[float]]]]
) -> None:
    several = len(curves_by_run) > 1
    drawn: dict[str, tuple[list[float], list[float]]] = {}
    for run, curves in curves_by_run.items():
        for key, (steps, values) in curves.items():
            if title.startswith("throughput"):
                steps, values = steps[THROUGHPUT_WARMUP_STEPS:], values[THROUGHPUT_WARMUP_STEPS:]
            marker = "o" if len(steps) < 30 else None
            label = f"{run}: {key}" if several else key
            axis.plot(steps, values, label=label, marker=marker, markersize=3)
            drawn[label] = (steps, values)
    axis.set_title(title)
    axis.set_xlabel("step")
    axis.set_ylabel(PANEL_Y_LABELS.get(title, title))
    if title in ("loss", "perplexity", "gradient norm") and _all_positive(drawn):
        axis.set_yscale("log")
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)


def _series(
    records: list[dict[str, Any]], panels: dict[str, Sequence[str]]
) -> dict[str, dict[str, tuple[list[float], list[float]]]]:
    series: dict[str, dict[str, tuple[list[float], list[float]]]] = {}
    for title, keys in panels.items():
        curves = {}
        for key in keys:
            points = [
                (r["step"], r[key]) for r in records if _is_number(r.get(key)) and "step" in r
            ]
            if points:
                curves[key] = ([float(s) for s, _ in points], [float(v) for _, v in points])
        if curves:
            series[title] = curves
    return series


def _all_positive(curves: dict[str, tuple[list[float], list[float]]]) -> bool:
    return all(v > 0 for _, values in curves.values() for v in values)


def _keys(records: list[dict[str, Any]]) -> list[str]:
    return sorted({key for record in records for key in record})


GRAD_FLOW_FILE_NAME = "grad_flow.png"


def plot_grad_flow(run_dir_or_jsonl: str | Path, out_png: str | Path | None = None) -> Path | None:
    """Each layer's gradient norm (the `grad_norms` records a run writes with
    `grad_norms_every_steps`) against the step, log scale, shallow layers light and deep ones
    dark; None when the run logged none. `out_png` defaults to `grad_flow.png` beside the file."""
    records = [r for r in read_metrics(run_dir_or_jsonl) if r.get("kind") == "grad_norms"]
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(dict.fromkeys(layer for r in records for layer in r["layers"]))
    colours = plt.get_cmap("viridis")
    figure, axes = plt.subplots(figsize=(9, 5))
    for position, layer in enumerate(layers):
        points = [(r["step"], r["layers"][layer]) for r in records if layer in r["layers"]]
        steps, norms = zip(*points, strict=True)
        shade = colours(position / max(1, len(layers) - 1))
        axes.plot(steps, norms, color=shade, label=layer, linewidth=1.2)
    axes.set_yscale("log")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("gradient norm per layer, before clipping")
    axes.set_title(f"gradient flow: {_run_name(Path(run_dir_or_jsonl))}")
    axes.legend(fontsize=6, ncol=max(1, len(layers) // 12), loc="upper right")
    figure.tight_layout()
    source = Path(run_dir_or_jsonl)
    out = Path(out_png) if out_png else (source if source.is_dir() else source.parent)
    out = out / GRAD_FLOW_FILE_NAME if out.is_dir() else out
    figure.savefig(out, dpi=120)
    plt.close(figure)
    return out
