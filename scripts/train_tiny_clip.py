"""Recipe for the shipped tiny CLIP (assets/tiny-clip): a transformers CLIPModel trained on the toy world.

    nice -n 19 python scripts/train_tiny_clip.py --out assets/tiny-clip --seed 0

The shipped asset: these defaults (8000 renders, 250 steps of batch 96), ~1 min on 2 free CPU cores.

Data: (render, caption) pairs from the TRAIN prompt split of flowalign.toy, all seven tasks, rendered at
64 px once into a fixed pool; light blur / noise augmentation so that imperfect generations still embed
near their caption. Every image also gets one HARD negative caption (the same scene with one fact
changed: colour, count, shape, swapped relation or colours, a letter of the text), kept only when that
caption is itself in the train split, so held-out prompts are never seen.
Loss: symmetric InfoNCE on ``s = exp(logit_scale) cos(img, txt)``; captions repeated within a batch are
all positives (targets spread uniformly over them); the image -> text side also ranks the hard negatives.
Report: on HELD-OUT prompts/images, how often the matching caption scores above (a) a random mismatched
caption, (b) the hard negative, and (c) every mismatched caption of a batch of 32 (mismatched = false of
the image by the toy verifier), per task; written to <out>/metrics.json.
Reproducible from --seed on the same thread count (CPU, float32).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from flowalign.toy.pipelines import tiny_clip_tokenizer
from flowalign.toy import COLORS, SHAPES, TASKS, TEXT_TASK, render, sample_batch, split_of
from flowalign.toy.grammar import MAX_COUNT, TEXT_LETTERS

IMAGE_SIZE = 64
MAX_TEXT = 16
ARCH = dict(hidden=96, layers=3, heads=4, patch=8, proj=96)
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def build_model(vocab_size: int, eos_id: int, seed: int):
    """A tiny CLIPModel: 64-px images, 8-px patches (64 tokens + CLS), width 96, 3 layers per tower."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    h, n, heads = ARCH["hidden"], ARCH["layers"], ARCH["heads"]
    cfg = CLIPConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=h, intermediate_size=4 * h, num_hidden_layers=n,
                         num_attention_heads=heads, max_position_embeddings=MAX_TEXT, bos_token_id=eos_id - 1,
                         eos_token_id=eos_id, pad_token_id=eos_id),
        vision_config=dict(image_size=IMAGE_SIZE, patch_size=ARCH["patch"], hidden_size=h, intermediate_size=4 * h,
                           num_hidden_layers=n, num_attention_heads=heads),
        projection_dim=ARCH["proj"],
    )
    return CLIPModel(cfg)


def hard_negative(spec, rng: np.random.Generator):
    """The same scene with one fact changed (a different, valid caption), or None."""
    other = lambda seq, cur: [v for v in seq if v != cur][rng.integers(len(seq) - 1)]  # noqa: E731
    rep = dataclasses.replace
    if spec.task == TEXT_TASK:
        i = rng.integers(len(spec.text))
        return rep(spec, text=spec.text[:i] + other(TEXT_LETTERS, spec.text[i]) + spec.text[i + 1:])
    objs = list(spec.objects)
    if spec.task == "position":
        return rep(spec, relation=OPPOSITE[spec.relation])
    if spec.task == "color_attr" and objs[0].shape != objs[1].shape and rng.random() < 0.5:
        return rep(spec, objects=(rep(objs[0], color=objs[1].color), rep(objs[1], color=objs[0].color)))
    if spec.task == "counting" and rng.random() < 0.6:
        return rep(spec, objects=(rep(objs[0], count=other(range(1, MAX_COUNT + 1), objs[0].count)),))
    i = int(rng.integers(len(objs)))
    if objs[i].color is not None and rng.random() < 0.5:
        used = {o.color for o in objs}
        choices = [c for c in COLORS if c not in used]
        objs[i] = rep(objs[i], color=choices[rng.integers(len(choices))])
    else:
        used = {o.shape for o in objs}
        choices = [s for s in SHAPES if s not in used]
        objs[i] = rep(objs[i], shape=choices[rng.integers(len(choices))])
    try:
        return rep(spec, objects=tuple(objs))
    except ValueError:
        return None


def implied(c, s) -> bool:
    """Is caption spec ``c`` true of every render of scene spec ``s``? Exact match, or ``c`` only names
    objects (single_object / colors / two_object) that ``s`` draws with a known colour and shape."""
    if c == s:
        return True
    if c.task not in ("single_object", "colors", "two_object") or s.task == TEXT_TASK:
        return False
    return all(any(o.shape == p.shape and (o.color is None or o.color == p.color) for p in s.objects)
               for o in c.objects)


def make_pool(n: int, seed: int, split: str):
    """n (image uint8 [n,H,W,3], captions, specs, hard negatives or None) from ``split``."""
    pairs = sample_batch(n, seed=seed, split=split, tasks=TASKS)
    rng = np.random.default_rng(seed + 1)
    images = np.stack([np.asarray(render(spec, IMAGE_SIZE, seed=seed * 1_000_003 + i)[0]) for i, (_, spec) in enumerate(pairs)])
    caps, specs, negs = [p for p, _ in pairs], [s for _, s in pairs], []
    for _, spec in pairs:
        neg = hard_negative(spec, rng)
        negs.append(neg.prompt if neg is not None and (split != "train" or split_of(neg.prompt) == "train") else None)
    return images, caps, specs, negs


def to_pixels(images_u8: np.ndarray, augment: bool, gen: torch.Generator) -> torch.Tensor:
    """uint8 [B,H,W,3] -> CLIP-normalised [B,3,H,W]; augment: blur half the images, add noise."""
    from flowalign.rewards.preprocess import CLIP_MEAN, CLIP_STD

    x = torch.from_numpy(images_u8).permute(0, 3, 1, 2).float() / 255
    if augment:
        b = x.shape[0]
        blur = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
        pick = (torch.rand(b, 1, 1, 1, generator=gen) < 0.5).float()
        x = pick * blur + (1 - pick) * x
        x = (x + 0.04 * torch.rand(b, 1, 1, 1, generator=gen) * torch.randn(x.shape, generator=gen)).clamp(0, 1)
    return (x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)


def embed(model, tok, pixels, texts):
    t = tok(texts, padding=True, truncation=True, max_length=MAX_TEXT, return_tensors="pt")
    img = model.get_image_features(pixel_values=pixels)
    txt = model.get_text_features(input_ids=t.input_ids, attention_mask=t.attention_mask)
    img, txt = [o if isinstance(o, torch.Tensor) else o.pooler_output for o in (img, txt)]
    return F.normalize(img, dim=-1), F.normalize(txt, dim=-1)


def loss_fn(model, tok, pixels, caps, specs, negs):
    """Symmetric multi-positive InfoNCE (positives: captions true of the image, ``implied``); hard-negative
    captions extend the image -> text candidates."""
    from flowalign.toy import parse_prompt

    extra = list(dict.fromkeys(n for n in negs if n is not None and n not in caps))
    img, txt = embed(model, tok, pixels, caps + extra)
    scale = model.logit_scale.exp().clamp(max=100)
    logits = scale * img @ txt.T  # [B, B + E]
    cand = specs + [parse_prompt(n) for n in extra]
    pos = torch.tensor([[implied(c, s) for c in cand] for s in specs], dtype=torch.float32)  # [B img, B + E txt]
    b = len(caps)
    loss_i = -(pos / pos.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
    pos_t = pos[:, :b].T  # caption -> the images it is true of
    loss_t = -(pos_t / pos_t.sum(1, keepdim=True) * logits[:, :b].T.log_softmax(1)).sum(1).mean()
    return (loss_i + loss_t) / 2


@torch.no_grad()
def evaluate(model, tok, images, caps, negs, group: int = 32, seed: int = 0) -> dict:
    """Per task, how often an image's own caption scores above MISMATCHED captions: (random) one other
    caption, (hard) its hard negative, (top1) every mismatched caption of its batch of ``group``.
    Mismatched = not true of the image by the toy verifier (detect + strict GenEval check), so a
    caption that also describes the image ("a circle" for a red circle) is never counted against it."""
    from flowalign.toy import detect, parse_prompt, score

    model.eval()
    rng = np.random.default_rng(seed)
    pix = to_pixels(images, False, torch.Generator())
    img = torch.cat([embed(model, tok, pix[i:i + 256], caps[:1])[0] for i in range(0, len(caps), 256)])
    uniq = sorted(set(caps) | {n for n in negs if n})
    txt = torch.cat([embed(model, tok, pix[:1], uniq[i:i + 256])[1] for i in range(0, len(uniq), 256)])
    sims = img @ txt.T  # [N, U]
    col = {c: j for j, c in enumerate(uniq)}
    dets = [detect(im) for im in images]
    is_text = lambda c: c.startswith("the text")  # noqa: E731

    def mismatched(i, c):
        if c == caps[i]:
            return False
        if is_text(c) or is_text(caps[i]):
            return True
        return score(c, dets[i])["strict"] < 1.0

    per = {}
    for i, (c, n) in enumerate(zip(caps, negs)):
        d = per.setdefault(parse_prompt(c).task, {"random": [], "hard": [], "top1": []})
        own = sims[i, col[c]]
        others = [o for o in dict.fromkeys(caps) if mismatched(i, o)]
        d["random"].append(bool(own > sims[i, col[others[rng.integers(len(others))]]]))
        if n is not None and mismatched(i, n):
            d["hard"].append(bool(own > sims[i, col[n]]))
        start = (i // group) * group
        cands = [o for o in dict.fromkeys(caps[start:start + group]) if mismatched(i, o)]
        d["top1"].append(all(bool(own > sims[i, col[o]]) for o in cands))
    out = {t: {k: round(float(np.mean(v)), 4) for k, v in d.items() if v} | {"n": len(d["random"])}
           for t, d in sorted(per.items())}
    allv = {k: [x for d in per.values() for x in d[k]] for k in ("random", "hard", "top1")}
    out["all"] = {k: round(float(np.mean(v)), 4) for k, v in allv.items()} | {"n": len(caps)}
    model.train()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="assets/tiny-clip", help="where model + tokenizer are saved")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pool", type=int, default=8000, help="number of training renders")
    ap.add_argument("--eval-n", type=int, default=1024, help="held-out images for the report")
    ap.add_argument("--batch", type=int, default=96)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--steps", type=int, default=250, help="optimizer steps (warmup 3%%, then cosine)")
    ap.add_argument("--minutes", type=float, default=10.0, help="wall-clock cap; stops early if reached")
    args = ap.parse_args()
    torch.manual_seed(args.seed)

    t0 = time.time()
    tok = tiny_clip_tokenizer(max_length=MAX_TEXT, save_dir=args.out)
    model = build_model(len(tok), tok.convert_tokens_to_ids("<|endoftext|>"), args.seed)
    images, caps, specs, negs = make_pool(args.pool, args.seed, "train")
    ev_images, ev_caps, _, ev_negs = make_pool(args.eval_n, args.seed + 10_000, "heldout")
    print(f"pool {len(caps)} train / {len(ev_caps)} held-out renders in {time.time() - t0:.0f}s; "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params", flush=True)
    print("before:", json.dumps(evaluate(model, tok, ev_images, ev_caps, ev_negs)["all"]), flush=True)

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    gen = torch.Generator().manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    budget, t1, step = args.minutes * 60, time.time(), 0
    while step < args.steps and time.time() - t1 < budget:
        frac = step / args.steps
        lr = args.lr * min(1.0, (step + 1) / (0.03 * args.steps)) * 0.5 * (1 + np.cos(np.pi * frac))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = rng.choice(len(caps), args.batch, replace=False)
        loss = loss_fn(model, tok, to_pixels(images[idx], True, gen), [caps[i] for i in idx],
                       [specs[i] for i in idx], [negs[i] for i in idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 50 == 0:
            print(f"step {step} loss {loss.item():.3f} lr {lr:.2e} scale {model.logit_scale.exp().item():.1f} "
                  f"{time.time() - t1:.0f}s", flush=True)
    model.eval()
    metrics = {"args": vars(args), "steps": step, "train_minutes": round((time.time() - t1) / 60, 2), "seed": args.seed,
               "arch": ARCH, "heldout": evaluate(model, tok, ev_images, ev_caps, ev_negs)}
    model.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    print(json.dumps(metrics["heldout"], indent=1))
    size = sum(os.path.getsize(os.path.join(args.out, p)) for p in os.listdir(args.out)) / 1e6
    print(f"saved {args.out} ({size:.1f} MB) after {step} steps, total {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
