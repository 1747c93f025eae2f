"""Recipes: everything needed to regenerate a result, stored as JSON in a text chunk of every PNG we write.

A recipe holds the prompts, the edits, the seed, steps, guidance, the scheduler with its configuration, the model id
and revision, the dtype and the package version. Replaying it on the same device and dtype gives the same images,
bit for bit.

- `format`: the `Recipe` dataclass, its JSON form and its field checks (a PNG can come from anyone, so a recipe read
  from one is untrusted input: every field is checked before any model loads).
- `record`: `recipe_for`, a recipe for a run of an editor, with the model's defaults written in.
- `replay`: `prepare_recipe` makes a recipe a `PreparedRun`, inside `replaying` (the recipe's scheduler, taken only
  from the pipeline's compatible ones, and its thread count); `run_recipe` sends it.
- `png`: PNGs that carry their recipe and Automatic1111's parameters, result folders and labelled grids.

The bounds and value checks are `prompt2prompt.limits`'; `P2P_ALLOW_LARGE=1` in the environment lifts the bounds
for a real need.
"""

from .format import (EDIT_FIELDS, FORMAT, INVERSION_OPTIONS, KINDS, Recipe, RecipeError, build_edits, check_edits,
                     check_inversion, package_version)
from .png import (A1111_SAMPLERS, GRID_TILE, PARAMETERS_KEY, RECIPE_KEY, a1111_parameters, edit_label, grid_labels,
                  read_recipe, save_grid, save_png, save_result)
from .record import recipe_for, scheduler_config
from .replay import file_digest, prepare_recipe, replaying, run_recipe, source_key

__all__ = ["A1111_SAMPLERS", "EDIT_FIELDS", "FORMAT", "GRID_TILE", "INVERSION_OPTIONS", "KINDS", "PARAMETERS_KEY",
           "RECIPE_KEY", "Recipe", "RecipeError", "a1111_parameters", "build_edits", "check_edits",
           "check_inversion", "edit_label", "file_digest", "grid_labels", "package_version", "prepare_recipe",
           "read_recipe", "recipe_for", "replaying", "run_recipe", "save_grid", "save_png", "save_result",
           "scheduler_config", "source_key"]
