"""WanPipeline (Wan2.1, Wan2.2 T2V A14B two experts, Wan2.2-TI2V-5B text-to-video; Wan, arXiv 2503.20314):
rectified flow on video latents [B, C, F', h, w], UMT5 text encoder, two-pass CFG (batched here). Frames decode
to [B, F, 3, H, W].

Wan2.2 A14B: two experts of one architecture. At timestep t (scheduler units) the pipeline runs ``transformer``
(high noise) when ``t >= boundary_ratio * num_train_timesteps``, else ``transformer_2`` (low noise), with CFG scale
``guidance_scale`` resp. ``guidance_scale_2`` (None: ``guidance_scale``); whether CFG runs at all depends on
``guidance_scale > 1`` only (WanPipeline.__call__)."""

from __future__ import annotations

from typing import Optional

import torch

from .base import FlowAdapter

LORA_EXPERTS = ("both", "high", "low")


class WanAdapter(FlowAdapter):
    """Wan adapter. Embeddings: ``encoder_hidden_states`` [B, L, D]. The grid is that of the pipeline's
    scheduler (a UniPC scheduler's flow sigmas are used as an Euler grid by our samplers).

    Two-expert pipelines (``transformer_2`` and ``boundary_ratio`` set): each row of a denoiser call goes to the
    expert of its timestep (re-scoring may mix steps in one batch: the rows are split by expert).

    Args:
        guidance_scale_2: CFG scale at the low-noise expert's steps (None: the policy's guidance scale, as
            ``WanPipeline(guidance_scale_2=None)``).
        lora_experts: which experts get the LoRA: "both" | "high" (``transformer``) | "low" (``transformer_2``).
    """

    family = "wan"
    pipeline_class = "WanPipeline"
    lora_target_modules = ("to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2")  # attention, FFN
    fsdp_blocks = ("blocks",)
    video = True

    def __init__(self, pipe, negative_prompt: str = "", max_sequence_length: int = 512,
                 guidance_scale_2: Optional[float] = None, lora_experts: str = "both"):
        super().__init__(pipe, negative_prompt, max_sequence_length)
        ratio = pipe.config.get("boundary_ratio", None)
        two = getattr(pipe, "transformer_2", None) is not None
        if ratio is not None and not two:
            raise ValueError(f"{type(pipe).__name__} has boundary_ratio={ratio} but no transformer_2: load the "
                             "low-noise expert, or set boundary_ratio=None to use one expert")
        # one expert when boundary_ratio is None: the pipeline never calls transformer_2 then
        self.boundary_timestep = None if ratio is None else float(ratio) * pipe.scheduler.config.num_train_timesteps
        if lora_experts not in LORA_EXPERTS:
            raise ValueError(f"lora_experts must be one of {', '.join(LORA_EXPERTS)}, got {lora_experts!r}")
        if not self.two_experts and (guidance_scale_2 is not None or lora_experts == "low"):
            what = "guidance_scale_2" if guidance_scale_2 is not None else "lora_experts='low'"
            raise ValueError(f"{what} needs a two-expert Wan2.2 pipeline (transformer_2 and boundary_ratio); this "
                             "one has one expert: drop the option")
        self.guidance_scale_2 = None if guidance_scale_2 is None else float(guidance_scale_2)
        self.lora_experts = lora_experts
        self._low_rows: Optional[torch.Tensor] = None  # [B] bool during predict: rows at low-noise steps

    # ---- experts ------------------------------------------------------------------------------
    @property
    def two_experts(self) -> bool:
        return self.boundary_timestep is not None

    @property
    def denoiser_names(self) -> tuple:
        """Pipeline attributes of the experts, high-noise first."""
        return ("transformer", "transformer_2") if self.two_experts else ("transformer",)

    @property
    def denoisers(self) -> tuple:
        """The experts (``denoiser`` = the first); LoRA helpers, RLG and the reference act on all of them."""
        return tuple(getattr(self.pipe, n) for n in self.denoiser_names)

    @property
    def lora_denoisers(self) -> tuple:
        """The experts ``lora.add_lora`` puts the LoRA on (``lora_experts``)."""
        if not self.two_experts or self.lora_experts == "both":
            return self.denoisers
        return (self.denoisers[0],) if self.lora_experts == "high" else (self.denoisers[1],)

    def low_noise(self, timestep: torch.Tensor) -> Optional[torch.Tensor]:
        """[B] bool: rows whose timestep is below the boundary (the pipeline's ``t >= boundary`` test negated,
        float32 timestep against the float boundary); None for one expert."""
        if not self.two_experts:
            return None
        return ~(timestep >= self.boundary_timestep)

    # ---- prompts ------------------------------------------------------------------------------
    def _encode(self, prompts):
        pe, _ = self.pipe.encode_prompt(prompt=prompts, do_classifier_free_guidance=False, num_videos_per_prompt=1,
                                        max_sequence_length=self.max_sequence_length, device=self.device)
        return {"encoder_hidden_states": pe}

    # ---- prediction ---------------------------------------------------------------------------
    def call_kwargs(self, guidance_scale, height=None, width=None):
        kw = super().call_kwargs(guidance_scale, height, width)
        return {**kw, "guidance_scale_2": self.guidance_scale_2} if self.two_experts else kw

    def predict(self, x, timestep, cond, guidance_scale: float = 1.0):
        """As :meth:`PipelineAdapter.predict`; rows at low-noise steps combine CFG with ``guidance_scale_2``."""
        b = x.shape[0]
        t = torch.as_tensor(timestep, device=x.device)
        t = t.expand(b) if t.dim() == 0 else t
        self._low_rows = self.low_noise(t)
        try:
            return super().predict(x, t, cond, guidance_scale)
        finally:
            self._low_rows = None

    def _cfg_scale(self, guidance_scale):
        low = self._low_rows
        if low is None or not bool(low.any()):
            return guidance_scale
        g2 = guidance_scale if self.guidance_scale_2 is None else self.guidance_scale_2
        if bool(low.all()):
            return g2
        g = torch.where(low, torch.tensor(g2), torch.tensor(float(guidance_scale))).to(torch.float32)
        return g.view(-1, 1, 1, 1, 1)

    def _forward(self, x, timestep, emb, guidance_scale):
        low = self.low_noise(timestep)
        if low is None or not bool(low.any()):
            return self._expert_forward(self.denoiser, x, timestep, emb)
        if bool(low.all()):
            return self._expert_forward(self.denoisers[1], x, timestep, emb)
        out = None
        for rows, den in ((~low, self.denoisers[0]), (low, self.denoisers[1])):
            idx = rows.nonzero().flatten()
            o = self._expert_forward(den, x[idx], timestep[idx], {k: v[idx] for k, v in emb.items()})
            out = o.new_empty((x.shape[0], *o.shape[1:])) if out is None else out
            out[idx] = o
        return out

    def _expert_forward(self, den, x, timestep, emb):
        """One expert's call on x [b, C, F', h, w] at timestep [b] -> velocity [b, C, F', h, w]."""
        dt = self.dtype  # the pipeline casts every input to transformer.dtype
        t = timestep
        if self.pipe.config.get("expand_timesteps", False):  # Wan2.2-5B: one timestep per latent patch
            f, h, w = x.shape[2:]
            t = timestep[:, None].expand(x.shape[0], f * (h // 2) * (w // 2))
        return den(hidden_states=x.to(dt), timestep=t, encoder_hidden_states=emb["encoder_hidden_states"].to(dt),
                   return_dict=False)[0]

    def _noise_dtype(self):
        return torch.float32  # WanPipeline draws its noise in float32

    def latent_shape(self, batch_size, height, width, num_frames=None):
        pipe = self.pipe
        height, width, num_frames = height or 480, width or 832, num_frames or 81
        st, ss = pipe.vae_scale_factor_temporal, pipe.vae_scale_factor_spatial
        if num_frames % st != 1:
            raise ValueError(f"num_frames - 1 must be divisible by {st}, got {num_frames}")
        return (batch_size, self._latent_channels(), (num_frames - 1) // st + 1, height // ss, width // ss)

    def _latent_channels(self) -> int:
        return self.denoiser.config.in_channels

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, C, F', h, w] -> frames [B, F, 3, H, W] in [0, 1]."""
        vae = self.pipe.vae
        z = latents.float()
        mean = torch.tensor(vae.config.latents_mean, device=z.device).view(1, -1, 1, 1, 1)
        std = torch.tensor(vae.config.latents_std, device=z.device).view(1, -1, 1, 1, 1)
        video = self._vae_decode(z * std + mean)  # [B, 3, F, H, W]
        return video.permute(0, 2, 1, 3, 4)
