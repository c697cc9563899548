"""Every dataset x seed x fold of a config, planned into programs, trained, and tabulated.

The runs of a config that share a class count and an example shape (every seed and fold of a
dataset, and several datasets when their shapes agree) form one *program*: they train
together, vmapped over a ``runs`` axis (:mod:`train.loop`), at most ``runs_per_program`` at a
time (0: all). A program's checkpoints live in ``<workdir>/programs/<name>/checkpoints``; each
run keeps its own folder ``<workdir>/<dataset>/seed<s>_fold<k>/`` (:mod:`train.artefacts`).
A program whose runs all have a record is read back, not retrained.
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys
from typing import Any

import jax
import ml_collections
import numpy as np

from data import pipeline
from gaam_jax import sharding, storage
from train import artefacts, feeds, loop, report
from train import config as config_lib
from train.runs import CONFIG, RECORD, RunRecord, run_folder, write_json_atomic
from train.splits import DatasetFolds, open_folds
from train.steps import Steps


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One run of a program.

    Attributes:
      dataset: the dataset's name in the config.
      seed: initialisation and data-order seed.
      fold: 1-based fold (1 for a held-out split).
      column: its column in the results table (``F3``, ``R2``, ``s1F3``).
      run: 1-based index of the run in its table row (folds for k-fold; seeds for holdout).
      train: training examples, as indices into the program's source.
      val: validation examples, likewise.
    """

    dataset: str
    seed: int
    fold: int
    column: str
    run: int
    train: np.ndarray
    val: np.ndarray

    @property
    def folder(self) -> pathlib.Path:
        """The run's folder relative to the workdir."""
        return run_folder(self.dataset, self.seed, self.fold)

    @property
    def name(self) -> str:
        """``"toy seed 0 fold 2"``."""
        return f"{self.dataset} seed {self.seed} fold {self.fold}"


@dataclasses.dataclass(frozen=True)
class Program:
    """Runs that train as one vmapped program.

    Attributes:
      name: its folder under ``<workdir>/programs``.
      datasets: the datasets its runs read (one source, concatenated in this order).
      runs: the runs, in dataset, seed, fold order.
    """

    name: str
    datasets: tuple[DatasetFolds, ...]
    runs: tuple[RunSpec, ...]

    @property
    def key(self) -> tuple:
        """``(num_classes, input_shape)``: programs with the same key share compiled steps."""
        return self.datasets[0].num_classes, self.datasets[0].input_shape

    def source(self) -> Any:
        """The examples of every dataset of the program, one after another."""
        return pipeline.concatenate([d.source for d in self.datasets])

    def plan(self) -> feeds.Plan:
        """What the feeds need of the runs."""
        return feeds.Plan(
            train=tuple(r.train for r in self.runs),
            val=tuple(r.val for r in self.runs),
            seeds=tuple(r.seed for r in self.runs),
            names=tuple(r.name for r in self.runs),
        )


def column_name(config: ml_collections.ConfigDict, seed: int, fold: int) -> str:
    """``F<k>`` for folds, ``R<i>`` for the seeded runs of a holdout split, ``s<seed>F<k>``."""
    if config.cv.kind == "holdout":
        return f"R{list(config.seeds).index(seed) + 1}"
    return f"F{fold}" if len(config.seeds) == 1 else f"s{seed}F{fold}"


def plan_programs(config: ml_collections.ConfigDict, datasets: list[DatasetFolds]) -> list[Program]:
    """Groups the runs of every dataset by shape into programs of at most ``runs_per_program``."""
    groups: dict[tuple, list[DatasetFolds]] = {}
    for d in datasets:
        groups.setdefault((d.num_classes, d.input_shape), []).append(d)
    holdout = config.cv.kind == "holdout"
    programs = []
    for members in groups.values():
        runs, offset = [], 0
        for d in members:
            for seed in config.seeds:
                for fold, (tr, va) in enumerate(d.folds, start=1):
                    index = list(config.seeds).index(seed) + 1 if holdout else fold
                    column = column_name(config, seed, fold)
                    tr, va = tr + offset, va + offset
                    runs.append(RunSpec(d.name, seed, fold, column, index, tr, va))
            offset += len(d.source)
        size = config_lib.setting(config, "runs_per_program") or len(runs)
        chunks = [runs[i : i + size] for i in range(0, len(runs), size)]
        base = "+".join(d.name for d in members)
        for i, chunk in enumerate(chunks):
            name = base if len(chunks) == 1 else f"{base}-{i + 1}of{len(chunks)}"
            programs.append(Program(name, tuple(members), tuple(chunk)))
    return programs


def run(
    config: ml_collections.ConfigDict,
    workdir: str | pathlib.Path,
    *,
    datasets: list[DatasetFolds] | None = None,
    progress: bool = True,
    hooks: loop.Hooks | None = None,
    make_steps: Any = Steps,
) -> dict:
    """Trains every dataset x seed x fold of ``config`` (skipping finished runs) and reports.

    With a ``mesh`` entry in the config (e.g. ``{'runs': -1}`` or ``{'data': -1, 'model': 2}``)
    every program is sharded over that device mesh. The tables are printed and saved as
    ``<workdir>/results.md`` and ``results.json``.

    Args:
      config: a validated config.
      workdir: the output folder.
      datasets: the opened datasets, if the caller already has them.
      progress: progress bars and a line per finished run.
      hooks: loop callbacks (tests).
      make_steps: ``(config, num_classes, input_shape, mesh=) -> Steps`` (fine-tuning passes
        one that builds its model, :func:`train.finetune.run`).

    Returns:
      ``results.json``'s content: ``columns``, ``best``/``final`` accuracy per dataset and the
      ``records``.
    """
    workdir = storage.path(workdir)
    datasets = datasets or [open_folds(config, name) for name in config.dataset_paths]
    mesh = sharding.make_mesh(dict(config.mesh)) if "mesh" in config else None
    primary = jax.process_index() == 0
    compiled: dict[tuple, Steps] = {}  # programs of one shape share the compiled steps
    records = []
    for program in plan_programs(config, datasets):
        dirs = [workdir / r.folder for r in program.runs]
        if all((d / RECORD).exists() for d in dirs):
            records += [RunRecord.load(d) for d in dirs]
            continue
        if program.key not in compiled:
            compiled[program.key] = make_steps(config, *program.key, mesh=mesh)
        steps = compiled[program.key]
        records += _train(config, workdir, program, steps, dirs, progress and primary, hooks)
        for r, record in zip(program.runs, records[-len(dirs) :], strict=True):
            if progress and primary:
                print(
                    f"{r.name}: best-epoch accuracy {100 * record.best_accuracy:.1f} (epoch "
                    f"{record.best_epoch}), final {100 * record.final_accuracy:.1f}",
                    file=sys.stderr,
                )
    results = report.results(records)
    text = report.results_text(results)
    if primary:
        storage.write_atomic(workdir / "results.md", text)
        write_json_atomic(workdir / "results.json", results)
    print(text)
    return results


def _train(
    config: ml_collections.ConfigDict,
    workdir: pathlib.Path,
    program: Program,
    steps: Steps,
    dirs: list[pathlib.Path],
    show: bool,
    hooks: loop.Hooks | None,
) -> list[RunRecord]:
    """Trains one program (resuming it) and writes every run's artefacts and record."""
    by_name = {d.name: d for d in program.datasets}
    primary = jax.process_index() == 0
    for r, d in zip(program.runs, dirs, strict=True):
        d.mkdir(parents=True, exist_ok=True)
        if primary:
            write_json_atomic(d / CONFIG, artefacts.run_config(config, by_name[r.dataset]))
    feed = feeds.make_feed(steps, program.source(), steps.num_classes,
                           config_lib.setting(config, "data_on_device"))  # fmt: skip
    boards = [artefacts.TensorBoard(d, config) if primary else None for d in dirs]
    bar = _progress_bar(f"{program.name} ({len(program.runs)} runs)", show)

    def record(r: int, line: dict) -> None:
        if boards[r] is not None:
            boards[r].add(line)

    def shown(done: int, total: int, mean_val: float | None) -> None:
        bar.total, bar.n = total, done
        if mean_val is not None:
            bar.set_postfix(mean_val=f"{mean_val:.3f}", refresh=False)
        bar.refresh()

    hooks = dataclasses.replace(
        hooks or loop.Hooks(),
        record=record,
        progress=(hooks.progress if hooks else None) or (shown if show else None),
    )
    try:
        results = loop.train_program(
            steps, feed, program.plan(), workdir / "programs" / program.name / "checkpoints",
            run_dirs=dirs, hooks=hooks,
        )  # fmt: skip
    except BaseException:
        for board in boards:
            if board is not None:
                board.close()
        raise
    finally:
        bar.close()
    records = []
    for r, result, d in zip(program.runs, results, dirs, strict=True):
        identity = {
            "dataset": r.dataset,
            "seed": r.seed,
            "fold": None if config.cv.kind == "holdout" else r.fold,
            "run": r.run,
            "column": r.column,
        }
        title = f"Importance Factor: {r.dataset}, seed {r.seed}, fold {r.fold}"
        records.append(artefacts.finish_run(identity, result, d, title))
    for board, rec in zip(boards, records, strict=True):
        if board is not None:
            board.close({"best_accuracy": rec.best_accuracy, "final_accuracy": rec.final_accuracy})
    return records


def _progress_bar(desc: str, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=1, desc=desc, leave=False, mininterval=0.25, disable=not enabled)
