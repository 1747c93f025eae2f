"""The PIE-Bench harness: its data format, the protocol's edits, the metrics against hand-computed values, the
plumbing of the metric models (random weights), the table, and a run resumed after a kill."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from prompt2prompt.bench.metrics import Metrics, MetricError, structure_distance
from prompt2prompt.bench.pie import Entry, PieError, Protocol, blended_words, decode_mask, load_pie, protocol_edit, strip_brackets
from prompt2prompt.bench.run import PUBLISHED, BenchResult, table

ASSETS = Path(__file__).parent / "assets"


def reference_decode(pairs, shape):
    """The reference evaluator's loop, written out: what decode_mask must give."""
    total = shape[0] * shape[1]
    flat = np.zeros(total)
    for i in range(0, len(pairs), 2):
        for j in range(min(pairs[i + 1], total - pairs[i])):
            flat[pairs[i] + j] = 1
    mask = flat.reshape(shape)
    mask[0, :] = mask[-1, :] = mask[:, 0] = mask[:, -1] = 1
    return mask


def test_masks_decode_as_the_reference_does_border_included():
    mask = decode_mask([9, 3, 26, 2], (6, 6))
    by_hand = np.ones((6, 6), dtype=np.uint8)
    by_hand[1:5, 1:5] = 0  # the interior, before the runs
    by_hand[1, 3:5] = 1  # 9, 10, 11: row 1, columns 3-5 (5 is the border)
    by_hand[4, 2:4] = 1  # 26, 27: row 4, columns 2-3
    assert mask.dtype == np.uint8 and np.array_equal(mask, by_hand)
    pairs = [0, 3, 30, 100]  # the last run is cut at the end of the array
    assert np.array_equal(decode_mask(pairs, (6, 6)), reference_decode(pairs, (6, 6)))
    assert decode_mask([], (4, 4)).sum() == 12  # only the border
    with pytest.raises(PieError, match="pairs"):
        decode_mask([1, 2, 3], (4, 4))


def test_brackets_and_blended_words():
    assert strip_brackets("a [red] [bird] flying") == "a red bird flying"
    assert blended_words("cat dog") == ("cat", "dog") and blended_words("") is None
    with pytest.raises(PieError, match="blended_word"):
        blended_words("a big cat")


def _entry(blended="cat dog", prompt="a dog sitting on a bench", mask=None):
    return Entry("000000000001", Path("x.png"), "a cat sitting on a bench", prompt, "", "1", blended,
                 np.zeros((4, 4), np.uint8) if mask is None else mask)


def test_the_protocols_edits():
    edit = protocol_edit(_entry())
    assert (edit.prompt, edit.mode, edit.cross_steps, edit.self_steps) == ("a dog sitting on a bench", "refine", 0.4, 0.6)
    assert edit.weights == {"dog": 2.0}
    blend = edit.blend
    assert (blend.source_words, blend.edit_words, blend.start, blend.threshold, blend.exclude_threshold) == ("cat", "dog", 0.2, 0.3, 0.3)
    plain = protocol_edit(_entry(blended=""))
    assert plain.blend is None and plain.weights is None
    other = protocol_edit(_entry(), Protocol(cross_steps=0.8, target_weight=3.0))
    assert other.cross_steps == 0.8 and other.weights == {"dog": 3.0}


def write_pie(root: Path, entries: dict) -> Path:
    """A PIE-format folder of 16x16 images from `entries` (id -> fields, image as an array)."""
    for entry in entries.values():
        path = root / "annotation_images" / entry["image_path"]
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(entry.pop("pixels")).save(path)
    (root / "mapping_file.json").write_text(json.dumps(entries))
    return root


def test_a_pie_folder_is_read_and_checked(tmp_path):
    pixels = np.zeros((512, 512, 3), np.uint8)
    fields = dict(image_path="1_change_object_80/000000000001.jpg", original_prompt="a [cat] on a bench",
                  editing_prompt="a [dog] on a bench", editing_instruction="make it a dog", editing_type_id="1",
                  blended_word="cat dog", mask=[513, 10])
    root = write_pie(tmp_path / "pie", {"000000000001": dict(fields, pixels=pixels),
                                        "000000000002": dict(fields, image_path="9_x/2.png", editing_type_id="9",
                                                             pixels=pixels)})
    entries = load_pie(root)
    assert [e.id for e in entries] == ["000000000001", "000000000002"]
    first = entries[0]
    assert (first.original_prompt, first.editing_prompt, first.blended_word) == ("a cat on a bench", "a dog on a bench", "cat dog")
    assert first.mask.shape == (512, 512) and first.mask[1, 1:11].all() and not first.mask[1, 11]
    assert [e.id for e in load_pie(root, types=["9"])] == ["000000000002"]
    data = json.loads((root / "mapping_file.json").read_text())
    data["000000000002"]["editing_type_id"] = 9
    (root / "mapping_file.json").write_text(json.dumps(data))
    with pytest.raises(PieError, match="'000000000002' of mapping_file.json: editing_type_id must be a str"):
        load_pie(root)
    with pytest.raises(PieError, match="has no mapping_file.json"):
        load_pie(tmp_path)


def test_psnr_mse_and_ssim_on_the_unedited_region_match_hand_computed_values():
    a = np.full((32, 32, 3), 100, np.uint8)
    b = np.full((32, 32, 3), 120, np.uint8)
    mask = np.zeros((32, 32), np.uint8)
    mask[:16] = 1  # the top half is edited: both images are black there
    values = Metrics(["psnr", "mse", "ssim"])(a, b, mask, "")
    mse = 0.5 * (20 / 255) ** 2  # half the pixels differ by 20/255, the other half are both 0
    assert values["mse"] == pytest.approx(mse, rel=1e-5)
    assert values["psnr"] == pytest.approx(10 * math.log10(1 / mse), rel=1e-5)
    # SSIM of two flat images is the luminance term, (2 m_a m_b + C1) / (m_a^2 + m_b^2 + C1); with the half-black
    # images the windows straddling the edge differ, so check it on the whole (unmasked) images
    whole = Metrics(["ssim"])(a, b, np.zeros((32, 32), np.uint8), "")["ssim"]
    ma, mb, c1 = 100 / 255, 120 / 255, 0.01**2
    # float32 leaves variances of ~1e-8 where they are 0, against C2 = 9e-4: a few 1e-5 of the value
    assert whole == pytest.approx((2 * ma * mb + c1) / (ma**2 + mb**2 + c1), rel=1e-4)
    assert values["ssim"] < 1 and Metrics(["ssim"])(a, a, mask, "")["ssim"] == pytest.approx(1.0)
    full = Metrics(["psnr", "mse"])(a, b, np.ones((32, 32), np.uint8), "")
    assert math.isnan(full["psnr"]) and math.isnan(full["mse"])  # nothing is left unedited


def test_lpips_gets_both_masked_images_in_minus_one_to_one():
    seen = []

    def lpips(x, y):
        seen.append((x, y))
        return (x - y).abs().mean()

    a, b = np.full((8, 8, 3), 255, np.uint8), np.zeros((8, 8, 3), np.uint8)
    mask = np.zeros((8, 8), np.uint8)
    mask[:, :4] = 1
    value = Metrics(["lpips"], lpips=lpips)(a, b, mask, "")["lpips"]
    x, y = seen[0]
    assert x.shape == (1, 3, 8, 8) and float(x[..., :4].max()) == -1.0 and float(x[..., 4:].min()) == 1.0
    assert float(y.max()) == -1.0 and value == pytest.approx(1.0)  # half the pixels differ by 2


def test_lpips_without_torchvision_is_one_clear_error():
    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001 (not installed, or not matching this torch)
        with pytest.raises(MetricError, match="lpips cannot be computed here.*--metrics"):
            Metrics(["lpips"])
    else:
        assert Metrics(["lpips"]).lpips is not None


def tiny_dino():
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(hidden_size=24, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, patch_size=8,
                       image_size=224, layer_norm_eps=1e-6)
    return ViTModel(config, add_pooling_layer=False).eval()


def test_structure_distance_reads_the_last_blocks_keys_at_224_px():
    dino = tiny_dino()
    tokens = []
    last = [m for name, m in dino.named_modules() if name.endswith((".k_proj", ".key"))][-1]
    handle = last.register_forward_hook(lambda module, args, out: tokens.append(out.shape))
    rng = np.random.default_rng(0)
    a, b = (rng.integers(0, 256, (512, 512, 3), dtype=np.uint8) for _ in range(2))
    try:
        same = structure_distance(dino, a, a)
        different = structure_distance(dino, a, b)
    finally:
        handle.remove()
    assert tokens[0] == (1, 1 + 28 * 28, 24)  # 512 px resized to 224, patches of 8, CLS included; heads side by side
    assert same == 0.0 and different > 0 and structure_distance(dino, b, a) == pytest.approx(different)
    assert Metrics(["structure_distance"], dino=dino)(a, b, np.zeros((512, 512), np.uint8), "")["structure_distance"] == pytest.approx(different)


def tiny_clip():
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizerFast

    torch.manual_seed(0)
    config = CLIPConfig(text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2),
                        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=32, patch_size=8), projection_dim=8)
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32),
                              tokenizer=CLIPTokenizerFast.from_pretrained(ASSETS / "clip-tokenizer"))
    return CLIPModel(config).eval(), processor


def test_clip_scores_the_whole_edit_and_its_masked_region():
    model, processor = tiny_clip()
    metrics = Metrics(["clip_whole", "clip_edited"], clip=lambda: (model, processor))
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 1
    values = metrics(image, image, mask, "a red circle")

    def by_hand(pixels):
        inputs = processor(text=["a red circle"], images=[pixels], return_tensors="pt", padding=True)
        with torch.no_grad():
            i = model.get_image_features(pixel_values=inputs["pixel_values"])
            t = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        i, t = (getattr(x, "pooler_output", x) for x in (i, t))
        return max(100 * float(torch.nn.functional.cosine_similarity(i, t)), 0.0)

    assert values["clip_whole"] == pytest.approx(by_hand(image), abs=1e-3)
    assert values["clip_edited"] == pytest.approx(by_hand(np.uint8(image * mask[..., None])), abs=1e-3)


def test_the_table_averages_per_type_skips_nan_and_shows_the_published_rows(tmp_path):
    rows = {"direct": {"a": {"psnr": 20.0, "mse": 0.01, "seconds": 2.0}, "b": {"psnr": math.nan, "mse": 0.03, "seconds": 4.0},
                       "c": {"psnr": 30.0, "mse": 0.02, "seconds": 3.0}}}
    result = BenchResult(rows, {"a": "1", "b": "1", "c": "6"}, {"direct": {"d": "ValueError: boom"}})
    data = table(result, tmp_path)
    overall, type1 = data["sections"]["all"]["direct"], data["sections"]["1"]["direct"]
    assert overall["psnr"] == pytest.approx(25.0) and overall["mse"] == pytest.approx(200.0)  # x10^4
    assert overall["seconds"] == pytest.approx(3.0) and overall["images"] == 3
    assert type1["psnr"] == pytest.approx(20.0) and type1["mse"] == pytest.approx(200.0)
    assert data["published"] == {"direct": PUBLISHED["direct"]}
    markdown = (tmp_path / "table.md").read_text()
    assert "| Direct + P2P | 3 | 25.00 | 200.00 | 3.00 |" in markdown
    assert "| Direct + P2P, published (SD 1.4, 700 images) | 700 | 27.22 | 32.86 |" in markdown
    assert "Editing type 6: change color" in markdown and "Failed: Direct + P2P: 1" in markdown
    # Under the table, what each column measures: the pixel metrics are on the unedited region.
    assert "- PSNR (higher): on the unedited region: both images outside the edit mask" in markdown
    assert "- MSE x10^4 (lower): on the unedited region" in markdown and "seconds per image: wall time" in markdown
    assert (tmp_path / "table.csv").read_text().splitlines()[1] == "all,direct,3,25.00,200.00,3.00"
    assert json.loads((tmp_path / "table.json").read_text())["sections"]["6"]["direct"]["psnr"] == 30.0


def test_a_killed_shapes_run_resumes_where_it_stopped(tmp_path):
    out = tmp_path / "bench"
    command = [sys.executable, "-c", "from prompt2prompt.cli import main; main()", "bench", "shapes", "--out", str(out),
               "--scenes", "5", "--inversion", "ddim,direct", "--steps", "2", "--device", "cpu"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 240
        while time.time() < deadline and process.poll() is None:
            if len(list((out / "ddim" / "metrics").glob("*.json"))) >= 2 or list((out / "direct").glob("jobs/*/edit-1.png")):
                break
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        process.wait()
    finally:
        with __import__("contextlib").suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    done = {p: p.stat().st_mtime_ns for p in out.glob("*/jobs/*/edit-1.png")}
    assert done and not (out / "table.md").exists(), "the run was not killed mid-way"

    again = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert {p: p.stat().st_mtime_ns for p in done} == done  # finished edits were not made again
    # The table itself is printed, with what its columns measure; each method's bar names its method, and no
    # nested bar (a job's inversion) writes cursor-up codes into the log.
    assert "| DDIM + P2P | 5 |" in again.stdout and "attribute success % (higher): share of edits" in again.stdout
    assert str(out / "table.md") in again.stdout
    assert "Direct + P2P (2/2)" in again.stderr  # the resumed method's bar (DDIM's jobs were all done)
    assert "\x1b[A" not in again.stderr and "inversion:" not in again.stderr
    data = json.loads((out / "table.json").read_text())
    assert {m: v["images"] for m, v in data["sections"]["all"].items()} == {"ddim": 5, "direct": 5}
    assert data["columns"] == ["psnr", "mse", "ssim", "success", "seconds"]
    assert "images 512x512 fitted to the model's 64x64 (resized, centre-cropped)" in (out / "table.md").read_text()
    assert sorted(p.name for p in (out / "direct" / "metrics").glob("*.json")) == sorted(
        f"{e.id}.json" for e in load_pie(out / "data"))


@pytest.mark.parametrize("args, message", [
    (["pie", "--data", "{tmp}/nowhere", "--out", "{tmp}/out"], "is not a PIE-Bench folder: it has no mapping_file.json"),
    (["pie", "--data", "{tmp}", "--out", "{tmp}/out", "--metrics", "psnr,fid"], "unknown metrics ['fid']"),
    (["shapes", "--out", "{tmp}/out", "--inversion", ","], "--inversion names no method"),
])
def test_bench_usage_errors_are_one_line_and_exit_2(tmp_path, args, message):
    from typer.testing import CliRunner

    from prompt2prompt.cli import app

    (tmp_path / "mapping_file.json").write_text("{}")
    result = CliRunner().invoke(app, ["bench", *(a.format(tmp=tmp_path) for a in args)])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()) and "Traceback" not in result.output
