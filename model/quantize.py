"""int8 CPU inference of a backbone: onnxruntime's static quantization (QDQ) from recorded ranges.

`calibrate` measures the activation ranges of a backbone's exported graph on a seeded sample of a
dataset's training images (sketches and photos) and writes them, with the recipe that produced them,
to a calibration file that the backbone registry names. `quantize` turns the exported float32 graph
into the int8 one from that file: no images are needed at load time and nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from model.ground.files import sha256_file, write_bytes_atomic, write_text_atomic

LOG = logging.getLogger(__name__)

CALIBRATION_DIR = Path(__file__).parent / "calibration"
CALIBRATION_FORMAT = "sbir-int8-calibration/1"
# What SBIR_CPU_PRECISION / --cpu-precision accept; "auto" resolves to one of the other two.
CPU_PRECISIONS = ("auto", "fp32", "int8")
# Convolutions with their ReLU6 (Clip) and the residual Adds run in int8; the first normalisation
# (Sub, Mul), the average pools (ReduceMean) and the concatenation of the pooled features stay in
# float32, so the features themselves are not rounded to 256 levels. With only Conv quantized, each
# convolution's output was quantized over its pre-ReLU6 range: mean cosine to fp32 0.963 and slower
# (docs/BENCHMARKS.md, int8).
QUANTIZED_OPS = ("Conv", "Clip", "Add")
# Nodes kept in float32 (mixed precision): the stem convolution and blocks 0 and 1 with their ReLU6s,
# the first layers, at 130x130 (block 1's output: 65x65). Rounded to 8 bits there, the thin strokes
# of a drawing lost most of what int8 loses: on 312 images of every drawing style and photo set
# (classes split 0 does not train on), the features' mean relative error to float32 fell from 0.073
# (everything in int8) to 0.050 with these in float32, and from 0.081 to 0.041-0.043 for Lucide's
# and Tabler's thin-line icons, while keeping any later group of blocks in float32 instead gave
# 0.069-0.071; 67 of the 858 million multiply-adds (docs/BENCHMARKS.md, "int8: what loses most").
# `calibrate` writes the list into the calibration file and `quantize` keeps what the file says.
FLOAT_NODES = (
    "/net/_conv_stem/Conv", "/net/_swish/Clip",
    "/net/_blocks.0/_depthwise_conv/Conv", "/net/_blocks.0/_swish/Clip", "/net/_blocks.0/_project_conv/Conv",
    "/net/_blocks.1/_expand_conv/Conv", "/net/_blocks.1/_swish/Clip", "/net/_blocks.1/_depthwise_conv/Conv",
    "/net/_blocks.1/_swish_1/Clip", "/net/_blocks.1/_project_conv/Conv",
)
# CPU flags of an 8-bit dot-product instruction that onnxruntime's int8 kernels use.
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "avx512vnni", "asimddp")


@dataclass(frozen=True)
class CalibrationRecipe:
    """How a calibration file's ranges were measured: enough to measure them again."""

    dataset: str  # the dataset directory's name, e.g. "emoji"
    manifest_sha256: str
    splits: tuple[str, ...]  # only classes that all of these splits train on are sampled
    seed: int
    per_domain: int  # images per domain (sketch, photo), as they are (no augmented renders)
    method: str = "MinMax"  # onnxruntime CalibrationMethod name

    def to_dict(self) -> dict:
        return asdict(self) | {"splits": list(self.splits)}


def cpu_has_int8_dot() -> bool:
    """True when the CPU has VNNI / AVX-512 VNNI (x86) or the dot-product extension (Arm)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
    return any(f in flags for f in VNNI_FLAGS)


# What nothing asked for means. Not "auto" (int8 on a VNNI CPU): over three split seeds of the emoji
# benchmark and its held-out styles, int8 moved the served ranking by more than the tolerances of
# issue 19 on the mean over seeds (with the first layers in float32: Streamline's instance mAP by
# -0.0097, and P@1 on three tasks of 32-165 queries; docs/BENCHMARKS.md, "int8 accuracy, three
# seeds, mixed precision"), so int8 is asked for, not assumed.
DEFAULT_PRECISION = "fp32"


def requested_precision(precision: str | None) -> str:
    """The precision asked for: the argument, else $SBIR_CPU_PRECISION, else DEFAULT_PRECISION; validated."""
    precision = precision or os.environ.get("SBIR_CPU_PRECISION") or DEFAULT_PRECISION
    if precision not in CPU_PRECISIONS:
        raise ValueError(f"unknown CPU precision {precision!r}; choose one of {', '.join(CPU_PRECISIONS)}")
    return precision


def calibration_file(name: str | None) -> Path | None:
    return CALIBRATION_DIR / name if name else None


def calibration_record(name: str) -> dict:
    """What identifies calibration file `name` (in CALIBRATION_DIR): {"file", "sha256"}. int8 features of
    two calibrations are not comparable, so feature caches, index snapshots and the service record and
    compare it (docs/MODEL.md, int8)."""
    return {"file": name, "sha256": sha256_file(CALIBRATION_DIR / name)}


def read_calibration(path: Path) -> dict:
    data = json.loads(Path(path).read_text())
    if data.get("format") != CALIBRATION_FORMAT:
        raise ValueError(f"{path} is not an int8 calibration file ({CALIBRATION_FORMAT})")
    return data


def _quantize_kwargs(float_nodes: Sequence[str] = ()) -> dict:
    from onnxruntime.quantization import QuantFormat, QuantType

    # QUInt8 activations and QInt8 weights, not range-reduced: onnxruntime's advice for VNNI CPUs.
    return dict(quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=False,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                op_types_to_quantize=list(QUANTIZED_OPS), nodes_to_exclude=list(float_nodes))


def _preprocess(fp32_onnx: bytes, tmp: Path) -> Path:
    """onnxruntime's recommended pre-pass: shape inference and constant folding (the export's
    'same' padding arithmetic becomes plain Pad/Conv), so the quantizer sees Conv-Clip-Add chains."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src, dst = tmp / "fp32.onnx", tmp / "pre.onnx"
    src.write_bytes(fp32_onnx)
    quant_pre_process(str(src), str(dst))
    return dst


def _cache_dir() -> Path:
    base = os.environ.get("SBIR_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "sbir"
    )
    return Path(base) / "int8"


def quantize(fp32_onnx: bytes, calibration: Path) -> bytes:
    """The int8 (QDQ) graph of an exported float32 graph, from a calibration file's ranges.

    Quantizing takes about 10 s on two cores, so the result is kept in a local cache file
    ($SBIR_CACHE_DIR, default ~/.cache/sbir, `int8/`) named by the sha256 of everything it depends
    on (the float32 graph, the ranges, the options, onnxruntime's version); an unwritable cache only
    costs the time.
    """
    import onnxruntime as ort
    from onnxruntime.quantization import quantize_static

    data = read_calibration(calibration)
    options = _quantize_kwargs(data.get("float_nodes", ()))
    key = hashlib.sha256()
    for part in (fp32_onnx, json.dumps(data["ranges"], sort_keys=True).encode(),
                 repr(sorted(options.items())).encode(), ort.__version__.encode()):
        key.update(hashlib.sha256(part).digest())
    cached = _cache_dir() / f"{key.hexdigest()}.onnx"
    if cached.is_file():  # written atomically: complete or absent
        LOG.info("int8 graph from the cache %s", cached)
        return cached.read_bytes()
    with tempfile.TemporaryDirectory(prefix="sbir-int8-") as tmp_name:
        tmp = Path(tmp_name)
        pre = _preprocess(fp32_onnx, tmp)
        _check_ranges(pre, data["ranges"], calibration, options["nodes_to_exclude"])
        ranges = tmp / "ranges.json"
        ranges.write_text(json.dumps(data["ranges"]))
        out = tmp / "int8.onnx"
        with _quiet():
            quantize_static(str(pre), str(out), None, calibrate_method=_method(data["recipe"]["method"]),
                            calibration_cache_path=str(ranges), **options)
        blob = out.read_bytes()
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(cached, blob)
    except OSError as exc:
        LOG.info("int8 graph not cached (%s): it is quantized again on the next load", exc)
    return blob


class _QuietQuantizer(logging.Filter):
    """onnxruntime's quantizer logs a line per adjusted weight scale on the root logger: drop them."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "onnxruntime" not in record.pathname or record.levelno >= logging.ERROR


@contextlib.contextmanager
def _quiet():
    quiet = _QuietQuantizer()
    logging.getLogger().addFilter(quiet)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(quiet)


def _method(name: str):
    from onnxruntime.quantization import CalibrationMethod

    try:
        return CalibrationMethod[name]
    except KeyError:
        raise ValueError(f"unknown calibration method {name!r}") from None


def _check_ranges(graph: Path, ranges: dict, calibration: Path, float_nodes: Sequence[str] = ()) -> None:
    """Every tensor the quantizer needs a range for has one, and every node to keep in float32 is
    there: else the export changed (another torch?)."""
    import onnx

    model = onnx.load(str(graph))
    absent = sorted(set(float_nodes) - {n.name for n in model.graph.node})
    if absent:
        raise RuntimeError(
            f"{calibration.name} keeps {len(absent)} nodes in float32 that this graph lacks (e.g. {absent[0]}): "
            "it was calibrated on another export; run `sbir calibrate` again"
        )
    constants = {t.name for t in model.graph.initializer}
    needed = {t for n in model.graph.node if n.op_type in QUANTIZED_OPS for t in [*n.input, *n.output]}
    needed -= constants | {""}
    missing = sorted(needed - set(ranges["data"]))
    if missing:
        raise RuntimeError(
            f"{calibration.name} has no range for {len(missing)} tensors of this graph (e.g. {missing[0]}): "
            "it was calibrated on another export; run `sbir calibrate` again"
        )


def sample_calibration_records(records: Sequence, train_classes: Iterable[str], recipe: CalibrationRecipe) -> list[int]:
    """Indices of `per_domain` sketches and as many photos of the training classes, drawn with `seed`;
    never a record of a held-out drawing style (`heldout`), whatever its class."""
    train = set(train_classes)
    rng = random.Random(recipe.seed)
    chosen: list[int] = []
    for domain in ("sketch", "photo"):
        pool = [i for i, r in enumerate(records)
                if r.domain == domain and r.category in train and not getattr(r, "heldout", False)]
        if len(pool) < recipe.per_domain:
            raise ValueError(f"only {len(pool)} {domain}es of training classes, {recipe.per_domain} wanted")
        chosen += sorted(rng.sample(pool, recipe.per_domain))
    return chosen


def calibration_classes(dataset: Path, splits: Sequence[str]) -> list[str]:
    """The classes that every split trains on: none of them is a class one of the splits evaluates on."""
    from model.data.dataset import load_split

    train = set.intersection(*(set(load_split(dataset, name).train) for name in splits))
    if not train:
        raise ValueError(f"splits {', '.join(splits)} have no training class in common")
    return sorted(train)


def calibrate(fp32_onnx: bytes, pixels: Sequence[np.ndarray], recipe: CalibrationRecipe, backbone: dict,
              paths: Sequence[str], out: Path, float_nodes: Sequence[str] = FLOAT_NODES) -> dict:
    """Measure activation ranges of the graph on `pixels` (uint8 (3,S,S) each) and write the file,
    with the nodes that the int8 graph keeps in float32 (`float_nodes`)."""
    from onnxruntime.quantization import CalibrationDataReader, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter(pixels)

        def get_next(self):
            item = next(self.items, None)
            return None if item is None else {"pixels": item[None].astype(np.float32)}

    with tempfile.TemporaryDirectory(prefix="sbir-calibrate-") as tmp_name:
        tmp = Path(tmp_name)
        pre = _preprocess(fp32_onnx, tmp)
        cache = tmp / "ranges.json"
        with _quiet():
            quantize_static(str(pre), str(tmp / "int8.onnx"), Reader(), calibrate_method=_method(recipe.method),
                            calibration_cache_path=str(cache), **_quantize_kwargs(float_nodes))
        ranges = json.loads(cache.read_text())
    data = {
        "format": CALIBRATION_FORMAT,
        "backbone": backbone,
        "recipe": recipe.to_dict(),
        "images": list(paths),
        "quantized_ops": list(QUANTIZED_OPS),
        "float_nodes": list(float_nodes),
        "ranges": ranges,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, json.dumps(data, indent=1, sort_keys=True) + "\n")
    return data
