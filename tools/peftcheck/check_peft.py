"""Loads an adapter written by our trainer with Hugging Face PEFT and compares PEFT's merge with our merged checkpoint.

usage: python3 check_peft.py OUT   (OUT written by `dotnet run -c Release -- OUT` in this folder)
The base model is rebuilt as a plain module tree from the base checkpoint's tensor names (nn.Linear for every 2-D
.weight, with its bias when present), so PEFT sees exactly the Hugging Face module paths."""
import glob, json, os, sys
import torch, torch.nn as nn
import peft, safetensors
from peft import LoraConfig, PeftModel
from safetensors.torch import load_file

out = sys.argv[1]
step = sorted(glob.glob(os.path.join(out, "run", "step-*")))[-1]
adapter_dir, merged_dir = os.path.join(step, "adapter"), os.path.join(step, "model")
print(f"torch {torch.__version__}, peft {peft.__version__}, safetensors {safetensors.__version__}")

config = LoraConfig.from_pretrained(adapter_dir)
print(f"LoraConfig: r={config.r} lora_alpha={config.lora_alpha} target_modules={sorted(config.target_modules)} init={config.init_lora_weights}")

base = load_file(os.path.join(out, "base", "model.safetensors"))
merged = load_file(os.path.join(merged_dir, "model.safetensors"))
adapter = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))

class Node(nn.Module):
    pass

def child(root, path):
    m = root
    for part in path:
        if not hasattr(m, part):
            m.add_module(part, Node())
        m = getattr(m, part)
    return m

root = Node()
linears = set()
for name, t in base.items():
    parts = name.split(".")
    if parts[-1] == "weight" and t.ndim == 2 and "embed_tokens" not in name:
        mod_path = parts[:-1]
        bias = ".".join(mod_path + ["bias"])
        lin = nn.Linear(t.shape[1], t.shape[0], bias=bias in base)
        with torch.no_grad():
            lin.weight.copy_(t)
            if bias in base:
                lin.bias.copy_(base[bias])
        parent = child(root, mod_path[:-1])
        parent.add_module(mod_path[-1], lin)
        linears.add(".".join(mod_path))
for name, t in base.items():
    parts = name.split(".")
    if parts[-1] == "weight" and t.ndim == 4:  # the ViT patch embedding: a Conv2d with stride = kernel, as in timm
        mod_path = parts[:-1]
        bias = ".".join(mod_path + ["bias"])
        conv = nn.Conv2d(t.shape[1], t.shape[0], t.shape[2], stride=t.shape[2], bias=bias in base)
        with torch.no_grad():
            conv.weight.copy_(t)
            if bias in base:
                conv.bias.copy_(base[bias])
        child(root, mod_path[:-1]).add_module(mod_path[-1], conv)
        linears.add(".".join(mod_path))
for name, t in base.items():
    parts = name.split(".")
    if ".".join(parts[:-1]) in linears:
        continue
    parent = child(root, parts[:-1])
    parent.register_parameter(parts[-1], nn.Parameter(t.clone()))

model = PeftModel.from_pretrained(root, adapter_dir)
state = model.state_dict()
ok_keys = 0
for key, t in adapter.items():
    peft_key = key.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight")
    assert peft_key in state, f"PEFT has no {peft_key}"
    assert torch.equal(state[peft_key], t), f"{key} loaded with different values"
    ok_keys += 1
adapted = [n for n, m in model.named_modules() if hasattr(m, "lora_A") and len(getattr(m, "lora_A")) > 0]
print(f"adapter tensors loaded into PEFT: {ok_keys}/{len(adapter)}; PEFT adapted {len(adapted)} modules "
      f"(ours {len(adapter) // 2}; the rest are layers our inference never builds, left at B = 0)")

merged_peft = model.merge_and_unload()
worst, compared = 0.0, 0
for name, t in merged_peft.state_dict().items():
    if name in merged and t.ndim == 2:
        worst = max(worst, (t.float() - merged[name].float()).abs().max().item())
        compared += 1
changed = sum(1 for n in adapter if n.endswith("lora_B.weight") and adapter[n].abs().sum() > 0)
print(f"PEFT merge_and_unload vs our merged checkpoint: {compared} weight matrices, max |diff| {worst:.3g}; "
      f"{changed} adapters with non-zero B")
assert worst < 1e-5, "merged weights differ"
print("OK")
