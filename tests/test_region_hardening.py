"""The shared region's hardening, checked with real processes: slot ownership races (forced with
the PYASGD_TEST_REGION_DELAY hook), memory reserved at create(), the lock-based stale sweep, header
validation and view lifetime, pulls that never go back, and the CPU thread pool under
set_threads() and fork().

Tests that plant odd files run in a private segment directory (PYASGD_SHM_DIR), never in
/dev/shm itself: a FIFO named pyasgd-* there hangs the create() of any older pyasgd running on
the machine, and a faked dead owner would let an older sweep delete a live segment."""
import json
import multiprocessing as mp
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest
import torch

import mp_helpers
from pyasgd.core.region import READING, WRITING, RegionTimeoutError, SharedRegion

CTX = mp.get_context("spawn")
TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)


def run_py(code, *args, timeout=120):
    """Runs `code` in a fresh interpreter (this checkout first on its path): a crash or a hang
    there is a failed test here, not a dead test runner."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, TESTS, os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env)


def popen_py(code, *args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, TESTS, os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def dead_pid():
    """A pid that was just used and is now free (what a pid from another PID namespace looks like)."""
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def stop(*procs):
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join(30)


@pytest.fixture
def shm_dir(monkeypatch):
    """A private segment directory on /dev/shm's tmpfs (not itself named pyasgd-*, so no sweep
    looks into it); every test must leave it empty."""
    d = tempfile.mkdtemp(prefix="region-test-", dir="/dev/shm")
    monkeypatch.setenv("PYASGD_SHM_DIR", d)
    yield d
    left = sorted(os.listdir(d))
    shutil.rmtree(d, ignore_errors=True)
    assert not left, f"test left files in its segment directory: {left}"


# --- 1. slot ownership: one word {state, generation, pid}, every transition a CAS ---------------

@pytest.mark.slow
def test_two_reclaimers_never_free_a_live_pushers_slot(shm_dir):
    """Reclaimer A sees slot 0 held by a dead pusher and is preempted before its CAS; reclaimer B
    frees the slot and a live pusher claims it. A's CAS must fail (the generation moved on):
    freeing the slot would let a second gradient into the live pusher's buffer."""
    with SharedRegion.create(16, 1) as region:
        v_attached, v_go, v_claimed = CTX.Event(), CTX.Event(), CTX.Event()
        v_go.set()
        victim = CTX.Process(target=mp_helpers.claimer, args=(region.name, v_attached, v_go, v_claimed, 99))
        live_attached, go, live_claimed, started = CTX.Event(), CTX.Event(), CTX.Event(), CTX.Event()
        live = CTX.Process(target=mp_helpers.claimer, args=(region.name, live_attached, go, live_claimed, 7))
        q = CTX.Queue()
        slow = CTX.Process(target=mp_helpers.slow_reclaimer, args=(region.name, started, q, 5000))
        try:
            victim.start()
            assert v_claimed.wait(120)
            os.kill(victim.pid, signal.SIGKILL)
            victim.join(30)
            live.start()
            assert live_attached.wait(120)
            slow.start()
            assert started.wait(120)
            time.sleep(1.5)  # A has seen the dead pusher's word and sleeps before its CAS
            assert region.reclaim_dead() == [(0, victim.pid, 99)]  # B
            go.set()
            assert live_claimed.wait(30)
            assert q.get(timeout=60) == []  # A's CAS failed
            assert region.slot_state(0) == WRITING  # still the live pusher's
            assert region.reclaimed == 1
        finally:
            stop(victim, live, slow)


@pytest.mark.slow
def test_a_claimer_preempted_after_its_cas_keeps_its_slot(shm_dir):
    """A pusher claims a slot last held by a dead pusher and is preempted right after its CAS.
    Its pid must be in the slot from that CAS on: a reclaimer that looks meanwhile must not see
    the dead pusher's pid and free a slot that is being written."""
    n = 16
    with SharedRegion.create(n, 1) as region:
        attached, go, claimed = CTX.Event(), CTX.Event(), CTX.Event()
        go.set()
        victim = CTX.Process(target=mp_helpers.claimer, args=(region.name, attached, go, claimed, 99))
        p_attached, p_go = CTX.Event(), CTX.Event()
        pusher = CTX.Process(target=mp_helpers.delayed_pusher, args=(region.name, p_attached, p_go, 5, 4000))
        try:
            victim.start()
            assert claimed.wait(120)
            os.kill(victim.pid, signal.SIGKILL)
            victim.join(30)
            assert region.reclaim_dead() == [(0, victim.pid, 99)]
            pusher.start()
            assert p_attached.wait(120)
            p_go.set()
            deadline = time.monotonic() + 60
            while region.slot_state(0) != WRITING:  # the pusher's CAS is done; it now sleeps
                assert time.monotonic() < deadline
                time.sleep(0.005)
            assert region.reclaim_dead() == []
            batch = region.collect(1, timeout=60)
            assert batch.workers == [5] and torch.equal(batch.grads[0], torch.full((n,), 5.0))
            region.release(batch)
            pusher.join(60)
            assert pusher.exitcode == 0
            assert region.reclaimed == 1
        finally:
            stop(victim, pusher)


def in_a_pid_namespace(name, mode, *args):
    """mp_helpers.pid_reuse_in_a_namespace as pid 1 of a new PID namespace (needs root: CI has it)."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare(1) to make a PID namespace and choose pids in it")
    code = f"import mp_helpers, sys; mp_helpers.pid_reuse_in_a_namespace({name!r}, {mode!r}, *map(int, sys.argv[1:]))"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, TESTS, os.environ.get("PYTHONPATH", "")]))
    # --kill-child: pid 1 of the namespace (and with it every process there) dies with unshare
    cmd = ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc", sys.executable, "-c", code, *map(str, args)]
    return subprocess.Popen(cmd,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_a_dead_pushers_slot_is_reclaimed_though_its_pid_lives_again(shm_dir):
    """Pid reuse must not leak a slot: a pusher claims a slot and is killed, and a new process
    gets its very pid. Asking kill(pid, 0) would call the dead pusher alive forever; its slot's
    lock, dropped by the kernel when it died, says it is gone."""
    with SharedRegion.create(16, 1) as region:
        p = in_a_pid_namespace(region.name, "reuse")
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        got = json.loads(out.strip().splitlines()[-1])
        assert got["again"] == got["victim"] and got["alive"], got  # the pid really was reused
        assert got["reclaimed"] == [[0, got["victim"], 41]], got
        assert region.slot_state(0) == 0 and region.reclaimed == 1  # FREE: the next pusher gets it


def test_a_live_pushers_slot_is_never_freed_though_its_pid_looks_dead(shm_dir):
    """Pid reuse (or a PID namespace) must not free a live slot: the pusher's pid, seen from the
    reclaimer, is one that does not exist there. Its lock is held, so the slot stays its own, and
    its commit goes through."""
    with SharedRegion.create(16, 1) as region:
        free = dead_pid()  # free here: the pusher gets this pid inside its namespace
        p = in_a_pid_namespace(region.name, "foreign", free)
        try:
            line = p.stdout.readline()
            assert line, p.stderr.read()
            assert json.loads(line)["claimed"] == free
            with pytest.raises(ProcessLookupError):
                os.kill(free, 0)  # seen from here the slot's pid is dead
            assert region.slot_state(0) == WRITING
            assert region.reclaim_dead() == []
            assert region.slot_state(0) == WRITING and region.reclaimed == 0
            p.stdin.write("commit\n")
            p.stdin.flush()
            assert json.loads(p.stdout.readline())["committed"] is True
            batch = region.collect(1, timeout=30)
            assert batch.workers == [41]
            region.release(batch)
        finally:
            p.kill()
            p.communicate(timeout=60)


CLAIM_THEN_FORK = """
    import os, sys, time
    from pyasgd.core.region import SharedRegion
    region = SharedRegion.attach(sys.argv[1])
    region._handle().claim(23, 30.0)
    child = os.fork()
    if child == 0:  # inherits every fd and the mapping, and outlives its parent
        time.sleep(120)
        os._exit(0)
    print(child, flush=True)
    time.sleep(120)
"""


def test_a_forked_child_does_not_keep_its_dead_parents_slot(shm_dir):
    """A pusher that forked (a data loader, say) and was killed mid-write: its child inherited its
    descriptors, but not its slot lock (the child closes the lock's fd at fork), so the slot is
    reclaimed while the child lives on."""
    with SharedRegion.create(16, 1) as region:
        p = popen_py(CLAIM_THEN_FORK, region.name)
        child = None
        try:
            child = int(p.stdout.readline())
            assert region.slot_state(0) == WRITING and region.reclaim_dead() == []
            p.kill()
            p.wait(30)
            os.kill(child, 0)  # still alive
            assert region.reclaim_dead() == [(0, p.pid, 23)]
        finally:
            if child:
                os.kill(child, signal.SIGKILL)  # first: it holds the pipes open too
            p.kill()
            p.communicate(timeout=30)


def test_a_second_commit_or_abandon_cannot_touch_a_slot_being_read(shm_dir):
    """A pusher that commits (or abandons) a slot it already committed must get an error, and
    the slot the server is reading must stay READING: not READY (read twice) nor FREE (overwritten
    while being summed)."""
    with SharedRegion.create(8, 2) as region:
        committed, collected, q = CTX.Event(), CTX.Event(), CTX.Queue()
        p = CTX.Process(target=mp_helpers.commit_twice, args=(region.name, committed, collected, q))
        p.start()
        try:
            assert committed.wait(120)
            batch = region.collect(1, timeout=30)
            collected.set()
            errors = q.get(timeout=60)
            p.join(60)
            assert p.exitcode == 0
            assert errors["commit"].startswith("RuntimeError") and "not held by this process" in errors["commit"]
            assert errors["abandon"].startswith("RuntimeError") and "not held by this process" in errors["abandon"]
            assert region.slot_state(batch.slots[0]) == READING
            region.release(batch)
            with pytest.raises(RegionTimeoutError):  # and no gradient came back to life
                region.collect(1, timeout=0.2)
        finally:
            stop(p)


# --- 2. memory reserved at create() ------------------------------------------------------------

FILL = """
    import sys
    from pyasgd.core.region import SharedRegion
    try:
        r = SharedRegion.create(int(sys.argv[1]), 2)
    except OSError as e:
        print("REFUSED:", type(e).__name__, e, flush=True)
        sys.exit(0)
    print("CREATED", flush=True)
    for t in r.params + r.slot_buffers:  # touches every page: SIGBUS where nothing was reserved
        t.fill_(1.0)
    print("FILLED", flush=True)
    r.close()
"""


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 1 MiB tmpfs standing for a too-small /dev/shm (Docker's is 64 MiB)."""
    mnt = tmp_path / "shm"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs (needs root or CAP_SYS_ADMIN): {r.stderr.strip()}")
    yield str(mnt)
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_too_small_shm_fails_at_create_with_the_numbers_and_leaves_nothing(small_tmpfs, monkeypatch):
    monkeypatch.setenv("PYASGD_SHM_DIR", small_tmpfs)
    r = run_py(FILL, 1_000_000)  # 4 buffers of 4 MB in 1 MiB
    assert r.returncode == 0, f"exit {r.returncode} (-7: SIGBUS)\n{r.stdout}{r.stderr}"
    assert r.stdout.startswith("REFUSED: RegionSpaceError"), r.stdout
    assert re.search(r"needs 15\.3 MiB .* has only \d+\.\d MiB free", r.stdout), r.stdout
    assert "--shm-size=" in r.stdout and "PYASGD_SHM_DIR" in r.stdout and "fewer parameters" in r.stdout
    assert os.listdir(small_tmpfs) == []  # the half-made segment is gone
    r = run_py(FILL, 1000)  # what fits is made there, reserved, and removed at close
    assert r.returncode == 0 and "FILLED" in r.stdout, r.stdout + r.stderr
    assert os.listdir(small_tmpfs) == []


def test_a_missing_shm_dir_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PYASGD_SHM_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(RuntimeError, match="nowhere does not exist.*PYASGD_SHM_DIR"):
        SharedRegion.create(4, 1)


# --- 3. the stale sweep: owner's lock, not pids; only our regular files ------------------------

OWNER = """
    import sys, time
    from pyasgd.core.region import SharedRegion
    r = SharedRegion.create(1000, 2)
    print(r.name, flush=True)
    time.sleep(600)
"""

CREATE = """
    from pyasgd.core.region import SharedRegion
    with SharedRegion.create(10, 1) as r:
        print(r.name, flush=True)
"""


def test_the_sweep_neither_hangs_on_nor_removes_a_fifo(shm_dir):
    fifo = os.path.join(shm_dir, "pyasgd-fifo-test")
    os.mkfifo(fifo, 0o600)
    try:
        r = run_py(CREATE, timeout=120)  # opening a FIFO for reading blocks until a writer comes
        assert r.returncode == 0, r.stderr
        assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    finally:
        os.unlink(fifo)


@pytest.mark.skipif(os.geteuid() != 0, reason="making a file another user owns needs root")
def test_the_sweep_leaves_other_users_files_and_foreign_files_alone(shm_dir):
    theirs = os.path.join(shm_dir, "pyasgd-1-theirs")
    mp_helpers.write_fake_segment(theirs, owner_pid=dead_pid())  # looks stale, but not ours
    os.chown(theirs, 65534, 65534)
    notes = os.path.join(shm_dir, "pyasgd-notes")  # ours, but not a region
    with open(notes, "wb") as f:
        f.write(b"not a region" * 1000)
    try:
        with SharedRegion.create(10, 1):
            assert os.path.exists(theirs) and os.path.exists(notes)
    finally:
        os.unlink(theirs)
        os.unlink(notes)


def test_a_sigkilled_owners_segment_is_swept_by_the_next_create(shm_dir):
    p = popen_py(OWNER)
    name = p.stdout.readline().strip()
    p.kill()
    p.communicate(timeout=60)
    assert name in os.listdir(shm_dir)  # SIGKILL cannot be handled...
    with SharedRegion.create(10, 1):
        assert name not in os.listdir(shm_dir)  # ...the kernel dropped its lock, so the sweep may


def test_a_live_owners_segment_survives_the_sweep_though_its_pid_looks_dead(shm_dir):
    """Seen from another PID namespace (containers sharing /dev/shm), a live owner's pid does not
    exist. The owner's lock, not its pid, must decide."""
    p = popen_py(OWNER)
    try:
        name = p.stdout.readline().strip()
        mp_helpers.poke_header(os.path.join(shm_dir, name), "owner_pid", dead_pid())
        with SharedRegion.create(10, 1):
            assert name in os.listdir(shm_dir)
        SharedRegion.attach(name).close()  # and it is still usable
    finally:
        p.terminate()  # its SIGTERM handler removes the segment
        p.communicate(timeout=60)
    assert name not in os.listdir(shm_dir)


OWNER_FORKS = """
    import os, time
    from pyasgd.core.region import SharedRegion
    r = SharedRegion.create(1000, 2)
    child = os.fork()
    if child == 0:  # inherits the mapping and the fd: must neither keep the lock nor own the region
        time.sleep(600)
        os._exit(0)
    print(r.name, child, flush=True)
    time.sleep(600)
"""


def test_a_dead_owners_segment_is_swept_though_its_fork_and_attachers_live(shm_dir):
    """Only the owner process keeps a segment alive: a worker that outlives the launcher does not
    (the name goes with the next create(); the worker keeps its mapping until it exits)."""
    p = popen_py(OWNER_FORKS)
    name, child = p.stdout.readline().split()
    attached = CTX.Event()
    worker = CTX.Process(target=mp_helpers.attach_and_sleep, args=(name, attached))
    try:
        worker.start()
        assert attached.wait(120)
        p.kill()
        p.wait(60)
        assert name in os.listdir(shm_dir)
        with SharedRegion.create(10, 1):
            assert name not in os.listdir(shm_dir)
    finally:
        os.kill(int(child), signal.SIGKILL)
        p.kill()
        p.communicate(timeout=60)  # the fork held the pipes open until now
        stop(worker)


# --- 4. attach checks the whole header; indices checked; views keep the mapping -------------------

CORRUPTIONS = [  # (field, value, what the error must name)
    ("slots", 1 << 40, "slots = 1099511627776 is outside 1..65536"),
    ("n", 1 << 62, "n = 4611686018427387904 and slots = 3 overflow"),
    ("n", 7, "n = 7, slots = 3 and grad_dtype = 0 need"),
    ("param_offset[1]", 1 << 40, "param_offset[1] = 1099511627776"),
    ("slot_meta_offset", 8, "slot_meta_offset = 8"),
    ("slot_stride", 4, "slot_stride = 4"),
    ("total_bytes", 1 << 20, "total_bytes = 1048576 but the segment has"),
    ("layout_version", 3, "its header has layout 3"),
    ("layout_version", 5, "its header has layout 5"),  # before the slots had a type
    ("grad_dtype", 7, "grad_dtype = 7 is not a gradient type"),
]

ATTACH_ALL = """
    import json, sys
    from pyasgd.core import ext as _ext
    out = {}
    for name in sys.argv[1:]:
        try:
            _ext.ext().Region.attach(name)
            out[name] = "attached"
        except Exception as e:
            out[name] = f"{type(e).__name__}: {e}"
    print(json.dumps(out))
"""


def test_attach_refuses_a_corrupted_header_naming_the_field(shm_dir):
    regions = [SharedRegion.create(10_000, 3) for _ in CORRUPTIONS]  # (n = 7 needs fewer pages)
    try:
        for r, (field, value, _) in zip(regions, CORRUPTIONS):
            mp_helpers.poke_header(os.path.join(shm_dir, r.name), field, value)
        res = run_py(ATTACH_ALL, *[r.name for r in regions])
        assert res.returncode == 0, res.stderr
        got = json.loads(res.stdout)
        for r, (field, _, says) in zip(regions, CORRUPTIONS):
            assert got[r.name].startswith("ValueError: "), (field, got[r.name])
            assert "not a pyasgd shared region" in got[r.name], (field, got[r.name])
            assert says in got[r.name], (field, got[r.name])
    finally:
        for r in regions:
            r.close()


OWN_LAYOUT = """
    import os, sys, torch
    sys.path.insert(0, sys.argv[1])
    import mp_helpers
    from pyasgd.core.region import SharedRegion
    with SharedRegion.create(1000, 2) as r:
        path = os.path.join(os.environ.get("PYASGD_SHM_DIR", "/dev/shm"), r.name)
        mp_helpers.poke_header(path, "slots", 1 << 40)  # a stray write into the shared header...
        mp_helpers.poke_header(path, "slot_meta_offset", 1 << 50)
        r.push(torch.full((1000,), 2.0), version=0)  # ...changes nothing for a region already open
        b = r.collect(1, timeout=5)
        assert b.slots == [0] or b.slots == [1]
        assert float(b.grads[0].sum()) == 2000.0
        r.release(b)
        print("OK", flush=True)
"""


def test_an_open_region_keeps_its_own_copy_of_the_layout(shm_dir):
    r = run_py(OWN_LAYOUT, TESTS)
    assert r.returncode == 0 and "OK" in r.stdout, f"exit {r.returncode}\n{r.stdout}{r.stderr}"


BOUNDS = """
    import json
    from pyasgd.core import ext as _ext
    _C = _ext.ext()
    r = _C.Region.create(8, 2)
    out = {}
    calls = {
        "slot_state": lambda: r.slot_state(2), "slot_state(-1)": lambda: r.slot_state(-1),
        "ack": lambda: r.ack([0, 5]), "release": lambda: r.release([2]),
        "abandon": lambda: r.abandon(7), "commit": lambda: r.commit(1 << 20, 0, 0, 0.0, 0.0),
        "wait_ack": lambda: r.wait_ack(_C.Ticket(), 0.01), "slot_offset": lambda: r.slot_offset(2),
        "param_offset": lambda: r.param_offset(2),
    }
    for what, call in calls.items():
        try:
            call()
            out[what] = "no error"
        except Exception as e:
            out[what] = f"{type(e).__name__}: {e}"
    print(json.dumps(out))
"""


def test_slot_indices_from_python_are_bounds_checked(shm_dir):
    r = run_py(BOUNDS)
    assert r.returncode == 0, f"exit {r.returncode} (a stray index wrote outside the ring?)\n{r.stderr}"
    got = json.loads(r.stdout)
    for what, text in got.items():
        assert text.startswith("ValueError: "), (what, text)
        assert "out of range (the region has 2 slots: 0..1)" in text or what == "param_offset", (what, text)
    assert "buffer 2 does not exist" in got["param_offset"]


VIEWS = """
    import gc, os, torch
    from pyasgd.core.region import SharedRegion
    n = 100_003
    owner = SharedRegion.create(n, 2)
    owner.publish(torch.full((n,), 3.0))
    owner.push(torch.full((n,), 7.0), version=1)
    batch = owner.collect(1)
    reader = SharedRegion.attach(owner.name)
    idx = next(i for i in (0, 1) if float(owner.params[i][0]) == 3.0)  # the published buffer
    p_attached, p_owner, g = reader.params[idx], owner.params[idx], batch.grads[0]
    path = os.path.join(os.environ.get("PYASGD_SHM_DIR", "/dev/shm"), owner.name)
    reader.close()
    owner.close()
    del reader, owner, batch
    gc.collect()
    assert not os.path.exists(path)  # the owner's close removed the name...
    print(float(p_attached.sum()), float(p_owner.min()), float(g.max()), flush=True)  # ...not the memory
"""


def test_tensors_outlive_the_region_object_that_gave_them(shm_dir):
    r = run_py(VIEWS)
    assert r.returncode == 0, f"exit {r.returncode} (-11: a view read unmapped memory)\n{r.stderr}"
    assert r.stdout.split() == [str(3.0 * 100_003), "3.0", "7.0"]


# --- 5. pulls: never a rewritten buffer under its old version, never backwards ------------------

@pytest.mark.parametrize("rewrite", [pytest.param("failed", marks=pytest.mark.slow), "published"])
def test_a_reader_never_returns_a_rewritten_buffer_under_its_old_version(shm_dir, rewrite):
    """The reader picks the published buffer (v2) and is preempted; meanwhile v3 is published in
    the other buffer and the server starts rewriting v2's buffer. A failed write (end_write(false))
    must not be copied as v2 (half-written data, and a version behind the published v3)."""
    n = 1000
    with SharedRegion.create(n, 1) as region:
        assert region.publish(torch.full((n,), 1.0)) == 1
        assert region.publish(torch.full((n,), 2.0)) == 2
        ready, q = CTX.Event(), CTX.Queue()
        reader = CTX.Process(target=mp_helpers.delayed_reader, args=(region.name, ready, q, 4000))
        reader.start()
        try:
            assert ready.wait(120)
            time.sleep(1.5)  # the reader has read `published` (v2) and sleeps
            assert region.publish(torch.full((n,), 3.0)) == 3
            back = region.begin_update()  # v2's buffer
            back[: n // 2].fill_(99.0)
            if rewrite == "failed":
                region.end_update(None, publish=False)
            else:
                back.fill_(4.0)
                assert region.end_update(None, publish=True) == 4
            got = q.get(timeout=60)
            reader.join(60)
            assert reader.exitcode == 0
        finally:
            stop(reader)
        want = 3 if rewrite == "failed" else 4
        assert got == (want, float(want), float(want))


def test_end_write_without_begin_write_is_refused(shm_dir):
    with SharedRegion.create(8, 1) as region:
        with pytest.raises(RuntimeError, match="without begin_write"):
            region._handle().end_write(True)
        assert region.version == 0


# --- 6. the CPU thread pool: set_threads() during run(), fork() during run() ---------------------

POOL_COMMON = """
    import os, sys, threading, time, torch
    torch.set_num_threads(1)  # only pyasgd's pool is under test
    from pyasgd import fused_adam_step
    from pyasgd.core import ext as _ext
    _C = _ext.ext()
    n = (1 << 21) + 3
    torch.manual_seed(0)
    p0, grads = torch.randn(n), [torch.randn(n), torch.randn(n)]

    def step():
        p, m, v = p0.clone(), torch.zeros(n), torch.zeros(n)
        assert fused_adam_step(p, m, v, grads, step=1, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8)
        return p, m, v

    def same(a, b):
        return all(torch.equal(x, y) for x, y in zip(a, b))

    ref = step()
"""

SET_THREADS_RACE = POOL_COMMON + """
    stop, bad, calls = threading.Event(), [], [0, 0]

    def kernels(i):
        while not stop.is_set():
            if not same(step(), ref):
                bad.append(i)
            calls[i] += 1

    threads = [threading.Thread(target=kernels, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    deadline, k = time.monotonic() + 5, 0
    while time.monotonic() < deadline:
        _C.cpu_set_num_threads(1 + k % 4)
        k += 1
        time.sleep(0.0005)
    stop.set()
    for t in threads:
        t.join()
    print("calls", calls, "set_threads", k, "bad", len(bad), flush=True)
    sys.exit(1 if bad or min(calls) == 0 else 0)
"""


@pytest.mark.slow
def test_set_threads_while_other_threads_run_kernels():
    r = run_py(SET_THREADS_RACE, timeout=240)
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout}{r.stderr}"


FORK_DURING_RUN = POOL_COMMON + """
    import signal
    stop = threading.Event()
    tiny = [torch.zeros(1) for _ in range(4)]

    def running():  # a run() in progress on the pool whenever the main thread forks
        while not stop.is_set():
            step()

    def rebuilding():  # the pool being replaced and rebuilt (its lock held) whenever it forks
        k = 0
        while not stop.is_set():
            _C.cpu_set_num_threads(8 + k % 2)  # many threads: a long rebuild under the lock
            k += 1
            fused_adam_step(*tiny[:3], [tiny[3]], step=1, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8)

    threads = [threading.Thread(target={"running": running, "rebuilding": rebuilding}[sys.argv[1]], daemon=True)]
    for t in threads:
        t.start()
    failed = []
    for i in range(100):
        time.sleep(0.002)
        pid = os.fork()
        if pid == 0:  # the child uses the pool (more than one thread) while the parent's is busy
            os._exit(0 if same(step(), ref) and _C.cpu_num_threads() >= 2 else 1)
        deadline = time.monotonic() + 30
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:  # hung: an inherited lock, or threads that are not there
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                status = "hung"
                break
            time.sleep(0.01)
        if status != 0:
            failed.append((i, status))
            break
    stop.set()
    for t in threads:
        t.join()
    print("failed", failed, flush=True)
    sys.exit(1 if failed else 0)
"""


@pytest.mark.slow
@pytest.mark.parametrize("background", ["running", "rebuilding"])
def test_fork_while_another_thread_uses_the_pool(background):
    """The child of a fork made while another thread is inside run(), or is rebuilding the pool
    after set_threads() (holding the pool's lock), gets a working pool of its own."""
    r = run_py(FORK_DURING_RUN, background, timeout=240)
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout}{r.stderr}"
