import shutil

import pytest
import torch
from diffusers import ChromaPipeline, FluxPipeline, PixArtSigmaPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from huggingface_hub import constants
from safetensors.torch import save_file

from prompt2prompt import Editor, loading
from prompt2prompt.engine import load_editor
from prompt2prompt.loading import ModelLoadError, load_pipeline, parse_dtype, resolve_model


def test_loads_a_diffusers_folder_on_cpu_in_float32(tiny_sd_dir):
    pipe = load_pipeline(str(tiny_sd_dir))
    assert type(pipe) is StableDiffusionPipeline
    assert pipe.unet.dtype == torch.float32 and pipe.device.type == "cpu"
    assert resolve_model(str(tiny_sd_dir)).revision is None


def test_detects_sdxl_folders(tiny_sdxl_dir):
    pipe = load_pipeline(str(tiny_sdxl_dir), torch_dtype="bf16")
    assert type(pipe) is StableDiffusionXLPipeline
    assert pipe.unet.dtype == torch.bfloat16


@pytest.mark.parametrize("folder, cls", [("tiny_sd3_dir", StableDiffusion3Pipeline), ("tiny_flux_dir", FluxPipeline),
                                        ("tiny_chroma_dir", ChromaPipeline), ("tiny_pixart_dir", PixArtSigmaPipeline)])
def test_detects_mmdit_folders_and_edits_them(request, folder, cls):
    pipe = load_pipeline(str(request.getfixturevalue(folder)))
    assert type(pipe) is cls
    result = Editor(pipe).edit("a cat riding a bicycle", ["a dog riding a bicycle"], num_inference_steps=2, seed=0,
                               height=32, width=32, max_sequence_length=16, output_type="pt")
    assert result.images.shape == (2, 3, 32, 32) and result.images.isfinite().all()


def test_demo_resolves_to_the_packaged_folder(tiny_sd_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(loading.DEMO_MODELS, "demo", tmp_path / "missing")
    with pytest.raises(ModelLoadError, match="demo model is missing"):
        resolve_model("demo")
    monkeypatch.setitem(loading.DEMO_MODELS, "demo-flow", tmp_path / "missing")
    with pytest.raises(ModelLoadError, match="demo-flow model is missing"):
        resolve_model("demo-flow")
    monkeypatch.setitem(loading.DEMO_MODELS, "demo", tiny_sd_dir)
    source = resolve_model("demo")
    assert (source.id, source.path) == ("demo", tiny_sd_dir)
    assert type(load_pipeline("demo")) is StableDiffusionPipeline


def _fake_hub_cache(cache, repo_id, folder, commit):
    """The Hugging Face cache layout: refs/main names the commit whose snapshot holds the files."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def _go_offline(monkeypatch):
    # huggingface_hub reads HF_HUB_OFFLINE once at import; patch its constant too so nothing reaches the network.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def test_offline_hub_id_loads_from_the_cache_and_records_its_commit(tiny_sd_dir, tmp_path, monkeypatch):
    commit = "0123456789abcdef0123456789abcdef01234567"
    _fake_hub_cache(tmp_path, "p2p-tests/tiny-sd", tiny_sd_dir, commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    _go_offline(monkeypatch)
    source = resolve_model("p2p-tests/tiny-sd")
    assert (source.id, source.revision) == ("p2p-tests/tiny-sd", commit)
    assert type(load_pipeline(source)) is StableDiffusionPipeline


def test_offline_hub_id_missing_from_the_cache_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    _go_offline(monkeypatch)
    with pytest.raises(ModelLoadError) as info:
        load_pipeline("p2p-tests/not-cached")
    message = str(info.value)
    assert "'p2p-tests/not-cached' is not in the Hugging Face cache" in message
    assert "HF_HUB_OFFLINE=1" in message and "hf download p2p-tests/not-cached" in message


@pytest.mark.parametrize(
    "name, match",
    [
        ("./no/such/folder", "no such file or folder: './no/such/folder'"),
        ("weights.safetensors", "no such file or folder"),
    ],
)
def test_missing_paths_are_named(name, match):
    with pytest.raises(ModelLoadError, match=match):
        resolve_model(name)


def test_rejects_folders_and_files_that_are_not_sd_pipelines(tmp_path):
    with pytest.raises(ModelLoadError, match="no model_index.json"):
        load_pipeline(str(tmp_path))
    (tmp_path / "model_index.json").write_text('{"_class_name": "FluxPipeline", "transformer": ["diffusers", "X"]}')
    with pytest.raises(ModelLoadError, match="holds a FluxPipeline model"):
        load_pipeline(str(tmp_path))
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"\0")
    with pytest.raises(ModelLoadError, match="not a .safetensors checkpoint"):
        load_pipeline(str(pickle))
    other = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down.weight": torch.zeros(2)}, other)
    with pytest.raises(ModelLoadError, match="is not a Stable Diffusion or Flux checkpoint"):
        load_pipeline(str(other))
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"not a safetensors header")
    with pytest.raises(ModelLoadError, match="cannot read"):
        load_pipeline(str(corrupt))


def test_single_file_checkpoints_are_told_apart_by_their_weight_names(tmp_path, monkeypatch):
    sd = tmp_path / "sd.safetensors"
    save_file({"model.diffusion_model.out.0.weight": torch.zeros(1),
               "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.zeros(1)}, sd)
    xl = tmp_path / "xl.safetensors"
    save_file({"model.diffusion_model.out.0.weight": torch.zeros(1),
               "conditioner.embedders.1.model.ln_final.weight": torch.zeros(1)}, xl)
    sd3 = tmp_path / "sd3.safetensors"
    save_file({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": torch.zeros(1)}, sd3)
    flux = tmp_path / "flux.safetensors"
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(1)}, flux)
    assert loading._pipeline_class(resolve_model(str(sd))) is StableDiffusionPipeline
    assert loading._pipeline_class(resolve_model(str(xl))) is StableDiffusionXLPipeline
    assert loading._pipeline_class(resolve_model(str(sd3))) is StableDiffusion3Pipeline
    assert loading._pipeline_class(resolve_model(str(flux))) is FluxPipeline
    chroma = tmp_path / "chroma.safetensors"  # Flux's blocks, and Chroma's modulation approximator instead of Flux's
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(1),
               "distilled_guidance_layer.in_proj.weight": torch.zeros(1)}, chroma)
    assert loading._pipeline_class(resolve_model(str(chroma))) is ChromaPipeline
    # Offline, the base model's configuration is missing from the (empty) cache: a clear error, no traceback.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    _go_offline(monkeypatch)
    with pytest.raises(ModelLoadError, match="needs its base model's configuration"):
        load_pipeline(str(sd))


def test_dtype_defaults_follow_the_device(monkeypatch):
    assert parse_dtype(None, "cpu") == torch.float32
    assert parse_dtype("auto", "cuda") == torch.float16
    assert parse_dtype("bfloat16", "cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        parse_dtype("float8", "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert loading.default_device() == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert loading.default_device() == "cpu"


def test_load_editor_wraps_the_pipeline_and_hides_progress_bars_unless_asked(tiny_sd_dir, monkeypatch):
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    def bars() -> tuple[bool, bool]:
        return diffusers_logging.is_progress_bar_enabled(), transformers_logging.is_progress_bar_enabled()

    before = bars()
    during = []
    real_load = loading.load_pipeline

    def recording_load(*args, **kwargs):
        during.append(bars())
        return real_load(*args, **kwargs)

    from prompt2prompt.engine import editor as engine  # load_editor calls load_pipeline by the name it imported

    monkeypatch.setattr(engine, "load_pipeline", recording_load)
    editor, source = load_editor(str(tiny_sd_dir), dtype="float32")
    assert isinstance(editor, Editor) and editor.pipe.unet.dtype == torch.float32
    assert source == resolve_model(str(tiny_sd_dir))
    assert during == [(False, False)] and bars() == before  # quiet while loading, as it was after
    with editor.pipe.progress_bar(total=1) as bar:
        assert bar.disable  # no denoising bar either

    shown, _ = load_editor(resolve_model(str(tiny_sd_dir)), progress=True)
    assert during[1] == before  # the loading bars as the caller has them
    with shown.pipe.progress_bar(total=1) as bar:
        assert not bar.disable  # what Gradio's track_tqdm follows


def test_load_editor_checks_the_dtype_before_the_model():
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        load_editor("./no/such/folder", dtype="float8")


def test_devices_are_checked_before_anything_loads(monkeypatch):
    from prompt2prompt.loading import check_device

    assert check_device("cpu") == "cpu"
    for name, message in [("foo", "unknown device 'foo'"), ("meta", "runs on cpu, cuda, mps or xpu")]:
        with pytest.raises(ValueError, match=message):
            load_editor("./no/such/folder", device=name)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="device 'cuda' is not available: this machine .* has no cuda device"):
        load_editor("./no/such/folder", device="cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert check_device("cuda:1") == "cuda:1"
    with pytest.raises(RuntimeError, match="has 2 cuda device"):
        check_device("cuda:2")


def test_pickle_weights_load_only_when_allowed(tiny_sd_pickle_dir):
    with pytest.raises(ModelLoadError, match=r"has pickle weights \(unet/diffusion_pytorch_model.bin\) and no "
                                             r"safetensors ones; .*--allow-pickle \(allow_pickle=True\)"):
        load_pipeline(str(tiny_sd_pickle_dir))
    with pytest.raises(ModelLoadError, match="has pickle weights"):
        Editor.from_pretrained(str(tiny_sd_pickle_dir))
    assert type(load_pipeline(str(tiny_sd_pickle_dir), allow_pickle=True)) is StableDiffusionPipeline
    assert isinstance(load_editor(str(tiny_sd_pickle_dir), allow_pickle=True)[0], Editor)
    assert isinstance(Editor.from_pretrained(str(tiny_sd_pickle_dir), allow_pickle=True), Editor)


class _RunsCode:
    """Unpickling this runs code: it touches `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("content", ["not a pickle", "runs code"])
def test_opted_in_pickles_that_cannot_be_read_safely_are_one_load_error(tiny_sd_pickle_dir, tmp_path, content):
    folder = tmp_path / "model"
    shutil.copytree(tiny_sd_pickle_dir, folder)
    marker = tmp_path / "ran"
    for weights in [folder / "unet" / "diffusion_pytorch_model.bin", folder / "text_encoder" / "pytorch_model.bin"]:
        if content == "runs code":
            torch.save({"weight": _RunsCode(marker)}, weights)
        else:
            weights.write_bytes(b"\x80\x04garbage")
    (folder / "text_encoder" / "model.safetensors").unlink()  # the text encoder's pickle is read by transformers
    with pytest.raises(ModelLoadError, match="cannot load"):
        load_pipeline(str(folder), allow_pickle=True)
    assert not marker.exists()


@pytest.mark.parametrize(
    "index, message",
    [
        ("{not json", "cannot read .*model_index.json"),
        ("[1, 2]", "holds a non-diffusers model"),
        ('{"unet": ["diffusers", "UNet2DConditionModel"], "text_encoder": ["os", "system"]}',
         "takes its 'text_encoder' component from 'os'; prompt2prompt loads components from diffusers and transformers"),
        ('{"unet": ["diffusers", "UNet2DConditionModel"], "text_encoder": ["transformers", "CLIPTextModel"], '
         '"safety_checker": ["antigravity", "X"]}', "from 'antigravity'"),
    ],
)
def test_a_model_index_that_names_other_code_is_refused(tmp_path, index, message):
    (tmp_path / "model_index.json").write_text(index)
    with pytest.raises(ModelLoadError, match=message):
        load_pipeline(str(tmp_path))


def test_a_hub_id_that_cannot_be_fetched_is_one_clean_line(monkeypatch, capsys):
    from diffusers import DiffusionPipeline

    def unreachable(*args, **kwargs):
        from diffusers.utils import logging

        logging.get_logger("diffusers").warning("Couldn't connect to the Hub: no network.\nWill try the cache.")
        raise OSError("Cannot load model bogus/model: not cached. Please check out the root cause in the stacktrace "
                      "above.")

    monkeypatch.setattr(DiffusionPipeline, "download", unreachable)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(loading, "_offline", lambda: False)
    with pytest.raises(ModelLoadError) as caught:
        resolve_model("bogus/model")
    message = str(caught.value)
    assert "\n" not in message and "stacktrace" not in message and "not cached" in message
    assert "Couldn't connect" not in capsys.readouterr().err


def test_a_checkpoint_missing_weights_is_refused_in_one_line(tiny_sd_dir, tmp_path, capsys):
    folder = tmp_path / "model"
    shutil.copytree(tiny_sd_dir, folder)
    save_file({"unrelated.weight": torch.zeros(1)}, folder / "unet" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ModelLoadError, match="its weights are incomplete") as caught:
        load_pipeline(str(folder))
    assert "\n" not in str(caught.value)
    assert "Some weights" not in capsys.readouterr().err  # diffusers' own warnings are not printed on top


def test_a_model_index_whose_class_name_is_not_text_is_refused(tmp_path):
    (tmp_path / "model_index.json").write_text('{"_class_name": ["FluxPipeline"], "unet": ["diffusers", "X"]}')
    with pytest.raises(ModelLoadError, match="without its 'text_encoder'|non-diffusers"):
        load_pipeline(str(tmp_path))


def test_float16_on_the_cpu_gives_one_warning_of_ours_not_diffusers_three(tiny_sd_dir, capfd):
    with pytest.warns(UserWarning) as caught:
        pipe = load_pipeline(str(tiny_sd_dir), device="cpu", torch_dtype="float16")
    assert [str(w.message) for w in caught] == [loading.CPU_FLOAT16]
    assert pipe.unet.dtype == torch.float16
    assert "running them will fail" not in capfd.readouterr().err  # diffusers' warning, once per component before
