"""Optional double-check of tests/fixtures/oft-golden/expected.json with torch (float64), written apart from
oft_reference.py: the .pt files are read with torch.load(weights_only=True), every LoRA layer runs unmerged as PEFT
runs it (base(x) + scaling * lora_B(lora_A(x)), the patch embedding's LoRA as two convolutions), FiLM and the
MLP-ResNet head use torch.nn.functional. Also checks that oft_reference's own .pt reader returns exactly what
torch.load returns.

Run:  /usr/bin/python3 tools/oftref/torch_check.py
"""

import json
import math
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import oft_reference as ref  # noqa: E402  (only for the readers of safetensors / PNG and the reader under test)

FIX = os.path.join(ref.REPO, "tests", "fixtures", "oft-golden")
T = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float64)  # noqa: E731


def load_pt(path):
    sd = torch.load(path, map_location="cpu", weights_only=True)
    return {(k[7:] if k.startswith("module.") else k): v.double() for k, v in sd.items()}, sd


def check_reader(path):
    mine = ref.read_pt_raw(path)
    theirs = torch.load(path, map_location="cpu", weights_only=True)
    assert list(mine.keys()) == list(theirs.keys()), path
    for k, v in theirs.items():
        m = mine[k]
        assert tuple(m.values.shape) == tuple(v.shape), k
        assert {"BFloat16Storage": torch.bfloat16, "FloatStorage": torch.float32}[m.storage_name] == v.dtype, k
        assert np.array_equal(m.values, v.double().numpy()), k
    return len(theirs)


class Model:
    def __init__(self, ckdir, lora_rank=32):
        self.cfg = json.load(open(os.path.join(ckdir, "config.json")))
        self.pre = json.load(open(os.path.join(ckdir, "preprocessor_config.json")))
        self.stats = json.load(open(os.path.join(ckdir, "dataset_statistics.json")))
        self.w = {k: T(v) for k, v in ref.read_sharded_safetensors(ckdir).items()}
        files = os.listdir(ckdir)
        pick = lambda s: os.path.join(ckdir, [f for f in files if s in f and "checkpoint" in f][0])  # noqa: E731
        self.head, _ = load_pt(pick("action_head"))
        self.proprio, _ = load_pt(pick("proprio_projector"))
        self.oft = self.cfg["oft"]
        self.vb = None
        if self.oft["use_film"]:
            self.vb = {k: v.double() for k, v in torch.load(pick("vision_backbone"), weights_only=True).items()}
            self.scaling = min(lora_rank, 16) / lora_rank

    # a Linear / Conv2d of a tower, LoRA'd (unmerged) when the FiLM checkpoint is in use
    def lin(self, tower, name, x):
        if self.vb is None:
            p = f"vision_backbone.{tower}.{name}"
            return F.linear(x, self.w[p + ".weight"], self.w[p + ".bias"])
        p = f"vision_backbone.{tower}.{self._film_name(name)}"
        y = F.linear(x, self.vb[p + ".base_layer.weight"], self.vb[p + ".base_layer.bias"])
        return y + self.scaling * F.linear(F.linear(x, self.vb[p + ".lora_A.default.weight"]),
                                           self.vb[p + ".lora_B.default.weight"])

    def param(self, tower, name):
        if self.vb is None:
            return self.w[f"vision_backbone.{tower}.{name}"]
        return self.vb[f"vision_backbone.{tower}.{self._film_name(name)}"]

    @staticmethod
    def _film_name(name):
        if name.startswith("blocks."):
            _, i, rest = name.split(".", 2)
            return f"blocks.{i}.block.{rest}"
        return name

    def tower(self, x, t, vc, avg):
        tower = ("featurizer", "fused_featurizer")[t]
        p, D, H = vc["patch_size"], vc["embed_dim"], vc["num_heads"]
        if self.vb is None:
            y = F.conv2d(x, self.param(tower, "patch_embed.proj.weight"), self.param(tower, "patch_embed.proj.bias"),
                         stride=p)
        else:
            q = f"vision_backbone.{tower}.patch_embed.proj"
            y = F.conv2d(x, self.vb[q + ".base_layer.weight"], self.vb[q + ".base_layer.bias"], stride=p)
            y = y + self.scaling * F.conv2d(F.conv2d(x, self.vb[q + ".lora_A.default.weight"], stride=p),
                                            self.vb[q + ".lora_B.default.weight"])
        y = y.flatten(2).transpose(1, 2)[0]  # [N, D]
        pre = []
        if vc["class_token"]:
            pre.append(self.param(tower, "cls_token")[0])
        if vc["num_register_tokens"]:
            pre.append(self.param(tower, "reg_token")[0])
        y = torch.cat(pre + [y + self.param(tower, "pos_embed")[0]], 0)
        n = y.shape[0]
        for i in range(vc["depth"] - 1):
            b = f"blocks.{i}."
            h = F.layer_norm(y, (D,), self.param(tower, b + "norm1.weight"), self.param(tower, b + "norm1.bias"), 1e-6)
            qkv = self.lin(tower, b + "attn.qkv", h).reshape(n, 3, H, D // H).permute(1, 2, 0, 3)
            a = torch.softmax(qkv[0] @ qkv[1].transpose(-1, -2) / math.sqrt(D // H), -1) @ qkv[2]
            o = self.lin(tower, b + "attn.proj", a.transpose(0, 1).reshape(n, D))
            if vc["layer_scale"]:
                o = o * self.param(tower, b + "ls1.scale_factor")
            y = y + o
            if self.vb is not None:
                fp = f"vision_backbone.{tower}.blocks.{i}."
                gamma = F.linear(avg, self.vb[fp + "scale.weight"], self.vb[fp + "scale.bias"])
                beta = F.linear(avg, self.vb[fp + "shift.weight"], self.vb[fp + "shift.bias"])
                y = y * (1 + gamma) + beta
            h = F.layer_norm(y, (D,), self.param(tower, b + "norm2.weight"), self.param(tower, b + "norm2.bias"), 1e-6)
            m = self.lin(tower, b + "mlp.fc2", F.gelu(self.lin(tower, b + "mlp.fc1", h)))
            if vc["layer_scale"]:
                m = m * self.param(tower, b + "ls2.scale_factor")
            y = y + m
        return y[sum(t.shape[0] for t in pre):]

    def llama(self, x):
        tc, w = self.cfg["text_config"], self.w
        L, D = x.shape
        nh = tc["num_attention_heads"]
        hd = D // nh
        inv = 1.0 / (tc["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
        ang = torch.arange(L, dtype=torch.float64)[:, None] * inv[None]
        cos, sin = torch.cat([ang, ang], 1).cos(), torch.cat([ang, ang], 1).sin()
        rot = lambda t: torch.cat([-t[..., hd // 2:], t[..., : hd // 2]], -1)  # noqa: E731
        rms = lambda t, g: t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + tc["rms_norm_eps"]) * g  # noqa: E731
        for i in range(tc["num_hidden_layers"]):
            p = f"language_model.model.layers.{i}."
            h = rms(x, w[p + "input_layernorm.weight"])
            q, k, v = (F.linear(h, w[p + f"self_attn.{n}_proj.weight"]).reshape(L, nh, hd).transpose(0, 1)
                       for n in "qkv")
            q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
            a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), -1) @ v  # no mask: bidirectional
            x = x + F.linear(a.transpose(0, 1).reshape(L, D), w[p + "self_attn.o_proj.weight"])
            h = rms(x, w[p + "post_attention_layernorm.weight"])
            x = x + F.linear(F.silu(F.linear(h, w[p + "mlp.gate_proj.weight"])) * F.linear(h, w[p + "mlp.up_proj.weight"]),
                             w[p + "mlp.down_proj.weight"])
        return rms(x, w["language_model.model.norm.weight"])

    def predict(self, imgs, prompt_ids, proprio, key):
        ids = list(prompt_ids) + ([] if prompt_ids[-1] == 259 else [259])
        n_prompt = len(ids) - 1
        A, C = self.oft["action_dim"], self.oft["action_chunk"]
        ids = ids + [1] * (A * C) + [2]
        emb = self.w["language_model.model.embed_tokens.weight"][torch.tensor(ids)]
        is_ph = torch.zeros(len(ids), dtype=torch.bool)
        is_ph[n_prompt + 1: n_prompt + 1 + A * C] = True
        avg = emb[~is_ph].mean(0)
        emb = emb * (~is_ph)[:, None]
        feats = []
        for im in imgs:
            x = T(im).permute(2, 0, 1) / 255.0
            per = []
            for t, (vc, npar) in enumerate(zip(self.cfg["vision_backbone_configs"], self.pre["tvf_normalize_params"])):
                xt = ((x - T(npar["mean"])[:, None, None]) / T(npar["std"])[:, None, None])[None]
                per.append(self.tower(xt, t, vc, avg))
            feats.append(torch.cat(per, 1))
        f = torch.cat(feats, 0)
        w = self.w
        f = F.linear(F.gelu(F.linear(F.gelu(F.linear(f, w["projector.fc1.weight"], w["projector.fc1.bias"])),
                                     w["projector.fc2.weight"], w["projector.fc2.bias"])),
                     w["projector.fc3.weight"], w["projector.fc3.bias"])
        st = self.stats[key]["proprio"]
        lo, hi = T(st["q01"]), T(st["q99"])
        mask = torch.tensor(st.get("mask", [True] * len(st["q01"])))
        raw = T(proprio)
        pn = torch.clamp(torch.where(mask, 2 * (raw - lo) / (hi - lo + 1e-8) - 1, raw), -1, 1)
        pr = self.proprio
        ptok = F.linear(F.gelu(F.linear(pn, pr["fc1.weight"], pr["fc1.bias"])), pr["fc2.weight"], pr["fc2.bias"])
        seq = torch.cat([emb[:1], f, ptok[None], emb[1:]], 0)
        hid = self.llama(seq)
        start = f.shape[0] + 1 + n_prompt
        x = hid[start: start + A * C].reshape(C, -1)
        hd = self.head
        x = F.relu(F.linear(F.layer_norm(x, (x.shape[1],), hd["model.layer_norm1.weight"], hd["model.layer_norm1.bias"]),
                            hd["model.fc1.weight"], hd["model.fc1.bias"]))
        for i in range(2):
            b = f"model.mlp_resnet_blocks.{i}.ffn."
            x = x + F.relu(F.linear(F.layer_norm(x, (x.shape[1],), hd[b + "0.weight"], hd[b + "0.bias"]),
                                    hd[b + "1.weight"], hd[b + "1.bias"]))
        x = F.layer_norm(x, (x.shape[1],), hd["model.layer_norm2.weight"], hd["model.layer_norm2.bias"])
        na = F.linear(x, hd["model.fc2.weight"], hd["model.fc2.bias"])
        sa = self.stats[key]["action"]
        lo, hi = T(sa["q01"]), T(sa["q99"])
        m = torch.tensor(sa.get("mask", [True] * len(sa["q01"])))
        return pn, na, torch.where(m, 0.5 * (na + 1) * (hi - lo + 1e-8) + lo, na)


def main():
    n = 0
    for v in ("checkpoint", "checkpoint-film"):
        d = os.path.join(FIX, v)
        for f in sorted(os.listdir(d)):
            if f.endswith(".pt"):
                n += check_reader(os.path.join(d, f))
    print(f"oft_reference.read_pt == torch.load for {n} tensors")
    exp = json.load(open(os.path.join(FIX, "expected.json")))
    imgs = {f: ref.read_png_rgb(os.path.join(FIX, f)) for f in ("image0.png", "image1.png", "image2.png")}
    worst = 0.0
    for v in ("checkpoint", "checkpoint-film"):
        mdl = Model(os.path.join(FIX, v))
        for c in exp["cases"]:
            pn, na, a = mdl.predict([imgs[i] for i in c["images"]], c["prompt_token_ids"], c["proprio"], c["unnorm_key"])
            d = max((pn - T(c["normalized_proprio"])).abs().max().item(),
                    (na - T(c[v]["normalized_actions"])).abs().max().item(),
                    (a - T(c[v]["actions"])).abs().max().item())
            worst = max(worst, d)
            print(f"{v:16s} {c['images']}: max |torch - expected| = {d:.3g}")
    assert worst < 1e-10, worst
    print("ok")


if __name__ == "__main__":
    main()
