"""model.cuda_graphs (flowalign.runtime.cuda_graphs): gradient-free denoiser calls go through
torch.compile(mode="reduce-overhead"), calls with grad stay eager; replays see in-place weight updates; a CPU
denoiser or an FSDP run gets one line. The CUDA run itself is in tests/test_cuda_runs.py."""

import os

import pytest
import torch

from flowalign.cli import main
from flowalign.config import load_config
from flowalign.models import adapter_for
from flowalign.runtime.cuda_graphs import GRAPH_MODE, check_cuda_graphs, graph_no_grad_calls, training_route
from flowalign.toy.pipelines import tiny_sd3_pipeline
from flowalign.trainer import add_policy_lora

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Recorder:
    """A stand-in for torch.compile: records (mode, calls) and runs the function eagerly."""

    def __init__(self):
        self.calls = []

    def __call__(self, fn, mode=None):
        def compiled(*args, **kwargs):
            self.calls.append(mode)
            out = fn(*args, **kwargs)
            self.last = out
            return out

        return compiled


def test_no_grad_calls_take_the_graph_route_and_grad_calls_stay_eager(monkeypatch):
    steps = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: steps.append(1))
    net, rec = torch.nn.Linear(3, 3), Recorder()
    graph_no_grad_calls(net, compile_fn=rec)
    x = torch.randn(2, 3)
    y = net(x)  # grad enabled: the eager forward, nothing recorded
    assert rec.calls == [] and y.requires_grad
    with torch.no_grad():
        z = net(x)
    assert rec.calls == [GRAPH_MODE] and steps == [1]
    assert torch.equal(z, y.detach()) and z.data_ptr() != rec.last.data_ptr()  # a copy, not the replay's buffer
    graph_no_grad_calls(net, compile_fn=rec)  # routed already: unchanged
    assert net.eager_forward.__func__ is torch.nn.Linear.forward


def test_model_compile_with_cuda_graphs_compiles_the_training_calls_in_the_default_mode():
    net, rec = torch.nn.Linear(3, 3), Recorder()
    graph_no_grad_calls(net, compile_training=True, compile_fn=rec)
    net(torch.randn(2, 3)).sum().backward()
    assert rec.calls == [None] and net.weight.grad is not None


def test_outputs_in_tuples_are_cloned():
    class Two(torch.nn.Module):
        def forward(self, x):
            return (x * 2, "note")

    net, rec = Two(), Recorder()
    graph_no_grad_calls(net, compile_fn=rec)
    with torch.no_grad():
        out = net(torch.ones(2))
    assert out[1] == "note" and torch.equal(out[0], torch.full((2,), 2.0))
    assert out[0].data_ptr() != rec.last[0].data_ptr()


def test_inductor_reduce_overhead_reads_weights_updated_in_place():
    """Real torch.compile in the graph mode (on a CPU inductor compiles without recording graphs; the CUDA test runs
    the graphs). The optimizer updates the weights in place; the compiled call must see them, not constants."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))
    graph_no_grad_calls(net)
    x = torch.randn(4, 8)
    with torch.no_grad():
        before = net(x)
    eager = net.eager_forward(x)
    # inductor fuses and reorders float32 sums: equal up to rounding, not bit for bit
    torch.testing.assert_close(before, eager.detach(), rtol=1e-5, atol=1e-6)
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    net(x).pow(2).sum().backward()  # grad enabled: the eager route
    opt.step()
    with torch.no_grad():
        after, eager_after = net(x), net.eager_forward(x)
    assert (after - before).abs().max() > 1e-2  # the update moved the output ...
    torch.testing.assert_close(after, eager_after, rtol=1e-5, atol=1e-6)  # ... and the compiled call follows it


def test_refusals_are_one_line():
    with pytest.raises(ValueError, match="denoiser is on cpu: drop it"):
        check_cuda_graphs(torch.device("cpu"), sharded=False)
    with pytest.raises(ValueError, match="train.shard=fsdp"):
        check_cuda_graphs(torch.device("cuda"), sharded=True)


def test_cpu_run_with_cuda_graphs_refuses_before_adding_the_lora():
    adapter = adapter_for(tiny_sd3_pipeline(image_size=16))
    cfg = load_config(os.path.join(ROOT, "configs", "toy_grpo.yaml"), ["model.cuda_graphs=true"])
    with pytest.raises(ValueError, match="model.cuda_graphs"):
        add_policy_lora(cfg, adapter)
    assert not any("lora" in n for n, _ in adapter.denoiser.named_parameters())


def test_train_cli_says_it_in_one_line(tmp_path, tiny_pipe16, capsys):
    rc = main(["train", os.path.join(ROOT, "configs", "toy_grpo.yaml"), f"model.path={tiny_pipe16}",
               f"train.out_dir={tmp_path / 'run'}", "train.iterations=1", "model.cuda_graphs=true"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "model.cuda_graphs" in err, err


def test_training_route_sends_no_grad_calls_the_training_way_for_the_block():
    net, rec = torch.nn.Linear(3, 3), Recorder()
    graph_no_grad_calls(net, compile_fn=rec)
    with torch.no_grad():
        with training_route([net, torch.nn.Linear(2, 2)]):  # a module not routed is left alone
            net(torch.randn(1, 3))
        assert rec.calls == [] and net.replay_no_grad
        net(torch.randn(1, 3))
    assert rec.calls == [GRAPH_MODE]


def test_doctor_rescores_a_graphed_rollout_the_way_the_update_does():
    """The graphed route is made to differ from eager (its output + 1e-3): the doctor's gap must see it. Were its
    re-scoring (under no_grad) sent down the graphed route too, the gap would be exactly 0."""
    from flowalign.doctor.onpolicy import GapCase, rescore_gap, roll_out
    from flowalign.doctor.settings import PassSetting

    def shifted(fn, mode=None):
        if mode != GRAPH_MODE:
            return fn

        def call(*args, **kwargs):
            out = fn(*args, **kwargs)
            return (out[0] + 1e-3, *out[1:]) if isinstance(out, tuple) else out

        return call

    torch.manual_seed(0)
    adapter = adapter_for(tiny_sd3_pipeline(image_size=16))
    graph_no_grad_calls(adapter.denoiser, compile_fn=shifted)
    cfg = load_config(os.path.join(ROOT, "configs", "toy_grpo.yaml"),
                      ["sampling.num_steps=3", "sampling.sde_window=null", "train.group_size=2"])
    setting = PassSetting(torch.float32, 4)
    traj = roll_out(adapter, ["a red cube"] * 2 + ["two blue balls"] * 2, cfg, setting, seed=0)
    gap = rescore_gap(adapter, traj, GapCase("fp32: same batch 4", setting, setting, "dtype fp32", clip_range=0.2))
    assert gap.max_mean_gap > 1e-4 and gap.max_gap > 0
