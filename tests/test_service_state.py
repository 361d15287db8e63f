"""Serving pairs: leases keep a retired snapshot open until its last request is done."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from service.state import NotReady, ServingPair, stack_cpu


class FakeSnapshot:
    id = "snap-a"
    model_sha256 = "0" * 64
    dim = 4

    def __init__(self):
        self.closed = 0
        self.searches: list[tuple[int, int]] = []
        self.lookups: list[list[int]] = []

    def search(self, queries, k):
        assert not self.closed, "search on a closed snapshot"
        self.searches.append((len(queries), k))
        n = len(queries)
        return np.tile(np.linspace(1, 0, k, dtype=np.float32), (n, 1)), np.tile(np.arange(k), (n, 1))

    def lookup(self, ids):
        self.lookups.append(list(ids))
        return [{"id": i, "metadata": {"n": i}} if i != 1 else None for i in ids]

    def close(self):
        self.closed += 1


class FakeModel:
    def __init__(self):
        self.batches: list[int] = []

    def encode_pixels(self, pixels, domain):
        assert domain == "sketch"
        self.batches.append(len(pixels))
        v = np.ones((len(pixels), 4), np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_retired_pair_closes_only_after_its_last_lease():
    snap = FakeSnapshot()
    pair = ServingPair(snap, FakeModel())
    assert pair.acquire() and pair.acquire()
    pair.retire()
    pair.release()
    # one request still running on it: not closing (closing is decided under the lease lock, at once)
    assert not pair.closed and not pair.closed_event.is_set() and snap.closed == 0
    pair.release()
    assert pair.closed_event.wait(5) and snap.closed == 1
    assert not pair.acquire()  # a closed pair cannot be leased again


def test_unleased_pair_closes_when_retired_and_only_once():
    snap = FakeSnapshot()
    pair = ServingPair(snap, FakeModel())
    pair.retire()
    pair.retire()
    assert pair.closed_event.wait(5)
    assert snap.closed == 1


def test_release_without_acquire_is_a_bug():
    pair = ServingPair(FakeSnapshot(), FakeModel())
    with pytest.raises(AssertionError):
        pair.release()


def test_encode_and_search_is_one_forward_pass_one_search_and_one_lookup_per_batch():
    snap, model = FakeSnapshot(), FakeModel()
    pair = ServingPair(snap, model)
    pixels = torch.zeros(3, 8, 8, dtype=torch.uint8)
    hits = pair.encode_and_search([(pixels, 2), (pixels, 5), (pixels, 3)])
    assert model.batches == [3] and snap.searches == [(3, 5)]  # searched once, at the largest k
    assert snap.lookups == [[0, 1, 2, 3, 4]]  # each id looked up once for the whole batch
    assert [[i for _, i, _ in h.found] for h in hits] == [[0, 1], [0, 1, 2, 3, 4], [0, 1, 2]]
    assert hits[1].found[2] == (pytest.approx(0.5), 2, {"id": 2, "metadata": {"n": 2}})
    assert hits[0].found[1][2] is None  # the snapshot had no record for id 1
    assert all(h.encode_s >= 0 and h.search_s >= 0 and h.metadata_s >= 0 for h in hits)


def test_encode_and_search_leaves_out_missing_neighbours():
    class Sparse(FakeSnapshot):
        def search(self, queries, k):  # fewer photos than k: faiss pads with -1
            return np.array([[0.9, -np.inf, -np.inf]], np.float32), np.array([[7, -1, -1]])

    snap = Sparse()
    (hit,) = ServingPair(snap, FakeModel()).encode_and_search([(torch.zeros(3, 8, 8, dtype=torch.uint8), 3)])
    assert [i for _, i, _ in hit.found] == [7] and snap.lookups == [[7]]


def test_concurrent_leases_are_counted_exactly():
    snap = FakeSnapshot()
    pair = ServingPair(snap, FakeModel())

    def churn():
        for _ in range(2000):
            assert pair.acquire()
            pair.release()

    assert pair.acquire()  # held by "the test request" throughout
    threads = [threading.Thread(target=churn) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    pair.retire()
    assert not pair.closed and not pair.closed_event.is_set()
    pair.release()
    assert pair.closed_event.wait(5) and snap.closed == 1


def test_model_cache_loads_with_the_configured_cpu_runtime(untrained_checkpoint):
    from model.pipeline import checkpoint_sha256
    from service.state import ModelCache

    sha = checkpoint_sha256(untrained_checkpoint)
    model = ModelCache("cpu", cpu_runtime="torch").get(untrained_checkpoint, sha)
    assert model.describe()["runtime"] == "torch cpu"
    model = ModelCache("cpu", cpu_runtime="onnxruntime", cpu_threads=1).get(untrained_checkpoint, sha)
    assert model.describe()["runtime"].startswith("onnxruntime") and model.describe()["runtime"].endswith("(1 thread)")


class _Int8Snapshot(FakeSnapshot):
    precision = "int8"
    manifest = {"software": {"sbir": "0.9.0"}}
    model_dir = "/r/model"

    def __init__(self, calibration):
        super().__init__()
        self.int8_calibration = calibration


class _Int8Model(FakeModel):
    dim = 4
    sha256 = "0" * 64
    precision = "int8"
    int8_calibration = {"file": "lite2.int8.json", "sha256": "a" * 64}

    def preprocess_sketch(self, img):
        return torch.zeros(3, 8, 8, dtype=torch.uint8)


class _Models:
    """What load_pair needs of a ModelCache: the snapshot's precision, one model and the CPU threads."""

    cpu_threads = None

    def precision_for(self, snapshot):
        return snapshot.precision

    def get(self, model_dir, sha256, precision):
        return _Int8Model()


def _load(snapshot):
    from types import SimpleNamespace

    from service.state import load_pair

    return load_pair(SimpleNamespace(Snapshot=SimpleNamespace(open=lambda root, sid: snapshot)), "/r", snapshot.id,
                     _Models())


def test_an_int8_snapshot_of_another_calibration_is_refused_with_both_digests():
    from model.ground.errors import UserError

    snap = _Int8Snapshot({"file": "lite2.int8.json", "sha256": "b" * 64})
    with pytest.raises(UserError) as err:
        _load(snap)
    message = str(err.value)
    assert "snapshot snap-a was indexed by the int8 backbone quantized from lite2.int8.json sha256 bbbbbbbbbbbb" in message
    assert "this service's from lite2.int8.json sha256 aaaaaaaaaaaa" in message
    assert "rebuild the index with this version" in message and "the version that built it (sbir 0.9.0)" in message
    assert snap.closed == 1  # refused: nothing stays open


def test_an_int8_snapshot_of_the_same_or_an_unrecorded_calibration_is_served(caplog):
    same = _Int8Snapshot(dict(_Int8Model.int8_calibration))
    assert _load(same).snapshot is same and same.closed == 0
    assert "records no int8 calibration" not in caplog.text
    older = _Int8Snapshot(None)  # built before the calibration was recorded: served, with a warning
    with caplog.at_level("WARNING", logger="service.state"):
        assert _load(older).snapshot is older
    assert "snapshot snap-a records no int8 calibration" in caplog.text


def test_the_two_stages_give_what_one_call_gives():
    snap, model = FakeSnapshot(), FakeModel()
    pair = ServingPair(snap, model)
    payloads = [(torch.zeros(3, 8, 8, dtype=torch.uint8), k) for k in (2, 5)]
    encoded = pair.encode(payloads)
    assert encoded.vectors.shape == (2, 4) and encoded.vectors.dtype == np.float32 and encoded.seconds >= 0
    assert snap.searches == []  # the forward stage does not search
    staged = pair.search_encoded(payloads, encoded)
    whole = pair.encode_and_search(payloads)
    assert [h.found for h in staged] == [h.found for h in whole]
    assert model.batches == [2, 2] and snap.searches == [(2, 5), (2, 5)]


def test_a_closed_pair_refuses_both_stages():
    pair = ServingPair(FakeSnapshot(), FakeModel())
    payloads = [(torch.zeros(3, 8, 8, dtype=torch.uint8), 2)]
    encoded = pair.encode(payloads)
    pair.retire()
    assert pair.closed_event.wait(5)
    with pytest.raises(NotReady):
        pair.encode(payloads)
    with pytest.raises(NotReady):
        pair.search_encoded(payloads, encoded)


def test_a_twin_model_serves_each_sketch_as_two_images_in_one_forward(untrained_checkpoint, tmp_path):
    """A model that encodes each query with its stroke-normalised twin: the request's payload is both
    images, a batch of n requests is one forward of 2n images, and the vectors are the model's own."""
    import json
    import shutil

    from PIL import Image, ImageDraw

    from model.pipeline import SBIRModel
    from model.stroke_norm import VERSION

    path = tmp_path / "twin"
    shutil.copytree(untrained_checkpoint, path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["sketch_preprocessing"] = {"stroke_norm": False, "query_twin": True, "stroke_norm_version": VERSION}
    (path / "config.json").write_text(json.dumps(cfg))
    model = SBIRModel.load(path, device="cpu")
    sketches = []
    for i in range(3):
        img = Image.new("RGB", (100, 100), "white")
        ImageDraw.Draw(img).ellipse([10 + 5 * i, 10, 90, 80 - 5 * i], outline="black", width=2)
        sketches.append(img)
    forwards, real = [], model.backbone_features
    model.backbone_features = lambda px: forwards.append(px.shape[0]) or real(px)
    pair = ServingPair(FakeSnapshot(), model)
    encoded = pair.encode([(model.preprocess_sketch(im), 5) for im in sketches])
    assert forwards == [6] and encoded.vectors.shape == (3, model.dim)
    np.testing.assert_allclose(encoded.vectors, model.encode_sketches(sketches), atol=1e-5)


def test_query_twin_off_serves_a_twin_model_one_image_a_sketch(untrained_checkpoint, tmp_path):
    """SBIR_QUERY_TWIN=off: the model cache hands out the model encoding sketches as drawn only."""
    import json
    import shutil

    from PIL import Image

    from model.ground.checkpoint import checkpoint_sha256
    from model.stroke_norm import VERSION
    from service.state import ModelCache

    path = tmp_path / "twin"
    shutil.copytree(untrained_checkpoint, path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["sketch_preprocessing"] = {"stroke_norm": False, "query_twin": True, "stroke_norm_version": VERSION}
    (path / "config.json").write_text(json.dumps(cfg))
    sha = checkpoint_sha256(path)
    sketch = Image.new("RGB", (64, 64), "white")
    for setting, views in (("model", 2), ("off", 1)):
        model = ModelCache("cpu", cpu_runtime="torch", query_twin=setting).get(path, sha)
        assert model.sketch_views == views and model.describe()["sketch_views"] == views
        assert model.preprocess_sketch(sketch).shape[0] == (2 if views == 2 else 3)


def test_a_disk_check_that_outlives_a_swap_says_nothing_of_the_new_snapshot(tmp_path):
    """The watcher looks at the serving folder in a thread; a reload may swap the pair meanwhile. The
    old folder's absence must not be reported as the new snapshot's (it was, under load in CI)."""
    import asyncio
    from types import SimpleNamespace

    from service.metrics import ServiceMetrics
    from service.state import ServingState

    state = ServingState(tmp_path, "cpu", ServiceMetrics(), reload_interval_s=0)
    new = SimpleNamespace(snapshot=SimpleNamespace(path=tmp_path))  # present on disk

    class Vanished:
        def is_dir(self):  # the old folder is gone, and a reload swaps in `new` while this looks
            state.current = new
            return False

    state.current = SimpleNamespace(snapshot=SimpleNamespace(path=Vanished()))
    asyncio.run(state._check_serving_on_disk())
    assert state.serving_missing_since is None and state.warnings() == []
    asyncio.run(state._check_serving_on_disk())  # the next look is about `new`: present
    assert state.serving_missing_since is None
    state.current = SimpleNamespace(snapshot=SimpleNamespace(path=tmp_path / "gone"))
    asyncio.run(state._check_serving_on_disk())
    assert state.serving_missing_since is not None and "gone from disk" in state.warnings()[0]


def test_stack_cpu_is_torch_stack():
    """The batch of preprocessed sketches, stacked through numpy: torch.stack's values, shape and dtype,
    also for the channel-permuted views colour images give."""
    rng = np.random.default_rng(0)
    grey = torch.from_numpy(rng.integers(0, 256, (3, 8, 8), dtype=np.uint8))
    colour = torch.from_numpy(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).permute(2, 0, 1)
    assert not colour.is_contiguous()
    got = stack_cpu([grey, colour, grey])
    want = torch.stack([grey, colour, grey])
    assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want)
    twins = [torch.stack([grey, colour]), torch.stack([colour, grey])]
    assert torch.equal(stack_cpu(twins), torch.stack(twins))


def test_the_encoding_thread_runs_the_heads_on_one_torch_thread_behind_onnxruntime():
    """A model whose backbone runs in onnxruntime is encoded with torch on one thread (its heads); the
    count is set on the batcher's thread once, not back and forth, and other models leave it."""
    from service.state import encode_threads_for

    class Backbone:
        def __init__(self, runtime):
            self._runtime = runtime

        def runtime(self):
            return self._runtime

    ort_model, torch_model = FakeModel(), FakeModel()
    ort_model.backbone, torch_model.backbone = Backbone("onnxruntime 1.32.0 int8 (2 threads)"), Backbone("torch cpu")
    assert encode_threads_for(ort_model, 2) == 1
    assert encode_threads_for(torch_model, 2) == 2 and encode_threads_for(torch_model, None) is None
    assert encode_threads_for(FakeModel(), 3) == 3  # no backbone to ask: the setting

    seen, sets = [], []
    real_encode = ort_model.encode_pixels
    ort_model.encode_pixels = lambda px, domain: seen.append(torch.get_num_threads()) or real_encode(px, domain)
    payload = [(torch.zeros(3, 8, 8, dtype=torch.uint8), 3)]

    def batcher_thread():
        torch.set_num_threads(2)
        real_set = torch.set_num_threads
        try:
            torch.set_num_threads = lambda n: sets.append(n) or real_set(n)
            pair = ServingPair(FakeSnapshot(), ort_model, encode_threads=1)
            for _ in range(3):
                pair.encode(payload)
            ServingPair(FakeSnapshot(), ort_model).encode(payload)  # None: the count stays as it is
        finally:
            torch.set_num_threads = real_set
            real_set(before)

    before = torch.get_num_threads()
    t = threading.Thread(target=batcher_thread)
    t.start()
    t.join()
    assert seen == [1, 1, 1, 1] and sets == [1]
