"""The joint-attention demo model's training: what it trains is what diffusers' StableDiffusion3Pipeline runs."""

import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from diffusers.models.attention_processor import JointAttnProcessor2_0

from prompt2prompt.demo import flow
from prompt2prompt.demo.training import Config, build_tokenizer, tokenize

pytestmark = pytest.mark.training


def tiny():
    config = Config(flow_layers=2, flow_heads=2, flow_head_dim=16, flow_text_widths=(32, 16), text_layers=2)
    torch.manual_seed(0)
    transformer, encoders = flow.build_transformer(config), flow.build_text_encoders(config)
    for p in transformer.parameters():  # diffusers zero-initialises the output layers: make every path count
        p.data += 0.05 * torch.randn_like(p)
    return transformer.eval(), [e.eval() for e in encoders]


@torch.no_grad()
def test_one_token_with_log_repeats_is_exactly_the_pipelines_zero_tokens():
    transformer, encoders = tiny()
    ids = torch.randint(0, 49000, (2, 77))
    text, pooled = flow.encode_text(encoders, ids)
    assert text.shape == (2, 78, 48) and pooled.shape == (2, 48) and not text[:, -1].any()
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([700.0, 150.0])
    for repeats in (1, 7, 256):
        # What StableDiffusion3Pipeline feeds without T5: the CLIP text, then `repeats` zero vectors.
        zeros = torch.cat([text[:, :77], text.new_zeros(2, repeats, 48)], 1)
        transformer.set_attn_processor(JointAttnProcessor2_0())
        expected = transformer(hidden_states=x, encoder_hidden_states=zeros, pooled_projections=pooled,
                               timestep=t).sample
        transformer.set_attn_processor(flow.RepeatedTokenProcessor(repeats))
        got = transformer(hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled, timestep=t).sample
        assert (got - expected).abs().max() < 1e-5 * expected.abs().max()
    # The count matters: one copy is not 256 (the control that the comparison can fail).
    transformer.set_attn_processor(flow.RepeatedTokenProcessor(1))
    one = transformer(hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled, timestep=t).sample
    assert (one - expected).abs().max() > 1e-3 * expected.abs().max()


@torch.no_grad()
def test_the_text_is_what_the_pipelines_encode_prompt_gives():
    transformer, (clip_l, clip_g) = tiny()
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=flow.build_flow_scheduler(), vae=None,
                                    text_encoder=clip_l, tokenizer=build_tokenizer(), text_encoder_2=clip_g,
                                    tokenizer_2=build_tokenizer(), text_encoder_3=None, tokenizer_3=None)
    caption = "a big red circle and a small blue star on a white background"
    embeds, _, pooled, _ = pipe.encode_prompt(caption, None, None, do_classifier_free_guidance=False,
                                              max_sequence_length=16)
    text, ours_pooled = flow.encode_text([clip_l, clip_g], tokenize(build_tokenizer(), [caption]))
    assert embeds.shape == (1, 77 + 16, 48)
    torch.testing.assert_close(text[:, :77], embeds[:, :77])
    assert not embeds[:, 77:].any()
    torch.testing.assert_close(ours_pooled, pooled)
