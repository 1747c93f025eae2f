"""An inverted image (`Inversion`): its starting latent, its trajectory and what keeps the source on it, and its files
(`<name>.safetensors` for the tensors and `<name>.json` for the settings)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import torch

from ..families import inversion_methods
from ..files import write_atomic, write_text_atomic

_SCALARS = ("num_inference_steps", "guidance_scale", "prompt", "method", "height", "width", "max_sequence_length")
_TENSORS = ("latents", "trajectory", "uncond_embeddings", "uncond_pooled", "corrections")
_FORMAT = "prompt2prompt.inversion"
_VERSION = 1


@dataclass(eq=False)  # tensors have no truth value: compare fields yourself
class Inversion:
    """A real image inverted for editing: pass it to `Editor.edit(..., inversion=inv)`.

    N is `num_inference_steps`; step i is the i-th (descending) timestep of the edit's scheduler (DDIM on UNet
    pipelines, the pipeline's flow-matching Euler on the transformers). Latents are unpacked (packed ones' too).
    """

    latents: torch.Tensor  # x_T, the initial latent of every prompt: (1, C, h, w)
    trajectory: torch.Tensor  # pivot latents x_0 (the VAE encoding) .. x_T: (N + 1, 1, C, h, w)
    num_inference_steps: int
    guidance_scale: float
    prompt: str
    method: str
    height: int  # pixels
    width: int
    uncond_embeddings: torch.Tensor | None = None  # every prompt's unconditional embedding at step i: (N, 1, T, D)
    uncond_pooled: torch.Tensor | None = None  # SDXL's pooled counterpart: (N, 1, D2)
    corrections: torch.Tensor | None = None  # added to the source row after step i: (N, 1, C, h, w)
    max_sequence_length: int | None = None  # the T5 length of an SD3 or Flux inversion: its edits use the same

    def __post_init__(self) -> None:
        methods = inversion_methods()
        if self.method not in methods:
            raise ValueError(f"unknown inversion method {self.method!r}; use one of {', '.join(methods)}")
        length = self.max_sequence_length
        if length is not None and (isinstance(length, bool) or not isinstance(length, int) or length < 1):
            raise ValueError(f"Inversion.max_sequence_length must be a positive integer or None, got {length!r}")
        n = self.num_inference_steps
        expected = {
            "latents": (1, *self.latents.shape[1:]),
            "trajectory": (n + 1, 1, *self.latents.shape[1:]),
            "corrections": (n, 1, *self.latents.shape[1:]),
        }
        for name, shape in expected.items():
            tensor = getattr(self, name)
            if tensor is not None and tuple(tensor.shape) != shape:
                raise ValueError(f"Inversion.{name} must have shape {shape} for {n} steps, got {tuple(tensor.shape)}")
        for name, dims in (("uncond_embeddings", 4), ("uncond_pooled", 3)):
            tensor = getattr(self, name)
            if tensor is not None and (tensor.dim() != dims or tensor.shape[:2] != (n, 1)):
                raise ValueError(f"Inversion.{name} must be ({n}, 1, ...) with {dims} dims, got {tuple(tensor.shape)}")

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Inversion:
        """A copy with every tensor moved to `device` and/or cast to `dtype`."""
        moved = {name: None if (t := getattr(self, name)) is None else t.to(device=device, dtype=dtype)
                 for name in _TENSORS}
        return Inversion(**{**self._fields(), **moved})

    def save(self, path: str | PathLike) -> Path:
        """Write `<path>.safetensors` (tensors) and `<path>.json` (settings), atomically; returns the first.

        >>> inv.save("photo")  # photo.safetensors and photo.json; Inversion.load("photo") reads them  # doctest: +SKIP
        """
        from safetensors.torch import save_file

        tensors_path, sidecar_path = _paths(path)
        tensors = {name: t.detach().to("cpu").clone() for name in _TENSORS if (t := getattr(self, name)) is not None}
        sidecar = {"format": _FORMAT, "version": _VERSION, **self._fields(), "tensors": sorted(tensors)}
        tensors_path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(tensors_path, lambda tmp: save_file(tensors, tmp))
        write_text_atomic(sidecar_path, json.dumps(sidecar, indent=2) + "\n")
        return tensors_path

    @classmethod
    def load(cls, path: str | PathLike, *, device: torch.device | str = "cpu") -> Inversion:
        """Read an inversion written by `Inversion.save` (give either file, or the common stem)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        tensors_path, sidecar_path = _paths(path)
        for file in (tensors_path, sidecar_path):
            if not file.is_file():
                raise FileNotFoundError(
                    f"no saved inversion at '{path}': '{file}' is missing (an inversion is a .safetensors file "
                    "plus a .json sidecar of the same name)"
                )
        try:
            sidecar = json.loads(sidecar_path.read_text())
            tensors = load_file(tensors_path, device=str(device))
        except (json.JSONDecodeError, SafetensorError, OSError) as error:
            raise ValueError(f"cannot read the inversion at '{path}' ({error}); the files are corrupt") from error
        if not isinstance(sidecar, dict) or sidecar.get("format") != _FORMAT:
            raise ValueError(f"'{sidecar_path}' is not a prompt2prompt inversion sidecar")
        if sidecar.get("version") != _VERSION:
            raise ValueError(f"'{sidecar_path}' has inversion format version {sidecar.get('version')}; "
                             f"this prompt2prompt reads version {_VERSION}")
        if sorted(tensors) != sorted(sidecar["tensors"]):
            raise ValueError(f"'{tensors_path}' holds {sorted(tensors)} but its sidecar lists {sidecar['tensors']}")
        fields = {key: sidecar.get(key) for key in _SCALARS}  # files from before max_sequence_length lack it: None
        return cls(**fields, **tensors)

    def _fields(self) -> dict:
        return {name: getattr(self, name) for name in _SCALARS}


def _paths(path: str | PathLike) -> tuple[Path, Path]:
    path = Path(path)
    stem = path.with_suffix("") if path.suffix in (".safetensors", ".json") else path
    return stem.parent / f"{stem.name}.safetensors", stem.parent / f"{stem.name}.json"
