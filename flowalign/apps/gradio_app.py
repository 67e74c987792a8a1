"""``flowalign gradio``: a local web app comparing the base model with RL guidance at a chosen scale.

Generate tab: prompt, seed, steps, CFG and an RLG-scale slider; the base image (w = 0) and the aligned image
(``out = out_ref + w (out_theta - out_ref)``, see ``flowalign.rlg``) are drawn from the same seed and shown side by
side. Next to the RLG slider, one Flow-NRG slider per available differentiable reward (weight 0 = off;
``v <- v - sum_j w_j grad R_j(decode(x0_hat))``, see ``flowalign.nrg``) guides the aligned image; the rewards are
``nrg_rewards`` (name -> build options; default: clip_score on the shipped tiny CLIP), and one that cannot be built
here (weights not found, not differentiable) gets no slider, with a note.

Adapters: a dropdown of every adapter found in the run folders given with ``--runs DIR [DIR ...]`` (``find_adapters``:
a run's final ``lora/`` and its ``ckpt-<iteration>/lora/``, newest first, labelled ``run/lora`` and ``run/ckpt-20``;
a folder of runs is searched one level down), after the one of ``--lora DIR``. Each is loaded once, as its own
peft adapter, when first picked; RLG then uses only the picked one. "Rescan" picks up checkpoints written since.

Under each image, when the prompt is one of the toy GenEval grammar ("a red circle", "two blue squares"), the toy
reward's verdict of the un-upscaled image (``verdict_text``): exact (every check, "no extra objects" included),
the lenient GenEval fraction, and each check passed (+) or failed (-).

Training curves tab: a run folder's ``metrics.jsonl`` and ``evals.jsonl`` plotted (``flowalign.apps.run_plots``), on
Refresh and every ``CURVES_EVERY_S`` seconds while the tab is open, so a run can be watched while it trains.

Binds 127.0.0.1 unless ``--host`` is given. Defaults: the shipped pipeline and the adapter ``flowalign demo`` trains
(``demo_out/lora``), or with ``--config RECIPE`` the recipe's model, LoRA (``train.out_dir/lora``), evaluation steps
and CFG. Needs ``pip install "flowalign[app]"``.
"""

from __future__ import annotations

import os
import re
import tempfile
import threading
import time
import warnings
from typing import Optional, Sequence

import torch

from ..config import DEFAULT_MODEL
from ..lora import load_lora_weights
from ..models import pipeline_call_kwargs
from ..nrg import disable_nrg, enable_nrg, resolve_rewards
from ..rlg import enable_rlg
from ..runtime.checkpoint import list_checkpoints
from .run_plots import curves_png
from .sample import DEFAULT_LORA, LORA_FILE, check_lora_dir, load_rlg_pipeline

DISPLAY_SIZE = 256  # small toy images are upscaled (nearest) for display
DEFAULT_NRG_REWARDS = {"clip_score": {"model": "tiny"}}  # the shipped toy-world CLIP: available offline
NRG_MAX_WEIGHT = 200.0  # slider range [0, NRG_MAX_WEIGHT] (clip_score gradients on the toy pipeline are small)
CURVES_EVERY_S = 5.0  # the curves tab re-plots this often while it is open
NO_VERDICT = "not a toy GenEval prompt: no verdict (try e.g. 'a red circle' or 'two blue squares')"
_CKPT = re.compile(r"ckpt-\d+")


def _gradio():
    try:
        import gradio as gr
    except ImportError:
        raise ImportError('the web app needs gradio: pip install "flowalign[app]" (or pip install gradio)') from None
    return gr


# --- adapters ---------------------------------------------------------------------------------------------------
def _holds_adapter(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, LORA_FILE))


def adapter_label(path: str) -> str:
    """``run/lora`` for ``.../run/lora``, ``run/ckpt-20`` for ``.../run/ckpt-20/lora``, else ``parent/name``."""
    path = os.path.abspath(path)
    parent, name = os.path.split(path)
    if name == "lora" and _CKPT.fullmatch(os.path.basename(parent)):
        return f"{os.path.basename(os.path.dirname(parent))}/{os.path.basename(parent)}"
    return f"{os.path.basename(parent)}/{name}"


def run_adapters(run_dir: str) -> list[str]:
    """The adapter folders of one run: ``lora/``, then ``ckpt-<it>/lora/`` (or a ``ckpt-<it>/`` holding the file
    itself) newest first; the folder itself when it is an adapter folder."""
    if _holds_adapter(run_dir):
        return [run_dir]
    found = [os.path.join(run_dir, "lora")]
    for _, ckpt in reversed(list_checkpoints(run_dir)):
        found += [os.path.join(ckpt, "lora"), ckpt]
    return [f for f in found if _holds_adapter(f)]


def find_adapters(runs: Sequence[str]) -> dict[str, str]:
    """{label: adapter folder} of every adapter in the run folders, in order (``run_adapters``); a folder holding
    none is searched one level down (a folder of runs, e.g. ``flowalign bench``'s). One-line FileNotFoundError for
    a missing folder or one with no adapter."""
    out: dict[str, str] = {}
    for run in runs:
        if not os.path.isdir(run):
            raise FileNotFoundError(f"run folder {run!r} not found: pass --runs DIR with the train.out_dir of a "
                                    "`flowalign train` or `flowalign demo` run")
        found = run_adapters(run) or [a for sub in sorted(os.listdir(run)) if os.path.isdir(os.path.join(run, sub))
                                      for a in run_adapters(os.path.join(run, sub))]
        if not found:
            raise FileNotFoundError(f"no adapter in {run!r}: a run folder holds lora/{LORA_FILE} or "
                                    "ckpt-<iteration>/lora/ (train one with `flowalign train RECIPE` or `flowalign "
                                    "demo --out DIR`), or pass a LoRA folder with --lora DIR")
        for path in found:
            _offer(out, path)
    return out


def _offer(adapters: dict[str, str], path: str) -> None:
    """Add ``path`` to {label: folder} under ``adapter_label`` (with the path appended when two folders share a
    label, e.g. two runs both named run); a folder offered already is not added again."""
    if os.path.abspath(path) in {os.path.abspath(p) for p in adapters.values()}:
        return
    label = adapter_label(path)
    adapters[label if label not in adapters else f"{label} ({path})"] = path


def adapter_sources(lora_dir: Optional[str], runs: Sequence[str] = ()) -> dict[str, str]:
    """{label: folder}: ``lora_dir`` (None: ``demo_out/lora`` unless runs are given) first, then ``find_adapters``."""
    if lora_dir is None and not runs:
        lora_dir = DEFAULT_LORA
    out = {}
    if lora_dir is not None:
        try:
            check_lora_dir(lora_dir)
        except FileNotFoundError:
            if lora_dir == DEFAULT_LORA:
                raise FileNotFoundError(f"no aligned adapter at {lora_dir!r}: run `flowalign demo` first (it writes "
                                        "demo_out/lora) or pass --lora DIR or --runs DIR") from None
            raise
        _offer(out, lora_dir)
    for path in find_adapters(runs).values():
        _offer(out, path)
    return out


def run_folder(adapter_dir: str) -> str:
    """The run an adapter folder belongs to: ``run`` for ``run/lora`` and ``run/ckpt-20/lora``."""
    parent = os.path.dirname(os.path.abspath(adapter_dir))
    return os.path.dirname(parent) if _CKPT.fullmatch(os.path.basename(parent)) else parent


# --- the toy reward's verdict ---------------------------------------------------------------------------------
def is_toy_prompt(prompt: str) -> bool:
    """Whether toy GenEval scores ``prompt``: the toy grammar parses it and it is not a text (OCR) prompt."""
    from ..toy.grammar import TEXT_TASK, parse_prompt

    try:
        return parse_prompt(prompt).task != TEXT_TASK
    except ValueError:
        return False


def verdict_text(image: torch.Tensor, prompt: str) -> str:
    """One line for an image [3,H,W] in [0,1]: ``exact 1 | lenient 1.00 | + present(circle), - no extra objects``
    (``verdict_grid.verdicts``' strict verdict and checks; ``toy.geneval`` fraction without "no extra objects");
    ``NO_VERDICT`` for a prompt outside the toy grammar."""
    if not is_toy_prompt(prompt):
        return NO_VERDICT
    from ..toy.geneval import detect, score

    dets = detect(image.detach().float().clamp(0, 1).cpu())  # once: both scores read the same detections
    exact = score(prompt, dets, no_extra=True)  # verdict_grid.verdicts' strict verdict and checks
    lenient = score(prompt, dets)["fraction"]
    checks = ", ".join(("+ " if ok else "- ") + name for name, ok in exact["checks"].items())
    return f"exact {int(exact['strict'])} | lenient {lenient:.2f} | {checks}"


def _display(image: torch.Tensor):
    """[3,H,W] in [0,1] -> a PIL image, small ones upscaled (nearest) to about DISPLAY_SIZE."""
    from PIL import Image

    arr = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    img = Image.fromarray(arr)
    if max(img.size) < DISPLAY_SIZE:
        k = DISPLAY_SIZE // max(img.size)
        img = img.resize((img.width * k, img.height * k), resample=Image.Resampling.NEAREST)
    return img


class RLGApp:
    """The pipeline with the picked adapter loaded, and one ``generate`` call per click (serialised by a lock).

    lora_dir / runs: where the adapters come from (``adapter_sources``); the first one is loaded at start."""

    def __init__(self, model: str = DEFAULT_MODEL, lora_dir: Optional[str] = None, device: Optional[str] = None,
                 dtype: str = "float32", nrg_rewards: Optional[dict] = None, runs: Sequence[str] = ()):
        self.adapters = adapter_sources(lora_dir, runs)  # one-line errors before the (slow) pipeline load
        self.model, self.lora_dir, self.runs = model, lora_dir, list(runs)
        self.adapter = next(iter(self.adapters))
        self.run_dir = self.runs[0] if self.runs else run_folder(self.adapters[self.adapter])
        self.pipe = load_rlg_pipeline(model, None, device=device, dtype=dtype)
        self.lock = threading.Lock()
        self._loaded: dict[str, str] = {}  # label -> peft adapter name
        self._use(self.adapter)
        self.nrg_rewards, self.nrg_notes = self._build_nrg(DEFAULT_NRG_REWARDS if nrg_rewards is None else nrg_rewards)
        self._tmp = tempfile.TemporaryDirectory(prefix="flowalign-app-")  # the curves PNG

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

    @property
    def adapter_labels(self) -> list[str]:
        return list(self.adapters)

    def _use(self, label: str) -> str:
        """Load adapter ``label`` (once) and make it the active one; its peft name. One-line ValueError or
        FileNotFoundError (unknown label, damaged or deleted file). The caller holds the lock (or is __init__)."""
        if label not in self.adapters:
            raise ValueError(f"no adapter {label!r}: pick one from the list (Rescan finds new checkpoints)")
        if label not in self._loaded:
            name = f"adapter_{len(self._loaded)}"
            with warnings.catch_warnings():  # peft warns at every adapter after the first: expected here
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                load_lora_weights(self.pipe, self.adapters[label], name)  # safetensors only, one-line errors
            self._loaded[label] = name
        self.pipe.set_adapters(self._loaded[label])
        self.adapter = label
        return self._loaded[label]

    def select_adapter(self, label: str) -> str:
        """Switch to adapter ``label`` (loading it the first time) -> one line for the app."""
        try:
            with self.lock:
                self._use(label)
        except (ValueError, FileNotFoundError) as err:  # a damaged file, a checkpoint deleted since the scan
            raise _gradio().Error(str(err)) from None
        return f"adapter {label}: {self.adapters[label]}"

    def rescan(self):
        """The dropdown again, with the run folders searched anew (checkpoints written since)."""
        gr = _gradio()
        try:
            found = adapter_sources(self.lora_dir, self.runs) if self.runs else dict(self.adapters)
        except FileNotFoundError as err:
            raise gr.Error(str(err)) from None
        with self.lock:
            self.adapters = {**found, **{k: v for k, v in self.adapters.items() if k in self._loaded}}
        return gr.Dropdown(choices=self.adapter_labels, value=self.adapter)

    def curves(self, run_dir: str):
        """(the run's curves as a PIL image or None, one line) for the curves tab; never raises for a bad run."""
        from PIL import Image

        path, message = curves_png(run_dir, os.path.join(self._tmp.name, "curves.png"))
        if path is None:
            return None, message
        with Image.open(path) as im:
            return im.copy(), f"{message} | {time.strftime('%H:%M:%S')}"

    def _image(self, prompt: str, seed: int, steps: int, cfg: float) -> torch.Tensor:
        """One image [3,H,W] in [0,1] (un-upscaled: what the toy reward scores)."""
        out = self.pipe(prompt=[prompt], num_inference_steps=steps, guidance_scale=cfg,
                        generator=torch.Generator().manual_seed(seed), output_type="pt",
                        **pipeline_call_kwargs(self.pipe))
        return out.images[0].float().clamp(0, 1).cpu()

    def generate(self, prompt: str, seed, steps, cfg, scale, *nrg_weights, adapter: Optional[str] = None):
        """-> (base image, aligned image, base verdict, aligned verdict, one-line summary). ``nrg_weights``: one
        per ``nrg_names`` (0 = off); ``adapter``: a label of ``adapters`` (None: the current one). The base image
        has neither RLG nor NRG, the aligned one both."""
        prompt = (prompt or "").strip()
        if not prompt:
            raise _gradio().Error("enter a prompt")
        seed, steps, cfg, scale = int(seed or 0), int(steps), float(cfg), float(scale)
        weights = {n: float(w or 0.0) for n, w in zip(self.nrg_names, nrg_weights)}
        on = {n: w for n, w in weights.items() if w != 0}
        t0 = time.time()
        try:
            with self.lock:
                name = self._use(adapter or self.adapter)
                disable_nrg(self.pipe)
                enable_rlg(self.pipe, 0.0, adapter_name=name)
                base = self._image(prompt, seed, steps, cfg)
                enable_rlg(self.pipe, scale, adapter_name=name)
                if on:  # after enable_rlg: NRG guides the RLG-mixed output
                    enable_nrg(self.pipe, [(self.nrg_rewards[n], w) for n, w in on.items()])
                try:
                    aligned = self._image(prompt, seed, steps, cfg)
                finally:
                    disable_nrg(self.pipe)
        except (ValueError, FileNotFoundError) as err:  # an unknown or damaged adapter
            raise _gradio().Error(str(err)) from None
        nrg = " | NRG " + " ".join(f"{n}={w:g}" for n, w in on.items()) if on else ""
        info = (f"RLG w={scale:g}{nrg} | adapter {self.adapter} | {steps} steps | CFG {cfg:g} | seed {seed} | "
                f"{time.time() - t0:.1f} s | prompt: {prompt}")
        return (_display(base), _display(aligned), verdict_text(base, prompt), verdict_text(aligned, prompt), info)


def _header(app, names: list[str], notes: list[str]) -> str:
    n = len(app.adapter_labels)
    return ("## RL guidance\n"
            "`out = out_ref + w (out_theta - out_ref)`: w = 0 is the base model, w = 1 the fine-tuned adapter, "
            f"w > 1 stronger alignment.  \nModel `{app.model}`, {n} adapter{'s' * (n != 1)} (pick one below)."
            + ("  \nFlow-NRG: `v <- v - sum_j w_j grad R_j(decode(x0_hat))` on the aligned image, a weight per "
               "reward (0 = off)." if names else "")
            + "".join(f"  \n_{n}_" for n in notes))


def build_ui(app: RLGApp, default_prompt: str = "two red circles", default_steps: int = 20,
             default_cfg: float = 4.5):
    """The gradio Blocks (not launched); the sliders start at ``default_steps`` / ``default_cfg``."""
    gr = _gradio()
    names = list(getattr(app, "nrg_names", []))
    notes = list(getattr(app, "nrg_notes", []))
    with gr.Blocks(title="flowalign: RL guidance") as ui:
        gr.Markdown(_header(app, names, notes))
        with gr.Tabs():
            with gr.Tab("Generate", elem_id="generate_tab") as generate_tab:
                with gr.Row():
                    adapter = gr.Dropdown(app.adapter_labels, value=app.adapter, label="adapter", elem_id="adapter",
                                          scale=4)
                    rescan = gr.Button("Rescan runs", elem_id="rescan", scale=1,
                                       visible=bool(getattr(app, "runs", None)))  # only --runs can grow
                prompt = gr.Textbox(label="prompt", value=default_prompt, elem_id="prompt")
                with gr.Row():
                    seed = gr.Number(label="seed", value=0, precision=0, elem_id="seed")
                    steps = gr.Slider(1, 50, value=default_steps, step=1, label="steps", elem_id="steps")
                    cfg = gr.Slider(1.0, 10.0, value=default_cfg, step=0.5, label="CFG scale", elem_id="cfg")
                    scale = gr.Slider(-1.0, 3.0, value=1.0, step=0.1, label="RLG scale w", elem_id="rlg_scale")
                    nrg = [gr.Slider(0.0, NRG_MAX_WEIGHT, value=0.0, step=1.0, label=f"NRG weight: {n}",
                                     elem_id=f"nrg_{n}") for n in names]
                button = gr.Button("Generate", variant="primary", elem_id="generate")
                with gr.Row():
                    with gr.Column():
                        base = gr.Image(label="base (w = 0)", type="pil", format="png", elem_id="base_image")
                        base_verdict = gr.Textbox(label="toy reward", interactive=False, elem_id="base_verdict")
                    with gr.Column():
                        aligned = gr.Image(label="aligned (RLG scale w)", type="pil", format="png",
                                           elem_id="aligned_image")
                        aligned_verdict = gr.Textbox(label="toy reward", interactive=False, elem_id="aligned_verdict")
                info = gr.Textbox(label="run", interactive=False, elem_id="info")
            with gr.Tab("Training curves", elem_id="curves_tab") as curves_tab:
                with gr.Row():
                    run_dir = gr.Textbox(label="run folder (train.out_dir)", value=app.run_dir, elem_id="run_dir",
                                         scale=4)
                    refresh = gr.Button("Refresh", elem_id="refresh", scale=1)
                curves = gr.Image(label=f"metrics.jsonl and evals.jsonl (re-plotted every {CURVES_EVERY_S:g} s "
                                  "while this tab is open)", type="pil", format="png", interactive=False,
                                  elem_id="curves")
                curves_info = gr.Textbox(label="curves", interactive=False, elem_id="curves_info")
        timer = gr.Timer(CURVES_EVERY_S, active=False)  # on only while the curves tab is open

        def run(*values):
            return app.generate(*values[:-1], adapter=values[-1])

        button.click(run, [prompt, seed, steps, cfg, scale, *nrg, adapter],
                     [base, aligned, base_verdict, aligned_verdict, info])
        adapter.change(app.select_adapter, adapter, info)
        rescan.click(app.rescan, None, adapter)
        plot = dict(fn=app.curves, inputs=run_dir, outputs=[curves, curves_info], concurrency_id="curves",
                    concurrency_limit=1)  # not queued behind a generation
        refresh.click(**plot)
        timer.tick(**plot, show_progress="hidden")
        curves_tab.select(lambda: gr.Timer(active=True), None, timer).then(**plot)
        generate_tab.select(lambda: gr.Timer(active=False), None, timer)
    return ui


def launch(model: str = DEFAULT_MODEL, lora_dir: Optional[str] = None, host: str = "127.0.0.1",
           port: Optional[int] = None, block: bool = True, default_steps: int = 20, device: Optional[str] = None,
           dtype: str = "float32", default_cfg: float = 4.5, nrg_rewards: Optional[dict] = None,
           runs: Sequence[str] = ()):
    """Load the pipeline and serve the app on host:port (gradio's default port when None).

    lora_dir / runs: the adapters offered (``adapter_sources``; neither: ``demo_out/lora``).
    nrg_rewards: {reward name: build options} offered as Flow-NRG sliders (None: ``DEFAULT_NRG_REWARDS``).
    block=False returns the running Blocks (``.close()`` stops it)."""
    _gradio()  # the install hint before the (slow) pipeline load
    app = RLGApp(model, lora_dir, device=device, dtype=dtype, nrg_rewards=nrg_rewards, runs=runs)
    for note in app.nrg_notes:
        print(note)
    ui = build_ui(app, default_steps=default_steps, default_cfg=default_cfg)
    ui.queue(default_concurrency_limit=1)
    ui.launch(server_name=host, server_port=port, share=False, inbrowser=False, prevent_thread_lock=not block,
              quiet=not block)
    return ui
