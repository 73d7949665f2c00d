"""serve.py as a user runs it: a subprocess on a free localhost port answering real images as predict.py does,
batching concurrent requests, refusing bad input with a 4xx and a one-line reason while staying up."""
import http.client
import json
import os
import struct
import urllib.parse
import zlib

import pytest

import predict
import serve
from conftest import one_line_error, run_cli
from kit.data import splits
from kit.serving import loadgen


@pytest.fixture(scope="module")
def server(trained_run):
    proc, url = loadgen.start_server(trained_run["out_dir"], "--max_batch", "8", "--max_wait_ms", "100",
                                     "--max_body_mb", "0.5")
    yield url
    proc.terminate()
    proc.wait(30)


def request(url, path, body=None, content_type="application/octet-stream", method=None):
    parsed = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=60)
    conn.request(method or ("POST" if body is not None else "GET"), path, body=body,
                 headers={"Content-Type": content_type} if body is not None else {})
    response = conn.getresponse()
    answer = json.loads(response.read() or b"null")
    conn.close()
    return response.status, answer


def multipart(files, boundary="kit-test-boundary"):
    parts = [f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
             f"Content-Type: image/jpeg\r\n\r\n".encode() + data + b"\r\n" for name, data in files]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def val_files(root, count):
    files = splits.read_split(root, "val")[0][:count]
    return [os.path.join(splits.image_root(root), f) for f in files]


def png_claiming(width, height):
    """A tiny PNG whose header claims width x height pixels (a decompression bomb's signature)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")


@pytest.mark.slow
def test_answers_equal_predict_json(server, trained_run, prepared_with_test, tmp_path):
    paths = val_files(prepared_with_test, 6)
    json_path = tmp_path / "p.json"
    predict.main(predict.get_args_parser().parse_args([*paths, "--checkpoint", trained_run["out_dir"], "--json",
                                                       str(json_path), "--topk", "3"]))
    expected = {r["file"]: r["topk"] for r in json.load(open(json_path))["results"]}
    body, content_type = multipart([(os.path.basename(p), open(p, "rb").read()) for p in paths])
    status, answer = request(server, "/predict?topk=3", body, content_type)
    assert status == 200, answer
    assert [a["file"] for a in answer["predictions"]] == [os.path.basename(p) for p in paths]
    for path, got in zip(paths, answer["predictions"]):
        want = expected[path]
        assert [t["class"] for t in got["topk"]] == [t["class"] for t in want]
        assert all(abs(a["probability"] - b["probability"]) < 1e-5 for a, b in zip(got["topk"], want))
    # Raw bytes: one image, the same answer.
    status, raw = request(server, "/predict?topk=3", open(paths[0], "rb").read(), "image/jpeg")
    assert status == 200 and [t["class"] for t in raw["predictions"][0]["topk"]] == \
        [t["class"] for t in expected[paths[0]]]
    assert request(server, "/classes")[1]["classes"] == ["alpha", "bravo", "charlie"]


@pytest.mark.slow
def test_bad_requests_get_a_4xx_and_the_service_stays_up(server):
    cases = [(b"", "application/octet-stream", 400, "empty body"),
             (b"this is not an image" * 10, "image/jpeg", 415, "not a readable image"),
             (png_claiming(30000, 30000), "image/png", 415, "pixel limit"),
             (b"\xff" * 600_000, "image/jpeg", 413, "limit (--max_body_mb)")]
    for body, content_type, status, reason in cases:
        got, answer = request(server, "/predict", body, content_type)
        assert got == status and reason in answer["error"] and "\n" not in answer["error"], (got, answer)
        assert request(server, "/health")[0] == 200
    body, content_type = multipart([("fine.jpg", b"garbage")])
    got, answer = request(server, "/predict", body, content_type)
    assert got == 415 and answer["error"].startswith("cannot decode fine.jpg:")


@pytest.mark.slow
def test_concurrent_requests_are_batched(server, prepared_with_test):
    before = request(server, "/health")[1]["batching"]
    bodies = [(open(p, "rb").read(), "image/jpeg") for p in val_files(prepared_with_test, 4)]
    figures = loadgen.run(server + "/predict", bodies, concurrency=8, requests=32, limit_s=120)
    assert figures["errors"] == 0 and figures["requests"] == 32
    after = request(server, "/health")[1]["batching"]
    assert after["images"] - before["images"] == 32
    assert after["largest_batch"] > 1  # several requests went through one model call
    assert after["model_calls"] - before["model_calls"] < 32


def test_a_model_that_does_not_load_stops_the_start_with_one_line(tmp_path, capfd):
    (tmp_path / "model.onnx").write_bytes(b"not onnx")
    code, _, err = run_cli(serve.cli, ["--checkpoint", str(tmp_path / "model.onnx")], capfd)
    one_line_error(code, err, f"no preprocess.json beside {tmp_path / 'model.onnx'}: export with export.py")
    code, _, err = run_cli(serve.cli, ["--checkpoint", str(tmp_path / "nothing")], capfd)
    one_line_error(code, err, f"no checkpoint at {tmp_path / 'nothing'}")
