"""The benchmark tools under bench/ that run without a GPU."""

from __future__ import annotations

from helpers import run_script


def test_memory_at_peak_finds_the_peak_and_who_allocated_it(tmp_path):
    """bench/memory_at_peak.py on a snapshot in torch.cuda.memory._snapshot()'s layout (recording needs a GPU)."""
    import pickle

    def alloc(addr, mib, name):
        return {"action": "alloc", "addr": addr, "size": mib << 20,
                "frames": [{"filename": "??", "line": 0, "name": "torch::unwind()"},
                           {"filename": "/site-packages/torch/nn/modules/module.py", "line": 1, "name": "_call_impl"},
                           {"filename": "/work/train_qlora_flux.py", "line": 7, "name": name}]}

    trace = [alloc(1, 100, "checkpoint_inputs"), alloc(2, 300, "dequantize"),
             {"action": "free_completed", "addr": 2, "size": 300 << 20}, alloc(3, 50, "dequantize")]
    # At the dump: 1 GiB allocated before the recording (weights) + the 150 MiB still held by the trace.
    segments = [{"blocks": [{"size": 1 << 30, "state": "active_allocated"}, {"size": 150 << 20,
                                                                          "state": "active_allocated"}]}]
    path = tmp_path / "snapshot.pickle"
    path.write_bytes(pickle.dumps({"segments": segments, "device_traces": [trace]}))
    out = run_script("bench/memory_at_peak.py", path, "--depth", "1").stdout
    assert "peak: 1.391 GiB = 1.000 GiB allocated before the recording + 0.391 GiB from 2 allocations" in out
    assert "reached by a 300.0 MiB allocation at train_qlora_flux.py:7 dequantize" in out
    assert "0.293 GiB      1 x  train_qlora_flux.py:7 dequantize" in out


