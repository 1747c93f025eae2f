"""The demo: Prompt-to-Prompt edits on an embedded shapes-world model, written as captioned PNGs."""

from __future__ import annotations

from pathlib import Path

from prompt2prompt.files import write_atomic
SOURCE = "a big red circle in the center on a white background"
SEED = 1
# The paper's point: a caption without a position word lets the seed and the whole caption place things, so
# regenerating the edited caption from the same seed may move them; P2P keeps them. A colour swap is the kind of edit
# where both models show it (docs/demo-model.md measures it); the seed is one where regeneration moves the circle.
FREE_SOURCE = "a small red circle on a white background"
FREE_EDIT = "a small green circle on a white background"
FREE_SEED = 10
# A two-object scene: the blend keeps the star, pixel for pixel, while the circle changes colour.
BLEND_SOURCE = "a big red circle on the left and a small blue star on the right on a white background"
BLEND_EDIT = "a big green circle on the left and a small blue star on the right on a white background"
BLEND_SEED = 1


def demo_edits():
    """The grid's four edits of SOURCE, each with the caption it is shown under (windows: the model's)."""
    from prompt2prompt import Edit

    return [
        ("word swap: red -> green", SOURCE.replace("red", "green")),
        ("word swap: circle -> star", SOURCE.replace("circle", "star")),
        ("refine: + gradient", SOURCE.replace("white background", "white gradient background")),
        ("reweight: red, circle x -2", Edit(SOURCE, cross_steps=1.0, weights={"red": -2.0, "circle": -2.0})),
    ]


def _save(image, path: Path) -> Path:
    return write_atomic(path, lambda tmp: image.save(tmp, format="PNG"))


def run_demo(out_dir: str | Path = "outputs/demo", *, model: str | Path = "demo",
             num_inference_steps: int | None = None) -> list[Path]:
    """Runs the demo edits on an embedded model ("demo" or "demo-flow"; offline) and returns the PNGs it wrote.

    Writes `demo_grid.png` (the source and four captioned edits: a colour swap, a shape swap, a
    refinement and a negative reweight), `regenerate_vs_p2p.png` (a colour swap of a caption without a
    position word: plain regeneration of the edited caption from the same seed beside the P2P edit),
    `local_blend.png` (a colour swap in a two-object scene without and with local blend) and
    `attention.png` (the source's cross-attention). Steps, guidance, windows, layers and the blend threshold
    are the model's own (its `prompt2prompt.json`). 15-60 s on a 2-core CPU.

    Example: `paths = run_demo("outputs/demo")`.
    """
    import torch

    from prompt2prompt import Edit, Editor, LocalBlend, attention_heatmaps, image_grid

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"the demo writes PNGs into a folder, but {str(out)!r} is a file; pass another --out")
    out.mkdir(parents=True, exist_ok=True)
    editor = Editor.from_pretrained(str(model), device="cpu", torch_dtype=torch.float32)
    editor.pipe.set_progress_bar_config(disable=True)
    defaults = editor.defaults

    def edit(source: str, prompt: str, **kwargs) -> Edit:
        cross, self_steps, _ = defaults.windows_for(source, prompt)
        return Edit(prompt, **{"cross_steps": cross, "self_steps": self_steps, **kwargs})

    common = dict(num_inference_steps=num_inference_steps or defaults.num_inference_steps,
                  guidance_scale=defaults.guidance_scale)
    captions, specs = zip(*demo_edits())
    edits = [spec if isinstance(spec, Edit) else edit(SOURCE, spec) for spec in specs]
    # The maps at the side the model blends at where it names one (the UNet model's 8), else the family's own.
    record = editor.layer_options.get("blend_res") or True
    result = editor.edit(SOURCE, edits, seed=SEED, record_attention=record, **common)
    grid = image_grid(result.images, [f"source (seed {SEED})", *captions], width=192)
    paths = [_save(grid, out / "demo_grid.png")]

    regenerated = editor.edit(FREE_EDIT, seed=FREE_SEED, **common).images[0]
    kept = editor.edit(FREE_SOURCE, [edit(FREE_SOURCE, FREE_EDIT)], seed=FREE_SEED, **common).images
    labels = [f"source (seed {FREE_SEED})", "red -> green: regenerated", "red -> green: P2P"]
    paths.append(_save(image_grid([kept[0], regenerated, kept[1]], labels, width=192), out / "regenerate_vs_p2p.png"))

    # The object's words, colour and shape: on these small models they find the object better than the colour alone.
    blend = LocalBlend(["red", "circle"], ["green", "circle"], threshold=defaults.blend_threshold)
    swap = [edit(BLEND_SOURCE, BLEND_EDIT), edit(BLEND_SOURCE, BLEND_EDIT, blend=blend)]
    blended = editor.edit(BLEND_SOURCE, swap, seed=BLEND_SEED, **common)
    labels = ["source", "red -> green", "red -> green, local blend"]
    paths.append(_save(image_grid(blended.images, labels, width=192), out / "local_blend.png"))

    heatmaps = attention_heatmaps(result, 0)
    paths.append(_save(image_grid(heatmaps, cols=len(heatmaps), width=96), out / "attention.png"))
    return paths
