import torch
from conftest import TORCH_DEVICE, TORCH_DTYPE

from prompt2prompt.attention.blend import apply_blend, blend_mask, word_mask


def peak_maps(row: int, col: int, token: int, size=(4, 4)) -> torch.Tensor:
    maps = torch.zeros(*size, 77, device=TORCH_DEVICE)  # recorded maps accumulate in float32
    maps[row, col, token] = 1.0
    return maps


def test_word_mask_pools_upsamples_and_thresholds():
    maps = peak_maps(0, 0, token=2)
    pooled = word_mask(maps, [2], (8, 8), 0.3, pool=True)
    expected = torch.zeros(8, 8, dtype=torch.bool, device=TORCH_DEVICE)
    expected[:4, :4] = True  # the 3x3 pool spreads the peak to cells (0..1, 0..1), each 2x2 at 8x8
    assert torch.equal(pooled, expected)
    unpooled = word_mask(maps, [2], (8, 8), 0.3, pool=False)
    assert unpooled.sum() == 4 and unpooled[:2, :2].all()


def test_word_mask_sums_the_words_tokens_and_handles_no_words():
    maps = peak_maps(3, 3, token=5) + 0.5 * peak_maps(0, 0, token=6)
    mask = word_mask(maps, [5, 6], (4, 4), 0.6, pool=False)
    assert mask.sum() == 1 and mask[3, 3]
    assert not word_mask(maps, [], (4, 4), 0.3, pool=True).any()


def test_blend_mask_is_the_union_less_the_exclusions():
    source, edit = peak_maps(0, 0, token=2), peak_maps(3, 3, token=2)
    union = blend_mask(source, edit, (4, 4), source_positions=[2], edit_positions=[2], threshold=0.3)
    assert union[0, 0] and union[3, 3] and not union[0, 3]
    source[1, 1, 4] = 1.0
    cut = blend_mask(source, edit, (4, 4), source_positions=[2], edit_positions=[2], threshold=0.3,
                     exclude_source_positions=[4], exclude_threshold=0.3)
    expected = union.clone()
    expected[1, 1] = False  # the excluded word's unpooled region
    assert torch.equal(cut, expected)


def test_apply_blend_moves_only_the_masked_region():
    latents = torch.stack([torch.zeros(4, 2, 2), torch.ones(4, 2, 2), 2 * torch.ones(4, 2, 2)]).to(TORCH_DEVICE, TORCH_DTYPE)
    mask = torch.tensor([[True, False], [False, False]], device=TORCH_DEVICE)
    out = apply_blend(latents, 1, mask)
    assert out[1, :, 0, 0].eq(1).all() and out[1, :, 1, 1].eq(0).all()
    assert torch.equal(out[2], latents[2]) and torch.equal(out[0], latents[0])
