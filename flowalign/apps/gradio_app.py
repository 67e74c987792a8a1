"""``flowalign gradio``: a local web app comparing the base model with RL guidance at a chosen scale.

Prompt, seed, steps, CFG and an RLG-scale slider; the base image (w = 0) and the aligned image
(``out = out_ref + w (out_theta - out_ref)``, see ``flowalign.rlg``) are drawn from the same seed and
shown side by side. Next to the RLG slider, one Flow-NRG slider per available differentiable reward (weight 0 =
off; ``v <- v - sum_j w_j grad R_j(decode(x0_hat))``, see ``flowalign.nrg``) guides the aligned image; the
rewards are ``nrg_rewards`` (name -> build options; default: clip_score on the shipped tiny CLIP), and one that
cannot be built here (weights not found, not differentiable) gets no slider, with a note. Binds 127.0.0.1
unless ``--host`` is given. Defaults: the shipped pipeline and the adapter ``flowalign demo`` trains
(``demo_out/lora``), or with ``--config RECIPE`` the recipe's model, LoRA (``train.out_dir/lora``), evaluation steps
and CFG. Needs ``pip install "flowalign[app]"``.
"""

from __future__ import annotations

import threading
import time
from typing import Optional

import torch

from ..config import DEFAULT_MODEL
from ..models import pipeline_call_kwargs
from ..nrg import disable_nrg, enable_nrg, resolve_rewards
from ..rlg import enable_rlg
from .sample import DEFAULT_LORA, check_lora_dir, load_rlg_pipeline

DISPLAY_SIZE = 256  # small toy images are upscaled (nearest) for display
DEFAULT_NRG_REWARDS = {"clip_score": {"model": "tiny"}}  # the shipped toy-world CLIP: available offline
NRG_MAX_WEIGHT = 200.0  # slider range [0, NRG_MAX_WEIGHT] (clip_score gradients on the toy pipeline are small)


def _gradio():
    try:
        import gradio as gr
    except ImportError:
        raise ImportError('the web app needs gradio: pip install "flowalign[app]" (or pip install gradio)') from None
    return gr


class RLGApp:
    """The pipeline with the LoRA loaded, and one ``generate`` call per click (serialised by a lock)."""

    def __init__(self, model: str = DEFAULT_MODEL, lora_dir: str = DEFAULT_LORA, device: Optional[str] = None,
                 dtype: str = "float32", nrg_rewards: Optional[dict] = None):
        try:
            check_lora_dir(lora_dir)
        except FileNotFoundError as err:
            if lora_dir == DEFAULT_LORA:
                raise FileNotFoundError(f"no aligned adapter at {lora_dir!r}: run `flowalign demo` first "
                                        "(it writes demo_out/lora) or pass --lora DIR") from None
            raise err
        self.model, self.lora_dir = model, lora_dir
        self.pipe = load_rlg_pipeline(model, lora_dir, device=device, dtype=dtype)
        self.lock = threading.Lock()
        self.nrg_rewards, self.nrg_notes = self._build_nrg(DEFAULT_NRG_REWARDS if nrg_rewards is None else nrg_rewards)

    @staticmethod
    def _build_nrg(candidates: dict) -> tuple[dict, list[str]]:
        """{name: Reward} of the candidates that build here, and one note per one that does not."""
        built, notes = {}, []
        for name, options in candidates.items():
            try:
                built[name] = resolve_rewards({name: 0.0}, {name: dict(options or {})})[0].reward
            except (ValueError, FileNotFoundError, ImportError, OSError) as err:
                notes.append(f"no NRG slider for {name}: {err}")
        return built, notes

    @property
    def nrg_names(self) -> list[str]:
        return list(self.nrg_rewards)

    def _image(self, prompt: str, seed: int, steps: int, cfg: float):
        out = self.pipe(prompt=[prompt], num_inference_steps=steps, guidance_scale=cfg,
                        generator=torch.Generator().manual_seed(seed), output_type="pil",
                        **pipeline_call_kwargs(self.pipe))
        img = out.images[0]
        if max(img.size) < DISPLAY_SIZE:
            k = DISPLAY_SIZE // max(img.size)
            img = img.resize((img.width * k, img.height * k), resample=0)  # 0 = nearest
        return img

    def generate(self, prompt: str, seed, steps, cfg, scale, *nrg_weights):
        """-> (base image, aligned image, one-line summary). ``nrg_weights``: one per ``nrg_names`` (0 = off);
        the base image has neither RLG nor NRG, the aligned one both."""
        prompt = (prompt or "").strip()
        if not prompt:
            raise _gradio().Error("enter a prompt")
        seed, steps, cfg, scale = int(seed or 0), int(steps), float(cfg), float(scale)
        weights = {n: float(w or 0.0) for n, w in zip(self.nrg_names, nrg_weights)}
        on = {n: w for n, w in weights.items() if w != 0}
        t0 = time.time()
        with self.lock:
            disable_nrg(self.pipe)
            enable_rlg(self.pipe, 0.0)
            base = self._image(prompt, seed, steps, cfg)
            enable_rlg(self.pipe, scale)
            if on:  # after enable_rlg: NRG guides the RLG-mixed output
                enable_nrg(self.pipe, [(self.nrg_rewards[n], w) for n, w in on.items()])
            try:
                aligned = self._image(prompt, seed, steps, cfg)
            finally:
                disable_nrg(self.pipe)
        nrg = " | NRG " + " ".join(f"{n}={w:g}" for n, w in on.items()) if on else ""
        info = (f"RLG w={scale:g}{nrg} | {steps} steps | CFG {cfg:g} | seed {seed} | {time.time() - t0:.1f} s | "
                f"prompt: {prompt}")
        return base, aligned, info


def build_ui(app: RLGApp, default_prompt: str = "two red circles", default_steps: int = 20,
             default_cfg: float = 4.5):
    """The gradio Blocks (not launched); the sliders start at ``default_steps`` / ``default_cfg``."""
    gr = _gradio()
    names = list(getattr(app, "nrg_names", []))
    notes = list(getattr(app, "nrg_notes", []))
    with gr.Blocks(title="flowalign: RL guidance") as ui:
        gr.Markdown(
            "## RL guidance\n"
            "`out = out_ref + w (out_theta - out_ref)`: w = 0 is the base model, w = 1 the fine-tuned adapter, "
            f"w > 1 stronger alignment.  \nModel `{app.model}`, adapter `{app.lora_dir}`."
            + ("  \nFlow-NRG: `v <- v - sum_j w_j grad R_j(decode(x0_hat))` on the aligned image, a weight per "
               "reward (0 = off)." if names else "")
            + "".join(f"  \n_{n}_" for n in notes)
        )
        prompt = gr.Textbox(label="prompt", value=default_prompt, elem_id="prompt")
        with gr.Row():
            seed = gr.Number(label="seed", value=0, precision=0, elem_id="seed")
            steps = gr.Slider(1, 50, value=default_steps, step=1, label="steps", elem_id="steps")
            cfg = gr.Slider(1.0, 10.0, value=default_cfg, step=0.5, label="CFG scale", elem_id="cfg")
            scale = gr.Slider(-1.0, 3.0, value=1.0, step=0.1, label="RLG scale w", elem_id="rlg_scale")
            nrg = [gr.Slider(0.0, NRG_MAX_WEIGHT, value=0.0, step=1.0, label=f"NRG weight: {n}", elem_id=f"nrg_{n}")
                   for n in names]
        button = gr.Button("Generate", variant="primary", elem_id="generate")
        with gr.Row():
            base = gr.Image(label="base (w = 0)", type="pil", format="png", elem_id="base_image")
            aligned = gr.Image(label="aligned (RLG scale w)", type="pil", format="png", elem_id="aligned_image")
        info = gr.Textbox(label="run", interactive=False, elem_id="info")
        button.click(app.generate, [prompt, seed, steps, cfg, scale, *nrg], [base, aligned, info])
    return ui


def launch(model: str = DEFAULT_MODEL, lora_dir: str = DEFAULT_LORA, host: str = "127.0.0.1",
           port: Optional[int] = None, block: bool = True, default_steps: int = 20, device: Optional[str] = None,
           dtype: str = "float32", default_cfg: float = 4.5, nrg_rewards: Optional[dict] = None):
    """Load the pipeline and serve the app on host:port (gradio's default port when None).

    nrg_rewards: {reward name: build options} offered as Flow-NRG sliders (None: ``DEFAULT_NRG_REWARDS``).
    block=False returns the running Blocks (``.close()`` stops it)."""
    _gradio()  # the install hint before the (slow) pipeline load
    app = RLGApp(model, lora_dir, device=device, dtype=dtype, nrg_rewards=nrg_rewards)
    for note in app.nrg_notes:
        print(note)
    ui = build_ui(app, default_steps=default_steps, default_cfg=default_cfg)
    ui.queue(default_concurrency_limit=1)
    ui.launch(server_name=host, server_port=port, share=False, inbrowser=False, prevent_thread_lock=not block,
              quiet=not block)
    return ui
