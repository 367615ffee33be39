"""End to end against the baseline a user would otherwise pick: torch DistributedDataParallel
(gloo on CPU, NCCL on CUDA) training the default job's model on the same token batches with N
processes and the same Adam settings and schedule, against pyasgd sync and async with G = N, for
the same wall time; then the same with one worker made 2x slower (DDP: the rank sleeps its
compute time again; pyasgd: --worker-slowdown RANK:2). Reports words per second and dev BLEU
after the same time, as ratios to DDP measured in the same run.

    python -m pytest benchmarks/test_bench_ddp.py --benchmark-only -s
    PYASGD_E2E_SECONDS=300 PYASGD_E2E_WORKERS=4 PYASGD_E2E_DEVICE=cuda:0 python -m pytest ...

Targets (issue 11): pyasgd sync >= 1.0x DDP wps; async + G = N >= 1.1x DDP; with the 2x-slow
worker, async + G = N >= 1.4x pyasgd sync.
"""
from __future__ import annotations

import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp

from pyasgd.config import TrainConfig
from pyasgd.trainer.launch import train

SECONDS = float(os.environ.get("PYASGD_E2E_SECONDS", "120"))
N = int(os.environ.get("PYASGD_E2E_WORKERS", "2"))
DEVICE = os.environ.get("PYASGD_E2E_DEVICE", "cpu")
VALID_SENTENCES = 200
RESULTS: dict[str, dict] = {}


def base_config(**kw) -> TrainConfig:
    gpu = DEVICE.startswith("cuda")
    return TrainConfig(workers=N, max_time=SECONDS, valid_every_tokens=0, valid_sentences=VALID_SENTENCES,
                       quiet=True, devices=DEVICE, server_device=DEVICE if gpu else "cpu", **kw)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_rank(rank: int, config: TrainConfig, port: int, slow_rank: int, results) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from pyasgd.trainer.schedule import learning_rate
    from pyasgd.tasks import Cursor, make_task

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = torch.device(config.worker_devices()[rank])
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=config.workers)
    torch.set_num_threads(config.worker_threads())
    task = make_task(config)
    model = task.build_model().to(device)  # same seed in every rank: identical initial parameters
    ddp = DDP(model)
    c = config
    opt = torch.optim.Adam(model.parameters(), lr=c.lr, betas=(c.beta1, c.beta2), eps=c.eps)
    data = task.batches(rank, c.workers, Cursor())
    tokens, step, stop = 0, 0, torch.zeros(1, device=device)
    dist.barrier()
    start = time.monotonic()
    while True:
        t = time.monotonic()
        batch, _ = next(data)
        loss, n = task.loss(ddp, task.batch_to(batch, device))
        (loss * c.workers).backward()  # DDP averages; pyasgd sums: the same summed gradient
        if rank == slow_rank:
            time.sleep(time.monotonic() - t)  # a 2x slower accelerator (as --worker-slowdown R:2)
        step += 1
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, lr=c.lr, schedule=c.schedule, warmup=c.warmup)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += n
        stop[0] = float(time.monotonic() - start >= c.max_time)
        dist.all_reduce(stop)  # everyone stops after the same step
        if stop.item() > 0:
            break
    wall = time.monotonic() - start
    total = torch.tensor([float(tokens)], device=device)
    dist.all_reduce(total)
    if rank == 0:
        model.eval()
        bleu = task.evaluate(model)["bleu"]
        results.put({"wps": total.item() / wall, "updates": step, "bleu": bleu, "wall_s": wall})
    dist.destroy_process_group()


def run_ddp(slow_rank: int = -1) -> dict:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    config = base_config(mode="sync")
    procs = [ctx.Process(target=_ddp_rank, args=(r, config, port, slow_rank, results)) for r in range(N)]
    for p in procs:
        p.start()
    try:
        out = results.get(timeout=SECONDS + 600)
    finally:
        for p in procs:
            p.join(60)
            if p.is_alive():
                p.kill()
    return out


def run_pyasgd(tmp_path, name: str, **kw) -> dict:
    s = train(base_config(out=str(tmp_path / name), **kw))
    return {"wps": s["wps"], "updates": s["updates"], "bleu": s["final_valid"]["bleu"], "wall_s": s["wall_s"]}


CASES = [
    ("ddp", lambda tmp: run_ddp()),
    ("pyasgd sync", lambda tmp: run_pyasgd(tmp, "sync", mode="sync")),
    ("pyasgd async G=N", lambda tmp: run_pyasgd(tmp, "async", mode="async")),
    ("ddp, worker 1 2x slow", lambda tmp: run_ddp(slow_rank=1)),
    ("pyasgd sync, worker 1 2x slow", lambda tmp: run_pyasgd(tmp, "sync-slow", mode="sync", worker_slowdown="1:2")),
    ("pyasgd async G=N, worker 1 2x slow",
     lambda tmp: run_pyasgd(tmp, "async-slow", mode="async", worker_slowdown="1:2")),
]


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_end_to_end_against_ddp(benchmark, report, tmp_path, name):
    fn = dict(CASES)[name]
    r = benchmark.pedantic(fn, args=(tmp_path,), rounds=1, iterations=1)
    assert r["updates"] > 0 and r["wps"] > 0 and r["bleu"] >= 0  # it trained and decoded
    RESULTS[name] = r
    slow = "2x slow" in name
    base = RESULTS.get("ddp, worker 1 2x slow" if slow else "ddp")
    sync = RESULTS.get("pyasgd sync, worker 1 2x slow" if slow else "pyasgd sync")
    notes = []
    if base is not None and base is not r:
        notes.append(f"{r['wps'] / base['wps']:.2f}x DDP wps")
    if sync is not None and sync is not r and "async" in name:
        notes.append(f"{r['wps'] / sync['wps']:.2f}x pyasgd sync wps")
    report(f"e2e N={N} {DEVICE} {name}", f"{r['wps']:,.0f} wps",
           f"dev BLEU {r['bleu']:.2f} after {r['wall_s']:.0f} s, {r['updates']} updates; " + ("; ".join(notes) or "baseline"))
