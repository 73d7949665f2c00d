"""An HTTP prediction service: a trained run (PyTorch) or an exported model.onnx (onnxruntime) behind POST /predict,
with concurrent requests batched together.

    python serve.py --checkpoint checkpoints/cpu_smoke                  # http://127.0.0.1:8000
    python serve.py --checkpoint deploy/model.onnx --port 8080 --max_batch 16 --max_wait_ms 5
    curl -F file=@photo.jpg http://127.0.0.1:8000/predict               # one image, multipart
    curl -F file=@a.jpg -F file=@b.jpg "http://127.0.0.1:8000/predict?topk=3"
    curl --data-binary @photo.jpg -H "Content-Type: image/jpeg" http://127.0.0.1:8000/predict   # raw bytes
    curl http://127.0.0.1:8000/health ; curl http://127.0.0.1:8000/classes

/predict answers {"predictions": [{"file": name, "topk": [{"class": name, "probability": p}, ...]}, ...]}, one entry
per image in the order sent, the probabilities predict.py --json gives for the same files. The preprocessing is the
run's val transform (predict.py's; for model.onnx, its preprocess.json). Bad input (not an image, over the pixel
limit, an empty body, a body over --max_body_mb) is a 4xx with a one-line reason; the service stays up. FastAPI on
uvicorn, one process: the model runs on one thread of its own (kit/serving/batcher.py), image decoding on a
thread pool. bench.py --only serve measures it under load (docs/performance.md).
"""
import argparse
import asyncio
import contextlib
import socket
import sys

from kit.base import errors
from kit.serving import batcher, predictor


def get_args_parser():
    p = argparse.ArgumentParser(description="Serve a trained run's predictions over HTTP.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="run folder, best.pth, a .safetensors file or a model.onnx")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free port, printed at start)")
    p.add_argument("--max_batch", type=int, default=32, help="images per model call at most (1: no batching)")
    p.add_argument("--max_wait_ms", type=float, default=5.0, help="how long a batch waits for more requests, ms")
    p.add_argument("--max_body_mb", type=float, default=20.0, help="largest request body accepted, MB")
    p.add_argument("--topk", type=int, default=5, help="classes per image unless the request says ?topk=")
    p.add_argument("--device", default="cpu", help="PyTorch device (cpu, cuda, ...)")
    return p


def read_images(body, content_type):
    """[(name, bytes)] of a request: the parts of a multipart/form-data body, or the body itself."""
    if content_type.startswith("multipart/form-data"):
        from email import policy
        from email.parser import BytesParser

        message = BytesParser(policy=policy.HTTP).parsebytes(
            b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body)
        if not message.is_multipart():
            raise errors.DataError("a multipart body without parts")
        parts = [(part.get_filename() or part.get_param("name", header="content-disposition") or f"part{i}",
                  part.get_payload(decode=True) or b"") for i, part in enumerate(message.iter_parts())]
        return parts
    return [("body", body)]


def make_app(model, args):
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from starlette.concurrency import run_in_threadpool

    batches = batcher.Batcher(model.logits, args.max_batch, args.max_wait_ms)
    limit = int(args.max_body_mb * 1e6)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        batches.start()  # in uvicorn's event loop
        yield

    app = FastAPI(title="caltech101 kit prediction service", lifespan=lifespan)

    def refuse(status, reason):
        return JSONResponse({"error": reason}, status_code=status)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model.describe(), "batching": batches.stats()}

    @app.get("/classes")
    async def classes():
        return {"classes": model.classes}

    @app.post("/predict")
    async def predict_route(request: Request, topk: int = args.topk):
        if topk < 1:
            return refuse(400, "topk must be at least 1")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return refuse(413, f"the body ({int(declared):,} bytes) is over the {limit:,}-byte limit (--max_body_mb)")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                return refuse(413, f"the body is over the {limit:,}-byte limit (--max_body_mb)")
            chunks.append(chunk)
        body = b"".join(chunks)
        if not body:
            return refuse(400, "empty body: send an image (raw bytes, or multipart files)")
        try:
            files = read_images(body, request.headers.get("content-type", ""))
        except errors.DataError as e:
            return refuse(400, str(e))
        if not files:
            return refuse(400, "no files in the multipart body")
        try:
            images = await run_in_threadpool(model.preprocess, files)
        except errors.DataError as e:  # not an image, or over the pixel limit: never decoded
            return refuse(415, str(e))
        logits = await batches.submit(images)
        return {"predictions": [{"file": name, "topk": top} for (name, _), top in
                                zip(files, model.top(logits, topk))]}

    return app


def listening_socket(host, port):
    """A bound socket (port 0: the OS picks one), so the address printed is the one served."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        raise errors.ConfigError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(2048)  # listening before the address is printed: a client that reads it can connect at once
    return sock


def main(args):
    import uvicorn

    model = predictor.load(args.checkpoint, args.device)
    sock = listening_socket(args.host, args.port)
    host, port = sock.getsockname()[:2]
    app = make_app(model, args)
    print(f"serving {model.describe()} on http://{host}:{port} (POST /predict, GET /health, GET /classes; batches "
          f"of up to {args.max_batch}, waiting {args.max_wait_ms} ms)", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    asyncio.run(server.serve(sockets=[sock]))
    return 0


def cli(argv=None):
    return errors.run_cli(main, get_args_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(cli())
