"""Z-Image: its templated Qwen3 text worked by hand on the tiny pipeline's byte-level BPE, its captions padded to 32
with an attended learned token, the image positions of a run whose captions pad to other lengths, CFG at any
guidance above 0 with the conditional rows first, the refusals, and its flow inversions.

The tokenizer (tests/zimage_pipelines.py) reads "user" as two pieces, "bicycle" as four (Ġb ic y cle) and
"assistant" as four. The caption of "a cat riding a bicycle":
    <|im_start|> u ser Ċ | a Ġcat Ġriding Ġa Ġb ic y cle | <|im_end|> Ċ <|im_start|> a ss ist ant Ċ
    (20 tokens: positions 0..19; the transformer pads it to 32 with its learned pad token, attended, of no word)
"""

import pytest
import torch
from conftest import on_device, rel_err, tolerance
from flow_inversions import blocky_image, check_direct_and_euler
from zimage_pipelines import caption_length, image_positions_after, tiny_zimage_pipeline

import prompt2prompt as p2p

SOURCE = "a cat riding a bicycle"
LONG = "a black cat riding a red bicycle and a dog riding a green bicycle on a road"  # 35 caption tokens: pads to 64
SIZE = dict(height=32, width=32)
OPTIONS = dict(num_inference_steps=3, seed=0, output_type="latent", **SIZE)


@pytest.fixture(scope="module")
def pipe():
    return on_device(tiny_zimage_pipeline())


def _plain(pipe, prompt, **kwargs):
    """The pipeline itself on `prompt`, from the latents the editor draws for seed 0."""
    family = p2p.Editor(pipe).family
    latents = torch.randn((1, *family.latent_shape(32, 32)), generator=torch.Generator().manual_seed(0))
    return pipe(prompt=prompt, latents=latents.to(pipe.device), num_inference_steps=3, output_type="latent",
                **SIZE, **kwargs).images[0]


def test_the_whole_template_is_the_text_and_its_caption_pads_to_32(pipe):
    editor = p2p.Editor(pipe)
    t = editor.tokenize(SOURCE)
    texts = editor.family.token_texts(t)
    assert len(t.ids) == 20 == caption_length(pipe, SOURCE)  # the pipeline's own caption, nothing dropped
    assert texts[:4] == ["<|im_start|>", "u", "ser", ""] and texts[12:14] == ["<|im_end|>", ""]
    assert t.word_tokens == [[4], [5], [6], [7], [8, 9, 10, 11]]  # bicycle: Ġb ic y cle
    assert (t.true_length, t.length) == (32, 32) and texts[20:] == [""] * 12  # learned pads: attended, no word


def test_a_run_whose_edit_pads_to_64_gives_the_source_s_image_the_edit_s_positions(pipe):
    assert 32 < caption_length(pipe, LONG) <= 64
    editor = p2p.Editor(pipe)
    run = editor.prepare(SOURCE, [LONG], seed=0, **SIZE)
    source, edit = run.tokens
    assert (source.length, source.true_length, edit.true_length) == (64, 32, 64)
    assert run.plan.key_mask[0, 32:].eq(float("-inf")).all() and run.plan.key_mask[0, :32].eq(0).all()
    assert run.layers.image_start == 64
    noop = p2p.Edit(LONG, cross_steps=0.0, self_steps=0.0)
    result = editor.edit(SOURCE, [noop], **OPTIONS, guidance_scale=0.0)
    # The longest caption's row is plain generation; the source's image sits after 64 caption positions, not 32.
    assert rel_err(result.images[1], _plain(pipe, LONG, guidance_scale=0.0)) <= tolerance()
    with image_positions_after(pipe.transformer, 64):
        moved = _plain(pipe, SOURCE, guidance_scale=0.0)
    assert rel_err(result.images[0], moved) <= tolerance()
    assert rel_err(result.images[0], _plain(pipe, SOURCE, guidance_scale=0.0)) > 100 * tolerance()
    fused, explicit = (p2p.Editor(pipe, attention=a).edit(SOURCE, [LONG], **OPTIONS, guidance_scale=5.0).images
                       for a in ("fused", "explicit"))
    assert rel_err(fused, explicit) <= tolerance(1e-4)


def test_guidance_above_zero_is_cfg_in_one_batch_conditional_rows_first(pipe):
    editor = p2p.Editor(pipe)
    batches = []
    hook = pipe.transformer.register_forward_pre_hook(lambda module, args: batches.append(len(args[0])))
    try:
        at_one = editor.edit(SOURCE, ["a dog riding a bicycle"], **OPTIONS, guidance_scale=1.0).images
    finally:
        hook.remove()
    assert batches == [4] * 3  # source and edit, conditional and unconditional: CFG at guidance 1
    assert rel_err(at_one[0], _plain(pipe, SOURCE, guidance_scale=1.0)) <= tolerance()
    assert rel_err(at_one, editor.edit(SOURCE, ["a dog riding a bicycle"], **OPTIONS, guidance_scale=0.0).images) > 1e-3
    # cfg_truncation: late in the run the batch is the conditional rows alone
    options = dict(OPTIONS, num_inference_steps=4, guidance_scale=5.0, cfg_truncation=0.3)
    fused, explicit = (p2p.Editor(pipe, attention=a).edit(SOURCE, ["a dog riding a bicycle"], **options).images
                       for a in ("fused", "explicit"))
    assert rel_err(fused, explicit) <= tolerance(1e-4)
    latents = torch.randn((1, *editor.family.latent_shape(32, 32)), generator=torch.Generator().manual_seed(0))
    own = pipe(prompt=SOURCE, latents=latents.to(pipe.device), num_inference_steps=4, guidance_scale=5.0,
               cfg_truncation=0.3, output_type="latent", **SIZE).images
    assert rel_err(fused[0], own[0]) <= tolerance()


def test_an_image_whose_patches_are_padded_is_edited_with_its_pads_as_image_tokens(pipe):
    # 40 px: a 10x10 patch grid, 100 image tokens, which the model pads to 128 with its learned token
    editor = p2p.Editor(pipe)
    edits = [p2p.Edit("a dog riding a bicycle", self_steps=(0.0, 1.0), blend=p2p.LocalBlend("cat", "dog", threshold=0.97))]
    options = dict(num_inference_steps=3, seed=0, output_type="latent", height=40, width=40, guidance_scale=5.0)
    fused, explicit = (p2p.Editor(pipe, attention=a).edit(SOURCE, edits, record_attention=True, **options)
                       for a in ("fused", "explicit"))
    assert fused.images.shape == (2, 16, 20, 20) and fused.masks[0].shape == (20, 20)
    assert fused.attention[10].shape[:3] == (2, 10, 10)  # maps on the 10x10 grid, the pads left out
    assert rel_err(fused.images, explicit.images) <= tolerance(1e-4)
    latents = torch.randn((1, *editor.family.latent_shape(40, 40)), generator=torch.Generator().manual_seed(0))
    own = pipe(prompt=SOURCE, latents=latents.to(pipe.device), num_inference_steps=3, guidance_scale=5.0,
               output_type="latent", height=40, width=40).images
    assert rel_err(fused.images[0], own[0]) <= tolerance()


def test_refusals_name_what_would_move_the_image(pipe):
    editor = p2p.Editor(pipe)
    with pytest.raises(ValueError, match="pads to 64 caption tokens, more than the prompts' 32"):
        editor.edit(SOURCE, ["a dog riding a bicycle"], negative_prompt=LONG, **OPTIONS)
    cache = editor.cache_source(SOURCE, seed=0, num_inference_steps=3, **SIZE)
    editor.edit(SOURCE, ["a dog riding a bicycle"], cache=cache, num_inference_steps=3, **SIZE)  # same length: fine
    with pytest.raises(ValueError, match=r"text_length=64 \(the cache has 32\)"):
        editor.edit(SOURCE, [LONG], cache=cache, num_inference_steps=3, **SIZE)


@pytest.mark.parametrize("guidance", [0.0, 5.0])
def test_direct_inversion_reconstructs_the_image_s_latent_and_the_edit_runs_free(pipe, guidance):
    direct = check_direct_and_euler(pipe, blocky_image(), SOURCE, "a dog riding a bicycle", source_tolerance=1e-4,
                                    guidance_scale=guidance, num_inference_steps=4, height=32, width=32)
    with pytest.raises(ValueError, match="this inversion placed the image after the source's 32 caption tokens, and "
                                         "the edits' text pads to 64"):
        p2p.Editor(pipe).edit(SOURCE, [LONG], inversion=direct, output_type="latent")


def test_runs_of_other_text_lengths_in_one_batch_each_equal_the_run_alone(pipe):
    editor = p2p.Editor(pipe)
    options = dict(num_inference_steps=3, guidance_scale=5.0, **SIZE)
    cases = [["a dog riding a bicycle"], [LONG]]  # the first run's text is 32 long, the second's 64
    prepared = [editor.prepare(SOURCE, edits, seed=seed, **options) for seed, edits in enumerate(cases)]
    assert [run.text_length for run in prepared] == [32, 64]
    together = editor.run(prepared, output_type="latent")
    for seed, (edits, result) in enumerate(zip(cases, together)):
        alone = editor.edit(SOURCE, edits, seed=seed, output_type="latent", **options)
        assert rel_err(result.images, alone.images) <= tolerance(), edits
