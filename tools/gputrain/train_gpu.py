"""Full training of an OpenVLA-architecture checkpoint on a CUDA machine that has PyTorch but no .NET.

A diagnostic twin of `openvla finetune --full`: the same objective (cross-entropy on the 7 action tokens and EOS after
BOS · image patches · prompt), the same optional auxiliary head (a linear map from the flattened projected image tokens
to standardized state targets, MSE), AdamW with torch's defaults and weight decay 0.01, gradient clipping at 1.0 and a
warm-up + cosine schedule. It reads the arrays `Program.cs` packs (so tokenization, action normalization and the
train/held-out split are our C# code's, not re-implemented here) and writes bf16 `model.safetensors` files with exactly
the tensor names and shapes of our checkpoints, which `openvla eval --checkpoint` then runs in closed loop.

Before training it proves that its forward pass is ours: pixel values and logits for two packed examples must match
what our TorchSharp model computed for the same checkpoint (check.* in the pack).

Two options widen the twin beyond the shipped recipe, for experiments: `--exclude-tasks` trains on a subset of the
suite (the base of the LoRA transfer experiment), `--random-shift N` is `finetune --random-shift N` (pad N pixels by
replicating the border, crop back at a random offset, per example).

Usage:  python3 train_gpu.py PACK CONFIG_DIR CHECK_CHECKPOINT OUT [--seconds S] [--batch B] [--lr LR] [--aux-weight W]
"""
import argparse
import contextlib
import json
import lzma
import math
import os
import struct
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

IGNORE = -100


# ----------------------------------------------------------------------------------------------------------- safetensors
def read_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        raw = bytearray(data[a:b])
        dtype = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}[info["dtype"]]
        t = torch.frombuffer(raw, dtype=dtype) if len(raw) else torch.empty(0, dtype=dtype)
        out[name] = t.reshape(info["shape"]).float()
    return out


def write_safetensors(path, tensors, dtype=torch.bfloat16):
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, t in tensors.items():
        t = t.detach().to("cpu", dtype).contiguous()
        raw = t.view(torch.int16).numpy().tobytes() if dtype == torch.bfloat16 else t.numpy().tobytes()
        header[name] = {"dtype": "BF16" if dtype == torch.bfloat16 else "F32", "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for raw in blobs:
            f.write(raw)


# ------------------------------------------------------------------------------------------------------------ the layout
def tensor_shapes(config):
    """Every tensor our checkpoint writer emits for this config, in its order (CheckpointMaker)."""
    shapes = {}
    for tower, c in zip(("featurizer", "fused_featurizer"), config["vision_backbone_configs"]):
        p = f"vision_backbone.{tower}."
        d, m, grid = c["embed_dim"], c["mlp_hidden_dim"], c["image_size"] // c["patch_size"]
        if c["class_token"]:
            shapes[p + "cls_token"] = [1, 1, d]
        if c["num_register_tokens"]:
            shapes[p + "reg_token"] = [1, c["num_register_tokens"], d]
        shapes[p + "pos_embed"] = [1, grid * grid, d]
        shapes[p + "patch_embed.proj.weight"] = [d, 3, c["patch_size"], c["patch_size"]]
        shapes[p + "patch_embed.proj.bias"] = [d]
        for i in range(c["depth"]):
            b = f"{p}blocks.{i}."
            shapes.update({b + "norm1.weight": [d], b + "norm1.bias": [d], b + "attn.qkv.weight": [3 * d, d],
                           b + "attn.qkv.bias": [3 * d], b + "attn.proj.weight": [d, d], b + "attn.proj.bias": [d]})
            if c["layer_scale"]:
                shapes[b + "ls1.scale_factor"] = [d]
            shapes.update({b + "norm2.weight": [d], b + "norm2.bias": [d], b + "mlp.fc1.weight": [m, d], b + "mlp.fc1.bias": [m],
                           b + "mlp.fc2.weight": [d, m], b + "mlp.fc2.bias": [d]})
            if c["layer_scale"]:
                shapes[b + "ls2.scale_factor"] = [d]
        shapes[p + "norm.weight"] = [d]
        shapes[p + "norm.bias"] = [d]
        if c["attn_pool"]:
            a = p + "attn_pool."
            shapes.update({a + "latent": [1, 1, d], a + "q.weight": [d, d], a + "q.bias": [d], a + "kv.weight": [2 * d, d],
                           a + "kv.bias": [2 * d], a + "proj.weight": [d, d], a + "proj.bias": [d], a + "norm.weight": [d],
                           a + "norm.bias": [d], a + "mlp.fc1.weight": [m, d], a + "mlp.fc1.bias": [m],
                           a + "mlp.fc2.weight": [d, m], a + "mlp.fc2.bias": [d]})
    v = sum(c["embed_dim"] for c in config["vision_backbone_configs"])
    t = config["text_config"]
    h, inter, vocab = t["hidden_size"], t["intermediate_size"], t["vocab_size"]
    kv = t["num_key_value_heads"] * (h // t["num_attention_heads"])
    shapes.update({"projector.fc1.weight": [4 * v, v], "projector.fc1.bias": [4 * v], "projector.fc2.weight": [h, 4 * v],
                   "projector.fc2.bias": [h], "projector.fc3.weight": [h, h], "projector.fc3.bias": [h],
                   "language_model.model.embed_tokens.weight": [vocab, h]})
    for i in range(t["num_hidden_layers"]):
        b = f"language_model.model.layers.{i}."
        shapes.update({b + "self_attn.q_proj.weight": [h, h], b + "self_attn.k_proj.weight": [kv, h],
                       b + "self_attn.v_proj.weight": [kv, h], b + "self_attn.o_proj.weight": [h, h],
                       b + "mlp.gate_proj.weight": [inter, h], b + "mlp.up_proj.weight": [inter, h],
                       b + "mlp.down_proj.weight": [h, inter], b + "input_layernorm.weight": [h],
                       b + "post_attention_layernorm.weight": [h]})
    shapes["language_model.model.norm.weight"] = [h]
    shapes["language_model.lm_head.weight"] = [vocab, h]
    return shapes


def init_std(name, shape):
    """RandomInit.MeanStd: the distribution our `openvla init` draws each tensor from."""
    if name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "layernorm.weight")):
        return 1.0, 0.1
    if name.endswith("scale_factor"):
        return 0.1, 0.05
    if name.endswith(".bias"):
        return 0.0, 0.02
    if len(shape) >= 2 and not name.endswith("embed_tokens.weight") and "pos_embed" not in name \
            and not name.endswith("_token") and not name.endswith("latent"):
        return 0.0, 1.0 / math.sqrt(math.prod(shape[1:]))
    return 0.0, 0.5


# ------------------------------------------------------------------------------------------------------------- the model
class Vla:
    def __init__(self, config, params):
        self.c = config
        self.p = params
        t = config["text_config"]
        self.heads, self.kv_heads = t["num_attention_heads"], t["num_key_value_heads"]
        self.hd = t["hidden_size"] // self.heads
        self.eps = t["rms_norm_eps"]
        self.layers = t["num_hidden_layers"]
        theta = t.get("rope_theta", 10000.0)
        inv = 1.0 / theta ** (torch.arange(0, self.hd, 2, dtype=torch.float64) / self.hd)
        freqs = torch.outer(torch.arange(t["max_position_embeddings"], dtype=torch.float64), inv)
        emb = torch.cat([freqs, freqs], -1)
        dev = next(iter(params.values())).device
        self.cos, self.sin = emb.cos().float().to(dev), emb.sin().float().to(dev)

    def tower(self, name, c, pixels):
        p, g = f"vision_backbone.{name}.", lambda k: self.p[f"vision_backbone.{name}.{k}"]
        x = F.conv2d(pixels, g("patch_embed.proj.weight"), g("patch_embed.proj.bias"), stride=c["patch_size"])
        x = x.flatten(2).transpose(1, 2) + g("pos_embed")
        b = x.shape[0]
        prefix = []
        if c["class_token"]:
            prefix.append(g("cls_token").expand(b, -1, -1))
        if c["num_register_tokens"]:
            prefix.append(g("reg_token").expand(b, -1, -1))
        if prefix:
            x = torch.cat(prefix + [x], 1)
        d, heads = c["embed_dim"], c["num_heads"]
        for i in range(c["depth"] - 1):                       # the output of the second-to-last block
            k = f"blocks.{i}."
            h = F.layer_norm(x, (d,), g(k + "norm1.weight"), g(k + "norm1.bias"), 1e-6)
            n = h.shape[1]
            qkv = F.linear(h, g(k + "attn.qkv.weight"), g(k + "attn.qkv.bias")).reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
            o = attention(qkv[0], qkv[1], qkv[2], None)
            a = F.linear(o.transpose(1, 2).reshape(b, n, d), g(k + "attn.proj.weight"), g(k + "attn.proj.bias"))
            x = x + (a * g(k + "ls1.scale_factor") if c["layer_scale"] else a)
            h = F.layer_norm(x, (d,), g(k + "norm2.weight"), g(k + "norm2.bias"), 1e-6)
            m = F.linear(F.gelu(F.linear(h, g(k + "mlp.fc1.weight"), g(k + "mlp.fc1.bias"))), g(k + "mlp.fc2.weight"), g(k + "mlp.fc2.bias"))
            x = x + (m * g(k + "ls2.scale_factor") if c["layer_scale"] else m)
        prefix_n = (1 if c["class_token"] else 0) + c["num_register_tokens"]
        return x[:, prefix_n:]

    def encode_images(self, pixels):
        c0, c1 = self.c["vision_backbone_configs"]
        v = torch.cat([self.tower("featurizer", c0, pixels[:, :3]), self.tower("fused_featurizer", c1, pixels[:, 3:])], 2)
        g = lambda k: self.p["projector." + k]
        return F.linear(F.gelu(F.linear(F.gelu(F.linear(v, g("fc1.weight"), g("fc1.bias"))), g("fc2.weight"), g("fc2.bias"))),
                        g("fc3.weight"), g("fc3.bias"))

    def rms(self, x, w):
        h = x.float()
        return w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)

    def decode(self, inputs, valid):
        b, l, _ = inputs.shape
        cos, sin = self.cos[:l].view(1, 1, l, -1), self.sin[:l].view(1, 1, l, -1)
        pos = torch.arange(l, device=inputs.device)
        mask = (pos.view(1, 1, 1, l) <= pos.view(1, 1, l, 1)) & valid.view(b, 1, 1, l) | (pos.view(1, 1, 1, l) == pos.view(1, 1, l, 1))
        x = inputs
        for i in range(self.layers):
            g = lambda k: self.p[f"language_model.model.layers.{i}.{k}"]
            h = self.rms(x, g("input_layernorm.weight"))
            q = F.linear(h, g("self_attn.q_proj.weight")).view(b, l, self.heads, self.hd).transpose(1, 2)
            k = F.linear(h, g("self_attn.k_proj.weight")).view(b, l, self.kv_heads, self.hd).transpose(1, 2)
            v = F.linear(h, g("self_attn.v_proj.weight")).view(b, l, self.kv_heads, self.hd).transpose(1, 2)
            q, k = rope(q, cos, sin), rope(k, cos, sin)
            if self.heads != self.kv_heads:
                k = k.repeat_interleave(self.heads // self.kv_heads, 1)
                v = v.repeat_interleave(self.heads // self.kv_heads, 1)
            o = attention(q, k, v, mask)
            x = x + F.linear(o.transpose(1, 2).reshape(b, l, -1), g("self_attn.o_proj.weight"))
            h = self.rms(x, g("post_attention_layernorm.weight"))
            x = x + F.linear(F.silu(F.linear(h, g("mlp.gate_proj.weight"))) * F.linear(h, g("mlp.up_proj.weight")), g("mlp.down_proj.weight"))
        return self.rms(x, self.p["language_model.model.norm.weight"])

    def forward(self, pixels, ids, valid, labels):
        """ActionObjective.Forward: BOS, the image patches, the rest of the prompt; labels shifted by the patch count."""
        patches = self.encode_images(pixels)
        emb = F.embedding(ids, self.p["language_model.model.embed_tokens.weight"])
        b, p = patches.shape[:2]
        inputs = torch.cat([emb[:, :1], patches.to(emb.dtype), emb[:, 1:]], 1)
        valid = torch.cat([torch.ones(b, 1 + p, dtype=torch.bool, device=ids.device), valid[:, 1:]], 1)
        labels = torch.cat([labels[:, :1], torch.full((b, p), IGNORE, dtype=torch.long, device=ids.device), labels[:, 1:]], 1)
        return self.decode(inputs, valid), labels, patches

    def logits(self, hidden):
        return F.linear(hidden, self.p["language_model.lm_head.weight"])


def attention(q, k, v, mask):
    if hasattr(F, "scaled_dot_product_attention"):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return s.softmax(-1) @ v


def rope(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


# -------------------------------------------------------------------------------------------------------------- the data
def load(directory, name, dtype):
    """NAME, or NAME.xz when only the compressed file is there (the frames travel compressed: 1.8 GB → 28 MB)."""
    raw = os.path.join(directory, name)
    if os.path.exists(raw):
        return np.fromfile(raw, dtype=dtype)
    with lzma.open(raw + ".xz") as f:
        return np.frombuffer(f.read(), dtype=dtype)


class Pack:
    def __init__(self, path, device, aux_dims=0, exclude_tasks=()):
        self.meta = json.load(open(os.path.join(path, "meta.json")))
        m = self.meta
        n, s = m["count"], m["image_size"]
        self.frames = torch.from_numpy(load(path, "frames.u8", np.uint8)).view(n, s, s, 3).to(device)
        self.ids = torch.from_numpy(load(path, "ids.i16", np.int16).astype(np.int64)).view(n, -1).to(device)
        self.aux = torch.from_numpy(load(path, "aux.f32", np.float32)).view(n, -1).to(device)
        self.split = torch.from_numpy(load(path, "split.u8", np.uint8)).to(device)
        self.aux_mean = torch.tensor(m["aux_mean"], device=device)
        self.aux_std = torch.tensor(m["aux_std"], device=device)
        if aux_dims:                                          # regress only the first aux_dims targets
            self.aux, self.aux_mean, self.aux_std = self.aux[:, :aux_dims], self.aux_mean[:aux_dims], self.aux_std[:aux_dims]
        self.targets = m["action_dim"] + 1
        keep = torch.ones(n, dtype=torch.bool, device=device)
        if exclude_tasks:                                     # task.u8 indexes meta["tasks"] (Program.cs)
            names = m.get("tasks") or []
            unknown = [t for t in exclude_tasks if t not in names]
            if unknown:
                raise SystemExit(f"--exclude-tasks: {', '.join(unknown)} not in this pack's tasks ({', '.join(names) or 'none recorded'})")
            task = torch.from_numpy(load(path, "task.u8", np.uint8)).to(device)
            for t in exclude_tasks:
                keep &= task != names.index(t)
        self.train = ((self.split == 0) & keep).nonzero().squeeze(1)
        self.held_out = ((self.split == 1) & keep).nonzero().squeeze(1)

    def batch(self, idx, pad_id, mean, std, shift=0, gen=None):
        ids = self.ids[idx]
        valid = ids >= 0
        width = int(valid.sum(1).max())                       # pad to the batch's longest row, as ActionObjective.Build
        ids, valid = ids[:, :width], valid[:, :width]
        lengths = valid.sum(1, keepdim=True)
        pos = torch.arange(ids.shape[1], device=ids.device).view(1, -1)
        labels = torch.where(valid & (pos >= lengths - self.targets), ids, torch.full_like(ids, IGNORE))
        ids = torch.where(valid, ids, torch.full_like(ids, pad_id))
        px = self.frames[idx].permute(0, 3, 1, 2).float() / 255.0
        if shift:
            px = random_shift(px, shift, gen)
        pixels = torch.cat([(px - mean[t].view(1, 3, 1, 1)) / std[t].view(1, 3, 1, 1) for t in range(2)], 1)
        return pixels, ids, valid, labels, (self.aux[idx] - self.aux_mean) / self.aux_std


def random_shift(px, pad, gen):
    """Pad every side by `pad` pixels (replicating the border), then crop the original size at a per-example offset
    drawn uniformly from 0..2·pad: whole-pixel translations, as `finetune --random-shift` (RandomShift.cs)."""
    b, c, h, w = px.shape
    padded = F.pad(px, (pad, pad, pad, pad), mode="replicate")
    off = torch.randint(0, 2 * pad + 1, (b, 2), generator=gen).to(px.device)
    rows = (off[:, 0:1] + torch.arange(h, device=px.device)).view(b, 1, h, 1).expand(b, c, h, w + 2 * pad)
    cols = (off[:, 1:2] + torch.arange(w, device=px.device)).view(b, 1, 1, w).expand(b, c, h, w)
    return padded.gather(2, rows).gather(3, cols)


def normalization(preprocessor_config, device):
    params = preprocessor_config["tvf_normalize_params"]
    mean = torch.tensor([p["mean"] for p in params], dtype=torch.float32, device=device)
    std = torch.tensor([p["std"] for p in params], dtype=torch.float32, device=device)
    return mean, std


def score(model, hidden, labels, first_action, vocab_end):
    nxt = labels[:, 1:]
    where = nxt != IGNORE
    selected = hidden[:, :-1][where]
    targets = nxt[where]
    logits = model.logits(selected).float()
    loss = F.cross_entropy(logits, targets)
    pred = logits.argmax(-1)
    is_action = (targets >= first_action) & (targets < vocab_end)
    acc = ((pred == targets) & is_action).sum() / is_action.sum().clamp_min(1)
    return loss, acc


# ------------------------------------------------------------------------------------------------------------------ main
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("pack")
    ap.add_argument("config_dir", help="directory with config.json and preprocessor_config.json of the model to train")
    ap.add_argument("check_checkpoint", help="the checkpoint Program.cs computed check.* with")
    ap.add_argument("out")
    ap.add_argument("--seconds", type=float, default=420, help="wall-clock training budget; the cosine schedule is sized to it")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=500)
    ap.add_argument("--aux-weight", type=float, default=1.0)
    ap.add_argument("--aux-dims", type=int, default=0, help="regress only the first N aux targets; 0: all")
    ap.add_argument("--snapshots", default="0.25,0.5,1.0", help="fractions of the run at which to write model-P.safetensors")
    ap.add_argument("--eval-every", type=int, default=1000)
    ap.add_argument("--eval-examples", type=int, default=2048, help="held-out examples scored per evaluation")
    ap.add_argument("--exclude-tasks", default="", help="comma-separated suite tasks to leave out of training and evaluation")
    ap.add_argument("--random-shift", type=int, default=0, help="augment: random translation by up to N pixels (0: none)")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--check-only", action="store_true")
    ap.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (tests); 0: the time budget decides")
    ap.add_argument("--init", default="", help="start from this checkpoint directory's weights instead of our random init (fine-tuning)")
    ap.add_argument("--stop-after", type=int, default=0, help="end the run after this many steps without shortening the schedule")
    a = ap.parse_args()
    dev = torch.device(a.device)
    os.makedirs(a.out, exist_ok=True)
    log = open(os.path.join(a.out, "train_gpu.log"), "a")

    def say(msg):
        print(msg, flush=True)
        log.write(msg + "\n")
        log.flush()

    say(f"torch {torch.__version__} on {dev}" + (f" ({torch.cuda.get_device_name(0)})" if dev.type == "cuda" else ""))
    t0 = time.time()
    excluded = [t for t in a.exclude_tasks.split(",") if t]
    pack = Pack(a.pack, dev, a.aux_dims, excluded)
    say(f"pack: {pack.meta['count']} examples ({len(pack.train)} train, {len(pack.held_out)} held out) in {time.time() - t0:.1f} s")

    # 1. Our forward pass, or stop.
    check_dir = a.check_checkpoint
    check_cfg = json.load(open(os.path.join(check_dir, "config.json")))
    mean, std = normalization(json.load(open(os.path.join(check_dir, "preprocessor_config.json"))), dev)
    check_params = {k: v.to(dev) for k, v in read_safetensors(os.path.join(check_dir, "model.safetensors")).items()}
    check_model = Vla(check_cfg, check_params)
    pixels, ids, valid, labels, _ = pack.batch(torch.arange(2, device=dev), pack.meta["pad_id"], mean, std)
    want_px = torch.from_numpy(np.fromfile(os.path.join(a.pack, "check.pixels.f32"), dtype=np.float32)).view(pixels.shape).to(dev)
    with torch.no_grad():
        hidden, full_labels, _ = check_model.forward(pixels, ids, valid, labels)
        logits = check_model.logits(hidden)
        loss, _ = score(check_model, hidden, full_labels, pack.meta["first_action_id"], pack.meta["action_vocab_end"])
    want_logits = torch.from_numpy(np.fromfile(os.path.join(a.pack, "check.logits.f32"), dtype=np.float32)).view(logits.shape).to(dev)
    px_err = (pixels - want_px).abs().max().item()
    lg_err = (logits - want_logits).abs().max().item()
    say(f"check: pixel max |diff| {px_err:.2e}, logit max |diff| {lg_err:.2e}, loss {loss.item():.6f} (ours {pack.meta['check_loss']:.6f})")
    if px_err > 1e-5 or lg_err > 2e-3 or abs(loss.item() - pack.meta["check_loss"]) > 1e-3:
        say("check FAILED: this forward pass is not our model's; not training")
        sys.exit(1)
    del check_params, check_model
    if a.check_only:
        return

    # 2. Train from our random init.
    cfg = json.load(open(os.path.join(a.config_dir, "config.json")))
    mean, std = normalization(json.load(open(os.path.join(a.config_dir, "preprocessor_config.json"))), dev)
    gen = torch.Generator().manual_seed(a.seed)
    params = {}
    init = read_safetensors(os.path.join(a.init, "model.safetensors")) if a.init else None
    for name, shape in tensor_shapes(cfg).items():
        mu, sd = init_std(name, shape)
        drawn = torch.randn(shape, generator=gen) * sd + mu  # drawn either way, so the generator's later draws do not depend on --init
        if init is not None:
            if tuple(init[name].shape) != tuple(shape):
                raise SystemExit(f"--init: {name} has shape {tuple(init[name].shape)}, the config says {tuple(shape)}")
            drawn = init[name].float()
        params[name] = drawn.to(dev).requires_grad_(True)
    if init is not None:
        say(f"initialized from {a.init}")
    model = Vla(cfg, params)
    n_patches = (cfg["image_sizes"][0] // cfg["vision_backbone_configs"][0]["patch_size"]) ** 2
    hid = cfg["text_config"]["hidden_size"]
    aux_w = (torch.randn(pack.aux.shape[1], n_patches * hid, generator=gen) / math.sqrt(n_patches * hid)).to(dev).requires_grad_(True)
    aux_b = torch.zeros(pack.aux.shape[1], device=dev, requires_grad=True)
    trainable = list(params.values()) + ([aux_w, aux_b] if a.aux_weight > 0 else [])
    opt = torch.optim.AdamW(trainable, lr=a.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    use_amp = dev.type == "cuda"
    amp = (lambda: torch.autocast("cuda", torch.bfloat16)) if use_amp else contextlib.nullcontext
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

    held = pack.held_out[torch.randperm(len(pack.held_out), generator=gen)[:a.eval_examples].to(dev)]
    snapshots = sorted(float(s) for s in a.snapshots.split(","))
    metrics = open(os.path.join(a.out, "metrics.jsonl"), "w")
    pad = pack.meta["pad_id"]
    fa, ve = pack.meta["first_action_id"], pack.meta["action_vocab_end"]

    def evaluate(step):
        with torch.no_grad(), amp():
            tot = {"loss": 0.0, "acc": 0.0, "shuffled": 0.0, "aux": 0.0}
            chunks = held.split(512)
            for idx in chunks:
                px, i, v, lb, aux = pack.batch(idx, pad, mean, std)
                h, fl, patches = model.forward(px, i, v, lb)
                loss, acc = score(model, h, fl, fa, ve)
                h2, fl2, _ = model.forward(px.roll(1, 0), i, v, lb)
                shuffled, _ = score(model, h2, fl2, fa, ve)
                tot["loss"] += loss.item() / len(chunks)
                tot["acc"] += acc.item() / len(chunks)
                tot["shuffled"] += shuffled.item() / len(chunks)
                if a.aux_weight > 0:                          # an untrained head's error would mean nothing
                    pred = F.linear(patches.reshape(len(idx), -1).float(), aux_w, aux_b)
                    tot["aux"] += (pred - aux).pow(2).mean().item() / len(chunks)
        row = {"step": step, "split": "eval", "loss": tot["loss"], "action_accuracy": tot["acc"],
               "vision_gain": tot["shuffled"] - tot["loss"], "aux_loss": tot["aux"], "elapsed_s": time.time() - t_start}
        metrics.write(json.dumps(row) + "\n")
        metrics.flush()
        say(f"eval @ {step}: loss {row['loss']:.4f} acc {row['action_accuracy']:.3f} vision gain {row['vision_gain']:.3f} aux {row['aux_loss']:.4f}")

    def save(tag):
        path = os.path.join(a.out, f"model-{tag}.safetensors")
        write_safetensors(path, params)
        say(f"saved {path}")

    t_start = time.time()
    evaluate(0)
    step, max_steps, order, cursor = 0, None, None, 0
    next_snapshot = 0
    while True:
        if order is None or cursor + a.batch > len(order):
            order = pack.train[torch.randperm(len(pack.train), generator=gen).to(dev)]
            cursor = 0
        idx = order[cursor:cursor + a.batch]
        cursor += a.batch
        if max_steps is None and step == 300:
            rate = step / (time.time() - t_start)
            max_steps = a.max_steps or int(rate * a.seconds)
            say(f"{rate:.1f} steps/s ({rate * a.batch:.0f} samples/s): planning {max_steps} steps")
        if a.max_steps:
            max_steps = a.max_steps
        total = max_steps or 10 ** 9
        if step < a.warmup:
            lr = a.lr * (step + 1) / a.warmup
        else:
            lr = a.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - a.warmup) / max(1, total - a.warmup))))
        for g in opt.param_groups:
            g["lr"] = lr
        px, i, v, lb, aux = pack.batch(idx, pad, mean, std, a.random_shift, gen)
        with amp():
            h, fl, patches = model.forward(px, i, v, lb)
            loss, acc = score(model, h, fl, fa, ve)
            total_loss = loss
            if a.aux_weight > 0:
                pred = F.linear(patches.reshape(len(idx), -1).float(), aux_w, aux_b)
                aux_loss = (pred - aux).pow(2).mean()
                total_loss = loss + a.aux_weight * aux_loss
        opt.zero_grad(set_to_none=True)
        total_loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        step += 1
        if step % 100 == 0:
            row = {"step": step, "split": "train", "loss": loss.item(), "action_accuracy": acc.item(), "lr": lr,
                   "grad_norm": gn.item(), "elapsed_s": time.time() - t_start}
            metrics.write(json.dumps(row) + "\n")
        if step % a.eval_every == 0:
            evaluate(step)
        while max_steps and next_snapshot < len(snapshots) and step >= int(snapshots[next_snapshot] * max_steps):
            save(f"{int(round(snapshots[next_snapshot] * 100)):03d}")
            next_snapshot += 1
        if max_steps and step >= max_steps:
            break
        if a.stop_after and step >= a.stop_after:
            save(f"step{step}")
            break
    if step % a.eval_every:
        evaluate(step)
    say(f"done: {step} steps × {a.batch} in {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()
