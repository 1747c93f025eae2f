"""The options the commands share, and the parsing and checks of option values that need no model: seeds, numbers,
windows, word weights, blends, and the edit specs they make.

Only modules that import no torch, at the top: `p2p --help` (and a usage error) answers at once.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ..syntax import edit_prompt, inline_edit
from .errors import UsageError

if TYPE_CHECKING:
    from ..engine import Editor

__all__ = ["AllowPickleOption", "DeviceOption", "DtypeOption", "GuidanceOption", "ModelOption", "OutOption",
           "SchedulerOption", "SeedOption", "SeedsOption", "SequenceOption", "StepsOption", "check_edits",
           "check_numbers", "edit_specs", "seed_list", "sequence_length"]

ModelOption = Annotated[str, typer.Option(
    "--model", envvar="P2P_MODEL", help="Hub id, diffusers folder, .safetensors file, or 'demo'.")]
DeviceOption = Annotated[str | None, typer.Option(help="cuda, cpu, ... [default: cuda if available, else cpu]")]
DtypeOption = Annotated[str, typer.Option(help="float32, float16, bfloat16, or auto (float16 on cuda, else float32).")]
StepsOption = Annotated[int | None, typer.Option(
    "--steps", min=1, help="Denoising steps [default: the model's: 30 for the demo model, 50 for SD 1.x/2.x/XL, 28 "
                          "for SD3 and Flux].",
    show_default=False)]
GuidanceOption = Annotated[float | None, typer.Option(
    "--guidance", help="Guidance scale [default: the model's: 5 for the demo model, 7.5 for SD 1.x/2.x/XL, 7.0 for "
                       "SD3, 4.0 for Qwen-Image and FLUX.2 klein, 5.0 for Z-Image; Flux: its embedded guidance, 3.5; "
                       "FLUX.2 dev: its embedded guidance, 4.0]; <= 1 turns classifier-free guidance off (Z-Image: "
                       "<= 0; it guides at any value above 0).",
    show_default=False)]
SequenceOption = Annotated[int | None, typer.Option(
    "--max-sequence-length", min=1, help="Models with T5 text: its length [default: the model's: 256 for SD3, 512 "
                                         "for Flux and Chroma, 300 for PixArt-Σ; FLUX.2 klein: its templated "
                                         "text's, 512; FLUX.2 dev: its templated Mistral text's, padded on the "
                                         "left, 512]; Qwen-Image: the most tokens a prompt may take [512]; "
                                         "Z-Image: the most tokens its templated text may take [512] (the model "
                                         "pads each caption to a multiple of 32 itself). At most the model's own "
                                         "bound.",
    show_default=False)]
SeedOption = Annotated[int | None, typer.Option(min=0, max=2**63 - 1,
                                                help="Seed of the initial latent [default: random, recorded].")]
AllowPickleOption = Annotated[bool, typer.Option(
    "--allow-pickle", help="Also load pickle (.bin) weights, with torch.load(weights_only=True). Off: safetensors "
                           "only, since a pickle can run code.")]
SeedsOption = Annotated[str | None, typer.Option(
    help="Several seeds, comma-separated (1,2,3): the model loads once, each seed gets its own run folder and grid.",
    show_default=False)]
SchedulerOption = Annotated[str | None, typer.Option(
    help="One of the model's compatible schedulers, by class name (EulerDiscreteScheduler) or short name (ddim, "
         "euler, euler-a, dpm++, ...); recorded in the recipe [default: the model's].", show_default=False)]
OutOption = Annotated[Path, typer.Option(help="Parent folder: each run goes into a new numbered folder in it.")]


def sequence_length(editor: Editor, length: int | None) -> int | None:
    """--max-sequence-length, refused on a model without T5 text rather than ignored."""
    family = editor.family
    if length is not None and not family.takes_max_sequence_length:
        raise UsageError(f"--max-sequence-length is a T5 length (Qwen-Image's bound on a prompt's tokens): "
                         f"{family.title} models have none")
    if length is not None and family.max_text_length is not None and length > family.max_text_length:
        raise UsageError(f"--max-sequence-length must be at most {family.max_text_length} on {family.title} models, "
                         f"not {length}")
    return length


def check_numbers(steps: int | None, guidance: float | None, height: int | None = None,
                  width: int | None = None) -> None:
    """The run's numbers, checked as a recipe's are, before any model loads (None: the model's default)."""
    from ..limits import MAX_STEPS, check_guidance, check_int, check_side

    if steps is not None:
        check_int(steps, "--steps", 1, MAX_STEPS)
    if guidance is not None:
        check_guidance(guidance)
    check_side(height, "--height")
    check_side(width, "--width")


def seed_list(seed: int | None, seeds: str | None, *, image: bool) -> list[int | None]:
    """The seeds to run: --seed's, --seeds' (comma-separated), or one random one; None for a real image."""
    if seeds is not None and seed is not None:
        raise UsageError("--seed and --seeds exclude each other: one seed with --seed 7, several with --seeds 1,2,3")
    if image:
        if seed is not None or seeds is not None:
            option = "--seed" if seed is not None else "--seeds"
            raise UsageError(f"{option} does not apply to --image: the inversion supplies the initial latent")
        return [None]
    if seeds is None:
        return [secrets.randbelow(2**31) if seed is None else seed]
    parsed = []
    for text in seeds.split(","):
        if not text.strip().isdigit() or int(text) >= 2**63:
            raise UsageError(f"--seeds takes seeds from 0 to 2**63 - 1, comma-separated (e.g. 1,2,3), not {seeds!r}")
        if int(text) in parsed:
            raise UsageError(f"--seeds names the seed {int(text)} twice: its runs would be the same")
        parsed.append(int(text))
    return parsed


def check_edits(source: str, specs: list[dict[str, Any]]) -> None:
    """Check the edits as far as no model is needed, so that a bad option or a misspelt word fails at once."""
    from ..edits import check_edit_words, edit_from_dict

    try:
        check_edit_words(source, [edit_from_dict(spec) for spec in specs])
    except ValueError as error:
        raise UsageError(str(error).replace("use mode refine", "use --mode refine")) from None


def _pairs(text: str, option: str, parse) -> tuple[str, Any]:
    word, sep, value = text.partition("=")
    if not sep or not word:
        raise UsageError(f"{option} takes word=value, not {text!r} (e.g. {option} lion=0.4)")
    try:
        return word, parse(value)
    except ValueError:
        raise UsageError(f"{option} {text!r}: {value!r} is not a valid value") from None


def _window(text: str, option: str) -> float | list[float]:
    """'0.8' (from the start to 0.8) or '0.2:0.8'."""
    try:
        if ":" in text:
            start, end = text.split(":")
            return [float(start), float(end)]
        return float(text)
    except ValueError:
        raise UsageError(f"{option} takes a fraction like 0.8 or a window like 0.2:0.8, not {text!r}") from None


def _words(text: str) -> list[str]:
    return [word for word in text.split(",") if word]


def edit_specs(
    prompt: str, to: list[str], *, mode: str, cross: str | None, cross_words: list[str], self_steps: str | None,
    blend: str | None, weights: list[str], blend_threshold: float | None = None,
) -> tuple[str, list[dict[str, Any]]]:
    """The source prompt and the recipe's edit specs for `p2p edit`'s arguments.

    The prompt may carry inline markup ("a [cat->dog]", "(fluffy:2)"), which makes the first edit; each
    `--to` adds one more. Options other than the prompts apply to every edit. A window or threshold not given
    is left out of the spec: `recipe_for` fills it with the model's default.
    """
    from ..edits import MODES

    if mode not in MODES:
        raise UsageError(f"--mode must be one of {', '.join(MODES)}, not {mode!r}")
    source, inline = inline_edit(prompt)
    cross_steps: Any = None if cross is None else _window(cross, "--cross")
    if cross_words:
        per_word = dict(_pairs(t, "--cross-word", lambda v: _window(v, "--cross-word")) for t in cross_words)
        cross_steps = ({} if cross_steps is None else {"default": cross_steps}) | per_word
    word_weights = [list(_pairs(t, "--weight", float)) for t in weights]
    blend_spec = None
    if blend is not None:
        source_words, sep, edit_words = blend.partition(":")
        if not sep or not _words(source_words) or not _words(edit_words):
            raise UsageError(f"--blend takes source_words:edit_words (comma-separated), not {blend!r}; e.g. cat:dog")
        blend_spec = {"source_words": _words(source_words), "edit_words": _words(edit_words)}
        if blend_threshold is not None:
            blend_spec["threshold"] = blend_threshold

    prompts = [] if inline is None else [inline]
    for text in to:
        if not text.strip():
            raise UsageError("--to takes an edit prompt, and this one is empty; e.g. --to 'a dog riding a bicycle'")
        prompts.append(edit_prompt(text, what="--to"))
    if not prompts and word_weights:
        prompts.append({"prompt": source, "weights": None})  # a pure reweight of the source
    if not prompts:
        raise UsageError("nothing to edit: add --to 'an edit prompt', or inline markup such as 'a [cat->dog]', "
                         "'a mountain[+ at winter]' or 'a (fluffy:2) bear'")
    specs = []
    for edit in prompts:
        pairs = (edit["weights"] or []) + word_weights
        spec = {"prompt": edit["prompt"], "mode": mode, "cross_steps": cross_steps,
                "self_steps": None if self_steps is None else _window(self_steps, "--self"),
                "weights": pairs or None, "blend": blend_spec}
        specs.append({name: value for name, value in spec.items()
                      if value is not None or name not in ("cross_steps", "self_steps")})
    return source, specs
