"""Load a DINOv3 (or DINOv2) vision transformer through ``transformers`` and turn images into CLS and stage grids.

This is the only module that knows the token layout ``[CLS | registers | patches]`` and the only one that imports
``transformers``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from himatch_med import hub
from himatch_med.config import default_stages
from himatch_med.errors import WeightsUnavailableError

WEIGHTS_HELP = """\
Could not load the backbone weights {model!r}: {reason}

DINOv3 weights are gated on the Hugging Face Hub. To use them:
  1. accept the licence at https://huggingface.co/{hub_id} (signed in to your account),
  2. log in on this machine: `hf auth login` (or set HF_TOKEN), then run again;
or pass weights you already have: `--model /path/to/local/folder` (a folder saved with `save_pretrained`),
or use an ungated DINOv2 model, e.g. `--model facebook/dinov2-base`."""


class Backbone:
    """A frozen ViT returning unit-norm CLS and unit-norm, layer-normed patch grids of chosen stages.

    Args:
        model: a loaded ``transformers`` DINOv3/DINOv2 model.
        model_id: the Hub id or folder it came from.
        stages: 1-based blocks to return; empty for four evenly spaced blocks ending at the last.
        precision: the arithmetic, as :func:`arithmetic` resolves it for the images' device at each call.
    """

    def __init__(self, model: torch.nn.Module, model_id: str, stages: tuple[int, ...] = (), *,
                 precision: str = "auto") -> None:
        config = model.config
        self.model = model.eval().requires_grad_(False)
        self.model_id = model_id
        self.patch_size = int(config.patch_size)
        self.depth = int(config.num_hidden_layers)
        self.stages = tuple(sorted(set(stages))) or default_stages(self.depth)
        if max(self.stages) > self.depth:
            raise ValueError(f"stages={self.stages} but {model_id} has only {self.depth} blocks")
        # DINOv3 and DINOv2-with-registers put registers between CLS and patches; plain DINOv2 has none.
        self.prefix = 1 + int(getattr(config, "num_register_tokens", 0) or 0)
        self.norm = getattr(model, "norm", None) or model.layernorm
        self.fingerprint = weights_fingerprint(model)
        arithmetic(precision, self.device)  # refuses an unknown precision now, not at the first batch
        self.precision = precision

    @property
    def device(self) -> torch.device:
        """Where the weights live."""
        return next(self.model.parameters()).device

    @property
    def arithmetic(self) -> str:
        """``float32`` or ``bfloat16``: what it computes in on its device (:func:`arithmetic` of its precision)."""
        return arithmetic(self.precision, self.device)

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Images ``(S, 3, H', W')`` -> unit CLS ``(S, D)`` and one unit grid ``(S, h, w, D)`` per stage (float32)."""
        height, width = images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size
        autocast = (torch.autocast(images.device.type, dtype=torch.bfloat16)
                    if arithmetic(self.precision, images.device) == "bfloat16" else contextlib.nullcontext())
        with autocast:
            hidden = self.model(pixel_values=images, output_hidden_states=True).hidden_states
            # hidden[0] is the embedding output, hidden[i] the output of block i.
            tokens = [self.norm(hidden[stage]) for stage in self.stages]
            last = tokens[-1] if self.stages[-1] == self.depth else self.norm(hidden[self.depth])
        cls = F.normalize(last[:, 0].float(), dim=-1)  # CLS from the last block, whichever stages are matched
        grids = tuple(F.normalize(t[:, self.prefix:].float(), dim=-1).unflatten(1, (height, width)) for t in tokens)
        return cls, grids


def arithmetic(precision: str, device: torch.device) -> str:
    """``float32`` or ``bfloat16``: the backbone's arithmetic for a precision setting on a device.

    ``auto`` takes bfloat16 where the device computes it natively (CUDA; CPUs with AVX512_BF16 or AMX, through
    oneDNN), where it about halves the backbone's time; elsewhere bfloat16 is emulated and slower than float32.
    """
    if precision not in ("auto", "float32", "bfloat16"):
        raise ValueError(f"precision={precision!r} is not one of auto, float32, bfloat16")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bfloat16"
    return "bfloat16" if device.type == "cpu" and native_cpu_bf16() else "float32"


@functools.cache
def native_cpu_bf16() -> bool:
    """Whether this CPU has native bfloat16 matrix arithmetic (oneDNN's test: AVX512_BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch built without oneDNN
        return False


VOLATILE_CONFIG = ("transformers_version", "architectures", "torch_dtype", "dtype")
"""Configuration entries that say how a model was saved, not what it computes."""


def weights_fingerprint(model: torch.nn.Module, *, sample: int = 64 << 10) -> str:
    """A SHA-256 of what a model computes: its configuration and every weight tensor (name, shape, dtype, values).

    The same weights give the same fingerprint whether they come from the Hub or a folder, however the path to them
    is spelt; other weights saved at the same path give another. Tensors over 1 MiB are hashed by 64 evenly spaced
    windows of ``sample`` bytes, so that even a 7B model is fingerprinted in a moment; weights that differ anywhere
    differ in every window in practice (a retrained or another model), which is what a bank must notice.
    """
    config = {k: v for k, v in model.config.to_dict().items() if not k.startswith("_") and k not in VOLATILE_CONFIG}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        data = tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        if data.size <= 1 << 20:
            digest.update(data.tobytes())
        else:
            for start in range(0, data.size - sample, (data.size - sample) // 63):
                digest.update(data[start:start + sample].tobytes())
    return digest.hexdigest()


def load_backbone(model_id: str, *, stages: tuple[int, ...] = (), device: str | torch.device = "cpu",
                  precision: str = "auto") -> Backbone:
    """Load weights from a Hub id or a local folder; :class:`WeightsUnavailableError` says how to get missing ones.

    Code that comes with weights is never run and never asked about: a folder or repository that carries its own
    Python code (a ``config.json`` ``auto_map``, ``.py`` files) is refused.
    """
    from huggingface_hub.utils import enable_progress_bars
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # transformers' own bars (weights read from disk): noise on every run
    enable_progress_bars()  # the Hub's: a first download (hundreds of MB) shows its progress
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    if model_id.startswith((".", "/", "~")) and not Path(model_id).expanduser().is_dir():
        raise WeightsUnavailableError(f"--model {model_id}: no such folder; pass a folder saved with "
                                      "`save_pretrained` or a Hub id such as facebook/dinov2-base")
    source = str(Path(model_id).expanduser()) if model_id.startswith("~") else model_id
    if Path(source).is_dir():
        _refuse_custom_code(model_id, custom_code(Path(source)))
        # One name for one folder, whatever the spelling (`model/`, `../x/model`): banks and reports record it.
        model_id = str(Path(source).resolve())
    offline = None if Path(source).is_dir() else hub.unreachable()
    try:
        # trust_remote_code=False: transformers neither runs a repository's code nor prompts "[y/N]" for it.
        # Without network, only this machine's Hub cache is looked at: huggingface_hub would retry for half a minute.
        model = AutoModel.from_pretrained(source, trust_remote_code=False, local_files_only=offline is not None)
    except (OSError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if offline is not None:
            raise WeightsUnavailableError(hub.offline_help(model_id, offline)) from error
        if type(error).__name__ == "RepositoryNotFoundError" or "is not a valid model identifier" in str(error):
            raise WeightsUnavailableError(f"--model {model_id}: no such model on the Hugging Face Hub (check the "
                                          "spelling, e.g. facebook/dinov3-vitb16-pretrain-lvd1689m)") from error
        if "trust_remote_code" in str(error) or "custom code" in str(error):
            _refuse_custom_code(model_id, ["the repository's own modelling code"])
        hub_id = model_id if "/" in model_id and not model_id.startswith((".", "/")) else \
            "facebook/dinov3-vitb16-pretrain-lvd1689m"
        raise WeightsUnavailableError(WEIGHTS_HELP.format(model=model_id, reason=reason, hub_id=hub_id)) from error
    # A known model type loads with the library's own class even when the repository also ships code for it: refuse
    # that too, the weights were meant for the other code.
    _refuse_custom_code(model_id, _auto_map(getattr(model.config, "auto_map", None)))
    if not hasattr(model.config, "patch_size") or not hasattr(model, "embeddings"):
        raise WeightsUnavailableError(f"{model_id!r} is a {type(model).__name__}, not a DINOv3/DINOv2 vision "
                                      "transformer; pass a DINOv3 or DINOv2 model with --model")
    return Backbone(model.to(device), model_id, stages, precision=precision)


def custom_code(folder: Path) -> list[str]:
    """What in a saved model folder would run Python code: ``config.json`` ``auto_map`` targets and ``.py`` files."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = {}
    found = _auto_map(config.get("auto_map") if isinstance(config, dict) else None)
    return found + sorted(p.name for p in folder.glob("*.py"))


def _auto_map(auto_map) -> list[str]:
    if not auto_map:
        return []
    targets = auto_map.values() if isinstance(auto_map, dict) else [auto_map]
    names = [t for target in targets for t in (target if isinstance(target, list | tuple) else [target]) if t]
    return ["config.json auto_map -> " + ", ".join(map(str, names))]


def _refuse_custom_code(model_id: str, found: list[str]) -> None:
    if found:
        raise WeightsUnavailableError(
            f"--model {model_id}: the model {'folder' if Path(model_id).expanduser().is_dir() else 'repository'} "
            f"carries its own Python code ({'; '.join(found)}); himatch-med "
            "never runs code that comes with weights; pass a DINOv3 or DINOv2 model saved with `save_pretrained` "
            "from the transformers classes (no auto_map, no .py files), or a Hub id such as facebook/dinov2-base")
