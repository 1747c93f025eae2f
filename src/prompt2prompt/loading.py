"""Load a Stable Diffusion pipeline from a hub id, a local diffusers folder, a single .safetensors file, or "demo"."""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import pickle
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from . import families

__all__ = ["CPU_FLOAT16", "Checkpoint", "DEMO_MODEL", "DEMO_MODELS", "ModelLoadError", "check_device",
           "default_device", "inversion_methods", "library_logs", "load_pipeline", "parse_dtype", "quiet_loading",
           "resolve_model", "slow_dtype"]

DEMO_MODEL = Path(__file__).parent / "demo" / "model"
# The models inside the package, by the names `--model` and `from_pretrained` take: the UNet one and the
# joint-attention (SD3-style, flow-matching) one, trained on the same shapes world.
DEMO_MODELS = {"demo": DEMO_MODEL, "demo-flow": Path(__file__).parent / "demo" / "flow_model"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


class ModelLoadError(RuntimeError):
    """A model could not be found or loaded; the message says how to get it."""


@dataclass(frozen=True)
class Checkpoint:
    """Where a model lives: `id` as the user named it, `path` on disk, and the hub `revision` when known."""

    id: str
    path: Path
    revision: str | None = None
    single_file: bool = False


def _offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
    return env or bool(constants.HF_HUB_OFFLINE)


def resolve_model(model: str, *, revision: str | None = None) -> Checkpoint:
    """Find `model` on disk, fetching a hub id into the Hugging Face cache unless offline.

    Args:
        model: "demo" or "demo-flow", a diffusers folder, a `.safetensors` file, or a hub id such as
            "stable-diffusion-v1-5/stable-diffusion-v1-5".
        revision: a hub branch, tag or commit; only for hub ids.
    """
    if model in DEMO_MODELS:
        folder = DEMO_MODELS[model]
        if not (folder / "model_index.json").is_file():
            raise ModelLoadError(f"the {model} model is missing from this install (expected {folder}); "
                                 "reinstall prompt2prompt, or pass --model with another model")
        return Checkpoint(id=model, path=folder)
    path = Path(model).expanduser()
    if path.exists():
        if revision is not None:
            raise ModelLoadError(f"revision={revision!r} only applies to hub ids, but {model!r} is a local path")
        if path.is_file():
            if path.suffix != ".safetensors":
                raise ModelLoadError(f"{model!r} is a file but not a .safetensors checkpoint; pass a .safetensors "
                                     "file or a diffusers folder (one with model_index.json)")
            return Checkpoint(id=str(path.resolve()), path=path.resolve(), single_file=True)
        return Checkpoint(id=str(path.resolve()), path=path.resolve())
    if not _HUB_ID.match(model) or model.endswith(".safetensors"):
        raise ModelLoadError(f"no such file or folder: {model!r}; pass a diffusers folder, a .safetensors file, "
                             "a hub id such as 'stable-diffusion-v1-5/stable-diffusion-v1-5', or 'demo'")
    return _download(model, revision)


def _download(repo_id: str, revision: str | None) -> Checkpoint:
    from diffusers import DiffusionPipeline

    offline = _offline()
    try:
        with library_logs():  # its "Couldn't connect to the Hub" lines: the error below says it once
            folder = Path(DiffusionPipeline.download(repo_id, revision=revision, local_files_only=offline))
    except OSError as error:
        if offline:
            raise ModelLoadError(
                f"{repo_id!r} is not in the Hugging Face cache, and HF_HUB_OFFLINE=1 forbids downloading it. "
                f"Download it once on a machine with internet access (`hf download {repo_id}`, with HF_HUB_OFFLINE "
                "unset) and copy the cache over, or pass --model with a local diffusers folder"
            ) from None
        # diffusers' message points at a stack trace the user never sees: keep what it says before that.
        reason = " ".join(str(error).split()).split(" Please check out the root cause")[0].rstrip(". ")
        raise ModelLoadError(f"could not fetch {repo_id!r} from the Hugging Face hub: {reason}. Check the id and "
                             "your network, or pass --model with a local diffusers folder") from None
    # Cached snapshots live in .../snapshots/<commit>/: that commit pins the weights for replay.
    commit = folder.name if folder.parent.name == "snapshots" else revision
    return Checkpoint(id=repo_id, path=folder, revision=commit)


def default_device() -> str:
    """The device to run on by default: "cuda" when a GPU is available, else "cpu"."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(device: str | torch.device | None) -> str | torch.device:
    """`device` if this machine has it (None: `default_device()`).

    Raises ValueError for a name torch does not know or a device type prompt2prompt does not run on, and
    RuntimeError for a device this machine lacks ("cuda" without a GPU, "cuda:3" on a machine with two).

    >>> check_device("cpu"), check_device(None) in ("cpu", "cuda")
    ('cpu', True)
    """
    if device is None:
        return default_device()
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"unknown device {device!r}; use cpu, cuda, cuda:1, mps or xpu") from None
    backends = {"cuda": torch.cuda, "mps": getattr(torch.backends, "mps", None), "xpu": getattr(torch, "xpu", None)}
    if parsed.type == "cpu":
        return device
    if parsed.type not in backends:
        raise ValueError(f"prompt2prompt runs on cpu, cuda, mps or xpu devices, not {device!r}")
    backend = backends[parsed.type]
    if backend is None or not backend.is_available():
        raise RuntimeError(f"device {device!r} is not available: this machine (torch {torch.__version__}) has no "
                           f"{parsed.type} device; use --device cpu")
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if parsed.index is not None and parsed.index >= count:
        raise RuntimeError(f"device {device!r} is not available: this machine has {count} {parsed.type} device(s), "
                           f"numbered from 0")
    return device


def parse_dtype(name: str | torch.dtype | None, device: str | torch.device) -> torch.dtype:
    """A torch dtype from its name ("float16", "fp16", "bf16", ...); None gives fp16 on CUDA and fp32 elsewhere.

    >>> parse_dtype(None, "cpu"), parse_dtype("fp16", "cuda")
    (torch.float32, torch.float16)
    """
    if isinstance(name, torch.dtype):
        return name
    if name is None or name == "auto":
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of auto, {', '.join(sorted(_DTYPES))}")
    return _DTYPES[name]


# What we say, once, instead of diffusers' "running them will fail" (printed once per component, and untrue:
# torch runs float16 on the CPU, in software).
CPU_FLOAT16 = ("float16 on the CPU runs slowly (most CPUs compute it in software) and a few operations may lack it "
               "there; float32 is the CPU's dtype")


def slow_dtype(dtype: torch.dtype, device: str | torch.device) -> str | None:
    """CPU_FLOAT16 when `dtype` on `device` is float16 on the CPU, else None."""
    return CPU_FLOAT16 if dtype == torch.float16 and torch.device(device).type == "cpu" else None


def _folder_family(checkpoint: Checkpoint, index) -> tuple[str, type[families.Family]]:
    """(pipeline class name, family) of a diffusers folder, from its model_index.json `index`."""
    found = families.pipeline_class_for(index) if isinstance(index, dict) else None
    if found is None:
        class_name = index.get("_class_name") if isinstance(index, dict) else None
        class_name = class_name if isinstance(class_name, str) else "non-diffusers"
        raise ModelLoadError(f"{checkpoint.id!r} holds a {class_name} model; prompt2prompt edits "
                             f"{families.supported_models()} pipelines")
    return found


def _pipeline_class(checkpoint: Checkpoint, index=None):
    """The diffusers pipeline class to load `checkpoint` with, as the families see it (`index`: its model_index.json,
    when the caller has read it already)."""
    import diffusers
    from transformers.utils import logging as transformers_logging

    if checkpoint.single_file:
        name = _checkpoint_class(checkpoint.path)
    else:
        index = _model_index(checkpoint) if index is None else index
        name, family = _folder_family(checkpoint, index)
        class_name = index.get("_class_name")
        missing = [component for component in family.components if not index.get(component)]
        if missing:
            raise ModelLoadError(f"{checkpoint.id!r} holds a {class_name} model without its {', '.join(map(repr, missing))}")
        _check_libraries(checkpoint, index)
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # importing the pipelines warns about image processors we never use
    try:
        return getattr(diffusers, name)
    finally:
        transformers_logging.set_verbosity(verbosity)


def inversion_methods(model: str) -> tuple[str, ...]:
    """The inversion methods of a model folder's family, read from its model_index.json without loading it."""
    checkpoint = resolve_model(model)
    if checkpoint.single_file:
        raise ModelLoadError(f"{checkpoint.id!r} is a single file; pass a diffusers folder of "
                             f"{families.supported_models()} pipelines")
    return tuple(_folder_family(checkpoint, _model_index(checkpoint))[1].inversion_methods)


def _absent(index: dict) -> dict[str, None]:
    """The components a folder's model_index.json `index` declares absent ([null, null]), as None keywords.

    diffusers saves a component that is None so (SD3 without T5: the demo-flow model), but loads the folder only
    when told again that it is None, as its docs show (`text_encoder_3=None, tokenizer_3=None`).
    """
    return {name: None for name, value in index.items() if not name.startswith("_") and value == [None, None]}


def _model_index(checkpoint: Checkpoint):
    index_file = checkpoint.path / "model_index.json"
    if not index_file.is_file():
        raise ModelLoadError(f"{checkpoint.id!r} is not a diffusers pipeline folder (it has no model_index.json); "
                             "save one with pipe.save_pretrained(folder), or pass a .safetensors file")
    try:
        return json.loads(index_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:  # ValueError: bad JSON or bad UTF-8
        raise ModelLoadError(f"cannot read {str(index_file)!r}: {' '.join(str(error).split())}") from None


def _check_libraries(checkpoint: Checkpoint, index: dict) -> None:
    """Refuse components from other libraries than diffusers and transformers.

    diffusers imports the module that model_index.json names for each component: a folder naming another
    module would have any installed code run, or its own with `trust_remote_code`.
    """
    from diffusers import pipelines

    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list):
            continue  # settings such as requires_safety_checker
        library = entry[0] if len(entry) == 2 else entry
        if library is None or library in ("diffusers", "transformers"):
            continue
        module = getattr(pipelines, library, None) if isinstance(library, str) and library.isidentifier() else None
        if inspect.ismodule(module) and module.__name__.startswith("diffusers."):
            continue  # a diffusers pipeline module, e.g. "stable_diffusion" for the safety checker
        raise ModelLoadError(f"{checkpoint.id!r} takes its {name!r} component from {library!r}; prompt2prompt loads "
                             "components from diffusers and transformers only")


def _check_safetensors(checkpoint: Checkpoint) -> None:
    """Refuse a folder whose weights are pickles only, naming the way to opt in."""
    for component in ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        folder = checkpoint.path / component
        if not folder.is_dir() or any(folder.glob("*.safetensors")):
            continue
        pickles = sorted(f.name for f in folder.iterdir() if f.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        if pickles:
            raise ModelLoadError(
                f"{checkpoint.id!r} has pickle weights ({component}/{pickles[0]}) and no safetensors ones; prompt2prompt "
                "loads safetensors only, as a pickle can run code. Convert the weights to safetensors, or pass "
                "--allow-pickle (allow_pickle=True) to read them with torch.load(weights_only=True)"
            )


def _load_failure(checkpoint: Checkpoint, error: Exception) -> str:
    """One line on why a model did not load."""
    if isinstance(error, pickle.UnpicklingError) or "weights only load failed" in str(error).lower():
        return (f"cannot load {checkpoint.id!r}: its pickle weights cannot be read safely (torch.load(weights_only=True) "
                "refused them: corrupt, or holding objects other than tensors); use safetensors weights")
    lines = str(error).strip().splitlines() or [""]
    detail = lines[0].rstrip(".")
    if not isinstance(error, (OSError, ValueError)):  # their messages are self-explaining; others need their type
        detail = f"{type(error).__name__}: {detail}"
    hint = (" A single-file checkpoint needs its base model's configuration from the hub (or its cache)."
            if checkpoint.single_file else "")
    return f"cannot load {checkpoint.id!r}: {detail}.{hint}"


def _checkpoint_class(path: Path) -> str:
    """The pipeline class of an original single-file checkpoint, from its weight names (the families decide)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as checkpoint:
            keys = list(checkpoint.keys())
    except Exception as error:  # safetensors raises its own error types for corrupt headers
        raise ModelLoadError(f"cannot read {str(path)!r} as a safetensors file: {error}") from None
    name = families.single_file_class(keys)
    if name is None:
        single, others = families.single_file_models()
        folder_only = f" ({others} load from a diffusers folder or a hub id)" if others else ""
        raise ModelLoadError(f"{str(path)!r} is not a Stable Diffusion or Flux checkpoint: no model family "
                             f"recognises its weights; pass an original {single} .safetensors file{folder_only}")
    return name


def load_pipeline(
    model: str | Checkpoint,
    *,
    device: str | torch.device | None = None,
    torch_dtype: str | torch.dtype | None = None,
    revision: str | None = None,
    allow_pickle: bool = False,
):
    """Load a pipeline of any family in `prompt2prompt.families`, on `device` in `torch_dtype`.

    The family comes from the folder's model_index.json, or from a single file's weight names.

    Args:
        model: "demo", a diffusers folder, a single `.safetensors` file, a hub id, or a `Checkpoint`.
        device: defaults to "cuda" when available, else "cpu".
        torch_dtype: a dtype or its name; defaults to float16 on CUDA and float32 elsewhere.
        revision: a hub branch, tag or commit.
        allow_pickle: also load pickle (.bin) weights where a component has no safetensors ones. Off by default,
            as unpickling can run code; even on, they are read with `torch.load(weights_only=True)`, which
            accepts tensors and refuses other objects.

    Example: `pipe = load_pipeline("demo")`.
    """
    checkpoint = model if isinstance(model, Checkpoint) else resolve_model(model, revision=revision)
    device = check_device(device)
    dtype = parse_dtype(torch_dtype, device)
    index = None if checkpoint.single_file else _model_index(checkpoint)
    cls = _pipeline_class(checkpoint, index)
    if not allow_pickle and not checkpoint.single_file:
        _check_safetensors(checkpoint)
    try:
        with warnings.catch_warnings(), library_logs() as logged:
            # Recent diffusers rename torch_dtype to dtype; the old name still works there and is the only one before.
            warnings.filterwarnings("ignore", message=".*torch_dtype.* is deprecated", category=FutureWarning)
            if checkpoint.single_file:  # resolve_model takes .safetensors files only
                pipe = cls.from_single_file(str(checkpoint.path), torch_dtype=dtype, local_files_only=_offline())
            else:
                # use_safetensors=None prefers safetensors and falls back to pickles, loaded with weights_only=True.
                pipe = cls.from_pretrained(str(checkpoint.path), torch_dtype=dtype, local_files_only=True,
                                           use_safetensors=None if allow_pickle else True, **_absent(index))
        incomplete = [m for m in logged if "newly initialized" in m or "were not initialized" in m]
        if incomplete:  # a checkpoint lacking weights would run on random ones: noise, with a warning at best
            detail = " ".join(incomplete[0].split())[:200]
            raise ModelLoadError(f"cannot load {checkpoint.id!r}: its weights are incomplete ({detail}...); use a "
                                 "complete checkpoint of a supported model")
        if slow_dtype(dtype, device) is None:
            return pipe.to(device)
        warnings.warn(CPU_FLOAT16, UserWarning, stacklevel=2)
        with library_logs():  # diffusers' own warning about it, once per component
            return pipe.to(device)
    except ModelLoadError:
        raise
    except Exception as error:  # a model folder is untrusted input: missing files, broken configs, bad weights
        raise ModelLoadError(_load_failure(checkpoint, error)) from None


@contextlib.contextmanager
def library_logs() -> Iterator[list[str]]:
    """Collect diffusers' and transformers' log warnings in the block instead of printing them, and yield them.

    Errors stay one line; a warning that means the model cannot work (missing weights) becomes the error.
    """
    import logging

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    handler = Collect(logging.WARNING)
    libraries = (diffusers_logging, transformers_logging)
    for lib in libraries:
        lib.disable_default_handler()
        lib.add_handler(handler)
    try:
        yield messages
    finally:
        for lib in libraries:
            lib.remove_handler(handler)
            lib.enable_default_handler()


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """Hide diffusers' and transformers' per-component loading bars inside the block, and restore them after."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    states = [(lib, lib.is_progress_bar_enabled()) for lib in (diffusers_logging, transformers_logging)]
    for lib, _ in states:
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, enabled in states:
            if enabled:
                lib.enable_progress_bar()
