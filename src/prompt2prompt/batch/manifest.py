"""Batch manifests: JSON Lines of jobs, each line checked before any model is loaded.

A line is one job: a source prompt (or a real image and its caption), its edits in the form of
`prompt2prompt.edits`, and the run's settings. `load_manifest` reports every malformed line with its number;
a job's id is, unless given, a hash of its content, so that a restarted run recognises its finished jobs.
A manifest is untrusted input, as a recipe is: its settings are checked by the recipe's checks and bounds
(`prompt2prompt.recipe`, `P2P_ALLOW_LARGE=1` lifts the bounds).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from ..families import MAX_TEXT_LENGTH
from ..limits import CROSS_STEPS, SELF_STEPS
from ..loading import DEMO_MODELS
from ..edits import check_edit_words, edit_from_dict
from ..limits import MAX_STEPS, check_guidance, check_int, check_seed, check_side
from ..recipe import EDIT_FIELDS, INVERSION_OPTIONS, check_edits, check_inversion, file_digest
from ..syntax import PromptSyntaxError, inline_edit

__all__ = ["Job", "Manifest", "ManifestError", "ScoreHook", "load_manifest", "load_score_hook", "parse_job", "plan_groups"]

_EDIT_DEFAULTS = {"mode": "auto", "weights": None, "blend": None}
# Absent windows are the model's (filled when the job's recipe is made); a job's id counts them as the paper's,
# as ids did before models had their own defaults, so that the ids of a run stay as they were.
_ID_WINDOWS = {"cross_steps": CROSS_STEPS, "self_steps": SELF_STEPS}
_JOB_FIELDS = ("id", "model", "source", "image", "edits", "seed", "num_inference_steps", "guidance_scale",
               "negative_prompt", "height", "width", "inversion", "max_sequence_length")
# Names people type from the CLI or other tools, and the manifest's name for each.
_ALIASES = {"steps": "num_inference_steps", "guidance": "guidance_scale", "prompt": "source", "negative": "negative_prompt",
            "cfg": "guidance_scale", "job_id": "id", "to": "edits"}
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")  # used with fullmatch: no trailing newline

ScoreHook = Callable[[Any, Any, str, str], float]


class ManifestError(ValueError):
    """A manifest with malformed lines; the message lists every one with its line number."""


@dataclass(frozen=True)
class Job:
    """One validated manifest line. `spec` is its content, the input of the default id."""

    id: str
    line: int
    model: str
    source: str
    edits: list[dict[str, Any]]
    seed: int | None
    num_inference_steps: int | None  # None: the model's default (50 for SD 1.x/2.x/XL, 28 for SD3 and Flux)
    guidance_scale: float | None
    negative_prompt: str | None = None
    height: int | None = None
    width: int | None = None
    image: dict[str, str] | None = None  # {"path": absolute path, "sha256": ...}
    inversion: dict[str, Any] | None = None  # keyword arguments of `invert()`
    max_sequence_length: int | None = None  # SD3 and Flux: the T5 length (None: the model's default)

    def group_key(self) -> tuple:
        """Jobs with equal keys can share one forward batch; a real image is inverted alone."""
        if self.image is not None:
            return (self.model, "image", self.id)
        return (self.model, self.num_inference_steps, self.guidance_scale, self.height, self.width,
                self.max_sequence_length)


@dataclass
class Manifest:
    """The valid jobs of a manifest, and the errors of the lines that were skipped."""

    path: Path
    jobs: list[Job]
    errors: list[str] = field(default_factory=list)


def _unknown(fields: Iterable[str], known: Sequence[str], what: str) -> str | None:
    unknown = sorted(set(fields) - set(known))
    if not unknown:
        return None
    hints = [f"{name!r} (did you mean {_ALIASES[name]!r}?)" if name in _ALIASES else repr(name) for name in unknown]
    return f"unknown {what} field {', '.join(hints)}; the fields are {', '.join(known)}"


def _normal_edit(edit: Any, index: int) -> dict[str, Any]:
    """An edit as the recipe stores it: every field present but absent windows (the model's), weights as [word,
    weight] pairs (checked later)."""
    where = f"edit {index}"
    if isinstance(edit, str):
        edit = {"prompt": edit}
    if not isinstance(edit, dict):
        raise ValueError(f"{where} must be a prompt string or an object with {', '.join(EDIT_FIELDS)}, not {edit!r}")
    if message := _unknown(edit, EDIT_FIELDS, "edit"):
        raise ValueError(f"{where}: {message}")
    spec = {**_EDIT_DEFAULTS, **edit}
    weights = spec["weights"]
    if isinstance(weights, dict):  # JSON object keys are text; pairs keep word positions as integers
        spec["weights"] = [[word, weight] for word, weight in weights.items()]
    elif weights is not None and not isinstance(weights, list):
        raise ValueError(f"{where}: weights must be an object {{word: weight}} or a list of [word, weight] pairs, "
                         f"not {weights!r}")
    return {name: spec[name] for name in EDIT_FIELDS if name in spec}


def _model_id(model: str, base: Path, where: str) -> str:
    """Local models by absolute path (as the recipe records them); the demo models and hub ids as given."""
    try:
        path = Path(model).expanduser()
        path = path if path.is_absolute() else base / path
        exists = model not in DEMO_MODELS and path.exists()
    except (OSError, ValueError, RuntimeError) as error:  # a NUL, a name too long, "~nobody"
        raise ValueError(f"model {model!r} is neither a usable path nor a hub id ({error})") from None
    if exists:
        return str(path.resolve())
    looks_local = model.startswith((".", "/", "~")) or model.endswith(".safetensors") or model.count("/") > 1
    if looks_local:
        raise ValueError(f"model {model!r} does not exist (relative paths count from {where} {str(base)!r})")
    return model


def _image(value: Any, base: Path) -> dict[str, str]:
    if not isinstance(value, str) or not value:
        raise ValueError(f"image must be a file path, not {value!r}")
    try:
        path = Path(value).expanduser()
        path = (path if path.is_absolute() else base / path).resolve()
        is_file = path.is_file()
    except (OSError, ValueError, RuntimeError) as error:  # a NUL, a name too long, "~nobody"
        raise ValueError(f"image {value!r} is not a usable path ({error})") from None
    if not is_file:
        raise ValueError(f"image {value!r} is not a file (relative paths count from the manifest's folder {str(base)!r})")
    try:
        with Image.open(path):
            pass
        digest = file_digest(path)
    except (OSError, ValueError, Image.DecompressionBombError) as error:  # UnidentifiedImageError is an OSError
        raise ValueError(f"image {value!r} cannot be read as an image: {error}") from None
    return {"path": str(path), "sha256": digest}


def _inversion(value: Any) -> dict[str, Any]:
    spec = {"method": value} if isinstance(value, str) else value
    if not isinstance(spec, dict):
        raise ValueError(f"inversion must be a method name or an object with {', '.join(INVERSION_OPTIONS)}, not {value!r}")
    if message := _unknown(spec, INVERSION_OPTIONS, "inversion"):
        raise ValueError(message)
    return check_inversion(dict(spec))  # no method: the model's default (direct)


def _seed_from(digest: str) -> int:
    return int(digest[:8], 16) % 2**31


def parse_job(data: Any, *, line: int, base: Path, model: str) -> Job:
    """Validate one manifest entry (already JSON-decoded) into a Job; raises ValueError saying what is wrong.

    Relative paths in it count from `base`; `model` is the model of a job that names none, as given.
    """
    if not isinstance(data, dict):
        raise ValueError(f"a job is a JSON object, not {type(data).__name__}")
    if "prompt" in data and "source" not in data:  # "prompt": "a [cat->dog] riding a bicycle", as the CLI takes it
        data = {("source" if name == "prompt" else name): value for name, value in data.items()}
    if message := _unknown(data, _JOB_FIELDS, "job"):
        raise ValueError(message)
    source = data.get("source")
    if not isinstance(source, str) or not source.strip():
        raise ValueError(f"'source' must be the source prompt (the image's caption for an image job), not {source!r}")
    edits = data.get("edits", [])
    if not isinstance(edits, list):
        raise ValueError(f"'edits' must be a list of edits, not {edits!r}")
    try:
        plain, inline = inline_edit(source)  # inline markup, "a [cat->dog] riding a bicycle", makes the first edit
    except PromptSyntaxError as error:  # one line, as every manifest error is
        raise ValueError(f"the source's inline markup, column {error.column}: {error.reason}") from None
    if inline is not None:
        source, edits = plain, [inline, *edits]
    if not edits:
        raise ValueError("the job has no edits: give \"edits\": [\"a dog riding a bicycle\"] (prompts or objects), or "
                         "inline markup in the source, e.g. \"a [cat->dog] riding a bicycle\"")
    edits = check_edits([_normal_edit(edit, i) for i, edit in enumerate(edits, 1)])  # fails here, not on a GPU
    check_edit_words(source, [edit_from_dict(edit) for edit in edits])  # words missing from their prompts, too
    steps = data.get("num_inference_steps")
    guidance = data.get("guidance_scale")
    if steps is not None:
        check_int(steps, "num_inference_steps", 1, MAX_STEPS)
    if guidance is not None:
        guidance = check_guidance(guidance)
    length = data.get("max_sequence_length")
    if length is not None:
        check_int(length, "max_sequence_length", 1, MAX_TEXT_LENGTH)
    negative = data.get("negative_prompt")
    if negative is not None and not isinstance(negative, str):
        raise ValueError(f"negative_prompt must be a string, not {negative!r}")
    for name in ("height", "width"):
        check_side(data.get(name), name)
    model_name = data.get("model")
    if model_name is not None and (not isinstance(model_name, str) or not model_name):
        raise ValueError(f"model must be a hub id, a local path or 'demo', not {model_name!r}")
    content: dict[str, Any] = {
        "model": model if model_name is None else _model_id(model_name, base, "the manifest's folder"),
        "source": source, "edits": [{**_ID_WINDOWS, **edit} for edit in edits],
        # Absent steps and guidance are the defaults of the jobs' ids before SD3 and Flux came: ids stay as they were.
        "num_inference_steps": 50 if steps is None else steps, "guidance_scale": 7.5 if guidance is None else guidance,
        "negative_prompt": negative, "height": data.get("height"), "width": data.get("width"),
    }
    if length is not None:
        content["max_sequence_length"] = length
    image = inversion = None
    seed = data.get("seed")
    if "image" in data:
        if seed is not None:
            raise ValueError("seed does not apply to an image job: the inversion supplies the initial latent")
        image = _image(data["image"], base)
        inversion = _inversion(data.get("inversion", {}))
        # the content, wherever the file lives; no method was null-text's before SD3 and Flux came
        content.update(image=image["sha256"], inversion={"method": "null-text", **inversion})
    elif "inversion" in data:
        raise ValueError("'inversion' needs an 'image' to invert")
    else:
        check_seed(seed)
    content["seed"] = seed
    digest = hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    job_id = data.get("id", digest[:16])
    if not isinstance(job_id, str) or not _ID.fullmatch(job_id):
        raise ValueError(f"id must be 1-100 letters, digits, '.', '_' or '-' (starting with a letter or digit), "
                         f"not {job_id!r}")
    if image is None and seed is None:
        seed = _seed_from(digest)  # stable across restarts, different across jobs
    return Job(id=job_id, line=line, model=content["model"], source=source, edits=edits, seed=seed,
               num_inference_steps=steps, guidance_scale=guidance, negative_prompt=negative,
               height=content["height"], width=content["width"], image=image, inversion=inversion,
               max_sequence_length=length)


def load_manifest(path: str | os.PathLike, *, model: str = "demo", skip_invalid: bool = False) -> Manifest:
    """Read and validate a JSON Lines manifest; every malformed line is reported with its number.

    Args:
        path: the manifest; relative image and model paths in it count from its folder.
        model: the model of jobs that name none (a relative path counts from the current folder).
        skip_invalid: keep the valid jobs and list the errors in `Manifest.errors` instead of raising.

    Example: `jobs = load_manifest("edits.jsonl").jobs`.
    """
    path = Path(path)
    if path.exists() and not path.is_file():  # a pipe or a device would block the read forever
        raise ManifestError(f"{str(path)!r} is not a regular file (a folder, a pipe or a device); pass a manifest file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ManifestError(f"cannot read the manifest {str(path)!r}: {error}") from None
    base = path.resolve().parent
    try:
        model = _model_id(model, Path.cwd(), "the current folder")
    except ValueError as error:
        raise ManifestError(f"--model: {error}") from None
    jobs: list[Job] = []
    errors: list[str] = []
    lines_of: dict[str, int] = {}
    for number, text_line in enumerate(text.splitlines(), 1):
        if not text_line.strip():
            continue
        try:
            job = parse_job(json.loads(text_line), line=number, base=base, model=model)
        except json.JSONDecodeError as error:
            errors.append(f"{path}:{number}: not valid JSON ({error.msg} at column {error.colno})")
            continue
        except RecursionError:
            errors.append(f"{path}:{number}: not valid JSON (nested too deeply)")
            continue
        except ValueError as error:
            if "integer string conversion" in str(error):  # Python's advice (raise a global limit) is not ours
                error = ValueError("an integer of more than 4300 digits, which no field takes")
            errors.append(f"{path}:{number}: {error}")
            continue
        if job.id in lines_of:
            errors.append(f"{path}:{number}: job id {job.id!r} is already line {lines_of[job.id]}'s; "
                          "give one of them another explicit 'id' (or drop the duplicate)")
            continue
        lines_of[job.id] = number
        jobs.append(job)
    if not jobs and not errors:
        errors.append(f"{path}: the manifest has no jobs; write one JSON object per line")
    if errors and not skip_invalid:
        raise ManifestError(f"{len(errors)} invalid line(s) in the manifest (fix them, or pass --skip-invalid "
                            "to run the rest):\n" + "\n".join(errors))
    return Manifest(path=path, jobs=jobs, errors=errors)


def plan_groups(jobs: Sequence[Job], batch_size: int) -> list[list[Job]]:
    """Jobs that share a model and settings, in manifest order, cut into groups of at most `batch_size`.

    >>> [len(g) for g in plan_groups([], 4)]
    []
    """
    by_key: dict[tuple, list[Job]] = {}
    for job in jobs:
        by_key.setdefault(job.group_key(), []).append(job)
    groups: list[list[Job]] = []
    for members in by_key.values():
        groups += [members[i : i + batch_size] for i in range(0, len(members), batch_size)]
    # Grouped by model first, so that a worker switches model as rarely as the manifest allows.
    return sorted(groups, key=lambda g: (g[0].model, g[0].line))


def load_score_hook(spec: str) -> ScoreHook:
    """Import a scoring function given as "package.module:function"."""
    module_name, sep, name = spec.partition(":")
    if not sep or not module_name or not name:
        raise ValueError(f"a score hook is given as 'package.module:function', not {spec!r}")
    try:
        hook = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"cannot import the score hook {spec!r}: {error}") from None
    if not callable(hook):
        raise ValueError(f"the score hook {spec!r} is not callable")
    return hook
