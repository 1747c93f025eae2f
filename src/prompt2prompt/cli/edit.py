"""`p2p edit` (edit by typing, a generated or a real image) and `p2p attention` (where each word looks)."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Annotated, Any

import typer

from ..limits import BLEND_THRESHOLD, CROSS_STEPS, SELF_STEPS
from ..syntax import parse_prompt
from .errors import UsageError, console, say, user_errors, warn
from .options import (AllowPickleOption, DeviceOption, DtypeOption, GuidanceOption, ModelOption, OutOption,
                      SchedulerOption, SeedOption, SeedsOption, SequenceOption, StepsOption, check_edits,
                      check_numbers, edit_specs, seed_list, sequence_length)
from .progress import progress
from .runs import load_editor, output_folder, publish, report, save_attention, say_defaults, use_scheduler

__all__ = ["attention", "edit"]

WIDE_BLEND = 0.98  # a blend mask covering this share of the image (or more) keeps nothing of the source


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
    with user_errors():
        if (prompt is None) == (source_prompt is None):
            raise UsageError("give the source prompt either as the argument or as --prompt, exactly once")
        from ..families.defaults import vocabulary_notice
        from ..recipe import file_digest, recipe_for, run_recipe, save_result

        check_numbers(steps, guidance, height, width)
        run_seeds = seed_list(seed, seeds, image=image is not None)
        real: dict[str, Any] = {}
        if image is not None:
            if scheduler is not None:
                raise UsageError("--scheduler does not apply to --image: an inversion is edited on the scheduler it "
                                 "was made with")
            real = {"image": {"path": str(image.resolve()), "sha256": file_digest(image)},
                    "inversion": {} if inversion is None else {"method": inversion}}
        source, specs = edit_specs(source_prompt if prompt is None else prompt, to, mode=mode, cross=cross,
                                   cross_words=cross_word, self_steps=self_steps, blend=blend, weights=weight,
                                   blend_threshold=blend_threshold)
        check_edits(source, specs)
        with output_folder(out):
            editor, model_source = load_editor(model, device, dtype, allow_pickle=allow_pickle)
            use_scheduler(editor, scheduler)
            unknown = vocabulary_notice(editor.defaults.vocabulary, [source, *(spec["prompt"] for spec in specs)])
            fitted = None
            if image is not None:
                from ..images import fit_note, image_size, load_image

                fitted = fit_note(load_image(image).size, *image_size(editor.pipe, height=height, width=width))
            for index, run_seed in enumerate(run_seeds):  # one model load for every seed; a run folder each
                used: list[str] = []
                recipe = recipe_for(
                    editor, model_source, used=used, source=source, edits=specs, seed=run_seed,
                    num_inference_steps=steps, guidance_scale=guidance, negative_prompt=negative, height=height,
                    width=width, max_sequence_length=sequence_length(editor, max_sequence_length), **real,
                )
                with progress(editor.pipe, "editing" if len(run_seeds) == 1 else f"seed {run_seed}"):
                    result = run_recipe(recipe, editor)
                folder, paths = publish(out, recipe, save_result, result.images)
                report(folder, paths, recipe.seed)
                if index == 0:  # after the run: a failed one prints its error alone
                    say_defaults(used)
                    if fitted:
                        say("note:", "cyan", f"{image}: {fitted}")
                    warn(unknown)
                _warn_wide_blends(result.masks)


def _warn_wide_blends(masks: dict) -> None:
    """Say so when a local blend's mask covers (almost) the whole image: the blend then changes nothing."""
    for e, mask in sorted(masks.items()):
        share = float(mask.float().mean())
        if share >= WIDE_BLEND:
            console.print(f"[yellow]warning:[/yellow] the local blend of edit {e + 1} covers {share:.0%} of the image, "
                          "so it keeps nothing of the source; raise --blend-threshold (e.g. 0.6) to confine it",
                          highlight=False)


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
    with user_errors():
        from ..families.defaults import vocabulary_notice
        from ..recipe import recipe_for, run_recipe

        source = parse_prompt(prompt)
        if source.edit is not None:
            raise UsageError(f"attention takes a plain prompt, without edit markup: {prompt!r}")
        check_numbers(steps, guidance)
        with output_folder(out):
            editor, model_source = load_editor(model, device, dtype, allow_pickle=allow_pickle)
            use_scheduler(editor, scheduler)
            used: list[str] = []
            recipe = recipe_for(
                editor, model_source, used=used, source=source.source, edits=[],
                seed=secrets.randbelow(2**31) if seed is None else seed, num_inference_steps=steps,
                guidance_scale=guidance, negative_prompt=negative, kind="attention", record_attention=res or True,
                max_sequence_length=sequence_length(editor, max_sequence_length),
            )
            with progress(editor.pipe, "generating"):
                result = run_recipe(recipe, editor)
            folder, paths = publish(out, recipe, save_attention, result)
            report(folder, paths, recipe.seed)
            say_defaults(used)  # after the run, as the warning: a failed run prints its error alone
            warn(vocabulary_notice(editor.defaults.vocabulary, [source.source]))
