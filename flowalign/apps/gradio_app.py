"""``flowalign gradio``: a local web app comparing the base model with RL guidance at a chosen scale.

Prompt, seed, steps, CFG and an RLG-scale slider; the base image (w = 0) and the aligned image
(``out = out_ref + w (out_theta - out_ref)``, see ``flowalign.rlg``) are drawn from the same seed and
shown side by side. Binds 127.0.0.1 unless ``--host`` is given. Defaults: the shipped pipeline and the
adapter ``flowalign demo`` trains (``demo_out/lora``), or with ``--config RECIPE`` the recipe's model, LoRA
(``train.out_dir/lora``), evaluation steps and CFG. Needs ``pip install "flowalign[app]"``.
"""

from __future__ import annotations

import threading
import time
from typing import Optional

import torch

from ..config import DEFAULT_MODEL
from ..models import pipeline_call_kwargs
from ..rlg import enable_rlg
from .sample import DEFAULT_LORA, check_lora_dir, load_rlg_pipeline

DISPLAY_SIZE = 256  # small toy images are upscaled (nearest) for display


def _gradio():
    try:
        import gradio as gr
    except ImportError:
        raise ImportError('the web app needs gradio: pip install "flowalign[app]" (or pip install gradio)') from None
    return gr


class RLGApp:
    """The pipeline with the LoRA loaded, and one ``generate`` call per click (serialised by a lock)."""

    def __init__(self, model: str = DEFAULT_MODEL, lora_dir: str = DEFAULT_LORA, device: Optional[str] = None,
                 dtype: str = "float32"):
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

    def _image(self, prompt: str, seed: int, steps: int, cfg: float):
        out = self.pipe(prompt=[prompt], num_inference_steps=steps, guidance_scale=cfg,
                        generator=torch.Generator().manual_seed(seed), output_type="pil",
                        **pipeline_call_kwargs(self.pipe))
        img = out.images[0]
        if max(img.size) < DISPLAY_SIZE:
            k = DISPLAY_SIZE // max(img.size)
            img = img.resize((img.width * k, img.height * k), resample=0)  # 0 = nearest
        return img

    def generate(self, prompt: str, seed, steps, cfg, scale):
        """-> (base image, aligned image, one-line summary)."""
        prompt = (prompt or "").strip()
        if not prompt:
            raise _gradio().Error("enter a prompt")
        seed, steps, cfg, scale = int(seed or 0), int(steps), float(cfg), float(scale)
        t0 = time.time()
        with self.lock:
            enable_rlg(self.pipe, 0.0)
            base = self._image(prompt, seed, steps, cfg)
            enable_rlg(self.pipe, scale)
            aligned = self._image(prompt, seed, steps, cfg)
        info = (f"RLG w={scale:g} | {steps} steps | CFG {cfg:g} | seed {seed} | {time.time() - t0:.1f} s | "
                f"prompt: {prompt}")
        return base, aligned, info


def build_ui(app: RLGApp, default_prompt: str = "two red circles", default_steps: int = 20,
             default_cfg: float = 4.5):
    """The gradio Blocks (not launched); the sliders start at ``default_steps`` / ``default_cfg``."""
    gr = _gradio()
    with gr.Blocks(title="flowalign: RL guidance") as ui:
        gr.Markdown(
            "## RL guidance\n"
            "`out = out_ref + w (out_theta - out_ref)`: w = 0 is the base model, w = 1 the fine-tuned adapter, "
            f"w > 1 stronger alignment.  \nModel `{app.model}`, adapter `{app.lora_dir}`."
        )
        prompt = gr.Textbox(label="prompt", value=default_prompt, elem_id="prompt")
        with gr.Row():
            seed = gr.Number(label="seed", value=0, precision=0, elem_id="seed")
            steps = gr.Slider(1, 50, value=default_steps, step=1, label="steps", elem_id="steps")
            cfg = gr.Slider(1.0, 10.0, value=default_cfg, step=0.5, label="CFG scale", elem_id="cfg")
            scale = gr.Slider(-1.0, 3.0, value=1.0, step=0.1, label="RLG scale w", elem_id="rlg_scale")
        button = gr.Button("Generate", variant="primary", elem_id="generate")
        with gr.Row():
            base = gr.Image(label="base (w = 0)", type="pil", format="png", elem_id="base_image")
            aligned = gr.Image(label="aligned (RLG scale w)", type="pil", format="png", elem_id="aligned_image")
        info = gr.Textbox(label="run", interactive=False, elem_id="info")
        button.click(app.generate, [prompt, seed, steps, cfg, scale], [base, aligned, info])
    return ui


def launch(model: str = DEFAULT_MODEL, lora_dir: str = DEFAULT_LORA, host: str = "127.0.0.1",
           port: Optional[int] = None, block: bool = True, default_steps: int = 20, device: Optional[str] = None,
           dtype: str = "float32", default_cfg: float = 4.5):
    """Load the pipeline and serve the app on host:port (gradio's default port when None).

    block=False returns the running Blocks (``.close()`` stops it)."""
    _gradio()  # the install hint before the (slow) pipeline load
    ui = build_ui(RLGApp(model, lora_dir, device=device, dtype=dtype), default_steps=default_steps,
                  default_cfg=default_cfg)
    ui.queue(default_concurrency_limit=1)
    ui.launch(server_name=host, server_port=port, share=False, inbrowser=False, prevent_thread_lock=not block,
              quiet=not block)
    return ui
