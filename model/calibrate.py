"""`sbir calibrate`'s driver: sample the recipe's images, build the float32 backbone graph, measure.

It sits above both model.backbones (which reads calibration files through model.quantize) and
model.quantize (which measures and writes them), so neither imports the other's way back.
"""

from __future__ import annotations

from pathlib import Path

from model.backbones import create_backbone, export_onnx
from model.data.dataset import read_manifest, resolve_path
from model.images import load_image
from model.quantize import CalibrationRecipe, calibrate, calibration_classes, sample_calibration_records


def calibrate_dataset(dataset: Path, backbone_name: str, recipe: CalibrationRecipe, out: Path) -> dict:
    """Sample the recipe's images from `dataset`, measure the activation ranges, write `out`."""
    records = read_manifest(dataset)
    chosen = sample_calibration_records(records, calibration_classes(dataset, recipe.splits), recipe)
    backbone = create_backbone(backbone_name, cpu_runtime="torch", cpu_precision="fp32")
    pixels = [backbone.preprocess(load_image(resolve_path(dataset, records[i]))).numpy() for i in chosen]
    graph = export_onnx(backbone.net, backbone.image_size, backbone.spec.mean, backbone.spec.std)
    return calibrate(graph, pixels, recipe, backbone.describe(), [records[i].path for i in chosen], out)
