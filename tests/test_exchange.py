"""The shared region under real concurrency: spawned processes pushing (fp32 or bf16 slots),
pulling and dying; the server's update from the front buffer into the back one."""
import math
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

import mp_helpers
from helpers import shm_names
from pyasgd.config import TrainConfig
from pyasgd.core.region import (READY, SharedRegion, RegionClosedError, RegionTimeoutError,
                             default_slots)
from pyasgd.core.fused import adam_step_reference, bounds_verdict, fused_adam_step

CTX = mp.get_context("spawn")


def server_step(region, batch, master, m, v, **adam):
    """The server's protocol around one update: the fused step writes the back buffer, which is
    published only when the step was applied; the batch's slots are released either way."""
    from pyasgd.core.fused import fused_adam_step

    back, ok = region.begin_update(), False
    try:
        ok = fused_adam_step(master, m, v, batch.grads, out=back, grad_bounds=batch.bounds, **adam)
    finally:
        region.end_update(batch, publish=ok)
    return ok


def server_step_in_region(region, batch, m, v, **adam):
    """The CPU server's update: no master copy; the parameters are read from the published
    (front) buffer and the new ones written straight into the back buffer."""
    front, back, ok = region.front(), region.begin_update(), False
    try:
        ok = fused_adam_step(front, m, v, batch.grads, param_out=back, grad_bounds=batch.bounds, **adam)
    finally:
        region.end_update(batch, publish=ok)
    return ok


@pytest.mark.parametrize("G", [pytest.param(1, marks=pytest.mark.slow), 3, pytest.param(4, marks=pytest.mark.slow)])
def test_conservation_four_writers(G):
    workers, pushes, n = 4, 2000, 33
    with SharedRegion.create(n, default_slots(workers, G)) as region:
        with CTX.Pool(workers) as pool:
            pending = [pool.apply_async(mp_helpers.writer, (region.name, w, pushes, n)) for w in range(workers)]
            total = torch.zeros(n, dtype=torch.float64)
            seen, tokens, remaining = [], 0, workers * pushes
            while remaining:
                batch = region.collect(min(G, remaining), timeout=180)  # a bound for hangs only
                for g in batch.grads:
                    total += g.double()
                seen += batch.push_seqs
                tokens += sum(batch.tokens)
                assert batch.push_seqs == sorted(batch.push_seqs)  # arrival order
                region.release(batch)
                remaining -= len(batch.slots)
            pushed = [s for p in pending for s in p.get(timeout=60)]
    assert torch.equal(total, mp_helpers.expected_total(workers, pushes, n))  # nothing lost or doubled
    assert tokens == workers * pushes
    assert sorted(seen) == sorted(pushed) == list(range(workers * pushes))  # each seq seen once


@pytest.mark.slow
def test_no_torn_pulls_and_versions_never_go_back():
    n, versions = 200_003, 2000
    with SharedRegion.create(n, 1) as region:
        q, started = CTX.Queue(), CTX.Barrier(4)
        readers = [CTX.Process(target=mp_helpers.reader, args=(region.name, versions, q, started))
                   for _ in range(3)]
        for r in readers:
            r.start()
        started.wait(timeout=120)  # every reader attached and about to pull
        for v in range(1, versions + 1):
            assert region.publish(torch.full((n,), float(v))) == v
        results = [q.get(timeout=120) for _ in readers]
        for r in readers:
            r.join(timeout=30)
            assert r.exitcode == 0
    for pulls, distinct, problems in results:
        assert problems == []
        assert distinct > 10  # the readers really raced the publisher


@pytest.mark.slow
def test_killed_writer_holding_a_slot_is_reclaimed():
    n, pushes = 17, 150
    with SharedRegion.create(n, 3) as region:
        ready = CTX.Event()
        victim = CTX.Process(target=mp_helpers.hold_slot_then_sleep, args=(region.name, ready))
        victim.start()
        assert ready.wait(60)
        dead_slot = next(k for k in range(3) if region.slot_state(k) != 0)
        os.kill(victim.pid, signal.SIGKILL)
        victim.join(30)
        # Two gradients fill the two free slots; collecting three can only finish once the
        # collector itself has reclaimed the dead writer's slot and a third push has used it.
        region.push(torch.full((n,), 1.0), version=0, worker=0)
        region.push(torch.full((n,), 2.0), version=0, worker=1)

        def third():
            deadline = time.time() + 60
            while region.reclaimed == 0 and time.time() < deadline:
                time.sleep(0.01)
            region.push(torch.full((n,), 3.0), version=0, worker=2)

        t = threading.Thread(target=third)
        t.start()
        batch = region.collect(3, timeout=60)
        t.join(60)
        assert batch.reclaimed == [(dead_slot, victim.pid, 99)]  # reported once, by the collector
        assert sorted(float(g[0]) for g in batch.grads) == [1.0, 2.0, 3.0]
        region.release(batch)
        # and the ring still conserves every gradient afterwards
        writers = [CTX.Process(target=mp_helpers.writer, args=(region.name, w, pushes, n)) for w in range(2)]
        for w in writers:
            w.start()
        total, got = torch.zeros(n, dtype=torch.float64), 0
        while got < 2 * pushes:
            batch = region.collect(min(3, 2 * pushes - got), timeout=60)
            assert batch.reclaimed == []  # nothing else died
            for g in batch.grads:
                total += g.double()
            got += len(batch.slots)
            region.release(batch)
        for w in writers:
            w.join(60)
            assert w.exitcode == 0
        assert region.reclaimed == 1
        assert torch.equal(total, mp_helpers.expected_total(2, pushes, n))


OWNER = textwrap.dedent("""
    import sys, time, torch
    from pyasgd.core.region import SharedRegion
    r = SharedRegion.create(1000, 4)
    print(r.name, flush=True)
    if sys.argv[1] == "raise":
        raise RuntimeError("boom")
    if sys.argv[1] == "sleep":
        time.sleep(600)
""")


def run_owner(mode):
    return subprocess.Popen([sys.executable, "-c", OWNER, mode], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("mode", [pytest.param("return", marks=pytest.mark.slow), "raise"])
def test_owner_exit_removes_segment(mode):
    p = run_owner(mode)
    out, err = p.communicate(timeout=60)
    name = out.split()[0]
    assert (p.returncode != 0) == (mode == "raise"), err
    assert name not in shm_names()


@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)])
def test_owner_signal_removes_segment(sig):
    p = run_owner("sleep")
    name = p.stdout.readline().strip()
    assert name in shm_names()
    p.send_signal(sig)
    p.communicate(timeout=60)
    assert p.returncode != 0
    assert name not in shm_names()


def test_owner_sigkill_segment_swept_by_next_create():
    p = run_owner("sleep")
    name = p.stdout.readline().strip()
    p.kill()
    p.communicate(timeout=60)
    assert name in shm_names()  # SIGKILL cannot be handled...
    with SharedRegion.create(10, 1):
        assert name not in shm_names()  # ...so the next creation sweeps it (owner pid is dead)


def test_full_ring_times_out_with_clear_error():
    with SharedRegion.create(8, 1) as region:
        region.push(torch.ones(8), version=0)
        assert region.slot_state(0) == READY
        t0 = time.monotonic()
        with pytest.raises(RegionTimeoutError, match="free gradient slot"):
            region.push(torch.ones(8), version=0, timeout=0.3)
        assert 0.25 < time.monotonic() - t0 < 5
        region.release(region.collect(1, timeout=5))  # the one ready gradient
        with pytest.raises(RegionTimeoutError, match="gradients from the workers"):
            region.collect(1, timeout=0.2)


def test_shutdown_wakes_a_waiting_server():
    with SharedRegion.create(8, 2) as region:
        errors = []

        def wait():
            try:
                region.collect(1, timeout=30)
            except RegionClosedError as e:
                errors.append(e)

        t = threading.Thread(target=wait)
        t.start()
        time.sleep(0.2)
        region.shutdown()
        t.join(5)
        assert not t.is_alive() and errors


def test_pull_returns_published_version_and_an_update_publishes():
    n = 1001
    with SharedRegion.create(n, 4) as region:
        init = torch.randn(n)
        v0 = region.publish(init)
        dst = torch.empty(n)
        assert region.pull(dst) == v0 and torch.equal(dst, init)
        for w in range(3):
            region.push(torch.full((n,), float(w + 1)), version=v0, tokens=10, worker=w)
        batch = region.collect(3)
        assert batch.staleness == [0, 0, 0] and batch.workers == [0, 1, 2]
        master, m, v = init.clone(), torch.zeros(n), torch.zeros(n)
        assert server_step(region, batch, master, m, v, step=1, lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8)
        assert region.pull(dst) == v0 + 1 and torch.equal(dst, master)
        assert all(region.slot_state(k) != READY for k in range(4))
        # a stale gradient: computed at v0, applied on v0 + 1
        region.push(torch.ones(n), version=v0, worker=0)
        assert region.collect(1).staleness == [1]


def test_update_with_non_finite_gradient_publishes_nothing():
    n = 64
    with SharedRegion.create(n, 2) as region:
        v0 = region.publish(torch.ones(n))
        g = torch.ones(n)
        g[5] = float("nan")
        region.push(g, version=v0)
        batch = region.collect(1)
        master, m, v = torch.ones(n), torch.zeros(n), torch.zeros(n)
        assert not server_step(region, batch, master, m, v, step=1, lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8)
        assert region.version == v0 and torch.equal(master, torch.ones(n))
        region.push(torch.ones(n), version=v0)  # slot was released
        dst = torch.empty(n)
        assert region.pull(dst) == v0 and torch.equal(dst, torch.ones(n))


@pytest.mark.slow
@pytest.mark.parametrize("G", [1, 3])
def test_bf16_slots_carry_rounded_gradients_and_the_update_is_the_fp32_one_on_them(G):
    """Real pushers round into bf16 slots (measuring the bound on the way); the server updates
    from the front buffer into the back one, and gets, bit for bit, the fp32 master-copy update
    on [g.to(bfloat16).float()] in arrival order."""
    workers, pushes, n = 3, 8, 100_003
    with SharedRegion.create(n, default_slots(workers, G), grad_dtype=torch.bfloat16) as region:
        assert region.grad_dtype == torch.bfloat16
        assert all(b.dtype == torch.bfloat16 and b.data_ptr() % 64 == 0 for b in region.slot_buffers)
        p = torch.randn(n)
        v0 = region.publish(p)
        m, v = torch.zeros(n), torch.zeros(n)
        ref = [p.clone(), torch.zeros(n), torch.zeros(n)]  # the master-copy path, on widened fp32
        oracle = [p.clone(), torch.zeros(n), torch.zeros(n)]  # pure PyTorch
        procs = [CTX.Process(target=mp_helpers.seeded_writer, args=(region.name, w, pushes, n))
                 for w in range(workers)]
        for proc in procs:
            proc.start()
        done, step = 0, 0
        try:
            while done < workers * pushes:
                batch = region.collect(min(G, workers * pushes - done), timeout=120)
                want = [mp_helpers.seeded_grad(w, i, n).to(torch.bfloat16)
                        for w, i in zip(batch.workers, batch.positions)]
                for got, exp, bound in zip(batch.grads, want, batch.bounds):
                    assert torch.equal(got.view(torch.int16), exp.view(torch.int16))  # nearest even, bit for bit
                    assert bound == float(exp.float().abs().max())  # of the rounded values
                assert bounds_verdict(batch.bounds, len(want)) is True  # they prove the sum finite
                total, expected = torch.zeros(n), torch.zeros(n)
                for got, exp in zip(batch.grads, want):
                    total += got.float()
                    expected += exp.float()
                assert torch.equal(total, expected)
                step += 1
                adam = dict(step=step, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8)
                assert server_step_in_region(region, batch, m, v, **adam)
                assert fused_adam_step(*ref, [w.float() for w in want], **adam)  # in place, two passes
                assert adam_step_reference(*oracle, [w.float() for w in want], **adam)
                front = region.front()
                assert torch.equal(front, ref[0]) and torch.equal(m, ref[1]) and torch.equal(v, ref[2])
                torch.testing.assert_close(front, oracle[0], rtol=1e-5, atol=1e-6)  # within fp32 rounding
                done += len(batch.slots)
        finally:
            for proc in procs:
                proc.join(60)
        assert [proc.exitcode for proc in procs] == [0] * workers
        assert region.version == v0 + step
        dst = torch.empty(n)
        assert region.pull(dst) == v0 + step and torch.equal(dst, ref[0])


@pytest.mark.parametrize("mode", ["async", "sync"])
@pytest.mark.parametrize("bad", [pytest.param(float("nan"), marks=pytest.mark.slow),
                                 pytest.param(float("-inf"), marks=pytest.mark.slow), 3.4e38],
                         ids=["nan", "-inf", "rounds-to-inf"])
def test_a_non_finite_gradient_in_a_bf16_slot_skips_the_update(mode, bad):
    """3.4e38 is finite in fp32 but rounds to inf in bf16: the pusher's bound says so, and the
    server's update (no master copy) is skipped, in sync mode still published unchanged."""
    from pyasgd.trainer.update import Updater

    n = 1000
    c = TrainConfig(task="synthetic", workers=2, mode=mode, quiet=True, max_updates=1)
    with SharedRegion.create(n, 3, grad_dtype=torch.bfloat16) as region:
        p = torch.randn(n)
        v0 = region.publish(p)
        good, poisoned = torch.randn(n), torch.randn(n)
        poisoned[n - 1] = bad  # in the kernels' scalar tail
        pusher = CTX.Process(target=mp_helpers.push_tensors, args=(region.name, [good, poisoned]))
        pusher.start()
        pusher.join(120)
        assert pusher.exitcode == 0
        batch = region.collect(2, timeout=10)
        assert batch.bounds[0] == float(good.to(torch.bfloat16).float().abs().max()) and batch.bounds[1] == math.inf
        assert bounds_verdict(batch.bounds, 2) is False
        up = Updater(c, region.front(), keep_master=False)
        front, back, res = region.front(), region.begin_update(), None
        try:
            res = up.apply(batch.grads, batch.staleness, out=back, bounds=batch.bounds, current=front)
        finally:
            region.end_update(batch, publish=res is not None and res.publish)
        assert not res.applied and up.skipped == 1 and up.step == 0
        assert torch.equal(up.exp_avg, torch.zeros(n))
        dst = torch.empty(n)
        assert region.pull(dst) == v0 + (mode == "sync") and torch.equal(dst, p)
        assert res.publish == (mode == "sync")
        assert all(region.slot_state(k) == 0 for k in range(3))  # released either way


def test_bf16_slots_halve_the_gradient_bytes_and_attach_checks_their_type():
    n, slots = 100_000, 3
    with SharedRegion.create(n, slots) as fp32, SharedRegion.create(n, slots, grad_dtype=torch.bfloat16) as bf16:
        page = lambda b: -(-b // 4096) * 4096  # every buffer starts on a page
        assert fp32._handle().size - bf16._handle().size == slots * (page(4 * n) - page(2 * n))
        assert mp_helpers.read_header(bf16.path, "layout_version") == 7
        assert mp_helpers.read_header(bf16.path, "grad_dtype") == 1
        again = SharedRegion.attach(bf16.name)
        assert again.grad_dtype == torch.bfloat16 and again.slot_buffers[0].numel() == n
        again.close()
        mp_helpers.poke_header(bf16.path, "grad_dtype", 0)  # says fp32 for a segment laid out for bf16
        with pytest.raises(ValueError, match=r"grad_dtype = 0 need \d+ bytes but the segment has"):
            SharedRegion.attach(bf16.name)
    with pytest.raises(ValueError, match="grad_dtype must be torch.float32 or torch.bfloat16"):
        SharedRegion.create(10, 1, grad_dtype=torch.float16)


@pytest.mark.parametrize("bad,exc,msg", [
    (lambda: torch.zeros(9), ValueError, "9 elements"),
    (lambda: torch.zeros(10, dtype=torch.float64), TypeError, "float32"),
    (lambda: torch.zeros(20)[::2], ValueError, "contiguous"),
    (lambda: [0.0] * 10, TypeError, "torch.Tensor"),
])
def test_bad_tensors_are_rejected_before_writing(bad, exc, msg):
    with SharedRegion.create(10, 2) as region:
        with pytest.raises(exc, match=msg):
            region.push(bad(), version=0)
        with pytest.raises(exc, match=msg):
            region.pull(bad())
        assert [region.slot_state(k) for k in range(2)] == [0, 0]  # nothing claimed
        with pytest.raises(ValueError, match="G must be between"):
            region.collect(3)


def test_attach_missing_or_foreign_segment():
    with pytest.raises(ValueError, match="no shared region named"):
        SharedRegion.attach("pyasgd-does-not-exist")
    path = f"/dev/shm/pyasgd-foreign-{os.getpid()}"
    with open(path, "wb") as f:
        f.write(b"not ours" * 4096)
    try:
        with pytest.raises(ValueError, match="not a pyasgd shared region"):
            SharedRegion.attach(os.path.basename(path))
    finally:
        os.unlink(path)


def test_segment_is_private_and_named():
    with SharedRegion.create(4, 1) as region:
        st = os.stat(f"/dev/shm/{region.name}")
        assert region.name.startswith("pyasgd-")
        assert st.st_mode & 0o777 == 0o600


@pytest.mark.cuda
def test_cuda_push_and_pull_through_pinned_region():
    n = 1_000_003
    with SharedRegion.create(n, 2, pin=True) as region:
        init = torch.randn(n, device="cuda")
        v = region.publish(init.cpu())
        dst = torch.empty(n, device="cuda")
        assert region.pull(dst) == v and torch.equal(dst, init)
        g = torch.randn(n, device="cuda")
        region.push(g, version=v, tokens=3)
        batch = region.collect(1)
        assert torch.equal(batch.grads[0], g.cpu())
        # the CUDA fused update reads the pinned slot directly and writes the back buffer
        master, m, vv = init.clone(), torch.zeros_like(init), torch.zeros_like(init)
        ref = [init.clone(), torch.zeros_like(init), torch.zeros_like(init)]
        from pyasgd.core.fused import adam_step_reference
        adam_step_reference(*ref, [g], step=1, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8)
        assert server_step(region, batch, master, m, vv, step=1, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8)
        assert ((master - ref[0]).abs().max() / ref[0].abs().max()).item() < 1e-6
        assert region.pull(dst) == v + 1 and torch.equal(dst, master)


@pytest.mark.cuda
@pytest.mark.parametrize("offset", [0, 1])  # 16-byte aligned source, and not
def test_cuda_push_copies_exactly_measures_the_bound_and_never_leaks_a_slot(monkeypatch, offset):
    import math

    from pyasgd.core import region as exchange

    n = 1_000_003
    with SharedRegion.create(n, 2, pin=True) as region:
        g = torch.randn(n + offset, device="cuda")[offset:]
        region.push(g, version=0)
        batch = region.collect(1)
        assert torch.equal(batch.grads[0], g.cpu())
        assert batch.bounds[0] == float(g.abs().max())  # a max is exact
        region.release(batch)
        g[n - 1] = float("nan")  # in the scalar tail
        region.push(g, version=0)
        batch = region.collect(1)
        assert batch.bounds[0] == math.inf
        region.release(batch)

        def boom(*args):
            raise RuntimeError("copy failed")

        monkeypatch.setattr(exchange._C, "cuda_copy_absmax", boom)
        with pytest.raises(RuntimeError, match="copy failed"):
            region.push(g, version=0)
        assert [region.slot_state(k) for k in range(2)] == [0, 0]  # the claim was given back


@pytest.mark.cuda
def test_cuda_push_into_bf16_slots_rounds_to_nearest_even_and_bounds_the_rounded_values(monkeypatch):
    """Both GPU pushes into a bf16 region, the fused kernel and torch's fallback, store what
    g.to(bfloat16) holds and bound it (3.4e38, finite in fp32, rounds to inf and says so)."""
    from pyasgd.core import region as exchange

    n = 1_000_003
    g = torch.randn(n, device="cuda") * 1e3
    with SharedRegion.create(n, 2, pin=True, grad_dtype=torch.bfloat16) as region:
        for fused in (True, False):
            if not fused:  # the push torch does where pyasgd's CUDA part is missing
                monkeypatch.setattr(exchange._ext, "cuda_built", lambda: False)
            region.push(g, version=0)
            batch = region.collect(1)
            want = g.to(torch.bfloat16).cpu()
            assert torch.equal(batch.grads[0].view(torch.int16), want.view(torch.int16)), fused
            assert batch.bounds[0] == float(want.float().abs().max()), fused
            region.release(batch)
            big = g.clone()
            big[n - 1] = 3.4e38
            region.push(big, version=0)
            batch = region.collect(1)
            assert batch.bounds[0] == math.inf, fused
            region.release(batch)
        monkeypatch.undo()  # the region unregisters its pinned memory the way it registered it
