"""Cohort screening on a Ray cluster: the outputs of :func:`himatch_med.screening.screen`, computed on many machines.

The driver (the calling process) plans the run as locally: studies complete from an earlier run are skipped. The
others stream through the cluster:

- one Ray task per study reads and prepares it (:func:`himatch_med.screening.read_study`) on any node's CPUs;
- a pool of actors, one per GPU (or CPU actors on a cluster without GPUs), each builds the extractor and receives the
  detector's bank and settings once, analyses the prepared studies handed to it
  (:func:`himatch_med.screening.analyse_study`) and writes their outputs into the screening folder, which every node
  must reach under the same path;
- the driver hands each prepared study to the least busy actor, collects the results, shows progress, and writes
  ``scores.csv`` and ``report.html`` (:func:`himatch_med.screening.conclude`).

The detector (its bank and settings, with the extractor's name in place of the extractor) goes into Ray's object store
once (``ray.put``); each node fetches it once and its actors read it from there. An actor whose process dies is
restarted by Ray (it builds its extractor again) and the studies it held are sent to it again. Each actor counts the
tries of every study in the screening folder, where a death cannot erase the count: a study that its worker died on more
than ``retries`` times is recorded as failed, like any other failure, and a study that only waited in the dead actor's
queue loses no try.

Ray is imported here only, and only when a screening runs (``pip install 'himatch-med[distributed]'``).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from himatch_med import io, jobs, screening, viewer
from himatch_med.config import ReadOptions, Settings
from himatch_med.detect import Detector
from himatch_med.errors import InputError
from himatch_med.features import Extractor
from himatch_med.screening import Loaded, Result, Screening, Study

QUEUE = 2
"""Studies handed to an actor at a time: the one it analyses and the next, whose volume travels meanwhile."""
RETRIES = 2
"""How many times a study is tried again after its worker died on it."""


@dataclass(frozen=True)
class RemoteExtractor:
    """The extractor as the driver knows it, which only the actors run: the model's name and its stages."""

    model_id: str
    stages: tuple[int, ...]

    @classmethod
    def of(cls, extractor: Extractor) -> RemoteExtractor:
        """The name and stages of ``extractor``."""
        return cls(extractor.model_id, tuple(extractor.stages))

    def __call__(self, images):
        """Refuse to run: the actors build and run the real extractor."""
        raise RuntimeError(f"{self.model_id} runs in the Ray actors only, not in the driver")


def screen(studies: list[Study], detector: Detector, folder: Path, *, factory: Callable[[str], Extractor],
           actors: int | None = None, gpus: bool | None = None, workers: int | None = None, retries: int = RETRIES,
           address: str | None = None, options: ReadOptions | None = None, force: bool = False,
           labels: dict[str, int] | None = None, progress: bool = True) -> Screening:
    """Screen a cohort on a Ray cluster; the same files as :func:`himatch_med.screening.screen`.

    Connects to Ray unless this process already is (and then disconnects again); with nothing to compute (every study
    complete from an earlier run), Ray is not used at all.

    Args:
        studies: the cohort, from :func:`himatch_med.screening.read_cohort`; relative paths are taken relative to this
            process's working folder, on every node.
        detector: the bank (opened and checked against the settings by the caller; sent to each node once), the
            resolved settings, and the extractor the actors will build (or its :class:`RemoteExtractor`): its name
            and stages decide which earlier outputs are still valid and are checked against each actor's.
        folder: the screening folder; it must be reachable under the same path from every node.
        factory: builds the extractor in an actor from a device name (``"cuda"`` for a GPU actor, ``"cpu"``); it is
            pickled, so a module-level function, class or ``functools.partial`` of them.
        actors: analysing actors; default one per GPU in the cluster, or one per node when there are no GPUs.
        gpus: give each actor a GPU; default when the cluster has GPUs.
        workers: studies being read and prepared at a time, beyond those handed to actors; default 2 per actor.
        retries: how many times a study is tried again when its worker dies.
        address: the Ray cluster (``auto``, ``HOST:PORT``, ``ray://HOST:10001``); default ``RAY_ADDRESS``, a cluster
            started on this machine, or else a new Ray instance on this machine alone.
        options: how the studies' files are read.
        force: redo every study, even those complete from an earlier run.
        labels: study id -> 1 (abnormal) or 0 (normal); adds the ROC AUC and ``roc.png``.
        progress: show a progress bar (studies/s and ETA).
    """
    for name, value, least in (("actors", actors, 1), ("workers", workers, 1), ("retries", retries, 0)):
        if value is not None and value < least:
            raise ValueError(f"{name}={value} must be {least} or more")
    screening.check_study_folders(folder, studies)
    started = time.perf_counter()
    driver = replace(detector, extractor=RemoteExtractor.of(detector.extractor))
    results, todo = screening.resume(studies, driver, folder, force=force)
    if todo:
        ray = require_ray()
        connected_here = not ray.is_initialized()
        if connected_here:
            ray.init(address=address, logging_level=logging.WARNING)
        try:
            results.update(_run(ray, studies, todo, driver, folder, factory=factory,
                                actors=actors, gpus=gpus, workers=workers, retries=retries, options=options,
                                earlier=len(results), progress=progress))
        finally:
            if connected_here:
                ray.shutdown()
    return screening.conclude(studies, results, time.perf_counter() - started, driver, folder, labels=labels)


def require_ray():
    """The ``ray`` module; :class:`InputError` saying how to install it when it is missing."""
    try:
        import ray
    except ImportError as error:
        raise InputError("--engine ray needs Ray on every node: pip install 'himatch-med[distributed]' (or "
                         "pip install 'ray>=2.9')") from error
    return ray


def _run(ray, studies: list[Study], todo: list[int], driver: Detector, folder: Path, *,
         factory: Callable[[str], Extractor], actors: int | None, gpus: bool | None, workers: int | None,
         retries: int, options: ReadOptions | None, earlier: int, progress: bool) -> dict[int, Result]:
    """Analyse the studies at positions ``todo`` on the cluster; their results by position."""
    resources = ray.cluster_resources()
    cluster_gpus = int(resources.get("GPU", 0))
    gpus = cluster_gpus > 0 if gpus is None else gpus
    if gpus and not cluster_gpus:
        raise InputError("the Ray cluster has no GPU; run with --device cpu for CPU actors, or add GPU nodes")
    count = actors or (cluster_gpus if gpus else _nodes(ray))
    if gpus and count > cluster_gpus:
        raise InputError(f"--actors {count}: each actor takes a GPU and the Ray cluster has {cluster_gpus}")
    # Assumes alike nodes; a CPU actor shares its node's cores with the readers, as the local run does.
    threads = None if gpus else max(1, int(resources.get("CPU", 1)) // count)
    workers = workers or 2 * count
    folder = folder.absolute()
    # The run's own folder: every actor checks that it sees it (a folder a node does not share would scatter outputs)
    # and counts the tries of each study there.
    run = folder / f".himatch-ray-{uuid.uuid4().hex[:12]}"
    run.mkdir()
    try:
        detector_ref = ray.put(driver)
        # Actors hold no CPU, so that reads always find one: with any resource named, Ray would reserve a CPU per
        # actor, and CPU actors as many as a node has would starve its readers. Unnamed, a CPU actor still needs a
        # free CPU to be placed (not on a head node kept free of work with --num-cpus 0).
        resources = {"num_gpus": 1, "num_cpus": 0} if gpus else {}
        # Ray resends without limit the tasks of an actor that died; the actor's own count of tries ends a study.
        actor = ray.remote(Analyser).options(**resources, max_restarts=-1, max_task_retries=-1,
                                             scheduling_strategy="SPREAD")
        pool = [actor.remote(factory, "cuda" if gpus else "cpu", [detector_ref], str(folder), run.name, os.getcwd(),
                             threads, retries) for _ in range(count)]
        _check_actors(ray, pool, driver.extractor)
        read = ray.remote(_read).options(num_cpus=1, max_retries=retries)
        return _stream(ray, pool, read, studies, todo, driver.settings, options, workers, folder,
                       screening.progress_bar(len(todo), earlier=earlier, enabled=progress,
                                              desc=f"screening on {count} {'GPU' if gpus else 'CPU'} "
                                                   f"actor{'s' if count > 1 else ''}"))
    finally:
        shutil.rmtree(run, ignore_errors=True)


def _nodes(ray) -> int:
    return max(1, sum(1 for node in ray.nodes() if node.get("Alive") and node.get("Resources", {}).get("CPU", 0)))


def _check_actors(ray, pool: list, model: RemoteExtractor) -> None:
    """Wait for every actor to be ready; refuse one that could not start or runs another model than the driver's."""
    try:
        found = ray.get([actor.identity.remote() for actor in pool])
    except ray.exceptions.RayTaskError as error:
        if isinstance(error.cause, Exception):
            raise error.cause from None
        raise
    for model_id, stages, where in found:
        if (model_id, tuple(stages)) != (model.model_id, model.stages):
            raise InputError(f"the actor on {where} runs {model_id} with stages {list(stages)}, the driver "
                             f"{model.model_id} with stages {list(model.stages)}; every node needs the same weights")


def _stream(ray, pool: list, read, studies: list[Study], todo: list[int], settings: Settings,
            options: ReadOptions | None, workers: int, folder: Path, bar) -> dict[int, Result]:
    """Read the studies in tasks, hand each prepared one to the least busy actor, and collect the results.

    Interrupted (Ctrl-C, SIGTERM), it stops the actors and clears what they leave of the studies they held.
    """
    analysing: dict = {}  # analysis task -> (position, actor)
    try:
        return _collect(ray, pool, read, studies, todo, settings, options, workers, bar, analysing)
    except BaseException:
        _stop(ray, pool, list(analysing), [studies[index] for index, _ in analysing.values()], folder)
        raise


def _stop(ray, pool: list, tasks: list, held: list[Study], folder: Path) -> None:
    """End the actors now and clear what they leave of the studies ``held`` (hidden temporaries, locks)."""
    for actor in pool:
        ray.kill(actor, no_restart=True)
    # A study's lock is free once its actor's process has gone, which its task reports.
    if tasks:
        ray.wait(tasks, num_returns=len(tasks), timeout=60, fetch_local=False)
    for study in held:
        jobs.clear_leftovers(study.path, folder / study.folder, replaces=viewer.FILES)


def _collect(ray, pool: list, read, studies: list[Study], todo: list[int], settings: Settings,
             options: ReadOptions | None, workers: int, bar, analysing: dict) -> dict[int, Result]:
    waiting = deque(todo)
    reading: dict = {}  # read task -> position
    ready: deque = deque()  # (position, read task): read, waiting for an actor
    load = [0] * len(pool)
    results: dict[int, Result] = {}
    failed = 0
    cwd = os.getcwd()
    while waiting or reading or ready or analysing:
        while waiting and len(reading) + len(ready) < workers:
            index = waiting.popleft()
            reading[read.remote(cwd, studies[index], settings, options, index)] = index
        while ready and min(load) < QUEUE:
            chosen = load.index(min(load))
            index, prepared = ready.popleft()
            # The prepared volume goes from the reader's node to the actor's; the driver never fetches it.
            analysing[pool[chosen].analyse.remote(studies[index], prepared)] = (index, chosen)
            load[chosen] += 1
        done, _ = ray.wait([*reading, *analysing], num_returns=1, fetch_local=False)
        for task in done:
            if task in reading:
                ready.append((reading.pop(task), task))
                continue
            index, chosen = analysing.pop(task)
            load[chosen] -= 1
            try:
                results[index] = ray.get(task)
            except ray.exceptions.RayError as error:
                results[index] = _lost(studies[index], error)
            failed += results[index].status == "failed"
            bar.update()
            if failed:
                bar.set_postfix(failed=failed)
    bar.close()
    return results


def _lost(study: Study, error: Exception) -> Result:
    """The failed result of a study whose Ray task raised: an actor that could not start, a read lost with its node."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, Exception):
        message = jobs.describe_error(study.path, cause)
    else:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        message = f"{study.path}: {type(error).__name__}: {lines[0] if lines else 'no details'}"
    return Result(study, "failed", error=" ".join(message.split()), details=str(error))


def _read(cwd: str, study: Study, settings: Settings, options: ReadOptions | None, index: int) -> Loaded:
    """Read and prepare a study in a Ray worker, with relative paths meaning what they mean to the driver."""
    _enter(cwd)
    return screening.read_study(study, settings, options, index=index)


def _enter(cwd: str) -> None:
    # Workers belong to this job alone, so moving one into the driver's folder disturbs nothing; on a node without
    # that folder, relative paths fail to read like any missing file and are recorded.
    if os.path.isdir(cwd):
        os.chdir(cwd)


class Analyser:
    """A Ray actor: builds the extractor once, keeps the detector, and analyses the studies handed to it.

    Errors while starting are kept and raised by every call, so that the driver sees the original error (a missing
    weights folder, an output folder this node does not share) instead of an actor that died.

    Args:
        factory: builds the extractor from a device name.
        device: ``cuda`` (the actor's GPU) or ``cpu``.
        detector: the driver's detector (bank, settings, the extractor's name) in Ray's object store, in a one-item
            list: nested, the reference is fetched by the actor itself, again after a restart, while the driver keeps
            it alive.
        folder: the absolute screening folder.
        run: the name of this run's folder inside ``folder``; missing here means ``folder`` is not shared.
        cwd: the driver's working folder, against which relative study paths are read.
        threads: torch threads of a CPU actor; None leaves torch's choice.
        retries: how many times a study is tried again after its worker died on it.
    """

    def __init__(self, factory: Callable[[str], Extractor], device: str, detector: list, folder: str, run: str,
                 cwd: str, threads: int | None, retries: int) -> None:
        import socket

        import ray
        import torch

        self.where = socket.gethostname()
        self.folder, self.tries, self.retries = Path(folder), Path(folder) / run, retries
        self.detector: Detector | None = None
        self.error: Exception | None = None
        try:
            _enter(cwd)
            if not self.tries.is_dir():
                raise InputError(f"{folder}: the screening folder is not shared with node {self.where} (it does not "
                                 "see the driver's files there); write to a folder every node mounts at the same "
                                 "path")
            if threads is not None:
                torch.set_num_threads(threads)
            self.detector = replace(ray.get(detector[0]), extractor=factory(device))
        except Exception as error:  # kept, and raised by every call: see the class docstring
            self.error = error

    def identity(self) -> tuple[str, tuple[int, ...], str]:
        """The model name and stages this actor runs, and its host."""
        if self.error is not None:
            raise self.error
        return self.detector.extractor.model_id, tuple(self.detector.extractor.stages), self.where

    def analyse(self, study: Study, loaded: Loaded) -> Result:
        """Analyse one prepared study and write its outputs; its result (``failed`` with the error if it failed).

        Every start is first recorded in the run's folder: finding more than ``retries`` earlier starts means that
        the worker died on this study each time, which makes the study fail instead of being tried again.
        """
        if self.error is not None:
            raise self.error
        record = self.tries / study.folder
        earlier = io.read_text(record).splitlines() if record.is_file() else []
        if len(earlier) > self.retries:
            return Result(study, "failed", error=f"{study.path}: the Ray worker analysing it died on each of its "
                                                 f"{len(earlier)} tries", details="\n".join(earlier))
        io.write_text("".join(f"{line}\n" for line in [*earlier, f"{self.where} pid {os.getpid()}"]), record)
        return screening.analyse_study(study, loaded, self.detector, self.folder)
