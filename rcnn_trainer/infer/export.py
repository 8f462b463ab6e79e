"""rcnn-export: a checkpoint as one ONNX or TorchScript file that needs neither this package
nor its config to run.

The exported model is our trained model inside torchvision's GeneralizedRCNN
(model/as_torchvision.py): the same weights (the EMA when the config has solver.ema on), with
the resize (data.min_size / max_size) and the normalization inside. Input: one float32 image
[1, 3, H, W], RGB in [0, 1], any H and W. Outputs: `boxes` [D, 4] xyxy in input pixels,
`scores` [D], `labels` [D] (the model's class index, 1..C), and `masks` [D, 1, H, W]
probabilities with the mask head on. Beside the file, FILE.labels.json maps each class index
to its category id and name. After writing, the file is loaded back (torch.jit.load, or
onnxruntime when installed) and run on one validation image against the eager model.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch
from torch import nn

from rcnn_trainer.atomic_io import atomic_write, atomic_write_text
from rcnn_trainer.run_folder import refuse_existing_file
from rcnn_trainer.config import Config
from rcnn_trainer.data.loader import build_dataset
from rcnn_trainer.runtime.checkpoint import load_checkpoint
from rcnn_trainer.data.settings import resolve_from_checkpoint
from rcnn_trainer.infer.predict import class_mapping
from rcnn_trainer.infer.run_eval import inference_model
from rcnn_trainer.errors import UserError, WriteFailed
from rcnn_trainer.model.as_torchvision import torchvision_detector

FORMATS = ("onnx", "torchscript")
ONNX_OPSET = 17


class ExportedBoxes(nn.Module):
    def __init__(self, detector: nn.Module):
        super().__init__()
        self.detector = detector

    def detections(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.detector([image[0]])
        if torch.jit.is_scripting():  # torchvision returns (losses, detections) when scripted
            return out[1][0]
        return out[0]

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        det = self.detections(image)
        return det["boxes"], det["scores"], det["labels"]


class ExportedMasks(ExportedBoxes):
    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        det = self.detections(image)
        return det["boxes"], det["scores"], det["labels"], det["masks"]


def export_model(cfg: Config, checkpoint: Path, fmt: str, output: Path, say=print, overwrite: bool = False) -> dict:
    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, got '{fmt}'.")
    for path in (output, output.with_name(output.name + ".labels.json")):
        refuse_existing_file(path, overwrite)
    try:  # before any work: a folder that cannot be made fails now, not after the export
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot write --output '{output}': {err.strerror or err}") from None
    ckpt = load_checkpoint(checkpoint)
    cfg = resolve_from_checkpoint(cfg, ckpt.get("config", {}))
    ours = inference_model(cfg, ckpt, checkpoint, torch.device("cpu"), say=say)
    wrapper = (ExportedMasks if cfg.model.mask.enabled else ExportedBoxes)(torchvision_detector(ours, cfg)).eval()
    names = ["boxes", "scores", "labels"] + (["masks"] if cfg.model.mask.enabled else [])
    sample = sample_image(cfg, say)
    payload = onnx_bytes(wrapper, sample, names) if fmt == "onnx" else torchscript_bytes(wrapper)
    try:
        atomic_write(output, lambda f: f.write(payload))
    except OSError as err:
        raise WriteFailed(f"could not write '{output}': {err.strerror or err}") from None
    to_cat, class_names = class_mapping(ckpt, cfg.model.num_classes)
    labels_file = output.with_name(output.name + ".labels.json")
    atomic_write_text(labels_file, json.dumps({
        "labels": {str(i): {"category_id": to_cat[i], "name": class_names[i - 1]} for i in sorted(to_cat)},
        "input": "image: float32 [1, 3, H, W], RGB in [0, 1]", "outputs": names,
        "min_size": cfg.data.test_min_size, "max_size": cfg.data.max_size, "checkpoint": str(checkpoint)},
        indent=1))
    check = compare_with_eager(wrapper, output, fmt, sample, names)
    say(f"[export] {fmt} model: {output} ({len(payload) / 2**20:.1f} MB); class map: {labels_file}")
    say(f"[export] {check['message']}")
    return {"output": str(output), "labels": str(labels_file), **check}


def sample_image(cfg: Config, say=print) -> torch.Tensor:
    """The first validation image at its own size (the exported model resizes it); a seeded
    random image when the config's val split cannot be read here (exporting on another machine)."""
    from PIL import Image
    import torchvision.transforms.functional as TF

    from rcnn_trainer.data.pixels import to_rgb

    try:
        record = build_dataset(cfg, "val").records[0]
        with Image.open(record.path) as img:
            return TF.pil_to_tensor(to_rgb(img)).float().div_(255.0)[None]
    except (UserError, OSError) as err:
        say(f"[export] no validation image to trace and check with ({str(err).splitlines()[0][:160]}); "
            f"using a random {cfg.data.test_min_size} px image instead")
        side = cfg.data.test_min_size
        return torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(0))


def torchscript_bytes(wrapper: nn.Module) -> bytes:
    try:
        scripted = torch.jit.script(wrapper)
    except Exception as err:  # noqa: BLE001  (the compiler's message names the unsupported part)
        raise UserError(f"the model could not be compiled to TorchScript: {str(err).strip().splitlines()[0][:300]}") from None
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    return buffer.getvalue()


def onnx_bytes(wrapper: nn.Module, sample: torch.Tensor, names: list[str]) -> bytes:
    try:
        import onnx  # noqa: F401  (the exporter needs it)
    except ImportError:
        raise UserError("ONNX export needs the onnx package: pip install 'rcnn_trainer[export]' "
                        "(onnx and onnxruntime).") from None
    buffer = io.BytesIO()
    dynamic = {"image": {2: "height", 3: "width"}, **{n: {0: "detections"} for n in names}}
    try:
        # the TorchScript-based exporter: torchvision's detection models trace through it
        # (their RoIAlign and NMS become ONNX ops); input sizes stay free
        torch.onnx.export(wrapper, (sample,), buffer, dynamo=False, opset_version=ONNX_OPSET,
                          input_names=["image"], output_names=names, dynamic_axes=dynamic)
    except Exception as err:  # noqa: BLE001
        raise UserError(f"the model could not be exported to ONNX: {str(err).strip().splitlines()[0][:300]}") from None
    return buffer.getvalue()


def run_exported(path: Path, fmt: str, image: torch.Tensor) -> list[torch.Tensor] | None:
    """The exported file's outputs on `image`; None when onnxruntime is not installed."""
    if fmt == "torchscript":
        return list(torch.jit.load(str(path))(image))
    try:
        import onnxruntime
    except ImportError:
        return None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [torch.from_numpy(o) for o in session.run(None, {"image": image.numpy()})]


@torch.no_grad()
def compare_with_eager(wrapper: nn.Module, path: Path, fmt: str, image: torch.Tensor, names: list[str]) -> dict:
    exported = run_exported(path, fmt, image)
    if exported is None:
        return {"checked": False, "message": "not checked: onnxruntime is not installed (pip install onnxruntime)"}
    eager = list(wrapper(image))
    same_count = exported[0].shape == eager[0].shape
    box_diff = float((exported[0] - eager[0]).abs().max()) if same_count and len(eager[0]) else 0.0
    same_labels = same_count and torch.equal(exported[2].long(), eager[2].long())
    ok = same_count and same_labels and box_diff < 1.0
    return {"checked": True, "matches": ok, "detections": len(eager[0]), "max_box_diff_px": box_diff,
            "message": (f"checked on one validation image {tuple(image.shape[-2:])} against the eager model: {len(exported[0])} detections "
                        f"(eager {len(eager[0])}), labels {'equal' if same_labels else 'DIFFER'}, largest box "
                        f"difference {box_diff:.3g} px" + ("" if ok else " - the exported model does NOT match"))}
