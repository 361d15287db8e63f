"""The HTTP API against a real snapshot and model: every input form, every bad input, every route.

One app (and one model load) serves the whole module; TestClient raises any server-side exception
in the test, so a request that would have been a 500 fails here.
"""

from __future__ import annotations

import base64
import io
import threading

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from test_service_support import new_index_root

from service.app import create_app
from service.schemas import SearchResponse, SearchResult
from service.settings import Settings
from service.strokes import render_strokes

TOKEN = "test-admin-token-0123456789"
MAX_UPLOAD = 256 * 1024
A_STROKES = [[[10, 120, 240], [200, 20, 200]], [[60, 190], [130, 130]]]  # an "A"


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    out = io.BytesIO()
    img.save(out, fmt, **kw)
    return out.getvalue()


@pytest.fixture(scope="module")
def sketch() -> Image.Image:
    return render_strokes(A_STROKES)


@pytest.fixture(scope="module")
def png(sketch) -> bytes:
    return encode(sketch, "PNG")


@pytest.fixture(scope="module")
def served(untrained_checkpoint, tmp_path_factory):
    """(client, snapshot id, root) of one running app on a small real snapshot."""
    root, snapshot_id = new_index_root(tmp_path_factory.mktemp("api"), untrained_checkpoint, n_photos=8)
    settings = Settings(
        snapshot_root=root,
        device="cpu",
        admin_token=TOKEN,
        max_upload_bytes=MAX_UPLOAD,
        max_k=50,
        max_wait_ms=30,
        reload_interval_s=0,
        torch_threads=2,
        faiss_threads=1,
    )
    with TestClient(create_app(settings)) as client:
        yield client, snapshot_id, root


@pytest.fixture
def client(served) -> TestClient:
    return served[0]


def search_file(client, data: bytes, name="s.png", ctype="image/png", **params):
    return client.post("/search", files={"file": (name, data, ctype)}, params=params)


def assert_error(r, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert body["error"]["code"] == code, body
    assert len(body["error"]["message"]) > 10  # a sentence for a person, not just a code
    return body


# --- the happy paths ----------------------------------------------------------------------------
def test_multipart_png_search_ranks_photos_like_the_model_and_index_do(served, png, sketch):
    client, snapshot_id, root = served
    r = search_file(client, png, k=5)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["snapshot"] == snapshot_id
    results = body["results"]
    assert [x["rank"] for x in results] == [1, 2, 3, 4, 5]
    scores = [x["score"] for x in results]
    assert scores == sorted(scores, reverse=True)
    assert set(body["timings_ms"]) == {"read", "decode", "queue", "encode", "search", "metadata", "total"}
    assert body["timings_ms"]["total"] >= body["timings_ms"]["encode"] > 0
    # exactly the declared response model, field for field
    assert SearchResponse.model_validate(body).model_dump(mode="json") == body
    assert set(body) == set(SearchResponse.model_fields)
    assert all(set(x) == set(SearchResult.model_fields) for x in results)

    # The same sketch through the model and the snapshot directly gives the same ranking.
    from index_builder.snapshot import Snapshot
    from model.pipeline import SBIRModel

    snap = Snapshot.open(root)
    try:
        model = SBIRModel.load(snap.model_dir, device="cpu")
        assert body["model"] == model.sha256 == snap.model_sha256
        ref_scores, ref_ids = snap.search(model.encode_sketches([sketch]), 5)
        records = snap.lookup([x["id"] for x in results])
    finally:
        snap.close()
    assert [x["id"] for x in results] == ref_ids[0].tolist()
    np.testing.assert_allclose(scores, ref_scores[0], atol=1e-4)
    assert [x["metadata"] for x in results] == [rec["metadata"] for rec in records]
    assert [x["key"] for x in results] == [rec["key"] for rec in records]
    assert all((root.parent / "photos_0" / x["key"]).is_file() for x in results)  # relative to the collection
    assert all(x["url"] == f"http://testserver/photos/{x['id']}" for x in results)


@pytest.mark.parametrize("fmt, ctype", [("JPEG", "image/jpeg"), ("WEBP", "image/webp")])
def test_jpeg_and_webp_uploads_are_accepted(client, sketch, fmt, ctype):
    r = search_file(client, encode(sketch, fmt, quality=95), name="s", ctype=ctype, k=3)
    assert r.status_code == 200, r.text
    assert len(r.json()["results"]) == 3


def test_base64_json_and_strokes_answer_as_the_same_png_upload_does(client, png):
    by_file = search_file(client, png, k=4).json()
    by_b64 = client.post("/search", params={"k": 4}, json={"image": base64.b64encode(png).decode()}).json()
    data_url = "data:image/png;base64," + base64.b64encode(png).decode()
    by_url = client.post("/search", params={"k": 4}, json={"image": data_url}).json()
    by_strokes = client.post("/search", params={"k": 4}, json={"strokes": A_STROKES}).json()
    ranking = [(x["id"], round(x["score"], 4)) for x in by_file["results"]]
    for other in (by_b64, by_url, by_strokes):
        assert [(x["id"], round(x["score"], 4)) for x in other["results"]] == ranking


def test_default_k_and_k_beyond_the_collection(client, png):
    body = search_file(client, png).json()
    assert len(body["results"]) == 8  # default k is 24, the snapshot holds 8 photos
    assert len({x["id"] for x in body["results"]}) == 8
    assert len(search_file(client, png, k=50).json()["results"]) == 8


def test_concurrent_sketches_are_batched(client, png):
    out: list = [None] * 8

    def one(i):
        out[i] = search_file(client, png, k=2)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(r is not None and r.status_code == 200 for r in out)
    assert max(r.json()["batch_size"] for r in out) > 1
    first = out[0].json()["results"]
    assert all(r.json()["results"] == first for r in out)  # batching does not change answers


def test_overlapping_forwards_answer_as_one_forward_at_a_time_does(served, client, png):
    """`batch_forwards` changes how batches are scheduled, never an answer."""
    _, _, root = served
    settings = Settings(snapshot_root=root, device="cpu", reload_interval_s=0, torch_threads=2, faiss_threads=1,
                        batch_forwards="overlapping", max_wait_ms=30)
    want = search_file(client, png, k=5).json()
    with TestClient(create_app(settings)) as other:
        got = search_file(other, png, k=5).json()
    assert [(x["id"], round(x["score"], 5)) for x in got["results"]] == [
        (x["id"], round(x["score"], 5)) for x in want["results"]]
    assert got["snapshot"] == want["snapshot"]


# --- every bad input gets a clear JSON error and the server goes on ------------------------------
def test_empty_bodies(client):
    assert_error(
        client.post("/search", content=b"", headers={"content-type": "application/json"}), 422, "empty-body"
    )
    assert_error(search_file(client, b""), 422, "empty-image")
    assert_error(
        client.post("/search", data={"other": "x"}, files={"nope": ("a", b"x")}), 422, "missing-file"
    )


def test_not_an_image_truncated_and_bomb(client, png):
    assert_error(search_file(client, b"hello, this is text not a picture"), 422, "not-an-image")
    assert_error(search_file(client, png[: len(png) // 2]), 422, "corrupt-image")
    bomb = encode(Image.new("1", (8000, 6000), 1), "PNG")  # 48 megapixels in a few kB
    assert len(bomb) < MAX_UPLOAD
    body = assert_error(search_file(client, bomb), 413, "image-too-large")
    assert "8000x6000" in body["error"]["message"]


def test_oversized_upload_is_413_with_or_without_content_length(client):
    big = b"\x89PNG\r\n\x1a\n" + bytes(MAX_UPLOAD)
    assert_error(search_file(client, big), 413, "upload-too-large")

    def chunks():
        for _ in range(MAX_UPLOAD // 4096 + 8):
            yield bytes(4096)

    r = client.post("/search", content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in {k.lower() for k in r.request.headers}
    assert_error(r, 413, "upload-too-large")


def test_unsupported_types_are_415(client, sketch):
    gif = encode(sketch.convert("P"), "GIF")
    body = assert_error(search_file(client, gif, ctype="image/gif"), 415, "unsupported-image-type")
    assert "GIF" in body["error"]["message"]
    assert_error(search_file(client, encode(sketch, "BMP")), 415, "unsupported-image-type")
    r = client.post("/search", content=b"abc", headers={"content-type": "text/plain"})
    assert_error(r, 415, "unsupported-media-type")
    assert_error(client.post("/search", content=encode(sketch, "PNG")), 415, "unsupported-media-type")


@pytest.mark.parametrize("k", ["0", "-3", "51", "abc", "2.5"])
def test_bad_k_is_422(client, png, k):
    body = assert_error(search_file(client, png, k=k), 422, "invalid-request")
    assert "k" in body["error"]["message"]


@pytest.mark.parametrize(
    "raw, code",
    [
        (b"{not json", "malformed-json"),
        (b'{"image": "abc"', "malformed-json"),
        (b"[1, 2]", "invalid-request"),
        (b"{}", "invalid-request"),
        (b'{"image": "aGVsbG8=", "strokes": [[[1], [1]]]}', "invalid-request"),
        (b'{"image": "aGVsbG8=", "colour": "red"}', "invalid-request"),
        (b'{"image": "not base64 !!"}', "invalid-base64"),
        (b'{"image": "aGVsbG8gd29ybGQ="}', "not-an-image"),
        (b'{"strokes": []}', "invalid-strokes"),
        (b'{"strokes": [[[1, 2], [3]]]}', "invalid-strokes"),
        (b'{"strokes": [[[1, "x"], [3, 4]]]}', "invalid-request"),
        (b'{"strokes": "a drawing"}', "invalid-request"),
    ],
)
def test_bad_json_bodies_are_422(client, raw, code):
    assert_error(client.post("/search", content=raw, headers={"content-type": "application/json"}), 422, code)


def test_malformed_multipart_is_422(client):
    r = client.post("/search", content=b"--x\r\nnot a part", headers={"content-type": "multipart/form-data"})
    assert_error(r, 422, "malformed-multipart")


def test_too_many_searches_in_flight_is_503_overloaded(served, png):
    client = served[0]
    service = client.app.state.service
    service.searches_in_flight = service.settings.max_queue  # as if that many were being served
    try:
        r = search_file(client, png, k=1)
    finally:
        service.searches_in_flight = 0
    assert_error(r, 503, "overloaded")
    assert r.headers["retry-after"] == "1"


def test_the_server_still_serves_after_all_that(client, png):
    assert search_file(client, png, k=1).status_code == 200
    metrics = client.get("/metrics").text
    assert 'sbir_search_requests_total{form="unknown",outcome="http_413"}' in metrics


# --- other routes --------------------------------------------------------------------------------
def test_health_ready_info(served):
    client, snapshot_id, _ = served
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready", "snapshot": snapshot_id}
    info = client.get("/info").json()
    assert info["ready"] and info["snapshot"]["id"] == snapshot_id and info["snapshot"]["photos"] == 8
    assert info["model"]["sha256"] == info["snapshot"]["model_sha256"]
    assert info["last_reload_error"] is None and info["limits"]["max_k"] == 50
    # the default CPU runtime, and it says so: an operator can tell a fallback to torch from /info
    import onnxruntime

    assert info["model"]["runtime"] == f"onnxruntime {onnxruntime.__version__} (2 threads)"
    assert TOKEN not in str(info)


def test_metrics_has_stages_batches_queue_index_and_snapshot(served, png):
    client, snapshot_id, _ = served
    search_file(client, png, k=1)
    text = client.get("/metrics").text
    for stage in ("read", "decode", "queue", "encode", "search", "metadata", "total"):
        assert f'sbir_search_stage_seconds_count{{stage="{stage}"}}' in text
    assert "sbir_batch_size_bucket" in text and "sbir_queue_depth 0.0" in text
    assert "sbir_index_vectors 8.0" in text
    assert 'sbir_snapshot_info{model="' in text and f'snapshot="{snapshot_id}"' in text


def test_photos_by_id_whole_and_thumbnail(served, png):
    client, _, root = served
    hit = search_file(client, png, k=1).json()["results"][0]
    whole = client.get(hit["url"])
    assert whole.status_code == 200
    from index_builder.snapshot import Snapshot

    snap = Snapshot.open(root)
    try:
        path = snap.photo_path(hit["id"])
    finally:
        snap.close()
    assert whole.content == path.read_bytes()
    thumb = client.get(f"/photos/{hit['id']}", params={"size": 24})
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(thumb.content)).size) <= 24
    again = client.get(
        f"/photos/{hit['id']}", params={"size": 24}, headers={"If-None-Match": thumb.headers["etag"]}
    )
    assert again.status_code == 304


def test_photos_refuses_unknown_ids_sizes_and_paths(client):
    assert_error(client.get("/photos/999999"), 404, "photo-not-found")
    assert_error(client.get("/photos/-1"), 422, "invalid-request")
    assert_error(client.get("/photos/0", params={"size": 100000}), 422, "invalid-request")
    for path in ("/photos/..%2F..%2Fetc%2Fpasswd", "/photos/../../etc/passwd", "/photos/%2Fetc%2Fpasswd"):
        r = client.get(path)
        assert r.status_code in (404, 422) and "error" in r.json() and b"root:" not in r.content


def test_admin_reload_needs_the_token(client, served):
    assert_error(client.post("/admin/reload"), 401, "unauthorized")
    assert_error(
        client.post("/admin/reload", headers={"Authorization": "Bearer wrong-token-123456789"}),
        401,
        "unauthorized",
    )
    r = client.post("/admin/reload", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200 and r.json()["changed"] is False and r.json()["snapshot"] == served[1]


def test_unknown_route_is_json_404(client):
    assert_error(client.get("/nope"), 404, "not-found")


def test_openapi_documents_every_form_with_examples(client):
    spec = client.get("/openapi.json").json()
    op = spec["paths"]["/search"]["post"]
    content = op["requestBody"]["content"]
    assert content["multipart/form-data"]["schema"]["properties"]["file"]["format"] == "binary"
    assert set(content["application/json"]["examples"]) == {"image", "strokes"}
    k = next(p for p in op["parameters"] if p["name"] == "k")
    assert k["in"] == "query" and k["schema"] == {**k["schema"], "type": "integer", "minimum": 1, "maximum": 50}
    # exactly one of image or strokes, as the server enforces (both: 422)
    one_of = content["application/json"]["schema"]["oneOf"]
    assert [branch["required"] for branch in one_of] == [["image"], ["strokes"]]
    assert all(branch["additionalProperties"] is False for branch in one_of)
    assert set(op["responses"]) == {"200", "400", "408", "413", "415", "422", "503"}
    photo = spec["paths"]["/photos/{photo_id}"]["get"]
    photo_id = next(p for p in photo["parameters"] if p["name"] == "photo_id")
    assert photo_id["schema"]["maximum"] == 2**63 - 1
    assert set(photo["responses"]) == {"200", "304", "404", "422", "500", "503"}
    assert list(spec["paths"]["/"]["get"]["responses"]["200"]["content"]) == ["text/html"]
    assert list(spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]
    assert spec["paths"]["/admin/reload"]["post"]["security"] == [{"HTTPBearer": []}]
    for path in ("/photos/{photo_id}", "/healthz", "/readyz", "/metrics", "/info", "/admin/reload"):
        assert path in spec["paths"]


def test_admin_disabled_and_cors_without_a_snapshot(tmp_path):
    """No lifespan here: the app answers CORS preflights and 503s without loading anything."""
    settings = Settings(snapshot_root=tmp_path, cors_origins=["http://ui.example"], reload_interval_s=0)
    client = TestClient(create_app(settings))
    r = client.options(
        "/search", headers={"Origin": "http://ui.example", "Access-Control-Request-Method": "POST"}
    )
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://ui.example"
    r = client.options(
        "/search", headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"}
    )
    assert "access-control-allow-origin" not in r.headers
    assert_error(client.post("/admin/reload", headers={"Authorization": "Bearer x"}), 403, "admin-disabled")
    assert_error(client.get("/readyz"), 503, "not-ready")
    r = client.post("/search", json={"strokes": A_STROKES})
    assert_error(r, 503, "not-ready")
    assert r.headers["retry-after"] == "1"


def test_the_served_snapshot_and_model_have_the_shape_the_service_relies_on(client):
    from service.serving_types import ServedModel, ServedSnapshot

    pair = client.app.state.service.state.current
    assert isinstance(pair.snapshot, ServedSnapshot) and isinstance(pair.model, ServedModel)
    assert not isinstance(object(), ServedSnapshot) and not isinstance(object(), ServedModel)
