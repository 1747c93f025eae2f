"""The `p2p` command line: edit by typing, see the attention, replay any result, serve the web app.

Exit codes: 0 ok, 2 usage error (bad arguments, prompts or words), 1 runtime error (model, files, device).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import secrets
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

# torch._dynamo, which diffusers imports, makes $TMPDIR/torchinductor_<user> as it is imported. `p2p` compiles
# nothing, so that cache points at the temp folder itself, which exists: a command makes no folder outside --out.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.gettempdir())

import typer  # noqa: E402 (after the environment above)
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

# Only modules that import no torch, at the top: `p2p --help` (and a usage error) answers at once. The engine,
# the loaders and the recipes (torch, diffusers) are imported inside the commands that run a model.
from .files import LATEST, run_slug, write_folder_atomic
from .limits import BLEND_THRESHOLD, CROSS_STEPS, SELF_STEPS
from .syntax import PromptSyntaxError, parse_prompt

if TYPE_CHECKING:
    from .loading import ModelSource
    from .recipe import Recipe

console = Console(stderr=True, soft_wrap=True)


# click's exceptions, wherever this typer takes click from (recent typers carry their own copy)
_CLICK_ERRORS = sys.modules[typer.BadParameter.__module__]


class _Commands(typer.core.TyperGroup):
    """The `p2p` group: click's own usage errors (a bad option value, an unknown option) are one line too."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except getattr(_CLICK_ERRORS, "NoArgsIsHelpError", ()) as error:
            error.show()  # the help text, as `p2p` alone asks for
            sys.exit(error.exit_code)
        except _CLICK_ERRORS.ClickException as error:
            context = getattr(error, "ctx", None)
            _print_error(error.format_message() + (f" (see '{context.command_path} --help')" if context else ""))
            sys.exit(error.exit_code)
        except typer.Abort:
            _print_error("aborted")
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)  # an Exit's code; a command that returns gives None


app = typer.Typer(
    # No rich markup in help: prompts and defaults are written in square brackets, which rich would swallow.
    cls=_Commands, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
    help="Prompt-to-Prompt: edit images by editing their prompt.",
)

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


WIDE_BLEND = 0.98  # a blend mask covering this share of the image (or more) keeps nothing of the source
MAX_SHOWN_FAILURES = 20  # failed jobs whose errors `p2p batch` prints; the index has them all
MAX_SHOWN_LINES = 10  # manifest lines that a warning of `p2p batch` names; it counts the rest


class UsageError(ValueError):
    """Bad arguments: exit code 2."""


@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    """Print any error as one message, never a traceback, and exit 2 (bad input) or 1 (runtime).

    Anything else than a ValueError, OSError or RuntimeError (a bug, most likely) is printed as `TypeName: message`.
    """
    try:
        yield
    except (typer.Exit, typer.Abort):  # click's own exits subclass RuntimeError: let them through untouched
        raise
    except ValueError as error:  # includes PromptSyntaxError, RecipeError and the engine's input checks
        _print_error(error)
        raise typer.Exit(2) from None
    except (OSError, RuntimeError) as error:  # includes ModelLoadError and NaN results
        _print_error(error)
        raise typer.Exit(1) from None
    except Exception as error:
        _print_error(f"{type(error).__name__}: {error}")
        raise typer.Exit(1) from None


def _say(label: str, style: str, text: str) -> None:
    """`label text` on stderr, the label in `style`, the text exactly as given: never read as rich markup, whose
    escapes would eat a backslash before '[' (prompts and paths hold both) and shift a caret under its column."""
    console.print(Text.assemble((label, style), " ", text), highlight=False)


def _warn(note: str | None) -> None:
    """`warning: note` (nothing when `note` is None): the run goes ahead."""
    if note:
        _say("warning:", "yellow", note)


def _print_error(error: Exception | str) -> None:
    """`error: message` on one line; a prompt syntax error keeps its caret under the column, below."""
    _say("error:", "red", str(error) if isinstance(error, PromptSyntaxError) else " ".join(str(error).split()))


@contextlib.contextmanager
def _output_folder(out: Path) -> Iterator[None]:
    """Create the --out folder before any model loads, so that a path that cannot be one fails at once; if the
    block then fails, the folders made here are removed again (those still empty)."""
    made = []  # what `mkdir -p out` creates, deepest first
    folder = out
    while not (folder.exists() or folder.is_symlink()) and folder.parent != folder:
        made.append(folder)
        folder = folder.parent
    if not folder.is_dir():
        raise NotADirectoryError(f"cannot write into --out {str(out)!r}: {str(folder)!r} is a file; pass another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        reason = error.strerror or error
        raise type(error)(f"cannot write into --out {str(out)!r}: {reason}; pass another --out") from None
    try:
        if not os.access(out, os.W_OK | os.X_OK):
            raise PermissionError(f"cannot write into --out {str(out)!r}: it is not writable; pass another --out")
        yield
    except BaseException:
        for created in made:
            with contextlib.suppress(OSError):  # not empty: the run wrote something there
                created.rmdir()
        raise


def _sequence_length(editor, length: int | None) -> int | None:
    """--max-sequence-length, refused on a model without T5 text rather than ignored."""
    family = editor.family
    if length is not None and not family.takes_max_sequence_length:
        raise UsageError(f"--max-sequence-length is a T5 length (Qwen-Image's bound on a prompt's tokens): "
                         f"{family.title} models have none")
    if length is not None and family.max_text_length is not None and length > family.max_text_length:
        raise UsageError(f"--max-sequence-length must be at most {family.max_text_length} on {family.title} models, "
                         f"not {length}")
    return length


def _check_numbers(steps: int | None, guidance: float | None, height: int | None = None, width: int | None = None) -> None:
    """The run's numbers, checked as a recipe's are, before any model loads (None: the model's default)."""
    from .recipe import MAX_STEPS, check_guidance, check_int, check_side

    if steps is not None:
        check_int(steps, "--steps", 1, MAX_STEPS)
    if guidance is not None:
        check_guidance(guidance)
    check_side(height, "--height")
    check_side(width, "--width")


def _seed_list(seed: int | None, seeds: str | None, *, image: bool) -> list[int | None]:
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


# Short names of common schedulers, each the classes it stands for, the first one the pipeline takes wins (SD's
# Euler is EulerDiscreteScheduler, SD3's and Flux's FlowMatchEulerDiscreteScheduler).
SCHEDULER_NAMES = {
    "ddim": ("DDIMScheduler",), "ddpm": ("DDPMScheduler",), "pndm": ("PNDMScheduler",), "lms": ("LMSDiscreteScheduler",),
    "euler": ("EulerDiscreteScheduler", "FlowMatchEulerDiscreteScheduler"), "euler-a": ("EulerAncestralDiscreteScheduler",),
    "heun": ("HeunDiscreteScheduler", "FlowMatchHeunDiscreteScheduler"), "dpm++": ("DPMSolverMultistepScheduler",),
    "unipc": ("UniPCMultistepScheduler",), "deis": ("DEISMultistepScheduler",),
}


def scheduler_class(name: str, compatibles) -> type:
    """The scheduler class among `compatibles` that `name` names: a class name (any case, "Scheduler" optional)
    or a short name of SCHEDULER_NAMES. A UsageError lists the choices otherwise."""
    by_name = {cls.__name__: cls for cls in compatibles}
    key = name.strip().lower()
    for class_name, cls in by_name.items():
        if key in (class_name.lower(), class_name.lower().removesuffix("scheduler")):
            return cls
    for class_name in SCHEDULER_NAMES.get(key, ()):
        if class_name in by_name:
            return by_name[class_name]
    short = [short for short, names in SCHEDULER_NAMES.items() if any(n in by_name for n in names)]
    raise UsageError(f"--scheduler {name!r} is not one this model takes; choose one of {', '.join(short)}"
                     f"{' or ' if short else ''}{', '.join(sorted(by_name))}")


def _use_scheduler(editor, name: str | None) -> None:
    """Put the scheduler that --scheduler names on the pipeline, configured as the model's; the recipe records it."""
    if name is not None:
        pipe = editor.pipe
        pipe.scheduler = scheduler_class(name, pipe.scheduler.compatibles).from_config(pipe.scheduler.config)


class _StepBar:
    """Stands in for diffusers' tqdm bar (`with pipe.progress_bar(total=n) as bar: bar.update()`) on a rich task."""

    def __init__(self, progress: Progress, description: str, total: int | None):
        self.progress = progress
        self.task = progress.add_task(description, total=total)

    def __enter__(self) -> _StepBar:
        return self

    def __exit__(self, *exc) -> None:
        self.progress.update(self.task, visible=False)

    def update(self, n: int = 1) -> None:
        self.progress.advance(self.task, n)


@contextlib.contextmanager
def _progress(pipe, description: str) -> Iterator[None]:
    """Show the pipeline's denoising steps as a rich progress bar on a terminal, as tqdm's lines elsewhere (a log,
    a pipe), as the inversions show theirs."""
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=console, transient=True, disable=not console.is_terminal)

    def progress_bar(iterable=None, total=None):
        if not console.is_terminal:
            from tqdm.auto import tqdm

            return tqdm(iterable, total=total, desc=description)
        if iterable is not None:
            return progress.track(iterable, description=description)
        return _StepBar(progress, description, total)

    pipe.progress_bar = progress_bar  # an instance attribute shadows DiffusionPipeline.progress_bar
    try:
        with progress:
            yield
    finally:
        del pipe.progress_bar


def resolve_model(model: str, *, revision: str | None = None) -> ModelSource:
    """`loading.resolve_model`, imported when a command needs it (loading imports torch)."""
    from . import loading

    return loading.resolve_model(model, revision=revision)


def load_editor(source: ModelSource, **options: Any):
    """`engine.load_editor`, imported when a command needs it (the engine imports torch and diffusers)."""
    from . import engine

    return engine.load_editor(source, **options)


def _load_editor(model: str, device: str | None, dtype: str, *, revision: str | None = None,
                 allow_pickle: bool = False):
    """Load `model` behind one spinner; a download, before it, keeps its own progress bars."""
    from .loading import CPU_FLOAT16, check_device, parse_dtype, slow_dtype

    checked = check_device(device)
    note = slow_dtype(parse_dtype(dtype, checked), checked)  # a bad --device or --dtype fails before any download
    source = resolve_model(model, revision=revision)
    if note:  # said here once, as the CLI says things, instead of load_pipeline's Python warning
        console.print(f"[yellow]warning:[/yellow] {note} (--dtype float32)", highlight=False)
    with console.status(f"loading {model} ..."), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=re.escape(CPU_FLOAT16))
        return load_editor(source, device=device, dtype=dtype, allow_pickle=allow_pickle)


def _check_edits(source: str, specs: list[dict[str, Any]]) -> None:
    """Check the edits as far as no model is needed, so that a bad option or a misspelt word fails at once."""
    from .edits import check_edit_words, edit_from_dict

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
    from .edits import MODES

    if mode not in MODES:
        raise UsageError(f"--mode must be one of {', '.join(MODES)}, not {mode!r}")
    parsed = parse_prompt(prompt)
    cross_steps: Any = None if cross is None else _window(cross, "--cross")
    if cross_words:
        cross_steps = ({} if cross_steps is None else {"default": cross_steps}) | dict(_pairs(t, "--cross-word", lambda v: _window(v, "--cross-word"))
                                                       for t in cross_words)
    word_weights = [list(_pairs(t, "--weight", float)) for t in weights]
    blend_spec = None
    if blend is not None:
        source_words, sep, edit_words = blend.partition(":")
        if not sep or not _words(source_words) or not _words(edit_words):
            raise UsageError(f"--blend takes source_words:edit_words (comma-separated), not {blend!r}; e.g. cat:dog")
        blend_spec = {"source_words": _words(source_words), "edit_words": _words(edit_words)}
        if blend_threshold is not None:
            blend_spec["threshold"] = blend_threshold

    prompts: list[tuple[str, dict[int, float]]] = []
    if parsed.edit is not None:
        prompts.append((parsed.edit, parsed.weights))
    for text in to:
        if not text.strip():
            raise UsageError("--to takes an edit prompt, and this one is empty; e.g. --to 'a dog riding a bicycle'")
        target = parse_prompt(text)
        if target.edit is not None and target.edit != target.source:
            raise UsageError(f"--to takes an edit prompt, optionally with (word:weight) groups, not [old->new] "
                             f"markup: {text!r}; put the markup in the source prompt instead")
        prompts.append((target.source, target.weights))
    if not prompts and word_weights:
        prompts.append((parsed.source, {}))  # a pure reweight of the source
    if not prompts:
        raise UsageError("nothing to edit: add --to 'an edit prompt', or inline markup such as 'a [cat->dog]', "
                         "'a mountain[+ at winter]' or 'a (fluffy:2) bear'")
    specs = []
    for edit_prompt, inline_weights in prompts:
        pairs = [[position, weight] for position, weight in inline_weights.items()] + word_weights
        spec = {"prompt": edit_prompt, "mode": mode, "cross_steps": cross_steps,
                "self_steps": None if self_steps is None else _window(self_steps, "--self"),
                "weights": pairs or None, "blend": blend_spec}
        specs.append({name: value for name, value in spec.items()
                      if value is not None or name not in ("cross_steps", "self_steps")})
    return parsed.source, specs


@app.command()
def edit(
    prompt: Annotated[str | None, typer.Argument(help="Source prompt, optionally with inline edits: 'a [cat->dog]'.",
                                                 show_default=False)] = None,
    to: Annotated[list[str], typer.Option("--to", help="An edit prompt (repeatable).")] = [],  # noqa: B006
    source_prompt: Annotated[str | None, typer.Option("--prompt", help="Source prompt (instead of the argument).",
                                                      show_default=False)] = None,
    mode: Annotated[str, typer.Option(help="auto, replace or refine.")] = "auto",
    model: ModelOption = "demo",
    steps: StepsOption = None,
    guidance: GuidanceOption = None,
    max_sequence_length: SequenceOption = None,
    seed: SeedOption = None,
    seeds: SeedsOption = None,
    scheduler: SchedulerOption = None,
    cross: Annotated[str | None, typer.Option(help="Cross-attention window: 0.8 or 0.2:0.8 [default: the model's; "
                                                   f"{CROSS_STEPS} (the paper's) unless its files say otherwise].",
                                              show_default=False)] = None,
    cross_word: Annotated[list[str], typer.Option("--cross-word", help="Per-word window: lion=0.4 (repeatable).")] = [],  # noqa: B006
    self_steps: Annotated[str | None, typer.Option("--self", help="Self-attention window: 0.4 or 0.1:0.4 [default: the "
                                                          f"model's; {SELF_STEPS} (the paper's) unless its files say "
                                                          "otherwise].", show_default=False)] = None,
    blend: Annotated[str | None, typer.Option(help="Local blend words, source:edit, e.g. cat:dog.",
                                              show_default=False)] = None,
    blend_threshold: Annotated[float | None, typer.Option(
        min=0, max=1, help="Local blend's mask threshold, on the max-normalised attention [default: the model's; "
                           f"{BLEND_THRESHOLD} (the paper's) unless its files say otherwise].", show_default=False)] = None,
    weight: Annotated[list[str], typer.Option("--weight", help="Reweight a word: word=2.0 (repeatable).")] = [],  # noqa: B006
    negative: Annotated[str | None, typer.Option(help="Negative prompt.", show_default=False)] = None,
    height: Annotated[int | None, typer.Option(help="Image height in px [default: the model's].")] = None,
    width: Annotated[int | None, typer.Option(help="Image width in px [default: the model's].")] = None,
    image: Annotated[Path | None, typer.Option(help="A real image to edit (with --prompt as its caption).",
                                               exists=True, dir_okay=False, show_default=False)] = None,
    inversion: Annotated[str | None, typer.Option(help="Inversion method for --image: direct, null-text, negative-prompt "
                                                       "or ddim on SD 1.x/2.x/XL; direct or euler on SD3, Flux and Chroma "
                                                       "[default: direct, exact and the fastest].",
                                                  show_default=False)] = None,
    device: DeviceOption = None,
    dtype: DtypeOption = "auto",
    allow_pickle: AllowPickleOption = False,
    out: OutOption = Path("outputs"),
) -> None:
    """Edit a prompt: writes the source, each edit and a labelled grid, each PNG carrying its recipe, into a new
    numbered folder under --out (outputs/0001-a-cat-seed7/; outputs/latest links to the newest).

    \b
    Inline syntax in the prompt (the source and its first edit in one string):
      a [cat->dog] riding a bicycle        word swap
      a house on a mountain[+ at winter]   refinement: words added
      a [- fluffy] cat                     refinement: words removed
      a (fluffy:2.5) teddy bear            reweighting (negative weights allowed)
      \\[ \\] \\( \\)                          literal brackets
    More edits: --to 'another prompt' (repeatable). Steps, guidance, windows and
    the blend threshold default to the model's own (the demo model's: 30 steps,
    guidance 5); the command prints those it used. On the demo model (circles,
    squares, triangles and stars in five colours; a word it never saw gets a
    warning):
      p2p edit "a big [red->purple] circle in the center on a white background"
      p2p edit "a big red [circle->star] in the center on a white background"
    """
    with _user_errors():
        if (prompt is None) == (source_prompt is None):
            raise UsageError("give the source prompt either as the argument or as --prompt, exactly once")
        from .families.defaults import vocabulary_notice
        from .recipe import file_digest, inversion_available, recipe_for, run_recipe, save_result

        _check_numbers(steps, guidance, height, width)
        run_seeds = _seed_list(seed, seeds, image=image is not None)
        real: dict[str, Any] = {}
        if image is not None:
            if not inversion_available():
                raise UsageError("--image needs real-image inversion, which this install of prompt2prompt lacks")
            if scheduler is not None:
                raise UsageError("--scheduler does not apply to --image: an inversion is edited on the scheduler it "
                                 "was made with")
            real = dict(image={"path": str(image.resolve()), "sha256": file_digest(image)},
                        inversion={} if inversion is None else {"method": inversion})
        source, specs = edit_specs(source_prompt if prompt is None else prompt, to, mode=mode, cross=cross,
                                   cross_words=cross_word, self_steps=self_steps, blend=blend, weights=weight,
                                   blend_threshold=blend_threshold)
        _check_edits(source, specs)
        with _output_folder(out):
            editor, model_source = _load_editor(model, device, dtype, allow_pickle=allow_pickle)
            _use_scheduler(editor, scheduler)
            unknown = vocabulary_notice(editor.defaults.vocabulary, [source, *(spec["prompt"] for spec in specs)])
            fitted = None
            if image is not None:
                from .images import fit_note, image_size, load_image

                fitted = fit_note(load_image(image).size, *image_size(editor.pipe, height=height, width=width))
            for index, seed in enumerate(run_seeds):  # one model load for every seed; a run folder each
                used: list[str] = []
                recipe = recipe_for(
                    editor, model_source, used=used, source=source, edits=specs, seed=seed, num_inference_steps=steps,
                    guidance_scale=guidance, negative_prompt=negative, height=height, width=width,
                    max_sequence_length=_sequence_length(editor, max_sequence_length), **real,
                )
                with _progress(editor.pipe, "editing" if len(run_seeds) == 1 else f"seed {seed}"):
                    result = run_recipe(recipe, editor)
                folder, paths = _publish(out, recipe, save_result, result.images)
                _report(folder, paths, recipe.seed)
                if index == 0:  # after the run: a failed one prints its error alone
                    _say_defaults(used)
                    if fitted:
                        _say("note:", "cyan", f"{image}: {fitted}")
                    _warn(unknown)
                _warn_wide_blends(result.masks)


def _warn_wide_blends(masks: dict) -> None:
    """Say so when a local blend's mask covers (almost) the whole image: the blend then changes nothing."""
    for e, mask in sorted(masks.items()):
        share = float(mask.float().mean())
        if share >= WIDE_BLEND:
            console.print(f"[yellow]warning:[/yellow] the local blend of edit {e + 1} covers {share:.0%} of the image, "
                          "so it keeps nothing of the source; raise --blend-threshold (e.g. 0.6) to confine it",
                          highlight=False)


@app.command()
def attention(
    prompt: Annotated[str, typer.Argument(help="The prompt whose attention to show.", show_default=False)],
    res: Annotated[int | None, typer.Option(min=1, help="Layer side to record [default: latent side / 4].")] = None,
    model: ModelOption = "demo",
    steps: StepsOption = None,
    guidance: GuidanceOption = None,
    max_sequence_length: SequenceOption = None,
    seed: SeedOption = None,
    scheduler: SchedulerOption = None,
    negative: Annotated[str | None, typer.Option(help="Negative prompt.", show_default=False)] = None,
    device: DeviceOption = None,
    dtype: DtypeOption = "auto",
    allow_pickle: AllowPickleOption = False,
    out: OutOption = Path("outputs"),
) -> None:
    """Per-token cross-attention heatmaps over the generated image, as a grid PNG, in a new folder under --out."""
    with _user_errors():
        from .families.defaults import vocabulary_notice
        from .recipe import recipe_for, run_recipe

        source = parse_prompt(prompt)
        if source.edit is not None:
            raise UsageError(f"attention takes a plain prompt, without edit markup: {prompt!r}")
        _check_numbers(steps, guidance)
        with _output_folder(out):
            editor, model_source = _load_editor(model, device, dtype, allow_pickle=allow_pickle)
            _use_scheduler(editor, scheduler)
            used = []
            recipe = recipe_for(
                editor, model_source, used=used, source=source.source, edits=[],
                seed=secrets.randbelow(2**31) if seed is None else seed, num_inference_steps=steps,
                guidance_scale=guidance, negative_prompt=negative, kind="attention", record_attention=res or True,
                max_sequence_length=_sequence_length(editor, max_sequence_length),
            )
            with _progress(editor.pipe, "generating"):
                result = run_recipe(recipe, editor)
            folder, paths = _publish(out, recipe, save_attention, result)
            _report(folder, paths, recipe.seed)
            _say_defaults(used)  # after the run, as the warning: a failed run prints its error alone
            _warn(vocabulary_notice(editor.defaults.vocabulary, [source.source]))


def save_attention(result, recipe: Recipe, out_dir: Path) -> list[Path]:
    """Write image.png and attention.png (the per-token heatmap grid), each carrying the recipe."""
    import prompt2prompt as p2p
    from .recipe import save_png

    out_dir.mkdir(parents=True, exist_ok=True)
    res = None if recipe.record_attention is True else recipe.record_attention
    heatmaps = p2p.attention_heatmaps(result, prompt_index=0, res=res)
    grid = p2p.image_grid(heatmaps, cols=min(len(heatmaps), 8), width=max(result.images[0].width, 128))
    return [save_png(result.images[0], out_dir / "image.png", recipe.with_index(0)),
            save_png(grid, out_dir / "attention.png", recipe.with_index(None))]


def _say_defaults(used: list[str]) -> None:
    """One line naming the model's defaults a run took (what the user did not set), and where they came from."""
    if used:
        _say("defaults:", "", "; ".join(used))


def _run_label(recipe: Recipe) -> str:
    """A run folder's name after its number: the source prompt's first words, and the seed."""
    return run_slug(recipe.source) + ("" if recipe.seed is None else f"-seed{recipe.seed}")


def _publish(out: Path, recipe: Recipe, save, what) -> tuple[Path, list[Path]]:
    """`save(what, recipe, folder)` into a new numbered folder under `out`, renamed into place whole: a run
    never overwrites or mixes with an earlier one. Returns the folder and the paths of its files."""
    written: list[Path] = []
    folder = write_folder_atomic(out, _run_label(recipe), lambda staging: written.extend(save(what, recipe, staging)))
    return folder, [folder / path.name for path in written]


def _report(folder: Path, paths: list[Path], seed: int | None) -> None:
    """The run's files on stdout, one a line (for scripts), then its seed and folder on stderr."""
    for path in paths:
        typer.echo(str(path))
    if seed is not None:
        console.print(f"seed {seed}", highlight=False)
    latest = folder.parent / LATEST
    also = f" (also {latest})" if latest.is_symlink() and os.readlink(latest) == folder.name else ""
    _say("saved to", "", f"{folder}{also}")


@app.command()
def replay(
    png: Annotated[Path, typer.Argument(help="A PNG written by p2p.", show_default=False)],
    out: Annotated[Path | None, typer.Option(help="Where the replay's new numbered folder goes [default: <png "
                                                  "folder>/replay].", show_default=False)] = None,
    model: Annotated[str | None, typer.Option(help="Use this model instead of the recipe's (same weights).",
                                              show_default=False)] = None,
    device: DeviceOption = None,
    dtype: Annotated[str | None, typer.Option(help="[default: the recipe's]", show_default=False)] = None,
    allow_pickle: AllowPickleOption = False,
    check: Annotated[bool, typer.Option("--check", help="Exit 1 unless the replay is identical, bit for bit.")] = False,
) -> None:
    """Regenerate a result from the recipe in its PNG, into a new folder, and compare it with the PNG."""
    with _user_errors():
        from .recipe import read_recipe, run_recipe, save_result

        recipe = read_recipe(png)
        out = out or _through_link(png.parent) / "replay"
        with _output_folder(out):
            revision = None if model else recipe.revision
            editor, _ = _load_editor(model or recipe.model, device, dtype or recipe.dtype, revision=revision,
                                     allow_pickle=allow_pickle)
            with _progress(editor.pipe, "replaying"):
                result = run_recipe(recipe, editor, base_dir=png.parent)
            if recipe.kind == "attention":
                folder, paths = _publish(out, recipe, save_attention, result)
                replayed = paths[0] if recipe.image_index == 0 else paths[1]
            else:
                folder, paths = _publish(out, recipe, save_result, result.images)
                replayed = paths[-1] if recipe.image_index is None else paths[recipe.image_index]
        difference = _pixel_difference(png, replayed)
    _report(folder, paths, recipe.seed)
    if difference is None:
        console.print(f"identical to {png}, bit for bit", highlight=False)
        return
    _say(f"differs from {png}:", "yellow", difference)
    if check:
        raise typer.Exit(1)


def _through_link(folder: Path) -> Path:
    """The folder a link names (`outputs/latest` gives its run folder, which a later run does not move), else itself."""
    return folder.parent / os.readlink(folder) if folder.is_symlink() else folder


def _pixel_difference(original: Path, replayed: Path) -> str | None:
    """None when both PNGs hold the same pixels, else a short description of the difference."""
    import numpy as np
    from PIL import Image

    with Image.open(original) as a, Image.open(replayed) as b:
        a, b = np.asarray(a.convert("RGB"), dtype=np.int16), np.asarray(b.convert("RGB"), dtype=np.int16)
    if a.shape != b.shape:
        return f"size {a.shape[1]}x{a.shape[0]} vs {b.shape[1]}x{b.shape[0]}"
    delta = np.abs(a - b)
    if not delta.any():
        return None
    changed = int((delta.max(-1) > 0).sum())
    return f"{changed} of {delta.shape[0] * delta.shape[1]} pixels differ, by at most {int(delta.max())}/255"


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to bind; 0.0.0.0 exposes the app to your network.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 7860,
    model: Annotated[list[str], typer.Option("--model", envvar="P2P_MODEL",
                                             help="Model(s) to offer (repeatable); the first is the default.")] = ["demo"],  # noqa: B006
    out: Annotated[Path, typer.Option(help="The only folder the app writes to.")] = Path("outputs/web"),
    max_upload_mb: Annotated[float, typer.Option(min=0.1, max=1024, help="Largest accepted upload.")] = 10.0,
    cache_mb: Annotated[float, typer.Option(min=0, max=2**20, help="Memory for the sources and inversions of recent "
                                                                  "runs, reused when only the edits change.")] = 2048,
    queue: Annotated[int, typer.Option(min=1, max=10_000, help="Requests that may wait for their turn (runs go one "
                                                               "at a time); one more is told the queue is full.")] = 64,
    device: DeviceOption = None,
    dtype: DtypeOption = "auto",
    allow_pickle: AllowPickleOption = False,
) -> None:
    """Start the web app."""
    with _user_errors():
        for option, value in (("--max-upload-mb", max_upload_mb), ("--cache-mb", cache_mb)):
            if math.isnan(value):  # NaN passes click's range checks
                raise UsageError(f"{option} must be a number, not {value}")
        from .loading import check_device, parse_dtype

        parse_dtype(dtype, check_device(device))
        try:
            from .webapp import launch
        except ImportError as error:
            raise RuntimeError(f"the web app needs the 'web' extra ({error}): pip install 'prompt2prompt[web]'") from None
        with _output_folder(out):
            console.print(f"starting the web app on http://{host}:{port} with {', '.join(model)} (Ctrl+C stops it)",
                          highlight=False)
            launch(models=model, host=host, port=port, out_dir=out, max_upload_mb=max_upload_mb, device=device,
                   dtype=dtype, cache_mb=cache_mb, allow_pickle=allow_pickle, queue_size=queue)


@app.command()
def demo(out: Annotated[Path, typer.Option(help="Output folder.")] = Path("outputs/demo"),
         model: Annotated[str, typer.Option(help="An embedded model: 'demo' (UNet) or 'demo-flow' (joint attention, "
                                                 "SD3-style), or a shapes-world model folder.")] = "demo") -> None:
    """Run the built-in demo edits on an embedded demo model."""
    with _user_errors():
        from .loading import quiet_loading

        try:
            from .demo import run_demo
        except ImportError as error:
            raise RuntimeError(f"the demo is missing from this install ({error})") from None
        with _output_folder(out), quiet_loading():
            paths = run_demo(out, model=model)
    for path in paths:
        typer.echo(str(path))


@app.command()
def batch(
    manifest: Annotated[Path, typer.Argument(help="JSON Lines manifest, one job per line.", exists=True,
                                             dir_okay=False, show_default=False)],
    out: Annotated[Path, typer.Option(help="Output folder; run again on it to resume.", show_default=False)],
    workers: Annotated[int | None, typer.Option(min=0, max=1024, help="Worker processes, one model replica each (0: this "
                                                            "process); default 1, with --ray one actor per GPU.",
                                                show_default=False)] = None,
    ray: Annotated[str | None, typer.Option(help="Run on Ray: auto (a running cluster), ray://HOST:10001, or local.",
                                            show_default=False)] = None,
    batch_size: Annotated[int, typer.Option(min=1, max=4096, help="Jobs of one model and settings per forward batch.")] = 1,
    model: ModelOption = "demo",
    skip_invalid: Annotated[bool, typer.Option("--skip-invalid", help="Run the valid jobs of a manifest with "
                                                                      "malformed lines.")] = False,
    score: Annotated[str | None, typer.Option(help="Score hook package.module:function (see docs/batch.md).",
                                              show_default=False)] = None,
    min_score: Annotated[float | None, typer.Option(help="Do not write edits scoring below this.",
                                                    show_default=False)] = None,
    device: DeviceOption = None,
    dtype: DtypeOption = "auto",
    allow_pickle: AllowPickleOption = False,
) -> None:
    """Run a manifest of edits into --out (jobs/<id>/ with each job's PNGs and labelled grid, results.jsonl, and
    index.html to browse them): resumable after any stop, on local workers or a Ray cluster."""
    with _user_errors():
        from .batch import BROWSE, INDEX, load_manifest, load_score_hook, run_batch

        if min_score is not None and not math.isfinite(min_score):  # click parses "nan" and "inf" as floats
            raise UsageError(f"--min-score must be a finite number, not {min_score}")
        jobs = load_manifest(manifest, model=model, skip_invalid=skip_invalid)
        for error in jobs.errors:
            _say("skipped", "yellow", error)
        _warn_unknown_words(jobs.jobs)
        summary = run_batch(jobs, out, workers=workers, ray_address=ray, batch_size=batch_size, device=device,
                            dtype=dtype, score=load_score_hook(score) if score else None, min_score=min_score,
                            allow_pickle=allow_pickle)
    typer.echo(str(out / INDEX))
    typer.echo(f"browse: {out / BROWSE} (each job's prompt, edits and grid)")
    console.print(f"{summary.done} done, {summary.failed} failed, {summary.skipped} done before; "
                  f"{summary.jobs_per_minute:.1f} jobs/min", highlight=False)
    if summary.failed:
        from .batch import read_index

        failed = [row for row in read_index(out).values() if row["status"] == "failed"]
        for row in failed[:MAX_SHOWN_FAILURES]:
            error = " ".join(str(row.get("error")).split())[:300]
            _say("failed", "red", f"{row['id']} (line {row.get('line')}): {error}")
        if len(failed) > MAX_SHOWN_FAILURES:
            console.print(f"... and {len(failed) - MAX_SHOWN_FAILURES} more, in {out / INDEX}", highlight=False)
        console.print("[red]some jobs failed[/red]: run again to retry them", highlight=False)
        raise typer.Exit(1)


def _warn_unknown_words(jobs) -> None:
    """Before a batch runs, one warning a model: the words of its jobs that it never saw, where its folder lists
    its vocabulary (the demo models; local folders: the workers fetch hub models, not this process)."""
    from .families.defaults import folder_vocabulary, unknown_words, vocabulary_notice
    from .loading import DEMO_MODELS

    by_model: dict[str, dict[int, list[str]]] = {}  # model -> manifest line -> its prompts
    for job in jobs:
        by_model.setdefault(job.model, {})[job.line] = [job.source, *(edit["prompt"] for edit in job.edits)]
    for model, prompts in by_model.items():
        folder = DEMO_MODELS.get(model, Path(model))
        vocabulary = folder_vocabulary(folder) if folder.is_absolute() else frozenset()
        lines = [line for line, texts in prompts.items() if unknown_words(vocabulary, texts)]
        if lines:
            shown = ", ".join(map(str, lines[:MAX_SHOWN_LINES]))
            more = f" and {len(lines) - MAX_SHOWN_LINES} more" if len(lines) > MAX_SHOWN_LINES else ""
            notice = vocabulary_notice(vocabulary, [text for line in lines for text in prompts[line]])
            _warn(f"{model}, manifest line{'s' if len(lines) > 1 else ''} {shown}{more}: {notice}")


bench_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Benchmarks: PIE-Bench, and the shapes benchmark in its format.")
app.add_typer(bench_app, name="bench")

MethodsOption = Annotated[str, typer.Option("--inversion", help="Inversion methods, comma-separated.")]
MetricsOption = Annotated[str, typer.Option("--metrics", help="Metrics, comma-separated, from structure_distance, psnr, "
                                                              "lpips, mse, ssim, clip_whole, clip_edited.")]


def _bench_lists(methods: str, metrics: str, guidance: float) -> tuple[list[str], list[str]]:
    """--inversion and --metrics as lists, and --guidance, checked before anything is written or loaded."""
    from .bench.metrics import METRICS

    if not math.isfinite(guidance):  # click parses "nan" and "inf" as floats
        raise UsageError(f"--guidance must be a finite number, not {guidance}")
    chosen = [m.strip() for m in methods.split(",") if m.strip()]
    names = [m.strip() for m in metrics.split(",") if m.strip()]
    if not chosen:
        raise UsageError("--inversion names no method; e.g. --inversion ddim,null-text,negative-prompt,direct")
    if unknown := sorted(set(names) - set(METRICS)):
        raise UsageError(f"unknown metrics {unknown}; the metrics are {', '.join(METRICS)}")
    return chosen, names


def _bench(data: Path, out: Path, protocol, methods: str, metrics: str, *, types: str | None, dino: str, clip: str,
           workers: int, ray: str | None, device: str | None, dtype: str, extra=None) -> None:
    """Run a PIE-format benchmark folder through the harness and print where its table is."""
    from .bench.metrics import Metrics
    from .loading import check_device
    from .bench.pie import load_pie
    from .bench.run import run_bench, table

    chosen, names = _bench_lists(methods, metrics, protocol.guidance_scale)
    entries = load_pie(data, types=None if types is None else [t.strip() for t in types.split(",")])
    if not entries:
        raise UsageError(f"{str(data)!r} has no entries" + (f" of the editing types {types}" if types else ""))
    scorer = Metrics(names, device=check_device(device), dino=dino, clip=clip) if names else None
    result = run_bench(entries, out, methods=chosen, protocol=protocol, metrics=scorer, extra=extra, device=device,
                       dtype=dtype, workers=workers, ray_address=ray)
    table(result, out)
    typer.echo((out / "table.md").read_text(encoding="utf-8"))
    typer.echo(f"written to {out / 'table.md'} (also table.csv, table.json)")
    failed = sum(len(f) for f in result.failed.values())
    if failed:
        console.print(f"[red]{failed} edits failed[/red]: their errors are in each method's results.jsonl; run again "
                      "to retry them", highlight=False)
        raise typer.Exit(1)


@bench_app.command("pie")
def bench_pie(
    data: Annotated[Path, typer.Option(help="The PIE-Bench folder (mapping_file.json, annotation_images/).",
                                       show_default=False)],
    out: Annotated[Path, typer.Option(help="Output folder; run again on it to resume.", show_default=False)],
    model: Annotated[str, typer.Option(help="Hub id, diffusers folder, .safetensors file, or 'demo'.")] = "CompVis/stable-diffusion-v1-4",
    inversion: MethodsOption = "ddim,null-text,negative-prompt,direct",
    metrics: MetricsOption = "structure_distance,psnr,lpips,mse,ssim,clip_whole,clip_edited",
    types: Annotated[str | None, typer.Option(help="Editing types to run, e.g. 0,1,6 (default: all).",
                                              show_default=False)] = None,
    steps: Annotated[int, typer.Option(min=1, max=1000, help="Denoising steps.")] = 50,
    guidance: Annotated[float, typer.Option(help="Guidance scale.")] = 7.5,
    cross: Annotated[float, typer.Option(min=0, max=1, help="Cross-attention window of the refinement.")] = 0.4,
    self_steps: Annotated[float, typer.Option("--self", min=0, max=1, help="Self-attention window.")] = 0.6,
    dino: Annotated[str, typer.Option(help="Structure-distance model: hub id or folder.")] = "facebook/dino-vitb8",
    clip: Annotated[str, typer.Option(help="CLIP-score model: hub id or folder.")] = "openai/clip-vit-large-patch14",
    workers: Annotated[int, typer.Option(min=0, max=1024, help="Worker processes (0: this process).")] = 0,
    ray: Annotated[str | None, typer.Option(help="Run on Ray: auto, ray://HOST:10001, or local.",
                                            show_default=False)] = None,
    device: DeviceOption = None,
    dtype: DtypeOption = "auto",
) -> None:
    """PIE-Bench with the published P2P protocol: every method, the seven metrics, the table beside the paper's."""
    with _user_errors():
        from .bench.pie import Protocol

        _bench_lists(inversion, metrics, guidance)
        protocol = Protocol(model=model, num_inference_steps=steps, guidance_scale=guidance, cross_steps=cross,
                            self_steps=self_steps)
        with _output_folder(out):
            _bench(data, out, protocol, inversion, metrics, types=types, dino=dino, clip=clip, workers=workers,
                   ray=ray, device=device, dtype=dtype)


@bench_app.command("shapes")
def bench_shapes(
    out: Annotated[Path, typer.Option(help="Output folder (the benchmark's data in out/data); run again to resume.",
                                      show_default=False)],
    model: Annotated[str, typer.Option(help="A shapes-world model: 'demo', 'demo-flow', or a folder.")] = "demo",
    scenes: Annotated[int, typer.Option(min=5, max=10_000, help="Entries, spread over five editing types.")] = 40,
    inversion: Annotated[str | None, typer.Option(
        "--inversion", help="Inversion methods, comma-separated [default: every method of the model's family: "
                            "ddim,null-text,negative-prompt,direct on 'demo', direct,euler on 'demo-flow']",
        show_default=False)] = None,
    metrics: MetricsOption = "psnr,mse,ssim",
    steps: Annotated[int, typer.Option(min=1, max=1000, help="Denoising steps.")] = 50,
    guidance: Annotated[float, typer.Option(help="Guidance scale (5: the demo model's).")] = 5.0,
    workers: Annotated[int, typer.Option(min=0, max=1024, help="Worker processes (0: this process).")] = 0,
    device: DeviceOption = None,
    dtype: DtypeOption = "auto",
) -> None:
    """The shapes benchmark: rendered scenes no model drew, exact masks, the PIE harness on a demo model; prints the
    table (also in --out's table.md) with what each column measures."""
    with _user_errors():
        from .bench.attributes import attribute_success
        from .bench.pie import Protocol
        from .bench.shapes import write_shapes_benchmark

        if inversion is None:
            from .loading import inversion_methods

            inversion = ",".join(inversion_methods(model))
        _bench_lists(inversion, metrics, guidance)
        protocol = Protocol(model=model, num_inference_steps=steps, guidance_scale=guidance)
        with _output_folder(out):
            write_shapes_benchmark(out / "data", num_scenes=scenes)
            _bench(out / "data", out, protocol, inversion, metrics, types=None, dino="", clip="", workers=workers,
                   ray=None, device=device, dtype=dtype, extra=attribute_success)


def main() -> None:
    """Entry point of the `p2p` command."""
    app()
