"""The demo: Prompt-to-Prompt edits on the embedded shapes-world model, written as captioned PNGs."""

from __future__ import annotations

from pathlib import Path

from prompt2prompt.files import write_atomic

MODEL_DIR = Path(__file__).parent / "model"
SOURCE = "a big red circle in the center on a white background"
SEED = 1
# The model draws two-object captions as one blob (see its model card), so the local-blend demo edits
# the object of a one-object scene: with the blend, the background outside it stays pixel for pixel.
BLEND_SOURCE = "a big red circle in the center on a white gradient background"
BLEND_EDIT = "a big green circle in the center on a white gradient background"
BLEND_SEED = 0
STEPS = 30
GUIDANCE = 5.0


def demo_edits():
    """The grid's four edits of SOURCE, each with the caption it is shown under."""
    from prompt2prompt import Edit

    return [
        ("word swap: red -> green", Edit(SOURCE.replace("red", "green"), cross_steps=0.8, self_steps=0.2)),
        ("word swap: circle -> star", Edit(SOURCE.replace("circle", "star"), cross_steps=0.5, self_steps=0.0)),
        ("refine: + gradient", Edit(SOURCE.replace("white background", "white gradient background"),
                                    cross_steps=0.8, self_steps=0.2)),
        ("reweight: red, circle x -2", Edit(SOURCE, cross_steps=1.0, self_steps=0.2,
                                             weights={"red": -2.0, "circle": -2.0})),
    ]


def _save(image, path: Path) -> Path:
    return write_atomic(path, lambda tmp: image.save(tmp, format="PNG"))


def run_demo(out_dir: str | Path = "outputs/demo", *, model: str | Path = "demo",
             num_inference_steps: int = STEPS) -> list[Path]:
    """Runs the demo edits on the embedded model (offline) and returns the PNGs it wrote.

    Writes `demo_grid.png` (the source and four captioned edits: a colour swap, a shape swap, a
    refinement and a negative reweight), `local_blend.png` (a colour swap without and with local
    blend) and `attention.png` (the source's per-token cross-attention). 15-45 s on a 2-core CPU,
    depending on its load.

    Example: `paths = run_demo("outputs/demo")`.
    """
    import torch

    from prompt2prompt import Edit, Editor, LocalBlend, attention_heatmaps, image_grid

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"the demo writes PNGs into a folder, but {str(out)!r} is a file; pass another --out")
    out.mkdir(parents=True, exist_ok=True)
    editor = Editor.from_pretrained(str(model), device="cpu", torch_dtype=torch.float32, blend_res=8,
                                    self_replace_max_res=8)
    editor.pipe.set_progress_bar_config(disable=True)
    common = dict(num_inference_steps=num_inference_steps, guidance_scale=GUIDANCE)

    captions, edits = zip(*demo_edits())
    result = editor.edit(SOURCE, list(edits), seed=SEED, record_attention=16, **common)
    grid = image_grid(result.images, [f"source (seed {SEED})", *captions], width=192)
    paths = [_save(grid, out / "demo_grid.png")]

    heatmaps = attention_heatmaps(result, 0, res=16)
    paths.append(_save(image_grid(heatmaps, cols=len(heatmaps), width=96), out / "attention.png"))

    swap = [Edit(BLEND_EDIT, cross_steps=0.8, self_steps=0.2),
            # The model's attention is diffuse: at the default threshold 0.3 the mask would cover everything.
            Edit(BLEND_EDIT, cross_steps=0.8, self_steps=0.2, blend=LocalBlend("red", "green", threshold=0.8))]
    blended = editor.edit(BLEND_SOURCE, swap, seed=BLEND_SEED, **common)
    labels = ["source", "red -> green", "red -> green, local blend"]
    paths.append(_save(image_grid(blended.images, labels, width=192), out / "local_blend.png"))
    return paths
