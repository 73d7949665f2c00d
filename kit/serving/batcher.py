"""Dynamic batching for the prediction service: concurrent requests' images are run through the model together, up
to a batch size, waiting at most a few milliseconds after the first image for others to join.

    batcher = batcher.Batcher(predictor.logits, max_batch=32, max_wait_ms=5)
    logits = await batcher.submit(images)        # (n, 3, S, S) -> (n, classes), in a running event loop

One model call at a time, on one thread of its own, so the event loop keeps accepting requests while the model
runs; a request's images are never split between batches. max_batch=1 turns batching off (each request alone).
"""
import asyncio
import collections
import concurrent.futures

import torch

POLL_S = 0.0005  # how often a forming batch looks for more requests, s

class Batcher:
    def __init__(self, forward, max_batch=32, max_wait_ms=5.0):
        self.forward, self.max_batch, self.max_wait = forward, max(1, max_batch), max_wait_ms / 1000
        self.queue, self.carry = None, None  # carry: a request that did not fit the last batch
        self.model_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="model")
        self.sizes = collections.Counter()  # images per model call -> calls: what /health reports
        self.task = None

    def start(self):
        """In the running event loop: the loop that forms batches."""
        self.queue = asyncio.Queue()
        self.task = asyncio.get_running_loop().create_task(self.run())

    async def submit(self, images):
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((images, future))
        return await future

    async def gather(self):
        """The next batch: the first waiting request, then others until max_batch images or max_wait has passed.
        A request that would overflow the batch opens the next one."""
        loop = asyncio.get_running_loop()
        first, self.carry = self.carry or await self.queue.get(), None
        items, count = [first], len(first[0])
        deadline = loop.time() + self.max_wait
        while count < self.max_batch:
            if self.queue.empty():
                left = deadline - loop.time()
                if left <= 0:
                    break
                # Polling, not wait_for(queue.get()): on Python 3.10-3.11 a timeout racing a put can lose the item.
                await asyncio.sleep(min(left, POLL_S))
                continue
            item = self.queue.get_nowait()
            if count + len(item[0]) > self.max_batch:
                self.carry = item
                break
            items.append(item)
            count += len(item[0])
        return items, count

    async def run(self):
        loop = asyncio.get_running_loop()
        while True:
            items, count = await self.gather()
            batch = torch.cat([images for images, _ in items])
            try:
                logits = await loop.run_in_executor(self.model_thread, self.forward, batch)
            except Exception as e:  # noqa: BLE001 - handed to every waiting request, the loop goes on
                for _, future in items:
                    if not future.done():
                        future.set_exception(e)
                continue
            self.sizes[count] += 1
            start = 0
            for images, future in items:
                if not future.done():
                    future.set_result(logits[start:start + len(images)])
                start += len(images)

    def stats(self):
        calls = sum(self.sizes.values())
        return {"model_calls": calls, "images": sum(k * v for k, v in self.sizes.items()),
                "largest_batch": max(self.sizes, default=0), "batch_sizes": dict(sorted(self.sizes.items()))}
