"""Jobs of one model and settings through the pipeline as one forward batch, by the engine's public seam."""

from __future__ import annotations

from typing import Any

from ..recipe import build_edits

__all__ = ["edit_together"]


def edit_together(editor, recipes: list) -> list[Any]:
    """Jobs of one model and settings, none with a real image, through the pipeline as one forward batch.

    Each job is prepared on its own (`Editor.prepare`), so that whatever one job's preparation raises (a bad
    word, a weight that overflows) fails only that job, and the prepared runs go through `Editor.run` together,
    each with its own attention control. Returns, per recipe, its (P, H, W, 3) images in [0, 1], or the error
    its preparation raised; an error of the forward batch itself propagates (the worker then runs each job
    alone).
    """
    results: list[Any] = [None] * len(recipes)
    runs, positions = [], []
    for position, recipe in enumerate(recipes):
        try:
            runs.append(editor.prepare(
                recipe.source, build_edits(recipe), num_inference_steps=recipe.num_inference_steps,
                guidance_scale=recipe.guidance_scale, seed=recipe.seed, negative_prompt=recipe.negative_prompt,
                height=recipe.height, width=recipe.width,
                **({} if recipe.max_sequence_length is None else {"max_sequence_length": recipe.max_sequence_length}),
            ))
            positions.append(position)
        except Exception as error:  # noqa: BLE001 (the job's own error, recorded as its outcome)
            results[position] = error
    if runs:
        for position, result in zip(positions, editor.run(runs, output_type="np")):
            results[position] = result.images
    return results
