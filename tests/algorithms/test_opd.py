"""DiffusionOPD (docs/math.md §3): per-step losses on Gaussian steps, and multi-teacher re-scoring on a tiny SD3."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from flowalign import lora
from flowalign.algorithms.fdistill import transition_log_ratio
from flowalign.algorithms.opd import Teacher, opd_rescore_loss, opd_step_loss, teacher_for_task
from flowalign.samplers import GaussianStep, flow_cps_step, flow_ode_step, flow_sde_step


def _velocities(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 2, 4, 4, generator=g)
    v_s = torch.randn(3, 2, 4, 4, generator=g).requires_grad_(True)
    v_t = torch.randn(3, 2, 4, 4, generator=g)
    return g, x, v_s, v_t


@pytest.mark.parametrize("scaling", ["exact", "reference"])
def test_ode_loss_is_mean_matching_of_velocities(scaling):
    _, x, v_s, v_t = _velocities()
    sigma, sigma_next = torch.tensor([0.9, 0.5, 0.2]), torch.tensor([0.7, 0.45, 0.0])
    loss = opd_step_loss(flow_ode_step(v_s, x, sigma, sigma_next), flow_ode_step(v_t, x, sigma, sigma_next),
                         scaling=scaling)
    delta = (sigma - sigma_next).reshape(3, 1, 1, 1)
    expected = (delta**2 / 2 * (v_s - v_t) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("kind", ["sde", "cps", "ode"])
def test_zero_loss_and_zero_gradient_when_student_is_teacher(kind):
    g, x, v_s, _ = _velocities(1)
    fn = {"sde": flow_sde_step, "cps": flow_cps_step}.get(kind)
    if fn is None:
        student, teacher = flow_ode_step(v_s, x, 0.8, 0.6), flow_ode_step(v_s.detach(), x, 0.8, 0.6)
    else:
        student = fn(v_s, x, 0.8, 0.6, 0.7, generator=g)
        teacher = fn(v_s.detach().clone(), x, 0.8, 0.6, 0.7, prev_sample=student.prev_sample.detach())
    loss = opd_step_loss(student, teacher)
    assert loss.abs().max() == 0
    loss.sum().backward()
    assert v_s.grad.abs().max() == 0


def test_kl_modes_match_the_step_object():
    g, x, v_s, v_t = _velocities(2)
    student = flow_sde_step(v_s, x, 0.8, 0.6, 0.7, generator=g)
    teacher = flow_sde_step(v_t, x, 0.8, 0.6, 0.7, prev_sample=student.prev_sample)
    torch.testing.assert_close(opd_step_loss(student, teacher), student.kl(teacher))
    torch.testing.assert_close(opd_step_loss(student, teacher, reduction="sum"), student.kl(teacher, "sum"))
    # reference: mean_d (mu_S - mu_T)^2 / (2 s_t^2), s_t = a sqrt(t / (1 - t)) without sqrt(Delta)
    s_t2 = 0.7**2 * 0.8 / 0.2
    ref = ((student.mean - teacher.mean) ** 2).flatten(1).mean(1) / (2 * s_t2)
    torch.testing.assert_close(opd_step_loss(student, teacher, scaling="reference"), ref)
    # the per-step KL of docs/math.md §1 in velocities: (Delta/2) (1/s_t + s_t (1-t)/(2t))^2 |v_S - v_T|^2
    s_t, t, dt = s_t2**0.5, 0.8, 0.2
    vel = dt / 2 * (1 / s_t + s_t * (1 - t) / (2 * t)) ** 2 * ((v_s - v_t) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(opd_step_loss(student, teacher), vel, rtol=1e-4, atol=1e-6)


def test_f_divergence_weighting_hook():
    g, x, v_s, v_t = _velocities(3)
    student = flow_sde_step(v_s, x, 0.8, 0.6, 0.7, generator=g)
    teacher = flow_sde_step(v_t * 0.05 + v_s.detach(), x, 0.8, 0.6, 0.7, prev_sample=student.prev_sample)
    plain = opd_step_loss(student, teacher)
    torch.testing.assert_close(opd_step_loss(student, teacher, divergence="reverse_kl"), plain)
    r = transition_log_ratio(student, teacher).detach().double().exp()
    h = (r / (r + 1)).float()
    torch.testing.assert_close(opd_step_loss(student, teacher, divergence="js"), plain * h / h.mean())
    with pytest.raises(ValueError, match="deterministic"):
        opd_step_loss(flow_ode_step(v_s, x, 0.8, 0.6), flow_ode_step(v_t, x, 0.8, 0.6), divergence="js")


def test_teacher_table():
    assert teacher_for_task("geneval") == Teacher("geneval", 1.0)
    assert teacher_for_task("a", {"a": ("lora_a", 3)}) == Teacher("lora_a", 3.0)
    with pytest.raises(KeyError, match="no teacher"):
        teacher_for_task("pickscore")


@pytest.fixture(scope="module")
def sd3_with_teachers():
    from flowalign.models import adapter_for
    from flowalign.toy.pipelines import tiny_sd3_pipeline

    adapter = adapter_for(tiny_sd3_pipeline(image_size=16), max_sequence_length=16)
    gen = torch.Generator().manual_seed(0)
    params = {}
    for name, trainable in [("t_ocr", False), ("t_gen", False), ("default", True)]:
        params[name] = lora.add_lora(adapter, rank=2, adapter_name=name, trainable=trainable)
        with torch.no_grad():
            for p in params[name]:
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return adapter, params


@pytest.mark.parametrize("sampler,cfg", [("flow_ode", 2.0), ("flow_sde", 1.0)])
def test_multi_teacher_rescoring(sd3_with_teachers, sampler, cfg):
    from flowalign.rollout import rescore, rollout

    adapter, params = sd3_with_teachers
    assert lora.active_adapter(adapter) == "default"
    prompts = ["a red circle", "two blue squares", "a sign says hi"]
    tasks = ["ocr", "geneval", "ocr"]
    teachers = {"ocr": Teacher("t_ocr", 4.5), "geneval": Teacher("t_gen", 1.0)}
    traj = rollout(adapter, prompts, num_steps=3, guidance_scale=cfg, sampler=sampler,
                   generator=torch.Generator().manual_seed(1))
    for p in adapter.denoiser.parameters():
        p.grad = None
    out = opd_rescore_loss(adapter, traj, tasks, teachers, steps=[1])
    assert lora.active_adapter(adapter) == "default"
    # manual: each row's teacher with its own CFG (a rollout at CFG 1 recorded no uncond: OPD re-encodes)
    with torch.no_grad():
        student = rescore(adapter, traj, 1)
        expected = []
        for i, task in enumerate(tasks):
            t = teachers[task]
            with lora.using_adapter(adapter, t.adapter_name):
                cond = adapter.encode_prompts([prompts[i]], t.guidance_scale)
                tstep = rescore(adapter, traj, 1, index=[i], guidance_scale=t.guidance_scale, cond=cond)
            row = type(student)(student.prev_sample[i:i + 1], student.mean[i:i + 1], student.std[i:i + 1],
                                None if student.dt is None else student.dt[i:i + 1])
            expected.append(opd_step_loss(row, tstep))
    expected = torch.cat(expected)
    torch.testing.assert_close(out.per_sample, expected, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(out.loss.detach(), expected.mean(), rtol=1e-4, atol=1e-7)
    if sampler == "flow_ode":
        delta = float(traj.sigmas[1] - traj.sigmas[2])
        assert out.per_sample.min() > 0 and delta > 0
    out.loss.backward()
    assert sum(float(p.grad.abs().sum()) for p in params["default"] if p.grad is not None) > 0
    for name in ("t_ocr", "t_gen"):
        assert all(p.grad is None for p in params[name])
    with pytest.raises(ValueError, match="task ids"):
        opd_rescore_loss(adapter, traj, ["ocr"], teachers)


# ---- ExOPD (G-OPD, arXiv 2602.12125): reward extrapolation -------------------------------------------------


def test_extrapolated_target_mean_and_lambda_one():
    from flowalign.algorithms.opd import extrapolated_step

    g, x, v_r, v_t = _velocities(0)
    t = flow_sde_step(v_t, x, 0.8, 0.6, 0.7, generator=g)
    r = flow_sde_step(v_r.detach(), x, 0.8, 0.6, 0.7, prev_sample=t.prev_sample)
    for lam in (0.5, 1.25, 1.5, 2.0):
        ext = extrapolated_step(t, r, lam)
        # mu* = mu_ref + lambda (mu_T - mu_ref): the optimum of pi_ref (pi_T / pi_ref)^lambda for a shared std
        torch.testing.assert_close(ext.mean, r.mean + lam * (t.mean - r.mean))
        assert torch.equal(ext.std, t.std) and torch.equal(ext.prev_sample, t.prev_sample)
    assert torch.equal(extrapolated_step(t, r, 1.0).mean, t.mean)  # lambda = 1: the teacher itself
    assert torch.equal(extrapolated_step(t, t, 1.7).mean, t.mean)  # a teacher equal to the reference: no push
    with pytest.raises(ValueError, match="extrapolation"):
        extrapolated_step(t, r, float("nan"))


def test_extrapolated_target_is_the_density_optimum():
    """For one Gaussian step, pi_ref (pi_T / pi_ref)^lambda renormalised is the Gaussian of mean mu*: its
    log-density minus that of N(mu*, std^2) is constant in x' (checked at random x')."""
    from flowalign.algorithms.opd import extrapolated_step

    g = torch.Generator().manual_seed(3)
    mu_t, mu_r, std, lam = torch.randn(4, generator=g), torch.randn(4, generator=g), 0.3, 1.5
    xs = torch.randn(16, 4, generator=g)
    logp = lambda x, mu: -((x - mu) ** 2).sum(-1) / (2 * std ** 2)  # noqa: E731
    target = logp(xs, mu_r) + lam * (logp(xs, mu_t) - logp(xs, mu_r))
    one = lambda mu: GaussianStep(mu[None], mu[None], torch.full((1, 1), std))  # noqa: E731
    mu_star = extrapolated_step(one(mu_t), one(mu_r), lam).mean[0]
    diff = target - logp(xs, mu_star)
    torch.testing.assert_close(diff, diff[:1].expand_as(diff), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("sampler", ["flow_ode", "flow_sde"])
def test_exopd_loss_on_rescored_steps(sd3_with_teachers, sampler):
    from flowalign.rollout import rescore, rollout

    adapter, _ = sd3_with_teachers
    prompts, tasks = ["a red circle", "two blue squares"], ["ocr", "geneval"]
    teachers = {"ocr": Teacher("t_ocr", 2.0), "geneval": Teacher("t_gen", 1.0)}
    traj = rollout(adapter, prompts, num_steps=3, guidance_scale=1.0, sampler=sampler,
                   generator=torch.Generator().manual_seed(2))
    plain = opd_rescore_loss(adapter, traj, tasks, teachers, steps=[1])
    same = opd_rescore_loss(adapter, traj, tasks, teachers, steps=[1], extrapolation=1.0)
    assert torch.equal(plain.per_sample, same.per_sample)  # lambda = 1 is today's OPD, bit for bit
    ext = opd_rescore_loss(adapter, traj, tasks, teachers, steps=[1], extrapolation=1.5)
    with torch.no_grad():  # manual: the base (adapters off) at the teacher's CFG, extrapolated by 1.5
        student = rescore(adapter, traj, 1)
        expected = []
        for i, task in enumerate(tasks):
            t = teachers[task]
            cond = adapter.encode_prompts([prompts[i]], t.guidance_scale)
            with lora.using_adapter(adapter, t.adapter_name):
                mu_t = rescore(adapter, traj, 1, index=[i], guidance_scale=t.guidance_scale, cond=cond)
            with lora.adapter_disabled(adapter):
                mu_r = rescore(adapter, traj, 1, index=[i], guidance_scale=t.guidance_scale, cond=cond)
            row = type(student)(student.prev_sample[i:i + 1], student.mean[i:i + 1], student.std[i:i + 1],
                                None if student.dt is None else student.dt[i:i + 1])
            target = type(mu_t)(mu_t.prev_sample, mu_r.mean + 1.5 * (mu_t.mean - mu_r.mean), mu_t.std, mu_t.dt)
            expected.append(opd_step_loss(row, target))
    torch.testing.assert_close(ext.per_sample, torch.cat(expected), rtol=1e-4, atol=1e-7)
    assert (ext.per_sample - plain.per_sample).abs().max() > 1e-6
