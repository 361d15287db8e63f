"""The whole encoder as one object: image -> backbone -> adapter -> IIAE's rx / ry -> zs.

`SBIRModel` is what the index builder and the service load. With a served second stage
(`config["rerank"]`, model.rerank) a row is `[zs | v | r]`: IIAE's zs, which the index searches, then
what re-ranks IIAE's top candidates: the InfoNCE peer's vector (whose weights the checkpoint then
holds) and the backbone's features standardised by the adapter's statistics; each part is a unit vector. A checkpoint is a directory with
`model.safetensors` (adapter and IIAE weights) and `config.json` (backbone name and weights sha256,
every dimension and hyperparameter, the split and a hash of the training data). The backbone's own
weights are not copied: they are found by name and verified by sha256 on load.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors

from model.adapter import AdapterConfig, FeatureAdapter
from model.backbones import Backbone, create_backbone
from model.ground.checkpoint import CONFIG_FILE, WEIGHTS_FILE, checkpoint_sha256
from model.ground.errors import UserError
from model.ground.files import write_bytes_atomic, write_text_atomic
from model.iiae import IIAE, IIAEConfig
from model.images import load_image
from model.peer import InfoNCEPeer
from model.quantize import requested_precision
from model.rerank import RerankConfig, unit_parts
from model.stroke_norm import VERSION as STROKE_NORM_VERSION
from model.stroke_norm import normalise_strokes
from model.tuned_tensors import PREFIX, tensors_sha256

LOG = logging.getLogger(__name__)

FORMAT = "sbir-model/1"
EMBEDDINGS = ("iiae", "adapter")


def gpu_batch(n: int) -> int:
    """The batch size a forward of `n` images runs at on a GPU: the next power of two.

    cuDNN builds its execution plans per input shape, and on an H200 the first forward of each new
    batch size took 1-2 s (benchmarks/gpu_check.py, docs/BENCHMARKS.md): a service whose batches come
    in every size from 1 to max_batch stalled on each. Padding to a few sizes, each warmed at load
    (`SBIRModel.warm_up`), bounds that to load time; the padded rows are zeros and are dropped.
    """
    return 1 << max(0, int(n) - 1).bit_length()


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def stack_cpu(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """`torch.stack` of CPU tensors through numpy: torch's copy would wake an OpenMP team from the
    calling thread (a decoding or batcher thread of the service), which with the service's passive wait
    policy costs more CPU than the copy itself (docs/BENCHMARKS.md, "Stacking without an OpenMP team")."""
    if any(t.device.type != "cpu" for t in tensors):
        return torch.stack(list(tensors))
    return torch.from_numpy(np.stack([t.numpy() for t in tensors]))


class SBIRModel:
    """Frozen backbone + adapter + IIAE. All encode_* methods return float32 (n, dim) rows: unit
    vectors of `search_dim`, or `[zs | v | r]` (unit parts) where the model re-ranks (`rerank`)."""

    _single_view = False  # `single_view()`: sketches as drawn only, whatever the checkpoint says

    def __init__(
        self,
        backbone: Backbone | None,
        adapter: FeatureAdapter,
        iiae: IIAE,
        config: dict,
        device: str | torch.device | None = "cpu",
        peer: InfoNCEPeer | None = None,
        more_members: Sequence[tuple[FeatureAdapter, IIAE, InfoNCEPeer | None]] = (),
    ):
        self.device = resolve_device(device)
        self._device_lock = threading.Lock()
        self._device_thread: ThreadPoolExecutor | None = None  # GPU forwards run on it (_on_device_thread)
        self._device_ident: int | None = None
        self.backbone = backbone.to(self.device) if backbone is not None else None
        self.adapter = adapter.to(self.device).eval()
        self.iiae = iiae.to(self.device).eval()
        self.config = config
        # fine-tuned backbone tensors (model.tuned_tensors.PREFIX-named), saved beside adapter and IIAE
        self.backbone_tensors: dict[str, torch.Tensor] = {}
        self.embedding = config.get("embedding", "iiae")
        assert self.embedding in EMBEDDINGS, f"unknown embedding {self.embedding!r}"
        # the served second stage (model.rerank): only over IIAE's zs
        self.rerank = RerankConfig.from_dict(config.get("rerank")) if self.embedding == "iiae" else None
        self.peer = peer.to(self.device).eval() if peer is not None else None
        # Members trained with other seeds (`TrainConfig.members`): each part of a row is their parts joined,
        # each a unit vector over sqrt(members), so a dot product is the mean of the members' cosines.
        self.more_members = [(a.to(self.device).eval(), i.to(self.device).eval(),
                              p.to(self.device).eval() if p is not None else None) for a, i, p in more_members]
        for a, i, p in self.more_members:
            if a.cfg != adapter.cfg or i.cfg != iiae.cfg or (p is None) != (peer is None):
                raise ValueError("every member must have the first member's adapter, IIAE and peer shapes")
        if self.rerank is not None:
            if self.rerank.vector == "infonce" and self.peer is None:
                raise ValueError("re-ranking with the InfoNCE peer needs the peer's weights")
            made = (self.peer.out_dim if self.rerank.vector == "infonce" else self.adapter.cfg.output_dim) * self.n_members
            if self.rerank.dim != made:
                raise ValueError(f"re-ranking with {self.rerank.dim}-d vectors, the {self.rerank.vector} makes {made}-d")
            if self.rerank.raw_dim not in (0, self.adapter.cfg.input_dim):
                raise ValueError(f"re-ranking with {self.rerank.raw_dim}-d backbone features, the backbone makes "
                                 f"{self.adapter.cfg.input_dim}-d")
        self.sha256: str | None = None

    @property
    def members(self) -> list[tuple[FeatureAdapter, IIAE, InfoNCEPeer | None]]:
        """(adapter, IIAE, peer) of each member, the first (`adapter`, `iiae`, `peer`) first."""
        return [(self.adapter, self.iiae, self.peer), *self.more_members]

    @property
    def n_members(self) -> int:
        return 1 + len(self.more_members)

    @property
    def search_dim(self) -> int:
        """Width of what the index searches: zs (or the adapter's output where that is served), every
        member's joined."""
        one = self.iiae.cfg.latent_dim if self.embedding == "iiae" else self.adapter.cfg.output_dim
        return one * self.n_members

    @property
    def dim(self) -> int:
        """Width of an encoded row: `search_dim`, plus the re-ranking part where there is one."""
        return self.search_dim + (self.rerank.width if self.rerank is not None else 0)

    # --- encoding -------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_features(self, feats: torch.Tensor | np.ndarray, domain: str) -> np.ndarray:
        """Backbone features (n, D) of one domain -> unit embeddings (n, dim)."""
        x = torch.as_tensor(np.asarray(feats) if not torch.is_tensor(feats) else feats)
        x = x.to(self.device, torch.float32)
        zs, vs = [], []
        for adapter, iiae, peer in self.members:
            a = adapter(x, domain)
            if self.embedding == "adapter":
                zs.append(F.normalize(a, dim=-1))
            else:
                zs.append(iiae.encode_sketches(a) if domain == "sketch" else iiae.encode_photos(a))
            if self.rerank is not None:
                vs.append(peer.encode(a, domain) if self.rerank.vector == "infonce" else F.normalize(a, dim=-1))
        z = join_members(zs)
        if self.rerank is not None:
            parts = [z, join_members(vs)]
            if self.rerank.raw_dim:  # the backbone's features, standardised as the adapter's input is
                parts.append(F.normalize(self.adapter.standardise(x, domain), dim=-1))
            z = torch.cat(parts, dim=-1)
        return z.float().cpu().numpy()

    def _autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    @torch.no_grad()
    def backbone_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (B,3,S,S) from `preprocess` -> backbone features (B, D) float32 on self.device."""
        assert self.backbone is not None, "this model was loaded without its backbone"
        pixels = pixels.to(self.device, non_blocking=True)
        with self._autocast():
            return self.backbone(pixels).float()

    @property
    def pad_batches(self) -> bool:
        """Whether forwards run at `gpu_batch` sizes (on a GPU; a CPU has no per-shape set-up)."""
        return self.device.type == "cuda"

    def warm_up(self, max_batch: int = 1) -> float:
        """One forward of every batch size that batches of up to `max_batch` sketches run at (on a GPU
        each `gpu_batch` size, on a CPU one image); returns the seconds it took."""
        assert self.backbone is not None, "this model was loaded without its backbone"
        one = self.preprocess(Image.new("RGB", (64, 64), "white"))
        views = self.sketch_views
        sizes = (sorted({gpu_batch(n * views) for n in range(1, max(1, max_batch) + 1)}) if self.pad_batches
                 else [views])
        start = time.perf_counter()
        for size in sizes:
            self.encode_pixels(one.expand(size, *one.shape).contiguous(), "sketch")
        seconds = time.perf_counter() - start
        LOG.info("warmed up batch sizes %s on %s in %.1f s", sizes, self.device, seconds)
        return seconds

    def encode_pixels(self, pixels: torch.Tensor, domain: str) -> np.ndarray:
        """uint8 (B,3,S,S) -> rows (B, dim); or (B,V,3,S,S), V views of each query from
        `preprocess_sketch`, -> (B, dim): the V views run as one batch and `merge_views` joins them."""
        if pixels.ndim == 5:
            n, views = pixels.shape[:2]
            rows = self.encode_pixels(pixels.reshape(n * views, *pixels.shape[2:]), domain)
            return self.merge_views(rows.reshape(n, views, -1))
        if not self.pad_batches:
            return self.encode_features(self.backbone_features(pixels), domain)
        return self._on_device_thread(self._encode_padded, pixels, domain)

    @property
    def twin_weight(self) -> float:
        """The normalised view's weight against the drawn view's 1 when `merge_views` joins them
        (checkpoints of the first twin models, without the record: 1)."""
        return float(self.config.get("sketch_preprocessing", {}).get("query_twin_weight", 1.0))

    def merge_views(self, rows: np.ndarray) -> np.ndarray:
        """(n, V, dim) rows of V views of each query (drawn, then normalised) -> (n, dim): each part of
        the row (zs, and v and r where the model re-ranks) the direction of the weighted sum of the
        views' unit vectors, the drawn view's weight 1, the normalised view's `twin_weight`."""
        rows = np.asarray(rows, np.float32)
        weights = np.array([1.0] + [self.twin_weight] * (rows.shape[1] - 1), np.float32)
        summed = np.einsum("nvd,v->nd", rows, weights)
        parts = unit_parts(summed, self.search_dim, self.rerank if self.embedding == "iiae" else None)
        out = []
        for i, p in enumerate(parts):
            # zs and v: each member's block its own direction (the members' raw r is one part)
            k = self.n_members if i < 2 else 1
            blocks = p.reshape(len(p), k, -1)
            blocks = blocks / np.maximum(np.linalg.norm(blocks, axis=2, keepdims=True), 1e-12)
            out.append(blocks.reshape(len(p), -1) / np.float32(np.sqrt(k)) if k > 1 else blocks.reshape(len(p), -1))
        return np.ascontiguousarray(np.concatenate(out, axis=1), dtype=np.float32)

    def _encode_padded(self, pixels: torch.Tensor, domain: str) -> np.ndarray:
        n = pixels.shape[0]
        if (padded := gpu_batch(n)) != n:  # the backbone and the heads at one of a few shapes
            pixels = torch.cat([pixels, pixels.new_zeros((padded - n, *pixels.shape[1:]))])
        return self.encode_features(self.backbone_features(pixels), domain)[:n]

    def _on_device_thread(self, fn, *args):
        """Run `fn` on this model's one GPU thread. PyTorch keeps cuDNN's execution plans per thread
        (a thread-local cache), so plans built by `warm_up` on one thread are rebuilt, 1-2 s per batch
        size, by every other thread that runs a forward: a service's batcher threads stalled on their
        first batches although the model was warm (docs/BENCHMARKS.md). One thread keeps them warm."""
        if threading.get_ident() == self._device_ident:
            return fn(*args)
        with self._device_lock:
            if self._device_thread is None:
                self._device_thread = ThreadPoolExecutor(1, thread_name_prefix="sbir-gpu",
                                                         initializer=self._remember_device_thread)
            pool = self._device_thread
        return pool.submit(fn, *args).result()

    def _remember_device_thread(self) -> None:
        self._device_ident = threading.get_ident()

    def preprocess(self, img: Image.Image) -> torch.Tensor:
        assert self.backbone is not None, "this model was loaded without its backbone"
        return self.backbone.preprocess(img)

    @property
    def stroke_norm(self) -> bool:
        """Whether sketches pass through model.stroke_norm first (as they did in training)."""
        return bool(self.config.get("sketch_preprocessing", {}).get("stroke_norm", False))

    @property
    def query_twin(self) -> bool:
        """Whether a query is encoded twice, as drawn and stroke-normalised (training read both kinds
        of sketch rows), the two joined by `merge_views` (docs/MODEL.md, "The query's twin")."""
        return (bool(self.config.get("sketch_preprocessing", {}).get("query_twin", False)) and not self.stroke_norm
                and not self._single_view)

    def single_view(self) -> None:
        """Encode sketches as drawn only from now on, whatever the checkpoint says (a service's choice:
        one image a query instead of two; the index, photos only, is the same either way)."""
        self._single_view = True

    @property
    def sketch_views(self) -> int:
        """How many images one query sketch becomes (`preprocess_sketch`'s first dimension when > 1)."""
        return 2 if self.query_twin else 1

    def preprocess_sketch(self, img: Image.Image) -> torch.Tensor:
        """A sketch's input: exactly the preprocessing its training rows had. (3,S,S), or with the
        query's twin (2,3,S,S): the sketch as drawn, then stroke-normalised."""
        if self.query_twin:
            return stack_cpu([self.preprocess(img), self.preprocess(normalise_strokes(img))])
        return self.preprocess(normalise_strokes(img) if self.stroke_norm else img)

    def encode_images(self, images: Sequence[Image.Image], domain: str, batch_size: int = 32) -> np.ndarray:
        prep = self.preprocess_sketch if domain == "sketch" else self.preprocess
        out = []
        for i in range(0, len(images), batch_size):
            batch = torch.stack([prep(im) for im in images[i : i + batch_size]])
            out.append(self.encode_pixels(batch, domain))
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    def encode_sketches(self, images: Sequence[Image.Image], batch_size: int = 32) -> np.ndarray:
        return self.encode_images(images, "sketch", batch_size)

    def encode_photos(self, images: Sequence[Image.Image], batch_size: int = 32) -> np.ndarray:
        return self.encode_images(images, "photo", batch_size)

    # --- persistence ----------------------------------------------------------------------------
    def save(self, ckpt_dir: str | Path) -> str:
        """Write weights, then config, each atomically and durably (model.ground.files); return the
        checkpoint sha256. A crash between the two leaves new weights beside the old config: the pair's
        sha256 then matches no snapshot, so nothing serves it (a snapshot pins both files)."""
        ckpt_dir = Path(ckpt_dir)
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        tensors = {f"adapter.{k}": v.detach().cpu().contiguous() for k, v in self.adapter.state_dict().items()}
        tensors.update({f"iiae.{k}": v.detach().cpu().contiguous() for k, v in self.iiae.state_dict().items()})
        if self.peer is not None:
            tensors.update({f"peer.{k}": v.detach().cpu().contiguous() for k, v in self.peer.state_dict().items()})
        for m, (adapter, iiae, peer) in enumerate(self.more_members, start=1):
            parts = [("adapter", adapter), ("iiae", iiae)] + ([("peer", peer)] if peer is not None else [])
            tensors.update({f"member{m}.{name}.{k}": v.detach().cpu().contiguous()
                            for name, module in parts for k, v in module.state_dict().items()})
        tensors.update(self.backbone_tensors)
        config = dict(self.config)
        config["format"] = FORMAT
        config["adapter"] = self.adapter.cfg.to_dict()
        config["iiae"] = self.iiae.cfg.to_dict()
        config["embedding"] = self.embedding
        config["dim"] = self.dim
        config["search_dim"] = self.search_dim
        config["members"] = self.n_members
        config["rerank"] = self.rerank.to_dict() if self.rerank is not None else None
        if self.backbone is not None:
            config["backbone"] = self.backbone.describe()
        write_bytes_atomic(ckpt_dir / WEIGHTS_FILE, save_safetensors(tensors))
        write_text_atomic(ckpt_dir / CONFIG_FILE, json.dumps(config, indent=2, sort_keys=True) + "\n")
        self.config = config
        self.sha256 = checkpoint_sha256(ckpt_dir)
        return self.sha256

    @classmethod
    def load(
        cls,
        ckpt_dir: str | Path,
        device: str | torch.device | None = "auto",
        with_backbone: bool = True,
        backbone_weights: str | Path | None = None,
        cpu_runtime: str | None = None,
        cpu_threads: int | None = None,
        cpu_precision: str | None = None,
    ) -> SBIRModel:
        """Load a checkpoint. The backbone is rebuilt by name and its weights' sha256 must match.

        `cpu_precision`: fp32, int8 or auto (model.backbones.cpu_precision_for); the loaded backbone's
        `precision` says which one runs.
        """
        ckpt_dir = Path(ckpt_dir)
        cfg_path, w_path = ckpt_dir / CONFIG_FILE, ckpt_dir / WEIGHTS_FILE
        if not cfg_path.is_file() or not w_path.is_file():
            raise UserError(f"{ckpt_dir} is not a model checkpoint (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
        config = json.loads(cfg_path.read_text())
        if config.get("format") != FORMAT:
            raise UserError(f"{ckpt_dir}: unsupported checkpoint format {config.get('format')!r}")
        sketch_prep = config.get("sketch_preprocessing", {})
        if ((sketch_prep.get("stroke_norm") or sketch_prep.get("query_twin"))
                and sketch_prep.get("stroke_norm_version") != STROKE_NORM_VERSION):
            raise UserError(
                f"{ckpt_dir} was trained with stroke normalisation version {sketch_prep.get('stroke_norm_version')}, "
                f"this code has version {STROKE_NORM_VERSION}: its queries would not look like its training "
                "sketches. Train it again (or use the code it was trained with)."
            )
        tensors = load_file(str(w_path))

        def member(prefix: str) -> tuple[FeatureAdapter, IIAE, InfoNCEPeer | None]:
            def part(name: str) -> dict:
                head = f"{prefix}{name}."
                return {k[len(head):]: v for k, v in tensors.items() if k.startswith(head)}
            adapter_ = FeatureAdapter(AdapterConfig(**config["adapter"]))
            adapter_.load_state_dict(part("adapter"))
            iiae_ = IIAE(IIAEConfig(**config["iiae"]))
            iiae_.load_state_dict(part("iiae"))
            peer_ = None
            if f"{prefix}peer.sketch.weight" in tensors:
                w = tensors[f"{prefix}peer.sketch.weight"]
                peer_ = InfoNCEPeer(w.shape[1], w.shape[0])
                peer_.load_state_dict(part("peer"))
            return adapter_, iiae_, peer_

        adapter, iiae, peer = member("")
        more = [member(f"member{m}.") for m in range(1, int(config.get("members", 1)))]
        tuned = {k: v for k, v in tensors.items() if k.startswith(PREFIX)}
        tuned_info = config.get("backbone", {}).get("finetuned")
        if tuned_info and tensors_sha256(tuned) != tuned_info.get("sha256"):
            raise UserError(f"{ckpt_dir}: the fine-tuned backbone tensors do not match the config's sha256")
        backbone = None
        if with_backbone:
            bb = config["backbone"]
            if resolve_device(device).type != "cpu" and requested_precision(cpu_precision) == "int8":
                raise UserError(f"{ckpt_dir}: int8 runs on the CPU only; on {resolve_device(device)} the backbone "
                                "runs in float (fp16 autocast)")
            try:
                backbone = create_backbone(
                    bb["name"], weights_path=backbone_weights, expected_sha256=bb["weights_sha256"],
                    # onnxruntime is the CPU path only: on a GPU the backbone runs in torch
                    cpu_runtime=cpu_runtime if resolve_device(device).type == "cpu" else "torch",
                    cpu_threads=cpu_threads, tuned=tuned or None, cpu_precision=cpu_precision,
                    tuned_info={k: v for k, v in (tuned_info or {}).items() if k not in ("tensors", "sha256")},
                )
            except ValueError as exc:  # tuned tensors that do not fit the backbone
                raise UserError(f"{ckpt_dir}: {exc}") from None
        try:
            model = cls(backbone, adapter, iiae, config, device=device, peer=peer, more_members=more)
        except ValueError as exc:  # a re-ranking stage the weights do not fit
            raise UserError(f"{ckpt_dir}: {exc}") from None
        model.backbone_tensors = tuned
        model.sha256 = checkpoint_sha256(ckpt_dir)
        return model

    @property
    def precision(self) -> str:
        """"int8" or "fp32": what the backbone runs in (model.backbones.cpu_precision_for)."""
        return self.backbone.precision if self.backbone is not None else "fp32"

    @property
    def int8_calibration(self) -> dict | None:
        """int8: the calibration its backbone was quantized from (model.quantize.calibration_record)."""
        return self.backbone.int8_calibration if self.precision == "int8" else None

    def describe(self) -> dict:
        return {
            "sha256": self.sha256,
            "precision": self.precision,
            "int8_calibration": self.int8_calibration,
            "embedding": self.embedding,
            "dim": self.dim,
            "search_dim": self.search_dim,
            "members": self.n_members,
            "rerank": self.rerank.to_dict() if self.rerank is not None else None,
            "sketch_views": self.sketch_views,  # images a query sketch becomes (2: with its normalised twin)
            "backbone": self.config.get("backbone"),
            "device": str(self.device),
            "runtime": self.backbone.runtime() if self.backbone is not None else None,
        }


def join_members(parts: list[torch.Tensor]) -> torch.Tensor:
    """Unit vectors of the members -> one unit vector whose dot products are the mean of theirs."""
    if len(parts) == 1:
        return parts[0]
    return torch.cat(parts, dim=-1) / float(np.sqrt(len(parts)))


def load_images(paths: Sequence[str | Path]) -> list[Image.Image]:
    return [load_image(p) for p in paths]
