"""The drift flag in training: a reward that pays for dark pixels raises it, the toy reward at its recipe's lr does
not; both on the shipped pipeline (its white backgrounds are what the planted hack greys out).

Both outcomes hold with a margin (the hack moves the bright-pixel share by about 3-4 base standard deviations by the
last iterations, past the 2 the flag needs; the clean run stays under 1.5 sd, 0.98 at most on an AMD EPYC), so
float differences between CPUs and package versions do not flip them.
"""


from flowalign.config import load_config
from flowalign.rewards import Reward
from flowalign.trainer import Trainer


class Darkness(Reward):
    """Planted hack: pays for dark pixels, 1 - mean luma."""

    name = "darkness"

    def score(self, images, prompts, metadata=None):
        luma = 0.299 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2]
        return 1 - luma.mean(dim=(1, 2))


def _trainer(tmp_path, lr, reward=None):
    cfg = load_config("configs/toy_grpo.yaml", [
        f"train.lr={lr}", "train.prompts_per_iter=4", "train.group_size=4", "train.minibatch=16",
        f"train.out_dir={tmp_path}", "grpo.clip_range=0.2", "sampling.num_steps=6", "sampling.sde_window=[0,3]",
        "diagnostics.features=none"])
    return Trainer(cfg, reward=reward)


def test_a_reward_that_pays_for_dark_pixels_raises_the_drift_flag(tmp_path):
    trainer = _trainer(tmp_path, 3e-2, Darkness())
    history = trainer.train(8, progress=False)
    # The flag needs the statistic to move AND the batch reward to be up on the base's; the last batch's reward is
    # noisy (one venv here ended at 0.096 after 0.111, flag down for that batch while bright_fraction stayed
    # flagged at -3.4 sd), so the test asks for the flag during the run, not at one fixed iteration.
    raised = [m for m in history if m["drift"] == 1]
    assert raised and all("bright_fraction" in m["drift_stats"].split(",") for m in raised)
    assert all(m["drift_z/bright_fraction"] < -2.0 for m in raised)  # the white backgrounds turned grey
    assert "bright_fraction" in history[-1]["drift_stats"].split(",")  # and they stay grey to the end
    assert history[0]["drift"] == 0  # not before the policy moved
    monitor = trainer.hacking.monitor
    assert monitor.base_units == 8  # two base batches of 4 prompt groups, rolled out before training


def test_the_toy_reward_at_its_recipe_lr_does_not(tmp_path):
    history = _trainer(tmp_path, 5e-4).train(8, progress=False)
    assert all(m["drift"] == 0 for m in history)
    assert all(abs(v) < 1.5 for m in history for k, v in m.items() if k.startswith("drift_z/"))
    assert "stat/extra_objects" in history[-1]  # the toy reward's own diagnostics feed the same flag
