"""The reference bank as data: descriptors of normal slices, their clustered features, the calibration, its format.

Format (version 2), written by :func:`himatch_med.io.write_bank` as a folder with two files:

- ``bank.safetensors``: ``cls`` (N, D) fp16, ``layout`` (N, g*g, D) fp16, ``centroids`` (N, L, c, D) fp16,
  ``sizes`` (N, L, c) int32, ``positions`` (N,) fp32, ``groups`` (N,) int64 (which reference volume a slice came
  from), ``calibration_mean`` and ``calibration_std`` (L,) fp32, ``calibration_slice_scores`` (M,) fp32,
  ``calibration_volume_scores`` (V,) fp32; optional (:data:`OPTIONAL_ARRAYS`, absent in banks built before it
  existed, which stay readable): ``calibration_volume_groups`` (V,) int64, the reference volume (``groups`` value) of
  each volume score, which ``python -m himatch_med.bank check`` reads; ``spread_draws`` (B, R) int32, how often each
  of the R reference volumes is drawn in each of B bootstrap replicates, and ``spread_mean``, ``spread_std`` (B, L)
  fp32, each replicate's calibration (a bank without them reports no spread);
- ``bank.json``: :meth:`Bank.metadata`, the typed :class:`BankInfo`: ``format_version``, the settings a query must
  repeat (model, modality, window, image size, stages, ...), the settings it was calibrated with, the sources (file
  and slice of every reference), and ``arrays_sha256``: the SHA-256 of the SHA-256 digests of the arrays file's
  64 MiB blocks (see :func:`himatch_med.io.file_sha256`), checked on every load.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from himatch_med import __version__
from himatch_med.errors import InputError

FORMAT_VERSION = 2
"""Version 2 (himatch-med 0.2): references prepared with the background detection and intensity headroom of 0.2."""
ARRAYS = ("cls", "layout", "centroids", "sizes", "positions", "groups", "calibration_mean", "calibration_std",
          "calibration_slice_scores", "calibration_volume_scores")
SPREAD_ARRAYS = ("spread_draws", "spread_mean", "spread_std")
"""Optional arrays: the bank subsets a score is recomputed against for its spread (absent in older banks)."""
OPTIONAL_ARRAYS = ("calibration_volume_groups", *SPREAD_ARRAYS)
"""Arrays a bank of this format may lack (built by an earlier 0.2): what needs them asks for a rebuild."""
STORAGE_DTYPE = torch.float16
COUNTS = ("sampled_slices", "volumes", "recalibrated_for_evaluation")
"""Entries of ``bank.json``'s ``calibration`` that are not settings: they follow from the arrays (and a flag)."""


@dataclass(frozen=True)
class BankInfo:
    """What a bank records besides its arrays.

    ``settings``: the settings a query must repeat (:meth:`himatch_med.config.Settings.bank_fields` and the stages
    used); ``calibrated_with``: the settings of its calibration
    (:meth:`himatch_med.config.Settings.calibration_fields`); ``patch_size``: the extractor's; ``sources``:
    ``{"source": file, "slice": index}`` per reference; ``recalibrated``: the calibration was redone for an
    evaluation row; ``findings``: the finding threshold and the normal values it comes from
    (:func:`himatch_med.findings.calibration_record`; ``None`` in a bank built before findings existed). Set when
    stored: ``created_by``, ``warnings`` (skipped references), ``build_seconds``, ``arrays_sha256``; ``excluded``: the
    references left out by ``bank build --exclude`` (``None`` when none was asked for); ``reference_check``: the check
    of the references when the bank was built (:func:`himatch_med.bank.check.check_record`).
    """

    settings: dict = field(default_factory=dict)
    calibrated_with: dict = field(default_factory=dict)
    patch_size: int | None = None
    sources: tuple[dict, ...] = ()
    recalibrated: bool = False
    findings: dict | None = None
    format_version: int = FORMAT_VERSION
    created_by: str | None = None
    warnings: tuple[str, ...] | None = None
    build_seconds: float | None = None
    arrays_sha256: str | None = None
    excluded: tuple[str, ...] | None = None
    reference_check: dict | None = None

    @classmethod
    def from_json(cls, meta: dict, *, source: str) -> BankInfo:
        """The description in a bank's ``bank.json``; :class:`InputError` for another format version."""
        version = meta.get("format_version")
        if isinstance(version, int) and version > FORMAT_VERSION:
            raise InputError(f"{source}: bank format version {version} was written by a newer himatch-med (this one, "
                             f"{__version__}, reads version {FORMAT_VERSION}); upgrade himatch-med to use it")
        if version != FORMAT_VERSION:
            raise InputError(f"{source}: bank format version {version!r} was built by an older himatch-med whose "
                             "preprocessing differs (version 0.2 detects a constant non-zero background and leaves "
                             "intensity headroom for bright lesions), so its references would not match this run's "
                             "slices; rebuild it from the same references with `python -m himatch_med.bank build`")
        calibration = meta.get("calibration", {})
        warnings = meta.get("warnings")
        return cls(settings=dict(meta.get("settings", {})),
                   calibrated_with={k: v for k, v in calibration.items() if k not in (*COUNTS, "findings")},
                   findings=calibration.get("findings"),
                   patch_size=meta.get("patch_size"), sources=tuple(meta.get("sources", ())),
                   recalibrated=bool(calibration.get("recalibrated_for_evaluation", False)), format_version=version,
                   created_by=meta.get("created_by"), warnings=None if warnings is None else tuple(warnings),
                   build_seconds=meta.get("build_seconds"), arrays_sha256=meta.get("arrays_sha256"),
                   excluded=None if meta.get("excluded") is None else tuple(meta["excluded"]),
                   reference_check=meta.get("reference_check"))


@dataclass(frozen=True, eq=False)
class Bank:
    """References ``N`` with ``L`` stages of ``c`` centroids each, the calibration of their stage maps, and ``info``.

    ``calibration_volume_groups`` (V,): the reference volume of each calibration volume score; ``None`` in a bank
    built before it was recorded. ``others``: for tri-planar detection, the banks of the other planes (each its own
    references and calibration; stored in the same files, their arrays prefixed ``<plane>.``, their description under
    ``planes`` in ``bank.json``).
    """

    cls: torch.Tensor
    layout: torch.Tensor
    centroids: torch.Tensor
    sizes: torch.Tensor
    positions: torch.Tensor
    groups: torch.Tensor
    calibration_mean: torch.Tensor
    calibration_std: torch.Tensor
    calibration_slice_scores: torch.Tensor
    calibration_volume_scores: torch.Tensor
    info: BankInfo = field(default_factory=BankInfo)
    calibration_volume_groups: torch.Tensor | None = None
    spread_draws: torch.Tensor | None = None
    spread_mean: torch.Tensor | None = None
    spread_std: torch.Tensor | None = None
    others: tuple[Bank, ...] = ()

    @classmethod
    def from_stored(cls, tensors: dict[str, torch.Tensor], meta: dict, *, source: str) -> Bank:
        """A bank from the arrays and metadata :func:`himatch_med.io.read_bank` returns."""
        info = BankInfo.from_json(meta, source=source)
        missing = [name for name in ARRAYS if name not in tensors]
        if missing:
            raise InputError(f"{source}: the bank lacks arrays {', '.join(missing)}; rebuild the bank")
        problem = array_problem(tensors)
        if problem:
            raise InputError(f"{source}: its arrays are inconsistent ({problem}); rebuild the bank")
        others = []
        for plane, description in (meta.get("planes") or {}).items():
            prefix = f"{plane}."
            others.append(cls.from_stored({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)},
                                          description, source=f"{source} ({plane} plane)"))
        return cls(**{name: tensors[name] for name in ARRAYS}, info=info,
                   **{name: tensors[name] for name in OPTIONAL_ARRAYS if name in tensors}, others=tuple(others))

    @property
    def id(self) -> str:
        """The bank's short id: the first 16 hex digits of its arrays' checksum ("" for a bank never stored)."""
        return (self.info.arrays_sha256 or "")[:16]

    def __len__(self) -> int:
        return len(self.cls)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The arrays by name, as stored (the optional ones when present; the other planes' prefixed by their name)."""
        own = {name: getattr(self, name) for name in (*ARRAYS, *OPTIONAL_ARRAYS) if getattr(self, name) is not None}
        for other in self.others:
            own.update({f"{other.plane}.{name}": tensor for name, tensor in other.tensors().items()})
        return own

    @property
    def plane(self) -> str | None:
        """The slice plane (axis) of this bank's references, as recorded."""
        return self.info.settings.get("axis")

    @property
    def planes(self) -> tuple[str, ...]:
        """The planes this bank holds references of: its own, then the others'."""
        return tuple(p for p in (self.plane, *(o.plane for o in self.others)) if p is not None)

    def of_plane(self, plane: str, *, source: str = "the bank") -> Bank:
        """The bank of ``plane``'s references; :class:`InputError` when this bank holds none."""
        for bank in (self, *self.others):
            if bank.plane == plane:
                return bank
        raise InputError(f"{source} holds references of the {', '.join(self.planes)} plane(s), not {plane}; build it "
                         f"with --planes {plane} (or all) for tri-planar detection")

    @property
    def replicates(self) -> int:
        """How many bank subsets the bank holds for the spread of a score (0 for a bank built before them)."""
        return 0 if self.spread_draws is None else len(self.spread_draws)

    def calibration(self) -> dict:
        """The calibration as ``bank.json`` records it: the settings, the sampled slices and volumes."""
        counts = {"sampled_slices": len(self.calibration_slice_scores),
                  "volumes": len(self.calibration_volume_scores)} if len(self.calibration_slice_scores) else {}
        return {**self.info.calibrated_with, **counts,
                **({"recalibrated_for_evaluation": True} if self.info.recalibrated else {})}

    def metadata(self, arrays_sha256: str | None = None) -> dict:
        """The content of ``bank.json``, the only place that writes it; ``arrays_sha256`` when it is being stored."""
        info = self.info
        calibration = {**self.calibration(), **({"findings": info.findings} if info.findings else {})}
        meta = {"settings": info.settings, "calibration": calibration, "patch_size": info.patch_size,
                "format_version": info.format_version, "sources": list(info.sources)}
        if self.others:
            meta["planes"] = {other.plane: other.metadata() for other in self.others}
        stored = {"created_by": info.created_by, "warnings": None if info.warnings is None else list(info.warnings),
                  "build_seconds": info.build_seconds, "arrays_sha256": arrays_sha256 or info.arrays_sha256,
                  "excluded": None if info.excluded is None else list(info.excluded),
                  "reference_check": info.reference_check}
        return {**meta, **{key: value for key, value in stored.items() if value is not None}}

    def to(self, device: torch.device | str, *, centroid_budget: int = 8 << 30,
           descriptor_budget: int = 1 << 30) -> Bank:
        """This bank ready for queries on ``device``: its retrieval arrays there, the descriptors in float32.

        ``cls`` and ``layout`` are converted to float32 once here when that copy fits ``descriptor_budget`` bytes, so
        that retrieval does not convert the whole bank on every call; else they stay as stored and retrieval converts
        the rows it scores, chunk by chunk. The centroids follow when they fit ``centroid_budget`` bytes; else they
        stay memory-mapped on the host and only the retrieved rows travel. A bank made for queries is not for
        storing: store the bank as built.
        """
        device = torch.device(device)
        on_host = device.type == "cpu"
        moved = {name: tensor if on_host else tensor.to(device) for name, tensor in self.tensors().items()
                 if name != "centroids"}
        if (self.cls.numel() + self.layout.numel()) * 4 <= descriptor_budget:
            moved["cls"], moved["layout"] = moved["cls"].float(), moved["layout"].float()
        moved = {name: tensor for name, tensor in moved.items() if "." not in name}  # the other planes': below
        fits = on_host or self.centroids.numel() * self.centroids.element_size() <= centroid_budget
        others = tuple(other.to(device, centroid_budget=centroid_budget, descriptor_budget=descriptor_budget)
                       for other in self.others)
        return replace(self, **moved, centroids=self.centroids.to(device) if fits else self.centroids, others=others)

    def memory(self, indices: torch.Tensor, stage: int, device: torch.device,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Centroids of one stage of the references ``indices`` ``(B, K)`` as ``dtype`` ``(B, K, c, D)`` on ``device``.

        A stage at a time: its rows are gathered, converted and matched while they are in the cache (all four stages
        of a batch at once made the matching of the 240 x 240 x 155 volume twice as slow).
        """
        # index_select, not advanced indexing: the same rows, gathered 3-4 times faster on the CPU.
        rows = self.centroids[:, stage].index_select(0, indices.flatten().to(self.centroids.device)).to(device)
        if rows.dtype == torch.float16 and dtype == torch.bfloat16:
            # torch has no vectorised float16 -> bfloat16 conversion on the CPU: through float32 it is the same
            # rounding at half the time.
            rows = rows.float()
        return rows.to(dtype).unflatten(0, indices.shape)

    def check(self, expected: dict, *, source: str) -> None:
        """Raise :class:`InputError` unless the bank was built with the ``expected`` settings (model, stages, ...)."""
        recorded = self.info.settings
        fingerprints = recorded.get("model_fingerprint"), expected.get("model_fingerprint")
        if all(fingerprints) and fingerprints[0] != fingerprints[1]:
            raise InputError(f"{source} was built with other weights than {expected.get('model')!r} holds now (the "
                             f"weights' fingerprints differ: bank {fingerprints[0][:12]}, this model "
                             f"{fingerprints[1][:12]}); pass --model with the weights the bank was built with, or "
                             "build a new bank with these")
        # Weights are known by their fingerprint: another spelling of their path is the same model.
        skip = {"model", "model_fingerprint"} if all(fingerprints) else {"model_fingerprint"}
        # A setting newer than the bank (e.g. planes) that the run leaves empty is the one the bank was built with.
        skip |= {key for key, value in expected.items() if key not in recorded and _plain(value) in ([], None)}
        wrong = [f"{key}: bank has {recorded.get(key)!r}, this run asks for {value!r}"
                 for key, value in expected.items() if key not in skip and _plain(recorded.get(key)) != _plain(value)]
        if wrong:
            raise InputError(f"{source} was built with other settings than this run: " + "; ".join(wrong)
                             + ". Run with the bank's settings, or build a new bank with these.")

    def calibration_changes(self, settings, names: tuple[str, ...] | None = None) -> dict[str, tuple]:
        """Settings (``names``, default all recorded) whose value in ``settings`` differs from the calibration's.

        Returns:
            ``{name: (value the bank was calibrated with, value in settings)}``.
        """
        recorded = self.info.calibrated_with
        names = tuple(recorded) if names is None else names
        return {name: (recorded[name], getattr(settings, name)) for name in names
                if name in recorded and hasattr(settings, name)
                and _plain(recorded[name]) != _plain(getattr(settings, name))}


def array_problem(tensors: dict[str, torch.Tensor], *, chunk: int = 1024) -> str:
    """What is wrong with a bank's arrays ("" when nothing): shapes that do not fit together, values not finite.

    Checked on every open, so that a damaged or crafted bank is refused at once, not deep inside a query.
    """
    cls, layout, centroids = tensors["cls"], tensors["layout"], tensors["centroids"]
    if cls.ndim != 2 or layout.ndim != 3 or centroids.ndim != 4:
        return f"cls {tuple(cls.shape)}, layout {tuple(layout.shape)}, centroids {tuple(centroids.shape)}"
    count, width = cls.shape
    stages, per_slice = centroids.shape[1:3]
    expected = {"layout": (count, layout.shape[1], width), "centroids": (count, stages, per_slice, width),
                "sizes": (count, stages, per_slice), "positions": (count,), "groups": (count,),
                "calibration_mean": (stages,), "calibration_std": (stages,)}
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            return f"{name} has shape {tuple(tensors[name].shape)}, {shape} expected with cls {tuple(cls.shape)}"
    groups = tensors.get("calibration_volume_groups")
    if groups is not None and tuple(groups.shape) != tuple(tensors["calibration_volume_scores"].shape):
        return (f"calibration_volume_groups has shape {tuple(groups.shape)}, one per calibration volume score "
                f"{tuple(tensors['calibration_volume_scores'].shape)} expected")
    for name in ("cls", "layout", "positions", "calibration_mean", "calibration_std", "calibration_slice_scores",
                 "calibration_volume_scores", "centroids"):
        if not finite(tensors[name], chunk=chunk):
            return f"{name} holds values that are not finite"
    if not bool((tensors["calibration_std"] > 0).all()):
        return "calibration_std is not positive"
    present = [name for name in SPREAD_ARRAYS if name in tensors]
    if present and len(present) != len(SPREAD_ARRAYS):
        return f"it holds {', '.join(present)} without the other arrays of the spread"
    if present:
        draws, replicates = tensors["spread_draws"], len(tensors["spread_draws"])
        volumes = int(tensors["groups"].max()) + 1 if count else 0
        if tuple(draws.shape) != (replicates, volumes) or bool((draws < 0).any()):
            return f"spread_draws has shape {tuple(draws.shape)}, ({replicates}, {volumes}) counts expected"
        for name in ("spread_mean", "spread_std"):
            if tuple(tensors[name].shape) != (replicates, stages) or not bool(torch.isfinite(tensors[name]).all()):
                return f"{name} is not ({replicates}, {stages}) finite values"
        if not bool((tensors["spread_std"] > 0).all()):
            return "spread_std is not positive"
    return ""


def finite(values: torch.Tensor, *, chunk: int = 1024) -> bool:
    """Whether every value is finite, reading ``chunk`` rows at a time.

    The extremes of each chunk are finite exactly when all its values are (a NaN propagates through ``amax`` and
    ``amin``, an infinity is an extreme): a reduction 10 to 20 times faster on fp16 than ``isfinite(...).all()``, which
    matters because a 10,000-slice bank's 2 GB of centroids are checked on every open (4 s before, 0.2 s now).
    """
    if not values.numel():
        return True
    return all(bool(torch.isfinite(part.amax()) & torch.isfinite(part.amin())) for part in values.split(chunk))


def _plain(value):
    return list(value) if isinstance(value, tuple) else value
