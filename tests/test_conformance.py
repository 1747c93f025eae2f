"""One table of edit cases, run over every model family: the contract's invariants on tiny random pipelines.

Families: SD 1.x, SDXL, SD with v-prediction and zero terminal SNR, SD3, SD3.5, Flux.1, Flux.1-dev (embedded
guidance), Chroma (masked T5 padding: each prompt's true length differs from its edits'), PixArt-Σ (a
cross-attention DiT, masked T5 padding), Qwen-Image, FLUX.2 klein and FLUX.2 dev (templated text; dev's padded on
the left, so a prompt's tokens move with its length) and Z-Image (image first, refiners, captions padded to 32 with an
attended token, conditional rows first), each with and without classifier-free guidance where it has it. For every (setting, case):
fused == explicit, and the source row is plain generation. For every setting: no-op edits are plain generation,
each edit in a batch is that edit alone, and outside the local-blend mask the edit keeps the source's latents.

Each edit run is computed once per module (`runs`) and shared by the tests that read it.
"""

import functools

import pytest
import torch
from diffusers import (ChromaPipeline, Flux2KleinPipeline, Flux2Pipeline, FluxPipeline, PixArtSigmaPipeline,
                       QwenImagePipeline, StableDiffusion3Pipeline, ZImagePipeline)
from flux2_pipelines import tiny_flux2_klein_pipeline, tiny_flux2_pipeline
from mmdit_pipelines import (tiny_chroma_pipeline, tiny_flux_pipeline, tiny_pixart_pipeline, tiny_sd3_pipeline,
                             tiny_sd35_pipeline)
from pipelines import tiny_sd_pipeline, tiny_sdxl_pipeline
from qwen_pipelines import tiny_qwenimage_pipeline
from zimage_pipelines import tiny_zimage_pipeline

import prompt2prompt as p2p
from prompt2prompt.families import family_of
from prompt2prompt.families.chroma import masked_processors
from conftest import on_device, rel_err, tolerance

SOURCE = "a cat riding a bicycle"
STEPS = 4
SIZE = dict(height=32, width=32)
T5_LENGTH = 16  # max_sequence_length of the MM-DiT runs: the whole prompt fits, the joint text stays short

# The random models' cross-attention maps are nearly flat (within ~8% of their maximum): thresholds close to 1
# leave part of the image out of the blend masks below, in every family, with CFG and without.
CASES = {
    "replace": [p2p.Edit("a dog riding a bicycle")],
    # "lasagne" is two tokens in CLIP ("lasag" "ne") and in the test T5 ("▁las" "agne"), "cat" one in both
    "replace-one-to-many": [p2p.Edit("a lasagne riding a bicycle", self_steps=(0.25, 0.75))],
    # "bicycle" is one CLIP token and two T5 pieces ("▁bi" "cycle"), "lasagne" two in each
    "replace-multi-piece": [p2p.Edit("a cat riding a lasagne", self_steps=(0.25, 0.75))],
    "refine": [p2p.Edit("a black cat riding a red bicycle")],
    "reweight-negative": [p2p.Edit(SOURCE, weights={"cat": -0.5, "bicycle": 2.0})],
    "word-windows": [p2p.Edit("a dog riding a bicycle", cross_steps={"default": 0.5, "dog": (0.25, 1.0)},
                              self_steps=0.5)],
    "blend": [p2p.Edit("a dog riding a bicycle", blend=p2p.LocalBlend("cat", "dog", threshold=0.97, start=0.25))],
    "blend-exclude": [p2p.Edit("a dog riding a bicycle", blend=p2p.LocalBlend(
        "cat", "dog", threshold=0.95, exclude_source_words="bicycle", exclude_edit_words=["bicycle"],
        exclude_threshold=0.97))],
    "mixed": [
        p2p.Edit("a dog riding a bicycle", blend=p2p.LocalBlend("cat", "dog")),
        p2p.Edit("a cat riding a rusty bicycle", mode="refine", weights={"rusty": 2.0}),
        p2p.Edit(SOURCE, weights={"riding": -1.0}),
    ],
}
PARTIAL_MASKS = ("blend", "blend-exclude")  # cases whose masks cover part of the image, not all of it

# No-op edits and the prompt each one generates: the source itself (every window active, identity mapper), and
# edits whose windows are all empty (a word swap, and a refinement that adds a word).
NOOPS = [
    (p2p.Edit(SOURCE), SOURCE),
    (p2p.Edit("a dog riding a bicycle", cross_steps=0.0, self_steps=0.0), "a dog riding a bicycle"),
    (p2p.Edit("a black dog riding a bicycle", cross_steps=0.0, self_steps=0.0), "a black dog riding a bicycle"),
]

BUILDERS = {
    "sd": tiny_sd_pipeline,
    "sdxl": tiny_sdxl_pipeline,
    "sd-vpred": functools.partial(tiny_sd_pipeline, prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                  timestep_spacing="trailing"),
    "sd3": tiny_sd3_pipeline,
    "sd35": tiny_sd35_pipeline,
    "flux": tiny_flux_pipeline,
    "flux-dev": functools.partial(tiny_flux_pipeline, guidance_embeds=True),
    "chroma": tiny_chroma_pipeline,
    # Seed 10: on the 8x8 patch grid, the random maps of seeds 0-9 are too flat for both blend cases to leave part
    # of the image in and part out (their masks cover all or nothing of it); seed 10's are not.
    "pixart": functools.partial(tiny_pixart_pipeline, seed=10),
    "qwenimage": tiny_qwenimage_pipeline,
    "flux2-klein": tiny_flux2_klein_pipeline,
    "flux2-dev": tiny_flux2_pipeline,
    "zimage": tiny_zimage_pipeline,
}
CFG, NO_CFG = dict(guidance_scale=7.5), dict(guidance_scale=1.0)  # guidance 1 turns CFG off on SD and SD3
# Each setting: a family and its pipeline arguments. Flux.1 (schnell-like) has no guidance; Flux-dev embeds it.
SETTINGS = {
    "sd-cfg": ("sd", CFG), "sd-no-cfg": ("sd", NO_CFG),
    "sdxl-cfg": ("sdxl", CFG), "sdxl-no-cfg": ("sdxl", NO_CFG),
    "sd-vpred-cfg": ("sd-vpred", CFG), "sd-vpred-no-cfg": ("sd-vpred", NO_CFG),
    "sd3-cfg": ("sd3", CFG), "sd3-no-cfg": ("sd3", NO_CFG),
    "sd35-cfg": ("sd35", CFG), "sd35-no-cfg": ("sd35", NO_CFG),
    "flux": ("flux", {}),
    "flux-dev": ("flux-dev", dict(guidance_scale=3.5)),
    # Chroma: masked T5 padding (each prompt's own true length); guidance is a second, negative pass
    "chroma-cfg": ("chroma", dict(guidance_scale=3.0)), "chroma-no-cfg": ("chroma", NO_CFG),
    # PixArt-Σ: a cross-attention DiT; masked T5 padding; self-replacement by block
    "pixart-cfg": ("pixart", dict(guidance_scale=4.5)), "pixart-no-cfg": ("pixart", NO_CFG),
    # Qwen-Image: templated text, each run padded to its longest prompt and masked (the source's true length
    # differs from most edits'); guidance is true CFG, a second, negative pass
    "qwenimage-cfg": ("qwenimage", dict(guidance_scale=4.0)), "qwenimage-no-cfg": ("qwenimage", NO_CFG),
    # FLUX.2 klein (base): templated Qwen3 text padded to its length, the padding attended; CFG is a second pass on
    # the empty prompt; the pipeline takes patchified latents and returns the VAE's own
    "flux2-klein-cfg": ("flux2-klein", dict(guidance_scale=4.0)), "flux2-klein-no-cfg": ("flux2-klein", NO_CFG),
    # FLUX.2 dev: the system message and the prompt in Mistral's template, padded on the LEFT (the source's tokens sit
    # at other positions than a longer edit's); embedded guidance, one pass; the pipeline returns packed tokens
    "flux2-dev": ("flux2-dev", dict(guidance_scale=4.0)),
    # Z-Image: CFG is on at any guidance > 0 (1.0 still doubles the batch), its rows [cond..., uncond...]
    "zimage-cfg": ("zimage", dict(guidance_scale=5.0)), "zimage-no-cfg": ("zimage", dict(guidance_scale=0.0)),
}
# The text lengths of the runs: T5's, or a templated text's (FLUX.2 klein's template takes 16 tokens of its own,
# dev's 32 with its system message).
TEXT_LENGTH = {"flux2-klein": 32, "flux2-dev": 48, "zimage": 64}  # Z-Image's: the text encoder's (captions are unpadded)
FLUX2 = (Flux2KleinPipeline, Flux2Pipeline)  # pipelines that take their latents patchified 2x2 and pack them


def is_transformer(pipe) -> bool:
    return isinstance(pipe, (StableDiffusion3Pipeline, FluxPipeline, ChromaPipeline, PixArtSigmaPipeline,
                             QwenImagePipeline, ZImagePipeline, *FLUX2))


def has_t5_length(pipe) -> bool:
    """Whether the pipeline pads its text to `max_sequence_length` (Qwen-Image pads each call to its longest prompt)."""
    return is_transformer(pipe) and not isinstance(pipe, QwenImagePipeline)


def packs(pipe) -> bool:
    """Whether the pipeline packs its latents 2x2 into tokens, as Flux does."""
    return isinstance(pipe, (FluxPipeline, ChromaPipeline, QwenImagePipeline))


def text_length(pipe) -> int:
    return TEXT_LENGTH.get(family_of(pipe).name, T5_LENGTH)


def patchified(pipe, latents):
    """FLUX.2 klein's output latents (the VAE's) in the run's form: patchified 2x2, batch-norm normalised."""
    b, c, h, w = latents.shape
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)
    bn = pipe.vae.bn
    std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + pipe.vae.config.batch_norm_eps)
    return (x - bn.running_mean.view(1, -1, 1, 1).to(x)) / std.to(x)


def run(pipe, edits, attention="fused", editor_kwargs=None, **kwargs):
    """`SOURCE` edited by `edits` at the tests' size and steps, from seed 0, as latents."""
    options = dict(num_inference_steps=STEPS, seed=0, output_type="latent", **SIZE)
    if has_t5_length(pipe):
        options["max_sequence_length"] = text_length(pipe)
    options.update(kwargs)
    return p2p.Editor(pipe, attention=attention, **(editor_kwargs or {})).edit(SOURCE, edits, **options)


def latents_of(pipe, images, height=SIZE["height"], width=SIZE["width"]):
    """(P, C, h, w) latents of an output_type="latent" result (Flux returns its 2x2 patches packed as tokens)."""
    if packs(pipe):
        return FluxPipeline._unpack_latents(images, height, width, pipe.vae_scale_factor)
    if isinstance(pipe, Flux2KleinPipeline):
        return patchified(pipe, images)
    if isinstance(pipe, Flux2Pipeline):  # its step form: (B, h * w, C) tokens of the patchified grid
        b, _, c = images.shape
        scale = pipe.vae_scale_factor * 2
        return images.permute(0, 2, 1).reshape(b, c, height // scale, width // scale)
    return images


def plain(pipe, prompt, **kwargs):
    """(C, h, w): the pipeline itself called on `prompt`, from the initial latent the editor draws for seed 0.

    Without `guidance_scale` the pipeline's default applies; it is the editor's, except SDXL's (5.0, not 7.5).
    """
    options = dict(num_inference_steps=STEPS, output_type="latent", **SIZE)
    if has_t5_length(pipe):
        options["max_sequence_length"] = text_length(pipe)
    options.update(kwargs)
    model = pipe.transformer if is_transformer(pipe) else pipe.unet
    scale = pipe.vae_scale_factor * (2 if isinstance(pipe, FLUX2) else 1)  # FLUX.2's: patchified 2x2
    channels = model.config.in_channels // 4 if packs(pipe) else model.config.in_channels if isinstance(
        pipe, FLUX2) else pipe.vae.config.latent_channels
    shape = (1, channels, options["height"] // scale, options["width"] // scale)
    dtype = torch.float32 if isinstance(pipe, ZImagePipeline) else model.dtype  # Z-Image draws float32 latents
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=dtype).to(pipe.device)
    if packs(pipe):
        latents = FluxPipeline._pack_latents(latents, *shape)
    if isinstance(pipe, QwenImagePipeline):  # guidance is true CFG, turned on by a negative prompt (qwenimage.py)
        guidance = options.pop("guidance_scale", 4.0)
        options.update(true_cfg_scale=guidance, negative_prompt=" " if guidance > 1 else None)
    if isinstance(pipe, PixArtSigmaPipeline):  # the prompt as the edits read it, the size as asked (pixart.py)
        options.update(clean_caption=False, use_resolution_binning=False)
    if isinstance(pipe, ChromaPipeline):  # its padding mask applied as a mask, as the model means it (chroma.py)
        saved = pipe.transformer.attn_processors
        masked_processors(pipe)
        try:
            images = pipe(prompt, latents=latents, **options).images
        finally:
            pipe.transformer.set_attn_processor(saved)
    else:
        images = pipe(prompt=prompt, latents=latents, **options).images
    return latents_of(pipe, images, options["height"], options["width"])[0]


class Runs:
    """The module's pipelines, edit runs and plain generations, each computed on first use."""

    def __init__(self):
        self._pipes, self._edits, self._plain = {}, {}, {}

    def pipe(self, setting: str):
        family = SETTINGS[setting][0]
        if family not in self._pipes:
            self._pipes[family] = on_device(BUILDERS[family]())
        return self._pipes[family]

    def edit(self, setting: str, case: str, attention: str = "fused"):
        key = (setting, case, attention)
        if key not in self._edits:
            self._edits[key] = run(self.pipe(setting), CASES[case], attention, **SETTINGS[setting][1])
        return self._edits[key]

    def plain(self, setting: str, prompt: str):
        key = (setting, prompt)
        if key not in self._plain:
            self._plain[key] = plain(self.pipe(setting), prompt, **SETTINGS[setting][1])
        return self._plain[key]


@pytest.fixture(scope="module")
def runs():
    return Runs()


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("setting", SETTINGS)
def test_fused_equals_explicit(runs, setting, case):
    fused, explicit = runs.edit(setting, case), runs.edit(setting, case, "explicit")
    assert fused.images.shape[0] == 1 + len(CASES[case])
    assert rel_err(fused.images, explicit.images) <= tolerance()


@pytest.mark.parametrize("attention", ["fused", "explicit"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("setting", SETTINGS)
def test_source_row_is_plain_generation(runs, setting, case, attention):
    pipe = runs.pipe(setting)
    source = latents_of(pipe, runs.edit(setting, case, attention).images)[0]
    assert rel_err(source, runs.plain(setting, SOURCE)) <= tolerance()


@pytest.mark.parametrize("attention", ["fused", "explicit"])
@pytest.mark.parametrize("setting", SETTINGS)
def test_noop_edits_are_plain_generation(runs, setting, attention):
    pipe = runs.pipe(setting)
    edits, prompts = zip(*NOOPS)
    images = latents_of(pipe, run(pipe, list(edits), attention, **SETTINGS[setting][1]).images)
    for row, prompt in enumerate([SOURCE, *prompts]):
        assert rel_err(images[row], runs.plain(setting, prompt)) <= tolerance(), prompt


@pytest.mark.parametrize("setting", SETTINGS)
def test_each_edit_in_a_batch_is_that_edit_alone(runs, setting):
    pipe, together = runs.pipe(setting), runs.edit(setting, "mixed")
    for e, edit in enumerate(CASES["mixed"]):
        alone = run(pipe, [edit], **SETTINGS[setting][1])
        assert rel_err(together.images[1 + e], alone.images[1]) <= tolerance()
        if edit.blend is not None:
            assert torch.equal(together.masks[e], alone.masks[0])


@pytest.mark.parametrize("case", [case for case, edits in CASES.items() if any(e.blend for e in edits)])
@pytest.mark.parametrize("setting", SETTINGS)
def test_outside_the_blend_mask_the_edit_keeps_the_source(runs, setting, case):
    result = runs.edit(setting, case)
    images = latents_of(runs.pipe(setting), result.images)
    blended = [e for e, edit in enumerate(CASES[case]) if edit.blend is not None]
    assert sorted(result.masks) == blended
    for e in blended:
        mask = result.masks[e]
        assert mask.device.type == "cpu" and mask.dtype == torch.bool and mask.shape == images.shape[-2:]
        outside = ~mask.to(images.device)
        assert torch.equal(images[1 + e][:, outside], images[0][:, outside])
        if case in PARTIAL_MASKS:
            assert 0 < mask.sum() < mask.numel()
            assert not torch.equal(images[1 + e][:, ~outside], images[0][:, ~outside])


# -- Re-edits on a cached source, and several runs in one forward batch: every family, every case ----------------


def _options(setting: str) -> dict:
    pipe_options = dict(num_inference_steps=STEPS, **SIZE, **SETTINGS[setting][1])
    if SETTINGS[setting][0] in ("sd3", "sd35", "flux", "flux-dev", "chroma", "pixart"):  # not Qwen-Image's: no T5
        pipe_options["max_sequence_length"] = T5_LENGTH
    if SETTINGS[setting][0] in TEXT_LENGTH:
        pipe_options["max_sequence_length"] = TEXT_LENGTH[SETTINGS[setting][0]]
    return pipe_options


@pytest.fixture(scope="module")
def caches(runs):
    """One cached source per setting (seed 0), shared by every case: a cache serves any edit of its source."""
    made = {}

    def get(setting: str):
        if setting not in made:
            made[setting] = p2p.Editor(runs.pipe(setting)).cache_source(SOURCE, seed=0, **_options(setting))
        return made[setting]

    return get


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("setting", SETTINGS)
def test_a_cached_source_gives_the_fresh_edit(runs, caches, setting, case):
    pipe, fresh = runs.pipe(setting), runs.edit(setting, case)
    cached = p2p.Editor(pipe).edit(SOURCE, CASES[case], cache=caches(setting), output_type="latent", **_options(setting))
    assert cached.images.shape == fresh.images.shape
    assert rel_err(cached.images, fresh.images) <= tolerance()
    assert sorted(cached.masks) == sorted(fresh.masks)
    for e in fresh.masks:  # the blend masks of the cached run are the fresh run's
        assert torch.equal(cached.masks[e], fresh.masks[e])


@pytest.mark.parametrize("setting", SETTINGS)
def test_runs_in_one_forward_batch_each_equal_the_run_alone(runs, setting):
    pipe, cases = runs.pipe(setting), ["replace-one-to-many", "refine", "blend"]
    editor = p2p.Editor(pipe)
    prepared = [editor.prepare(SOURCE, CASES[case], seed=seed, **_options(setting)) for seed, case in enumerate(cases)]
    together = editor.run(prepared, output_type="latent")
    for seed, (case, result) in enumerate(zip(cases, together)):
        alone = editor.edit(SOURCE, CASES[case], seed=seed, output_type="latent", **_options(setting))
        assert rel_err(result.images, alone.images) <= tolerance(), case
        for e in alone.masks:
            assert torch.equal(result.masks[e], alone.masks[e])


# -- Masked padding: an edit whose prompt fills the text length ---------------------------------------------------

MASKED = [setting for setting, (family, _) in SETTINGS.items() if family in ("chroma", "pixart")]


@pytest.mark.parametrize("setting", MASKED)
def test_an_edit_that_fills_the_text_length_fused_equals_explicit(runs, setting):
    # The source is shorter than the edit, so it has padding keys; the edit has none. A word swap's fused rows
    # run on the source's queries and keys, which must take the source's key mask too.
    pipe = runs.pipe(setting)
    source, edit = "a cat eating a burger", p2p.Edit("a cat eating a lasagne", cross_steps=0.5)
    length = len(pipe.tokenizer(edit.prompt).input_ids)  # its true length, EOS included
    assert len(pipe.tokenizer(source).input_ids) < length
    options = dict(num_inference_steps=STEPS, **SIZE, **SETTINGS[setting][1], max_sequence_length=length)
    fused, explicit = (p2p.Editor(pipe, attention=attention).edit(source, [edit], seed=0, output_type="latent",
                                                                  **options) for attention in ("fused", "explicit"))
    effect = rel_err(explicit.images[1], explicit.images[0])  # how far the edit moves its row
    assert rel_err(fused.images, explicit.images) <= tolerance() and effect > 10 * tolerance()
    cache = p2p.Editor(pipe).cache_source(source, seed=0, **options)
    cached = p2p.Editor(pipe).edit(source, [edit], cache=cache, output_type="latent", **options)
    assert rel_err(cached.images, explicit.images) <= tolerance()
