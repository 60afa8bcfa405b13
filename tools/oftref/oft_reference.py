"""Independent float64 reference for OpenVLA and OpenVLA-OFT inference (numpy only).

Reads a checkpoint in the Hugging Face OpenVLA layout (safetensors shards + index, config.json with this project's
`vision_backbone_configs` / `text_config` size extension, preprocessor_config.json, dataset_statistics.json) and the
OFT component files written by torch.save (`action_head--*.pt`, `proprio_projector--*.pt`, `vision_backbone--*.pt`).
The .pt files are read here with zipfile and a restricted unpickler, not with torch.load, so nothing in this file
depends on torch.

What is computed (see docs/oft.md for the reference code each step follows):

  * plain OpenVLA: `greedy_actions` - causal Llama, greedy decoding of 7 action tokens, bin-centre de-tokenization,
    un-normalization without +1e-8 (OpenVLAForActionPrediction.predict_action of openvla/openvla);
  * OpenVLA-OFT: `oft_predict` - one bidirectional forward pass over
    [BOS, patches of every camera, proprio token, prompt[1:], zeroed placeholders, stop], the L1-regression
    MLP-ResNet head on the hidden states starting one position before the placeholders, un-normalization with
    +1e-8 (moojink/openvla-oft, prismatic/extern/hf/modeling_prismatic.py), optional FiLM + LoRA vision backbone.

All arithmetic is float64. Weights stored as bf16 are widened exactly. Pixels are computed in float64 from the
uint8 image with the preprocessor's (bf16-rounded) `tvf_normalize_params`; no bf16 rounding of activations or
pixels is simulated.

Usage:  /usr/bin/python3 tools/oftref/oft_reference.py      # checks tests/fixtures/openvla-golden/expected.json
"""

import collections
import io
import json
import math
import os
import pickle
import struct
import sys
import zipfile
import zlib

import numpy as np

REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

# --------------------------------------------------------------------------------------------------------------------
# File readers
# --------------------------------------------------------------------------------------------------------------------


def _bf16_to_f64(raw_u16):
    return (raw_u16.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


_ST_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "U8": "u1", "BOOL": "?"}


def read_safetensors(path):
    """name -> float64 (or integer) ndarray. Format: u64 LE header length, JSON header, raw little-endian data."""
    with open(path, "rb") as f:
        blob = f.read()
    (hlen,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + hlen].decode("utf-8"))
    base = 8 + hlen
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        buf = blob[base + a : base + b]
        shape = tuple(info["shape"])
        if info["dtype"] == "BF16":
            arr = _bf16_to_f64(np.frombuffer(buf, dtype="<u2"))
        else:
            arr = np.frombuffer(buf, dtype=_ST_DTYPES[info["dtype"]])
            if arr.dtype.kind == "f":
                arr = arr.astype(np.float64)
        out[name] = arr.reshape(shape)
    return out


def read_sharded_safetensors(ckpt_dir):
    index_path = os.path.join(ckpt_dir, "model.safetensors.index.json")
    if os.path.exists(index_path):
        with open(index_path) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
    else:
        shards = ["model.safetensors"]
    out = {}
    for s in shards:
        out.update(read_safetensors(os.path.join(ckpt_dir, s)))
    return out


# --- torch.save zip archives -----------------------------------------------------------------------------------------

# storage class name -> (numpy dtype of the raw bytes, converter to the value array)
_STORAGE_TYPES = {
    "DoubleStorage": ("<f8", None),
    "FloatStorage": ("<f4", None),
    "HalfStorage": ("<f2", None),
    "BFloat16Storage": ("<u2", _bf16_to_f64),
    "LongStorage": ("<i8", None),
    "IntStorage": ("<i4", None),
    "ShortStorage": ("<i2", None),
    "CharStorage": ("i1", None),
    "ByteStorage": ("u1", None),
    "BoolStorage": ("?", None),
}


class _StorageType:
    def __init__(self, name):
        self.name = name


class _Tensor:
    """What a .pt file holds for one tensor: values (float64 for floating types) plus the stored dtype name."""

    def __init__(self, values, storage_name):
        self.values = values
        self.storage_name = storage_name


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, *rest):
    values, name = storage
    size, stride = tuple(size), tuple(stride)
    if len(size) == 0:
        arr = np.array(values[storage_offset])
    else:
        need = storage_offset + sum((s - 1) * st for s, st in zip(size, stride)) + 1
        if min(size) > 0 and need > values.shape[0]:
            raise ValueError("tensor view exceeds its storage")
        item = values.itemsize
        arr = np.lib.stride_tricks.as_strided(
            values[storage_offset:], shape=size, strides=tuple(st * item for st in stride), writeable=False
        ).copy()
    return _Tensor(arr, name)


class _RestrictedUnpickler(pickle.Unpickler):
    """Only the globals a torch.save'd state dict needs; everything else is refused."""

    def __init__(self, fileobj, zf, prefix):
        super().__init__(fileobj)
        self._zf, self._prefix, self._cache = zf, prefix, {}

    def find_class(self, module, name):
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor_v2
        if module == "torch" and name in _STORAGE_TYPES:
            return _StorageType(name)
        raise pickle.UnpicklingError(f"refused global {module}.{name}")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        stype, key = pid[1], str(pid[2])
        if not isinstance(stype, _StorageType):
            raise pickle.UnpicklingError("storage type is not a whitelisted torch storage")
        if key not in self._cache:
            np_dtype, conv = _STORAGE_TYPES[stype.name]
            raw = np.frombuffer(self._zf.read(f"{self._prefix}data/{key}"), dtype=np_dtype)
            vals = conv(raw) if conv is not None else (raw.astype(np.float64) if raw.dtype.kind == "f" else raw)
            self._cache[key] = (vals, stype.name)
        return self._cache[key]


def read_pt_raw(path):
    """Reads a torch.save zip archive of a (nested) dict of tensors; tensors come back as _Tensor."""
    with zipfile.ZipFile(path) as zf:
        pkl = [n for n in zf.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pkl) != 1:
            raise ValueError(f"{path}: not a torch zip archive")
        prefix = pkl[0][: -len("data.pkl")]
        bo = f"{prefix}byteorder"
        if bo in zf.namelist() and zf.read(bo).strip() != b"little":
            raise ValueError("big-endian archives are not supported")
        return _RestrictedUnpickler(io.BytesIO(zf.read(pkl[0])), zf, prefix).load()


def read_pt(path, strip_module_prefix=True):
    """name -> float64 ndarray, with DDP's leading 'module.' removed when present (load_component_state_dict)."""
    sd = read_pt_raw(path)
    out = collections.OrderedDict()
    for k, v in sd.items():
        if strip_module_prefix and k.startswith("module."):
            k = k[len("module.") :]
        out[k] = v.values
    return out


def read_pt_dtypes(path):
    return collections.OrderedDict((k, v.storage_name) for k, v in read_pt_raw(path).items())


# --- PNG (8-bit, non-interlaced gray/RGB/RGBA), enough for the fixture images ------------------------------------------


def read_png_rgb(path):
    with open(path, "rb") as f:
        data = f.read()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG")
    pos, idat, ihdr = 8, [], None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        ctype = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if ctype == b"IHDR":
            ihdr = struct.unpack(">IIBBBBB", body)
        elif ctype == b"IDAT":
            idat.append(body)
        elif ctype == b"IEND":
            break
    w, h, depth, color, _, _, interlace = ihdr
    if depth != 8 or interlace != 0 or color not in (0, 2, 4, 6):
        raise ValueError("unsupported PNG variant")
    ch = {0: 1, 2: 3, 4: 2, 6: 4}[color]
    raw = zlib.decompress(b"".join(idat))
    stride = w * ch
    img = np.zeros((h, stride), dtype=np.int64)
    prev = np.zeros(stride, dtype=np.int64)
    for y in range(h):
        ft = raw[y * (stride + 1)]
        line = np.frombuffer(raw, dtype=np.uint8, count=stride, offset=y * (stride + 1) + 1).astype(np.int64)
        cur = np.zeros(stride, dtype=np.int64)
        for x in range(stride):
            a = cur[x - ch] if x >= ch else 0
            b = prev[x]
            c = prev[x - ch] if x >= ch else 0
            if ft == 0:
                p = 0
            elif ft == 1:
                p = a
            elif ft == 2:
                p = b
            elif ft == 3:
                p = (a + b) // 2
            elif ft == 4:
                pa, pb, pc = abs(b - c), abs(a - c), abs(a + b - 2 * c)
                p = a if (pa <= pb and pa <= pc) else (b if pb <= pc else c)
            else:
                raise ValueError("bad PNG filter")
            cur[x] = (line[x] + p) & 0xFF
        img[y] = cur
        prev = cur
    img = img.reshape(h, w, ch).astype(np.uint8)
    if ch == 1:
        img = np.repeat(img, 3, axis=2)
    elif ch == 2:
        img = np.repeat(img[:, :, :1], 3, axis=2)
    elif ch == 4:
        img = img[:, :, :3]  # PIL's convert("RGB") drops alpha
    return img


# --------------------------------------------------------------------------------------------------------------------
# Numerics
# --------------------------------------------------------------------------------------------------------------------

_erf = np.vectorize(math.erf, otypes=[np.float64])


def gelu(x):
    """Exact (erf) GELU, torch.nn.GELU() default."""
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def layer_norm(x, w, b, eps):
    mu = x.mean(axis=-1, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def rms_norm(x, w, eps):
    return x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps) * w


def linear(x, w, b=None):
    y = x @ w.T
    return y if b is None else y + b


def softmax(x, axis=-1):
    m = x.max(axis=axis, keepdims=True)
    e = np.exp(x - m)
    return e / e.sum(axis=axis, keepdims=True)


# --------------------------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------------------------


class Checkpoint:
    def __init__(self, ckpt_dir):
        self.dir = ckpt_dir
        with open(os.path.join(ckpt_dir, "config.json")) as f:
            self.config = json.load(f)
        with open(os.path.join(ckpt_dir, "preprocessor_config.json")) as f:
            self.preproc = json.load(f)
        self.w = read_sharded_safetensors(ckpt_dir)
        # openvla_utils._load_dataset_stats: dataset_statistics.json replaces config.norm_stats when present.
        ds = os.path.join(ckpt_dir, "dataset_statistics.json")
        if os.path.exists(ds):
            with open(ds) as f:
                self.norm_stats = json.load(f)
        else:
            self.norm_stats = self.config["norm_stats"]
        self.tc = self.config["text_config"]
        self.vcfgs = self.config["vision_backbone_configs"]
        self.oft = self.config.get("oft")

    # --- pixels -------------------------------------------------------------------------------------------------
    def pixel_values(self, rgb_u8):
        """[6, H, W]: tower 0's 3 channels, then tower 1's (PrismaticImageProcessor.apply_transform + vstack).
        Images must already be at the input size (the resize and centre crop are then identities)."""
        chans = []
        x = rgb_u8.astype(np.float64).transpose(2, 0, 1) / 255.0
        for p in self.preproc["tvf_normalize_params"]:
            mean = np.array(p["mean"], dtype=np.float64)[:, None, None]
            std = np.array(p["std"], dtype=np.float64)[:, None, None]
            chans.append((x - mean) / std)
        return np.concatenate(chans, axis=0)

    # --- vision ------------------------------------------------------------------------------------------------
    def vit_tower(self, px3, prefix, vcfg, weights=None, film=None):
        """timm VisionTransformer.get_intermediate_layers(n={depth-2}) without final norm, prefix tokens removed.
        `weights` overrides self.w (FiLM checkpoints carry their own, LoRA-merged, tower weights);
        `film` = list over blocks of (gamma, beta) applied after the attention residual."""
        W = self.w if weights is None else weights
        g = lambda n: W[prefix + n]
        p = vcfg["patch_size"]
        D = vcfg["embed_dim"]
        H = vcfg["num_heads"]
        hd = D // H
        C, Hh, Ww = px3.shape
        gh, gw = Hh // p, Ww // p
        patches = px3.reshape(C, gh, p, gw, p).transpose(1, 3, 0, 2, 4).reshape(gh * gw, C * p * p)
        x = linear(patches, g("patch_embed.proj.weight").reshape(D, C * p * p), g("patch_embed.proj.bias"))
        prefix_tokens = []
        if vcfg.get("class_token", False):
            prefix_tokens.append(g("cls_token").reshape(1, D))
        nreg = vcfg.get("num_register_tokens", 0)
        if nreg:
            prefix_tokens.append(g("reg_token").reshape(nreg, D))
        npre = sum(t.shape[0] for t in prefix_tokens)
        pos = g("pos_embed").reshape(-1, D)
        if pos.shape[0] == x.shape[0]:  # no_embed_class: add, then prepend prefix tokens
            x = np.concatenate(prefix_tokens + [x + pos], axis=0)
        else:  # pos_embed covers the prefix tokens too: prepend, then add
            x = np.concatenate(prefix_tokens + [x], axis=0) + pos
        eps = 1e-6  # timm VisionTransformer default norm_layer = partial(nn.LayerNorm, eps=1e-6)
        take = vcfg["depth"] - 2
        n_tok = x.shape[0]
        for i in range(take + 1):
            b = f"blocks.{i}."
            h = layer_norm(x, g(b + "norm1.weight"), g(b + "norm1.bias"), eps)
            qkv = linear(h, g(b + "attn.qkv.weight"), g(b + "attn.qkv.bias")).reshape(n_tok, 3, H, hd)
            q, k, v = qkv[:, 0].transpose(1, 0, 2), qkv[:, 1].transpose(1, 0, 2), qkv[:, 2].transpose(1, 0, 2)
            att = softmax((q @ k.transpose(0, 2, 1)) * hd ** -0.5)
            o = (att @ v).transpose(1, 0, 2).reshape(n_tok, D)
            o = linear(o, g(b + "attn.proj.weight"), g(b + "attn.proj.bias"))
            if (prefix + b + "ls1.scale_factor") in W:
                o = o * g(b + "ls1.scale_factor")
            x = x + o
            if film is not None:
                gamma, beta = film[i]
                x = x * (1.0 + gamma) + beta
            h = layer_norm(x, g(b + "norm2.weight"), g(b + "norm2.bias"), eps)
            m = linear(gelu(linear(h, g(b + "mlp.fc1.weight"), g(b + "mlp.fc1.bias"))),
                       g(b + "mlp.fc2.weight"), g(b + "mlp.fc2.bias"))
            if (prefix + b + "ls2.scale_factor") in W:
                m = m * g(b + "ls2.scale_factor")
            x = x + m
        return x[npre:]

    def fused_features(self, px6, tower_weights=None, films=None):
        """[num_patches, D0 + D1] for one camera (PrismaticVisionBackbone.forward, fused branch)."""
        prefixes = ["vision_backbone.featurizer.", "vision_backbone.fused_featurizer."]
        outs = []
        for t in range(2):
            outs.append(self.vit_tower(px6[3 * t : 3 * t + 3], prefixes[t], self.vcfgs[t],
                                       None if tower_weights is None else tower_weights,
                                       None if films is None else films[t]))
        return np.concatenate(outs, axis=1)

    def project(self, feats):
        W = self.w
        h = gelu(linear(feats, W["projector.fc1.weight"], W["projector.fc1.bias"]))
        h = gelu(linear(h, W["projector.fc2.weight"], W["projector.fc2.bias"]))
        return linear(h, W["projector.fc3.weight"], W["projector.fc3.bias"])

    # --- language model ------------------------------------------------------------------------------------------
    def embed(self, ids):
        return self.w["language_model.model.embed_tokens.weight"][np.asarray(ids)]

    def llama(self, x, causal):
        """Final-norm hidden states [L, D] of LlamaModel on inputs_embeds x, positions 0..L-1."""
        W, tc = self.w, self.tc
        L, D = x.shape
        nh = tc["num_attention_heads"]
        nkv = tc.get("num_key_value_heads", nh)
        hd = D // nh
        eps = tc["rms_norm_eps"]
        theta = tc.get("rope_theta", 10000.0)
        inv_freq = 1.0 / (theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
        ang = np.arange(L, dtype=np.float64)[:, None] * inv_freq[None, :]
        cos = np.cos(np.concatenate([ang, ang], axis=1))[None]
        sin = np.sin(np.concatenate([ang, ang], axis=1))[None]

        def rope(t):  # t: [heads, L, hd]; HF rotate_half
            half = hd // 2
            rot = np.concatenate([-t[..., half:], t[..., :half]], axis=-1)
            return t * cos + rot * sin

        mask = np.triu(np.full((L, L), -np.inf), k=1) if causal else np.zeros((L, L))
        for i in range(tc["num_hidden_layers"]):
            p = f"language_model.model.layers.{i}."
            h = rms_norm(x, W[p + "input_layernorm.weight"], eps)
            q = linear(h, W[p + "self_attn.q_proj.weight"]).reshape(L, nh, hd).transpose(1, 0, 2)
            k = linear(h, W[p + "self_attn.k_proj.weight"]).reshape(L, nkv, hd).transpose(1, 0, 2)
            v = linear(h, W[p + "self_attn.v_proj.weight"]).reshape(L, nkv, hd).transpose(1, 0, 2)
            q, k = rope(q), rope(k)
            if nkv != nh:
                k = np.repeat(k, nh // nkv, axis=0)
                v = np.repeat(v, nh // nkv, axis=0)
            att = softmax(q @ k.transpose(0, 2, 1) / math.sqrt(hd) + mask[None])
            o = (att @ v).transpose(1, 0, 2).reshape(L, nh * hd)
            x = x + linear(o, W[p + "self_attn.o_proj.weight"])
            h = rms_norm(x, W[p + "post_attention_layernorm.weight"], eps)
            gte = linear(h, W[p + "mlp.gate_proj.weight"])
            up = linear(h, W[p + "mlp.up_proj.weight"])
            x = x + linear(gte / (1.0 + np.exp(-gte)) * up, W[p + "mlp.down_proj.weight"])
        return rms_norm(x, W["language_model.model.norm.weight"], eps)

    def logits(self, hidden):
        return hidden @ self.w["language_model.lm_head.weight"].T

    # --- de-tokenization / statistics ----------------------------------------------------------------------------
    @property
    def action_vocab_size(self):
        return self.tc["vocab_size"] - self.config["pad_to_multiple_of"]

    def bin_centers(self):
        bins = np.linspace(-1, 1, self.config["n_action_bins"])
        return (bins[:-1] + bins[1:]) / 2.0

    def tokens_to_normalized(self, ids):
        centers = self.bin_centers()
        d = self.action_vocab_size - np.asarray(ids)
        d = np.clip(d - 1, 0, centers.shape[0] - 1)
        return centers[d]

    def bounds(self, stats, norm_type):
        if norm_type == "bounds":
            low, high = np.array(stats["min"], dtype=np.float64), np.array(stats["max"], dtype=np.float64)
        elif norm_type == "bounds_q99":
            low, high = np.array(stats["q01"], dtype=np.float64), np.array(stats["q99"], dtype=np.float64)
        else:
            raise ValueError(norm_type)
        mask = np.array(stats.get("mask", [True] * len(low)), dtype=bool)
        return low, high, mask


SPACE_ID_TINY = 259  # the lone '\u2581' piece of the fixture tokenizer (29871 in Llama-2's)


# --------------------------------------------------------------------------------------------------------------------
# Plain OpenVLA (golden check)
# --------------------------------------------------------------------------------------------------------------------


def greedy_actions(ck, rgb_u8, prompt_ids, unnorm_key, n_tokens=7, space_id=SPACE_ID_TINY):
    ids = list(prompt_ids)
    if ids[-1] != space_id:
        ids.append(space_id)
    feats = ck.project(ck.fused_features(ck.pixel_values(rgb_u8)))
    emb = ck.embed(ids)
    prefix = np.concatenate([emb[:1], feats, emb[1:]], axis=0)
    gen, margins = [], []
    x = prefix
    for _ in range(n_tokens):
        lg = ck.logits(ck.llama(x, causal=True)[-1])
        order = np.argsort(-lg, kind="stable")
        gen.append(int(order[0]))
        margins.append(float(lg[order[0]] - lg[order[1]]))
        x = np.concatenate([x, ck.embed([order[0]])], axis=0)
    norm = ck.tokens_to_normalized(gen)
    low, high, mask = ck.bounds(ck.norm_stats[unnorm_key]["action"], "bounds_q99")
    act = np.where(mask, 0.5 * (norm + 1) * (high - low) + low, norm)
    return gen, norm, act, margins


def check_golden(golden_dir=None, verbose=True):
    golden_dir = golden_dir or os.path.join(REPO, "tests", "fixtures", "openvla-golden")
    ck = Checkpoint(os.path.join(golden_dir, "checkpoint"))
    with open(os.path.join(golden_dir, "expected.json")) as f:
        exp = json.load(f)
    worst = 0.0
    for c in exp["cases"]:
        img = read_png_rgb(os.path.join(golden_dir, c["image"]))
        gen, norm, act, margins = greedy_actions(ck, img, c["prompt_token_ids"], c["unnorm_key"])
        if gen != c["action_token_ids"]:
            raise AssertionError(f"{c['image']}: ids {gen} != {c['action_token_ids']}")
        d = max(np.max(np.abs(norm - c["normalized_action"])), np.max(np.abs(act - c["action"])))
        dm = np.max(np.abs(np.array(margins) - c["margins"]))
        worst = max(worst, d)
        if verbose:
            print(f"golden {c['image']}: ids {gen} ok; max|action diff| {d:.3g}; max|margin diff| {dm:.3g}")
        if d > 1e-9:
            raise AssertionError(f"{c['image']}: action differs by {d}")
    return worst


# --------------------------------------------------------------------------------------------------------------------
# OpenVLA-OFT
# --------------------------------------------------------------------------------------------------------------------


def normalize_proprio(raw, stats, norm_type):
    """openvla_utils.normalize_proprio."""
    low = np.array(stats["q01" if norm_type == "bounds_q99" else "min"], dtype=np.float64)
    high = np.array(stats["q99" if norm_type == "bounds_q99" else "max"], dtype=np.float64)
    mask = np.array(stats.get("mask", [True] * len(low)), dtype=bool)
    raw = np.asarray(raw, dtype=np.float64)
    return np.clip(np.where(mask, 2 * (raw - low) / (high - low + 1e-8) - 1, raw), -1.0, 1.0)


def unnormalize_oft(normalized, stats, norm_type):
    """OpenVLAForActionPrediction._unnormalize_actions of openvla-oft (note the +1e-8)."""
    low = np.array(stats["q01" if norm_type == "bounds_q99" else "min"], dtype=np.float64)
    high = np.array(stats["q99" if norm_type == "bounds_q99" else "max"], dtype=np.float64)
    mask = np.array(stats.get("mask", [True] * len(low)), dtype=bool)
    return np.where(mask, 0.5 * (normalized + 1) * (high - low + 1e-8) + low, normalized)


def mlp_resnet(x, W, prefix="model.", num_blocks=2, eps=1e-5):
    """prismatic.models.action_heads.MLPResNet (nn.LayerNorm default eps 1e-5)."""
    x = layer_norm(x, W[prefix + "layer_norm1.weight"], W[prefix + "layer_norm1.bias"], eps)
    x = np.maximum(linear(x, W[prefix + "fc1.weight"], W[prefix + "fc1.bias"]), 0.0)
    for i in range(num_blocks):
        b = f"{prefix}mlp_resnet_blocks.{i}.ffn."
        h = layer_norm(x, W[b + "0.weight"], W[b + "0.bias"], eps)
        x = x + np.maximum(linear(h, W[b + "1.weight"], W[b + "1.bias"]), 0.0)
    x = layer_norm(x, W[prefix + "layer_norm2.weight"], W[prefix + "layer_norm2.bias"], eps)
    return linear(x, W[prefix + "fc2.weight"], W[prefix + "fc2.bias"])


def proprio_project(pn, W):
    """prismatic.models.projectors.ProprioProjector."""
    return linear(gelu(linear(pn, W["fc1.weight"], W["fc1.bias"])), W["fc2.weight"], W["fc2.bias"])


def _find_component(ckpt_dir, pattern):
    hits = [f for f in os.listdir(ckpt_dir) if pattern in f and "checkpoint" in f]
    if len(hits) != 1:
        raise FileNotFoundError(f"expected exactly one {pattern} checkpoint in {ckpt_dir}, found {hits}")
    return os.path.join(ckpt_dir, hits[0])


def film_tower_weights(vb_sd, lora_scaling):
    """From a vision_backbone--*.pt state dict (FiLM wrapper around a PEFT-LoRA'd PrismaticVisionBackbone):
    returns (tower weights keyed like the safetensors 'vision_backbone.<tower>.<timm name>', with every LoRA layer
    merged as W + scaling * B @ A, and per tower the list of FiLM (scale, shift) linears per block)."""
    merged, film = {}, {"featurizer": {}, "fused_featurizer": {}}
    for k, v in vb_sd.items():
        if not k.startswith("vision_backbone."):
            raise KeyError(k)
        rest = k[len("vision_backbone."):]
        tower, name = rest.split(".", 1)
        if name.startswith("blocks."):
            _, idx, sub = name.split(".", 2)
            if sub.startswith("block."):
                name = f"blocks.{idx}.{sub[len('block.'):]}"
            elif sub.split(".")[0] in ("scale", "shift"):
                film[tower].setdefault(int(idx), {})[sub] = v
                continue
            else:
                raise KeyError(k)
        if ".lora_A." in name or ".lora_B." in name:
            continue
        if ".base_layer." in name:
            layer, param = name.split(".base_layer.")
            full = f"vision_backbone.{tower}.{layer}.{param}"
            if param == "weight":
                A = vb_sd[k.replace(".base_layer.weight", ".lora_A.default.weight")]
                B = vb_sd[k.replace(".base_layer.weight", ".lora_B.default.weight")]
                r = A.shape[0]
                delta = B.reshape(B.shape[0], r) @ A.reshape(r, -1)  # Linear: [out,r]@[r,in]; Conv2d: over r
                v = v + lora_scaling * delta.reshape(v.shape)
            merged[full] = v
        else:
            merged[f"vision_backbone.{tower}.{name}"] = v
    for k in vb_sd:
        if ".lora_A." in k and k.replace(".lora_A.default.weight", ".base_layer.weight") not in vb_sd:
            raise KeyError(f"LoRA factor without base layer: {k}")
    return merged, film


class OFTPolicy:
    def __init__(self, ckpt_dir, lora_rank=32):
        self.ck = Checkpoint(ckpt_dir)
        o = self.ck.oft
        self.chunk, self.adim, self.pdim = o["action_chunk"], o["action_dim"], o["proprio_dim"]
        self.num_images, self.use_film, self.norm_type = o["num_images"], o["use_film"], o["normalization"]
        self.head = read_pt(_find_component(ckpt_dir, "action_head"))
        self.proprio = read_pt(_find_component(ckpt_dir, "proprio_projector"))
        self.tower_w, self.film = None, None
        if self.use_film:
            # vision_backbone--*.pt is loaded with plain load_state_dict (no 'module.' stripping) in the reference
            vb = read_pt(_find_component(ckpt_dir, "vision_backbone"), strip_module_prefix=False)
            self.tower_w, self.film = film_tower_weights(vb, min(lora_rank, 16) / lora_rank)

    def layout(self, prompt_ids, space_id=SPACE_ID_TINY):
        ids = list(prompt_ids)
        if ids[-1] != space_id:
            ids.append(space_id)
        n_prompt = len(ids) - 1
        n_img_patches = (self.ck.vcfgs[0]["image_size"] // self.ck.vcfgs[0]["patch_size"]) ** 2
        num_patches = n_img_patches * self.num_images + 1  # + the proprio token
        n_act = self.adim * self.chunk
        return dict(input_ids=ids + [1] * n_act + [2], num_prompt_tokens=n_prompt,
                    patches_per_image=n_img_patches, num_patches=num_patches, num_placeholders=n_act,
                    sequence_length=1 + num_patches + n_prompt + n_act + 1,
                    first_head_position=num_patches + n_prompt)

    def predict(self, images_u8, prompt_ids, proprio_raw, unnorm_key):
        ck = self.ck
        lay = self.layout(prompt_ids)
        ids = lay["input_ids"]
        n_lang = lay["num_prompt_tokens"] + 1
        n_act = lay["num_placeholders"]
        emb = ck.embed(ids)
        placeholder = np.zeros(len(ids), dtype=bool)
        placeholder[n_lang : n_lang + n_act] = True
        films = None
        if self.use_film:
            avg = emb[~placeholder].mean(axis=0)  # BOS, prompt, '\u2581', stop (raw embeddings)
            films = []
            for tower, vcfg in zip(("featurizer", "fused_featurizer"), ck.vcfgs):
                per_block = []
                for i in range(vcfg["depth"]):
                    f = self.film[tower][i]
                    per_block.append((linear(avg, f["scale.weight"], f["scale.bias"]),
                                      linear(avg, f["shift.weight"], f["shift.bias"])))
                films.append(per_block)
        emb = emb * (~placeholder)[:, None]
        assert len(images_u8) == self.num_images
        feats = np.concatenate(
            [ck.fused_features(ck.pixel_values(im), self.tower_w, films) for im in images_u8], axis=0)
        patches = ck.project(feats)
        pstats = ck.norm_stats[unnorm_key]["proprio"]
        pn = normalize_proprio(proprio_raw, pstats, self.norm_type)
        ptok = proprio_project(pn[None, :], self.proprio)
        seq = np.concatenate([emb[:1], patches, ptok, emb[1:]], axis=0)
        assert seq.shape[0] == lay["sequence_length"]
        hidden = ck.llama(seq, causal=False)
        s = lay["first_head_position"]
        hs = hidden[s : s + n_act]
        normalized = mlp_resnet(hs.reshape(self.chunk, -1), self.head)
        astats = ck.norm_stats[unnorm_key]["action"]
        actions = unnormalize_oft(normalized, astats, self.norm_type)
        # discrete parallel variant (action_head=None): argmax of the logits at the same positions
        lg = ck.logits(hs)
        top2 = np.sort(lg, axis=1)[:, -2:]
        tok = np.argmax(lg, axis=1)
        dnorm = ck.tokens_to_normalized(tok).reshape(self.chunk, self.adim)
        discrete = dict(token_ids=[int(t) for t in tok], margins=[float(m) for m in (top2[:, 1] - top2[:, 0])],
                        normalized_actions=dnorm, actions=unnormalize_oft(dnorm, astats, self.norm_type))
        return dict(layout=lay, normalized_proprio=pn, normalized_actions=normalized, actions=actions,
                    discrete=discrete, hidden_first=hs[0], patches=patches, proprio_token=ptok[0])


if __name__ == "__main__":
    w = check_golden()
    print(f"golden reproduced: worst |diff| {w:.3g}")
    sys.exit(0)
