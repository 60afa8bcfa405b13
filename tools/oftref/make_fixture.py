"""Writes tests/fixtures/oft-golden/: the OpenVLA golden checkpoint extended with OpenVLA-OFT components, and the
outputs the independent float64 reference (oft_reference.py) computes for it.

torch is used only to draw seeded random tensors, to round them to their storage dtype and to write the .pt files with
the real torch.save. The expected values are computed by oft_reference.py from the files as written (it reads the
.pt files back itself, without torch).

Run:  /usr/bin/python3 tools/oftref/make_fixture.py      (Debian: python3-numpy, python3-torch)
"""

import collections
import json
import os
import shutil
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import oft_reference as ref  # noqa: E402

REPO = ref.REPO
GOLD = os.path.join(REPO, "tests", "fixtures", "openvla-golden")
OUT = os.path.join(REPO, "tests", "fixtures", "oft-golden")

CHUNK, ADIM, PDIM, NUM_IMAGES = 4, 7, 5, 2
LORA_RANK = 32
LORA_ALPHA = min(LORA_RANK, 16)
STEP = 100

gen = torch.Generator().manual_seed(20250306)


def randn(*shape, std=1.0, mean=0.0):
    return torch.randn(*shape, generator=gen, dtype=torch.float32) * std + mean


# --------------------------------------------------------------------------------------------------------------------
# Component modules with the reference's attribute names (so state_dict() has the real keys and _metadata)
# --------------------------------------------------------------------------------------------------------------------


class MLPResNetBlock(torch.nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.ffn = torch.nn.Sequential(torch.nn.LayerNorm(dim), torch.nn.Linear(dim, dim), torch.nn.ReLU())


class MLPResNet(torch.nn.Module):
    def __init__(self, num_blocks, input_dim, hidden_dim, output_dim):
        super().__init__()
        self.layer_norm1 = torch.nn.LayerNorm(input_dim)
        self.fc1 = torch.nn.Linear(input_dim, hidden_dim)
        self.relu = torch.nn.ReLU()
        self.mlp_resnet_blocks = torch.nn.ModuleList([MLPResNetBlock(hidden_dim) for _ in range(num_blocks)])
        self.layer_norm2 = torch.nn.LayerNorm(hidden_dim)
        self.fc2 = torch.nn.Linear(hidden_dim, output_dim)


class L1RegressionActionHead(torch.nn.Module):
    def __init__(self, input_dim, hidden_dim, action_dim):
        super().__init__()
        self.model = MLPResNet(2, input_dim * ADIM, hidden_dim, action_dim)


class ProprioProjector(torch.nn.Module):
    def __init__(self, llm_dim, proprio_dim):
        super().__init__()
        self.fc1 = torch.nn.Linear(proprio_dim, llm_dim, bias=True)
        self.fc2 = torch.nn.Linear(llm_dim, llm_dim, bias=True)
        self.act_fn1 = torch.nn.GELU()


class DDPLike(torch.nn.Module):
    """Stands in for DistributedDataParallel: its state_dict() prefixes every key with 'module.'."""

    def __init__(self, module):
        super().__init__()
        self.module = module


def make_action_head(D):
    head = L1RegressionActionHead(D, D, ADIM)
    m = head.model
    with torch.no_grad():
        m.layer_norm1.weight.copy_(randn(D * ADIM, std=0.1, mean=1.0))
        m.layer_norm1.bias.copy_(randn(D * ADIM, std=0.05))
        m.fc1.weight.copy_(randn(D, D * ADIM, std=(D * ADIM) ** -0.5))
        m.fc1.bias.copy_(randn(D, std=0.05))
        for blk in m.mlp_resnet_blocks:
            blk.ffn[0].weight.copy_(randn(D, std=0.1, mean=1.0))
            blk.ffn[0].bias.copy_(randn(D, std=0.05))
            blk.ffn[1].weight.copy_(randn(D, D, std=0.7 * D ** -0.5))
            blk.ffn[1].bias.copy_(randn(D, std=0.05))
        m.layer_norm2.weight.copy_(randn(D, std=0.1, mean=1.0))
        m.layer_norm2.bias.copy_(randn(D, std=0.05))
        m.fc2.weight.copy_(randn(ADIM, D, std=0.06))
        m.fc2.bias.copy_(randn(ADIM, std=0.1))
    return head.to(torch.bfloat16)  # finetune.py: init_module(..., to_bf16=True) for the action head


def make_proprio_projector(D):
    pp = ProprioProjector(D, PDIM)
    with torch.no_grad():
        pp.fc1.weight.copy_(randn(D, PDIM, std=1.0))
        pp.fc1.bias.copy_(randn(D, std=0.1))
        pp.fc2.weight.copy_(randn(D, D, std=1.5 * D ** -0.5))
        pp.fc2.bias.copy_(randn(D, std=0.05))
    return DDPLike(pp)  # float32 (no to_bf16 for the proprio projector in finetune.py), saved from the DDP wrapper


# --------------------------------------------------------------------------------------------------------------------
# FiLM + LoRA vision backbone state dict
# --------------------------------------------------------------------------------------------------------------------


def bf16(t):
    return t.to(torch.bfloat16)


def tower_param_names(names, tower, depth):
    """Tower parameter names (without 'vision_backbone.<tower>.') in timm registration order, grouped per block."""
    own = [n for n in names if n.startswith(f"vision_backbone.{tower}.")]
    own = [n[len(f"vision_backbone.{tower}."):] for n in own]
    order = []
    for n in ("cls_token", "reg_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"):
        if n in own:
            order.append(n)
    block_sub = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
                 "attn.proj.bias", "ls1.scale_factor", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
                 "mlp.fc2.weight", "mlp.fc2.bias", "ls2.scale_factor"]
    blocks = []
    for i in range(depth):
        blocks.append([s for s in block_sub if f"blocks.{i}.{s}" in own])
    tail = [n for n in ("norm.weight", "norm.bias", "attn_pool.latent", "attn_pool.q.weight", "attn_pool.q.bias",
                        "attn_pool.kv.weight", "attn_pool.kv.bias", "attn_pool.proj.weight", "attn_pool.proj.bias",
                        "attn_pool.norm.weight", "attn_pool.norm.bias", "attn_pool.mlp.fc1.weight",
                        "attn_pool.mlp.fc1.bias", "attn_pool.mlp.fc2.weight", "attn_pool.mlp.fc2.bias") if n in own]
    covered = set(order) | set(tail) | {f"blocks.{i}.{s}" for i in range(depth) for s in blocks[i]}
    missing = set(own) - covered
    if missing:
        raise KeyError(f"unplaced tower parameters: {sorted(missing)}")
    return order, blocks, tail


# PEFT 0.11.1 'all-linear' collects the last name component of every nn.Linear in the model and wraps every
# nn.Linear / nn.Conv2d whose name ends in one of them; in a tower that is qkv, proj, fc1, fc2, q, kv, and the patch
# embedding's Conv2d (its name ends in '.proj').
LORA_LAYERS = ("patch_embed.proj", "attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "attn_pool.q", "attn_pool.kv",
               "attn_pool.proj", "attn_pool.mlp.fc1", "attn_pool.mlp.fc2")


def lora_layer_of(name):
    for suffix in LORA_LAYERS:
        if name == f"{suffix}.weight" or name == f"{suffix}.bias" or name.endswith(f".{suffix}.weight") \
                or name.endswith(f".{suffix}.bias"):
            return name.rsplit(".", 1)
    return None


def make_film_backbone(base, cfg):
    D_llm = cfg["text_config"]["hidden_size"]
    names = list(base.keys())
    sd = collections.OrderedDict()
    scaling = LORA_ALPHA / LORA_RANK

    def put_param(full_prefix, name, value):
        ll = lora_layer_of(name)
        if ll is None:
            sd[full_prefix + name] = bf16(torch.from_numpy(value).float())
            return
        layer, param = ll
        sd[f"{full_prefix}{layer}.base_layer.{param}"] = bf16(torch.from_numpy(value).float())
        if param == "bias":
            w = base[f"{full_prefix.replace('.block.', '.')}{layer}.weight"]
            out_f, in_shape = w.shape[0], tuple(w.shape[1:])
            # delta = scaling * B @ A with about a quarter of the base weight's spread
            a_std = 0.1
            b_std = 0.25 * float(w.std()) / (scaling * LORA_RANK ** 0.5 * a_std)
            # Linear: A [r, in], B [out, r]; Conv2d: A is Conv2d(in, r, k, stride k) [r, in, k, k],
            # B a 1x1 Conv2d(r, out) [out, r, 1, 1]
            A = randn(LORA_RANK, *in_shape, std=a_std)
            B = randn(out_f, LORA_RANK, *([1, 1] if len(in_shape) == 3 else []), std=b_std)
            sd[f"{full_prefix}{layer}.lora_A.default.weight"] = bf16(A)
            sd[f"{full_prefix}{layer}.lora_B.default.weight"] = bf16(B)

    for tower, vcfg in zip(("featurizer", "fused_featurizer"), cfg["vision_backbone_configs"]):
        D = vcfg["embed_dim"]
        pre = f"vision_backbone.{tower}."
        order, blocks, tail = tower_param_names(names, tower, vcfg["depth"])
        # weight before bias in the stored order: emit the bias call last so the LoRA factors follow the base layer
        for n in order:
            put_param(pre, n, base[pre + n])
        for i in range(vcfg["depth"]):
            bp = f"{pre}blocks.{i}.block."
            for s in blocks[i]:
                put_param(bp, s, base[f"{pre}blocks.{i}.{s}"])
            # FiLM projections: created after get_peft_model, so plain nn.Linear, float32 (never cast to bf16)
            for nm, gstd in (("scale", 0.12), ("shift", 0.08)):
                sd[f"{pre}blocks.{i}.{nm}.weight"] = randn(D, D_llm, std=gstd)
                sd[f"{pre}blocks.{i}.{nm}.bias"] = randn(D, std=0.05)
        for n in tail:
            put_param(pre, n, base[pre + n])
    return sd


# --------------------------------------------------------------------------------------------------------------------
# Statistics and cases
# --------------------------------------------------------------------------------------------------------------------

PROPRIO_STATS = {
    "sim_alpha": {
        "mean": [0.12, -0.35, 0.8, 0.02, 0.04],
        "std": [0.1, 0.2, 0.15, 0.4, 0.02],
        "max": [0.41, 0.21, 1.32, 1.05, 0.081],
        "min": [-0.17, -0.93, 0.31, -0.96, 0.0],
        "q01": [-0.11, -0.81, 0.42, -0.77, 0.001],
        "q99": [0.35, 0.12, 1.19, 0.83, 0.079],
        "mask": [True, True, True, False, True],
    },
    "sim_beta": {
        "mean": [-0.5, 0.25, 0.0, 1.5, -0.02],
        "std": [0.3, 0.05, 0.6, 0.25, 0.1],
        "max": [0.45, 0.41, 1.9, 2.3, 0.28],
        "min": [-1.6, 0.09, -1.95, 0.7, -0.31],
        "q01": [-1.3, 0.12, -1.6, 0.85, -0.25],
        "q99": [0.3, 0.37, 1.55, 2.1, 0.22],
    },
}

# (golden case index, camera images, unnorm_key, raw proprio, keep the trailing '\u2581' in prompt_token_ids)
CASES = [
    (0, ["image0.png", "image1.png"], "sim_alpha", [0.05, -0.95, 1.0, 0.37, 0.2], True),
    (1, ["image1.png", "image2.png"], "sim_beta", [-1.45, 0.3, 0.1, 2.2, -0.05], True),
    (2, ["image2.png", "image0.png"], "sim_alpha", [0.5, -0.3, 0.35, -2.5, 0.05], False),
]


def r(x):
    a = np.asarray(x, dtype=np.float64)
    return a.tolist()


def main():
    if os.path.exists(OUT):
        shutil.rmtree(OUT)
    os.makedirs(OUT)
    gold_ck = os.path.join(GOLD, "checkpoint")
    with open(os.path.join(gold_ck, "config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(gold_ck, "dataset_statistics.json")) as f:
        stats = json.load(f)
    with open(os.path.join(GOLD, "expected.json")) as f:
        gold = json.load(f)
    D = cfg["text_config"]["hidden_size"]

    for k in stats:
        stats[k]["proprio"] = {kk: vv for kk, vv in PROPRIO_STATS[k].items()}

    head = make_action_head(D)
    proprio = make_proprio_projector(D)
    base = ref.read_sharded_safetensors(gold_ck)
    film_sd = make_film_backbone(base, cfg)

    for variant, use_film in (("checkpoint", False), ("checkpoint-film", True)):
        d = os.path.join(OUT, variant)
        os.makedirs(d)
        for fn in os.listdir(gold_ck):
            if fn not in ("config.json", "dataset_statistics.json"):
                shutil.copyfile(os.path.join(gold_ck, fn), os.path.join(d, fn))
        c = dict(cfg)
        c["oft"] = {"action_chunk": CHUNK, "action_dim": ADIM, "proprio_dim": PDIM, "num_images": NUM_IMAGES,
                    "use_film": use_film, "normalization": "bounds_q99"}
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(c, f, indent=2)
            f.write("\n")
        with open(os.path.join(d, "dataset_statistics.json"), "w") as f:
            json.dump(stats, f, indent=2)
            f.write("\n")
        torch.save(head.state_dict(), os.path.join(d, f"action_head--{STEP}_checkpoint.pt"))
        torch.save(proprio.state_dict(), os.path.join(d, f"proprio_projector--{STEP}_checkpoint.pt"))
        if use_film:
            torch.save(film_sd, os.path.join(d, f"vision_backbone--{STEP}_checkpoint.pt"))

    for fn in ("image0.png", "image1.png", "image2.png"):
        shutil.copyfile(os.path.join(GOLD, fn), os.path.join(OUT, fn))

    # ---- expected values, computed from the files as written -------------------------------------------------------
    policies = {v: ref.OFTPolicy(os.path.join(OUT, v), lora_rank=LORA_RANK) for v in ("checkpoint", "checkpoint-film")}
    images = {fn: ref.read_png_rgb(os.path.join(OUT, fn)) for fn in ("image0.png", "image1.png", "image2.png")}
    cases = []
    for gi, cams, key, raw, keep_space in CASES:
        g = gold["cases"][gi]
        ids = list(g["prompt_token_ids"])
        assert ids[-1] == ref.SPACE_ID_TINY
        if not keep_space:
            ids = ids[:-1]
        case = collections.OrderedDict()
        case["images"] = cams
        case["instruction"] = g["instruction"]
        case["prompt_token_ids"] = ids
        case["unnorm_key"] = key
        case["proprio"] = raw
        results = {}
        for v, pol in policies.items():
            results[v] = pol.predict([images[c] for c in cams], ids, raw, key)
        lay = results["checkpoint"]["layout"]
        case["layout"] = collections.OrderedDict(
            appended_space_token=not keep_space,
            input_ids=lay["input_ids"],
            num_prompt_tokens=lay["num_prompt_tokens"],
            patches_per_image=lay["patches_per_image"],
            num_images=NUM_IMAGES,
            num_patches=lay["num_patches"],
            num_placeholders=lay["num_placeholders"],
            sequence_length=lay["sequence_length"],
            first_head_position=lay["first_head_position"],
        )
        np.testing.assert_array_equal(results["checkpoint"]["normalized_proprio"],
                                      results["checkpoint-film"]["normalized_proprio"])
        case["normalized_proprio"] = r(results["checkpoint"]["normalized_proprio"])
        for v in ("checkpoint", "checkpoint-film"):
            res = results[v]
            out = collections.OrderedDict()
            out["normalized_actions"] = r(res["normalized_actions"])
            out["actions"] = r(res["actions"])
            out["debug"] = collections.OrderedDict(
                projected_patch0_first8=r(res["patches"][0, :8]),
                proprio_token_first8=r(res["proprio_token"][:8]),
                first_head_hidden_first8=r(res["hidden_first"][:8]),
            )
            dd = res["discrete"]
            out["parallel_discrete"] = collections.OrderedDict(
                token_ids=dd["token_ids"], margins=dd["margins"],
                normalized_actions=r(dd["normalized_actions"]), actions=r(dd["actions"]))
            case[v] = out
        cases.append(case)

    expected = collections.OrderedDict()
    expected["generator"] = "tools/oftref/make_fixture.py (values from tools/oftref/oft_reference.py, float64)"
    expected["oft"] = {"action_chunk": CHUNK, "action_dim": ADIM, "proprio_dim": PDIM, "num_images": NUM_IMAGES,
                       "normalization": "bounds_q99"}
    expected["lora"] = {"rank": LORA_RANK, "alpha": LORA_ALPHA, "scaling": LORA_ALPHA / LORA_RANK}
    expected["space_token_id"] = ref.SPACE_ID_TINY
    expected["cases"] = cases
    with open(os.path.join(OUT, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1)
        f.write("\n")

    readme_src = os.path.join(HERE, "fixture_README.md")
    shutil.copyfile(readme_src, os.path.join(OUT, "README.md"))
    summarize(cases, policies)


def summarize(cases, policies):
    for c in cases:
        print(f"case {c['images']} {c['unnorm_key']}: normalized proprio {np.round(c['normalized_proprio'], 4)}")
        for v in ("checkpoint", "checkpoint-film"):
            na = np.array(c[v]["normalized_actions"])
            a = np.array(c[v]["actions"])
            dm = min(c[v]["parallel_discrete"]["margins"])
            print(f"  {v:16s} normalized in [{na.min():+.3f}, {na.max():+.3f}] max|.| {np.abs(na).max():.3f}; "
                  f"actions max|.| {np.abs(a).max():.3f}; discrete min margin {dm:.3g}")
        d = np.abs(np.array(c["checkpoint"]["normalized_actions"]) - np.array(c["checkpoint-film"]["normalized_actions"]))
        print(f"  film vs plain: max |diff| {d.max():.3f}")
    total = 0
    for root, _, files in os.walk(OUT):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    print(f"fixture size: {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
