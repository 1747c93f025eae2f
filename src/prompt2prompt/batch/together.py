"""Jobs of one model and settings through the pipeline as one forward batch, by the engine's public seam."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..recipe import Recipe, prepare_recipe, replaying

if TYPE_CHECKING:
    from ..engine import Editor

__all__ = ["edit_together"]


def edit_together(editor: Editor, recipes: list[Recipe]) -> list[Any]:
    """Jobs of one model and settings, none with a real image, through the pipeline as one forward batch.

    Each job's recipe is prepared on its own (`prepare_recipe`), so that whatever one job's preparation raises (a
    bad word, a weight that overflows) fails only that job, and the prepared runs go through `Editor.run` together,
    each with its own attention control. Returns, per recipe, its (P, H, W, 3) images in [0, 1], or the error its
    preparation raised; an error of the forward batch itself propagates (the worker then runs each job alone).
    """
    first = recipes[0]
    if any((recipe.scheduler, recipe.threads) != (first.scheduler, first.threads) for recipe in recipes):
        raise ValueError("jobs in one forward batch must share a scheduler and a thread count; run them one by one")
    results: list[Any] = [None] * len(recipes)
    runs, positions = [], []
    with replaying(first, editor):  # one scheduler and thread count for the whole batch
        for position, recipe in enumerate(recipes):
            try:
                runs.append(prepare_recipe(recipe, editor, progress=False))
                positions.append(position)
            except Exception as error:  # noqa: BLE001 (the job's own error, recorded as its outcome)
                results[position] = error
        if runs:
            for position, result in zip(positions, editor.run(runs, output_type="np")):
                results[position] = result.images
    return results
