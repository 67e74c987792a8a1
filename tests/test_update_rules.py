"""Every algorithm's update rule driven by the one trainer, on a tiny in-process SD3 pipeline: on-policy /
neutral values at step 0, snapshot decays, and OPD's per-prompt teachers."""

import numpy as np
import pytest
import torch

from flowalign import lora
from flowalign.algorithms.crd import OLD_SCHEDULE, SAMPLER_SCHEDULE, schedule_decay
from flowalign.algorithms.nft import old_model_decay
from flowalign.algorithms.opd import train_steps
from flowalign.config import Config, CRDConfig, NFTConfig, OPDConfig, SamplingConfig, TrainConfig
from flowalign.models import adapter_for
from flowalign.toy.pipelines import tiny_sd3_pipeline
from flowalign.rewards import Reward
from flowalign.algorithms import ALGORITHMS
from flowalign.trainer import GRPOTrainer, Trainer


class MeanPixel(Reward):
    name = "mean_pixel"

    def score(self, images, prompts, metadata=None):
        return images.mean(dim=(1, 2, 3))


def _cfg(tmp_path, algorithm, sampling=None, **sections):
    train = dict(prompts_per_iter=2, group_size=3, minibatch=6, lr=1e-2, out_dir=str(tmp_path), algorithm=algorithm)
    train.update(sections.pop("train", {}))
    return Config(sampling=sampling or SamplingConfig(num_steps=3, guidance_scale=1.0, sampler="flow_ode"),
                  train=TrainConfig(**train), **sections)


def _tiny():
    torch.manual_seed(0)
    return adapter_for(tiny_sd3_pipeline(image_size=16))


def _clone(params):
    return [p.detach().clone() for p in params]


def test_table_and_alias():
    assert set(ALGORITHMS) == {"grpo", "nft", "crd", "opd", "backprop", "dpo", "rwr"}
    for name in ALGORITHMS:  # the config's choices are the table's names
        assert TrainConfig(algorithm=name).algorithm == name
    with pytest.raises(ValueError, match="train.algorithm"):
        TrainConfig(algorithm="ppo")
    assert GRPOTrainer is Trainer
    assert Config().train.algorithm == "grpo"


def test_nft_step_neutral_at_start_old_model_decays_and_rolls_out(tmp_path):
    cfg = _cfg(tmp_path, "nft", nft=NFTConfig(num_timesteps=2))
    tr = Trainer(cfg, adapter=_tiny(), reward=MeanPixel())
    theta0 = _clone(tr.params)
    m = tr.step()
    # old == current before the first update: v+ = v- = v_old, so both halves of the loss agree
    assert m["pos_minus_neg_first"] == pytest.approx(0.0, abs=1e-6)
    assert m["update_samples"] == 6 and m["optimizer_steps"] == 1
    theta1 = _clone(tr.params)
    assert any(not torch.equal(a, b) for a, b in zip(theta0, theta1))
    d = old_model_decay(1, 0, 0.001, 0.5)
    assert m["old_decay"] == d
    for s, a, b in zip(tr.algorithm.old.tensors, theta0, theta1):
        torch.testing.assert_close(s, d * a + (1 - d) * b)
    # the rollout uses the old model and leaves the live weights untouched
    prompts = ["a red circle"] * 3
    tr.generator.manual_seed(5)
    traj = tr.algorithm.rollout(prompts)
    assert all(torch.equal(p, t) for p, t in zip(tr.params, theta1))
    with tr.algorithm.old.swapped_in():
        tr.generator.manual_seed(5)
        ref = tr.algorithm.__class__.__mro__[1].rollout(tr.algorithm, prompts)
    torch.testing.assert_close(traj.final, ref.final, rtol=0, atol=0)
    assert m["pos_minus_neg_first"] is not None and tr.step()["pos_minus_neg_first"] > 0


def test_nft_permutation_timesteps_give_each_sample_its_own_grid_steps(tmp_path):
    # timestep_sampling=permutation (the reference): every minibatch row trains int(N * fraction) distinct grid
    # steps of its own, each denoiser call of the update sees one timestep per row
    cfg = _cfg(tmp_path, "nft", nft=NFTConfig(timestep_sampling="permutation", timestep_fraction=0.67),
               sampling=SamplingConfig(num_steps=3, guidance_scale=1.0, sampler="flow_ode"))
    tr = Trainer(cfg, adapter=_tiny(), reward=MeanPixel())
    calls, predict = [], tr.adapter.predict

    def recording(x, timestep, cond, g=1.0):
        calls.append(torch.as_tensor(timestep).detach().clone())
        return predict(x, timestep, cond, g)

    tr.adapter.predict = recording
    tr._sample_prompts = lambda: (["a red circle"] * 3 + ["two blue squares"] * 3, [None] * 6, None)
    traj_steps = []
    rollout = tr.algorithm.rollout
    tr.algorithm.rollout = lambda prompts: traj_steps.append(len(calls)) or rollout(prompts)
    m = tr.step()
    update = calls[traj_steps[0] + 3:]  # after the 3 rollout calls
    grid = set(tr.adapter.sampling_grid(3, torch.zeros(1, 16, 2, 2)).timesteps.tolist())
    # 2 columns (int(3 * 0.67)), each with old, reference and current passes of the 6 rows
    assert len(update) == 2 * 3 and all(c.shape == (6,) for c in update)
    per_row = torch.stack(update[::3], dim=1)  # [6 rows, 2 columns]
    assert all(len(set(row.tolist())) == 2 and set(row.tolist()) <= grid for row in per_row)
    assert m["update_samples"] == 6 and m["optimizer_steps"] == 1


def test_crd_log_ratio_zero_at_start_and_snapshot_schedules(tmp_path):
    cfg = _cfg(tmp_path, "crd", crd=CRDConfig(num_timesteps=2, steps_per_iter=1, beta_kl=0.1, kl_guidance_scale=2.0))
    tr = Trainer(cfg, adapter=_tiny(), reward=MeanPixel())
    theta0 = _clone(tr.params)
    m = tr.step()
    assert m["onpolicy_logp_gap"] == 0.0  # old == current at s = 0: l = 0 exactly
    assert m["optimizer_steps"] == 1 and m["old_decay"] == schedule_decay(OLD_SCHEDULE, 1) == 0.255
    assert m["sampler_decay"] == schedule_decay(SAMPLER_SCHEDULE, 1) == 0.0
    theta1 = _clone(tr.params)
    d = schedule_decay(OLD_SCHEDULE, 1)
    for s, a, b in zip(tr.algorithm.old.tensors, theta0, theta1):
        torch.testing.assert_close(s, d * a + (1 - d) * b)
    for s, b in zip(tr.algorithm.sampler.tensors, theta1):
        assert torch.equal(s, b)  # hard copy while s < 75
    m2 = tr.step()
    assert m2["onpolicy_logp_gap"] > 0 and m2["old_decay"] == schedule_decay(OLD_SCHEDULE, 2)


def test_crd_two_optimizer_steps_per_iteration_whole_groups(tmp_path):
    cfg = _cfg(tmp_path, "crd", crd=CRDConfig(num_timesteps=1, steps_per_iter=2, beta_kl=0.0),
               train=dict(minibatch=4))  # 4 // 3 -> one whole group per micro-batch
    tr = Trainer(cfg, adapter=_tiny(), reward=MeanPixel())
    m = tr.step()
    assert m["optimizer_steps"] == 2 and m["update_samples"] == 6


def test_flow_ode_rollout_rows_differ_within_a_group(tmp_path):
    tr = Trainer(_cfg(tmp_path, "crd", crd=CRDConfig(num_timesteps=1, steps_per_iter=1)), adapter=_tiny(),
                 reward=MeanPixel())
    traj = tr.algorithm.rollout(["a red circle"] * 3)
    assert not torch.equal(traj.latents[0, 0], traj.latents[1, 0])


def _save_teacher(path, perturb: bool):
    ad = _tiny()
    params = lora.add_lora(ad, rank=4)
    if perturb:
        with torch.no_grad():
            for p in params:
                p.normal_(0, 0.3)
    return lora.save_lora(ad, str(path))


def test_opd_each_prompt_uses_its_tasks_teacher(tmp_path):
    same = _save_teacher(tmp_path / "same", perturb=False)   # LoRA B = 0: equals the untrained student
    other = _save_teacher(tmp_path / "other", perturb=True)
    opd = OPDConfig(teachers={"same": {"lora": same, "guidance_scale": 2.0, "prompts": "toy:colors"},
                              "other": {"lora": other, "guidance_scale": 1.0, "prompts": "toy:text"}})
    cfg = _cfg(tmp_path / "run", "opd", sampling=SamplingConfig(num_steps=3, guidance_scale=2.0, sampler="flow_ode"),
               opd=opd, train=dict(group_size=2))
    tr = Trainer(cfg, adapter=_tiny())
    assert set(lora.adapter_names(tr.adapter)) == {"default", "teacher_same", "teacher_other"}
    assert lora.active_adapter(tr.adapter) == "default"
    frozen = _clone(lora.lora_parameters(tr.adapter, "teacher_other"))
    prompts, tasks, _ = tr._sample_prompts()
    assert tasks == ["same"] * 4 + ["other"] * 4
    assert all(p.startswith("the text") for p, t in zip(prompts, tasks) if t == "other")
    assert not any(p.startswith("the text") for p, t in zip(prompts, tasks) if t == "same")
    m = tr.step()
    assert m["loss_same"] == 0.0  # same weights and same CFG as the student: zero distillation loss
    assert m["loss_other"] > 0 and m["reward_mean"] is None and m["update_samples"] == 8
    assert all(torch.equal(a, b) for a, b in zip(frozen, lora.lora_parameters(tr.adapter, "teacher_other")))
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in tr.params)


def test_exopd_loss_scales_by_lambda_squared_at_the_start(tmp_path):
    """Before the first update the student IS the base (LoRA B = 0), so mu_S = mu_ref and the ExOPD loss
    |mu_S - mu_ref - lambda (mu_T - mu_ref)|^2 / (2 std^2) is lambda^2 times plain OPD's, on the same rollout."""
    other = _save_teacher(tmp_path / "other", perturb=True)
    losses = {}
    for lam in (1.0, 1.5):
        opd = OPDConfig(teachers={"other": {"lora": other, "guidance_scale": 1.0, "prompts": "toy:colors"}},
                        extrapolation=lam)
        cfg = _cfg(tmp_path / f"run{lam}", "opd", opd=opd, train=dict(group_size=2),
                   sampling=SamplingConfig(num_steps=3, guidance_scale=1.0, sampler="flow_sde"))
        losses[lam] = Trainer(cfg, adapter=_tiny()).step()["per_step"]
    assert min(losses[1.0]) > 0
    np.testing.assert_allclose(losses[1.5], [2.25 * v for v in losses[1.0]], rtol=1e-4)


def test_opd_train_window():
    g = torch.Generator().manual_seed(0)
    assert train_steps(4, None, g) == [0, 1, 2, 3]
    starts = {train_steps(10, (0, 5, 3), g)[0] for _ in range(200)}
    assert starts == {0, 1, 2, 3}  # 3 consecutive steps inside 0..5


def test_grpo_trains_the_selected_steps_and_kl_reward_gives_per_step_advantages(tmp_path):
    from flowalign.algorithms.advantages import advantages_for
    from flowalign.config import GRPOConfig

    sde = SamplingConfig(num_steps=3, guidance_scale=1.0, sampler="flow_sde", noise_level=0.7)
    cfg = _cfg(tmp_path, "grpo", sampling=sde, grpo=GRPOConfig(clip_range=0.2, kl_reward=0.5, train_last_step=False,
                                                             timestep_selection="random", timestep_fraction=0.5))
    tr = Trainer(cfg, adapter=_tiny(), reward=MeanPixel())
    lora_params = tr.params
    with torch.no_grad():
        for p in lora_params:  # a LoRA away from the base, so the per-step KL to the reference is not 0
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    trained = []
    import flowalign.algorithms.grpo as grpo_module

    real = grpo_module.rescore

    def recording(adapter, traj, k, **kw):
        trained.append(k.clone() if isinstance(k, torch.Tensor) else k)
        return real(adapter, traj, k, **kw)

    grpo_module.rescore = recording
    seen = {}
    update = tr.algorithm.update

    def spy(traj, adv, valid, rewards=None, tasks=None):
        seen["traj"], seen["rewards"], seen["valid"] = traj, rewards, valid
        seen["step_adv"] = tr.algorithm._step_advantages(traj, adv, valid, rewards)
        return update(traj, adv, valid, rewards, tasks)

    tr.algorithm.update = spy
    try:
        m = tr.step()
    finally:
        grpo_module.rescore = real
    traj = seen["traj"]
    assert traj.stochastic.all() and torch.isfinite(traj.reference_kl).all()
    # the last step (2) is stochastic but never trained; one of the two others (int(2 x 0.5)) per row
    assert all(isinstance(k, torch.Tensor) and set(k.tolist()) <= {0, 1} for k in trained)
    for k in (0, 1, 2):
        expected = advantages_for(seen["rewards"] - 0.5 * traj.reference_kl[:, k], traj.prompts, cfg,
                                  valid=seen["valid"])
        torch.testing.assert_close(seen["step_adv"][:, k], expected)
    assert m["kl_reward_penalty"] > 0 and m["update_samples"] == 6


@pytest.mark.parametrize("old_model", ["snapshot", "reference"])
def test_crd_old_model_snapshot_or_reference(tmp_path, old_model):
    # Flow-Factory's use_old_for_loss=false: v_old is the adapter-disabled base. With a LoRA away from the base at
    # s = 0 the snapshot (a copy of the LoRA) gives l = 0 exactly, the reference does not.
    cfg = _cfg(tmp_path, "crd", crd=CRDConfig(num_timesteps=1, steps_per_iter=1, beta_kl=0.0, old_model=old_model))
    tr = Trainer(cfg, adapter=_tiny(), reward=MeanPixel())
    with torch.no_grad():
        for p in tr.params:
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(4)))
    tr.algorithm.old.update(0.0)
    tr.algorithm.sampler.update(0.0)
    m = tr.step()
    assert (m["onpolicy_logp_gap"] == 0.0) == (old_model == "snapshot")
