"""Training end to end on one GPU, each figure beside a baseline measured in the same run.
Skipped without a GPU. Run: bash benchmarks/gpu_check.sh (durations: PYASGD_GPU_E2E_S, PYASGD_GPU_BASE_S)

(1) The default job (tiny Transformer, bundled corpus, async G = N = 2) with workers and server on
    cuda:0, in fp32 and with --amp bf16, for PYASGD_GPU_E2E_S seconds of training each: best dev
    BLEU, words per second, time to dev BLEU 5 (the CPU default job reaches dev BLEU 8.6-9.2 in
    480 s on 2 cores: benchmarks/RESULTS.md).
(2) 4 worker processes sharing the GPU with the `base` Transformer, server on the GPU: words per
    second of sync and async + G = 4, and their staleness (the paper's 0 and 0.75).
"""
import os

import pytest
import torch

from pyasgd.core import ext as _ext
from pyasgd.config import TrainConfig
from pyasgd.trainer.launch import train

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and _ext.cuda_built()),
                                reason="needs a CUDA device and a CUDA build of pyasgd._C")
E2E_S = float(os.environ.get("PYASGD_GPU_E2E_S", "60"))
BASE_S = float(os.environ.get("PYASGD_GPU_BASE_S", "40"))
WPS: dict[str, float] = {}


@pytest.mark.parametrize("amp", ["none", "bf16"])
def test_default_job_on_the_gpu(report, tmp_path, amp):
    config = TrainConfig(devices="cuda:0", server_device="cuda:0", amp=amp, max_time=E2E_S, valid_every=100,
                         bleu_targets="5,8", quiet=True, out=str(tmp_path / "run"))
    s = train(config)
    assert s["updates"] > 50 and s["best_valid_bleu"] is not None  # it trained and validated
    WPS[f"default {amp}"] = s["wps"]
    base = WPS.get("default none")
    hit = s["time_to_bleu"]["5"]
    report(f"gpu default job amp={amp}", f"BLEU {s['best_valid_bleu']:.2f}",
           f"{s['wps']:,.0f} wps" + (f" ({s['wps'] / base:.2f}x fp32)" if amp != "none" and base else "")
           + f"; {s['updates']} updates in {s['wall_s']:.0f} s; BLEU 5 at "
           + (f"{hit['wall_s']:.0f} s" if hit else "never") + f"; test BLEU {s['test_bleu']}")


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_base_transformer_four_workers_on_one_gpu(report, tmp_path, mode):
    config = TrainConfig(mode=mode, workers=4, preset="base", batch_tokens=4000, devices="cuda:0",
                         server_device="cuda:0", max_time=BASE_S, valid_every=0, valid_sentences=50,
                         quiet=True, out=str(tmp_path / "run"))  # async: G = N = 4 by default
    s = train(config)
    assert s["updates"] > 5 and s["stopped_because"] == "max_time"
    WPS[f"base {mode}"] = s["wps"]
    base = WPS.get("base sync")
    expected = 0.0 if mode == "sync" else 0.75
    report(f"gpu base N=4 {mode} (G={s['global_accum']})", f"{s['wps']:,.0f} wps",
           (f"{s['wps'] / base:.2f}x sync; " if mode != "sync" and base else "")
           + f"staleness {s['avg_staleness']:.2f} (paper {expected}); {s['updates']} updates in {s['wall_s']:.0f} s")
